"""Mutation suite of the CUDA lattice's synchronisation: planted bugs the tests must catch.

Each mutation is one small edit of a kernel source (``csrc/lattice_cuda.cuh``, the kernel code, or
``csrc/lattice_cuda_kernels.cuh``, the device-only execution model CudaDev) applied to a temporary copy of
``csrc/``, and one of two checks must catch it:

* ``emulator``: the host emulator (``csrc/lattice_cuda_emulator.h``) is built from that copy and run on
  emulated cases that cross warp and CTA boundaries; caught when it reports a violation (data race, cp.async
  read in flight, deadlock, exited or not yet started CTA, shuffle mask, uninitialised or out-of-range
  memory, warp-divergent barrier) or the results leave the float64 oracle;
* ``static``: the edit is in device-only code, which the emulator never runs (inline PTX, intrinsics): the
  kernels are compiled for sm_90 from that copy and their barrier, fence, cluster, shuffle and cp.async
  instructions compared with the design's list (benchmarks/static_cuda.py, ``check_sync``).

The kinds: every barrier, shuffle, DSMEM store and copy wait of the kernel and the shared memory they
order (``sync``); memory-ordering semantics that exist only in the device code path (``device``); global
memory accesses, which only a checked pointer sees (``global``); the start of a cluster, before which no
CTA may touch another's shared memory (``cluster-start``); and sites a reviewer planting bugs
independently would pick: stage ring indexing, stage buffers read early, mask sources, emission reads
across the step barrier, copy ownership (``adversarial``).

Every edit must match its source exactly once, so a kernel change that moves the code fails here loudly
instead of silently testing nothing. The unmutated sources must pass every case and the static check.
Builds are cached by content (tests/cuda_emulator.py), two at a time.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import shutil
from dataclasses import dataclass

import pytest
import torch

import cuda_emulator
from mdlm_ctc.reference import PRESERVE, STANDARD
from test_slack_ctc_cuda import assert_same_outputs, make_case, run_reference

KERNEL = "lattice_cuda.cuh"
DEVICE = "lattice_cuda_kernels.cuh"

# (name, mode, B, T, U, launch, rows): bands of 81 slots over two warps (ragged rows leave warps idle) or two
# CTAs of a cluster, with a dead (row 0), a NaN (row 1), a normal and an infeasible (last) row; two
# full-width rows (whose 128 slots per frame reach past the store's row of 81); and a band of 161 slots over
# two CTAs of two warps each
ODD_ROWS = dict(infeasible_row=True, nan_row=True, dead_row=True)
CASES = {
    "warps-preserve": (PRESERVE, 4, 160, 80, dict(threads=64, vt=2, stages=2), ODD_ROWS),
    "warps-standard": (STANDARD, 4, 160, 80, dict(threads=64, vt=2, stages=2), ODD_ROWS),
    "cluster-preserve": (PRESERVE, 4, 160, 80, dict(cluster=2, threads=32, vt=2, stages=2), ODD_ROWS),
    "cluster-standard": (STANDARD, 4, 160, 80, dict(cluster=2, threads=32, vt=2, stages=2), ODD_ROWS),
    "full-rows-preserve": (PRESERVE, 2, 160, 80, dict(threads=64, vt=2, stages=2), dict(ragged=False)),
    "cluster-2warps-preserve": (PRESERVE, 4, 320, 160, dict(cluster=2, threads=64, vt=2, stages=2), ODD_ROWS),
}
WARPS = ("warps-preserve", "warps-standard")
CLUSTER = ("cluster-preserve", "cluster-standard")
# the static check's kernels (the smallest of each kind; the design list is the same for every VT)
STATIC_KERNELS = [("float", PRESERVE, 1, 2, False), ("float", STANDARD, 1, 2, True)]
STATIC_POSTERIORS = [("float", PRESERVE)]


@dataclass(frozen=True)
class Mutation:
    name: str
    old: str
    new: str
    cases: tuple = WARPS + CLUSTER
    kind: str = "sync"
    file: str = KERNEL
    more: tuple = ()  # further (old, new) edits of the same file

    @property
    def check(self):
        return "static" if self.file == DEVICE else "emulator"


STEP_WAIT = "    dev.template wait_prior<STAGES - 2>();  // this thread's copies for step n have landed\n"
STEP_BARRIER = "    step_barrier();  // everyone's have; step n - 1's edges are visible; stage (n - 1) % STAGES is free\n"
RING_ZERO = "  for (int i = tid; i < STAGES * stride; i += threads) dev.st(MDLM_SHARED_CAST(acc_t, stages) + i, acc_t(0));\n"
NAN_SCAN = ("  // A NaN emission anywhere in the row makes the row NaN (the vocabulary pass marks it in `special`).\n"
            "  bool nan = false;\n  for (int i = tid; i < T_b; i += threads) nan |= special[i] != special[i];\n"
            "  nan = dev.syncthreads_or(nan);\n")
FRAME0_OWN = ("    if (end_lane)\n#pragma unroll\n"
              "      for (int a = 0; a < A; ++a) dev.st(own_edge + a * edge_arr, lane == 0 ? r[a][0] : r[a][VT - 1]);\n")
FRAME0_WARPS = "  } else {\n    write_edges(0, r);\n  }\n"
LOW_END = "      if (tid == 0 && (!CLUSTER || rank == 0 || parity == 0)) dev.st(edge(parity, a, 1, 0), NEG);\n"
HIGH_END = ("      if (tid == active - 1 && (!CLUSTER || rank == csize - 1 || parity == 0)) "
            "dev.st(edge(parity, a, 0, warps + 1), NEG);\n")
CLUSTER_SYNC_ASM = 'asm volatile("barrier.cluster.arrive.aligned;\\n\\tbarrier.cluster.wait.aligned;" ::: "memory");'

MUTATIONS = [
    # ---- sync: barriers, edge cells, DSMEM pushes, the ring's zeros, copy waits, shuffles ----
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
    Mutation("edges-written-into-the-buffer-being-read", "    write_edges(n & 1, v);",
             "    write_edges((n - 1) & 1, v);"),
    Mutation("initial-edges-not-written", FRAME0_OWN, "", ("cluster-2warps-preserve",)),
    Mutation("initial-edges-not-written-without-clusters", FRAME0_WARPS, "  }\n", WARPS),
    Mutation("row-end-edges-not-set", LOW_END, ""),
    Mutation("last-warp-edge-not-set", HIGH_END, ""),
    Mutation("cluster-edge-push-deleted", "      if (CLUSTER && push) dev.st_remote(push_edge + at, x);\n", "", CLUSTER),
    Mutation("cluster-edge-pushed-into-the-buffer-being-read", "dev.st_remote(push_edge + at, x);",
             "dev.st_remote(push_edge + (edge_parity - parity * edge_parity) + a * edge_arr, x);", CLUSTER),
    Mutation("cluster-edge-pushed-onto-the-neighbours-own-cell",
             "edge_in(dev.map_remote(edges, rank - 1), 0, 0, 0, cta_warps + 1);",
             "edge_in(dev.map_remote(edges, rank - 1), 0, 0, 0, cta_warps);", CLUSTER),
    Mutation("cluster-edge-pushed-to-the-own-cta", "edge_in(dev.map_remote(edges, rank + 1), 0, 0, 1, 0);",
             "edge_in(dev.map_remote(edges, rank), 0, 0, 1, 0);", CLUSTER),
    Mutation("ring-not-zeroed", RING_ZERO, ""),
    Mutation("ring-zeroed-after-the-nan-scan-barrier", RING_ZERO + "\n" + NAN_SCAN, NAN_SCAN + RING_ZERO, WARPS),
    Mutation("copy-wait-one-group-short", "wait_prior<STAGES - 2>()", "wait_prior<STAGES - 1>()", WARPS),
    Mutation("copy-wait-deleted", STEP_WAIT, "", WARPS),
    Mutation("copy-wait-after-the-step-barrier", STEP_WAIT + STEP_BARRIER,
             "    step_barrier();\n    dev.template wait_prior<STAGES - 2>();\n", WARPS),
    Mutation("prefetch-into-the-stage-being-read", "    if (n + STAGES - 1 <= T_b) stage_step(n + STAGES - 1);",
             "    if (n + STAGES <= T_b) stage_step(n + STAGES);", WARPS),
    Mutation("copy-commit-deleted-in-the-loop", "    dev.commit();\n\n    // neighbours", "\n    // neighbours", WARPS),
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

    # ---- device: memory-ordering semantics only the device code path has (CudaDev's PTX, intrinsics) ----
    Mutation("cluster-barrier-arrive-relaxed", CLUSTER_SYNC_ASM,
             CLUSTER_SYNC_ASM.replace("arrive.aligned", "arrive.relaxed.aligned"), kind="device", file=DEVICE),
    Mutation("cluster-barrier-without-wait", CLUSTER_SYNC_ASM,
             CLUSTER_SYNC_ASM.replace("\\n\\tbarrier.cluster.wait.aligned;", ""), kind="device", file=DEVICE),
    Mutation("cluster-barrier-acquire-by-fence-only", CLUSTER_SYNC_ASM,
             CLUSTER_SYNC_ASM.replace("barrier.cluster.arrive.aligned;\\n\\tbarrier.cluster.wait.aligned;",
                                      "fence.acq_rel.cluster;"), kind="device", file=DEVICE),
    Mutation("step-barrier-arrive-without-wait", 'asm volatile("bar.sync %0, %1;"',
             'asm volatile("bar.arrive %0, %1;"', kind="device", file=DEVICE),
    Mutation("copy-wait-leaves-one-more-group", 'asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");',
             'asm volatile("cp.async.wait_group %0;" ::"n"(N + 1) : "memory");', kind="device", file=DEVICE),
    Mutation("copy-commit-is-a-no-op", 'asm volatile("cp.async.commit_group;" ::: "memory");', "",
             kind="device", file=DEVICE),
    Mutation("nan-scan-reduces-with-and", "return __syncthreads_or(pred) != 0;",
             "return __syncthreads_and(pred) != 0;", kind="device", file=DEVICE),
    Mutation("device-shuffle-up-is-down", "return __shfl_up_sync(mask, v, delta);",
             "return __shfl_down_sync(mask, v, delta);", kind="device", file=DEVICE),
    Mutation("device-shuffle-drops-lane-31", "return __shfl_down_sync(mask, v, delta);",
             "return __shfl_down_sync(mask >> 1, v, delta);", kind="device", file=DEVICE),

    # ---- global: accesses only a checked pointer sees ----
    Mutation("posterior-special-read-by-every-lane",
             "const acc_t e_special = dev.shfl(kFullMask, lane == 0 ? *special : acc_t(0), 0);",
             "const acc_t e_special = *special;  // every lane; lane 0 overwrites it below", WARPS, kind="global"),
    Mutation("posterior-reads-the-next-lanes-emission", "+ row[j] + n[u - lo_t]",
             "+ row[imin<int64_t>(j + 1, W - 1)] + n[u - lo_t]", WARPS, kind="global"),
    Mutation("status-written-by-both-directions", "    if (dir == kAlpha && rank == 0 && tid == 0) {",
             "    if (rank == 0 && tid == 0) {", WARPS, kind="global"),
    Mutation("store-row-past-the-band", "        if (j0 + k < S_row) out[a][k] = v[a][k];",
             "        out[a][k] = v[a][k];", ("full-rows-preserve",) + WARPS, kind="global"),

    # ---- cluster-start: no CTA may touch another's shared memory before the first cluster barrier ----
    Mutation("start-of-cluster-fix-reverted", FRAME0_OWN, "    write_edges(0, r);\n", CLUSTER,  # as before issue 19
             kind="cluster-start", more=(("(!CLUSTER || rank == 0 || parity == 0)", "(!CLUSTER || rank == 0)"),
                                         ("(!CLUSTER || rank == csize - 1 || parity == 0)",
                                          "(!CLUSTER || rank == csize - 1)"))),
    Mutation("frame-0-pushed-as-well", FRAME0_OWN, "    write_edges(0, r);\n", CLUSTER, kind="cluster-start"),
    Mutation("frame-0-neighbour-cell-never-written", "(!CLUSTER || rank == 0 || parity == 0)",
             "(!CLUSTER || rank == 0)", CLUSTER, kind="cluster-start"),

    # ---- adversarial: other sites a reviewer would pick ----
    Mutation("step-reads-the-stage-being-prefetched", "    const Ptr<const acc_t> e = stage_emit(n);",
             "    const Ptr<const acc_t> e = stage_emit(n + 1);", WARPS, kind="adversarial"),
    Mutation("ring-indexed-modulo-stages-minus-one", "stages + (n & (STAGES - 1)) * layout.stage_bytes",
             "stages + (n % (STAGES - 1)) * layout.stage_bytes", WARPS, kind="adversarial"),
    Mutation("special-emission-read-from-the-previous-stage", "const acc_t e_special = dev.ld(e + stride - 1);",
             "const acc_t e_special = dev.ld(stage_emit(n - 1) + stride - 1);", WARPS, kind="adversarial"),
    Mutation("special-emission-copied-by-every-lane-0",
             "    if (tid == 0) {\n      if (unsigned(-first) < cols) dev.copy_async(e, row - first);\n"
             "      dev.copy_async(e + stride - 1, stage_special);\n    }",
             "    if (tid == 0 && unsigned(-first) < cols) dev.copy_async(e, row - first);\n"
             "    if (lane == 0) dev.copy_async(e + stride - 1, stage_special);", WARPS, kind="adversarial"),
    Mutation("skip-mask-filled-with-the-launch-stride", "for (int i = tid; i <= skip_hi + span; i += active)",
             "for (int i = tid; i <= skip_hi + span; i += threads)", ("warps-standard",), kind="adversarial"),
    Mutation("skip-mask-of-the-next-row", "p.skip + b * (p.U_max + 2)", "p.skip + (b ^ 1) * (p.U_max + 2)",
             ("warps-standard", "cluster-standard"), kind="adversarial"),
    Mutation("active-warps-not-rounded-to-a-warp", "int(round_up(needed, kWarpSize))", "needed", WARPS,
             kind="adversarial"),
    Mutation("edge-read-before-the-wait-of-its-step",
             STEP_WAIT + STEP_BARRIER,
             "    const acc_t early = dev.ld(next_edge + ((n - 1) & 1) * edge_parity);\n"
             "    (void)early;\n" + STEP_WAIT + STEP_BARRIER, WARPS, kind="adversarial"),
]


def _apply(sources, mutation):
    """{file: text} with the mutation's edits applied (each must match its file exactly once)."""
    out = dict(sources)
    for old, new in ((mutation.old, mutation.new), *mutation.more):
        count = out[mutation.file].count(old)
        assert count == 1, f"mutation {mutation.name}: an edit matches {count} places in {mutation.file} (must be 1)"
        out[mutation.file] = out[mutation.file].replace(old, new)
    return out


