"""The GPU check (benchmarks/gpu_check.sh -> gpu_run.py) before any GPU runs it: its dry run on this CPU
(tiny shapes, the Triton interpreter) keeps its budget, streams rows for G1-G4, leaves at most 8 files,
renders the report; a step that overruns is cut and the rows after it land; a resumed call skips what was
measured; missing optional packages change what runs and never stop the run. Plus the report's
device-aware verdicts, the resume keys and the provenance, on synthetic rows."""

import os
import resource
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import gpu_report  # noqa: E402
import provenance  # noqa: E402

GOAL_WORKLOADS = {"G1": ["G1"], "G2": ["G2-standard", "G2-preserve"], "G3": ["G3-2048", "G3-8192"], "G4": ["G4"]}


class Run(tuple):
    """(out, result, wall seconds, rows) of a dry run, and the CPU seconds it got."""
    cpu: float


def _check(out, *args, env=None, timeout=150):
    start, cpu = time.monotonic(), _children_cpu()
    result = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh"), "--dry-run", "--out", str(out), *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    run = Run((out, result, time.monotonic() - start, provenance.read_rows(os.path.join(out, "rows.jsonl"))))
    run.cpu = _children_cpu() - cpu
    return run


def _children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _unless_starved(run):
    """The budget is kept by construction, whatever the load; what fits in it is not. A run that got less than
    a quarter of one core on average (other jobs on a shared machine) is not asked to finish its steps."""
    if run.cpu < 0.25 * run[2]:
        pytest.skip(f"the machine gave the dry run {run.cpu:.0f} CPU s in {run[2]:.0f} s: too loaded to judge "
                    "what fits in its budget")


