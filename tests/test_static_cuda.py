"""The static cost report of the CUDA lattice (benchmarks/static_cuda.py) runs and reads the compiled
kernel: one plan, fp32, compiled for sm_90 (skipped where nvcc or cuobjdump is absent). It checks that
the report finds the step loop and the resources; it asserts no performance figure."""

from __future__ import annotations

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


def test_step_loop_is_the_loop_holding_the_barrier_and_the_cells():
    static_cuda = _load()
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


def test_static_report_runs_for_one_plan(tmp_path):
    static_cuda = _load()
    nvcc, cuobjdump = static_cuda.find_tools()
    if nvcc is None or cuobjdump is None:
        pytest.skip(f"needs nvcc and cuobjdump (nvcc: {nvcc}, cuobjdump: {cuobjdump})")
    out = tmp_path / "static_cuda.md"
    assert static_cuda.main(["--shapes", "G1", "--dtypes", "fp32", "--out", str(out)]) == 0
    text = out.read_text()
    assert "commit:" in text and "nvcc:" in text
    rows = [line for line in text.splitlines() if line.startswith("| G1 ")]
    assert len(rows) == 1, text
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    plan, regs, spills, smem, ctas, warps, instructions = cells[4:11]
    assert re.fullmatch(r"1 x \d+ x \d, [24]", plan), plan
    assert int(regs) > 0 and re.fullmatch(r"\d+/\d+", spills) and int(smem) > 0 and int(ctas) >= 1
    assert 20 < int(instructions) < 5000, instructions  # the step loop was found, not the whole kernel
