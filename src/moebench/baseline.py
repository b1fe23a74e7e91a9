"""Stored baselines and the per-case verdict against them.

A baseline is `baselines/<machine-class>/<suite>.json`: the records of one stored run of one suite, each with its
per-round samples, plus the command that made it and the machine fingerprint. It is written only on request
(`--moebench-save-baseline`, `moebench baseline update`), atomically (temporary file, fsync, rename), and never over
a file that does not read as a baseline.

Verdicts: timed metrics (throughput, latency) go through `moebench.stats.compare` on the per-round samples, so a case
is "regressed" only when the change is statistically significant AND beyond its limit; deterministic ones (GPU
memory, bytes copied) are compared directly against their limit. A baseline case is compared only with a run case of
the same tier, dtype, weights (checkpoint, trained, synthetic or synthetic calibrated), workload and device (cpu or
cuda, and the same GPU model); any other pair is "not comparable",
with the reason, and never fails the run.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .history import StoreError, _clean, injected

if TYPE_CHECKING:
    from collections.abc import Iterable

SCHEMA = "moebench-baseline"
VERSION = 1
DEFAULT_LIMITS = "throughput:5%,gpu_memory:2%"
#: Confidence of the statistical verdicts (their false-alarm level is 1 - this).
CONFIDENCE = 0.99
#: Rounds per side suggested when a baseline itself has too few (5/5 is the fewest balanced count reaching p < 0.01).
SUGGESTED_ROUNDS = 10


class BaselineError(StoreError):
    """A baseline file that is missing, corrupt or of another schema; the message names the file and the fix."""


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    sample_key: str | None  # per-round samples under record["samples"]; None: one deterministic value
    value: Callable[[dict], float | None]  # record -> float | None (the figure shown, and compared when deterministic)
    label: str
    #: the same samples in units of the machine-speed probe (`moebench.probe`); compared instead when both sides
    #: have them, so that the machine's drift between the two runs cancels
    normalized_key: str | None = None


def _memory(record: dict):
    peak = record.get("torch_peak_bytes")
    return peak if peak is not None else record.get("cache_bytes")


def _median(values):
    s = sorted(values)
    n = len(s)
    return None if not n else (s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2]))


METRICS = {
    "throughput": Metric("throughput", True, "tokens_per_s", lambda r: r.get("tokens_per_s"), "tokens/s",
                         "tokens_per_probe"),
    "latency": Metric("latency", False, "p50_ms", lambda r: r.get("p50_ms"), "p50 ms", "p50_per_probe"),
    "gpu_memory": Metric("gpu_memory", False, None, _memory, "GPU/cache bytes"),
    "h2d": Metric("h2d", False, None, lambda r: r.get("h2d_bytes_per_round"), "H2D bytes/round"),
}
_LIMIT = re.compile(r"^\s*([a-z_]+)\s*:\s*(\d+(?:\.\d+)?)\s*%\s*$")


def parse_limits(spec: str) -> dict[str, float]:
    """'throughput:5%,gpu_memory:2%' -> {'throughput': 0.05, 'gpu_memory': 0.02}; ValueError on anything else."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty failure-limit spec; write e.g. {DEFAULT_LIMITS!r}")
    limits: dict[str, float] = {}
    for part in spec.split(","):
        m = _LIMIT.match(part)
        if not m:
            raise ValueError(f"malformed limit {part.strip()!r}; write METRIC:PERCENT%, e.g. {DEFAULT_LIMITS!r} "
                             f"(metrics: {', '.join(METRICS)})")
        name, pct = m.group(1), float(m.group(2))
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r} in {part.strip()!r}; metrics: {', '.join(METRICS)}")
        if not 0 < pct < 100:
            raise ValueError(f"limit {part.strip()!r} must be between 0% and 100% (exclusive)")
        if name in limits:
            raise ValueError(f"metric {name!r} given twice in {spec!r}")
        limits[name] = pct / 100
    return limits


# ------------------------------------------------------------------------------------------------------ files
def path_for(base_dir: str | Path, machine_cls: str, suite: str) -> Path:
    return Path(base_dir) / machine_cls / f"{suite}.json"


