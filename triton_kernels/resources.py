"""Static resources of every Triton kernel at the configs the launchers choose, from sm_90 cubins
compiled on a machine without a GPU (the S2 row of SPEC §6).

How: the launchers (``emissions.emissions``, ``slack_ctc.lattice_band``, ``grad.gradient``; for the fused
LM head, ``mdlm_ctc.linear``, which has no Triton kernel of its own, the windowed launchers of the same
kernels, ``emissions.emissions_window`` and ``grad.gradient_window``, at its chunk and tile) are run
on ``meta`` tensors of a workload's shapes with every ``kernel[grid](...)`` replaced by a recorder, so
what is compiled is exactly what the launcher would launch there: its constexprs, ``num_warps``, and
Triton's own argument specialisation (int32/int64, 16-byte alignment and divisibility hints, computed
by Triton's binder from the recorded arguments).
Each recorded launch is compiled for ``GPUTarget("cuda", 90, 32)`` and its PTX is passed to Triton's
bundled ``ptxas -v --gpu-name=sm_90a`` (the assembler that makes the cubin a GPU would load), which
reports registers, spill stores/loads, stack and static shared memory. Blocks per SM follow from
registers (65,536 per SM, allocated per warp in units of 256), shared memory (228 KB per SM, 1 KB
reserved per block) and the limits of 64 warps and 32 blocks per SM of an H200 (sm_90).

Used by ``benchmarks/static_triton.py`` (the report) and ``tests/test_triton_resources.py`` (CI:
no spill in any config the launchers can choose). Must run with ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import subprocess
import tempfile

import torch

# H200 (sm_90) per-SM limits
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256          # registers are allocated per warp in units of 256
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
H200_SMS = 132

VOCAB_KERNELS = ("_emissions_kernel", "_dense_kernel", "_finish_kernel")


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    B: int
    T: int
    U: int
    V: int
    mode: int = 0                  # PRESERVE / STANDARD
    dtype: torch.dtype = torch.bfloat16
    W: int | None = None           # the table width; None: the exact width of full-length rows
    observed: bool = False
    in_place: bool = False
    linear: bool = False           # a fused LM head shape: its windowed stages at the default chunk and tile
    gradient: str = "auto"         # "auto": the path the op layer's cost model picks; "two" / "three" passes
    note: str = ""                 # (fused head: "two" is the gradient in the forward, "three" the recompute)

    def width(self) -> int:
        if self.W is not None:
            return self.W
        return max(min(self.U, self.T - self.U + 1), 1)


def spec_workloads() -> list[Workload]:
    """The SPEC §6 shapes (G1-G4), as the launchers see them."""
    P, S = 0, 1
    return [
        Workload("G1", 8, 2048, 1792, 126464, P, note="preserve, bf16; two passes (the cost model's choice)"),
        Workload("G1 three-pass", 8, 2048, 1792, 126464, P, gradient="three",
                 note="the same shape on the three-pass path, side by side"),
        Workload("G1 observed, in place", 8, 2048, 1792, 126464, P, observed=True, in_place=True,
                 note="the MDLM loop's call (observed tokens), gradient over the logits"),
        Workload("G1 no band bound", 8, 2048, 1792, 126464, P, W=1792,
                 note="validate=False without band_bound: W = min(U, T)"),
        Workload("G2 preserve", 8, 2048, 1024, 126464, P),
        Workload("G2 standard", 8, 2048, 1024, 126464, S),
        Workload("G3", 2, 8192, 7680, 126464, P),
        Workload("G4", 8, 2048, 1792, 126464, P, linear=True,
                 note="fused LM head, bf16: the windowed stages at chunk_size 1024 and its backward tile, in place; "
                      "rows as G1"),
        Workload("G4 observed", 8, 2048, 1792, 126464, P, linear=True, observed=True,
                 note="the MDLM loop's fused call (observed tokens)"),
        Workload("G4 gradient in forward", 8, 2048, 1792, 126464, P, linear=True, gradient="two",
                 note="the fused head's gradient in the forward: the two-pass vocabulary pass over a chunk, in "
                      "place, and the exact band values of the sparse correction (the recompute path is the G4 "
                      "default: its [V, D] fp32 accumulator would exceed a 1,024-frame chunk)"),
    ]


SWEEP_CHUNKS = (0, 7, 15, 31, 63)
"""The chunk lengths benchmarks/bench_slack_ctc.py's sweep (``--suite sweep``) times at the lattice shapes of
:func:`sweep_workloads`, whatever the collapse (0: one chunk): configs the launcher's cost model may never
pick (standard at L = 63), so the static checks compile them too."""


def sweep_workloads() -> list[Workload]:
    """The lattice shapes of the benchmark's chunk-length sweep (its V is irrelevant: the lattice alone)."""
    P, S = 0, 1
    return [Workload("sweep G1", 8, 2048, 1792, 1024, P), Workload("sweep G2", 8, 2048, 1024, 1024, S),
            Workload("sweep G3", 2, 8192, 7680, 1024, P)]


