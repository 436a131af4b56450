"""Mutation suite of the CUDA lattice's synchronisation: planted bugs the emulated tests must catch.

Each mutation is one small edit of ``csrc/lattice_cuda.cuh`` applied to a temporary copy of ``csrc/``;
the emulator (``csrc/lattice_cuda_emulator.h``) is built from that copy and run on emulated cases that
cross warp and CTA boundaries. A mutation is caught when the emulator reports a violation (data race,
cp.async read in flight, deadlock, exited CTA, shuffle mask) or the results leave the float64 oracle.
There is one (or more) per barrier, shuffle, DSMEM store and copy wait of the kernel, and for the shared
memory those order (edge cells, the stage ring's initial zeros), including the three bugs that a weaker
emulator let through: a CTA-local step barrier in a cluster, no final cluster sync, and edge cells
written into the buffer that the neighbours read. (The kernel has no memory fences.)

Every edit must match the source exactly once, so a kernel change that moves the code fails here
loudly instead of silently testing nothing. The unmutated source must pass every case.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
from dataclasses import dataclass

import pytest
import torch

import cuda_emulator
from mdlm_ctc.reference import PRESERVE, STANDARD
from test_slack_ctc_cuda import assert_same_outputs, make_case, run_reference

KERNEL = "lattice_cuda.cuh"

# (name, mode, B, T, U, launch): bands of 81 slots over two warps (ragged rows leave warps idle) or two
# CTAs of a cluster, with an infeasible, a NaN and a dead row
CASES = {
    "warps-preserve": (PRESERVE, 4, 160, 80, dict(threads=64, vt=2, stages=2)),
    "warps-standard": (STANDARD, 4, 160, 80, dict(threads=64, vt=2, stages=2)),
    "cluster-preserve": (PRESERVE, 3, 160, 80, dict(cluster=2, threads=32, vt=2, stages=2)),
    "cluster-standard": (STANDARD, 3, 160, 80, dict(cluster=2, threads=32, vt=2, stages=2)),
}
WARPS = ("warps-preserve", "warps-standard")
CLUSTER = ("cluster-preserve", "cluster-standard")


@dataclass(frozen=True)
class Mutation:
    name: str
    old: str
    new: str
    cases: tuple = WARPS + CLUSTER


STEP_WAIT = "    dev.template wait_prior<STAGES - 2>();  // this thread's copies for step n have landed\n"
STEP_BARRIER = "    step_barrier();  // everyone's have; step n - 1's edges are visible; stage (n - 1) % STAGES is free\n"
RING_ZERO = "  for (int i = tid; i < STAGES * stride; i += threads) dev.st(MDLM_SHARED_CAST(acc_t, stages) + i, acc_t(0));\n"
NAN_SCAN = ("  // A NaN emission anywhere in the row makes the row NaN (the vocabulary pass marks it in `special`).\n"
            "  bool nan = false;\n  for (int i = tid; i < T_b; i += threads) nan |= special[i] != special[i];\n"
            "  nan = dev.syncthreads_or(nan);\n")

MUTATIONS = [
    # barriers
    Mutation("cluster-step-barrier-made-cta-local",
             "    if (CLUSTER)\n      dev.cluster_sync();\n    else\n      dev.bar_sync(kStepBarrier, active);",
             "    dev.bar_sync(kStepBarrier, active);", CLUSTER),
    Mutation("final-cluster-sync-deleted", "  if (CLUSTER) dev.cluster_sync();\n", "", CLUSTER),
    Mutation("final-cluster-sync-made-cta-local", "  if (CLUSTER) dev.cluster_sync();\n",
             "  if (CLUSTER) dev.bar_sync(kStepBarrier, threads);\n", CLUSTER),
    Mutation("step-barrier-deleted", STEP_BARRIER, ""),
    Mutation("step-barrier-counts-exited-warps", "dev.bar_sync(kStepBarrier, active);",
             "dev.bar_sync(kStepBarrier, threads);", WARPS),
    Mutation("step-barrier-one-warp-short", "dev.bar_sync(kStepBarrier, active);",
             "dev.bar_sync(kStepBarrier, imax(kWarpSize, active - kWarpSize));", WARPS),
    Mutation("nan-scan-barrier-deleted", "  nan = dev.syncthreads_or(nan);\n", "", WARPS),
    # edge cells (the data the step barrier orders)
    Mutation("edges-written-into-the-buffer-being-read", "write_edges(n & 1, v, true);",
             "write_edges((n - 1) & 1, v, true);"),
    Mutation("initial-edges-not-written", "  write_edges(0, r, false);", "  //"),
    Mutation("row-end-edges-not-set", "      if (tid == 0 && (!CLUSTER || rank == 0 || parity == 0)) dev.st(edge(parity, a, 1, 0), NEG);\n", ""),
    Mutation("last-warp-edge-not-set",
             "      if (tid == active - 1 && (!CLUSTER || rank == csize - 1 || parity == 0)) dev.st(edge(parity, a, 0, warps + 1), NEG);\n",
             ""),
    # DSMEM pushes of the edge cells across a cluster boundary
    Mutation("cluster-edge-push-deleted", "      if (CLUSTER && remote && push) dev.st_remote(push_edge + at, x);\n", "", CLUSTER),
    Mutation("cluster-edge-pushed-into-the-buffer-being-read", "dev.st_remote(push_edge + at, x);",
             "dev.st_remote(push_edge + (edge_parity - parity * edge_parity) + a * edge_arr, x);", CLUSTER),
    Mutation("cluster-edge-pushed-onto-the-neighbours-own-cell",
             "edge_in(dev.map_remote(edges, rank - 1), 0, 0, 0, cta_warps + 1);",
             "edge_in(dev.map_remote(edges, rank - 1), 0, 0, 0, cta_warps);", CLUSTER),
    Mutation("cluster-edge-pushed-to-the-own-cta", "edge_in(dev.map_remote(edges, rank + 1), 0, 0, 1, 0);",
             "edge_in(dev.map_remote(edges, rank), 0, 0, 1, 0);", CLUSTER),
    # the stage ring's initial zeros (ordered before every copy by the NaN scan's barrier)
    Mutation("ring-not-zeroed", RING_ZERO, ""),
    Mutation("ring-zeroed-after-the-nan-scan-barrier", RING_ZERO + "\n" + NAN_SCAN, NAN_SCAN + RING_ZERO, WARPS),
    # copy waits
    Mutation("copy-wait-one-group-short", "wait_prior<STAGES - 2>()", "wait_prior<STAGES - 1>()", WARPS),
    Mutation("copy-wait-deleted", STEP_WAIT, "", WARPS),
    Mutation("copy-wait-after-the-step-barrier", STEP_WAIT + STEP_BARRIER,
             "    step_barrier();\n    dev.template wait_prior<STAGES - 2>();\n", WARPS),
    Mutation("prefetch-into-the-stage-being-read", "    if (n + STAGES - 1 <= T_b) stage_step(n + STAGES - 1);",
             "    if (n + STAGES <= T_b) stage_step(n + STAGES);", WARPS),
    Mutation("copy-commit-deleted-in-the-loop", "    dev.commit();\n\n    // neighbours", "\n    // neighbours", WARPS),
    # shuffles
    Mutation("left-neighbour-shuffled-down", "acc_t left = dev.shfl_up(kFullMask, r[a][VT - 1], 1);",
             "acc_t left = dev.shfl_down(kFullMask, r[a][VT - 1], 1);", WARPS),
    Mutation("shuffle-up-without-lane-31", "acc_t left = dev.shfl_up(kFullMask, r[a][VT - 1], 1);",
             "acc_t left = dev.shfl_up(0x7fffffffu, r[a][VT - 1], 1);", WARPS),
    Mutation("shuffle-down-half-mask", "acc_t right = dev.shfl_down(kFullMask, r[a][0], 1);",
             "acc_t right = dev.shfl_down(0x0000ffffu, r[a][0], 1);", WARPS),
    Mutation("shuffle-down-by-two", "acc_t right = dev.shfl_down(kFullMask, r[a][0], 1);",
             "acc_t right = dev.shfl_down(kFullMask, r[a][0], 2);", WARPS),
    Mutation("posterior-butterfly-one-round-short", "offset > 0; offset /= 2) slack +=",
             "offset > 1; offset /= 2) slack +=", WARPS),
    Mutation("posterior-broadcast-from-lane-1", "lane == 0 ? *special : acc_t(0), 0)",
             "lane == 0 ? *special : acc_t(0), 1)", WARPS),
]


def _apply(source, mutation):
    count = source.count(mutation.old)
    assert count == 1, f"mutation {mutation.name}: the edit matches {count} places in {KERNEL} (must be 1)"
    return source.replace(mutation.old, mutation.new)


@pytest.fixture(scope="module")
def builds(tmp_path_factory, request):
    """{name: emulator library or the exception its build raised}; "original" is the unmutated source.
    Only the mutants of the tests this session runs are built (in parallel)."""
    compiler, why = cuda_emulator.compiler_or_skip_reason()
    if compiler is None:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("cuda_mutants")
    original = open(os.path.join(cuda_emulator.CSRC, KERNEL)).read()
    selected = {item.callspec.params["mutation"].name for item in request.session.items
                if hasattr(item, "callspec") and isinstance(item.callspec.params.get("mutation"), Mutation)}
    jobs = {"original": original}
    for mutation in MUTATIONS:
        if mutation.name in selected:
            jobs[mutation.name] = _apply(original, mutation)

    def build(name):
        csrc = root / name
        shutil.copytree(cuda_emulator.CSRC, csrc)
        (csrc / KERNEL).write_text(jobs[name])
        return cuda_emulator.library_path(str(csrc), units=cuda_emulator.SMALL, jobs=1)

    cuda_emulator.library_path(units=cuda_emulator.SMALL)  # the runtime, built once before the mutants
    results = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {name: pool.submit(build, name) for name in jobs}
        for name, future in futures.items():
            try:
                results[name] = cuda_emulator.load(future.result())
            except Exception as error:  # a mutant that does not compile is reported by its test
                results[name] = error
    return results


def _run_case(lib, case_name, seed):
    mode, B, T, U, launch = CASES[case_name]
    case = make_case(B, T, U, mode, dtype=torch.float32, infeasible_row=True, nan_row=True, dead_row=True, seed=5)
    expected = run_reference(*case, mode, -1, True)
    actual = cuda_emulator.emulate(lib, *case, mode, -1, True, seed=seed, **launch)
    assert_same_outputs(actual, expected, True, dict(atol=2e-3, rtol=2e-3), case_name)


def test_every_edit_matches_the_source_once():
    original = open(os.path.join(cuda_emulator.CSRC, KERNEL)).read()
    for mutation in MUTATIONS:
        assert _apply(original, mutation) != original


def test_unmutated_source_passes_every_case(builds):
    lib = builds["original"]
    if isinstance(lib, Exception):
        raise lib
    for i, name in enumerate(CASES):
        _run_case(lib, name, seed=i)


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_planted_bug_is_caught(builds, mutation):
    lib = builds[mutation.name]
    if isinstance(lib, Exception):
        pytest.fail(f"the mutant {mutation.name} does not compile (fix the edit): {lib}")
    outcomes = []
    for i, name in enumerate(mutation.cases):
        try:
            _run_case(lib, name, seed=i)
        except cuda_emulator.EmulatorError as error:
            outcomes.append(f"{name}: {error}")
            break
        except AssertionError as error:
            outcomes.append(f"{name}: wrong result ({str(error)[:160]})")
            break
        outcomes.append(f"{name}: passed")
    assert not outcomes[-1].endswith("passed"), (
        f"planted bug {mutation.name!r} passed every emulated case: {outcomes}")
