"""Turn-taking for interleaved A/B runs: two pytest processes that never run at the same time.

`moebench ab` starts one pytest process per side (two commits, or one tree with and without an option) and a
`Referee` between them. Both start up at once (imports, model building, warm-up: nothing is timed yet, and a
serialized start-up cost 44 s a process pair for switch-base-8 on an H100 80GB HBM3); the first turn is
handed out when both have reached their first timed round. From then on each process holds the floor in turn and
gives it up at the start of every timed round (`Turns.take`), and everything else (later models, accuracy passes)
is serialized too. The floor goes
a b b a a b b a ...: the rounds run A1 B1 B2 A2 A3 B3 ..., so each side goes first in half the pairs and whatever
the second of two back-to-back rounds gains or loses (a clock still boosted, a cache still warm) cancels instead of
favouring one side. Round i of A and round i of B are measured a second apart, under the same
machine state, which is what `moebench.stats.compare_paired` needs: a machine's slow spells and run-to-run
offsets hit both rounds of a pair and cancel in their ratio.

The floor is passed over a local socket (`multiprocessing.connection`, authenticated) rather than polled files: a
waiting process blocks in `recv`, burns no CPU, and wakes within microseconds. If one side exits or dies, the
other is given the floor for good and finishes alone (its unpaired rounds are reported, not compared).
"""

from __future__ import annotations

import os
import secrets
import tempfile
import threading
import time
from multiprocessing.connection import Client, Connection, Listener, wait
from pathlib import Path
from typing import cast

ENV_ADDRESS = "MOEBENCH_TURNS"
ENV_KEY = "MOEBENCH_TURNS_KEY"
ENV_SIDE = "MOEBENCH_TURNS_SIDE"
ENV_GRAIN = "MOEBENCH_TURNS_GRAIN"
SIDES = ("a", "b")
#: How often the floor changes: before every timed round, or also between decode steps (pairs ~30 ms apart
#: instead of ~1 s: on an H100 80GB HBM3 the A/A pairs then spread by 9.4-12.8% instead of 19.2%,
#: benchmarks/RESULTS.md "Interleaved A/B runs")
GRAINS = ("round", "step")


class TurnsError(RuntimeError):
    """The turn-taking channel broke (the referee is gone): the run cannot stay interleaved."""


class Turns:
    """One side's end of the channel. Connecting does not wait: the side runs freely until its first `take`."""

    def __init__(self, address: str, authkey: bytes, side: str, grain: str = "round"):
        if side not in SIDES:
            raise ValueError(f"turn-taking side must be one of {SIDES}, got {side!r}")
        if grain not in GRAINS:
            raise ValueError(f"turn-taking grain must be one of {GRAINS}, got {grain!r}")
        self.side = side
        self.grain = grain
        self.turns = 0
        try:
            self._conn: Connection | None = Client(address, family="AF_UNIX", authkey=authkey)
        except OSError as exc:
            raise TurnsError(f"cannot reach the A/B referee at {address} ({exc}); run A/B runs through "
                             f"`moebench ab`, or unset {ENV_ADDRESS}") from None
        import moebench

        self._send(("hello", side, os.getpid(), str(Path(moebench.__file__).resolve().parent)))

    @classmethod
    def from_env(cls) -> Turns | None:
        """The channel `moebench ab` set up for this process, or None in a plain run."""
        address = os.environ.get(ENV_ADDRESS)
        if not address:
            return None
        key, side = os.environ.get(ENV_KEY), os.environ.get(ENV_SIDE)
        if not key or not side:
            raise TurnsError(f"{ENV_ADDRESS} is set but {ENV_KEY} or {ENV_SIDE} is not; run A/B runs through "
                             "`moebench ab`")
        return cls(address, bytes.fromhex(key), side, os.environ.get(ENV_GRAIN) or "round")

    def take(self) -> None:
        """Give the floor to the other side and wait until it comes back: call right before each timed round (and,
        at step grain, between decode steps)."""
        self.turns += 1
        self._send("turn")
        self._await_floor()

    def close(self) -> None:
        """Leave for good: the other side runs on alone."""
        if self._conn is not None:
            try:
                self._conn.send("bye")
            except OSError:
                pass
            self._conn.close()
            self._conn = None

    def _send(self, msg) -> None:
        if self._conn is None:
            raise TurnsError("the turn-taking channel is closed")
        try:
            self._conn.send(msg)
        except OSError as exc:
            raise TurnsError(f"lost the A/B referee ({exc})") from None

    def _await_floor(self) -> None:
        try:
            msg = self._conn.recv()  # type: ignore[union-attr]
        except (EOFError, OSError) as exc:
            raise TurnsError(f"lost the A/B referee while waiting for the floor ({exc!r})") from None
        if msg != "go":
            raise TurnsError(f"unexpected message from the A/B referee: {msg!r}")


