"""The closing table: one row per case, rendered with tabulate."""

from __future__ import annotations

import math

from tabulate import tabulate

from .engine import kernels_name

MIB = 2**20


def _num(value, fmt: str, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value / scale, fmt)


def memory_column(records: list[dict]) -> str:
    return "GPU mem MiB" if any(r.get("torch_peak_bytes") is not None for r in records) else "cache MiB"


def rows(records: list[dict]) -> tuple[list[str], list[list[str]]]:
    mem = memory_column(records)
    headers = ["model", "policy", "budget", "tokens/s", "p50 ms", "p99 ms", "hit rate", "H2D MiB/round", mem,
               "acc drop", "agree", "KL", "result"]
    out = []
    for r in records:
        peak = r.get("torch_peak_bytes")
        memory = peak if peak is not None else r.get("cache_bytes")
        out.append([
            r.get("model", "?"), r.get("policy", "?"), r.get("budget", "?"),
            _num(r.get("tokens_per_s"), ".1f"), _num(r.get("p50_ms"), ".2f"), _num(r.get("p99_ms"), ".2f"),
            _num(r.get("hit_rate"), ".1%"), _num(r.get("h2d_bytes_per_round"), ".1f", MIB),
            _num(memory, ".1f", MIB), _num(r.get("accuracy_drop"), ".1%"), _num(r.get("token_agreement"), ".1%"),
            _num(r.get("kl_divergence"), ".2g"),
            "pass" if r.get("passed") else "xfail" if r.get("expected_failure") else "FAIL",
        ])
    if any(kernels_name(r.get("kernels")) != "exact" for r in records):  # which path served each case
        headers.insert(3, "kernels")
        for row, r in zip(out, records):
            row.insert(3, kernels_name(r.get("kernels")) + (", device fetch" if r.get("fetch") == "device" else ""))
    if any(r.get("worker") for r in records):  # a run spread over xdist workers: where each case ran
        headers.append("worker")
        for row, r in zip(out, records):
            row.append(f"{r.get('worker', '?')} {r.get('device', '')}".strip())
    if any(r.get("eager_agreement") is not None for r in records):  # the resident model off the exact loop
        headers += ["agree w/ exact loop", "KL w/ exact loop"]
        for row, r in zip(out, records):
            row += [_num(r.get("eager_agreement"), ".1%"), _num(r.get("eager_kl"), ".2g")]
    if any((r.get("miss_rule") or "copy") != "copy" for r in records):  # a host-assisted policy ran
        headers += ["misses/round copied", "host"]
        for row, r in zip(out, records):
            row += [_num(r.get("copied_misses_per_round"), ".1f"), _num(r.get("host_misses_per_round"), ".1f")]
    if any(r.get("precision", "full") != "full" for r in records):  # a low-precision policy ran
        headers += ["MiB/expert", "misses/round by precision"]
        for row, r in zip(out, records):
            row += precision_cells(r)
    if any(r.get("experts_per_batch_scheduled") is not None for r in records):  # a token-scheduling policy ran
        headers += ["experts/batch first-come", "scheduled", "agree first-come"]
        for row, r in zip(out, records):
            row += [_num(r.get("experts_per_batch_first_come"), ".1f"), _num(r.get("experts_per_batch_scheduled"),
                                                                              ".1f"),
                    _num(r.get("first_come_token_agreement"), ".1%")]
    if any((r.get("workload") or {}).get("kind") == "throughput" for r in records):  # many requests at once
        headers += ["TTFT p50 ms", "experts/step", "KiB/token", "vs first-come"]
        for row, r in zip(out, records):
            row += throughput_cells(r)
    if any("comparison" in r for r in records):
        headers += COMPARISON_HEADERS
        for row, r in zip(out, records):
            row += comparison_cells_for(r)
    return headers, out


def throughput_cells(record: dict) -> list[str]:
    """A throughput case (moebench.serving_case): time to first token, distinct experts per decode step, bytes
    copied per generated token, and for a token-scheduling policy what its scheduling changed against the same
    workload served first-come ("bytes/token -31%, experts/step 12.9 -> 9.1")."""
    ttft = record.get("ttft_p50_s")
    cells = [_num(None if ttft is None else ttft * 1e3, ".1f"), _num(record.get("experts_per_decode_step"), ".1f"),
             _num(record.get("h2d_bytes_per_token"), ".1f", 1024)]
    first = record.get("first_come")
    ours = record.get("h2d_bytes_per_token")
    if not first or not first.get("h2d_bytes_per_token") or ours is None:
        return cells + ["-"]
    change = ours / first["h2d_bytes_per_token"] - 1
    return cells + [f"bytes/token {change:+.0%}, experts/step {first.get('experts_per_decode_step', math.nan):.1f} "
                    f"-> {record.get('experts_per_decode_step', math.nan):.1f}"]


