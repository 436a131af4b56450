"""The benchmark harness and the GPU check script run (smoke sizes): they are evidence, so they must work."""

import json
import os
import subprocess
import sys

from mdlm_ctc import linear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_slack_ctc_smoke_rows():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_slack_ctc.py"), "--smoke",
                             "--json", "--repeats", "2", "--no-memory",
                             "--providers", "torch", "reference", "cpu"],  # Triton is only interpreted here: slow
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    providers = {(row["workload"], row["provider"]) for row in rows}
    for workload in ("smoke-standard", "smoke-preserve"):
        assert (workload, "torch") in providers and (workload, "reference") in providers
    for row in rows:
        assert row["median_ms"] > 0 and row["commit"] and row["machine"]["cpu_cores"] >= 1
        assert row["versions"]["torch"]


def test_bench_linear_slack_ctc_smoke_rows():
    """Every provider and chunk size is a row, timed side by side; the default chunk is named and judged."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_linear_slack_ctc.py"), "--smoke",
                             "--json", "--repeats", "5", "--providers", "ours", "materialised", "torch_ce",
                             "--chunk-size", "default", "16"],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    ours = {row["chunk_size"]: row for row in rows if row["provider"] == "ours"}
    default = linear.default_chunk_size(300, 4)  # the smoke shape: V = 300, fp32
    assert set(ours) == {16, default}
    assert ours[default]["default_chunk"] and not ours[16]["default_chunk"]
    materialised = next(row for row in rows if row["provider"] == "materialised")
    for row in ours.values():
        assert row["vs_materialised"] == round(row["cpu_seconds_median"] / materialised["cpu_seconds_median"], 3)
        assert row["peak_extra_mib"] is not None and row["median_ms"] > 0
    assert {row["provider"] for row in rows} == {"ours", "materialised", "torch_ce"}
