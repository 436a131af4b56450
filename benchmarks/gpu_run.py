"""The GPU check's driver: one short call on a lent GPU machine brings back every GPU figure.

    bash benchmarks/gpu_prep.sh                  # here, first: provenance + the yardsticks' wheels
    bash benchmarks/gpu_check.sh                 # on the GPU machine (= python benchmarks/gpu_run.py)
    bash benchmarks/gpu_check.sh --dry-run --budget 60   # the same driver on a CPU (what CI runs)

A lent machine gives one command of at most 600 s, and only up to 8 files written under ``$OUT`` come
back (a command killed at its limit still returns them). So:

* **Budget.** Everything runs within ``--budget`` seconds (default 480) counted from the driver's start.
  Each step gets a slice: at most its cap, never more than what is left; it runs in its own process
  group and the whole group is killed when the slice ends (SIGTERM, then SIGKILL after 3 s, all inside
  the slice), and the next step runs. Steps run in the order of what matters most: the device probe,
  the build (timed), the G1, G2 and G3 rows (torch, triton, cuda side by side), G4 (ours against Liger's
  and cut-cross-entropy's fused linear cross-entropy when their wheels came along, and the torch
  chunked yardstick), the GPU tests, then the chunk-length sweep and the static report.
* **Streaming rows.** The benchmarks append each workload's rows to ``$OUT/rows.jsonl`` the moment
  they are measured (``--rows-out``: one write per line, fsync), with provenance on every row (commit
  and dirty flag from the prep file, versions, device, clocks, run id, step); the GPU tests append one
  row per test (``gpu_pytest_rows.py``). The report ``$OUT/report.md`` is rendered from the rows after
  every step (``gpu_report.py``), so a killed call still returns what it measured.
* **Resume.** Given an earlier call's rows (``--resume FILE``, or ``.gpu_check/resume.jsonl`` put there by
  ``gpu_prep.sh --resume FILE``), those rows are copied into this call's rows file and every row already
  measured on this commit, tree and GPU is skipped (tests that passed are deselected): two short calls
  finish what one could not.
* **Few files.** ``$OUT`` gets rows.jsonl, gpu_check.log (every step's output, at most 2 MiB per step:
  head and tail), report.md and static_cuda.md: 4 of the 8 files allowed.

The benchmark steps run in one worker process (torch and the package imported once, not per step); a
step that overruns kills the worker's process group and the next step starts a fresh worker. Missing
optional packages change what runs and never stop the run: without pytest the tests are skipped,
without the wheels G4 is judged against the torch yardstick, without numpy the Triton interpreter (dry
run) is absent, and the rows say so.

``--dry-run``: the same driver on a CPU machine: the installed package (no build), the G workloads at
tiny shapes under ``TRITON_INTERPRET=1``, the GPU tests of two files (skipped there), two sweep rows and
the static report of one shape. ``--list`` prints the plan (steps, caps, commands) without running it;
``--steps`` runs a subset, ``--cap STEP=S`` changes a cap, ``--inject-sleep STEP`` makes a step sleep past
its slice (the tests show the cut and the rows after it). Exit status: the number of steps that failed
or ran out of time.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import glob
import json
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import gpu_report  # noqa: E402  (these two are torch-free: the driver imports no torch)
import provenance  # noqa: E402

DEFAULT_BUDGET = 480.0
KILL_GRACE = 3.0        # SIGTERM -> SIGKILL, inside the slice
FINAL_RESERVE = 2.0     # kept for the last report
MIN_SLICE = 4.0         # a step that would get less is skipped
MAX_OUT_FILES = 8
LOG_PER_STEP = 2 << 20  # bytes of one step's output kept in the log (head and tail)
LOG_TAIL = 256 << 10
CARRY = os.path.join(ROOT, ".gpu_check")
WHEELHOUSE = os.path.join(ROOT, "wheelhouse")
WHEELS = ("liger-kernel==0.8.5", "cut-cross-entropy==25.1.1", "setuptools>=70.1", "wheel")
"""What gpu_prep.sh downloads (pure-Python wheels, no dependencies: the GPU image has torch and Triton).
The build's own requirements (setuptools >= 64 for an editable install, and ``wheel`` below setuptools
70.1) are installed on the GPU machine only where its own are missing or too old."""
BUILD_DEPS = ("setuptools", "wheel")
OPTIONAL = ("numpy", "pytest", "hypothesis", "liger_kernel", "cut_cross_entropy", "triton")
DONE = "@@gpu_run done "
NO_TESTS_OK = (0, 5)  # pytest's 5: nothing left to run (every test deselected by a resume)


@dataclasses.dataclass
class Step:
    """One step of the plan: a process (``argv`` after the Python interpreter) or a task for the worker."""
    name: str
    cap: float                      # seconds at most
    argv: list | None = None
    env: dict = dataclasses.field(default_factory=dict)
    ok: tuple = (0,)                # exit codes that mean success
    task: dict | None = None
    reason: str | None = None       # skipped, and why

    def describe(self) -> str:
        what = ("worker: " + " ".join(str(a) for a in [self.task.get("module", self.task["task"])] +
                                      self.task.get("argv", [])) if self.task is not None else
                "python " + " ".join(shlex.quote(str(a)) for a in self.argv))
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        return (env + " " if env else "") + what


# ---------------------------------------------------------------------------------------------
# processes: own process group, output to the log, killed with their group
# ---------------------------------------------------------------------------------------------

class Log:
    """One log file for every step: the first and last parts of each step's output (LOG_PER_STEP in all)."""

    def __init__(self, path):
        self.file = open(path, "ab", buffering=0)
        self.lock = threading.Lock()
        self.start_step("driver")

    def start_step(self, name):
        with self.lock:
            self.name, self.kept, self.dropped = name, 0, 0
            self.tail = collections.deque()
            self.tail_bytes = 0

    def write(self, data: bytes):
        with self.lock:
            if self.kept + len(data) <= LOG_PER_STEP - LOG_TAIL:
                self.file.write(data)
                self.kept += len(data)
                return
            self.tail.append(data)
            self.tail_bytes += len(data)
            while self.tail_bytes > LOG_TAIL and len(self.tail) > 1:
                self.tail_bytes -= len(self.tail[0])
                self.dropped += len(self.tail.popleft())

    def end_step(self):
        with self.lock:
            if self.dropped:
                self.file.write(f"\n[... {self.dropped} bytes of [{self.name}] output left out ...]\n".encode())
            for data in self.tail:
                self.file.write(data)
            self.tail.clear()
            self.tail_bytes = self.kept = self.dropped = 0

    def note(self, text):
        self.write((text + "\n").encode())


