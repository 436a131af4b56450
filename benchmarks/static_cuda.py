"""Static cost report of the CUDA lattice (SPEC §6 S1): no GPU needed.

For the launch plan of each SPEC §6 lattice shape (csrc/lattice_cuda_plan.h, with an H200 model of
where clusters fit), compiles exactly the recurrence kernel that plan launches for sm_90 with the real
build's flags (csrc/lattice_cuda_kernels.cuh, the kernels of csrc/slack_ctc_cuda.cu without the torch
launcher), then reads from ptxas and from the SASS (cuobjdump):

* registers, spill stores/loads and stack per thread; the dynamic shared memory of the plan;
* occupancy on an H200 (CTAs and warps per SM from registers, threads and shared memory);
* the step loop: the innermost loop of the SASS that holds the per-step barrier (named barrier 1, or
  the cluster barrier). Its instruction count is what one warp issues per step (every branch in it is
  taken by some lane of an in-band warp, so this is also a close upper bound), with the MUFU (special
  function unit), SHFL, shared-memory and cp.async instructions among them.

Goals (SPEC §6 S1, issue 10): no spills in fp32 plans; <= 300 SASS instructions per warp-step
(preserve), <= 350 (standard). Writes benchmarks/results/static_cuda.md with the commit, machine and
tool versions. Skips cleanly (exit 0) where nvcc or cuobjdump is absent.

    python benchmarks/static_cuda.py                      # every shape, fp32 and fp64
    python benchmarks/static_cuda.py --shapes G1 --dtypes fp32 --out /tmp/report.md
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import glob
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
PRESERVE, STANDARD = 0, 1

# SPEC §6 lattice shapes: (id, mode, B, T, U); need_grad (alpha and beta) as in training
SHAPES = [
    ("G1", PRESERVE, 8, 2048, 1792),
    ("G2-preserve", PRESERVE, 8, 2048, 1024),
    ("G2-standard", STANDARD, 8, 2048, 1024),
    ("G3", PRESERVE, 2, 8192, 7680),
    ("wide-preserve", PRESERVE, 2, 8192, 4096),
    ("wide-standard", STANDARD, 2, 8192, 4096),
]
GOAL = {PRESERVE: 300, STANDARD: 350}

# H200 (sm_90): the limits the occupancy and the plan model use
H200 = dict(sms=132, smem_per_block=227 * 1024, smem_per_sm=228 * 1024, regs_per_sm=65536, warps_per_sm=64,
            ctas_per_sm=32, gpcs=[16] * 6 + [18] * 2)


def _load_build_flags():
    spec = importlib.util.spec_from_file_location("_build_flags", os.path.join(ROOT, "mdlm_ctc", "_build_flags.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_tools():
    """(nvcc, cuobjdump) or None for a missing one. cuobjdump may come with Triton's bundled toolkit."""
    flags = _load_build_flags()
    home = flags.cuda_home()
    nvcc = os.path.join(home, "bin", "nvcc") if home else None
    cuobjdump = None
    candidates = [os.path.join(home, "bin", "cuobjdump")] if home else []
    candidates.append(shutil.which("cuobjdump") or "")
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for candidate in candidates:
        if candidate and os.path.exists(candidate):
            cuobjdump = candidate
            break
    return (nvcc if nvcc and os.path.exists(nvcc) else None), cuobjdump


def _run(command, timeout=900):
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result.stdout + result.stderr


def _version(tool):
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=60).stdout
    except OSError:
        return "?"
    lines = [line for line in out.splitlines() if "release" in line or "Build" in line]
    return lines[0].strip() if lines else out.strip().splitlines()[-1] if out.strip() else "?"


# ---- plans: the launcher's own planning code, built for the host ---------------------------------

PLAN_SOURCE = r'''
#include "lattice_cuda_plan.h"
extern "C" void plan(int64_t W, int64_t U_max, int mode, int64_t acc_bytes, int64_t B, int dirs, int sms, int64_t smem,
                     mdlm_ctc::cuda_plan::ResidentFn resident, int64_t* out) {
  mdlm_ctc::cuda_plan::DeviceLimits dev;
  dev.sms = sms;
  dev.max_smem_per_block = smem;
  dev.cluster_launch = dev.cluster_code = true;
  const auto p = mdlm_ctc::cuda_plan::plan_lattice(W, U_max, mode, acc_bytes, B, dirs, dev, -1, resident, nullptr);
  const int64_t v[] = {p.cluster, p.threads, p.vt, p.stages, p.smem, p.error, p.one_wave};
  for (int i = 0; i < 7; ++i) out[i] = v[i];
}
'''
RESIDENT_FN = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int,
                               ctypes.c_void_p)