class Referee:
    """Hands the floor to A once both sides have asked for their first turn (or one has left), then, whenever the
    holder asks for a turn, to the side that `next_side` names (b, b, a, a, b, b, ...: balanced order), or back to
    the holder when the other side has left.

    `env(side)` gives the environment a side's process needs; `start()` serves in a background thread;
    `log` keeps (time, side) for every grant and `hello[side]` what each side reported (its moebench package
    folder: `moebench ab` checks that each side imported its own tree)."""

    def __init__(self, folder: str | Path | None = None, grain: str = "round"):
        if grain not in GRAINS:
            raise ValueError(f"turn-taking grain must be one of {GRAINS}, got {grain!r}")
        self.grain = grain
        self._tmp = tempfile.TemporaryDirectory(prefix="moebench-ab-") if folder is None else None
        base = Path(self._tmp.name) if self._tmp is not None else Path(folder)  # type: ignore[arg-type]
        self.address = str(base / "turns.sock")
        self.authkey = secrets.token_bytes(16)
        self._listener = Listener(self.address, family="AF_UNIX", authkey=self.authkey)
        self.hello: dict[str, tuple] = {}
        self.log: list[tuple[float, str]] = []
        self.error: str | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    def env(self, side: str) -> dict[str, str]:
        return {ENV_ADDRESS: self.address, ENV_KEY: self.authkey.hex(), ENV_SIDE: side, ENV_GRAIN: self.grain}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="moebench-ab-referee", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving (after both processes ended, or to abandon the run)."""
        self._closed = True
        try:
            self._listener.close()
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._tmp is not None:
            self._tmp.cleanup()

    def _serve(self) -> None:
        conns: dict[str, Connection] = {}
        try:
            while len(conns) < len(SIDES):
                conn = self._listener.accept()
                msg = conn.recv()
                if not (isinstance(msg, tuple) and msg and msg[0] == "hello" and msg[1] in SIDES
                        and msg[1] not in conns):
                    conn.close()
                    continue
                conns[msg[1]] = conn
                self.hello[msg[1]] = msg[2:]
        except (OSError, EOFError):
            return  # closed before both sides arrived: `moebench ab` reports the side that failed to start
        self._run(conns)

    @staticmethod
    def next_side(grants: int) -> str:
        """The side of grant number `grants` (0-based): a, b, b, a, a, b, b, a, ..."""
        return SIDES[((grants + 1) // 2) % 2]

    def _grant(self, conns: dict[str, Connection], side: str) -> None:
        self.log.append((time.perf_counter(), side))
        conns[side].send("go")

    def _run(self, conns: dict[str, Connection]) -> None:
        alive = dict(conns)
        side_of = {c: s for s, c in conns.items()}
        waiting: set[str] = set()  # sides blocked in `take`
        started = False  # the first turn is handed out once every side still running waits for it
        while alive and not self._closed:
            for ready in wait(list(alive.values()), timeout=1.0):
                conn = cast(Connection, ready)
                side = side_of[conn]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    msg = "bye"
                other = "b" if side == "a" else "a"
                if msg == "bye":
                    del alive[side]
                    conn.close()
                    if started and other in alive and other in waiting:
                        waiting.discard(other)
                        self._grant(conns, other)
                elif msg == "turn" and not started:
                    waiting.add(side)
                elif msg == "turn":
                    if other in alive and other in waiting and self.next_side(len(self.log)) == other:
                        waiting.add(side)
                        waiting.discard(other)
                        self._grant(conns, other)
                    else:  # its second turn in a row, or the other side has left: run on alone
                        self._grant(conns, side)
                else:
                    self.error = f"side {side} sent {msg!r}"
            if not started and alive and set(alive) <= waiting:
                started = True
                first = SIDES[0] if SIDES[0] in alive else SIDES[1]
                waiting.discard(first)
                self._grant(conns, first)