def from_run(run: dict, suite: str, command: str | None = None) -> dict:
    """A baseline of `suite` from a stored run: its passed records that ran without an injected delay."""
    if run.get("status", "complete") != "complete":
        raise BaselineError(f"run {run.get('run_id')} is {run.get('status')!r}; a baseline needs a complete run "
                            "(rerun the suite)")
    records = [r for r in run.get("records", []) if r.get("suite") == suite]
    if not records:
        raise BaselineError(f"run {run.get('run_id')} has no records of suite {suite!r} (it has "
                            f"{', '.join(run.get('suites', [])) or 'none'})")
    if any(injected(r) for r in records):
        raise BaselineError(f"run {run.get('run_id')} ran with an injected delay (a test hook); it cannot be a "
                            "baseline: rerun without --moebench-inject-delay")
    cases = {r["case"]: r for r in records if r.get("passed", True)}
    if not cases:
        raise BaselineError(f"run {run.get('run_id')}: no case of suite {suite!r} passed; fix them first")
    return {
        "schema": SCHEMA,
        "version": VERSION,
        "suite": suite,
        "machine_class": run.get("machine_class"),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command or run.get("command"),
        "source_run_id": run.get("run_id"),
        "source_timestamp": run.get("timestamp"),
        "machine": run.get("machine"),
        "git": run.get("git"),
        "options": run.get("options"),
        "cases": cases,
    }


def add_earlier_runs(baseline: dict, earlier: list[dict], keep: int) -> dict:
    """Attach to each case of `baseline` the per-round samples of the same case in up to `keep - 1` earlier runs
    (newest first): complete, with no injected slowdown, of the same machine class, the case passed and comparable
    (same tier, dtype, workload, device). The verdict then tests at run level (`stats.compare_runs`), against how
    much runs of unchanged code differ among themselves, which the rounds of one run cannot show."""
    if keep < 1:
        raise BaselineError(f"a baseline keeps at least 1 run, got {keep}")
    # copies: the cases are the records of a stored run, which must not change under it
    baseline = dict(baseline, cases={name: dict(case, earlier_runs=list(case.get("earlier_runs") or []))
                                     for name, case in baseline["cases"].items()})
    cls = baseline.get("machine_class")
    ids = [baseline.get("source_run_id")]
    for run in earlier:
        if len(ids) >= keep:
            break
        if run.get("status", "complete") != "complete" or run.get("run_id") in ids:
            continue
        if cls and run.get("machine_class") and run.get("machine_class") != cls:
            continue
        used = False
        for r in run.get("records", []):
            case = baseline["cases"].get(r.get("case"))
            if case is None or r.get("suite") != baseline["suite"] or injected(r) or not r.get("passed", True):
                continue
            if comparability(case, r)[0] or not r.get("samples"):
                continue
            case["earlier_runs"].append({"run_id": run.get("run_id"), "samples": r["samples"]})
            used = True
        if used:
            ids.append(run.get("run_id"))
    for case in baseline["cases"].values():
        if not case["earlier_runs"]:
            del case["earlier_runs"]
    baseline["runs"] = ids
    return baseline