class Proc:
    """A child in its own session (so its whole process group can be killed), its output copied to the log
    by a reader thread; lines starting with DONE are handed to ``done`` (the worker's protocol)."""

    def __init__(self, argv, env, log, *, stdin=False):
        self.log, self.done = log, queue.Queue()
        self.recent = collections.deque(maxlen=40)
        self.popen = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      stdin=subprocess.PIPE if stdin else subprocess.DEVNULL, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in iter(self.popen.stdout.readline, b""):
            if line.startswith(DONE.encode()):
                self.done.put(int(line[len(DONE):].strip() or 1))
                continue
            self.log.write(line)
            self.recent.append(line.decode(errors="replace").rstrip())
        self.done.put(None)  # the process ended

    def send(self, task: dict):
        self.popen.stdin.write((json.dumps(task) + "\n").encode())
        self.popen.stdin.flush()

    def wait_done(self, timeout):
        """The task's exit code, None when the process ended first, or raises queue.Empty at the timeout."""
        return self.done.get(timeout=max(timeout, 0.0))

    def wait(self, timeout):
        self.popen.wait(timeout=max(timeout, 0.0))
        self.reader.join(timeout=2)
        return self.popen.returncode

    def kill(self):
        """SIGTERM to the group, SIGKILL after KILL_GRACE; returns once the child is gone."""
        for sig, grace in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.popen.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)  # stragglers of the group
        except ProcessLookupError:
            pass
        self.reader.join(timeout=2)

    @property
    def alive(self):
        return self.popen.poll() is None