def _sources():
    return {name: open(os.path.join(cuda_emulator.CSRC, name)).read() for name in (KERNEL, DEVICE)}


def _static_module():
    path = os.path.join(cuda_emulator.ROOT, "benchmarks", "static_cuda.py")
    spec = importlib.util.spec_from_file_location("static_cuda", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _static_problems(static, csrc):
    """The static check of the kernels compiled from `csrc`: {kernel: [differences from the design]}."""
    compiled = static.compile_sync(STATIC_KERNELS, STATIC_POSTERIORS, csrc=csrc)
    return {key: problems for key, (ptx, sass) in compiled.items() if (problems := static.check_sync(key, ptx, sass))}


@pytest.fixture(scope="module")
def builds(tmp_path_factory, request):
    """{name: emulator library, static problems, or the exception its build raised}; "original" (emulator)
    and "original-static" are the unmutated sources. Only the mutants of the tests this session runs are
    built, two at a time (cached by content)."""
    compiler, why = cuda_emulator.compiler_or_skip_reason()
    if compiler is None:
        pytest.skip(why)
    static = _static_module()
    have_nvcc = None not in static.find_tools()
    root = tmp_path_factory.mktemp("cuda_mutants")
    sources = _sources()
    selected = {item.callspec.params["mutation"].name for item in request.session.items
                if hasattr(item, "callspec") and isinstance(item.callspec.params.get("mutation"), Mutation)}
    jobs = {"original": ("emulator", sources)}
    if have_nvcc:
        jobs["original-static"] = ("static", sources)
    for mutation in MUTATIONS:
        if mutation.name in selected and (mutation.check == "emulator" or have_nvcc):
            jobs[mutation.name] = (mutation.check, _apply(sources, mutation))

    def build(name):
        check, texts = jobs[name]
        csrc = root / name
        shutil.copytree(cuda_emulator.CSRC, csrc)
        for file, text in texts.items():
            (csrc / file).write_text(text)
        if check == "static":
            return _static_problems(static, str(csrc))
        return cuda_emulator.library_path(str(csrc), units=cuda_emulator.SMALL, jobs=1)

    cuda_emulator.library_path(units=cuda_emulator.SMALL)  # the runtime, built once before the mutants
    results = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(build, name) for name in jobs}
        for name, future in futures.items():
            try:
                result = future.result()
                results[name] = cuda_emulator.load(result) if jobs[name][0] == "emulator" else result
            except Exception as error:  # a mutant that does not compile is reported by its test
                results[name] = error
    return results