def load(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise BaselineError(f"{path}: no such baseline; make one with --moebench-save-baseline or "
                            "`moebench baseline update`")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BaselineError(f"{path}: unreadable or corrupt baseline ({type(exc).__name__}); restore it from git "
                            f"or remake it with `moebench baseline update` (the file is left as it is)") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        schema = data.get("schema") if isinstance(data, dict) else None
        raise BaselineError(f"{path}: not a moebench baseline (schema {schema!r}); "
                            "point --moebench-compare at a baselines/<machine-class>/<suite>.json file")
    if data.get("version") != VERSION:
        raise BaselineError(f"{path}: baseline version {data.get('version')!r}, this moebench reads {VERSION}; "
                            "upgrade moebench or remake the baseline with `moebench baseline update`")
    if not isinstance(data.get("cases"), dict) or not isinstance(data.get("suite"), str):
        raise BaselineError(f"{path}: baseline without 'suite' or 'cases'; remake it with `moebench baseline update`")
    return data


def save(path: str | Path, baseline: dict, *, force: bool = False) -> Path:
    """Write atomically (temporary file in the same folder, fsync, rename). An existing file that is not a
    readable baseline is never replaced unless `force`: it may be someone's data."""
    path = Path(path)
    if path.exists() and not force:
        load(path)  # raises BaselineError, leaving it alone
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_clean(baseline), indent=1, sort_keys=True, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


# --------------------------------------------------------------------------------------------------- verdicts
def compare_metric(metric: Metric, base: dict, cur: dict, limit: float) -> dict:
    """{'status', 'ratio', 'baseline', 'current', 'message'} for one metric of one case."""
    from . import stats

    bval, cval = metric.value(base), metric.value(cur)
    if metric.sample_key is not None:
        bs = (base.get("samples") or {}).get(metric.sample_key)
        cs = (cur.get("samples") or {}).get(metric.sample_key)
        if not bs or not cs:
            return {"status": "inconclusive", "ratio": (cval / bval) if bval and cval else None, "baseline": bval,
                    "current": cval, "message": f"{metric.name}: no per-round samples on "
                    f"{'the baseline' if not bs else 'this run'} side; remake the baseline with this moebench"}
        bval, cval = _median(bs), _median(cs)
        run_level = _run_level(metric, base, cur, limit)
        if run_level is not None:
            return {**run_level, "baseline": bval, "current": cval}
        key = metric.sample_key
        if metric.normalized_key is not None:
            bn = (base.get("samples") or {}).get(metric.normalized_key)
            cn = (cur.get("samples") or {}).get(metric.normalized_key)
            if bn and cn and len(bn) == len(bs) and len(cn) == len(cs):
                bs, cs, key = bn, cn, metric.normalized_key
        v = stats.compare(bs, cs, higher_is_better=metric.higher_is_better, threshold=limit, confidence=CONFIDENCE)
        normalized = key != metric.sample_key
        return {"status": v.status, "ratio": v.ratio, "ci": [v.ci_low, v.ci_high], "p_value": v.p_value,
                "baseline": bval, "current": cval, "n": [len(bs), len(cs)], "samples": key, "normalized": normalized,
                "message": f"{'machine-normalized ' if normalized else ''}{v.message}",
                "too_few_rounds": bool(v.min_p >= 1 - CONFIDENCE or min(len(bs), len(cs)) < stats.MIN_ROUNDS),
                "rounds_needed": v.rounds_needed}
    if bval is None or cval is None or bval <= 0:
        return {"status": "inconclusive", "ratio": None, "baseline": bval, "current": cval,
                "message": f"{metric.name}: not measured on both sides"}
    ratio = cval / bval
    worse = (ratio < 1 - limit) if metric.higher_is_better else (ratio > 1 + limit)
    better = (ratio > 1 + limit) if metric.higher_is_better else (ratio < 1 - limit)
    status = "regressed" if worse else "improved" if better else "unchanged"
    return {"status": status, "ratio": ratio, "baseline": bval, "current": cval,
            "message": f"{metric.name} {ratio:.3f}x ({bval:.4g} -> {cval:.4g}, limit {limit:.0%}): {status}"}


def _run_level(metric: Metric, base: dict, cur: dict, limit: float) -> dict | None:
    """The run-level verdict when the baseline case keeps samples of at least `stats.MIN_RUNS` runs (normalized
    when every run and this one have them), else None (the per-round verdict applies)."""
    from . import stats

    sets = [base.get("samples") or {}] + [e.get("samples") or {} for e in base.get("earlier_runs") or []]
    if len(sets) < stats.MIN_RUNS:
        return None
    key = metric.normalized_key
    if key is None or not all(s.get(key) for s in sets) or not (cur.get("samples") or {}).get(key):
        key = metric.sample_key
    if not all(s.get(key) for s in sets):
        return None
    v = stats.compare_runs([s[key] for s in sets], cur["samples"][key], higher_is_better=metric.higher_is_better,
                           threshold=limit, confidence=CONFIDENCE)
    normalized = key != metric.sample_key
    return {"status": v.status, "ratio": v.ratio, "ci": [v.ci_low, v.ci_high], "p_value": v.p_value,
            "n": [len(sets), len(cur["samples"][key])], "samples": key, "normalized": normalized, "level": "runs",
            "message": f"{'machine-normalized ' if normalized else ''}{v.message}", "too_few_rounds": False,
            "rounds_needed": None}


def _device_type(record: dict) -> str | None:
    device = record.get("device")
    return str(device).split(":")[0] if device else None


def _gpu_name(machine: dict | None) -> str | None:
    names = ((machine or {}).get("gpu") or {}).get("names") or []
    return str(names[0]) if names else None


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def weights_class(record: dict) -> str | None:
    """What kind of weights a record ran on: "checkpoint", "trained", "synthetic" (seeded uniform) or
    "synthetic calibrated" / "synthetic calibrated-v2" (moebench.zoo.calibrate, by version); None for a record without
    the field. Paths and seeds are left
    out: the same checkpoint lies at other paths on other machines."""
    text = record.get("weights")
    if not text:
        return None
    kind = str(text).split("(", 1)[0].split(":", 1)[0]
    routing = re.search(r"routing=(calibrated[\w-]*)", str(text))
    return f"{kind} {routing.group(1)}" if kind == "synthetic" and routing else kind


def comparability(base: dict, cur: dict, base_machine: dict | None = None,
                  cur_machine: dict | None = None) -> tuple[list[str], str]:
    """([differing fields], reason); no fields when the two cases may be compared. A field missing on either side
    (an older record, an unknown machine) is not held against the pair."""
    fields: list[str] = []
    described: dict[str, list[str]] = {"base": [], "cur": []}
    for key in ("tier", "dtype", "interleaved", "kernels", "fetch", "weights"):
        b, c = base.get(key), cur.get(key)
        if key == "weights":  # routing differs between weight sources, so hit rates and speed do too
            b, c = weights_class(base), weights_class(cur)
        if key == "interleaved":  # rounds timed step by step beside another process (moebench ab --grain step)
            b, c = ("step" if v == "step" else "none" for v in (b, c))  # are not timed like a plain run's
        if key == "kernels":  # records before the field all ran the exact loop, once called "loop"
            b, c = ("exact" if v in (None, "loop") else v for v in (b, c))
        if key == "fetch":  # and fetched on the host
            b, c = (v or "host" for v in (b, c))
        if b is not None and c is not None and b != c:
            fields.append(key)
            described["base"].append(f"{key} {b}")
            described["cur"].append(f"{key} {c}")
    bw, cw = base.get("workload"), cur.get("workload")
    if isinstance(bw, dict) and isinstance(cw, dict) and not _same(bw, cw):
        fields.append("workload")
        keys = [k for k in sorted(set(bw) | set(cw)) if not _same(bw.get(k), cw.get(k))]
        described["base"].append("workload " + ", ".join(f"{k}={bw.get(k)}" for k in keys))
        described["cur"].append("workload " + ", ".join(f"{k}={cw.get(k)}" for k in keys))
    bt, ct = _device_type(base), _device_type(cur)
    # the GPU a case ran on (a record of a run spread over several GPUs says), else the machine's first
    bg, cg = base.get("gpu") or _gpu_name(base_machine), cur.get("gpu") or _gpu_name(cur_machine)
    if bt is not None and ct is not None and bt != ct:
        fields.append("device")
    elif bt == ct == "cuda" and bg and cg and bg.strip().lower() != cg.strip().lower():
        fields.append("GPU")
    if not fields:
        return [], ""

    def where(kind: str | None, gpu: str | None, record: dict) -> str:
        return gpu if kind == "cuda" and gpu else str(kind or record.get("device") or "an unknown device")

    b_text = " ".join(described["base"] + [f"on {where(bt, bg, base)}"])
    c_text = " ".join(described["cur"] + [f"on {where(ct, cg, cur)}"])
    return fields, f"baseline {b_text}, this run {c_text}"


def compare_case(base: dict | None, cur: dict, limits: dict[str, float], *, base_machine: dict | None = None,
                 cur_machine: dict | None = None) -> dict:
    """Verdict of one case: 'regressed' if any limited metric regressed, else 'improved' / 'inconclusive' /
    'unchanged' in that order; 'new' when the baseline has no such case; 'not comparable' (never a failure) when the
    baseline case ran another tier, dtype, workload or device (the machines' fingerprints give the GPU model)."""
    if base is None:
        return {"status": "new", "metrics": {}, "message": "no baseline for this case"}
    fields, reason = comparability(base, cur, base_machine, cur_machine)
    if fields:
        return {"status": "not comparable", "metrics": {}, "fields": fields, "reason": reason,
                "message": f"not comparable: {reason}"}
    metrics = {name: compare_metric(METRICS[name], base, cur, limit) for name, limit in limits.items()}
    statuses = [m["status"] for m in metrics.values()]
    status = next((s for s in ("regressed", "improved", "inconclusive") if s in statuses), "unchanged")
    said = [m["message"] for m in metrics.values() if m["status"] == status and status != "unchanged"]
    out: dict = {"status": status, "metrics": metrics, "message": "; ".join(said) if said else status}
    thr = metrics.get("throughput")
    if thr is not None:
        out["baseline_tokens_per_s"], out["ratio"] = thr["baseline"], thr["ratio"]
    elif base.get("tokens_per_s") and cur.get("tokens_per_s"):
        out["baseline_tokens_per_s"], out["ratio"] = base["tokens_per_s"], cur["tokens_per_s"] / base["tokens_per_s"]
    timed = [m for m in metrics.values() if "n" in m]
    if timed:
        out["rounds"] = timed[0]["n"]
        if timed[0].get("level") == "runs":
            out["level"] = "runs"  # rounds = [baseline runs, this run's rounds]
        out["too_few_rounds"] = any(m["too_few_rounds"] for m in timed)
        needs = [m["rounds_needed"] for m in timed if m["too_few_rounds"]]
        if needs:
            out["rounds_needed"] = None if None in needs else max(needs)
    if injected(cur):
        out["injected"] = injected(cur)
    return out


def compare_records(base_cases: dict[str, dict], records: list[dict], limits: dict[str, float], *,
                    base_machine: dict | None = None, cur_machine: dict | None = None) -> dict[str, dict]:
    return {r["case"]: compare_case(base_cases.get(r["case"]), r, limits, base_machine=base_machine,
                                    cur_machine=cur_machine) for r in records}


def rounds_hint(comparisons: Iterable[dict | None]) -> str | None:
    """One line for the whole session when some comparison had too few rounds for its test to reach the level:
    such a run can never flag a change, whatever its size. None when every comparison could."""
    short = [c for c in comparisons if c and c.get("too_few_rounds")]
    if not short:
        return None
    nb, nc = min(tuple(c.get("rounds") or (0, 0)) for c in short)
    needs = [c.get("rounds_needed") for c in short]
    alpha = f"{1 - CONFIDENCE:.2g}"
    fewest = "" if len({tuple(c.get("rounds") or (0, 0)) for c in short}) == 1 else "as few as "
    head = (f"moebench: {len(short)} comparison(s) with {fewest}{nb}/{nc} rounds (baseline/this run) cannot reach "
            f"p<{alpha}, so no change can be flagged")
    from .stats import MIN_ROUNDS

    if nb < MIN_ROUNDS or None in needs or max(n for n in needs if n is not None) > SUGGESTED_ROUNDS * 2:
        return (f"{head}: remake the baseline with --moebench-rounds >= {SUGGESTED_ROUNDS} and run with as many")
    need = max(n for n in needs if n is not None)
    return f"{head}: use --moebench-rounds >= {need}"


def verdict_notes(records: list[dict], baseline_paths: dict[str, str]) -> list[tuple[str, bool]]:
    """Session lines under the table, each said once: per suite, the cases its baseline could not be compared with
    (another tier or device: reported, not checked); and the hint when the round counts cannot reach significance."""
    notes: list[tuple[str, bool]] = []
    incomparable: dict[str, list[dict]] = {}
    for r in records:
        comparison = r.get("comparison") or {}
        if comparison.get("status") == "not comparable":
            incomparable.setdefault(r.get("suite") or "?", []).append(comparison)
    for suite, comps in incomparable.items():
        reasons = sorted({c["reason"] for c in comps})
        more = f" (and {len(reasons) - 1} other reason(s))" if len(reasons) > 1 else ""
        notes.append((f"baseline: {len(comps)} case(s) of suite {suite!r} not comparable with "
                      f"{baseline_paths.get(suite, 'the baseline')}: {reasons[0]}{more}; reported, not checked",
                      True))
    hint = rounds_hint(r.get("comparison") for r in records)
    if hint:
        notes.append((hint, True))
    return notes
