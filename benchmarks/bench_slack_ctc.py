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
20th/80th percentiles, the peak extra memory, and the speed-up over torch measured in the same run.
``--record`` appends every row, stamped with machine, commit and versions, to
benchmarks/results/slack_ctc.jsonl and writes a Markdown summary next to it.
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

BF16, FP32 = torch.bfloat16, torch.float32

# name: shape, collapse, what is timed, goal (SPEC §6)
WORKLOADS = {
    "C1": dict(device="cpu", B=4, T=2048, U=1024, V=1000, dtype=FP32, collapse="standard",
               goal="speed-up over log_softmax + torch ctc_loss >= 10x", min_speedup=10),
    "C2": dict(device="cpu", B=4, T=4096, U=3968, V=1000, dtype=FP32, collapse="preserve",
               goal="speed-up over torch ctc_loss (standard, same shape) >= 50x", min_speedup=50),
    "G1": dict(device="cuda", B=8, T=2048, U=1792, V=126464, dtype=BF16, collapse="preserve",
               goal="<= 4 ms, >= 10x torch, extra memory <= 1.1x logits", max_ms=4.0, min_speedup=10,
               max_memory_ratio=1.1, yardstick=True),
    "G2-standard": dict(device="cuda", B=8, T=2048, U=1024, V=1024, dtype=BF16, collapse="standard",
                        lattice_only=True, goal="lattice alone <= 1 ms", max_ms=1.0),
    "G2-preserve": dict(device="cuda", B=8, T=2048, U=1024, V=1024, dtype=BF16, collapse="preserve",
                        lattice_only=True, goal="lattice alone <= 1 ms", max_ms=1.0),
    "G3-2048": dict(device="cuda", B=2, T=2048, U=1920, V=126464, dtype=BF16, collapse="preserve",
                    goal="the T=2048 point of G3"),
    "G3-8192": dict(device="cuda", B=2, T=8192, U=7680, V=126464, dtype=BF16, collapse="preserve",
                    goal="<= 1.2 x 4 x (G3-2048)", cliff_of="G3-2048"),
    # tiny shapes that exercise every provider in seconds
    "smoke-standard": dict(device="any", B=2, T=64, U=24, V=50, dtype=FP32, collapse="standard", goal="runs"),
    "smoke-preserve": dict(device="any", B=2, T=64, U=48, V=50, dtype=FP32, collapse="preserve", goal="runs"),
}
# The Triton lattice's time-chunk length, swept at the G1/G2/G3 lattice shapes (its cost model's
# constants are estimates until this sweep has run on the GPU; 0 = one chunk).
for _shape, _dims in {"G1": dict(B=8, T=2048, U=1792, collapse="preserve"),
                      "G2": dict(B=8, T=2048, U=1024, collapse="standard"),
                      "G3": dict(B=2, T=8192, U=7680, collapse="preserve")}.items():
    for _chunk in (0, 7, 15, 31, 63):
        WORKLOADS[f"sweep-{_shape}-L{_chunk}"] = dict(device="cuda", V=1024, dtype=BF16, lattice_only=True,
                                                      chunk_len=_chunk, only=("triton",),
                                                      goal="Triton chunk-length sweep", **_dims)
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
    providers = providers_for(w, device, provider_names)
    if w.get("lattice_only"):
        providers = [p for p in providers if p in ("cpu", "triton", "cuda", "reference")]
    if "only" in w:
        providers = [p for p in providers if p in w["only"]]
    steps = {}
    for p in providers:
        make = lattice_step if w.get("lattice_only") else full_step
        steps[p] = make(p, w, logits, targets)
    peaks = {}
    for p, step in steps.items():  # warm-up (compiles, autotunes), and the peak memory of one step
        for _ in range(warmup):
            step()
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
    rows = []
    torch_median = None
    for p in steps:
        q = common.quantiles(times[p])
        if p == "torch":
            torch_median = q["median_ms"]
        rows.append(dict(workload=name, provider=p, B=w["B"], T=w["T"], U=w["U"], V=w["V"],
                         dtype=str(w["dtype"]).replace("torch.", ""), collapse=w["collapse"],
                         timed="lattice" if w.get("lattice_only") else "forward+backward",
                         gradient=gradient_path(p, w, device),
                         peak_extra_mib=None if peaks[p] is None else round(peaks[p], 1),
                         logits_mib=round(logits_mib, 1), goal=w["goal"], **{k: round(v, 4) if isinstance(v, float)
                                                                              else v for k, v in q.items()}))
    for row in rows:
        row["speedup_vs_torch"] = (round(torch_median / row["median_ms"], 2)
                                   if torch_median and row["provider"] != "torch" else None)
    del logits, targets, steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def judge(rows):
    """Mark each mdlm_ctc row against its workload's goal."""
    by_workload = {}
    for row in rows:
        by_workload.setdefault(row["workload"], []).append(row)
    for row in rows:
        w = WORKLOADS[row["workload"]]
        if row["provider"] in ("torch", "cross_entropy", "reference"):
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
            base = [r for r in by_workload.get(w["cliff_of"], []) if r["provider"] == row["provider"]]
            if base:
                row["ratio_to_4x_base"] = round(row["median_ms"] / (4 * base[0]["median_ms"]), 3)
                checks.append(row["ratio_to_4x_base"] <= 1.2)
        row["goal_met"] = all(checks) if checks else None
    return rows


def table(rows):
    head = ("workload", "provider", "gradient", "timed", "median ms", "p20-p80 ms", "peak extra MiB", "vs torch",
            "goal met")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["workload"], r["provider"], r.get("gradient") or "", r["timed"], f"{r['median_ms']:.2f}",
            f"{r['p20_ms']:.2f}-{r['p80_ms']:.2f}",
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
    repeats = args.repeats or (3 if suite == "smoke" else 10)
    rows = []
    for name in names:
        w = WORKLOADS[name]
        if w["device"] == "cuda" and not has_gpu:
            print(f"skipping {name}: needs a CUDA device", file=sys.stderr)
            continue
        device = torch.device("cuda" if (w["device"] == "cuda" or (w["device"] == "any" and has_gpu)) else "cpu")
        print(f"running {name} on {device} ...", file=sys.stderr, flush=True)
        rows.extend(run_workload(name, w, device, args.providers, repeats, args.warmup, not args.no_memory))
    rows = judge(rows)
    common.emit(rows, table(rows), name="slack_ctc", summary_name=f"slack_ctc_{suite}_latest",
                title=f"slack_ctc benchmark, suite `{suite}`", as_json=args.json, record_rows=args.record)
    failed = [r for r in rows if r["goal_met"] is False]
    return 1 if failed and suite != "smoke" and os.environ.get("MDLM_CTC_BENCH_STRICT") == "1" else 0


if __name__ == "__main__":
    sys.exit(main())
