"""Shared benchmark plumbing: the machine/commit/version stamp, timers, peak memory, and recording.

Every recorded row carries the machine, the commit and the versions it was measured with. Times are
medians with 20th/80th percentiles over repeats; providers are run round-robin inside each repeat so
that a noisy neighbour slows all of them alike (ratios are measured side by side, in one run).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine() -> dict:
    info = {"host_cpu": _cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_sms=props.multi_processor_count, cuda=torch.version.cuda)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    import mdlm_ctc

    out["mdlm_ctc"] = mdlm_ctc.__version__
    out["backends"] = mdlm_ctc.available_backends()
    return out


def commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("MDLM_CTC_COMMIT", "unknown")


def stamp() -> dict:
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit(), "machine": machine(), "versions": versions()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds one call takes (CUDA events on a GPU, perf_counter on the CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def quantiles(seconds: list[float]) -> dict:
    ms = sorted(s * 1e3 for s in seconds)
    q = statistics.quantiles(ms, n=5, method="inclusive") if len(ms) >= 2 else [ms[0]] * 4
    return {"median_ms": statistics.median(ms), "p20_ms": q[0], "p80_ms": q[3], "repeats": len(ms)}


class PeakMemory:
    """Peak memory above the starting point while the block runs, in MiB.

    GPU: ``torch.cuda.max_memory_allocated``. CPU: the process's peak resident set (VmHWM), reset through
    ``/proc/self/clear_refs`` where the kernel allows it; ``None`` where it cannot be measured.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.mib = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = _rss_kib() if _reset_hwm() else None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        elif self.base is not None:
            peak = _status_kib("VmHWM")
            self.mib = None if peak is None else (peak - self.base) / 1024
        return False


def _status_kib(field: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_kib():
    return _status_kib("VmRSS")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def report_peak_rss(step) -> None:
    """Child side of :func:`peak_rss_in_subprocess`: run one step and print its peak RSS growth (MiB)."""
    base = _rss_kib() if _reset_hwm() else None
    step()
    peak = _status_kib("VmHWM")
    print(f"PEAK_MIB {'nan' if base is None or peak is None else (peak - base) / 1024:.3f}")


def peak_rss_in_subprocess(command: list[str]):
    """Peak resident-set growth of one step, measured in a fresh process (CPU). None if unavailable."""
    result = subprocess.run(command, capture_output=True, text=True)
    for line in result.stdout.splitlines():
        if line.startswith("PEAK_MIB"):
            value = float(line.split()[1])
            return None if value != value else value
    return None


def cpu_allocator_peak_bytes(step) -> int:
    """Largest growth of live bytes in torch's CPU allocator while ``step`` runs.

    The profiler with ``profile_memory=True`` records every allocation and free of the c10 CPU
    allocator (every tensor, including the temporaries inside ATen kernels) with a timestamp; the
    running sum in time order is the live memory, its maximum the peak. Storage freed during ``step``
    but allocated before it counts negative, so the figure never overstates the growth. Memory that
    kernels allocate outside torch's allocator (scratch, buffer pools) is not seen.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def emit(rows: list[dict], table_markdown: str, *, name: str, summary_name: str, title: str, as_json: bool,
         record_rows: bool) -> None:
    """Print the rows (a table, or JSON lines) stamped with machine/commit/versions; with
    ``record_rows`` append them to results/<name>.jsonl and write results/<summary_name>.md."""
    stamp_ = stamp()
    if as_json:
        for row in rows:
            print(json.dumps({**row, **stamp_}))
    else:
        print(f"machine: {stamp_['machine']}\ncommit {stamp_['commit']}, versions {stamp_['versions']}\n")
        print(table_markdown)
    if record_rows and rows:
        path = record([{**row, **stamp_} for row in rows], name)
        summary = os.path.join(RESULTS, f"{summary_name}.md")
        with open(summary, "w") as f:
            f.write(f"# {title}\n\n{stamp_['date']}, commit `{stamp_['commit']}`\n\n"
                    f"Machine: `{json.dumps(stamp_['machine'])}`\n\nVersions: `{json.dumps(stamp_['versions'])}`\n\n"
                    f"{table_markdown}\n")
        print(f"\nrecorded {len(rows)} rows in {path} and {summary}", file=sys.stderr)


def record(rows: list[dict], name: str) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.jsonl")
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    return path
