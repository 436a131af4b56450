"""Launch planning of the CUDA lattice (``csrc/lattice_cuda_plan.h``), the pure host functions the launcher
in ``csrc/slack_ctc_cuda.cu`` calls, tested on CPU through the emulator's host build for every SPEC §6
shape, with a model of an H200 (132 SMs, 227 KiB of shared memory per CTA) and of where clusters fit.

The device model is the tests' own: the launcher asks cudaOccupancyMaxActiveClusters (which knows the
GPC placement) and cudaOccupancyMaxActiveBlocksPerMultiprocessor instead.
"""

from __future__ import annotations

import ctypes

import pytest

import cuda_emulator
from mdlm_ctc.reference import PRESERVE, STANDARD

H200_SMS = 132
H200_SMEM = 227 * 1024
H200_GPCS = [16] * 6 + [18] * 2  # 132 SMs; clusters live inside one GPC
FIELDS = ("cluster", "threads", "vt", "stages", "smem", "slots", "resident", "one_wave", "error")

# SPEC §6 shapes (and the wide band of issue 10): (id, mode, B, T, U)
SHAPES = [
    ("G1", PRESERVE, 8, 2048, 1792),
    ("G2-preserve", PRESERVE, 8, 2048, 1024),
    ("G2-standard", STANDARD, 8, 2048, 1024),
    ("G3", PRESERVE, 2, 8192, 7680),
    ("wide-T8192-U4096", PRESERVE, 2, 8192, 4096),
    ("wide-standard", STANDARD, 2, 8192, 4096),
    ("C1", STANDARD, 4, 2048, 1024),
    ("C2", PRESERVE, 4, 4096, 3968),
    ("over-one-cta", PRESERVE, 1, 32768, 16384),
]


def table_width(T, U):
    return min(U, T - U + 1)