def _steps(rows):
    return {row["step"]: row for row in rows if row.get("kind") == "step"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The issue's bar: `gpu_check.sh --dry-run --budget 60` on this machine."""
    return _check(tmp_path_factory.mktemp("gpu_out"), "--budget", "60", "--resume")


def test_dry_run_keeps_its_budget(dry_run):
    out, result, wall, rows = dry_run
    assert wall <= 90, f"the dry run took {wall:.0f} s\n{result.stdout[-3000:]}"
    steps = _steps(rows)
    assert sum(s["seconds"] for s in steps.values()) <= 60
    assert all(s["seconds"] <= s["slice_s"] + 1 for s in steps.values()), steps
    _unless_starved(dry_run)
    for name in ("probe", "backends", "G1", "G2", "G3", "G4"):
        assert steps[name]["status"] == "ok", (name, steps[name], result.stdout[-3000:])


def test_dry_run_streams_rows_for_every_goal(dry_run):
    out, result, wall, rows = dry_run
    _unless_starved(dry_run)
    bench = [r for r in rows if r.get("kind") == "bench"]
    for goal, workloads in GOAL_WORKLOADS.items():
        for workload in workloads:
            assert any(r["workload"] == workload and "median_ms" in r for r in bench), (goal, workload)
    for row in bench:  # provenance on every row
        assert row["commit"] not in (None, "", "unknown") and row["dry_run"] is True
        assert row["versions"]["torch"] and row["machine"]["cpu_cores"] and row["run_id"] and row["step"]
    triton = [r for r in bench if r["provider"] == "triton" and "median_ms" in r]
    assert triton and all(r["predicted_ms"] > 0 and r["predicted_for"] for r in triton)
    assert not any(r.get("goal_met") for r in bench)  # tiny shapes are never judged


def test_dry_run_leaves_at_most_8_files(dry_run):
    out = dry_run[0]
    files = [os.path.join(d, f) for d, _, names in os.walk(out) for f in names]
    assert len(files) <= 8, files
    assert {"rows.jsonl", "gpu_check.log", "report.md"} <= {os.path.basename(f) for f in files}
    assert all(os.path.relpath(f, out).count(os.sep) <= 2 for f in files)
    assert all(os.path.getsize(f) < 16 << 20 for f in files)


def test_dry_run_report(dry_run):
    out, result, wall, rows = dry_run
    report = open(os.path.join(out, "report.md")).read()
    assert "## Goals (SPEC §6)" in report and "## Steps of this call" in report
    assert all(f"| {step} | " in report for step in _steps(rows))  # every step of the call, run or not
    assert "gpu_check summary" in result.stdout and "## Goals" in result.stdout  # the console's copy
    _unless_starved(dry_run)
    assert report.startswith("# GPU check (dry run") and "dry run: not judged" in report
    assert "| G4 | ok |" in report
    assert "## slack_ctc rows (G1-G3)" in report and "## linear_slack_ctc rows (G4)" in report


def test_resume_skips_measured_rows(dry_run, tmp_path):
    """A second call given the first call's rows measures nothing again."""
    _unless_starved(dry_run)
    first = os.path.join(dry_run[0], "rows.jsonl")
    run = _check(tmp_path, "--budget", "60", "--resume", first, "--steps", "G1", "G2", "G3", "G4")
    _unless_starved(run)
    rows = run[3]
    steps = _steps(rows)
    assert all(steps[g]["status"] == "ok" and steps[g]["rows_added"] == 0 for g in GOAL_WORKLOADS), steps
    log = open(os.path.join(tmp_path, "gpu_check.log")).read()
    assert log.count("every row already measured") == 6, log[-3000:]
    earlier = provenance.read_rows(first)
    assert sum(1 for r in rows if r.get("kind") == "bench") == sum(1 for r in earlier if r.get("kind") == "bench")


def _hiding(tmp_path, names):
    """The environment of a child that cannot import ``names`` (as if they were not installed)."""
    (tmp_path / "sitecustomize.py").write_text(
        "import importlib.machinery, os\n"
        "hidden = set(os.environ['MDLM_CTC_TEST_HIDE'].split(','))\n"
        "find = importlib.machinery.PathFinder.find_spec\n"
        "def find_spec(cls, name, path=None, target=None):\n"
        "    return None if name.split('.')[0] in hidden else find(name, path, target)\n"
        "importlib.machinery.PathFinder.find_spec = classmethod(find_spec)\n")
    return {"PYTHONPATH": str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "MDLM_CTC_TEST_HIDE": ",".join(names)}


@pytest.fixture(scope="module")
def cut_and_missing(tmp_path_factory):
    """G1 sleeps past a 4 s cap; numpy, liger and cut-cross-entropy are not importable."""
    out = tmp_path_factory.mktemp("gpu_cut")
    env = _hiding(tmp_path_factory.mktemp("shim"), ["numpy", "liger_kernel", "cut_cross_entropy"])
    return _check(out, "--budget", "90", "--resume", "--steps", "probe", "G1", "G2", "G4", "gpu_tests",
                  "--inject-sleep", "G1", "--cap", "G1=4", env=env)


def test_an_overrunning_step_is_cut_and_the_next_rows_land(cut_and_missing):
    out, result, wall, rows = cut_and_missing
    steps = _steps(rows)
    assert steps["G1"]["status"] == "timeout" and steps["G1"]["seconds"] <= 4.5, steps["G1"]
    _unless_starved(cut_and_missing)
    assert steps["G2"]["status"] == "ok" and steps["G2"]["rows_added"] > 0, (steps, result.stdout[-3000:])
    assert not any(r.get("workload") == "G1" for r in rows if r.get("kind") == "bench")
    assert wall <= 90 + 10
    log = open(os.path.join(out, "gpu_check.log")).read()
    pids = [int(line.split()[2]) for line in log.splitlines() if line.startswith("[worker] pid")]
    assert len(pids) >= 2  # the killed worker, then a fresh one
    with pytest.raises(ProcessLookupError):
        os.killpg(pids[0], 0)  # its whole process group is gone


def test_missing_optional_packages_change_what_runs(cut_and_missing):
    out, result, wall, rows = cut_and_missing
    _unless_starved(cut_and_missing)
    probe = next(r for r in rows if r.get("kind") == "probe")
    assert not any(probe["packages"][name] for name in ("numpy", "liger_kernel", "cut_cross_entropy"))
    g2 = {r["provider"] for r in rows if r.get("workload") == "G2-standard"}
    assert "cpu" in g2 and "triton" not in g2  # no numpy: no Triton interpreter
    g4 = {r["provider"] for r in rows if r.get("workload") == "G4" and "median_ms" in r}
    assert {"ours", "torch_ce"} <= g4 and not g4 & {"liger", "cce"}
    # the GPU tests still collect (test_mdlm_protocol.py skips without numpy) and report one row per file
    assert _steps(rows)["gpu_tests"]["status"] == "ok"
    assert {r["outcome"] for r in rows if r.get("kind") == "test"} == {"skipped"}
    report = open(os.path.join(out, "report.md")).read()
    assert "Liger absent" in report and "Not importable here" in report


def test_without_pytest_the_tests_are_skipped(tmp_path):
    out, result, wall, rows = _check(tmp_path / "out", "--budget", "30", "--resume", "--steps", "probe", "gpu_tests",
                                     env=_hiding(tmp_path, ["pytest"]))
    step = _steps(rows)["gpu_tests"]
    assert step["status"] == "skipped" and "pytest" in step["reason"] and result.returncode == 0


# ---------------------------------------------------------------------------------------------
# the report, keys and provenance on synthetic rows (no subprocess)
# ---------------------------------------------------------------------------------------------

def _bench(workload, provider, median, **extra):
    row = dict(kind="bench", bench="slack_ctc", workload=workload, provider=provider, B=8, T=2048, U=1792,
               V=126464, dtype="bfloat16", collapse="preserve", timed="forward+backward", median_ms=median,
               p20_ms=median, p80_ms=median, commit="abc", machine={"gpu": "NVIDIA H100 80GB HBM3"}, run_id="r")
    row.update(extra)
    return row


def test_report_verdicts_are_device_aware():
    """An H100 (3.35 TB/s): G1 at 3.0 ms misses the H200's 2.5 ms but meets the goal scaled by 4.8 / 3.35."""
    probe = dict(kind="probe", gpu="NVIDIA H100 80GB HBM3", sms=132, sm_clock_max_mhz=1980, copy_bandwidth_tbs=2.9,
                 run_id="r")
    rows = [probe, _bench("G1", "torch", 60.0), _bench("G1", "triton", 3.0, speedup_vs_torch=20.0, predicted_ms=2.7,
                                                       peak_extra_mib=4500, logits_mib=3952),
            _bench("G2-standard", "cuda", 0.8, timed="lattice", collapse="standard", U=1024),
            _bench("G4", "ours", 120.0, bench="linear_slack_ctc", default_chunk=True, peak_extra_mib=1500, N=16384,
                   D=4096, chunk_size=1024),
            _bench("G4", "liger", 100.0, bench="linear_slack_ctc", N=16384, D=4096, chunk_size=None)]
    bw, compute, how = gpu_report.scales(probe)
    assert bw == pytest.approx(4.8 / 3.35) and compute == pytest.approx(1.0) and "nominal" in how
    goals = {(g["goal"], g["backend"], g["what"]): g for g in gpu_report.goal_rows(rows[1:], probe)}
    time_ = goals["G1", "triton", "time (ms)"]
    assert time_["ok"] is False and time_["ok_scaled"] is True and time_["scaled"] == pytest.approx(2.5 * 4.8 / 3.35)
    assert goals["G1", "triton", "speed-up over torch"]["ok"] is True
    assert goals["G1", "triton", "extra memory / logits"]["ok"] is False
    assert goals["G2-standard", "cuda", "lattice (ms), <= 1 ms first step"]["ok"] is False
    g4 = goals["G4", "ours", "time / Liger FLCE"]
    assert g4["measured"] == pytest.approx(1.2) and g4["ok"] is False
    assert goals["G1", "cuda", "time (ms)"]["measured"] is None  # no row: no verdict
    report = gpu_report.render(rows, run_id="r")
    assert "**NOT met**" in report and "| G1 | triton | time (ms) | 3.000 | 2.700 | <= 2.5 | **NOT met** | <= 3.58 | met |" \
        in report


def test_report_scales_an_unknown_device_by_its_probed_bandwidth():
    bw, compute, how = gpu_report.scales(dict(gpu="Some GPU", sms=66, sm_clock_max_mhz=1980, copy_bandwidth_tbs=1.8))
    assert bw == pytest.approx(4.8 / (1.8 / gpu_report.COPY_EFFICIENCY)) and compute == pytest.approx(2.0)
    assert "probed" in how


def test_resume_keys():
    import common

    row = _bench("G1", "triton", 3.0)
    assert common.row_key(row) == common.row_key(dict(row, median_ms=9.0, run_id="other"))  # same measurement
    for change in (dict(commit="def"), dict(machine={"gpu": "NVIDIA H200"}), dict(dtype="float16"),
                   dict(chunk_len=7), dict(dry_run=True)):
        assert common.row_key(row) != common.row_key(dict(row, **change)), change


def test_measured_keys_skip_only_rows_that_measured(tmp_path):
    import common

    path = tmp_path / "rows.jsonl"
    ok, failed = _bench("G1", "triton", 3.0), dict(_bench("G1", "cuda", 0), status="error", error="boom")
    for row in (ok, failed, dict(kind="step", step="G1")):
        provenance.append_jsonl(str(path), row)
    with open(path, "a") as f:
        f.write('{"torn": ')  # a line cut by a kill
    assert common.measured_keys([str(path), str(tmp_path / "missing.jsonl")]) == {common.row_key(ok)}


def test_provenance_from_the_environment_and_the_prep_file(tmp_path, monkeypatch):
    provenance.provenance.cache_clear()
    monkeypatch.setenv("MDLM_CTC_COMMIT", "0123456789ab+dirty")
    monkeypatch.setenv("MDLM_CTC_DIRTY", "1")
    monkeypatch.setenv("MDLM_CTC_TREE", "feedbeef")
    monkeypatch.setenv("MDLM_CTC_TREE_MATCHES", "0")
    try:
        prov = provenance.provenance()
        assert prov == dict(commit="0123456789ab+dirty", dirty=True, tree="feedbeef", tree_matches=False, source="env")
        assert provenance.as_env(prov)["MDLM_CTC_DIRTY"] == "1"
    finally:
        provenance.provenance.cache_clear()
    source = tmp_path / "a.py"
    source.write_text("x = 1\n")
    prep = {"commit": "0123456789ab", "files": {str(source): provenance.file_sha256(str(source))}}
    assert provenance.tree_matches(prep) is True
    source.write_text("x = 2\n")
    assert provenance.tree_matches(prep) is False


def test_fused_ce_providers_import_or_skip(monkeypatch):
    """Liger's and cut-cross-entropy's providers: None where the package does not import; where it does, the
    call passes (hidden [N, D], weight [V, D], labels [N]) in each package's own argument order."""
    import types

    import bench_linear_slack_ctc as bench

    for name in ("liger_kernel", "cut_cross_entropy"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails, as when not installed
    assert bench._fused_ce("liger") is None and bench._fused_ce("cce") is None
    calls = []

    class FakeLiger:
        def __call__(self, lin_weight, _input, target):
            calls.append(("liger", lin_weight, _input, target))
            return 1.0

    liger = types.ModuleType("liger_kernel.transformers.fused_linear_cross_entropy")
    liger.LigerFusedLinearCrossEntropyLoss = FakeLiger
    cce = types.ModuleType("cut_cross_entropy")
    cce.linear_cross_entropy = lambda e, c, targets: calls.append(("cce", e, c, targets)) or 2.0
    for name, module in (("liger_kernel", types.ModuleType("liger_kernel")),
                         ("liger_kernel.transformers", types.ModuleType("liger_kernel.transformers")),
                         ("liger_kernel.transformers.fused_linear_cross_entropy", liger),
                         ("cut_cross_entropy", cce)):
        monkeypatch.setitem(sys.modules, name, module)
    assert bench._fused_ce("liger")("h", "w", "y") == 1.0 and bench._fused_ce("cce")("h", "w", "y") == 2.0
    assert calls == [("liger", "w", "h", "y"), ("cce", "h", "w", "y")]


def test_gpu_scripts_parse_and_are_executable():
    for script in ("gpu_check.sh", "gpu_prep.sh"):
        path = os.path.join(BENCH, script)
        assert subprocess.run(["bash", "-n", path]).returncode == 0
        assert os.access(path, os.X_OK)
