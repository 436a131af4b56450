"""Microbenchmark of linear_slack_ctc_loss (fused LM head + slack-CTC), SPEC §6 goal G4.

    python benchmarks/bench_linear_slack_ctc.py                     # G4 on a GPU, the CPU mid-size shape on a CPU
    python benchmarks/bench_linear_slack_ctc.py --workloads G4 --record
    python benchmarks/bench_linear_slack_ctc.py --smoke             # seconds, CPU; records nothing unless --record
    python benchmarks/bench_linear_slack_ctc.py --isolated --record # CPU memory table, one process per row

Providers (each one forward + backward from hidden states and the LM head, gradients for both):
    ours          mdlm_ctc.linear.linear_slack_ctc_loss on the path it chooses (``linear.gradient_in_forward_choice``;
                  the row's ``path`` column says which); ``--chunk-size default`` is its default chunk
    ours-forward  the same, the gradient accumulated in the forward (3 GEMMs, the softmax part summed into dH/dW
                  while each chunk is hot, a sparse posterior correction in the backward)
    ours-recompute  the same, store-free (4 GEMMs, the logits recomputed in the backward, or 3 when one chunk
                  holds every frame)
    rows          the alternative design, chunked by whole sequences with the gradient computed in the
                  forward (Liger FLCE's structure, 3 GEMMs), built from the backend's three stages; it
                  needs a scalar reduction and at least one sequence of logits per chunk. Kept here to
                  measure the design choice written in mdlm_ctc/linear.py.
    materialised  hidden @ W.T, then mdlm_ctc.slack_ctc_loss (when the logits and their gradient fit)
    liger         Liger-Kernel's LigerFusedLinearCrossEntropyLoss (mean over tokens), if importable, on a GPU
    cce           Apple cut-cross-entropy's linear_cross_entropy with its defaults (its gradient filter
                  skips the softmax entries too small to matter in bf16), if importable, on a GPU
    torch_ce      a chunked linear + cross-entropy in torch with Liger's structure (chunk of
                  next_pow2(N / ceil(V / D)) tokens, gradients in the forward, dW accumulated in the
                  weight dtype): the fused-CE yardstick when neither Liger nor CCE is installed
G4 compares ``ours`` with the fastest fused linear-CE present (liger, cce, torch_ce); cpu-bf16 compares
``ours`` at its default chunk with ``materialised`` (issue 13: no slower, by median process CPU time).

Every provider and chunk size of a workload runs side by side: one round-robin over all of them per
repeat. Times are medians with 20th/80th percentiles over those repeats (on the CPU also the median
process CPU time, which a busy shared machine disturbs far less than wall time). Peak extra memory: on a GPU
``torch.cuda.max_memory_allocated`` above the inputs during one step, gradients included
(``grad_mib`` says how much of it the returned gradients are); on the CPU the largest growth of live
bytes in the CPU allocator during one step, read from the profiler's allocation events. Every row
carries machine, commit and versions; ``--record`` appends them to
benchmarks/results/linear_slack_ctc.jsonl and writes the table to linear_slack_ctc_latest.md beside it.
``--rows-out``, ``--resume`` and ``--tiny`` work as in bench_slack_ctc.py (the GPU check's streaming rows,
resume and dry run: G4 at a tiny shape on the CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import mdlm_ctc  # noqa: E402
from mdlm_ctc import backends, linear, reference  # noqa: E402

BF16, FP32 = torch.bfloat16, torch.float32
SLACK = 0
FUSED_CE = ("liger", "cce", "torch_ce")

WORKLOADS = {
    # N = B * T frames; U target tokens per row (band width T - U + 1)
    "G4": dict(device="cuda", B=8, T=2048, U=1792, D=4096, V=126464, dtype=BF16,
               goal="<= 1.2x the best fused linear-CE, extra memory <= 2 GB", max_ratio=1.2, max_extra_gb=2.0),
    "cpu-mid": dict(device="cpu", B=2, T=2048, U=1792, D=512, V=32000, dtype=FP32, goal="design measurement"),
    "cpu-bf16": dict(device="cpu", B=2, T=2048, U=1792, D=256, V=32000, dtype=BF16, max_vs_materialised=1.0,
                     goal="bf16 no slower than materialised bf16 (issue 13)"),
    "smoke": dict(device="any", B=2, T=48, U=40, D=32, V=300, dtype=FP32, goal="runs"),
}
DEFAULT_PROVIDERS = ["ours", "ours-forward", "ours-recompute", "rows", "materialised", "liger", "cce", "torch_ce"]
OURS = {"ours": None, "ours-forward": "1", "ours-recompute": "0"}  # provider -> MDLM_CTC_GRADIENT_IN_FORWARD
TINY_SHAPES = {"G4": dict(B=1, T=16, U=14, D=16, V=48)}  # --tiny: G4's structure in about a second on a CPU


def make_inputs(w, device):
    g = torch.Generator().manual_seed(0)
    B, T, U, D, V = w["B"], w["T"], w["U"], w["D"], w["V"]
    hidden = torch.randn(B, T, D, generator=g).to(device=device, dtype=w["dtype"])
    weight = (torch.randn(V, D, generator=g) / math.sqrt(D)).to(device=device, dtype=w["dtype"])
    targets = torch.randint(1, V, (B, U), generator=g).to(device)
    return hidden, weight, targets


# ---------------------------------------------------------------------------------------------
# the alternative design and the cross-entropy yardstick
# ---------------------------------------------------------------------------------------------

class RowsLinearSlackCTC(torch.autograd.Function):
    """Chunked by whole sequences, gradient in the forward (3 GEMMs); mean reduction, full lengths."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows_per_chunk, backend):
        B, T, D = hidden.shape
        V, U = weight.shape[0], targets.shape[1]
        acc = reference.acc_dtype(hidden.dtype)
        emissions, lattice_band, gradient = backends.stages(backend)
        input_lengths = torch.full((B,), T, device=hidden.device)
        target_lengths = torch.full((B,), U, device=hidden.device)
        width = max(int(reference.column_band_width(torch.tensor(T), torch.tensor(U))), 1)
        weights = 1.0 / (B * target_lengths.clamp(min=1)).to(acc)  # d loss / d nll_b for reduction="mean"
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(V, D, dtype=acc, device=hidden.device)
        nlls = []
        for b0 in range(0, B, rows_per_chunk):
            b1 = min(B, b0 + rows_per_chunk)
            h = hidden[b0:b1].reshape(-1, D)
            logits = F.linear(h, weight).view(b1 - b0, T, V)
            il, tl, y = input_lengths[b0:b1], target_lengths[b0:b1], targets[b0:b1]
            lse, table, special = emissions(logits, y, il, tl, None, SLACK, -1, width, True)
            nll = lattice_band(table, special, y, il, tl, reference.PRESERVE, -1, True)
            dz = gradient(weights[b0:b1], logits, lse, y, il, tl, None, table, special, nll, SLACK, -1, False, True)
            del logits
            dz = dz.view(-1, V)
            grad_hidden[b0:b1] = (dz @ weight).view(b1 - b0, T, D)
            linear._mm_into(grad_weight, dz.t(), h, accumulate=True)
            nlls.append(nll)
        ctx.save_for_backward(grad_hidden, grad_weight.to(hidden.dtype))
        return (torch.cat(nlls) * weights).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight * grad_loss.to(grad_weight.dtype), None, \
            None, None