def cap_workloads() -> list[Workload]:
    """Shapes at which every launcher's block sizes reach their caps, per logits dtype and mode (registers
    grow with the block sizes, so these bound every config a launcher can choose below them)."""
    P, S = 0, 1
    shapes = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        shapes.append(Workload(f"caps {name} preserve", 2, 8192, 4096, 262144, P, dtype=dtype, observed=True))
        shapes.append(Workload(f"caps {name} standard", 2, 8192, 4096, 262144, S, dtype=dtype, W=4096,
                               observed=True))
    return shapes


# ---------------------------------------------------------------------------------------------
# recording the launches
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Launch:
    kernel: object        # the JITFunction
    grid: tuple
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.kernel.__name__ if hasattr(self.kernel, "__name__") else self.kernel.fn.__name__

    def meta(self) -> dict:
        return dict(self.kwargs)


class _Recorder:
    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(Launch(self.kernel, tuple(grid), args, kwargs))
        return launch


@contextlib.contextmanager
def _recording(launches):
    from . import emissions, grad, slack_ctc

    patched = [(emissions, "_emissions_kernel"), (grad, "_band_values_kernel"), (grad, "_dense_kernel"),
               (grad, "_finish_kernel"),
               (slack_ctc, "_transfer_kernel"), (slack_ctc, "_boundary_kernel"), (slack_ctc, "_sweep_kernel"),
               (slack_ctc, "_loss_kernel"), (slack_ctc, "_posterior_kernel")]
    saved = [(module, name, getattr(module, name)) for module, name in patched]
    try:
        for module, name, kernel in saved:
            setattr(module, name, _Recorder(kernel, launches))
        yield
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)


def record(workload: Workload, *, n_sm: int = H200_SMS, chunk_lens=None, dense_blocks=None) -> list[Launch]:
    """The launches the launchers make for ``workload`` (on meta tensors: nothing runs).

    ``chunk_lens``: lattice chunk lengths to record (default: the one the cost model picks for an H200);
    ``dense_blocks``: extra ``(BLOCK_V, num_warps)`` of the gradient's dense kernel (the autotune list).
    """
    from . import emissions, grad, slack_ctc

    meta = dict(device="meta")
    w = workload
    launches: list[Launch] = []
    with _recording(launches):
        if w.linear:
            _record_linear(w, meta)
            return launches
        B, T, U, V, W = w.B, w.T, w.U, w.V, w.width()
        logits = torch.empty((B, T, V), dtype=w.dtype, **meta)
        targets = torch.empty((B, U), dtype=torch.int64, **meta)
        lengths = torch.empty((B,), dtype=torch.int64, **meta)
        observed = torch.empty((B, T), dtype=torch.int64, **meta) if w.observed else None
        g = torch.empty((B,), dtype=torch.float32, **meta)
        two_pass = two_pass_of(w)
        if two_pass:  # the softmax written in the vocabulary pass; the backward's finish in place on it
            buffer = logits if w.in_place else torch.empty_like(logits)
            lse, table, special, soft_target, soft_special = emissions.emissions_grad(
                logits, targets, lengths, lengths, observed, 0, -1, W, g, buffer)
        else:
            lse, table, special = emissions.emissions(logits, targets, lengths, lengths, observed, 0, -1, W, True)
        S = W + 1 if w.mode == slack_ctc.PRESERVE else 2 * W + 1
        for chunk_len in chunk_lens if chunk_lens is not None else [slack_ctc.choose_chunk_len(B, T, S, w.mode, n_sm)]:
            nll = slack_ctc.lattice_band(table, special, targets, lengths, lengths, w.mode, -1, True,
                                         chunk_len=chunk_len)
        if two_pass:
            grad.gradient_finish(g, g, nll, targets, lengths, lengths, observed, soft_target, soft_special, table,
                                 special, 0, -1, False, buffer)
            return launches
        args = (g, logits, lse, targets, lengths, lengths, observed, table, special, nll, 0, -1, False, True)
        grad.gradient(*args, out=logits if w.in_place else None)
        for block in dense_blocks or ():
            before = len(launches)
            grad.gradient(*args, dense_block=block)
            del launches[before]  # the band-values launch repeats; keep the dense one
    return launches


