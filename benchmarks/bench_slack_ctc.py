"""Microbenchmark of slack_ctc_loss: providers side by side, SPEC §6 goals checked and recorded.

    python benchmarks/bench_slack_ctc.py                  # CPU rows C1, C2 (GPU rows G1-G3 on a GPU)
    python benchmarks/bench_slack_ctc.py --suite gpu --record
    python benchmarks/bench_slack_ctc.py --suite sweep     # the Triton lattice's chunk length (GPU)
    python benchmarks/bench_slack_ctc.py --smoke           # seconds; what CI runs

Providers (each a full forward + backward from logits, unless the workload says "lattice"):
    torch      log_softmax in fp32 + torch.nn.functional.ctc_loss (standard CTC: the only collapse it has,
               so preserve workloads compare against standard CTC on the same shape, as SPEC §6 defines)
    reference  mdlm_ctc's pure-PyTorch backend (the fallback), where the shape allows it
    cpu / triton / cuda   mdlm_ctc backends present on this machine, on the gradient path the op layer's cost
               model picks (mdlm_ctc/_ops.py; the row's ``gradient`` column says which)
    <backend>-two-pass / <backend>-three-pass   the same backend with the path forced
               (MDLM_CTC_GRADIENT_IN_FORWARD=1 / 0): the gradient's softmax written in the vocabulary pass,
               or the gradient pass reading the logits again; both side by side with the chosen one
    cross_entropy  F.cross_entropy forward + backward on the same logits: the memory-bound yardstick (GPU)

Each provider runs once per repeat, round-robin, after warm-up; the table shows the median and the
20th/80th percentiles, the cost models' predicted time (Triton and CUDA rows; see below), the peak extra
memory, and the speed-up over torch measured in the same run.
``--record`` appends every row, stamped with machine, commit and versions, to
benchmarks/results/slack_ctc.jsonl and writes a Markdown summary next to it.

For the GPU check (benchmarks/gpu_run.py): ``--rows-out FILE`` appends each workload's rows, stamped, the
moment they are measured (flushed and fsynced: a process killed later keeps them); ``--resume FILE`` skips
every row already in FILE for this commit, tree and GPU (a workload with some rows left runs those, beside
its torch yardstick when a ratio needs one); ``--tiny`` runs the named G workloads at tiny shapes on the
CPU (the check's dry run). Rows of the Triton and CUDA providers carry ``predicted_ms``: the lattice cost
model (calibrated on the kernels' sm_90 instruction counts) plus the vocabulary passes at the device's
bandwidth (on a CPU: an H200's).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import mdlm_ctc  # noqa: E402
from mdlm_ctc import _ops, backends, reference  # noqa: E402
from mdlm_ctc.triton_kernels import resources  # noqa: E402  (imports no Triton: shapes only)

BF16, FP32 = torch.bfloat16, torch.float32

# name: shape, collapse, what is timed, goal (SPEC §6's current goals; G1's bandwidth-bound ones are H200 figures)
WORKLOADS = {
    "C1": dict(device="cpu", B=4, T=2048, U=1024, V=1000, dtype=FP32, collapse="standard",
               goal="speed-up over log_softmax + torch ctc_loss >= 20x", min_speedup=20),
    "C2": dict(device="cpu", B=4, T=4096, U=3968, V=1000, dtype=FP32, collapse="preserve",
               goal="speed-up over torch ctc_loss (standard, same shape) >= 100x", min_speedup=100),
    "G1": dict(device="cuda", B=8, T=2048, U=1792, V=126464, dtype=BF16, collapse="preserve",
               goal="<= 2.5 ms, >= 15x torch, extra memory <= 1.05x logits", max_ms=2.5, min_speedup=15,
               max_memory_ratio=1.05, yardstick=True),
    "G2-standard": dict(device="cuda", B=8, T=2048, U=1024, V=1024, dtype=BF16, collapse="standard",
                        lattice_only=True, goal="lattice alone <= 0.5 ms", max_ms=0.5),
    "G2-preserve": dict(device="cuda", B=8, T=2048, U=1024, V=1024, dtype=BF16, collapse="preserve",
                        lattice_only=True, goal="lattice alone <= 0.5 ms", max_ms=0.5),
    "G3-2048": dict(device="cuda", B=2, T=2048, U=1920, V=126464, dtype=BF16, collapse="preserve",
                    goal="the T=2048 point of G3"),
    "G3-8192": dict(device="cuda", B=2, T=8192, U=7680, V=126464, dtype=BF16, collapse="preserve",
                    goal="<= 1.2 x 4 x (G3-2048)", cliff_of="G3-2048"),
    # tiny shapes that exercise every provider in seconds
    "smoke-standard": dict(device="any", B=2, T=64, U=24, V=50, dtype=FP32, collapse="standard", goal="runs"),
    "smoke-preserve": dict(device="any", B=2, T=64, U=48, V=50, dtype=FP32, collapse="preserve", goal="runs"),
}
# The Triton lattice's time-chunk length, swept at the G1/G2/G3 lattice shapes (0 = one chunk): the
# measurements that refit its cost model. Shapes and lengths come from resources.sweep_workloads, whose
# configs the static report and CI compile too (no spill).
for _w in resources.sweep_workloads():
    for _chunk in resources.SWEEP_CHUNKS:
        WORKLOADS[f"sweep-{_w.name.split()[-1]}-L{_chunk}"] = dict(
            device="cuda", B=_w.B, T=_w.T, U=_w.U, V=_w.V, dtype=BF16, lattice_only=True, chunk_len=_chunk,
            only=("triton",), collapse="preserve" if _w.mode == reference.PRESERVE else "standard",
            goal="Triton chunk-length sweep")
# --tiny (the GPU check's dry run): the G workloads' structure (collapse, U/T, what is timed, dtype, the
# 4x of G3) at shapes the Triton interpreter runs in a second or two per call on a CPU
TINY_SHAPES = {"G1": dict(B=1, T=8, U=7, V=16), "G2-standard": dict(B=1, T=8, U=4, V=16),
               "G2-preserve": dict(B=1, T=8, U=4, V=16), "G3-2048": dict(B=1, T=4, U=3, V=16),
               "G3-8192": dict(B=1, T=16, U=12, V=16)}
for _name in [n for n in WORKLOADS if n.startswith("sweep-")]:
    TINY_SHAPES[_name] = dict(B=1, T=16, U=14 if WORKLOADS[_name]["collapse"] == "preserve" else 8, V=16)
SUITES = {"cpu": ["C1", "C2"], "gpu": ["G1", "G2-standard", "G2-preserve", "G3-2048", "G3-8192"],
          "sweep": [name for name in WORKLOADS if name.startswith("sweep-")],
          "smoke": ["smoke-standard", "smoke-preserve"]}
SLACK = 0


def make_inputs(w, device):
    g = torch.Generator().manual_seed(0)
    B, T, U, V = w["B"], w["T"], w["U"], w["V"]
    logits = torch.randn(B, T, V, generator=g).to(device=device, dtype=w["dtype"])
    targets = torch.randint(1, V, (B, U), generator=g).to(device)
    return logits, targets


PATHS = {"two-pass": "1", "three-pass": "0"}  # provider suffix -> MDLM_CTC_GRADIENT_IN_FORWARD


def split_provider(provider):
    """``(backend, forced path setting or None)`` of a provider name such as ``cpu-three-pass``."""
    for suffix, setting in PATHS.items():
        if provider.endswith("-" + suffix):
            return provider[: -len(suffix) - 1], setting
    return provider, None


def gradient_path(provider, w, device):
    """Which gradient path a provider's call takes: two-pass / three-pass (None for torch and the yardstick)."""
    backend, setting = split_provider(provider)
    if backend in ("torch", "cross_entropy") or w.get("lattice_only"):
        return None
    if setting is None:
        width = int(reference.column_band_width(torch.tensor(w["T"]), torch.tensor(w["U"])))
        itemsize = torch.empty((), dtype=w["dtype"]).element_size()
        setting = "1" if _ops.gradient_in_forward(backend, device, w["V"], width, itemsize) else "0"
    return "two-pass" if setting == "1" else "three-pass"


