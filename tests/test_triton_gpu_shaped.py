"""The Triton kernels under the interpreter at the block sizes a GPU gets (``MDLM_CTC_TRITON_GPU_BLOCKS=1``):
4,096-wide vocabulary tiles (several per row), 512-1,024-slot band tiles, the boundary kernel's
[BLOCK_X, BLOCK_D] tiles, and the time-parallel scan with 75-150 chunks, as on the GPU path (137-293
at SPEC §6), at small T·V (the interpreter runs one program at a time: T·V is what costs). Plus strided logits for the gradient and a logits view whose element offsets
pass 2^31 (the int64 offset path), built over a mostly untouched buffer, and the windowed stages of the
fused LM head at these tiles. Oracles: autograd on the float64 reference and the reference stages. On a
GPU machine the same tests run compiled.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

import mdlm_ctc  # noqa: E402
from mdlm_ctc import backends  # noqa: E402
from mdlm_ctc.reference import (  # noqa: E402
    PRESERVE, STANDARD, column_band_width, emissions_reference, gradient_reference, lattice_band_reference,
    slack_ctc_reference)
from oracles import assert_close_report, assert_low_precision_close  # noqa: E402

from mdlm_ctc.triton_kernels import emissions as emissions_module  # noqa: E402
from mdlm_ctc.triton_kernels import grad as grad_module  # noqa: E402
from mdlm_ctc.triton_kernels import slack_ctc as lattice_module  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
SLACK = 3


@pytest.fixture(autouse=True)
def _gpu_blocks(monkeypatch):
    monkeypatch.setenv("MDLM_CTC_TRITON_GPU_BLOCKS", "1")


def make_case(B, T, U, V, *, T_b, U_b, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2).to(dtype)
    targets = torch.randint(4, V, (B, U), generator=g)
    targets[:, 5:9] = targets[:, 4:5]           # a run of repeats
    targets[:, 20:U:7] = targets[:, 19:20]      # a token spread along the row (links across band tiles)
    return (logits.to(DEVICE), targets.to(DEVICE), torch.tensor(T_b, device=DEVICE), torch.tensor(U_b, device=DEVICE))


def test_vocabulary_and_band_tiles_are_the_gpu_ones():
    assert not emissions_module.small_blocks()
    assert emissions_module.emissions_config(4500, 21, 2) == dict(BLOCK_V=2048, BLOCK_W=32, num_warps=8)
    assert grad_module.band_values_config(600)["BLOCK_B"] == 1024


@pytest.mark.parametrize("collapse,dtype", [("preserve", torch.bfloat16), ("standard", torch.float32)])
def test_end_to_end_at_gpu_block_sizes(collapse, dtype, monkeypatch):
    monkeypatch.setenv("MDLM_CTC_LATTICE_CHUNK", "2")
    B, T, U, V = 2, 12, 10, 4500                       # 2 vocabulary tiles of 4,096 (bf16) / 3 of 2,048 (fp32)
    logits, targets, T_b, U_b = make_case(B, T, U, V, T_b=[12, 11], U_b=[10, 7], dtype=dtype, seed=21)
    if collapse == "standard":
        U_b = torch.tensor([5, 4], device=DEVICE)
        targets[:, :5] = torch.tensor([7, 9, 7, 11, 9], device=DEVICE)  # no neighbours equal
    logits = logits.transpose(0, 1).contiguous().transpose(0, 1)  # strides on B and T
    weights = torch.rand(B, device=DEVICE)
    x = logits.clone().requires_grad_()
    nll = mdlm_ctc.slack_ctc_loss(x, targets, U_b, slack_id=SLACK, input_lengths=T_b, collapse=collapse,
                                  reduction="none", backend="triton")
    (nll * weights).sum().backward()
    refs = {}
    for name, ref_dtype in (("same", dtype), ("exact", torch.float64)):
        y = logits.detach().to(ref_dtype).clone().requires_grad_()
        ref = slack_ctc_reference(y, targets, U_b, slack_id=SLACK, input_lengths=T_b, collapse=collapse)
        (ref * weights.to(ref.dtype)).sum().backward()
        refs[name] = (ref.detach(), y.grad)
    if dtype == torch.float32:
        assert_close_report(nll, refs["exact"][0], atol=1e-3, rtol=1e-5, what="loss vs float64 reference")
        assert_close_report(x.grad, refs["exact"][1], atol=1e-5, rtol=1e-4, what="gradient vs float64 reference")
        assert_close_report(x.grad.sum(-1), torch.zeros_like(x.grad.sum(-1)), atol=1e-5, rtol=0, what="row sums")
    else:
        tiny = 4e-7 * float(refs["exact"][0].abs().max())
        assert_low_precision_close(nll, refs["same"][0], refs["exact"][0], what="loss", tiny=tiny)
        assert_low_precision_close(x.grad, refs["same"][1], refs["exact"][1], what="gradient", tiny=1e-3)


@pytest.mark.parametrize("mode,chunk_len", [(PRESERVE, 1), (STANDARD, 2), (PRESERVE, 15)])
def test_lattice_at_gpu_block_sizes_with_many_chunks(mode, chunk_len):
    B, T, U, V = 1, 140, 100, 16                       # 140, 70 and 10 chunks
    logits, targets, T_b, U_b = make_case(B, T, U, V, T_b=[140], U_b=[100], dtype=torch.float32, seed=22)
    if mode == STANDARD:
        targets = (torch.arange(U, device=DEVICE)[None, :].expand(B, U) % 12 + 4).contiguous()
        U_b = torch.tensor([50], device=DEVICE)
    W = max(int(column_band_width(T_b, U_b).max()), 1)
    _, table, special = emissions_reference(logits, targets, T_b, U_b, None, SLACK, -1, W, True)
    got_table, got_special = table.clone(), special.clone()
    nll = lattice_module.lattice_band(got_table, got_special, targets, T_b, U_b, mode, -1, True, chunk_len=chunk_len)
    want = lattice_band_reference(table, special, targets, T_b, U_b, mode, -1, True)
    assert_close_report(nll, want, atol=1e-3, rtol=1e-5, what="nll")
    # fp32 log space over 140 frames: a posterior's exponent carries ~ulp(|loglik|) of cancellation error
    assert_close_report(got_table, table, atol=5e-4, rtol=0, what="target posteriors")
    assert_close_report(got_special, special, atol=5e-4, rtol=0, what="special posteriors")


# (mode, T, U, T_b, U_b, chunk_len): bands of 2^k + 1 states, a tile of 2^k and the tail. Several tiles
# before the tail (S = 513 at D = 63) take minutes here; the small-block tests of test_slack_ctc_triton.py
# run that path (BLOCK_X = 1, tail 2).
TAIL_CASES = [
    (PRESERVE, 270, 128, [270, 200, 100], [128, 60, 128], 15),  # S = 129: sweep and boundary tiles of 128
    (STANDARD, 150, 64, [150, 120, 50], [64, 30, 64], 7),       # S = 129
]


@pytest.mark.parametrize("mode,T,U,T_b,U_b,chunk_len", TAIL_CASES)
def test_bands_of_two_to_the_k_plus_one_states(mode, T, U, T_b, U_b, chunk_len):
    """Frames whose band is one state wider than a power of two, at the GPU's blocks: the last tile of every
    sweep and boundary step takes the extra state (no nearly empty tile). Ragged rows and an infeasible
    one (U_b > T_b); oracles: the float64 reference lattice and the cpu backend's fp32 lattice."""
    B, V = len(T_b), 16
    logits, targets, T_b, U_b = make_case(B, T, U, V, T_b=T_b, U_b=U_b, dtype=torch.float32, seed=25)
    if mode == STANDARD:
        targets = (torch.arange(U, device=DEVICE)[None, :].expand(B, U) % 12 + 4).contiguous()
        targets[:, 30:34] = 7  # repeats: no skip between them
    W = max(int(column_band_width(T_b, U_b).max()), 1)
    S = W + 1 if mode == PRESERVE else 2 * W + 1
    configs = lattice_module.lattice_configs(T, W, mode, chunk_len)
    for kernel, key in (("_sweep_kernel", "BLOCK_S"), ("_boundary_kernel", "BLOCK_X")):
        block, tail = configs[kernel][key], configs[kernel]["TAIL"]
        assert (S - 1) % block == 0 and lattice_module.n_tiles(S, block, tail) == (S - 1) // block, (kernel, block)
    assert lattice_module.row_depth(T, U, S, mode, chunk_len)["widest"] == S  # the full row reaches 2^k + 1
    _, table, special = emissions_reference(logits, targets, T_b, U_b, None, SLACK, -1, W, True)
    got_table, got_special = table.clone(), special.clone()
    nll = lattice_module.lattice_band(got_table, got_special, targets, T_b, U_b, mode, -1, True, chunk_len=chunk_len)
    assert torch.isinf(nll[-1]) == (B > 1)
    exact_table, exact_special = table.double(), special.double()
    exact = lattice_band_reference(exact_table, exact_special, targets, T_b, U_b, mode, -1, True)
    assert_close_report(nll, exact, atol=1e-3, rtol=1e-5, what="nll vs float64 reference")
    assert_close_report(got_table, exact_table, atol=5e-4, rtol=0, what="target posteriors vs float64 reference")
    assert_close_report(got_special, exact_special, atol=5e-4, rtol=0, what="special posteriors vs float64 reference")
    assert backends.extension_loaded(), "the cpu backend (mdlm_ctc._C) is the fp32 oracle"
    cpu_table, cpu_special = table.cpu().clone(), special.cpu().clone()
    cpu_nll = backends.stages("cpu")[1](cpu_table, cpu_special, targets.cpu(), T_b.cpu(), U_b.cpu(), mode, -1, True)
    assert_close_report(nll, cpu_nll, atol=1e-3, rtol=1e-5, what="nll vs cpu backend (fp32)")
    # two fp32 lattices, each within 5e-4 of float64
    assert_close_report(got_table, cpu_table, atol=1e-3, rtol=0, what="target posteriors vs cpu backend")
    assert_close_report(got_special, cpu_special, atol=1e-3, rtol=0, what="special posteriors vs cpu backend")


