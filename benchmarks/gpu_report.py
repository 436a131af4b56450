"""The GPU check's report, rendered from its rows alone (torch-free; ``benchmarks/gpu_run.py`` calls it after
every step).

    python benchmarks/gpu_report.py rows.jsonl > report.md

Verdicts are device-aware. Each SPEC §6 goal is judged twice: against the H200 goal as written, and
against the goal scaled to the device that ran it. Time goals of bandwidth-bound work (G1) scale by the
H200's 4.8 TB/s over the device's peak bandwidth (by name, e.g. 3.35 TB/s for an H100 SXM, as SPEC §6
says; for an unknown device its probed copy bandwidth over 0.9); time goals of the latency-bound lattice
(G2) scale by the H200's SMs x clock over the device's; ratio and memory goals (speed-up, G3's cliff,
G4 against Liger, memory) do not scale. Raw times are always shown, with the cost models' predictions
beside them (``predicted_ms``) and their ratio, which is what recalibrates the model. Dry-run rows (tiny
shapes on a CPU) are shown and never judged.
"""

from __future__ import annotations

import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import read_rows, row_key  # noqa: E402

NOMINAL_BANDWIDTH_TBS = {"H200": 4.8, "H100 NVL": 3.9, "H100 PCIe": 2.0, "H100": 3.35, "H20": 4.0, "GH200": 4.0}
"""Peak memory bandwidth by device name (the first key the name contains, in this order), TB/s."""
H200 = dict(name="H200 (model)", sms=132, clock_ghz=1.98, bandwidth_tbs=4.8)
COPY_EFFICIENCY = 0.9  # probed device-to-device copy bandwidth / peak, assumed for a device not named above

# SPEC §6, as judged here: (goal id, what, H200 bound, how it scales)
GOALS = {
    "G1": "preserve, B=8, T=2048, U=1792, V=126,464, bf16, fwd+bwd: <= 2.5 ms, >= 15x torch, extra memory "
          "<= 1.05x the logits",
    "G2": "standard and preserve, B=8, T=2048, U=1024, the lattice alone: <= 0.5 ms (<= 1 ms as the first step)",
    "G3": "preserve, B=2, T=8192, U=7680: within 1.2x of 4x the T=2048 time",
    "G4": "fused LM head, N=16,384, D=4,096, V=126,464: <= 1.0x Liger's fused linear cross-entropy, extra memory "
          "<= 2 GB",
}
OURS = ("triton", "cuda")


def nominal_bandwidth(name):
    return next((bw for key, bw in NOMINAL_BANDWIDTH_TBS.items() if name and key in name), None)


def scales(probe):
    """(bandwidth scale, compute scale, how each was found) of the probed device against an H200."""
    name = probe.get("gpu")
    peak = nominal_bandwidth(name)
    how = []
    if peak:
        how.append(f"bandwidth {H200['bandwidth_tbs']} / {peak} TB/s (nominal for {name})")
    elif probe.get("copy_bandwidth_tbs"):
        peak = probe["copy_bandwidth_tbs"] / COPY_EFFICIENCY
        how.append(f"bandwidth {H200['bandwidth_tbs']} / ({probe['copy_bandwidth_tbs']} TB/s probed / "
                   f"{COPY_EFFICIENCY})")
    bw = H200["bandwidth_tbs"] / peak if peak else None
    sms, clock = probe.get("sms"), (probe.get("sm_clock_max_mhz") or 0) / 1e3
    compute = None
    if sms:
        clock = clock or H200["clock_ghz"]
        compute = H200["sms"] * H200["clock_ghz"] / (sms * clock)
        how.append(f"lattice {H200['sms']} SMs x {H200['clock_ghz']} GHz / ({sms} x {clock:.2f})")
    return bw, compute, "; ".join(how)


def _ms(value, digits=3):
    return "" if value is None else f"{value:.{digits}f}"


def _verdict(ok):
    return {True: "met", False: "**NOT met**", None: ""}[ok]


def _latest(rows):
    """The last row of each key (a resumed file may hold a row twice: the later one wins)."""
    out = collections.OrderedDict()
    for row in rows:
        out[row_key(row)] = row
    return list(out.values())