def providers_for(w, device, names):
    present = mdlm_ctc.available_backends(device)
    out = []
    for name in names:
        backend, setting = split_provider(name)
        if setting is not None:
            if backend in present and backend != "reference" and not w.get("lattice_only"):
                out.append(name)
        elif name == "torch":
            out.append(name)
        elif name == "cross_entropy":
            if w.get("yardstick"):
                out.append(name)
        elif name == "reference":
            if w["T"] * w["U"] <= 2048 * 1024 and not w.get("lattice_only") and device.type == "cpu":
                out.append(name)
        elif name in present:
            out.append(name)
    return out


def runnable(w, device, names):
    """The providers of ``names`` that run ``w`` on ``device``."""
    providers = providers_for(w, device, names)
    if w.get("lattice_only"):
        providers = [p for p in providers if p in ("cpu", "triton", "cuda", "reference")]
    if "only" in w:
        providers = [p for p in providers if p in w["only"]]
    return providers


def full_step(provider, w, logits, targets):
    """One forward + backward from the logits; returns a closure."""
    x = logits.detach().requires_grad_(True)
    B, T, V = x.shape
    if provider == "torch":
        il = torch.full((B,), T, device=x.device)
        tl = torch.full((B,), targets.shape[1], device=x.device)

        def step():
            loss = F.ctc_loss(x.float().log_softmax(-1).transpose(0, 1), targets, il, tl, blank=SLACK)
            torch.autograd.grad(loss, x)
    elif provider == "cross_entropy":
        canvas = torch.randint(0, V, (B * T,), device=x.device)

        def step():
            loss = F.cross_entropy(x.view(B * T, V), canvas)
            torch.autograd.grad(loss, x)
    else:
        backend, setting = split_provider(provider)

        def step():
            previous = os.environ.get("MDLM_CTC_GRADIENT_IN_FORWARD")
            if setting is not None:
                os.environ["MDLM_CTC_GRADIENT_IN_FORWARD"] = setting
            try:
                loss = mdlm_ctc.slack_ctc_loss(x, targets, slack_id=SLACK, collapse=w["collapse"], backend=backend)
                torch.autograd.grad(loss, x)
            finally:
                if setting is not None:
                    if previous is None:
                        os.environ.pop("MDLM_CTC_GRADIENT_IN_FORWARD")
                    else:
                        os.environ["MDLM_CTC_GRADIENT_IN_FORWARD"] = previous
    return step