def two_pass_of(workload: Workload) -> bool:
    """The path a workload records: its ``gradient`` field, or (``auto``) the op layer's cost model on a GPU
    (``mdlm_ctc._ops.gradient_in_forward``; the fused head's choice, ``linear.gradient_in_forward_choice``, at
    ``LINEAR_CHUNK``)."""
    if workload.gradient != "auto":
        return workload.gradient == "two"
    w = workload
    itemsize = torch.empty((), dtype=w.dtype).element_size()
    if w.linear:
        from mdlm_ctc import linear

        return linear.gradient_in_forward_choice(w.B * w.T, w.V, 4096, w.width(), LINEAR_CHUNK, itemsize, 2, False)
    from mdlm_ctc import _ops

    return _ops.gradient_in_forward("triton", torch.device("cuda"), w.V, w.width(), itemsize)


LINEAR_CHUNK = 1024
"""Frames per chunk of the recorded fused-head launches: G4's default (``linear.default_chunk_size`` at
V = 126,464, bf16), kept for the cap shapes too (where the default would be 256-512 frames), so that
their backward tiles stay at the widest vocabulary window and its largest blocks."""


def _record_linear(w: Workload, meta: dict) -> None:
    """The fused LM head's launches at chunks of ``LINEAR_CHUNK`` frames: the vocabulary pass over its second
    chunk of frames, the lattice, and the gradient pass in place over its second backward tile."""
    from mdlm_ctc import linear

    from . import emissions, grad, slack_ctc

    B, T, U, V, W = w.B, w.T, w.U, w.V, w.width()
    N, chunk = B * T, LINEAR_CHUNK
    targets = torch.empty((B, U), dtype=torch.int64, **meta)
    lengths = torch.empty((B,), dtype=torch.int64, **meta)
    observed = torch.empty((B, T), dtype=torch.int64, **meta) if w.observed else None
    n = min(chunk, N - chunk)
    chunk_logits = torch.empty((n, V), dtype=w.dtype, **meta)
    two_pass = two_pass_of(w)
    if two_pass:  # the gradient in the forward: the softmax written over the chunk's logits
        emissions.emissions_grad_window(chunk_logits, chunk, T, targets, lengths, lengths, observed, 0, -1, W,
                                        torch.empty((B,), dtype=torch.float32, **meta), chunk_logits)
    else:
        emissions.emissions_window(chunk_logits, chunk, T, targets, lengths, lengths, observed, 0, -1, W, True)
    S = W + 1 if w.mode == slack_ctc.PRESERVE else 2 * W + 1
    table = torch.empty((B, T, W), dtype=torch.float32, **meta)
    special = torch.empty((B, T), dtype=torch.float32, **meta)
    nll = slack_ctc.lattice_band(table, special, targets, lengths, lengths, w.mode, -1, True,
                                 chunk_len=slack_ctc.choose_chunk_len(B, T, S, w.mode, H200_SMS))
    if two_pass:  # the sparse correction's exact values, over a block batch of frames
        per_frame = torch.empty((n,), dtype=torch.float32, **meta)
        band = torch.empty((n, W), dtype=torch.float32, **meta)
        grad.band_values_window(torch.empty((B,), dtype=torch.float32, **meta), per_frame[:B], nll, chunk, T, V,
                                targets, lengths, lengths, observed, band, per_frame, band, per_frame, 0, -1)
        return
    _, frames, width = linear._tiling(N, V, chunk)
    dz = torch.empty((frames, min(width, V - width)), dtype=w.dtype, **meta)
    post_target = torch.empty((frames, W), dtype=torch.float32, **meta)
    per_frame = torch.empty((frames,), dtype=torch.float32, **meta)
    grad.gradient_window(torch.empty((B,), dtype=torch.float32, **meta), dz, 0, T, width, V, per_frame, targets,
                         lengths, lengths, observed, post_target, per_frame, nll, 0, -1, False, True, dz)


