"""A pytest plugin for the GPU check: one row per test, appended to ``$MDLM_CTC_TEST_ROWS`` as each test
ends (``-p gpu_pytest_rows``), so the tests' results survive a step killed at its slice.

Each row: kind "test", the node id, the outcome (passed, failed, skipped, error), seconds, for a failure
the end of its message, and the provenance of every row (commit, tree, GPU, run id). A test file that is
skipped or fails at collection is one row (its path as the node id).
"""

from __future__ import annotations

import os
import shutil
import subprocess

from provenance import append_jsonl, provenance

_GPU = None


def _gpu_name():
    global _GPU
    if _GPU is None:
        _GPU = ""
        smi = shutil.which("nvidia-smi")
        if smi:
            try:
                _GPU = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                                      capture_output=True, text=True, timeout=10).stdout.strip()
            except (OSError, subprocess.SubprocessError):
                pass
    return _GPU or None


def _write(report, outcome):
    row = dict(kind="test", nodeid=report.nodeid, outcome=outcome, when=getattr(report, "when", "collect"),
               seconds=round(getattr(report, "duration", 0.0) or 0.0, 3), gpu=_gpu_name(),
               run_id=os.environ.get("MDLM_CTC_RUN_ID"), step=os.environ.get("MDLM_CTC_STEP"))
    row.update({key: provenance()[key] for key in ("commit", "dirty", "tree")})
    if report.failed:
        row["message"] = str(report.longrepr)[-1500:]
    elif report.skipped and isinstance(report.longrepr, tuple):
        row["message"] = str(report.longrepr[2])[:300]
    append_jsonl(os.environ["MDLM_CTC_TEST_ROWS"], row)


def pytest_runtest_logreport(report):
    if not os.environ.get("MDLM_CTC_TEST_ROWS"):
        return
    if report.when == "call" or (report.when == "setup" and (report.failed or report.skipped)) or (
            report.when == "teardown" and report.failed):
        _write(report, report.outcome if report.when == "call" else ("error" if report.failed else "skipped"))


def pytest_collectreport(report):
    """A test file skipped as a whole (``pytest.importorskip``) or failing to import: one row for the file."""
    if os.environ.get("MDLM_CTC_TEST_ROWS") and (report.failed or report.skipped) and report.nodeid:
        _write(report, "error" if report.failed else "skipped")