def lattice_step(provider, w, logits, targets):
    """The lattice stage alone (alpha, beta and posteriors) on a band table made once."""
    B, T, _ = logits.shape
    U = targets.shape[1]
    mode = reference.COLLAPSE_MODES[w["collapse"]]
    il = torch.full((B,), T, device=logits.device)
    tl = torch.full((B,), U, device=logits.device)
    width = int(reference.column_band_width(torch.tensor(T), torch.tensor(U)))
    emissions, lattice_band, _ = backends.stages(provider)
    _, table, special = emissions(logits, targets, il, tl, None, SLACK, -1, width, True)
    work = [table.clone(), special.clone()]
    extra = {"chunk_len": w["chunk_len"]} if "chunk_len" in w else {}

    def step():  # the copies restore the emissions the previous step overwrote with posteriors
        work[0].copy_(table)
        work[1].copy_(special)
        lattice_band(work[0], work[1], targets, il, tl, mode, -1, True, **extra)
    return step


def run_workload(name, w, device, provider_names, repeats, warmup, measure_memory=True):
    logits, targets = make_inputs(w, device)
    providers = runnable(w, device, provider_names)
    steps, failed = {}, {}
    for p in providers:
        make = lattice_step if w.get("lattice_only") else full_step
        try:
            steps[p] = make(p, w, logits, targets)
            for _ in range(warmup):  # warm-up (compiles, autotunes)
                steps[p]()
        except Exception as error:  # one provider's failure must not cost the others' rows
            failed[p] = common.error_text(error)
            steps.pop(p, None)
            print(f"  {p}: FAILED {failed[p]}", file=sys.stderr, flush=True)
    peaks = {}
    for p, step in steps.items():  # the peak memory of one step
        if device.type == "cuda":
            with common.PeakMemory(device) as peak:
                step()
            peaks[p] = peak.mib
        elif not measure_memory:
            peaks[p] = None
        else:  # a fresh process, so that memory the allocator kept from earlier steps does not hide the peak
            peaks[p] = common.peak_rss_in_subprocess(
                [sys.executable, os.path.abspath(__file__), "--measure-memory", name, p])
    times = {p: [] for p in steps}
    for r in range(repeats):
        for p, step in steps.items():
            if p == "reference" and r >= 2:
                continue  # slow fallback: two repeats are enough to place it
            times[p].append(common.timed(step, device))
    logits_mib = logits.numel() * logits.element_size() / 2**20
    rows = [dict(identity(name, w, p), status="error", error=message, goal=w["goal"]) for p, message in failed.items()]
    torch_median = None
    for p in steps:
        q = common.quantiles(times[p])
        if p == "torch":
            torch_median = q["median_ms"]
        rows.append(dict(identity(name, w, p), gradient=gradient_path(p, w, device),
                         peak_extra_mib=None if peaks[p] is None else round(peaks[p], 1),
                         logits_mib=round(logits_mib, 1), goal=w["goal"], **{k: round(v, 4) if isinstance(v, float)
                                                                              else v for k, v in q.items()}))
    for row in rows:
        row["speedup_vs_torch"] = (round(torch_median / row["median_ms"], 2)
                                   if torch_median and row["provider"] != "torch" and "median_ms" in row else None)
    del logits, targets, steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def identity(name, w, provider):
    """The fields that name a row's measurement (``common.row_key`` adds commit, tree and GPU)."""
    out = dict(workload=name, provider=provider, B=w["B"], T=w["T"], U=w["U"], V=w["V"],
               dtype=str(w["dtype"]).replace("torch.", ""), collapse=w["collapse"],
               timed="lattice" if w.get("lattice_only") else "forward+backward")
    if "chunk_len" in w:
        out["chunk_len"] = w["chunk_len"]
    if w.get("dry_run"):
        out["dry_run"] = True
    return out


