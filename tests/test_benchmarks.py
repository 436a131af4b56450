"""The benchmark harness and the GPU check script run (smoke sizes): they are evidence, so they must work."""

import json
import os
import subprocess
import sys

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


def test_gpu_check_script_parses():
    assert subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", "gpu_check.sh")]).returncode == 0