def precision_cells(record: dict) -> list[str]:
    """Bytes of one expert's copy in each precision ("full 336 / int4 97.1") and the misses each precision served."""
    sizes = record.get("expert_bytes_by_precision") or {}
    misses = record.get("misses_by_precision_per_round") or {}
    return [" / ".join(f"{p} {b / MIB:.3g}" for p, b in sizes.items()) or "-",
            " / ".join(f"{p} {n:.1f}" for p, n in misses.items()) or "-"]


COMPARISON_HEADERS = ["median tok/s", "baseline tok/s", "baseline at this speed", "delta", "rounds b/r", "verdict"]


def comparison_cells(comparison: dict | None, record: dict | None = None) -> list[str]:
    """The comparison with the baseline, so that a row reads right alone: this run's median tokens/s over its rounds,
    the baseline's as stored, the baseline's at this run's machine speed (scaled by the machine-speed probe,
    `moebench.probe`, when both sides have it: what the verdict compares), the change of the median against that
    one, the rounds on each side (with how many would be needed when too few to flag anything) and the verdict
    ('REGRESSED' shouts; an injected delay shows; 'not comparable' names what differs)."""
    if not comparison:
        return ["-"] * len(COMPARISON_HEADERS)
    throughput = (comparison.get("metrics") or {}).get("throughput") or {}
    current = throughput.get("current", (record or {}).get("tokens_per_s"))
    ratio = comparison.get("ratio")
    at_speed = "-"
    if current is not None and ratio:
        at_speed = f"{current / ratio:.1f}" + ("" if throughput.get("normalized") else " (no probe)")
    return [_num(current, ".1f"), _num(comparison.get("baseline_tokens_per_s"), ".1f"), at_speed,
            "-" if ratio is None else f"{ratio - 1:+.1%}", rounds_cell(comparison), verdict_cell(comparison)]


def rounds_cell(comparison: dict) -> str:
    n = comparison.get("rounds")
    if not n:
        return "-"
    if comparison.get("level") == "runs":
        return f"{n[0]} runs/{n[1]}"
    if not comparison.get("too_few_rounds"):
        return f"{n[0]}/{n[1]}"
    need = comparison.get("rounds_needed")
    return f"{n[0]}/{n[1]} too few: " + (f"need {need} this run" if need else "remake the baseline with more")


def versus_cell(versus: dict) -> str:
    """A new policy against the best stored policy of its case (moebench.versus): "better vs next-use: 1.12x
    [1.05, 1.19], hit 61% / 55%"."""
    lo, hi = versus.get("ci") or [math.nan, math.nan]
    interval = "" if lo != lo else f" [{lo:.2f}, {hi:.2f}]"
    hits = versus.get("hit_rate"), versus.get("rival_hit_rate")
    hit = "" if None in hits else f", hit {hits[0]:.0%} / {hits[1]:.0%}"
    return f"{versus.get('verdict')} vs {versus.get('rival')}: {versus.get('ratio', math.nan):.2f}x{interval}{hit}"


def verdict_cell(comparison: dict) -> str:
    verdict = comparison.get("status", "?")
    verdict = verdict.upper() if verdict == "regressed" else verdict
    if comparison.get("fields"):
        verdict += f" ({', '.join(comparison['fields'])})"
    if comparison.get("injected"):
        verdict += f" (injected {comparison['injected']})"
    return verdict


def comparison_cells_for(record: dict) -> list[str]:
    """The comparison cells of a row; a new policy's verdict names the best stored policy it was set against."""
    cells = comparison_cells(record.get("comparison"), record)
    if record.get("versus"):
        cells[-1] = f"new; {versus_cell(record['versus'])}"
    return cells


def render(records: list[dict], tablefmt: str = "simple") -> str:
    headers, body = rows(records)
    return tabulate(body, headers=headers, tablefmt=tablefmt, disable_numparse=True,
                    colalign=("left", "left", "left") + ("right",) * (len(headers) - 3))