def predicted_ms(row, model):
    """The cost models' time for a Triton or CUDA row (None for the others): the lattice (alpha, beta and the
    posteriors; Triton at its chunk length) and, for a full step, the vocabulary passes at the device's
    bandwidth (three passes: the emissions pass reads the logits, the gradient pass reads them again and writes
    the gradient; two passes: the vocabulary pass reads them and writes the gradient's softmax part)."""
    backend, _ = split_provider(row["provider"])
    if backend not in ("triton", "cuda"):
        return None
    from mdlm_ctc import lattice_cost

    mode = reference.COLLAPSE_MODES[row["collapse"]]
    W = int(reference.column_band_width(torch.tensor(row["T"]), torch.tensor(row["U"])))
    lattice = lattice_cost.lattice_us(backend, row["B"], row["T"], W, mode, model,
                                      chunk_len=row.get("chunk_len"))
    if lattice is None:
        return None
    passes = 0.0
    if row["timed"] != "lattice":
        logits_bytes = row["B"] * row["T"] * row["V"] * torch.tensor([], dtype=getattr(torch, row["dtype"])).element_size()
        passes = (2 if row.get("gradient") == "two-pass" else 3) * logits_bytes / (model["bandwidth_tbs"] * 1e12) * 1e6
    return round((lattice + passes) / 1e3, 4)


def judge(rows):
    """Mark each mdlm_ctc row against its workload's goal."""
    by_workload = {}
    for row in rows:
        by_workload.setdefault(row["workload"], []).append(row)
    for row in rows:
        w = WORKLOADS[row["workload"]]
        if row["provider"] in ("torch", "cross_entropy", "reference") or "median_ms" not in row or row.get("dry_run"):
            row["goal_met"] = None
            continue
        checks = []
        if "min_speedup" in w and row["speedup_vs_torch"] is not None:
            checks.append(row["speedup_vs_torch"] >= w["min_speedup"])
        if "max_ms" in w:
            checks.append(row["median_ms"] <= w["max_ms"])
        if "max_memory_ratio" in w and row["peak_extra_mib"] is not None:
            checks.append(row["peak_extra_mib"] <= w["max_memory_ratio"] * row["logits_mib"])
        if "cliff_of" in w:
            base = [r for r in by_workload.get(w["cliff_of"], []) if r["provider"] == row["provider"]
                    and "median_ms" in r]
            if base:
                row["ratio_to_4x_base"] = round(row["median_ms"] / (4 * base[0]["median_ms"]), 3)
                checks.append(row["ratio_to_4x_base"] <= 1.2)
        row["goal_met"] = all(checks) if checks else None
    return rows