def select(rows, run_id=None):
    """(probe, bench rows, test rows, step rows) of the run's commit, tree and device; and how many other rows
    the file holds."""
    probes = [r for r in rows if r.get("kind") == "probe"]
    probe = next((r for r in reversed(probes) if r.get("run_id") == run_id), probes[-1] if probes else {})
    steps = [r for r in rows if r.get("kind") == "step" and (run_id is None or r.get("run_id") == run_id)]
    bench = [r for r in rows if r.get("kind") == "bench"]
    tests = [r for r in rows if r.get("kind") == "test"]
    mine = [r for r in bench if r.get("run_id") == run_id] if run_id else []
    ref = mine[-1] if mine else (bench[-1] if bench else None)
    if ref is not None:
        def same(r):
            return (r.get("commit"), r.get("tree"), _gpu(r)) == (ref.get("commit"), ref.get("tree"), _gpu(ref))
        other = sum(1 for r in bench if not same(r))
        bench = [r for r in bench if same(r)]
        tests = [r for r in tests if (r.get("commit"), r.get("tree")) == (ref.get("commit"), ref.get("tree"))]
    else:
        other = 0
    return probe, _latest(bench), _latest_tests(tests), steps, other


def _latest_tests(tests):
    out = collections.OrderedDict()
    for row in tests:
        out[row["nodeid"]] = row
    return list(out.values())


def _gpu(row):
    return row.get("gpu", (row.get("machine") or {}).get("gpu"))


def _find(bench, workload, provider, **match):
    for row in reversed(bench):
        if row.get("workload") == workload and row.get("provider") == provider and "median_ms" in row and all(
                row.get(k) == v for k, v in match.items()):
            return row
    return None


def goal_rows(bench, probe):
    """One line per goal, backend and criterion: measured, predicted, the H200 verdict and the scaled one."""
    bw, compute, _ = scales(probe)
    lines = []

    def add(goal, backend, what, measured, bound, scale, predicted=None, dry=False, note="", at_least=False):
        def holds(limit):
            if measured is None or dry or limit is None:
                return None
            return measured >= limit if at_least else measured <= limit
        scaled = None if scale is None else bound * scale
        lines.append(dict(goal=goal, backend=backend, what=what, measured=measured, predicted=predicted, bound=bound,
                          ok=holds(bound), scaled=scaled, ok_scaled=holds(scaled), dry=dry, note=note,
                          op=">=" if at_least else "<="))

    for backend in OURS:
        row = _find(bench, "G1", backend)
        if row is None:
            add("G1", backend, "time (ms)", None, 2.5, bw)
            continue
        dry = bool(row.get("dry_run"))
        add("G1", backend, "time (ms)", row["median_ms"], 2.5, bw, row.get("predicted_ms"), dry)
        add("G1", backend, "speed-up over torch", row.get("speedup_vs_torch"), 15, None, dry=dry, at_least=True)
        if row.get("peak_extra_mib") is not None and row.get("logits_mib"):
            ratio = row["peak_extra_mib"] / row["logits_mib"]
            add("G1", backend, "extra memory / logits", ratio, 1.05, None, dry=dry)
    for workload in ("G2-standard", "G2-preserve"):
        for backend in OURS:
            row = _find(bench, workload, backend)
            dry = bool(row and row.get("dry_run"))
            add(workload, backend, "lattice (ms), <= 1 ms first step", None if row is None else row["median_ms"],
                0.5, compute, None if row is None else row.get("predicted_ms"), dry,
                note="" if row is None or dry else ("first step met" if row["median_ms"] <= 1.0 * (compute or 1) else
                                                    "first step NOT met"))
    for backend in OURS:
        long, short = _find(bench, "G3-8192", backend), _find(bench, "G3-2048", backend)
        ratio = long["median_ms"] / (4 * short["median_ms"]) if long and short else None
        add("G3", backend, "T=8192 / (4 x T=2048)", ratio, 1.2, None, dry=bool(long and long.get("dry_run")),
            note="" if ratio is None else f"{long['median_ms']:.2f} / 4 x {short['median_ms']:.2f} ms")
    ours = next((r for r in reversed(bench) if r.get("workload") == "G4" and r.get("provider") == "ours"
                 and r.get("default_chunk") and "median_ms" in r), None)
    if ours is None:
        add("G4", "ours", "time / Liger FLCE", None, 1.0, None)
    else:
        dry = bool(ours.get("dry_run"))
        liger = _find(bench, "G4", "liger")
        fused = [r for r in bench if r.get("workload") == "G4" and r.get("provider") in ("liger", "cce", "torch_ce")
                 and "median_ms" in r]
        if liger is not None:
            add("G4", "ours", "time / Liger FLCE", ours["median_ms"] / liger["median_ms"], 1.0, None, dry=dry,
                note=f"{ours['median_ms']:.1f} / {liger['median_ms']:.1f} ms")
        elif fused:
            best = min(fused, key=lambda r: r["median_ms"])
            add("G4", "ours", f"time / {best['provider']} (Liger absent)", ours["median_ms"] / best["median_ms"], 1.0,
                None, dry=dry, note="judged against the fastest fused linear-CE present")
        else:
            add("G4", "ours", "time / Liger FLCE", None, 1.0, None, note="no fused linear-CE row")
        if ours.get("peak_extra_mib") is not None:
            add("G4", "ours", "extra memory (GB)", ours["peak_extra_mib"] * 2**20 / 1e9, 2.0, None, dry=dry)
    return lines