def test_offsets_past_2_to_the_31():
    """A [2, 3, V] bf16 view whose second row starts 2^31 elements into its buffer: every kernel's pointer
    arithmetic must be int64 (the buffer is 4 GiB of address space, of which a few KB are touched)."""
    B, T, U, V = 2, 3, 2, 64
    stride_b = 2 ** 31 + V
    try:
        buffer = torch.empty(stride_b + T * V, dtype=torch.bfloat16, device=DEVICE)
    except RuntimeError as error:  # no address space for it
        pytest.skip(f"cannot reserve a 4 GiB buffer: {error}")
    logits = buffer.as_strided((B, T, V), (stride_b, V, 1))
    values, targets, T_b, U_b = make_case(B, T, U, V, T_b=[3, 3], U_b=[2, 1], dtype=torch.bfloat16, seed=23)
    targets[:, 5:9] = 0
    targets = targets[:, :U].clamp(min=4).contiguous()
    logits.copy_(values)
    assert logits.stride(0) * (B - 1) >= 2 ** 31
    x = logits.detach().requires_grad_()
    nll = mdlm_ctc.slack_ctc_loss(x, targets, U_b, slack_id=SLACK, input_lengths=T_b, reduction="none",
                                  backend="triton")
    nll.sum().backward()
    y = values.double().requires_grad_()
    ref = slack_ctc_reference(y, targets, U_b, slack_id=SLACK, input_lengths=T_b)
    ref.sum().backward()
    assert_close_report(nll, ref.detach(), atol=1e-5, rtol=1e-5, what="loss over the strided view")
    assert_close_report(x.grad.double(), y.grad, atol=1e-2, rtol=1e-2, what="gradient over the strided view")
    # the gradient pass written in place over the strided view itself
    W = max(int(column_band_width(T_b, U_b).max()), 1)
    lse, table, special = emissions_module.emissions(logits, targets, T_b, U_b, None, SLACK, -1, W, True)
    nll_again = lattice_module.lattice_band(table, special, targets, T_b, U_b, PRESERVE, -1, True)
    args = (torch.ones(B, device=DEVICE), logits, lse, targets, T_b, U_b, None, table, special, nll_again, SLACK, -1,
            False, True)
    want = gradient_reference(*args)
    grad_module.gradient(*args, out=logits)
    assert_close_report(logits.float(), want.float(), atol=1e-2, rtol=1e-2, what="in-place gradient over the view")
    del buffer, logits, x