def table(rows):
    head = ("workload", "provider", "gradient", "timed", "median ms", "p20-p80 ms", "predicted ms", "peak extra MiB",
            "vs torch",
            "goal met")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "median_ms" not in r:
            lines.append(f"| {r['workload']} | {r['provider']} | {r.get('gradient') or ''} | {r['timed']} | "
                         f"failed: {r['error'][:80]} |" + " |" * 5)
            continue
        lines.append("| " + " | ".join([
            r["workload"], r["provider"], r.get("gradient") or "", r["timed"], f"{r['median_ms']:.2f}",
            f"{r['p20_ms']:.2f}-{r['p80_ms']:.2f}", "" if r.get("predicted_ms") is None else f"{r['predicted_ms']:.3f}",
            "n/a" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.0f}",
            "" if r["speedup_vs_torch"] is None else f"{r['speedup_vs_torch']:.1f}x",
            {True: "yes", False: "NO", None: ""}[r["goal_met"]]]) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), help="which workloads (default: gpu with a GPU, else cpu)")
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), help="explicit workloads")
    parser.add_argument("--providers", nargs="+",
                        default=["torch", "cross_entropy", "reference", "cpu", "cpu-two-pass", "cpu-three-pass",
                                 "triton", "triton-two-pass", "triton-three-pass", "cuda"],
                        help="providers to include where available")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per provider (default 10, smoke 3)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, a few seconds (CI)")
    parser.add_argument("--record", action="store_true", help="append rows to benchmarks/results/slack_ctc.jsonl")
    parser.add_argument("--json", action="store_true", help="print rows as JSON lines instead of a table")
    parser.add_argument("--no-memory", action="store_true", help="skip the (CPU: subprocess) peak-memory measurement")
    parser.add_argument("--rows-out", help="append each workload's rows, stamped, to this JSONL as they are measured")
    parser.add_argument("--resume", nargs="*", default=[], help="JSONL files of rows already measured: skipped")
    parser.add_argument("--tiny", action="store_true", help="the named G workloads at tiny shapes on the CPU (dry run)")
    parser.add_argument("--measure-memory", nargs=2, metavar=("WORKLOAD", "PROVIDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure_memory:  # child process of the CPU memory measurement
        name, provider = args.measure_memory
        w = WORKLOADS[name]
        logits, targets = make_inputs(w, torch.device("cpu"))
        step = (lattice_step if w.get("lattice_only") else full_step)(provider, w, logits, targets)
        common.report_peak_rss(step)
        return 0

    has_gpu = torch.cuda.is_available()
    suite = "smoke" if args.smoke else (args.suite or ("gpu" if has_gpu else "cpu"))
    names = args.workloads or SUITES[suite]
    repeats = args.repeats or (3 if suite == "smoke" or args.tiny else 10)
    sink = common.RowSink(args.rows_out, "slack_ctc") if args.rows_out else None
    done = common.measured_keys(args.resume)
    same = {**common.key_stamp(), "bench": "slack_ctc"}
    earlier = [r for r in common.read_rows(args.resume) if r.get("bench") == "slack_ctc" and "median_ms" in r
               and common.row_key(r)[-3:] == common.row_key(same)[-3:]]  # this commit, tree and GPU
    rows, failures = [], 0
    for name in names:
        w = WORKLOADS[name]
        if args.tiny:
            if name not in TINY_SHAPES:
                print(f"skipping {name}: no tiny shape", file=sys.stderr)
                continue
            w = {**w, **TINY_SHAPES[name], "device": "cpu", "dry_run": True}
        if w["device"] == "cuda" and not has_gpu:
            print(f"skipping {name}: needs a CUDA device", file=sys.stderr)
            continue
        device = torch.device("cuda" if (w["device"] == "cuda" or (w["device"] == "any" and has_gpu)) else "cpu")
        planned = runnable(w, device, args.providers)
        todo = [p for p in planned if common.row_key({**identity(name, w, p), **same}) not in done]
        if not todo:
            print(f"skipping {name}: every row already measured", file=sys.stderr)
            continue
        run = list(todo)
        if len(todo) < len(planned) and "min_speedup" in w and "torch" in planned and "torch" not in run:
            run.append("torch")  # the yardstick of the speed-up, measured again side by side
        print(f"running {name} on {device} ({', '.join(run)}) ...", file=sys.stderr, flush=True)
        try:
            measured = run_workload(name, w, device, run, repeats, args.warmup, not args.no_memory)
        except Exception as error:  # e.g. out of memory making the inputs: the next workload still runs
            message = common.error_text(error)
            print(f"  {name}: FAILED {message}", file=sys.stderr, flush=True)
            measured = [dict(identity(name, w, p), status="error", error=message, goal=w["goal"]) for p in todo]
        model = common.device_model(device)
        for row in measured:
            row["predicted_ms"] = predicted_ms(row, model) if "median_ms" in row else None
            row["predicted_for"] = model["name"]
        new = judge(earlier + rows + [r for r in measured if r["provider"] in todo])[len(earlier) + len(rows):]
        failures += common.deliver(rows, new, sink)
    if sink is not None:
        print(f"wrote {sink.count} rows to {args.rows_out}", file=sys.stderr)
    common.emit(rows, table(rows), name="slack_ctc", summary_name=f"slack_ctc_{suite}_latest",
                title=f"slack_ctc benchmark, suite `{suite}`", as_json=args.json, record_rows=args.record)
    failed = [r for r in rows if r["goal_met"] is False]
    if failures:
        return 2  # a provider raised (its row says why): a GPU check restarts its worker process after this
    return 1 if failed and suite != "smoke" and os.environ.get("MDLM_CTC_BENCH_STRICT") == "1" else 0


if __name__ == "__main__":
    sys.exit(main())