# ---------------------------------------------------------------------------------------------
# the worker: benchmark steps in one process
# ---------------------------------------------------------------------------------------------

def worker_main():
    """Runs tasks read from stdin, one JSON object a line, and prints DONE <exit code> after each."""
    sys.path.insert(0, HERE)
    for line in sys.stdin:
        task = json.loads(line)
        os.environ.update(task.get("env", {}))
        rc = 1
        try:
            if task.get("sleep"):
                time.sleep(task["sleep"])  # --inject-sleep: a step that overruns
            rc = _run_task(task)
        except SystemExit as exit_:
            rc = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
            rc = 1
        sys.stdout.flush()
        sys.stderr.flush()
        print(f"\n{DONE}{rc}", flush=True)
    return 0


def _run_task(task) -> int:
    if task["task"] == "sleep":
        return 0
    if task["task"] == "backends":
        return _backends_task(task)
    module = __import__(task["module"])
    return module.main(task["argv"]) or 0


def _backends_task(task) -> int:
    """Import the package (the dry run's "build"), load its kernels (the JIT build under MDLM_CTC_JIT=1)
    and record what runs where."""
    import common

    t0 = time.perf_counter()
    import mdlm_ctc
    from mdlm_ctc import backends

    loaded = backends.extension_loaded()
    row = dict(kind="backends", available=mdlm_ctc.available_backends(), extension_loaded=loaded,
               extension_error=backends._EXTENSION_ERROR, seconds=round(time.perf_counter() - t0, 2),
               jit=os.environ.get("MDLM_CTC_JIT") == "1")
    import torch

    if torch.cuda.is_available():
        row["available_cuda"] = mdlm_ctc.available_backends("cuda")
    print(json.dumps(row))
    provenance.append_jsonl(task["rows"], {**row, **common.stamp(), "run_id": os.environ.get("MDLM_CTC_RUN_ID"),
                                           "step": os.environ.get("MDLM_CTC_STEP")})
    return 0


# ---------------------------------------------------------------------------------------------
# the probe: environment and device (2 s of copies)
# ---------------------------------------------------------------------------------------------

def _gpu_present() -> bool:
    return os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None