def _goal_table(lines):
    out = ["| goal | backend | criterion | measured | predicted | H200 goal | verdict | goal on this device | "
           "verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for g in lines:
        measured = "no row" if g["measured"] is None else f"{g['measured']:.3f}" + (f" ({g['note']})" if g["note"]
                                                                                   else "")
        scaled = "" if g["scaled"] is None else f"{g['op']} {g['scaled']:.3g}"
        if g["dry"]:
            verdict = verdict_scaled = "dry run: not judged"
        else:
            verdict, verdict_scaled = _verdict(g["ok"]), _verdict(g["ok_scaled"])
        out.append(f"| {g['goal']} | {g['backend']} | {g['what']} | {measured} | {_ms(g['predicted'])} | "
                   f"{g['op']} {g['bound']:g} | {verdict} | {scaled} | {verdict_scaled} |")
    return out


def _failed(r, detail, shape, blanks):
    """The table line of a provider that raised: its error where the times would be."""
    return (f"| {r['workload']} | {r['provider']} | {detail} | {shape} | {r.get('dtype', '')} | failed: "
            f"{str(r.get('error', ''))[:100]} |" + " |" * blanks)


def _slack_table(rows):
    out = ["| workload | provider | timed | B, T, U, V | dtype | median ms | p20-p80 | predicted ms | measured / "
           "predicted | peak extra MiB | vs torch |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shape = f"{r['B']}, {r['T']}, {r['U']}, {r['V']}"
        if "median_ms" not in r:
            out.append(_failed(r, r.get("timed", ""), shape, blanks=5))
            continue
        pred = r.get("predicted_ms")
        ratio = f"{r['median_ms'] / pred:.2f}" if pred and not r.get("dry_run") else ""  # a CPU vs an H200: no ratio
        out.append(f"| {r['workload']} | {r['provider']} | {r['timed']} | {shape} | {r['dtype']} | "
                   f"{r['median_ms']:.3f} | {r['p20_ms']:.3f}-{r['p80_ms']:.3f} | {_ms(pred)} | {ratio} | "
                   f"{'' if r.get('peak_extra_mib') is None else round(r['peak_extra_mib'])} | "
                   f"{'' if r.get('speedup_vs_torch') is None else str(r['speedup_vs_torch']) + 'x'} |")
    return out


def _linear_table(rows):
    out = ["| workload | provider | chunk | N, D, V | dtype | median ms | p20-p80 | peak extra MiB | vs best fused CE | "
           "vs materialised |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        chunk = "" if r.get("chunk_size") is None else f"{r['chunk_size']}" + (" (default)" if r.get("default_chunk")
                                                                               else "")
        shape = f"{r['N']}, {r['D']}, {r['V']}"
        if "median_ms" not in r:
            out.append(_failed(r, chunk, shape, blanks=4))
            continue
        best = "" if r.get("vs_best_fused_ce") is None else f"{r['vs_best_fused_ce']:.2f}x ({r.get('best_fused_ce')})"
        out.append(f"| {r['workload']} | {r['provider']} | {chunk} | {shape} | {r['dtype']} | {r['median_ms']:.2f} | "
                   f"{r['p20_ms']:.2f}-{r['p80_ms']:.2f} | "
                   f"{'' if r.get('peak_extra_mib') is None else round(r['peak_extra_mib'], 1)} | {best} | "
                   f"{'' if r.get('vs_materialised') is None else str(r['vs_materialised']) + 'x'} |")
    return out


def render(rows, *, run_id=None, budget=None, elapsed=None) -> str:
    probe, bench, tests, steps, other = select(rows, run_id)
    slack = [r for r in bench if r.get("bench") == "slack_ctc" and not r["workload"].startswith("sweep-")]
    sweep = [r for r in bench if r.get("bench") == "slack_ctc" and r["workload"].startswith("sweep-")]
    linear = [r for r in bench if r.get("bench") == "linear_slack_ctc"]
    ref = bench[-1] if bench else {}
    machine = ref.get("machine", {})
    bw, compute, how = scales(probe)
    dry = probe.get("dry_run") or any(r.get("dry_run") for r in bench)
    lines = ["# GPU check" + (" (dry run: tiny shapes on a CPU, nothing judged)" if dry else ""), ""]
    head = []
    if ref:
        head.append(f"commit `{ref.get('commit')}`" + (" (dirty tree)" if ref.get("dirty") else "")
                    + (f", tree `{ref['tree']}`" if ref.get("tree") else "")
                    + (" **(the tree changed after the prep step)**" if ref.get("tree_matches") is False else ""))
    if probe.get("gpu"):
        head.append(f"device {probe['gpu']}: {probe.get('sms')} SMs, SM clock {probe.get('sm_clock_mhz')} MHz "
                    f"(max {probe.get('sm_clock_max_mhz')}), {probe.get('gpu_memory_gib')} GiB, copy bandwidth "
                    f"{probe.get('copy_bandwidth_tbs')} TB/s probed (nominal "
                    f"{nominal_bandwidth(probe['gpu']) or 'unknown'})")
    elif machine:
        head.append(f"device: {machine.get('gpu') or 'no GPU'} ({machine.get('host_cpu')}, "
                    f"{machine.get('cpu_cores')} cores)")
    versions = ref.get("versions") or {}
    if versions or probe.get("versions"):
        v = {**(probe.get("versions") or {}), **versions}
        head.append("versions: " + ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "triton", "mdlm_ctc",
                                                                      "liger-kernel", "cut-cross-entropy")
                                             if v.get(k)) + (f", backends {v['backends']}" if v.get("backends") else ""))
    target = next((r["predicted_for"] for r in bench if r.get("predicted_for")), None)
    if target:
        head.append(f"predicted times (the cost models, [est.]) are for: {target}")
    if budget is not None and elapsed is not None:
        head.append(f"{elapsed:.0f} s of a {budget:.0f} s budget")
    if other:
        head.append(f"{other} rows of other commits or devices in the file are not shown")
    lines += [f"* {h}" for h in head] + [""]
    if how:
        lines += [f"Scaled goals: {how} (bandwidth x{bw:.3g}, lattice x{compute:.3g})." if bw and compute else
                  f"Scaled goals: {how}.", ""]

    lines += ["## Goals (SPEC §6)", ""] + [f"* {k}: {v}" for k, v in GOALS.items()] + [""]
    lines += _goal_table(goal_rows(bench, probe)) + [""]
    if slack:
        lines += ["## slack_ctc rows (G1-G3)", ""] + _slack_table(slack) + [""]
    if linear:
        lines += ["## linear_slack_ctc rows (G4)", ""] + _linear_table(linear) + [""]
    if sweep:
        lines += ["## Triton lattice chunk-length sweep", "",
                  "The measured time of each chunk length beside the calibrated model's prediction: the data that "
                  "refits the model's constants (`mdlm_ctc/triton_kernels/slack_ctc.py`).", ""]
        lines += _slack_table(sorted(sweep, key=lambda r: (r["workload"].rsplit("-L", 1)[0], r.get("chunk_len", 0))))
        lines += [""]
    if tests:
        counts = collections.Counter(r["outcome"] for r in tests)
        lines += ["## GPU tests", "", ", ".join(f"{n} {k}" for k, n in sorted(counts.items())), ""]
        for r in tests:
            if r["outcome"] in ("failed", "error"):
                first = (r.get("message") or "").strip().splitlines()
                lines.append(f"* `{r['nodeid']}`: {r['outcome']}" + (f": {first[-1][:200]}" if first else ""))
        lines += [""]
    if steps:
        lines += ["## Steps of this call", "", "| step | status | seconds | slice | rows added | note |",
                  "|---|---|---|---|---|---|"]
        for s in steps:
            lines.append(f"| {s['step']} | {s['status']} | {s['seconds']:.1f} | {s['slice_s']:.0f} | "
                         f"{s.get('rows_added', '')} | {s.get('reason') or ('rc ' + str(s['rc']) if s.get('rc') else '')} |")
        lines += [""]
    missing = [k for k, v in (probe.get("packages") or {}).items() if not v]
    if missing:
        lines += [f"Not importable here: {', '.join(missing)} (what runs changed accordingly).", ""]
    return "\n".join(lines)


def summary(text: str) -> str:
    """The report up to the per-row tables: header and goals (what a console shows)."""
    cut = text.find("\n## slack_ctc rows")
    return text if cut < 0 else text[:cut]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__)
        return 2
    print(render(read_rows(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
