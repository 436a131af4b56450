"""The CUDA lattice (``csrc/slack_ctc_cuda.cu``, stage ``lattice_band`` of backend "cuda").

Three layers of evidence:

* compile-only (CPU machines, CI): every ``csrc/*.cu`` is compiled by ``nvcc`` for sm_90 against the
  installed torch's headers; any error fails (skipped only when no ``nvcc`` exists);
* emulated (CPU machines, CI): ``csrc/lattice_cuda_emulator.h`` runs the very same kernel code
  (``csrc/lattice_cuda.cuh``) with every CUDA thread a fiber, random schedules, deferred and poisoned
  cp.async copies and emulated clusters/DSMEM; results must match the CPU op and the float64
  reference, and be bitwise identical across schedules and launch shapes;
* GPU (marked ``gpu``): ``torch.ops.mdlm_ctc_C.lattice_band`` on CUDA tensors against the reference
  and the CPU op, both collapses, max_shift, ragged/infeasible/NaN rows, T=1/U=0, T=8192 rows, forced
  cluster launches, bitwise determinism, no host sync, CUDA-graph capture, the Triton lattice and the
  end-to-end loss with ``backend="cuda"``.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from mdlm_ctc.reference import PRESERVE, STANDARD, column_band_width, emissions_reference, lattice_band_reference
import cuda_emulator
from oracles import assert_close_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
SPECIAL = 0
V = 7


# ---------------------------------------------------------------------------------------------
# inputs: band tables made by the reference vocabulary pass (zeros past the input length)
# ---------------------------------------------------------------------------------------------

def make_case(B, T, U, mode, max_shift=-1, *, dtype=torch.float32, ragged=True, infeasible_row=False,
              nan_row=False, dead_row=False, width=None, seed=0, device="cpu"):
    """(table, special, targets, input_lengths, target_lengths) for lattice_band, built on the CPU."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(1, V, (B, U), generator=g)
    if mode == STANDARD and U >= 3:
        targets[:, 2] = targets[:, 1]  # a repeat: needs a blank in between
    T_b = torch.full((B,), T, dtype=torch.long)
    U_b = torch.full((B,), U, dtype=torch.long)
    if ragged and B > 1:
        T_b[1:] = torch.randint(max(T // 2, 0), T + 1, (B - 1,), generator=g)
        U_b[1:] = torch.minimum(torch.randint(0, U + 1, (B - 1,), generator=g), T_b[1:])
    if infeasible_row and B > 1:
        U_b[-1] = min(U, T)
        T_b[-1] = max(int(U_b[-1]) - 1, 0)
    shift = max_shift if mode == PRESERVE else -1
    W = int(column_band_width(T_b, U_b, None if shift < 0 else shift).max().clamp(min=1)) if width is None else width
    observed = None
    if dead_row and B > 1:  # a row whose canvas is forced to the slack token everywhere: -inf unless U = 0
        observed = torch.full((B, T), -1, dtype=torch.long)
        observed[0] = SPECIAL
    _, table, special = emissions_reference(logits, targets, T_b, U_b, observed, SPECIAL, shift, max(W, 1), True)
    table, special = table.to(dtype).contiguous(), special.to(dtype).contiguous()
    if width is not None:
        table = table[:, :, :width].contiguous()
    if nan_row and B > 1:  # a NaN inside the input length of the first row after 0 that has frames
        rows = [b for b in range(1, B) if T_b[b] > 0]
        if rows:
            special[rows[0], int(T_b[rows[0]]) - 1] = float("nan")
    return [x.to(device) for x in (table, special, targets, T_b, U_b)]


def tolerances(dtype):
    return dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)


def run_op(table, special, targets, T_b, U_b, mode, shift, need_grad):
    table, special = table.clone(), special.clone()
    nll = torch.ops.mdlm_ctc_C.lattice_band(table, special, targets, T_b, U_b, mode, shift, need_grad)
    return nll, table, special


def run_reference(table, special, targets, T_b, U_b, mode, shift, need_grad):
    table, special = table.detach().double().cpu().clone(), special.detach().double().cpu().clone()
    nll = lattice_band_reference(table, special, targets.cpu(), T_b.cpu(), U_b.cpu(), mode, shift, need_grad)
    return nll, table, special


def assert_same_outputs(actual, expected, need_grad, tol, what):
    names = ("nll", "posteriors of the target columns", "posteriors of the special token")
    for a, e, name in list(zip(actual, expected, names))[: 3 if need_grad else 1]:
        assert_close_report(a, e, what=f"{what}: {name}", **tol)


def assert_bitwise(a, b, what):
    for x, y in zip(a, b):
        x, y = x.cpu(), y.cpu()
        same = (x == y) | (x.isnan() & y.isnan())
        assert bool(same.all()), f"{what}: {int((~same).sum())} elements differ bitwise"


def _has_cpu_op():
    try:
        import mdlm_ctc._C  # noqa: F401
    except ImportError:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("mdlm_ctc_C::lattice_band", "CPU")


# ---------------------------------------------------------------------------------------------
# compile-only: nvcc on every .cu file (CPU machines)
# ---------------------------------------------------------------------------------------------

def _nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


@pytest.mark.parametrize("source", sorted(glob.glob(os.path.join(CSRC, "*.cu"))) or ["<none>"],
                         ids=lambda p: os.path.basename(p))
def test_cuda_sources_compile(source, tmp_path):
    """nvcc compiles the file for sm_90 with the flags of the real build (host and device code, ptxas
    included); errors, and device code calling host-only functions, fail the test."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("no nvcc on this machine")
    assert source != "<none>", "no .cu file in csrc/"
    from torch.utils.cpp_extension import include_paths

    command = [nvcc, "-c", source, "-o", str(tmp_path / "out.o"), "-std=c++20", "-O1",
               "-gencode=arch=compute_90,code=sm_90", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr",
               "--Werror", "cross-execution-space-call",
               # the torch extension defaults (torch.utils.cpp_extension.COMMON_NVCC_FLAGS)
               "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
               "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
               # a CPU-only torch wheel ships the c10/cuda headers without their generated config header
               "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
               f"-I{CSRC}"] + [f"-I{p}" for p in include_paths()]
    start = time.time()
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (f"nvcc failed on {source} ({time.time() - start:.0f} s):\n{' '.join(command)}\n"
                                    f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}")


# ---------------------------------------------------------------------------------------------
# emulated: the kernel code on the host, every CUDA thread a fiber (CPU machines)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def emulator():
    compiler, why = cuda_emulator.compiler_or_skip_reason()
    if compiler is None:
        pytest.skip(why)
    return cuda_emulator.build(units=cuda_emulator.FULL)


def emulate(lib, *args, **kwargs):
    return cuda_emulator.emulate(lib, *args, **kwargs)


# Launch shapes and the (B, T, U) each runs: every band crosses the boundaries of its launch (lanes,
# warps, CTAs of a cluster) in both precisions. (name, launch, fp32 shape, fp64 shape)
LAUNCHES = [
    ("2warps-vt1", dict(threads=64, vt=1, stages=2), (3, 120, 60), (3, 110, 50)),
    ("2warps-vt2-4stages", dict(threads=64, vt=2, stages=4), (3, 160, 80), (2, 150, 72)),
    ("2warps-vt8-8stages", dict(threads=64, vt=8, stages=8), (2, 540, 270), (2, 520, 260)),
    ("4warps-vt4", dict(threads=128, vt=4, stages=2), (2, 300, 150), (2, 280, 140)),
    ("cluster2-vt2", dict(cluster=2, threads=32, vt=2, stages=2), (3, 200, 100), (2, 180, 90)),
    ("cluster4-2warps-vt1-8stages", dict(cluster=4, threads=64, vt=1, stages=8), (2, 300, 150), (2, 280, 140)),
    ("cluster8-vt1-4stages", dict(cluster=8, threads=32, vt=1, stages=4), (2, 300, 150), (2, 280, 140)),
]
LAUNCH_IDS = [name for name, *_ in LAUNCHES]
MODES = [(PRESERVE, -1), (STANDARD, -1), (PRESERVE, 45), (PRESERVE, 0)]
MODE_IDS = ["preserve", "standard", "max_shift45", "max_shift0"]
GPU_MODES = [(PRESERVE, -1), (STANDARD, -1), (PRESERVE, 5), (PRESERVE, 0)]


def _modes_for(name):
    # every mode on the cheap launches, the two collapses on the others; VT = 8 (long rows) preserve only
    if name == "2warps-vt8-8stages":
        return MODES[:1]
    return MODES if name in ("2warps-vt1", "cluster2-vt2", "2warps-vt2-4stages") else MODES[:2]


CASES = [(name, launch, shape32, shape64, mode, shift)
         for name, launch, shape32, shape64 in LAUNCHES for mode, shift in _modes_for(name)]
CASE_IDS = [f"{name}-{MODE_IDS[MODES.index((mode, shift))]}" for name, _, _, _, mode, shift in CASES]


FP32_DRIFT_PER_FRAME = 2e-6  # a plain float32 lattice drifts ~1e-3 over 500 frames; measured here: 1.2e-4 at
# T = 200, 2.2e-4 at 300, 5.8e-4 at 540


def _max_error(actual, expected):
    errors = []
    for a, e in zip(actual, expected):
        a, e = a.double(), e.double()
        finite = e.isfinite()
        errors.append(float((a - e)[finite].abs().max()) if finite.any() else 0.0)
    return max(errors)


@pytest.mark.parametrize("name,launch,shape32,shape64,mode,shift", CASES, ids=CASE_IDS)
def test_emulated_fp32_matches_reference_and_cpu_op(emulator, name, launch, shape32, shape64, mode, shift):
    """float32 against the float64 oracle, and as accurate as a float32 lattice: the largest error is at
    most twice the CPU op's, or FP32_DRIFT_PER_FRAME x T, whichever is larger (the CPU op stores its rows
    relative to the running row maxima, which makes it about ten times more accurate than a plain float32
    lattice such as the CUDA one: 1.5e-5 against 1.5e-4 here)."""
    if not _has_cpu_op():
        pytest.skip("mdlm_ctc._C (CPU kernels) is not built")
    case = make_case(*shape32, mode, shift, dtype=torch.float32, infeasible_row=True)
    capacity = launch.get("cluster", 1) * launch["threads"] * launch["vt"]
    unit = launch["threads"] * launch["vt"] if launch.get("cluster", 1) > 1 else 32 * launch["vt"]
    assert unit < shape32[2] + 1 <= capacity, "the band must cross a warp (CTA) boundary and fit the launch"
    reference = run_reference(*case, mode, shift, True)
    cpu = run_op(*case, mode, shift, True)
    actual = emulate(emulator, *case, mode, shift, True, **launch)
    what = f"{name} mode {mode} shift {shift}"
    assert_same_outputs(actual, reference, True, dict(atol=2e-3, rtol=2e-3), what)
    emulated_error, cpu_error = _max_error(actual, reference), _max_error(cpu, reference)
    assert emulated_error <= max(2 * cpu_error, FP32_DRIFT_PER_FRAME * shape32[1]) + 1e-6, \
        f"{what}: max error {emulated_error:.3g} vs CPU op {cpu_error:.3g}"


@pytest.mark.parametrize("name,launch,shape32,shape64,mode,shift", CASES, ids=CASE_IDS)
def test_emulated_fp64_matches_reference(emulator, name, launch, shape32, shape64, mode, shift):
    """float64 against the readable oracle at 1e-10, with ragged, infeasible, NaN and dead rows."""
    case = make_case(*shape64, mode, shift, dtype=torch.float64, infeasible_row=True, nan_row=shape64[0] > 2,
                     dead_row=True, seed=3)
    expected = run_reference(*case, mode, shift, True)
    actual = emulate(emulator, *case, mode, shift, True, seed=11, **launch)
    assert_same_outputs(actual, expected, True, tolerances(torch.float64), f"{name} mode {mode} shift {shift}")


@pytest.mark.parametrize("mode,shift", MODES, ids=MODE_IDS)
def test_emulated_without_grad_keeps_the_table(emulator, mode, shift):
    case = make_case(5, 90, 40, mode, shift, dtype=torch.float64, infeasible_row=True, nan_row=True, dead_row=True,
                     seed=3)
    expected = run_reference(*case, mode, shift, False)
    actual = emulate(emulator, *case, mode, shift, False, threads=32, vt=1, cluster=2)
    assert_same_outputs(actual, expected, False, tolerances(torch.float64), "need_grad=False")
    assert torch.equal(actual[1], case[0])
    assert_bitwise(actual[2:], case[1:2], "special")


@pytest.mark.parametrize("mode", [PRESERVE, STANDARD])
@pytest.mark.parametrize("B,T,U", [(1, 1, 0), (1, 1, 1), (2, 1, 0), (2, 3, 0), (1, 0, 0), (2, 2, 3), (1, 5, 5)])
def test_emulated_tiny_rows(emulator, mode, B, T, U):
    """T = 1, U = 0, T = 0, U > T (infeasible), T = U."""
    case = make_case(B, T, U, mode, dtype=torch.float64, ragged=False)
    expected = run_reference(*case, mode, -1, True)
    for launch in (dict(threads=32, vt=1), dict(cluster=2, threads=32, vt=1, stages=4)):
        actual = emulate(emulator, *case, mode, -1, True, **launch)
        assert_same_outputs(actual, expected, True, tolerances(torch.float64), f"B={B} T={T} U={U} {launch}")


def test_emulated_bitwise_across_schedules_and_launches(emulator):
    """Every cell is computed by the same arithmetic whatever the launch shape, and the posterior sums
    have a fixed order: any schedule, prefetch depth, warp count or cluster size gives identical bits."""
    for mode, shift in [(STANDARD, -1), (PRESERVE, 9)]:
        case = make_case(3, 70, 30, mode, shift, infeasible_row=True, nan_row=True)
        first = emulate(emulator, *case, mode, shift, True, threads=32, vt=1, lazy=False, preempt=0)
        for i, launch in enumerate([dict(threads=64, vt=1, stages=8), dict(threads=32, vt=2, stages=4),
                                    dict(cluster=2, threads=32, vt=1), dict(cluster=4, threads=32, vt=1),
                                    dict(cluster=8, threads=32, vt=1, stages=2), dict(threads=32, vt=8)]):
            again = emulate(emulator, *case, mode, shift, True, seed=100 + i, preempt=300, **launch)
            assert_bitwise(again, first, f"mode {mode} {launch}")


def test_emulated_table_narrower_than_band_gives_nan(emulator):
    """The CPU op rejects a table narrower than a row's band; the GPU cannot raise without a host sync,
    so the row's loss and posteriors become NaN, and nothing is read or written out of bounds."""
    case = make_case(2, 30, 10, PRESERVE, ragged=False, width=4)  # the band needs 10 columns
    nll, table, special = emulate(emulator, *case, PRESERVE, -1, True)
    assert nll.isnan().all() and table.isnan().all() and special.isnan().all()
    # a band of exactly the launch's capacity (64 slots) runs; one more slot than that is NaN
    for T, U, expect_nan in [(126, 63, False), (128, 64, True)]:
        case = make_case(1, T, U, PRESERVE, ragged=False, dtype=torch.float64)
        for launch in (dict(threads=64, vt=1), dict(cluster=2, threads=32, vt=1)):
            nll, _, _ = emulate(emulator, *case, PRESERVE, -1, False, **launch)
            assert bool(nll.isnan().all()) == expect_nan, (U, launch, nll)