def probe_main(rows_path, dry_run):
    """One row: what is importable, setuptools' version, and on a GPU its name, SMs, clocks and copy bandwidth."""
    import importlib
    import importlib.metadata as metadata
    import platform

    row = dict(kind="probe", python=platform.python_version(), packages={}, dry_run=dry_run,
               run_id=os.environ.get("MDLM_CTC_RUN_ID"), date=_now())
    for name in OPTIONAL:
        heavy = name in ("liger_kernel", "cut_cross_entropy", "triton")  # they import torch
        try:
            if heavy and (dry_run or not _gpu_present()):
                row["packages"][name] = importlib.util.find_spec(name) is not None
            else:
                importlib.import_module(name)
                row["packages"][name] = True
        except Exception as error:
            row["packages"][name] = False
            row.setdefault("import_errors", {})[name] = f"{type(error).__name__}: {error}"[:300]
    for dist in ("torch", "triton", "setuptools", "wheel", "numpy", "liger-kernel", "cut-cross-entropy", "pip"):
        try:
            row.setdefault("versions", {})[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            row.setdefault("versions", {})[dist] = None
    row["setuptools_ok"] = _version_at_least(row["versions"]["setuptools"], 64)
    # setuptools < 70.1 builds wheels (PEP 660 editable ones too) with the separate `wheel` package
    row["wheel_ok"] = row["versions"]["wheel"] is not None or _version_at_least(row["versions"]["setuptools"], 70, 1)
    row["nvcc"] = shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc")
    row["cpu_cores"] = os.cpu_count()
    if not dry_run and _gpu_present():
        row.update(_probe_gpu())
    print(json.dumps(row, indent=1))
    provenance.append_jsonl(rows_path, {**row, "commit": provenance.provenance()["commit"]})
    return 0


def _probe_gpu() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"gpu": None, "gpu_error": "torch.cuda.is_available() is False"}
    props = torch.cuda.get_device_properties(0)
    out = dict(gpu=props.name, sms=props.multi_processor_count, gpu_memory_gib=round(props.total_memory / 2**30, 1),
               capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    sys.path.insert(0, HERE)
    import common

    out.update(common.gpu_clocks())
    n = 1 << 28  # 1 GiB of fp32, copied back and forth for about a second
    a = torch.empty(n, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    copies, elapsed = 0, 0.0
    while elapsed < 1.0 and copies < 2000:
        start.record()
        for _ in range(10):
            b.copy_(a)
        end.record()
        end.synchronize()
        elapsed += start.elapsed_time(end) / 1e3
        copies += 10
    out["copy_bandwidth_tbs"] = round(2 * a.numel() * 4 * copies / elapsed / 1e12, 3)  # read + write
    out["copy_seconds"] = round(elapsed, 2)
    out.update({f"{k}_after": v for k, v in common.gpu_clocks().items() if k == "sm_clock_mhz"})
    return out


def _version_at_least(text, major, minor=0) -> bool | None:
    if not text:
        return None
    try:
        parts = [int(p) for p in text.split(".")[:2]] + [0]
    except ValueError:
        return None
    return (parts[0], parts[1]) >= (major, minor)


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------

class Run:
    """The state of one call: budget, output folder, log, worker, and what the earlier steps found."""

    def __init__(self, args):
        self.args = args
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget
        self.out = args.out
        os.makedirs(self.out, exist_ok=True)
        self.rows = os.path.join(self.out, "rows.jsonl")
        self.report = os.path.join(self.out, "report.md")
        self.log = Log(os.path.join(self.out, "gpu_check.log"))
        self.run_id = f"{_now()}-{os.getpid()}"
        self.worker = None
        self.failed = 0
        self.summary = []
        self.probe = {}
        self.jit = False
        self.safe_path = False     # run Python with -P (a non-editable install must not be shadowed by the tree)
        self.env = self._base_env()

    def _base_env(self):
        env = dict(os.environ, PYTHONUNBUFFERED="1", MDLM_CTC_RUN_ID=self.run_id)
        env["PYTHONPATH"] = HERE + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
        env.setdefault("MDLM_CTC_CUDA_ARCHS", "90")
        self.provenance = provenance.provenance()  # git here, the prep file's (hashes checked) on a GPU machine
        env.update(provenance.as_env(self.provenance))
        if self.args.dry_run:
            env["TRITON_INTERPRET"] = "1"
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        return env

    def left(self):
        return self.deadline - FINAL_RESERVE - time.monotonic()

    def python(self):
        return [sys.executable] + (["-P"] if self.safe_path else [])

    def row(self, row):
        provenance.append_jsonl(self.rows, {**row, "run_id": self.run_id, "date": _now(),
                                            "commit": self.provenance["commit"]})

    def render(self):
        rows = gpu_report.read_rows(self.rows)
        text = gpu_report.render(rows, run_id=self.run_id, budget=self.args.budget,
                                 elapsed=time.monotonic() - self.t0)
        tmp = self.report + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.report)
        return text

    # -- steps ----------------------------------------------------------------------------------

    def step(self, step: Step):
        """Run one step within min(cap, what is left); record a step row and re-render the report."""
        name, reason = step.name, step.reason
        if self.args.steps and name not in self.args.steps:
            return None
        if self.args.list:
            print(f"{name:16s} {step.cap:5.0f} s  " + (f"(skipped: {reason})" if reason else step.describe()))
            return "ok"
        limit = min(self.args.caps.get(name, step.cap), self.left())
        if reason is None and limit < MIN_SLICE:
            reason = f"no budget left ({max(self.left(), 0):.0f} s)"
        before = _count_lines(self.rows)
        if reason is not None:
            self._record(name, "skipped", 0.0, limit, None, reason, 0)
            return None
        self.log.start_step(name)
        self.log.note(f"\n===== [{name}] slice {limit:.0f} s, {_now()} =====")
        print(f"== [{name}] slice {limit:.0f} s", flush=True)
        t0 = time.monotonic()
        timeout = limit - KILL_GRACE
        if name in self.args.inject_sleep:  # (tests) the step overruns its slice
            step = dataclasses.replace(step, task={"task": "sleep", "sleep": 10**6} if step.task is not None else None,
                                       argv=["-c", "import time; time.sleep(10**6)"], ok=(0,))
        if step.task is not None:
            status, rc = self._worker_task(name, timeout, step.task)
        else:
            status, rc = self._process(name, timeout, self.python() + step.argv, step.env, step.ok)
        seconds = time.monotonic() - t0
        self.log.end_step()
        added = _count_lines(self.rows) - before
        self._record(name, status, seconds, limit, rc, None, added)
        return status

    def _record(self, name, status, seconds, limit, rc, reason, added):
        if status in ("failed", "timeout"):
            self.failed += 1
        self.row(dict(kind="step", step=name, status=status, seconds=round(seconds, 2), slice_s=round(max(limit, 0), 1),
                      rc=rc, reason=reason, rows_added=added))
        line = f"{status:8s} {name:16s} {seconds:6.1f} s of {max(limit, 0):5.0f} s  rows +{added}" + (
            f"  ({reason})" if reason else "")
        self.summary.append(line)
        print("   " + line, flush=True)
        self.render()

    def _process(self, name, timeout, argv, env=None, ok=(0,)):
        self.log.note("$ " + " ".join(shlex.quote(a) for a in argv))
        proc = Proc(argv, {**self.env, "MDLM_CTC_STEP": name, **(env or {})}, self.log)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            self.log.note(f"[{name}] killed at its slice")
            self._tail(name, proc)
            return "timeout", None
        if rc not in ok:
            self._tail(name, proc)
        return ("ok" if rc in ok else "failed"), rc

    def _tail(self, name, proc):
        lines = list(proc.recent)[-15:]
        if lines:
            print("\n".join(f"   | {line}" for line in lines), flush=True)

    def _worker_task(self, name, timeout, task):
        t0 = time.monotonic()
        if self.worker is None or not self.worker.alive:
            argv = self.python() + [os.path.join(HERE, "gpu_run.py"), "--worker"]
            self.worker = Proc(argv, self.env, self.log, stdin=True)
            self.log.note(f"[worker] pid {self.worker.popen.pid} started")
        task = {**task, "env": {"MDLM_CTC_STEP": name, **task.get("env", {})}}
        self.log.note(f"$ worker: {json.dumps(task)}")
        try:
            self.worker.send(task)
            rc = self.worker.wait_done(timeout - (time.monotonic() - t0))
        except queue.Empty:
            self.worker.kill()
            self.log.note(f"[{name}] killed at its slice (worker process group)")
            self._tail(name, self.worker)
            self.worker = None
            return "timeout", None
        except (BrokenPipeError, OSError):
            rc = None
        if rc is None:  # the worker died
            self._tail(name, self.worker)
            self.worker = None
            return "failed", None
        if rc != 0:  # a provider raised, perhaps leaving CUDA unusable: a fresh worker for the next step
            self._tail(name, self.worker)
            self.worker.kill()
            self.worker = None
        return ("ok" if rc == 0 else "failed"), rc

    def close(self):
        if self.worker is not None:
            try:
                self.worker.popen.stdin.close()
                self.worker.popen.wait(timeout=3)
            except (OSError, subprocess.TimeoutExpired):
                pass
            self.worker.kill()
            self.worker = None


def _count_lines(path):
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def plan(run):
    """The steps in order (:class:`Step`), decided as the run goes: what the probe and the build found shapes
    what follows. Each ``yield`` returns the step's status."""
    dry = run.args.dry_run
    bench = ["--rows-out", run.rows, "--resume", run.rows]
    wheels = sorted(glob.glob(os.path.join(WHEELHOUSE, "*.whl")))
    fused = [w for w in wheels if not os.path.basename(w).startswith(BUILD_DEPS)]

    def worker(step, cap, module, *argv):
        return Step(step, cap, task={"task": "bench", "module": module, "argv": list(argv)})

    pip = ["-m", "pip", "install", "--no-index", "--no-deps", "--disable-pip-version-check"]
    yield Step("wheels", 30, pip + fused, reason="dry run: nothing is installed" if dry else None if fused else
               "no wheels in wheelhouse/ (benchmarks/gpu_prep.sh downloads them)")
    yield Step("probe", 30, [os.path.join(HERE, "gpu_run.py"), "--probe", run.rows] + (["--dry-run"] if dry else []))
    run.probe = next((r for r in reversed(gpu_report.read_rows(run.rows))
                      if r.get("kind") == "probe" and r.get("run_id") == run.run_id), {})
    packages = run.probe.get("packages", {})
    if run.probe.get("copy_bandwidth_tbs"):
        run.env["MDLM_CTC_DEVICE_MODEL"] = json.dumps({"bandwidth_tbs": run.probe["copy_bandwidth_tbs"]})

    if not dry:
        # the build's requirements: pip checks none of them with --no-build-isolation
        need = [dist for dist, ok in (("setuptools", "setuptools_ok"), ("wheel", "wheel_ok"))
                if run.probe.get(ok) is False]
        carried = [w for w in wheels if os.path.basename(w).startswith(tuple(need))] if need else []
        if need:
            yield Step("build_deps", 30, pip + carried, reason=None if len(carried) == len(need) else
                       f"{' and '.join(need)} too old or missing, and no wheel for it in wheelhouse/")
        deps_ok = not need or any(s["step"] == "build_deps" and s["status"] == "ok" for s in _steps(run))
        editable = run.probe.get("setuptools_ok") is not False or deps_ok
        install = ["-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
                   "--disable-pip-version-check"] + (["-e", "."] if editable else ["."])
        if not editable:
            run.safe_path = True  # the tree's mdlm_ctc/ would shadow the installed package (no _C, no triton_kernels)
        status = yield Step("build", 300, install, env={"MDLM_CTC_BUILD": "cuda"})
        if status != "ok":  # the package without the CUDA kernels (the Triton and torch rows still run)
            yield Step("install_python", 90, install, env={"MDLM_CTC_BUILD": "none"})
            if status == "failed" and run.left() > 300:  # a quick failure: try ninja's build at first use
                run.env["MDLM_CTC_JIT"] = "1"
                run.jit = True
    yield Step("backends", 240 if run.jit else 60, task={"task": "backends", "rows": run.rows})

    if dry:
        tiny = ["--tiny", "--warmup", "0", "--repeats", "1"]  # one call each: the plumbing, not the times
        yield worker("G1", 60, "bench_slack_ctc", "--workloads", "G1", "--no-memory", *tiny, *bench)
        yield worker("G2", 60, "bench_slack_ctc", "--workloads", "G2-standard", "G2-preserve", "--no-memory", *tiny,
                     *bench)
        yield worker("G3", 60, "bench_slack_ctc", "--workloads", "G3-2048", "G3-8192", "--no-memory", *tiny, *bench)
        yield worker("G4", 60, "bench_linear_slack_ctc", "--workloads", "G4", "--chunk-size", "default", "8", *tiny,
                     *bench)
    else:
        yield worker("G1", 120, "bench_slack_ctc", "--workloads", "G1", "--repeats", "20", *bench)
        yield worker("G2", 90, "bench_slack_ctc", "--workloads", "G2-standard", "G2-preserve", "--repeats", "20",
                     *bench)
        yield worker("G3", 120, "bench_slack_ctc", "--workloads", "G3-2048", "G3-8192", "--repeats", "20", *bench)
        yield worker("G4", 120, "bench_linear_slack_ctc", "--workloads", "G4", "--chunk-size", "default", "512",
                     "2048", *bench)

    no_pytest = None if packages.get("pytest", True) else "pytest is not importable here"
    pytest = ["-m", "pytest", "-p", "gpu_pytest_rows", "-p", "no:cacheprovider", "-q", "-rfE"]
    env = {"MDLM_CTC_TEST_ROWS": run.rows}
    passed = [r["nodeid"] for r in gpu_report.read_rows(run.rows) if r.get("kind") == "test"
              and r.get("outcome") == "passed" and _same_code(r, run)]
    deselect = [a for nodeid in passed for a in ("--deselect", nodeid)]
    if dry:
        files = ["tests/test_mdlm_protocol.py", "tests/test_slack_ctc_triton_gpu.py"]
        yield Step("gpu_tests", 40, pytest + ["-m", "gpu", *files, *deselect], env, NO_TESTS_OK, reason=no_pytest)
    else:
        yield Step("gpu_tests", 150, pytest + ["-m", "gpu", "tests", *deselect], env, NO_TESTS_OK, reason=no_pytest)
        # the Triton tests written at GPU block sizes, compiled this time (no interpreter), and band_bound
        yield Step("gpu_shaped_tests", 90, pytest + ["tests/test_triton_gpu_shaped.py", "tests/test_band_bound.py",
                                                     *deselect], env, NO_TESTS_OK, reason=no_pytest)

    if dry:
        yield worker("sweep", 30, "bench_slack_ctc", "--workloads", "sweep-G1-L0", "sweep-G1-L7", "--no-memory",
                     *tiny, *bench)
    else:
        yield worker("sweep", 240, "bench_slack_ctc", "--suite", "sweep", "--repeats", "10", *bench)
    yield Step("static_cuda", 120, [os.path.join(HERE, "static_cuda.py"), "--out",
                                    os.path.join(run.out, "static_cuda.md")]
               + (["--shapes", "G1", "--dtypes", "fp32"] if dry else []))


def _steps(run):
    return [r for r in gpu_report.read_rows(run.rows) if r.get("kind") == "step" and r.get("run_id") == run.run_id]


def _same_code(row, run):
    """A test row of this commit and tree on this device (what a resumed call need not run again)."""
    mine = (run.provenance["commit"], run.provenance.get("tree"), run.probe.get("gpu"))
    return (row.get("commit"), row.get("tree"), row.get("gpu")) == mine


def drive(args) -> int:
    run = Run(args)
    _seed_resume(run, args.resume)
    print(f"gpu_check: budget {args.budget:.0f} s, output {run.out}, run {run.run_id}"
          + (" (dry run)" if args.dry_run else ""), flush=True)
    steps = plan(run)
    status = None
    try:
        while True:
            status = run.step(steps.send(status) if status is not None else next(steps)) or "skipped"
    except StopIteration:
        pass
    finally:
        run.close()
    if args.list:
        return 0
    text = run.render()
    print("\n== gpu_check summary (" + f"{time.monotonic() - run.t0:.0f} s of {args.budget:.0f})")
    for line in run.summary:
        print("   " + line)
    print("\n" + gpu_report.summary(text))
    files = [f for f in os.listdir(run.out) if not f.endswith(".tmp")]
    if len(files) > MAX_OUT_FILES:
        print(f"WARNING: {len(files)} files in {run.out} (a lent machine returns {MAX_OUT_FILES})", flush=True)
    return min(run.failed, 100)


def _seed_resume(run, paths):
    """Copy the earlier calls' rows into this call's rows file (once each: a row already there is not copied)."""
    have = set()
    try:
        with open(run.rows) as f:
            have = {line.strip() for line in f}
    except OSError:
        pass
    copied = 0
    with open(run.rows, "a") as out:
        for path in paths:
            if os.path.abspath(path) == os.path.abspath(run.rows):
                continue
            try:
                with open(path) as f:
                    for line in f:
                        if line.strip() and line.strip() not in have:
                            out.write(line.rstrip("\n") + "\n")
                            have.add(line.strip())
                            copied += 1
            except OSError:
                print(f"resume: cannot read {path}", flush=True)
    if copied:
        print(f"resume: {copied} rows from {', '.join(paths)}", flush=True)


# ---------------------------------------------------------------------------------------------
# prep (development machine)
# ---------------------------------------------------------------------------------------------

def prep(args) -> int:
    """Write .gpu_check/provenance.json (commit, dirty flag, every file's hash) and download the wheels."""
    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    os.makedirs(CARRY, exist_ok=True)
    commit = git("rev-parse", "--short=12", "HEAD").strip()
    status = git("status", "--porcelain").splitlines()
    files = sorted(set(git("ls-files", "--cached", "--others", "--exclude-standard").splitlines()))
    hashes = {path: provenance.file_sha256(os.path.join(ROOT, path)) for path in files
              if os.path.isfile(os.path.join(ROOT, path))}
    tree = provenance.tree_hash(hashes)
    prov = dict(commit=commit, dirty=bool(status), dirty_files=[line[3:] for line in status][:50], tree=tree,
                date=_now(), files=hashes)
    with open(os.path.join(CARRY, "provenance.json"), "w") as f:
        json.dump(prov, f, indent=1, sort_keys=True)
    print(f"provenance: commit {commit}{' (dirty: ' + str(len(status)) + ' files)' if status else ''}, tree {tree}, "
          f"{len(hashes)} files hashed -> .gpu_check/provenance.json")
    if args.resume:
        shutil.copyfile(args.resume, os.path.join(CARRY, "resume.jsonl"))
        print(f"resume: {args.resume} -> .gpu_check/resume.jsonl")
    elif os.path.exists(os.path.join(CARRY, "resume.jsonl")) and not args.keep_resume:
        os.remove(os.path.join(CARRY, "resume.jsonl"))
    if not args.no_wheels:
        os.makedirs(WHEELHOUSE, exist_ok=True)
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                 "--disable-pip-version-check", "-d", WHEELHOUSE, *WHEELS],
                                capture_output=True, text=True)
        if result.returncode != 0:
            print("wheels: download failed (the check then runs G4 against the torch yardstick):\n"
                  + result.stderr[-1500:])
    wheels = sorted(os.path.basename(w) for w in glob.glob(os.path.join(WHEELHOUSE, "*.whl")))
    size = sum(os.path.getsize(w) for w in glob.glob(os.path.join(WHEELHOUSE, "*"))) / 2**20
    print(f"wheels ({size:.1f} MiB): {', '.join(wheels) or 'none'}")
    print('device command: run(command="bash benchmarks/gpu_check.sh", carry=["wheelhouse", ".gpu_check"], '
          'timeout_s=600)')
    return 0