def _run_case(lib, case_name, seed):
    mode, B, T, U, launch, rows = CASES[case_name]
    case = make_case(B, T, U, mode, dtype=torch.float32, seed=5, **rows)
    expected = run_reference(*case, mode, -1, True)
    actual = cuda_emulator.emulate(lib, *case, mode, -1, True, seed=seed, **launch)
    assert_same_outputs(actual, expected, True, dict(atol=2e-3, rtol=2e-3), case_name)


def test_every_edit_matches_the_source_once():
    sources = _sources()
    for mutation in MUTATIONS:
        assert _apply(sources, mutation)[mutation.file] != sources[mutation.file]
    assert len({m.name for m in MUTATIONS}) == len(MUTATIONS)


def test_unmutated_source_passes_every_case(builds):
    lib = builds["original"]
    if isinstance(lib, Exception):
        raise lib
    for i, name in enumerate(CASES):
        _run_case(lib, name, seed=i)


def test_unmutated_source_passes_the_static_check(builds):
    if "original-static" not in builds:
        pytest.skip("needs nvcc and cuobjdump")
    problems = builds["original-static"]
    if isinstance(problems, Exception):
        raise problems
    assert problems == {}, problems


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_planted_bug_is_caught(builds, mutation):
    if mutation.name not in builds:
        pytest.skip("a device-only mutant needs nvcc and cuobjdump")
    result = builds[mutation.name]
    if isinstance(result, Exception):
        pytest.fail(f"the mutant {mutation.name} does not build (fix the edit): {result}")
    if mutation.check == "static":
        assert result, f"device-only bug {mutation.name!r} passed the static check of the compiled kernels"
        return
    outcomes = []
    for i, name in enumerate(mutation.cases):
        try:
            _run_case(result, name, seed=i)
        except cuda_emulator.EmulatorError as error:
            assert error.code != 2, f"the emulator build lacks a launch shape: {error}"  # kBadConfig: not a catch
            outcomes.append(f"{name}: {error}")
            break
        except AssertionError as error:
            outcomes.append(f"{name}: wrong result ({str(error)[:160]})")
            break
        outcomes.append(f"{name}: passed")
    assert not outcomes[-1].endswith("passed"), (
        f"planted bug {mutation.name!r} passed every emulated case: {outcomes}")
