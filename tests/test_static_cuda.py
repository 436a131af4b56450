"""The static report of the CUDA lattice (benchmarks/static_cuda.py) runs and reads the compiled kernels, and
the synchronisation of every plan's compiled kernel is the one the design requires.

The report is built once for every SPEC §6 plan, fp32 and fp64, compiled for sm_90 (skipped where nvcc or
cuobjdump is absent). It asserts no performance figure; it does assert the barrier, fence, cluster, shuffle
and cp.async instructions of each kernel (PTX and SASS) against `required_sync`, so an edit of CudaDev's
inline PTX (which the host emulator never runs) fails CI.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("static_cuda", os.path.join(ROOT, "benchmarks", "static_cuda.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def static_cuda():
    return _load()


@pytest.fixture(scope="module")
def report(static_cuda):
    """(rows, flags, sync, rendered text) of every shape, fp32 and fp64."""
    nvcc, cuobjdump = static_cuda.find_tools()
    if nvcc is None or cuobjdump is None:
        pytest.skip(f"needs nvcc and cuobjdump (nvcc: {nvcc}, cuobjdump: {cuobjdump})")
    rows, flags, sync = static_cuda.build_report(static_cuda.SHAPES, ["fp32", "fp64"], nvcc, cuobjdump)
    return rows, flags, sync, static_cuda.render(rows, flags, nvcc, cuobjdump, sync)


def test_step_loop_is_the_loop_holding_the_barrier_and_the_cells(static_cuda):
    sass = [
        (0x00, "MOV R1, c[0x0][0x28]"),
        (0x10, "FADD R2, R3, R4"),            # a loop without the barrier
        (0x20, "@P0 BRA 0x10"),
        (0x30, "BAR.SYNC.DEFER_BLOCKING 0x1, R5"),
        (0x40, "MUFU.EX2 R6, R6"),
        (0x50, "SHFL.UP PT, R7, R8, 0x1, RZ"),
        (0x60, "@P1 BRA 0x30"),
        (0x70, "EXIT"),
    ]
    body = static_cuda.step_loop(sass, cluster=False)
    assert body == [text for _, text in sass[3:7]]
    counts = static_cuda.classify(body)
    assert counts["total"] == 4 and counts["mufu"] == 1 and counts["shfl"] == 1 and counts["branches"] == 1
    assert static_cuda.step_loop(sass, cluster=True) is None  # no cluster barrier in it


# A cluster kernel's PTX and SASS in miniature: what the design requires, and edits of it.
PTX = """
.visible .entry _ZN8mdlm_ctc12cuda_lattice17recurrence_kernelIfLi0ELi1ELi2ELb1EEEvNS0_16RecurrenceParamsIT_NS0_6RawPtrEEE(
{
\tbar.red.or.pred \t%p2, 0, %p1;
\tmapa.u64 \t%rd206, %rd205, %r323;
\tcp.async.ca.shared.global [%r1019], [%rd522], 4;
\tcp.async.commit_group;
\tcp.async.wait_group 0;
\tbarrier.cluster.arrive.aligned;
\tbarrier.cluster.wait.aligned;
\tmov.u32 \t%r613, 0;
\tmov.u32 \t%r614, 1;
\tmov.u32 \t%r615, -1;
\tshfl.sync.up.b32 \t%r108|%p5, %r1206, %r614, %r613, %r615;
\tmov.u32 \t%r616, 31;
\tshfl.sync.down.b32 \t%r109|%p6, %r1207, %r614, %r616, %r615;
}
"""
SASS = ["BAR.RED.OR.DEFER_BLOCKING 0x0, P1", "LDGSTS.E [R3+0x4], desc[UR4][R4.64]", "LDGDEPBAR", "DEPBAR.LE SB0, 0x0",
        "MEMBAR.ALL.GPU", "ERRBAR", "CGAERRBAR", "UCGABAR_ARV", "UCGABAR_WAIT", "CCTL.IVALL",
        "BAR.SYNC.DEFER_BLOCKING 0x0", "@!P0 SHFL.UP PT, R3, R2, 0x1, RZ", "SHFL.DOWN PT, R5, R4, 0x1, 0x1f",
        "WARPSYNC.ALL", "BSSY B0, 0x3a0"]
KEY = ("recurrence", "float", 0, 1, 2, True)


def _check(static_cuda, ptx=PTX, sass=SASS):
    parsed_ptx = next(iter(static_cuda.parse_ptx_sync(ptx).values()))
    parsed_sass = next(iter(static_cuda.parse_sass_sync({"k": [(i, s) for i, s in enumerate(sass)]}).values()))
    return static_cuda.check_sync(KEY, parsed_ptx, parsed_sass)


def test_sync_check_accepts_the_design_and_rejects_each_edit(static_cuda):
    assert _check(static_cuda) == []
    relaxed = PTX.replace("arrive.aligned", "arrive.relaxed.aligned")
    no_release = [s for s in SASS if s not in ("MEMBAR.ALL.GPU", "ERRBAR", "CGAERRBAR")]
    assert "PTX lacks `barrier.cluster.arrive.aligned`" in _check(static_cuda, relaxed, no_release)
    assert any("MEMBAR.ALL.GPU" in p for p in _check(static_cuda, sass=no_release))
    assert "PTX lacks `barrier.cluster.wait.aligned`" in _check(static_cuda, PTX.replace(
        "\tbarrier.cluster.wait.aligned;\n", ""))
    assert any("fence.acq_rel.cluster" in p for p in _check(static_cuda, PTX.replace(
        "\tbarrier.cluster.arrive.aligned;\n", "\tfence.acq_rel.cluster;\n\tbarrier.cluster.arrive.aligned;\n")))
    assert any("wait_group 1" in p for p in _check(static_cuda, PTX.replace("wait_group 0", "wait_group 1")))
    assert any("shfl.sync.up.b32 1, 0, 0x7fffffff" in p for p in _check(static_cuda, PTX.replace(
        "%r615, -1;", "%r615, 2147483647;")))
    assert any("bar.red.and" in p for p in _check(static_cuda, PTX.replace("bar.red.or", "bar.red.and")))
    # an arrive without its wait in the SASS (e.g. a wait on another path) does not pair up
    assert any("pair up" in p for p in _check(static_cuda, sass=SASS + ["UCGABAR_ARV"]))


def test_static_report_runs_for_every_plan(report):
    rows, _, _, text = report
    assert "commit:" in text and "nvcc:" in text
    for name in ("G1", "G2-preserve", "G2-standard", "G3", "wide-preserve", "wide-standard"):
        lines = [line for line in text.splitlines() if line.startswith(f"| {name} ") and line.count("|") == 17]
        assert len(lines) == 2, (name, text)  # fp32 and fp64
        for line in lines:
            cells = [c.strip() for c in line.strip("|").split("|")]
            plan, regs, spills, smem, ctas, warps, instructions = cells[4:11]
            assert re.fullmatch(r"\d x \d+ x \d, [24]", plan), plan
            assert int(regs) > 0 and re.fullmatch(r"\d+/\d+", spills) and int(smem) > 0 and int(ctas) >= 1
            assert 20 < int(instructions) < 5000, instructions  # the step loop was found, not the whole kernel
    assert "## Synchronisation of the compiled kernels" in text


def test_every_plans_kernel_has_the_synchronisation_the_design_requires(report, static_cuda):
    rows, _, sync, _ = report
    planned = {("recurrence", *row["key"]) for row in rows if row["key"] is not None}
    assert planned and planned <= set(sync), "every plan's kernel is checked"
    assert {key[0] for key in sync} == {"recurrence", "posterior"}
    problems = {key: p for key, (ptx, sass) in sync.items() if (p := static_cuda.check_sync(key, ptx, sass))}
    assert problems == {}, problems
    # the cluster plans keep the cluster barrier's release (PTX default, MEMBAR in SASS) and acquire
    clusters = [key for key in sync if key[0] == "recurrence" and key[5]]
    assert clusters, "the report has cluster plans"
    for key in clusters:
        ptx, sass = sync[key]
        assert ptx["barrier.cluster.arrive.aligned"] == ptx["barrier.cluster.wait.aligned"] > 0
        assert sass["MEMBAR.ALL.GPU"] == sass["UCGABAR_ARV"] > 0
    assert isinstance(sync[clusters[0]][0], collections.Counter)