def test_gradient_band_wider_than_one_gpu_tile():
    """A band of 1,030 slots (two 1,024-slot tiles of the band-values kernel) over an 8-token vocabulary:
    every token's run crosses the tile edge. Posteriors are synthetic (any table works for this stage);
    all frames but the ten widest are observed (zero gradient, no band work), to keep the interpreter fast."""
    B, T, U, V = 1, 2060, 1030, 8
    g = torch.Generator().manual_seed(24)
    logits = torch.randn(B, T, V, generator=g).to(DEVICE)
    targets = torch.randint(1, V, (B, U), generator=g).to(DEVICE)
    T_b, U_b = torch.tensor([T], device=DEVICE), torch.tensor([U], device=DEVICE)
    W = int(column_band_width(T_b, U_b).max())
    assert W > grad_module.band_values_config(W)["BLOCK_B"]
    lse = logits.logsumexp(-1)
    post_target = torch.rand(B, T, W, generator=g).to(DEVICE) / W
    post_special = torch.rand(B, T, generator=g).to(DEVICE)
    nll = torch.ones(B, device=DEVICE)
    observed = torch.zeros(B, T, dtype=torch.long, device=DEVICE)
    observed[:, 1024:1034] = -1  # frames 1025..1034: bands of 1,025..1,030 slots
    args = (torch.ones(B, device=DEVICE), logits, lse, targets, T_b, U_b, observed, post_target, post_special, nll,
            SLACK, -1, False, True)
    assert_close_report(grad_module.gradient(*args), gradient_reference(*args), atol=1e-6, rtol=1e-5,
                        what="gradient over a two-tile band")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_windows_at_gpu_block_sizes(dtype):
    """The windowed stages (the fused LM head's) at GPU tiles: windows of 5 frames cutting rows of 6, and
    vocabulary windows of 2,101 and 2,399 columns (several dense tiles, odd widths); the same bits as the
    whole-tensor passes, and the reference windows' values."""
    from mdlm_ctc.reference import emissions_window_reference, gradient_window_reference

    B, T, U, V = 2, 6, 4, 4500
    logits, targets, T_b, U_b = make_case(B, T, 12, V, T_b=[6, 5], U_b=[4, 2], dtype=dtype, seed=25)
    targets = targets[:, :U].contiguous()
    targets[0, 1:3] = targets[0, 0]
    observed = torch.full((B, T), -1, dtype=torch.long, device=DEVICE)
    observed[1, 3] = SLACK
    W = max(int(column_band_width(T_b, U_b).max()), 1)
    flat = logits.reshape(B * T, V)
    lse, table, special = emissions_module.emissions(logits, targets, T_b, U_b, observed, SLACK, -1, W, True)
    windows = [(0, 5), (5, 10), (10, 12)]
    for i, j in windows:
        got = emissions_module.emissions_window(flat[i:j], i, T, targets, T_b, U_b, observed, SLACK, -1, W, True)
        want = emissions_window_reference(flat[i:j], i, T, targets, T_b, U_b, observed, SLACK, -1, W, True)
        for name, a, whole, ref in zip(("lse", "table", "special"), got, (lse, table, special), want):
            assert torch.equal(a, whole.reshape(B * T, -1)[i:j].reshape(a.shape)), f"frames [{i}, {j}) {name} bits"
            assert_close_report(a, ref, atol=1e-4, rtol=1e-5, what=f"frames [{i}, {j}) {name}")
    nll = lattice_module.lattice_band(table, special, targets, T_b, U_b, PRESERVE, -1, True)
    grad_nll = torch.rand(B, device=DEVICE)
    whole = grad_module.gradient(grad_nll, logits, lse, targets, T_b, U_b, observed, table, special, nll, SLACK, -1,
                                 False, True).reshape(B * T, V)
    got = flat.clone()
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for i, j in windows:
        for v0, v1 in ((0, 2101), (2101, V)):
            rest = (lse.reshape(-1)[i:j], targets, T_b, U_b, observed, table.reshape(B * T, W)[i:j],
                    special.reshape(-1)[i:j], nll, SLACK, -1, False, True)
            want = torch.empty_like(flat[i:j, v0:v1])
            gradient_window_reference(grad_nll, flat[i:j, v0:v1], i, T, v0, V, *rest, want)
            tile = got[i:j, v0:v1]
            grad_module.gradient_window(grad_nll, tile, i, T, v0, V, *rest, tile)  # in place
            assert_close_report(tile, want, atol=tol, rtol=tol, what=f"gradient [{i}, {j}) x [{v0}, {v1})")
    assert torch.equal(got, whole), "windowed gradient bits"
