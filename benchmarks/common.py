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
import shutil
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_report  # noqa: E402  (device constants)
from provenance import append_jsonl, provenance, read_rows, row_key  # noqa: E402  (torch-free)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def machine() -> dict:
    from mdlm_ctc.mdlm.base import cpu_model  # the machine line the fine-tuning reports print too

    info = {"host_cpu": cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_sms=props.multi_processor_count, cuda=torch.version.cuda, **gpu_clocks())
    return info


def gpu_clocks() -> dict:
    """SM and memory clocks of GPU 0 now and at most (MHz), from nvidia-smi; {} where it is absent."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return {}
    fields = ("clocks.sm", "clocks.max.sm", "clocks.mem", "clocks.max.mem")
    try:
        out = subprocess.run([smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        values = [int(float(v)) for v in out.split(",")]
    except (OSError, ValueError, subprocess.SubprocessError):
        return {}
    return dict(zip(("sm_clock_mhz", "sm_clock_max_mhz", "mem_clock_mhz", "mem_clock_max_mhz"), values))


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
    """The commit measured (``provenance.provenance``: the GPU driver's environment, else git, else the prep file)."""
    return provenance()["commit"]


def stamp() -> dict:
    prov = provenance()
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": prov["commit"], "dirty": prov["dirty"], "machine": machine(), "versions": versions()}
    out.update({key: prov[key] for key in ("tree", "tree_matches") if prov.get(key) is not None})
    return out


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


# ---------------------------------------------------------------------------------------------
# streaming rows and resume (benchmarks/gpu_run.py)
# ---------------------------------------------------------------------------------------------

def key_stamp() -> dict:
    """The provenance fields of :func:`row_key` for rows about to be measured in this process."""
    prov = provenance()
    return {"commit": prov["commit"], "tree": prov.get("tree"),
            "gpu": torch.cuda.get_device_properties(0).name if torch.cuda.is_available() else None}


def measured_keys(paths) -> set:
    """Keys of the benchmark rows already measured (not errors) in ``paths``: what a resumed run skips."""
    return {row_key(row) for row in read_rows(paths)
            if row.get("kind") == "bench" and row.get("status", "ok") == "ok"}


def error_text(error: BaseException) -> str:
    """What an error row says about a provider that raised."""
    return f"{type(error).__name__}: {error}"[:2000]


def deliver(rows: list, new: list, sink) -> int:
    """Add a workload's new rows to ``rows`` and stream them to ``sink`` (a RowSink or None); returns how many
    of them are errors (a provider that raised)."""
    rows.extend(new)
    if sink is not None:
        for row in new:
            sink.write(row)
    return sum(1 for row in new if row.get("status") == "error")


class RowSink:
    """Appends each row, stamped (machine, commit, versions, the GPU run's id and step), to a JSONL file the
    moment it is measured: one ``write`` of a whole line on an append-only descriptor, then ``fsync``, so a
    process killed a moment later loses nothing it reported."""

    def __init__(self, path: str, bench: str):
        self.path, self.bench = path, bench
        self.count = 0
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, row: dict) -> None:
        full = {"kind": "bench", "bench": self.bench, **row, **stamp()}
        for var, key in (("MDLM_CTC_RUN_ID", "run_id"), ("MDLM_CTC_STEP", "step")):
            if os.environ.get(var):
                full[key] = os.environ[var]
        append_jsonl(self.path, full)
        self.count += 1


def device_model(device: torch.device) -> dict:
    """The figures the cost models take for ``device``: SMs, SM clock (GHz) and memory bandwidth (TB/s). On a
    GPU from the device and the GPU check's probe (``MDLM_CTC_DEVICE_MODEL``, JSON); on a CPU the H200 the
    SPEC's goals are written for (the predictions of a dry run are an H200's)."""
    if device.type != "cuda":
        return dict(gpu_report.H200, source="H200 constants (no GPU here)")
    probed = json.loads(os.environ.get("MDLM_CTC_DEVICE_MODEL", "{}") or "{}")
    props = torch.cuda.get_device_properties(device)
    clocks = gpu_clocks()
    name = props.name
    nominal = gpu_report.nominal_bandwidth(name)
    return dict(name=name, sms=props.multi_processor_count,
                clock_ghz=(clocks.get("sm_clock_max_mhz") or 1980) / 1e3,
                bandwidth_tbs=probed.get("bandwidth_tbs") or nominal or gpu_report.H200["bandwidth_tbs"],
                source="probe" if probed.get("bandwidth_tbs") else ("nominal" if nominal else "H200 default"))