# ---------------------------------------------------------------------------------------------

def _cap(text):
    name, _, seconds = text.partition("=")
    return name, float(seconds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for everything (default 480)")
    parser.add_argument("--out", default=None, help="output folder (default: $OUT, else gpu_check_out/)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on a CPU, the Triton interpreter")
    parser.add_argument("--resume", nargs="*", default=None,
                        help="rows of earlier calls (default: .gpu_check/resume.jsonl when present)")
    parser.add_argument("--steps", nargs="*", help="run only these steps (the others are left out)")
    parser.add_argument("--cap", type=_cap, action="append", default=[], metavar="STEP=SECONDS",
                        help="another cap for a step")
    parser.add_argument("--list", action="store_true", help="print the plan (steps, caps, commands) and exit")
    parser.add_argument("--inject-sleep", nargs="*", default=[], metavar="STEP",
                        help="(tests) the step sleeps past its slice instead of running")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe", metavar="ROWS", help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command")
    prep_parser = sub.add_parser("prep", help="development machine: provenance file and wheels for the GPU run")
    prep_parser.add_argument("--resume", help="rows.jsonl a GPU call returned: the next call skips its rows")
    prep_parser.add_argument("--keep-resume", action="store_true", help="keep .gpu_check/resume.jsonl")
    prep_parser.add_argument("--no-wheels", action="store_true", help="do not download the wheels")
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main()
    if args.probe:
        return probe_main(args.probe, args.dry_run)
    if args.command == "prep":
        return prep(args)
    args.caps = dict(args.cap)
    if args.list:  # nothing runs and nothing is written
        import tempfile

        with tempfile.TemporaryDirectory() as out:
            args.out, args.resume = out, []
            return drive(args)
    args.out = os.path.abspath(args.out or os.environ.get("OUT") or os.path.join(ROOT, "gpu_check_out"))
    if args.resume is None:
        default = os.path.join(CARRY, "resume.jsonl")
        args.resume = [default] if os.path.exists(default) else []
    if args.budget > 590:
        print("WARNING: a lent machine stops a command at 600 s; the budget is counted from the driver's start",
              flush=True)
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