def lattice_launches(T: int = 8192) -> list[tuple[Workload, Launch]]:
    """One launch of every lattice-kernel config ``slack_ctc.lattice_configs`` can give (table widths
    1..4,096, both modes, every chunk-length candidate and one chunk): its block sizes follow the band
    (``tile_plan``), and ptxas' register counts are not monotonic in them, so none is left out."""
    from . import slack_ctc

    meta = dict(device="meta")
    seen, out = set(), []
    for mode in (slack_ctc.PRESERVE, slack_ctc.STANDARD):
        chunks = (0,) + (slack_ctc.PRESERVE_CHUNKS if mode == slack_ctc.PRESERVE else slack_ctc.STANDARD_CHUNKS)
        for W in range(1, 4097):
            for chunk_len in chunks:
                configs = slack_ctc.lattice_configs(T, W, mode, chunk_len)
                new = {name for name, c in configs.items() if (name, tuple(sorted(c.items()))) not in seen}
                if not new:
                    continue
                seen.update((name, tuple(sorted(configs[name].items()))) for name in new)
                launches: list[Launch] = []
                with _recording(launches):
                    table = torch.empty((2, T, W), dtype=torch.float32, **meta)
                    special = torch.empty((2, T), dtype=torch.float32, **meta)
                    targets = torch.empty((2, W), dtype=torch.int64, **meta)
                    lengths = torch.empty((2,), dtype=torch.int64, **meta)
                    slack_ctc.lattice_band(table, special, targets, lengths, lengths, mode, -1, True,
                                           chunk_len=chunk_len)
                workload = Workload(f"lattice W={W}{' standard' if mode else ''}", 2, T, W, 0, mode, W=W)
                out += [(workload, launch) for launch in launches if launch.name in new]
    return out


LATTICE_KERNELS = ("_transfer_kernel", "_boundary_kernel", "_sweep_kernel", "_loss_kernel", "_posterior_kernel")


def benchmark_launches() -> list[tuple[Workload, Launch]]:
    """The lattice launches of the benchmark's chunk-length sweep (every shape of :func:`sweep_workloads` at
    every length of SWEEP_CHUNKS); the benchmark's other rows run the launchers' own choices."""
    out = []
    for w in sweep_workloads():
        out += [(w, launch) for launch in record(w, chunk_lens=SWEEP_CHUNKS) if launch.name in LATTICE_KERNELS]
    return out


def choosable_launches() -> list[tuple[Workload, Launch]]:
    """Every config the launchers or the benchmarks can compile: the SPEC shapes with the cost model's chunk
    length, the dense kernel's autotune list (at G1 and, since any logits dtype is autotuned, at every cap
    shape), the caps of every block size for every chunk length candidate (and for the windowed vocabulary
    and gradient passes of the fused LM head), every lattice-kernel config, and the benchmark's sweep."""
    from . import grad, slack_ctc

    out = []
    for w in spec_workloads():
        out += [(w, launch) for launch in record(w)]
    g1 = spec_workloads()[0]
    out += [(g1, launch) for launch in record(g1, dense_blocks=grad.DENSE_AUTOTUNE_CONFIGS)
            if launch.name == "_dense_kernel"]
    for w in cap_workloads():
        chunks = (0,) + (slack_ctc.PRESERVE_CHUNKS if w.mode == slack_ctc.PRESERVE else slack_ctc.STANDARD_CHUNKS)
        three = dataclasses.replace(w, gradient="three")
        out += [(w, launch) for launch in record(three, chunk_lens=chunks, dense_blocks=grad.DENSE_AUTOTUNE_CONFIGS)]
        for path in ("two", "three"):
            out += [(w, launch) for in_place in ((False, True) if path == "two" else ())
                    for launch in record(dataclasses.replace(w, gradient=path, in_place=in_place))
                    if launch.name in ("_emissions_kernel", "_band_values_kernel", "_finish_kernel")]
            out += [(w, launch) for launch in record(dataclasses.replace(w, linear=True, gradient=path))
                    if launch.name in ("_emissions_kernel", "_band_values_kernel", "_dense_kernel")]
    return out + lattice_launches() + benchmark_launches()