class TorchChunkedLinearCE(torch.autograd.Function):
    """Liger FLCE's structure in torch ops: token chunks, gradients in the forward, dW in the weight dtype."""

    @staticmethod
    def forward(ctx, hidden, weight, labels):
        N, D = hidden.shape
        V = weight.shape[0]
        chunk = 1 << max(0, math.ceil(math.log2(math.ceil(N / math.ceil(V / D)))))
        acc = reference.acc_dtype(hidden.dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for s in range(0, N, chunk):
            h, y = hidden[s:s + chunk], labels[s:s + chunk]
            logits = h @ weight.t()
            x = logits.to(acc)
            lse = torch.logsumexp(x, -1)
            total += (lse - x.gather(1, y[:, None]).squeeze(1)).sum()
            x.sub_(lse[:, None]).exp_()
            x.scatter_add_(1, y[:, None], torch.full_like(y[:, None], -1, dtype=x.dtype))
            logits.copy_(x.div_(N))
            del x
            grad_hidden[s:s + chunk] = logits @ weight
            grad_weight.addmm_(logits.t(), h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / N

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight * grad_loss.to(grad_weight.dtype), None


def _fused_ce(provider):
    """The loss callable ``(hidden [N, D], weight [V, D], labels [N]) -> mean loss`` of an installed fused
    linear-CE package, or None where it is not importable (the GPU check carries their wheels; see
    benchmarks/gpu_prep.sh). The modules are imported directly, not through the packages' top levels."""
    try:
        if provider == "liger":
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

            loss_fn = LigerFusedLinearCrossEntropyLoss()  # forward(lin_weight, _input, target)
            return lambda h, w, y: loss_fn(w, h, y)
        if provider == "cce":
            from cut_cross_entropy import linear_cross_entropy  # (e [N, D], c [V, D], targets [N])

            return lambda h, w, y: linear_cross_entropy(h, w, y)
    except Exception as error:  # not installed, or does not import on this machine
        print(f"  {provider}: not importable ({type(error).__name__}: {error})"[:300], file=sys.stderr)
        return None
    return None


# ---------------------------------------------------------------------------------------------
# one step per provider
# ---------------------------------------------------------------------------------------------

def make_step(provider, w, hidden, weight, targets, chunk_size, device):
    """A closure doing one forward + backward (gradients for hidden and weight), or None if unavailable."""
    h = hidden.detach().requires_grad_(True)
    wt = weight.detach().requires_grad_(True)
    B, T, D = hidden.shape
    V = weight.shape[0]

    def run(loss_fn):
        def step():
            h.grad = wt.grad = None
            loss_fn().backward()

        def clear():  # before a memory measurement, so that freeing old gradients cannot hide new ones
            h.grad = wt.grad = None
        step.clear = clear
        return step

    if provider in OURS:
        setting = OURS[provider]

        def ours():
            previous = os.environ.get("MDLM_CTC_GRADIENT_IN_FORWARD")
            if setting is not None:
                os.environ["MDLM_CTC_GRADIENT_IN_FORWARD"] = setting
            try:
                return linear.linear_slack_ctc_loss(h, wt, targets, slack_id=SLACK, chunk_size=chunk_size)
            finally:
                if setting is not None and previous is None:
                    os.environ.pop("MDLM_CTC_GRADIENT_IN_FORWARD")
                elif setting is not None:
                    os.environ["MDLM_CTC_GRADIENT_IN_FORWARD"] = previous
        return run(ours)
    if provider == "rows":
        rows = max(1, (chunk_size or linear.default_chunk_size(V, hidden.element_size())) // T)
        name = backends.resolve("auto", device)
        if device.type == "cuda" and name == "reference":
            print("  rows: skipped (no GPU backend: its per-chunk lattices would time the reference)", file=sys.stderr)
            return None
        return run(lambda: RowsLinearSlackCTC.apply(h, wt, targets, rows, name))
    if provider == "materialised":
        need = B * T * V * (3 * hidden.element_size() + 4)  # logits, their gradient, an fp32 temporary
        free = (torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 8 * 2**30)
        if need > 0.8 * free:
            print(f"  materialised: skipped ({need / 2**30:.1f} GiB needed)", file=sys.stderr)
            return None
        return run(lambda: mdlm_ctc.slack_ctc_loss(F.linear(h, wt), targets, slack_id=SLACK))
    canvas = torch.randint(0, V, (B * T,), device=device, generator=None)
    if provider == "torch_ce":
        return run(lambda: TorchChunkedLinearCE.apply(h.view(B * T, D), wt, canvas))
    fused = _fused_ce(provider)
    if fused is None or device.type != "cuda":
        return None
    return run(lambda: fused(h.view(B * T, D), wt, canvas))


def cpu_peak_mib(step):
    """Peak growth of live CPU-allocator memory during ``step``, MiB (see common.cpu_allocator_peak_bytes)."""
    return common.cpu_allocator_peak_bytes(step) / 2**20


CHUNKED = ("ours", "ours-forward", "ours-recompute", "rows")  # the providers that take a chunk size


def ours_path(provider, w, chunk):
    """The fused head's path for a provider's call: "forward" (gradient in the forward) or "recompute"."""
    if provider not in OURS:
        return None
    setting = OURS[provider]
    if setting is None:
        itemsize = torch.empty((), dtype=w["dtype"]).element_size()
        chunk = chunk or linear.default_chunk_size(w["V"], itemsize)
        width = int(reference.column_band_width(torch.tensor(w["T"]), torch.tensor(w["U"])))
        setting = "1" if linear.gradient_in_forward_choice(w["B"] * w["T"], w["V"], w["D"], width, chunk, itemsize,
                                                           2, False) else "0"
    return "forward" if setting == "1" else "recompute"


def run_workload(name, w, device, provider_names, repeats, warmup, chunk_sizes):
    """Rows for every provider of ``w`` (the chunked ones once per chunk size), timed side by side: each
    repeat runs every configuration once, round-robin."""
    hidden, weight, targets = make_inputs(w, device)
    steps, failed = {}, {}  # (provider, chunk size or None) -> step / error
    for p in provider_names:
        for chunk in (chunk_sizes if p in CHUNKED else [None]):
            print(f"  {p} (chunk {chunk or 'default'}): warm-up", file=sys.stderr, flush=True)
            try:
                step = make_step(p, w, hidden, weight, targets, chunk, device)
                if step is None:
                    continue
                for _ in range(warmup):
                    step()
                steps[p, chunk] = step
            except Exception as error:  # one provider's failure must not cost the others' rows
                failed[p, chunk] = common.error_text(error)
                print(f"  {p}: FAILED {failed[p, chunk]}", file=sys.stderr, flush=True)
    grad_mib = (hidden.numel() + weight.numel()) * hidden.element_size() / 2**20
    peaks = {}
    for key, step in steps.items():  # the peak extra memory of one step
        step.clear()
        if device.type == "cuda":
            with common.PeakMemory(device) as peak:
                step()
            peaks[key] = peak.mib
        else:
            peaks[key] = cpu_peak_mib(step)
    times = {key: [] for key in steps}
    cpu_times = {key: [] for key in steps}  # process CPU seconds: robust to a busy machine, unlike wall time
    for _ in range(repeats):
        for key, step in steps.items():
            start = time.process_time()
            times[key].append(common.timed(step, device))
            cpu_times[key].append(time.process_time() - start)
    rows = [dict(identity(name, w, p, chunk), device=device.type, status="error", error=message, goal=w["goal"])
            for (p, chunk), message in failed.items()]
    for (p, chunk) in steps:
        q = common.quantiles(times[p, chunk])
        rows.append(dict(identity(name, w, p, chunk), device=device.type, path=ours_path(p, w, chunk),
                         peak_extra_mib=None if peaks[p, chunk] is None else round(peaks[p, chunk], 3),
                         grad_mib=round(grad_mib, 1), goal=w["goal"],
                         cpu_seconds_median=(float(f"{statistics.median(cpu_times[p, chunk]):.4g}")
                                             if device.type == "cpu" else None),
                         **{k: round(v, 4) if isinstance(v, float) else v for k, v in q.items()}))
    del hidden, weight, targets, steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def identity(name, w, provider, chunk):
    """The fields that name a row's measurement (``common.row_key`` adds commit, tree and GPU)."""
    itemsize = torch.tensor([], dtype=w["dtype"]).element_size()
    out = dict(workload=name, provider=provider, B=w["B"], T=w["T"], U=w["U"], N=w["B"] * w["T"], D=w["D"],
               V=w["V"], dtype=str(w["dtype"]).replace("torch.", ""),
               chunk_size=(chunk or linear.default_chunk_size(w["V"], itemsize)) if provider in CHUNKED else None,
               default_chunk=provider in CHUNKED and chunk is None, timed="forward+backward")
    if w.get("dry_run"):
        out["dry_run"] = True
    return out


def judge(rows):
    """``ours`` against the fastest fused linear-CE of the same workload (G4), and against ``materialised``
    (cpu-bf16: median process CPU seconds on the CPU, median time on a GPU; the goal is judged at the
    default chunk)."""
    for row in rows:
        row["vs_best_fused_ce"] = row["vs_materialised"] = row["goal_met"] = None
    by_workload = {}
    for row in rows:
        if "median_ms" in row:  # not the rows of a provider that failed
            by_workload.setdefault(row["workload"], []).append(row)
    for name, group in by_workload.items():
        w = WORKLOADS[name]
        fused = [r for r in group if r["provider"] in FUSED_CE]
        best = min(fused, key=lambda r: r["median_ms"]) if fused else None
        materialised = next((r for r in group if r["provider"] == "materialised"), None)

        def cost(r):
            return r["cpu_seconds_median"] if r["cpu_seconds_median"] is not None else r["median_ms"]
        for row in group:
            if best is not None and row["provider"] not in FUSED_CE:
                row["vs_best_fused_ce"] = round(row["median_ms"] / best["median_ms"], 3)
                row["best_fused_ce"] = best["provider"]
            if materialised is not None and row["provider"] in CHUNKED:
                row["vs_materialised"] = round(cost(row) / cost(materialised), 3)
            checks = []
            if row["provider"] == "ours" and "max_ratio" in w:
                if row["vs_best_fused_ce"] is not None:
                    checks.append(row["vs_best_fused_ce"] <= w["max_ratio"])
                if row["peak_extra_mib"] is not None:
                    checks.append(row["peak_extra_mib"] * 2**20 <= w["max_extra_gb"] * 1e9)
            if (row["provider"] == "ours" and row["default_chunk"] and "max_vs_materialised" in w
                    and row["vs_materialised"] is not None):
                checks.append(row["vs_materialised"] <= w["max_vs_materialised"])
            row["goal_met"] = all(checks) if checks and not row.get("dry_run") else None
    return rows


def _chunk_label(row) -> str:
    if row["chunk_size"] is None:
        return ""
    return f"{row['chunk_size']}" + (" (default)" if row.get("default_chunk") else "")


def table(rows):
    head = ("workload", "provider", "path", "chunk", "median ms", "p20-p80 ms", "CPU s", "peak extra MiB",
            "of which grads MiB", "vs materialised", "vs best fused CE", "goal met")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "median_ms" not in r:
            lines.append(f"| {r['workload']} | {r['provider']} | {r.get('path') or ''} | {_chunk_label(r)} | "
                         f"failed: {r['error'][:80]} |" + " |" * 7)
            continue
        lines.append("| " + " | ".join([
            r["workload"], r["provider"], r.get("path") or "", _chunk_label(r),
            f"{r['median_ms']:.1f}", f"{r['p20_ms']:.1f}-{r['p80_ms']:.1f}",
            "" if r["cpu_seconds_median"] is None else f"{r['cpu_seconds_median']:.2f}",
            "n/a" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.1f}", f"{r['grad_mib']:.0f}",
            "" if r["vs_materialised"] is None else f"{r['vs_materialised']:.2f}x",
            "" if r["vs_best_fused_ce"] is None else f"{r['vs_best_fused_ce']:.2f}x",
            {True: "yes", False: "NO", None: ""}[r["goal_met"]]]) + " |")
    note = ("\nvs materialised: median process CPU seconds on the CPU (median time on a GPU) over the "
            "materialised row's, measured side by side.")
    return "\n".join(lines) + "\n" + note


# ---------------------------------------------------------------------------------------------
# --isolated: the CPU memory claim, each configuration in its own process
# ---------------------------------------------------------------------------------------------

ISOLATED = dict(B=2, T=2048, U=1792, D=256, V=32000)  # N = 4096; validated band width T - U + 1 = 257
ISOLATED_ROWS = [  # (provider, dtype, chunk ("default": linear.default_chunk_size), validate, band_bound)
    ("ours", "float32", 1024, True, None), ("ours", "float32", "default", True, None),
    ("ours", "float32", 4096, True, None), ("materialised", "float32", None, True, None),
    ("ours", "bfloat16", 1024, True, None), ("ours", "bfloat16", "default", True, None),
    ("materialised", "bfloat16", None, True, None),
    ("ours", "bfloat16", 1024, False, None), ("ours", "bfloat16", 1024, False, 257),
    ("materialised", "bfloat16", None, False, None), ("materialised", "bfloat16", None, False, 257),
]


def _isolated_step(provider, dtype, chunk, validate, band_bound, shape):
    w = dict(shape, dtype=getattr(torch, dtype))
    hidden, weight, targets = make_inputs(w, torch.device("cpu"))
    h, wt = hidden.requires_grad_(True), weight.requires_grad_(True)
    # explicit length tensors, as a training loop passes them: without the validation sync their values are
    # not read on the host, so the tables are min(U, T) wide unless band_bound is given
    lengths = dict(input_lengths=torch.full((w["B"],), w["T"]), target_lengths=torch.full((w["B"],), w["U"]))

    def step():
        h.grad = wt.grad = None
        if provider == "ours":
            loss = linear.linear_slack_ctc_loss(h, wt, targets, slack_id=SLACK,
                                                chunk_size=None if chunk == "default" else chunk, validate=validate,
                                                band_bound=band_bound, **lengths)
        else:
            loss = mdlm_ctc.slack_ctc_loss(F.linear(h, wt), targets, slack_id=SLACK, validate=validate,
                                           band_bound=band_bound, **lengths)
        loss.backward()
    return step, h, wt


def isolated_child(spec: str) -> None:
    """One configuration in this process: a warm-up on a small shape (code paths, thread pools), the peak
    RSS growth of the first full-size forward + backward, the CPU allocator's peak of the second, then
    the times of five more; one JSON line."""
    provider, dtype, chunk, validate, band_bound = json.loads(spec)
    small = dict(B=2, T=64, U=40, D=ISOLATED["D"], V=ISOLATED["V"])
    warm_chunk = chunk if chunk in (None, "default") else 64
    step, _, _ = _isolated_step(provider, dtype, warm_chunk, validate, 25 if band_bound else None, small)
    step()
    del step
    step, h, wt = _isolated_step(provider, dtype, chunk, validate, band_bound, ISOLATED)
    base = common._rss_kib() if common._reset_hwm() else None
    step()
    hwm = common._status_kib("VmHWM")
    rss_mib = None if base is None or hwm is None else (hwm - base) / 1024
    h.grad = wt.grad = None  # freed before the allocator measurement, so they cannot offset the new ones
    alloc_mib = common.cpu_allocator_peak_bytes(step) / 2**20
    wall, cpu = [], []
    for _ in range(5):
        start = time.process_time()
        wall.append(common.timed(step, torch.device("cpu")))
        cpu.append(time.process_time() - start)
    print("ISOLATED " + json.dumps(dict(peak_rss_mib=rss_mib, alloc_peak_mib=alloc_mib, wall_s=wall, cpu_s=cpu)))


def run_isolated():
    import subprocess

    B, T, U, D, V = (ISOLATED[k] for k in ("B", "T", "U", "D", "V"))
    N = B * T
    rows = []
    for provider, dtype, chunk, validate, band_bound in ISOLATED_ROWS:
        spec = json.dumps([provider, dtype, chunk, validate, band_bound])
        print(f"  {spec}", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--isolated-child", spec],
                             capture_output=True, text=True)
        line = next((x for x in out.stdout.splitlines() if x.startswith("ISOLATED ")), None)
        if line is None:
            raise RuntimeError(f"child {spec} failed:\n{out.stderr[-3000:]}")
        got = json.loads(line[len("ISOLATED "):])
        itemsize = getattr(torch, dtype).itemsize
        grads = (N * D + V * D) * itemsize
        width = min(U, T - U + 1) if validate else (band_bound or min(U, T))
        tables = N * (width + 2) * 4  # lse, the band table (emissions, then posteriors), special; fp32
        default = chunk == "default"
        if default:
            chunk = linear.default_chunk_size(V, itemsize)
        logits = min(chunk or N, N) * V * itemsize
        budget = logits + grads + tables
        rows.append(dict(workload="cpu-memory", provider=provider, dtype=dtype, chunk_size=chunk,
                         default_chunk=default, validate=validate,
                         band_bound=band_bound, B=B, T=T, U=U, N=N, D=D, V=V, table_width=width,
                         budget_mib=round(budget / 2**20, 1), grad_mib=round(grads / 2**20, 1),
                         peak_rss_mib=None if got["peak_rss_mib"] is None else round(got["peak_rss_mib"], 1),
                         alloc_peak_mib=round(got["alloc_peak_mib"], 1),
                         rss_over_budget=None if got["peak_rss_mib"] is None else
                         round(got["peak_rss_mib"] * 2**20 / budget, 3),
                         alloc_over_budget=round(got["alloc_peak_mib"] * 2**20 / budget, 3),
                         wall_s_median=round(statistics.median(got["wall_s"]), 3),
                         cpu_s_median=round(statistics.median(got["cpu_s"]), 3), repeats=len(got["cpu_s"])))
    return rows


def isolated_table(rows):
    head = ("provider", "dtype", "chunk", "validate", "band_bound", "table W", "peak extra RSS MiB",
            "allocator peak MiB", "budget MiB", "RSS / budget", "alloc / budget", "wall s", "CPU s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(str(x) for x in (
            r["provider"], r["dtype"], _chunk_label(r), r["validate"], r["band_bound"] or "", r["table_width"],
            r["peak_rss_mib"], r["alloc_peak_mib"], r["budget_mib"], r["rss_over_budget"], r["alloc_over_budget"],
            r["wall_s_median"], r["cpu_s_median"])) + " |")
    note = ("\nbudget = one chunk of logits in the logits' dtype + the returned gradients (hidden, weight) + "
            "the fp32 band tables (lse, table [N, W], special); for materialised rows the chunk is all N frames. "
            "Peak extra RSS: growth of VmHWM over the RSS before the first full-size step (after a small-shape "
            "warm-up); allocator peak: the CPU allocator's live-bytes peak during the second step.")
    return "\n".join(lines) + "\n" + note