def _ctas_per_sm(threads, smem, regs=0):
    warps = threads // 32
    limits = [H200["ctas_per_sm"], H200["warps_per_sm"] // warps, H200["smem_per_sm"] // (smem + 1024)]
    if regs:
        per_warp = -(-regs * 32 // 256) * 256  # registers are allocated per warp in units of 256
        limits.append((H200["regs_per_sm"] // per_warp) // warps)
    return max(0, min(limits))


def _h200_resident(cluster, threads, smem, vt, stages, context):
    per_sm = _ctas_per_sm(threads, smem)
    if cluster == 1:
        return per_sm * H200["sms"]
    return sum(gpc * per_sm // cluster for gpc in H200["gpcs"])


def make_planner(workdir):
    compiler = os.environ.get("CXX", "c++")
    source = os.path.join(workdir, "plan.cpp")
    library = os.path.join(workdir, "plan.so")
    with open(source, "w") as f:
        f.write(PLAN_SOURCE)
    _run([compiler, "-O1", "-std=c++17", "-shared", "-fPIC", f"-I{CSRC}", source, "-o", library])
    lib = ctypes.CDLL(library)
    i64 = ctypes.c_int64
    lib.plan.argtypes = [i64, i64, ctypes.c_int, i64, i64, ctypes.c_int, ctypes.c_int, i64, RESIDENT_FN,
                         ctypes.POINTER(i64)]
    callback = RESIDENT_FN(_h200_resident)

    def planner(mode, B, T, U, acc_bytes):
        W = min(U, T - U + 1)
        out = (i64 * 7)()
        lib.plan(W, U, mode, acc_bytes, B, 2, H200["sms"], H200["smem_per_block"], callback, out)
        keys = ("cluster", "threads", "vt", "stages", "smem", "error", "one_wave")
        return dict(zip(keys, list(out)), W=W)

    return planner


# ---- compile and read the SASS --------------------------------------------------------------------

def kernel_name(acc, mode, vt, stages, cluster):
    return f"recurrence_kernel<{acc}, {mode}, {vt}, {stages}, {'true' if cluster else 'false'}>"


def compile_kernels(nvcc, kernels, workdir):
    """kernels: list of (acc, mode, vt, stages, cluster). Returns (ptxas log, cubin path)."""
    flags = _load_build_flags()
    source = os.path.join(workdir, "kernels.cu")
    with open(source, "w") as f:
        f.write('#include "lattice_cuda_kernels.cuh"\nnamespace mdlm_ctc {\nnamespace cuda_lattice {\n')
        for acc, mode, vt, stages, cluster in kernels:
            f.write(f"template __global__ void {kernel_name(acc, mode, vt, stages, cluster)}"
                    f"(const RecurrenceParams<{acc}>);\n")
        f.write("}\n}\n")
    cubin = os.path.join(workdir, "kernels.cubin")
    command = [nvcc, "-cubin", source, "-o", cubin, *flags.cuda_flags(["90"]), "-Xptxas", "-v", f"-I{CSRC}"]
    return _run(command), cubin, " ".join(flags.cuda_flags(["90"]))


def _mangled_key(acc, mode, vt, stages, cluster):
    return f"recurrence_kernelI{'f' if acc == 'float' else 'd'}Li{mode}ELi{vt}ELi{stages}ELb{int(cluster)}E"


def parse_ptxas(log):
    """{mangled name: dict(regs, spill_stores, spill_loads, stack)}"""
    out = {}
    pattern = re.compile(r"Compiling entry function '(\S+)' for 'sm_90'\n.*?Function properties for \S+\n\s+"
                         r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\n"
                         r"ptxas info\s+: Used (\d+) registers", re.S)
    for m in pattern.finditer(log):
        out[m.group(1)] = dict(stack=int(m.group(2)), spill_stores=int(m.group(3)), spill_loads=int(m.group(4)),
                               regs=int(m.group(5)))
    return out


INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")
BRANCH = re.compile(r"\bBRA(?:\.\w+)*\s+(?:\S+,\s*)?0x([0-9a-f]+)")


def parse_sass(text):
    """{mangled name: [(address, instruction)]}"""
    functions, current = {}, None
    for line in text.splitlines():
        if "Function :" in line:
            current = line.split("Function :")[1].strip()
            functions[current] = []
        elif current is not None:
            m = INSTRUCTION.search(line)
            if m:
                functions[current].append((int(m.group(1), 16), m.group(2).strip()))
    return functions


def step_loop(instructions, cluster):
    """The innermost backward-branch loop holding the step barrier: its instructions."""
    marker = "UCGABAR_WAIT" if cluster else "BAR.SYNC.DEFER_BLOCKING 0x1"
    barriers = [a for a, text in instructions if marker in text]
    if not barriers:
        return None
    loops = []
    for address, text in instructions:
        m = BRANCH.search(text)
        if m and int(m.group(1), 16) < address:
            loops.append((int(m.group(1), 16), address))
    cells = [a for a, text in instructions if text.startswith("MUFU") or " MUFU" in text or "DMUL" in text
             or "FADD" in text]
    # the loop that holds a step barrier and the cells (the cluster barrier's own retry loops hold no cells)
    holding = [(lo, hi) for lo, hi in loops
               if any(lo <= b <= hi for b in barriers) and any(lo <= c <= hi for c in cells)]
    if not holding:
        return None
    # one step loop per direction: report the larger
    innermost = [r for r in holding if not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in holding)]
    lo, hi = max(innermost, key=lambda r: r[1] - r[0])
    return [text for address, text in instructions if lo <= address <= hi]


def classify(body):
    def count(*ops):
        return sum(1 for text in body if any(re.search(rf"(^|\s){op}\b", text) for op in ops))

    return dict(total=len(body), mufu=count("MUFU"), shfl=count("SHFL"), shared=count("LDS", "STS", "LD", "ST"),
                cp_async=count("LDGSTS"), branches=count("BRA"), int64=count("IADD.64", "IMAD.WIDE", "IMAD.HI.U32"))


# ---- the report --------------------------------------------------------------------------------------

# The same measurement of the kernel before issue 10, kept for comparison (it cannot be rebuilt from
# this tree: the kernel's template signature changed).
BEFORE = """Before issue 10 (commit 9f678c9, the same toolkit and flags, the same step-loop rule; the direction
was a runtime value then, so one loop held both the alpha and the beta cells, and the issue's reading
of the executed path was ~600 (preserve, VT=4) and ~1,050 (standard, VT=4) per warp-step): fp32 step
loop 541 / 665 / 911 / 1410 instructions (preserve, VT = 1 / 2 / 4 / 8) and 756 / 1009 / 1560 / 2701
(standard); spills in fp32 standard VT=8 (48/64 B), its cluster variants (VT=4: 12/12 B, VT=8: 20/36 B),
and fp64 up to 1296/1424 B (standard VT=8, cluster); every kernel capped at 64 registers.
The previous report (commit c1e0d2b, edge cells read across the cluster with DSMEM loads, every stage
index copied with a clamped column): fp32 G1 199, G2-preserve / G3 254, G2-standard 380, wide-preserve
313, wide-standard 548 instructions per warp-step, no spills."""

def _commit():
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "csrc"], capture_output=True,
                               text=True, timeout=30).stdout.strip()
        return head + (" (+ uncommitted csrc changes)" if dirty else "")
    except OSError:
        return "?"


def _cpu():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def build_report(shapes, dtypes, nvcc, cuobjdump):
    with tempfile.TemporaryDirectory() as workdir:
        planner = make_planner(workdir)
        rows, kernels = [], []
        for name, mode, B, T, U in shapes:
            for dtype in dtypes:
                acc = "float" if dtype == "fp32" else "double"
                p = planner(mode, B, T, U, 4 if dtype == "fp32" else 8)
                if p["error"]:
                    rows.append(dict(name=name, mode=mode, B=B, T=T, U=U, dtype=dtype, plan=p, key=None))
                    continue
                key = (acc, mode, p["vt"], p["stages"], p["cluster"] > 1)
                if key not in kernels:
                    kernels.append(key)
                rows.append(dict(name=name, mode=mode, B=B, T=T, U=U, dtype=dtype, plan=p, key=key))
        log, cubin, flags = compile_kernels(nvcc, kernels, workdir)
        resources = parse_ptxas(log)
        sass = parse_sass(_run([cuobjdump, "-sass", cubin]))
    for row in rows:
        if row["key"] is None:
            continue
        mangled = _mangled_key(*row["key"])
        row["res"] = next((v for k, v in resources.items() if mangled in k), None)
        body = next((step_loop(v, row["key"][4]) for k, v in sass.items() if mangled in k), None)
        row["loop"] = classify(body) if body else None
    return rows, flags


def render(rows, flags, nvcc, cuobjdump):
    lines = [
        "# CUDA lattice: static cost report (sm_90)",
        "",
        f"Generated by `benchmarks/static_cuda.py` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} "
        f"UTC. No GPU was used: registers and spills from ptxas, instructions from the SASS.",
        "",
        f"* commit: {_commit()}",
        f"* machine: {_cpu()}, {platform.platform()}",
        f"* nvcc: {_version(nvcc)}; cuobjdump: {_version(cuobjdump)}",
        f"* flags: `{flags}` (the real build's, csrc/lattice_cuda_kernels.cuh)",
        "* plans: csrc/lattice_cuda_plan.h with need_grad (alpha and beta CTAs), on an H200 model (132 SMs, "
        "227 KiB shared memory per CTA, clusters placed in 8 GPCs of 16-18 SMs)",
        "* step loop: the innermost SASS loop holding the per-step barrier; instructions one warp issues per step",
        "",
        "| shape | collapse | B, T, U | dtype | plan (cluster x threads x VT, stages) | regs | spill st/ld (B) "
        "| smem (B) | CTAs/SM | warps/SM | instr / warp-step | MUFU | SHFL | shared ld/st | cp.async | goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        p = row["plan"]
        collapse = "preserve" if row["mode"] == PRESERVE else "standard"
        head = f"| {row['name']} | {collapse} | {row['B']}, {row['T']}, {row['U']} | {row['dtype']} "
        if row["key"] is None:
            lines.append(head + "| no plan (band too wide) |" + " |" * 11)
            continue
        plan = f"{p['cluster']} x {p['threads']} x {p['vt']}, {p['stages']}"
        res, loop = row.get("res"), row.get("loop")
        if res is None or loop is None:
            lines.append(head + f"| {plan} | ? | ? | {p['smem']} |" + " ? |" * 8)
            continue
        per_sm = _ctas_per_sm(p["threads"], p["smem"], res["regs"])
        spills = res["spill_stores"] + res["spill_loads"]
        goal_ok = loop["total"] <= GOAL[row["mode"]] and (row["dtype"] != "fp32" or spills == 0)
        goal = f"{'met' if goal_ok else 'NOT met'} (<= {GOAL[row['mode']]}" + (
            ", no spills)" if row["dtype"] == "fp32" else ")")
        lines.append(head + f"| {plan} | {res['regs']} | {res['spill_stores']}/{res['spill_loads']} | {p['smem']} "
                     f"| {per_sm} | {per_sm * p['threads'] // 32} | {loop['total']} | {loop['mufu']} | {loop['shfl']} "
                     f"| {loop['shared']} | {loop['cp_async']} | {goal} |")
    lines += ["", BEFORE, ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="*", default=[s[0] for s in SHAPES], choices=[s[0] for s in SHAPES])
    parser.add_argument("--dtypes", nargs="*", default=["fp32", "fp64"], choices=["fp32", "fp64"])
    parser.add_argument("--out", default=os.path.join(RESULTS, "static_cuda.md"))
    args = parser.parse_args(argv)
    nvcc, cuobjdump = find_tools()
    if nvcc is None or cuobjdump is None:
        print(f"static_cuda: skipped (nvcc: {nvcc or 'not found'}, cuobjdump: {cuobjdump or 'not found'})")
        return 0
    shapes = [s for s in SHAPES if s[0] in args.shapes]
    rows, flags = build_report(shapes, args.dtypes, nvcc, cuobjdump)
    text = render(rows, flags, nvcc, cuobjdump)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