# ---------------------------------------------------------------------------------------------
# GPU: the compiled kernel (marked gpu; the conftest skips these without a CUDA device)
# ---------------------------------------------------------------------------------------------

def _require_cuda_kernel():
    from mdlm_ctc import backends

    if not backends._has_kernel("CUDA"):
        reason = backends._EXTENSION_ERROR or "mdlm_ctc._C was built without CUDA kernels"
        pytest.skip(f"no CUDA kernel for mdlm_ctc_C::lattice_band ({reason})")


def _gpu(case):
    return [x.cuda() for x in case]


@pytest.mark.gpu
@pytest.mark.parametrize("mode,shift", GPU_MODES, ids=["preserve", "standard", "max_shift5", "max_shift0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_matches_reference_and_cpu_op(mode, shift, dtype):
    _require_cuda_kernel()
    for B, T, U in [(4, 40, 17), (3, 200, 120), (2, 64, 8)]:
        case = make_case(B, T, U, mode, shift, dtype=dtype, infeasible_row=True, nan_row=B > 2, dead_row=True)
        for need_grad in (True, False):
            actual = run_op(*_gpu(case), mode, shift, need_grad)
            reference = run_reference(*case, mode, shift, need_grad)
            assert_same_outputs(actual, reference, need_grad, tolerances(dtype), f"vs reference {B, T, U}")
            if _has_cpu_op():
                cpu = run_op(*case, mode, shift, need_grad)
                assert_same_outputs(actual, cpu, need_grad, tolerances(dtype), f"vs CPU op {B, T, U}")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [PRESERVE, STANDARD])
@pytest.mark.parametrize("B,T,U", [(1, 1, 0), (1, 1, 1), (3, 1, 0), (2, 4, 0), (1, 0, 0), (2, 2, 3)])
def test_gpu_tiny_rows(mode, B, T, U):
    _require_cuda_kernel()
    case = make_case(B, T, U, mode, dtype=torch.float64, ragged=False)
    actual = run_op(*_gpu(case), mode, -1, True)
    expected = run_reference(*case, mode, -1, True)
    assert_same_outputs(actual, expected, True, tolerances(torch.float64), f"B={B} T={T} U={U}")


@pytest.mark.gpu
@pytest.mark.parametrize("mode,T,U", [(PRESERVE, 8192, 7680), (PRESERVE, 8192, 4096), (STANDARD, 8192, 4096),
                                      (STANDARD, 8192, 7000)],
                         ids=["preserve-513", "preserve-4097", "standard-4097", "standard-1193"])
def test_gpu_long_rows(mode, T, U):
    """T = 8192 (SPEC §6 G3, and the widest band 4097, which takes the cluster path on Hopper) against
    the CPU op, and bitwise-equal to a launch without clusters."""
    _require_cuda_kernel()
    if not _has_cpu_op():
        pytest.skip("mdlm_ctc._C (CPU kernels) is not built")
    case = make_case(2, T, U, mode, ragged=True)
    actual = run_op(*_gpu(case), mode, -1, True)
    cpu = run_op(*case, mode, -1, True)
    assert_same_outputs(actual, cpu, True, dict(atol=1e-4, rtol=1e-4), f"T={T} U={U}")
    old = os.environ.get("MDLM_CTC_CUDA_CLUSTER")
    os.environ["MDLM_CTC_CUDA_CLUSTER"] = "0"
    try:
        single = run_op(*_gpu(case), mode, -1, True)
    finally:
        if old is None:
            del os.environ["MDLM_CTC_CUDA_CLUSTER"]
        else:
            os.environ["MDLM_CTC_CUDA_CLUSTER"] = old
    assert_bitwise(actual, single, "clusters vs one CTA per row")


@pytest.mark.gpu
@pytest.mark.parametrize("cluster", ["0", "2", "4", "8"])
@pytest.mark.parametrize("mode,shift", [(PRESERVE, -1), (STANDARD, -1), (PRESERVE, 300)])
def test_gpu_forced_cluster_launches_are_bitwise_equal(mode, shift, cluster, monkeypatch):
    _require_cuda_kernel()
    case = _gpu(make_case(3, 1200, 500, mode, shift, infeasible_row=True, nan_row=True))
    monkeypatch.setenv("MDLM_CTC_CUDA_CLUSTER", "0")
    expected = run_op(*case, mode, shift, True)
    monkeypatch.setenv("MDLM_CTC_CUDA_CLUSTER", cluster)
    actual = run_op(*case, mode, shift, True)
    assert_bitwise(actual, expected, f"MDLM_CTC_CUDA_CLUSTER={cluster}")
    if cluster == "0":
        assert_same_outputs(actual, run_reference(*case, mode, shift, True), True, dict(atol=1e-4, rtol=1e-4),
                            "vs reference")


@pytest.mark.gpu
def test_gpu_bitwise_deterministic():
    _require_cuda_kernel()
    for mode, T, U in [(PRESERVE, 2048, 1792), (STANDARD, 2048, 1024)]:
        case = _gpu(make_case(8, T, U, mode))
        first = run_op(*case, mode, -1, True)
        for _ in range(3):
            assert_bitwise(run_op(*case, mode, -1, True), first, f"mode {mode}")


@pytest.mark.gpu
def test_gpu_no_host_sync_and_graph_capture():
    """Lengths stay on the device (no sync), and the op can be captured in a CUDA graph."""
    _require_cuda_kernel()
    for mode in (PRESERVE, STANDARD):
        case = _gpu(make_case(4, 300, 120, mode, infeasible_row=True))
        expected = run_op(*case, mode, -1, True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            run_op(*case, mode, -1, True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        table, special = case[0].clone(), case[1].clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the capture
            torch.ops.mdlm_ctc_C.lattice_band(table.clone(), special.clone(), *case[2:], mode, -1, True)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        static_table, static_special = case[0].clone(), case[1].clone()
        with torch.cuda.graph(graph):
            nll = torch.ops.mdlm_ctc_C.lattice_band(static_table, static_special, *case[2:], mode, -1, True)
        static_table.copy_(case[0])
        static_special.copy_(case[1])
        graph.replay()
        torch.cuda.synchronize()
        assert_bitwise((nll, static_table, static_special), expected, "graph replay")


@pytest.mark.gpu
def test_gpu_matches_triton_lattice():
    _require_cuda_kernel()
    try:
        from mdlm_ctc.triton_kernels import slack_ctc
    except ImportError as error:
        pytest.skip(f"the Triton lattice is not importable ({error})")
    for mode, shift in GPU_MODES:
        case = _gpu(make_case(4, 300, 140, mode, shift, infeasible_row=True, nan_row=True))
        actual = run_op(*case, mode, shift, True)
        table, special = case[0].clone(), case[1].clone()
        nll = slack_ctc.lattice_band(table, special, *case[2:], mode, shift, True)
        assert_same_outputs(actual, (nll, table, special), True, dict(atol=1e-4, rtol=1e-4), f"mode {mode}")


@pytest.mark.gpu
@pytest.mark.parametrize("collapse,max_shift", [("preserve", None), ("standard", None), ("preserve", 3)])
def test_gpu_end_to_end_loss(collapse, max_shift):
    """slack_ctc_loss(backend="cuda") (Triton vocabulary and gradient passes around the CUDA lattice)
    against the float64 reference, loss and gradient."""
    import mdlm_ctc

    if "cuda" not in mdlm_ctc.available_backends("cuda"):
        pytest.skip(f"backend 'cuda' is not available here: {mdlm_ctc.available_backends('cuda')}")
    g = torch.Generator(device="cuda").manual_seed(0)
    B, T, U, Vb = 4, 96, 40, 300
    logits = torch.randn(B, T, Vb, generator=g, device="cuda") * 2
    targets = torch.randint(1, Vb, (B, U), generator=g, device="cuda")
    T_b = torch.tensor([T, T - 5, 60, 30], device="cuda")
    U_b = torch.tensor([U, 33, 20, 12], device="cuda")
    kwargs = dict(slack_id=0, input_lengths=T_b, collapse=collapse, max_shift=max_shift, reduction="sum")
    x = logits.clone().requires_grad_(True)
    loss = mdlm_ctc.slack_ctc_loss(x, targets, U_b, backend="cuda", **kwargs)
    loss.backward()
    x64 = logits.double().clone().requires_grad_(True)
    ref = mdlm_ctc.slack_ctc_loss(x64, targets, U_b, backend="reference", **kwargs)
    ref.backward()
    assert_close_report(loss, ref, atol=1e-3, rtol=1e-5, what="loss")
    assert_close_report(x.grad, x64.grad, atol=1e-5, rtol=1e-4, what="gradient")
