"""How late a thread gets the GIL back after a GIL-free wait while the main thread runs Python, per switch interval.

Why: the fetch="device" courier (`moeoffload.courier`) wakes from a CUDA event's wait while the main thread is busy
launching layers; every late hand-over adds to a miss's wait. CPU only, no GPU needed:

    python benchmarks/gil_handover.py            # median and worst extra delay of 200 wake-ups per interval
"""

from __future__ import annotations

import argparse
import sys
import threading
import time


def handover_delays(interval: float, wakeups: int, nap: float) -> list[float]:
    """Extra delay (s) beyond `nap` of each of `wakeups` sleeps in a second thread while this one spins in Python."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(interval)
    late: list[float] = []

    def waker() -> None:
        for _ in range(wakeups):
            t = time.perf_counter()
            time.sleep(nap)
            late.append(time.perf_counter() - t - nap)

    try:
        thread = threading.Thread(target=waker)
        thread.start()
        spins = 0
        while thread.is_alive():  # the busy main thread: pure Python, holds the GIL whenever it can
            spins += 1
        thread.join()
    finally:
        sys.setswitchinterval(old)
    return sorted(late)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--intervals", type=float, nargs="+", default=[5e-3, 5e-4, 1e-4])
    ap.add_argument("--wakeups", type=int, default=200)
    ap.add_argument("--nap", type=float, default=1e-3, help="each GIL-free wait, seconds")
    args = ap.parse_args()
    print(f"{'switch interval ms':>18} {'median late ms':>14} {'worst late ms':>13}")
    for interval in args.intervals:
        late = handover_delays(interval, args.wakeups, args.nap)
        print(f"{interval * 1e3:18.2f} {late[len(late) // 2] * 1e3:14.3f} {late[-1] * 1e3:13.3f}")


if __name__ == "__main__":
    main()