def ctas_per_sm(threads, smem):
    return max(0, min(32, 2048 // threads, (228 * 1024) // (smem + 1024)))


def h200_resident(cluster, threads, smem, vt, stages, context):
    per_sm = ctas_per_sm(threads, smem)
    if cluster == 1:
        return per_sm * H200_SMS
    return sum(gpc * per_sm // cluster for gpc in H200_GPCS)


@pytest.fixture(scope="module")
def lib():
    compiler, why = cuda_emulator.compiler_or_skip_reason()
    if compiler is None:
        pytest.skip(why)
    return cuda_emulator.build(units=cuda_emulator.SMALL)


def plan(lib, W, mode, acc_bytes, B, dirs, *, U_max=None, sms=H200_SMS, smem=H200_SMEM, cluster_launch=True,
         cluster_code=True, forced=-1, resident=h200_resident):
    """The plan of a table of width W; U_max defaults to W (a full band, T = 2U)."""
    U_max = W if U_max is None else U_max
    out = (ctypes.c_int64 * len(FIELDS))()
    callback = cuda_emulator.RESIDENT_FN(resident)
    lib.mdlm_ctc_plan_lattice(W, U_max, mode, acc_bytes, B, dirs, sms, smem, int(cluster_launch), int(cluster_code), forced,
                              callback, None, out)
    return dict(zip(FIELDS, list(out)))


def smem_of(mode, acc_bytes, threads, vt, stages, U_max):
    arrays = 1 if mode == PRESERVE else 2
    edges = -(-(2 * arrays * 2 * (threads // 32 + 2) * acc_bytes) // 16) * 16  # a cell per warp, one per neighbour
    skip = -(-((U_max + 2 + threads * vt) * 4) // 16) * 16 if mode == STANDARD else 0  # padded by the CTA's slots
    stride = -(-(threads * vt + 3) // 4) * 4
    return edges + skip + stages * stride * acc_bytes


def check_invariants(lib, p, S, mode, acc_bytes, where, U_max=None):
    U_max = S - 1 if U_max is None else U_max
    assert p["error"] == 0, f"{where}: no plan: {p}"
    assert p["slots"] == S
    assert p["vt"] in (1, 2, 4, 8) and p["stages"] in (2, 4), p
    assert p["threads"] % 32 == 0 and 32 <= p["threads"] <= lib.mdlm_ctc_plan_launch_bounds(mode, p["vt"]), (
        f"{where}: {p['threads']} threads exceed the launch bounds of VT={p['vt']}")
    assert 1 <= p["cluster"] <= 8
    capacity = p["threads"] * p["vt"]
    assert p["cluster"] * capacity >= S, f"{where}: the plan holds {p['cluster'] * capacity} < {S} slots"
    # no idle CTA, and (one CTA) no warp without a useful slot
    assert (p["cluster"] - 1) * capacity < S, f"{where}: the last CTA of {p} holds no useful slot"
    if p["cluster"] == 1:
        assert (p["threads"] - 32) * p["vt"] < S, f"{where}: the last warp of {p} holds no useful slot"
    assert p["smem"] == smem_of(mode, acc_bytes, p["threads"], p["vt"], p["stages"], U_max) <= H200_SMEM


@pytest.mark.parametrize("acc_bytes", [4, 8], ids=["fp32", "fp64"])
@pytest.mark.parametrize("dirs", [1, 2], ids=["forward", "forward+backward"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_plan_of_every_spec_shape(lib, shape, dirs, acc_bytes):
    name, mode, B, T, U = shape
    W = table_width(T, U)
    S = W + 1
    p = plan(lib, W, mode, acc_bytes, B, dirs, U_max=U)
    check_invariants(lib, p, S, mode, acc_bytes, name, U_max=U)
    if S > 8192:
        assert p["cluster"] >= 2
    elif S > 2048:
        assert p["cluster"] >= 2, f"{name}: a band of {S} slots should be split over a cluster: {p}"
    else:
        assert p["cluster"] == 1
    assert p["one_wave"] == 1 and p["resident"] >= B * dirs, f"{name}: not one wave on an H200: {p}"
    # four stages of prefetch wherever they fit
    if smem_of(mode, acc_bytes, p["threads"], p["vt"], 4, U) <= H200_SMEM:
        assert p["stages"] == 4


@pytest.mark.parametrize("shape,expected", [
    (("G1", PRESERVE, 8, 2048, 1792), dict(cluster=1, threads=160, vt=2, stages=4)),
    (("G2", PRESERVE, 8, 2048, 1024), dict(cluster=1, threads=288, vt=4, stages=4)),
    (("G2-standard", STANDARD, 8, 2048, 1024), dict(cluster=1, threads=288, vt=4, stages=4)),
    (("G3", PRESERVE, 2, 8192, 7680), dict(cluster=1, threads=160, vt=4, stages=4)),
    (("wide", PRESERVE, 2, 8192, 4096), dict(cluster=5, threads=224, vt=4, stages=4)),
])
def test_plans_spelled_out(lib, shape, expected):
    """The plans the GPU check will measure, spelled out (so a change of rule is a visible diff)."""
    _, mode, B, T, U = shape
    p = plan(lib, table_width(T, U), mode, 4, B, 2, U_max=U)
    assert {k: p[k] for k in expected} == expected, p


@pytest.mark.parametrize("W", [100, 1025, 4097, 8191])
def test_no_cluster_code_or_support_falls_back_to_one_cta(lib, W):
    """A build without sm_90 code (its cluster kernels would trap on Hopper), a device without cluster
    launch, MDLM_CTC_CUDA_CLUSTER=0, or no cluster that can be scheduled: one CTA per row."""
    never = lambda cluster, threads, smem, vt, stages, ctx: 0 if cluster > 1 else 132  # noqa: E731
    for kwargs in (dict(cluster_code=False), dict(cluster_launch=False), dict(forced=0), dict(resident=never)):
        p = plan(lib, W, PRESERVE, 4, 2, 2, **kwargs)
        assert p["cluster"] == 1 and p["error"] == 0, (kwargs, p)
        check_invariants(lib, p, W + 1, PRESERVE, 4, str(kwargs))


def test_band_wider_than_one_cta_without_clusters_is_an_error(lib):
    assert plan(lib, 9000, PRESERVE, 4, 1, 1, cluster_code=False)["error"] == 1
    assert plan(lib, 8 * 8192, PRESERVE, 4, 1, 1)["error"] == 1  # more than 8 CTAs of 8192 slots
    p = plan(lib, 9000, PRESERVE, 4, 1, 1)
    assert p["error"] == 0 and p["cluster"] >= 2


def test_one_wave_check_uses_the_resident_clusters(lib):
    """Clusters are lowered while the B * directions clusters do not all fit at once."""
    W = 4097  # wants 5 CTAs of ~1024 slots
    roomy = plan(lib, W, PRESERVE, 4, 2, 2)
    assert roomy["cluster"] == 5 and roomy["one_wave"] == 1
    # a device that holds 3 clusters of 4 or more CTAs, 16 of 2 or 3
    few = lambda cluster, threads, smem, vt, stages, ctx: 1000 if cluster == 1 else (3 if cluster >= 4 else 16)  # noqa
    p = plan(lib, W, PRESERVE, 4, 4, 2, resident=few)
    assert p["cluster"] in (2, 3) and p["one_wave"] == 1, p
    check_invariants(lib, p, W + 1, PRESERVE, 4, "few clusters")
    # forced sizes are kept even if they take two waves
    p = plan(lib, W, PRESERVE, 4, 4, 2, resident=few, forced=8)
    assert p["cluster"] >= 4 and p["one_wave"] == 0, p


def test_forced_cluster_size(lib):
    for forced in (2, 4, 8):
        p = plan(lib, 1200, STANDARD, 4, 3, 2, forced=forced)
        check_invariants(lib, p, 1201, STANDARD, 4, f"forced {forced}")
        assert 2 <= p["cluster"] <= forced
    assert plan(lib, 200, PRESERVE, 4, 3, 2, forced=4)["cluster"] == 1  # S <= 256: one CTA


def test_small_shared_memory_takes_two_stages_or_fails(lib):
    W = 8191  # fp64 standard at 8192 slots: 4 stages need ~390 KiB, 2 ~196 KiB
    p = plan(lib, W, STANDARD, 8, 1, 1, cluster_code=False)
    assert p["error"] == 0 and p["stages"] == 2, p
    assert plan(lib, W, STANDARD, 8, 1, 1, cluster_code=False, smem=96 * 1024)["error"] == 1


def test_standard_skip_mask_counts_in_shared_memory(lib):
    """Standard CTC keeps the row's skip mask (4 (U_max + 2 + slots per CTA) bytes) in shared memory: a huge padded
    target length with a narrow band is refused with an error instead of overflowing it; preserve is
    not affected."""
    small = plan(lib, 100, STANDARD, 4, 2, 2, U_max=100)
    large = plan(lib, 100, STANDARD, 4, 2, 2, U_max=20000)
    assert small["error"] == 0 and large["error"] == 0
    assert large["smem"] - small["smem"] == smem_of(STANDARD, 4, 32, 1, 0, 20000) - smem_of(STANDARD, 4, 32, 1, 0, 100)
    assert plan(lib, 100, STANDARD, 4, 2, 2, U_max=100000)["error"] == 1
    assert plan(lib, 100, PRESERVE, 4, 2, 2, U_max=100000)["error"] == 0