# ---------------------------------------------------------------------------------------------
# compiling and reading the resources
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Resources:
    regs: int
    spill_stores: int
    spill_loads: int
    stack: int
    smem: int             # bytes of shared memory per block (Triton's dynamic + ptxas' static)
    num_warps: int
    blocks_per_sm: int
    limiter: str

    @property
    def resident_warps(self) -> int:
        return self.blocks_per_sm * self.num_warps

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def blocks_per_sm(regs: int, smem: int, num_warps: int) -> tuple[int, str]:
    """Resident blocks per SM on sm_90 and what limits them."""
    per_warp = math.ceil(max(regs, 1) * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    limits = {
        "registers": (REGS_PER_SM // per_warp) // num_warps,
        "shared memory": SMEM_PER_SM // (smem + SMEM_RESERVED_PER_BLOCK),
        "warps": MAX_WARPS_PER_SM // num_warps,
        "blocks": MAX_BLOCKS_PER_SM,
    }
    limiter = min(limits, key=lambda key: limits[key])
    return limits[limiter], limiter


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_version() -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    out = subprocess.run([get_ptxas(90).path, "--version"], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1] if out.strip() else "unknown"


def _ptxas_usage(ptx: str) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "kernel.ptx"), os.path.join(tmp, "kernel.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        result = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", src, "-o", dst],
                                capture_output=True, text=True, check=True)
    log = result.stdout + result.stderr
    regs, smem, spill = _PTXAS_USED.search(log), _PTXAS_SMEM.search(log), _PTXAS_SPILL.search(log)
    if regs is None or spill is None:
        raise RuntimeError(f"could not read registers and spills from ptxas -v:\n{log}")
    return dict(regs=int(regs.group(1)), smem=int(smem.group(1)) if smem else 0, stack=int(spill.group(1)),
                spill_stores=int(spill.group(2)), spill_loads=int(spill.group(3)))


_CACHE: dict = {}


def compile_launch(launch: Launch):
    """Compile a recorded launch for sm_90 exactly as Triton would at that call (its binder's
    specialisation of every argument) and return ``(key, CompiledKernel)``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_launch needs TRITON_INTERPRET unset (kernels are compiled, not interpreted)")
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    kernel = launch.kernel
    kwargs = dict(launch.kwargs)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    key = (launch.name, tuple(sorted(signature.items())), tuple(sorted((k, str(v)) for k, v in constexprs.items())),
           tuple(sorted((k, str(v)) for k, v in attrs.items())), options.num_warps, options.num_stages)
    if key not in _CACHE:
        source = ASTSource(kernel, signature, constexprs, attrs)
        _CACHE[key] = triton.compile(source, target=target, options=options.__dict__)
    return key, _CACHE[key]


_USAGE: dict = {}


def resources(launch: Launch) -> Resources:
    key, compiled = compile_launch(launch)
    if key not in _USAGE:
        usage = _ptxas_usage(compiled.asm["ptx"])
        num_warps = compiled.metadata.num_warps
        smem = compiled.metadata.shared + usage["smem"]
        blocks, limiter = blocks_per_sm(usage["regs"], smem, num_warps)
        _USAGE[key] = Resources(usage["regs"], usage["spill_stores"], usage["spill_loads"], usage["stack"], smem,
                                num_warps, blocks, limiter)
    return _USAGE[key]


def describe(launch: Launch) -> str:
    """The launch's config in one line: constexprs (without the mode flags) and num_warps."""
    meta = launch.meta()
    warps = meta.pop("num_warps", 4)
    shown = ", ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in meta.items())
    dtype = next((a.dtype for a in launch.args if isinstance(a, torch.Tensor) and a.dtype.is_floating_point
                  and a.dtype != torch.float32), None)
    dtype_text = f"{str(dtype).replace('torch.', '')}, " if dtype is not None else ""
    return f"{dtype_text}{shown}, warps={warps}"