def _chunk_arg(text: str):
    return None if text == "default" else int(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--isolated", action="store_true",
                        help="the CPU memory table (N=4096, D=256, V=32,000), one process per configuration")
    parser.add_argument("--isolated-child", help=argparse.SUPPRESS)
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS),
                        help="default: G4 with a GPU, else cpu-mid")
    parser.add_argument("--providers", nargs="+", default=DEFAULT_PROVIDERS)
    parser.add_argument("--chunk-size", type=_chunk_arg, nargs="+", default=[None],
                        help="frames per chunk for ours/rows, or 'default' (linear.default_chunk_size); several "
                             "values give one row each, all timed side by side")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 10 on a GPU, 5 on CPU)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, seconds")
    parser.add_argument("--record", action="store_true",
                        help="append rows to benchmarks/results/linear_slack_ctc.jsonl (CPU smoke runs only with it)")
    parser.add_argument("--json", action="store_true", help="print rows as JSON lines instead of a table")
    parser.add_argument("--rows-out", help="append each workload's rows, stamped, to this JSONL as they are measured")
    parser.add_argument("--resume", nargs="*", default=[], help="JSONL files of rows already measured: skipped")
    parser.add_argument("--tiny", action="store_true", help="G4 at a tiny shape on the CPU (the GPU check's dry run)")
    args = parser.parse_args(argv)
    if args.isolated_child:
        isolated_child(args.isolated_child)
        return 0
    if args.isolated:
        rows = run_isolated()
        common.emit(rows, isolated_table(rows), name="linear_slack_ctc", summary_name="linear_slack_ctc_cpu_memory",
                    title="linear_slack_ctc CPU memory, one process per row", as_json=args.json,
                    record_rows=args.record)
        return 0

    has_gpu = torch.cuda.is_available()
    names = ["smoke"] if args.smoke else (args.workloads or (["G4"] if has_gpu else ["cpu-mid"]))
    repeats = args.repeats or (5 if (args.smoke or args.tiny or not has_gpu) else 10)  # >= 5: common.quantiles extrapolates below
    sink = common.RowSink(args.rows_out, "linear_slack_ctc") if args.rows_out else None
    done = common.measured_keys(args.resume)
    same = {**common.key_stamp(), "bench": "linear_slack_ctc"}
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
        device = torch.device("cuda" if w["device"] == "cuda" or (w["device"] == "any" and has_gpu and
                                                                  not args.smoke) else "cpu")
        providers = [p for p in args.providers if p not in ("liger", "cce") or (device.type == "cuda" and
                                                                              _fused_ce(p) is not None)]
        configs = [(p, c) for p in providers for c in (args.chunk_size if p in CHUNKED else [None])]
        todo = [(p, c) for p, c in configs if common.row_key({**identity(name, w, p, c), **same}) not in done]
        if not todo:
            print(f"skipping {name}: every row already measured", file=sys.stderr)
            continue
        run = list(dict.fromkeys(p for p, _ in todo))
        if len(todo) < len(configs):  # the yardsticks of the ratios, measured again side by side
            run += [p for p in providers if p in FUSED_CE + ("materialised",) and p not in run]
        print(f"running {name} on {device} ...", file=sys.stderr, flush=True)
        try:
            measured = run_workload(name, w, device, run, repeats, args.warmup, args.chunk_size)
        except Exception as error:  # e.g. out of memory making the inputs
            message = common.error_text(error)
            measured = [dict(identity(name, w, p, c), device=device.type, status="error", error=message,
                             goal=w["goal"]) for p, c in todo]
        wanted = {common.row_key({**identity(name, w, p, c), **same}) for p, c in todo}
        judge(measured)
        new = [row for row in measured if common.row_key({**row, **same}) in wanted]
        failures += common.deliver(rows, new, sink)
    if sink is not None:
        print(f"wrote {sink.count} rows to {args.rows_out}", file=sys.stderr)
    common.emit(rows, table(rows), name="linear_slack_ctc", summary_name="linear_slack_ctc_latest",
                title=f"linear_slack_ctc benchmark ({', '.join(names)})", as_json=args.json, record_rows=args.record)
    failed = [r for r in rows if r["goal_met"] is False]
    if failures:
        return 2  # a provider raised (its row says why): a GPU check restarts its worker process after this
    return 1 if failed and os.environ.get("MDLM_CTC_BENCH_STRICT") == "1" else 0


if __name__ == "__main__":
    sys.exit(main())
