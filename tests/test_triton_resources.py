"""Every Triton kernel, at every config its launcher can choose, compiled for sm_90 without a GPU:
no register spills (CI fails on one), and the bandwidth-bound vocabulary passes at >= 32 resident
warps per SM at the SPEC §6 shapes (S2). ``mdlm_ctc.triton_kernels.resources`` records the
launchers' own launches on meta tensors and reads registers and spills from ``ptxas -v``;
``benchmarks/static_triton.py`` writes the same figures as a table.

The compiler runs in a subprocess without ``TRITON_INTERPRET`` (conftest.py sets it for the rest of
the suite). These are compile-time facts, not timings.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = """
import json
from mdlm_ctc.triton_kernels import resources
rows = []
spec = {w.name for w in resources.spec_workloads()}
for workload, launch in resources.choosable_launches():
    r = resources.resources(launch)
    rows.append(dict(workload=workload.name, spec=workload.name in spec, kernel=launch.name,
                     config=resources.describe(launch), regs=r.regs, spills=r.spills, stack=r.stack,
                     resident_warps=r.resident_warps, limiter=r.limiter))
print("JSON" + json.dumps(rows))
# the lattice cost model against the SASS of the SPEC plans and the benchmark's sweep (compiled above)
import sys
sys.path.insert(0, "benchmarks")
import static_triton
calibration = []
for workload, launch in [(w, la) for w in resources.spec_workloads() if not w.linear for la in resources.record(w)] \
        + resources.benchmark_launches():
    if launch.name in static_triton.MODELLED:
        counted = static_triton.sass_counts(launch)
        calibration.append(dict(workload=workload.name, kernel=launch.name, config=resources.describe(launch),
                                tile=counted["tile"], step=counted["step"], model=static_triton.model_tile(launch)))
print("CAL" + json.dumps(calibration))
"""


@pytest.fixture(scope="module")
def compiled():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, f"compiling the launchers' configs for sm_90 failed:\n{result.stderr[-4000:]}"
    line = next(line for line in result.stdout.splitlines() if line.startswith("JSON"))
    calibration = next(line for line in result.stdout.splitlines() if line.startswith("CAL"))
    return json.loads(line[4:]), json.loads(calibration[3:])


@pytest.fixture(scope="module")
def launch_resources(compiled):
    return compiled[0]


def test_every_kernel_is_covered(launch_resources):
    kernels = {row["kernel"] for row in launch_resources}
    assert kernels == {"_emissions_kernel", "_transfer_kernel", "_boundary_kernel", "_sweep_kernel", "_loss_kernel",
                       "_posterior_kernel", "_band_values_kernel", "_dense_kernel", "_finish_kernel"}, kernels
    two_pass = [row for row in launch_resources if row["workload"] == "G1" and row["kernel"] == "_emissions_kernel"]
    assert two_pass and all("WRITE_GRAD=1" in row["config"] for row in two_pass), "G1 records the two-pass sweep"
    configs = {(row["kernel"], row["config"]) for row in launch_resources}
    assert len(configs) >= 40, f"only {len(configs)} distinct configs recorded"


def test_fused_head_windows_are_covered(launch_resources):
    """G4 (the fused LM head) records its windowed stages: the vocabulary pass over a chunk of frames and the
    in-place gradient pass over a backward tile, as the spec rows whose spills and occupancy are checked."""
    g4 = {row["kernel"]: row for row in launch_resources if row["workload"] == "G4"}
    assert {"_emissions_kernel", "_band_values_kernel", "_dense_kernel"} <= set(g4), sorted(g4)
    assert g4["_dense_kernel"]["spec"] and "IN_PLACE=1" in g4["_dense_kernel"]["config"]
    in_forward = {row["kernel"]: row for row in launch_resources if row["workload"] == "G4 gradient in forward"}
    assert "WRITE_GRAD=1" in in_forward["_emissions_kernel"]["config"]
    assert "TWO_PASS=1" in in_forward["_band_values_kernel"]["config"]


def test_no_config_the_launchers_can_choose_spills(launch_resources):
    spilling = [row for row in launch_resources if row["spills"] or row["stack"]]
    assert not spilling, "configs that spill registers at sm_90:\n" + "\n".join(
        f"  {row['workload']}: {row['kernel']} [{row['config']}] {row['regs']} regs, {row['spills']} B spilled, "
        f"{row['stack']} B stack" for row in spilling)


def test_vocabulary_passes_keep_32_warps_resident(launch_resources):
    from_spec = [row for row in launch_resources if row["spec"] and row["kernel"] in (
        "_emissions_kernel", "_dense_kernel", "_finish_kernel")]
    assert from_spec
    low = [row for row in from_spec if row["resident_warps"] < 32]
    assert not low, "bandwidth-bound passes under 32 resident warps per SM:\n" + "\n".join(
        f"  {row['workload']}: {row['kernel']} [{row['config']}] {row['regs']} regs -> {row['resident_warps']} warps "
        f"({row['limiter']})" for row in low)


def test_recorded_fused_head_chunk_is_g4_default():
    from mdlm_ctc import linear
    from mdlm_ctc.triton_kernels import resources

    assert resources.LINEAR_CHUNK == linear.default_chunk_size(126464, 2)  # bf16


def test_the_benchmark_sweep_is_covered(launch_resources):
    """Every lattice config the chunk-length sweep of bench_slack_ctc.py compiles is in the no-spill check,
    among them G2 standard at L = 63 (D = 127), whose boundary kernel spilled 1,504 B at 16,384 lanes."""
    sweep = {(row["workload"], row["kernel"], row["config"]) for row in launch_resources
             if row["workload"].startswith("sweep ")}
    assert {w for w, _, _ in sweep} == {"sweep G1", "sweep G2", "sweep G3"}
    assert any(w == "sweep G2" and k == "_boundary_kernel" and "D=127," in c for w, k, c in sweep), sorted(sweep)
    assert any(w == "sweep G1" and k == "_transfer_kernel" and "D=8," in c for w, k, c in sweep), sorted(sweep)


def test_cost_model_counts_match_the_cubins(compiled):
    """slack_ctc.SASS_TILE (fitted by static_triton.py --calibrate) prices each lattice kernel's tile within 30%
    of the SASS it compiles to at the SPEC §6 plans and the sweep, and SASS_STEP (one median over every config)
    the step loop within 2x, or, where a config's loop is costlier (G3's boundary kernel at 255 registers
    counts 339 against 169), within 15% of the step's whole count (tile plus loop), what the predicted time
    reads."""
    from mdlm_ctc.triton_kernels import slack_ctc

    calibration = compiled[1]
    assert {row["kernel"] for row in calibration} == {"_transfer_kernel", "_boundary_kernel", "_sweep_kernel"}
    off = [row for row in calibration if abs(row["model"] - row["tile"]) > 0.3 * row["tile"]]
    assert not off, "\n".join(f"{r['workload']} {r['kernel']} [{r['config']}]: {r['tile']} counted, {r['model']:.0f} "
                              f"modelled" for r in off)
    for row in calibration:
        if row["step"]:
            kind = {"_boundary_kernel": "boundary", "_sweep_kernel": "sweep"}[row["kernel"]]
            modelled = slack_ctc.SASS_STEP[kind, 1 if "MODE=1" in row["config"] else 0]
            whole = row["tile"] + row["step"]
            assert modelled / 2 <= row["step"] <= 2 * modelled or abs(row["step"] - modelled) <= 0.15 * whole, row
