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
import collections
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


def compile_kernels(nvcc, kernels, workdir, csrc=CSRC, posteriors=()):
    """kernels: list of (acc, mode, vt, stages, cluster); posteriors: list of (acc, mode). Compiles them for
    sm_90 from the sources in `csrc`. Returns (ptxas log, cubin path, PTX path, flags)."""
    flags = _load_build_flags()
    source = os.path.join(workdir, "kernels.cu")
    with open(source, "w") as f:
        f.write('#include "lattice_cuda_kernels.cuh"\nnamespace mdlm_ctc {\nnamespace cuda_lattice {\n')
        for acc, mode, vt, stages, cluster in kernels:
            f.write(f"template __global__ void {kernel_name(acc, mode, vt, stages, cluster)}"
                    f"(const RecurrenceParams<{acc}>);\n")
        for acc, mode in posteriors:
            f.write(f"template __global__ void posterior_kernel<{acc}, {mode}>(const PosteriorParams<{acc}>);\n")
        f.write("}\n}\n")
    cubin = os.path.join(workdir, "kernels.cubin")
    keep = os.path.join(workdir, "keep")
    os.makedirs(keep, exist_ok=True)
    command = [nvcc, "-cubin", source, "-o", cubin, *flags.cuda_flags(["90"]), "-Xptxas", "-v", f"-I{csrc}",
               "-keep", "-keep-dir", keep]
    log = _run(command)
    return log, cubin, os.path.join(keep, "kernels.ptx"), " ".join(flags.cuda_flags(["90"]))


def _mangled_key(acc, mode, vt, stages, cluster):
    return f"recurrence_kernelI{'f' if acc == 'float' else 'd'}Li{mode}ELi{vt}ELi{stages}ELb{int(cluster)}E"


def _mangled_posterior(acc, mode):
    return f"posterior_kernelI{'f' if acc == 'float' else 'd'}Li{mode}EE"


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


# ---- barriers, fences, cluster and async-copy instructions: the device-only code ------------------------
#
# The host emulator runs the kernel code of lattice_cuda.cuh with its own execution model (EmuDev); it never
# sees CudaDev's inline PTX and intrinsics (lattice_cuda_kernels.cuh), the only code that decides the
# memory-ordering semantics on the GPU. So the compiled kernels' synchronisation is read back here, from
# the PTX (the semantics the source asks for: PTX ISA 9.7.13 bar/barrier, barrier.cluster, membar/fence;
# 9.7.9.25 cp.async; 9.7.9.6 shfl.sync) and from the SASS (what ptxas made of it: barrier ids, the
# MEMBAR of a release, the CCTL of an acquire), and compared with the list the design requires.

SYNC_PTX = re.compile(r"^\s*(?:@!?%\w+\s+)?((?:bar|barrier|fence|membar|cp\.async|mapa|shfl|atom|red|redux|mbarrier|"
                      r"griddepcontrol|ld\.shared::cluster|st\.shared::cluster|st\.async|multimem|elect)\.?[^;]*);",
                      re.M)
PTX_MOV = re.compile(r"^\s*mov\.[bsu]32\s+(%r\d+),\s*(-?(?:0x[0-9a-fA-F]+|\d+));", re.M)
PTX_ENTRY = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+)?\.entry\s+(\S+?)\(", re.M)
# (WARPSYNC and BSSY/BSYNC are the compiler's convergence bookkeeping, not memory ordering: not listed)
SYNC_SASS_OPS = ("BAR", "MEMBAR", "FENCE", "ERRBAR", "CGAERRBAR", "UCGABAR_ARV", "UCGABAR_WAIT", "CCTL", "LDGSTS",
                 "LDGDEPBAR", "DEPBAR", "SHFL", "ATOM", "ATOMS", "ATOMG", "RED", "REDG", "SYNCS", "ARRIVES")


def _immediate(token, movs):
    token = token.strip()
    value = movs.get(token, token)
    try:
        number = int(value, 0)
    except ValueError:
        return "%r" if value.startswith("%") else value
    return f"0x{number & 0xffffffff:x}" if number < 0 or number > 255 else str(number)


def _normalise_ptx(instruction, movs):
    op, rest = (re.split(r"\s+", instruction, maxsplit=1) + [""])[:2]
    operands = [o.strip() for o in rest.split(",")] if rest.strip() else []
    if op.startswith(("bar.red", "barrier.red")):  # p, a{, b}, {!}c
        return f"{op} {_immediate(operands[1], movs)}"
    if op.startswith(("bar.sync", "barrier.sync", "bar.arrive", "barrier.arrive", "bar.cta", "barrier.cta")):
        return f"{op} " + ", ".join(_immediate(o, movs) for o in operands)
    if op.startswith(("cp.async.ca.", "cp.async.cg.")):  # [dst], [src], size{, src-size}
        return f"{op} {operands[2]}"
    if op.startswith("cp.async"):
        return f"{op} {', '.join(operands)}".strip()
    if op.startswith("shfl.sync"):  # d|p, a, b, c, membermask
        return f"{op} " + ", ".join(_immediate(o, movs) for o in operands[2:])
    return op  # barrier.cluster.*, fence.*, membar.*, mapa.*, atom.*, red.*: the opcode is the semantics


def parse_ptx_sync(ptx):
    """{kernel (mangled): Counter of normalised synchronisation instructions}"""
    out = {}
    entries = list(PTX_ENTRY.finditer(ptx))
    for i, entry in enumerate(entries):
        body = ptx[entry.end(): entries[i + 1].start() if i + 1 < len(entries) else len(ptx)]
        movs = dict(PTX_MOV.findall(body))
        out[entry.group(1)] = collections.Counter(_normalise_ptx(m.group(1).strip(), movs)
                                                  for m in SYNC_PTX.finditer(body))
    return out


def _normalise_sass(text):
    text = re.sub(r"^@!?U?P\w+\s+", "", text.strip())
    op, _, rest = text.partition(" ")
    if op.split(".")[0] not in SYNC_SASS_OPS:
        return None
    operands = [o.strip() for o in rest.split(",")] if rest.strip() else []
    operands = [re.sub(r"^!?U?P\d$", "P", re.sub(r"^U?R\d+$", "R", o)) for o in operands]
    # shuffles: the mode only (PTX gives lane, clamp and mask; SASS has an immediate form and, where the
    # compiler cannot prove the warp converged, a register form behind WARPSYNC.COLLECTIVE)
    if op.startswith(("SHFL", "LDGSTS", "ATOM", "RED")):
        return op
    return f"{op} {', '.join(operands)}".strip()


def parse_sass_sync(functions):
    """{kernel (mangled): Counter of normalised synchronisation instructions} from parse_sass's output."""
    return {name: collections.Counter(n for n in (_normalise_sass(text) for _, text in body) if n)
            for name, body in functions.items()}


# What each instruction means (PTX ISA, CUDA C++ Programming Guide), for the report.
PTX_SEMANTICS = [
    ("bar.red.or.pred 0", "CTA barrier 0 over all non-exited threads with an OR reduction (__syncthreads_or): "
                          "orders the memory accesses of the CTA's threads before it"),
    ("bar.sync 1, %r", "named barrier 1 (.aligned) over a thread count in a register (the warps the row's band "
                       "needs): orders the memory accesses of its participants"),
    ("barrier.cluster.arrive.aligned", "cluster barrier arrive, .release (the default .sem): this thread's prior "
                                       "accesses are visible to every thread of the cluster after its wait"),
    ("barrier.cluster.wait.aligned", "cluster barrier wait, .acquire (the default): waits for every non-exited "
                                     "thread of the cluster to arrive; also proves every CTA has started"),
    ("mapa.u64", "the generic address of a shared variable in another CTA of the cluster (no access)"),
    ("cp.async.ca.shared.global", "asynchronous copy of 4 or 8 bytes global -> shared, L1-cached; its write "
                                  "is visible to the issuing thread only after the wait_group of its group"),
    ("cp.async.commit_group", "closes the thread's current cp.async group"),
    ("cp.async.wait_group", "waits until at most N of the thread's groups are pending; orders nothing else"),
    ("shfl.sync", "warp shuffle (lane, clamp, member mask): exchanges registers, orders no memory"),
]
SASS_SEMANTICS = [
    ("BAR.RED.OR", "CTA barrier 0 with an OR reduction"),
    ("BAR.SYNC.DEFER_BLOCKING 0x1", "named barrier 1, thread count in a register"),
    ("BAR.SYNC.DEFER_BLOCKING 0x0", "barrier.cluster's fallback when the kernel runs without a cluster (never: "
                                    "cluster kernels are only launched as clusters)"),
    ("MEMBAR.ALL.GPU", "the release of barrier.cluster.arrive (with ERRBAR, CGAERRBAR)"),
    ("UCGABAR_ARV", "cluster barrier arrive"),
    ("UCGABAR_WAIT", "cluster barrier wait"),
    ("CCTL.IVALL", "L1 invalidation: the acquire of barrier.cluster.wait"),
    ("LDGSTS", "cp.async"),
    ("LDGDEPBAR", "cp.async.commit_group"),
    ("DEPBAR.LE SB0", "cp.async.wait_group N"),
    ("SHFL", "shuffle (its lane, clamp and mask: see the PTX)"),
]


def _semantics(item, table):
    return next((meaning for prefix, meaning in table if item.startswith(prefix)), "")


def required_sync(kernel):
    """The synchronisation the design requires of a compiled kernel: (PTX, SASS, SASS allowed): the
    instructions it must contain, and those it may contain besides. `kernel` is ("recurrence", acc, mode,
    VT, stages, cluster) or ("posterior", acc, mode)."""
    if kernel[0] == "posterior":
        # lane 0 broadcasts the special emission (shfl idx 0), the slack sum is a fixed-order butterfly;
        # standard CTC's slack does not use the broadcast, which ptxas may then drop
        ptx = {"shfl.sync.idx.b32 0, 31, 0xffffffff"}
        ptx |= {f"shfl.sync.bfly.b32 {d}, 31, 0xffffffff" for d in (16, 8, 4, 2, 1)}
        if kernel[2] == PRESERVE:
            return ptx, {"SHFL.IDX", "SHFL.BFLY"}, set()
        return ptx, {"SHFL.BFLY"}, {"SHFL.IDX"}
    _, acc, mode, vt, stages, cluster = kernel
    size = 4 if acc == "float" else 8
    ptx = {
        "bar.red.or.pred 0",                          # the NaN scan: __syncthreads_or over the CTA
        f"cp.async.ca.shared.global {size}",          # the emission stages, one element per copy
        "cp.async.commit_group",                      # one group per step
        f"cp.async.wait_group {stages - 2}",          # this thread's copies of the step have landed
        "shfl.sync.up.b32 1, 0, 0xffffffff",          # slot j0 - 1 from the lane below (full warp)
        "shfl.sync.down.b32 1, 31, 0xffffffff",       # slot j0 + VT from the lane above
    }
    sass = {"BAR.RED.OR.DEFER_BLOCKING 0x0, P", "LDGSTS.E.64" if size == 8 else "LDGSTS.E", "LDGDEPBAR",
            f"DEPBAR.LE SB0, 0x{stages - 2:x}", "SHFL.UP", "SHFL.DOWN"}
    if cluster:
        # the step barrier and the final one: barrier.cluster.arrive (release) + wait (acquire), aligned;
        # the DSMEM edge cells are pushed through mapa'd generic addresses
        ptx |= {"barrier.cluster.arrive.aligned", "barrier.cluster.wait.aligned", "mapa.u64"}
        sass |= {"MEMBAR.ALL.GPU", "ERRBAR", "CGAERRBAR", "UCGABAR_ARV", "UCGABAR_WAIT", "CCTL.IVALL",
                 "BAR.SYNC.DEFER_BLOCKING 0x0"}
    else:
        ptx |= {"bar.sync 1, %r"}                     # the step barrier: named barrier 1, the active warps
        sass |= {"BAR.SYNC.DEFER_BLOCKING 0x1, R"}
    return ptx, sass, set()


def check_sync(kernel, ptx, sass):
    """Differences between a compiled kernel's synchronisation (Counters) and the design's: [] if none."""
    need_ptx, need_sass, may_sass = required_sync(kernel)
    problems = [f"PTX lacks `{i}`" for i in sorted(need_ptx - set(ptx))]
    problems += [f"PTX has `{i}` (x{ptx[i]}), which the design does not" for i in sorted(set(ptx) - need_ptx)]
    problems += [f"SASS lacks `{i}`" for i in sorted(need_sass - set(sass))]
    problems += [f"SASS has `{i}` (x{sass[i]}), which the design does not"
                 for i in sorted(set(sass) - need_sass - may_sass)]
    if kernel[0] == "recurrence" and kernel[5]:
        # every arrive is a release followed by its wait (an acquire)
        arrive, wait = ptx["barrier.cluster.arrive.aligned"], ptx["barrier.cluster.wait.aligned"]
        if arrive != wait:
            problems.append(f"PTX: {arrive} cluster arrives but {wait} waits")
        if not sass["UCGABAR_ARV"] == sass["UCGABAR_WAIT"] == sass["MEMBAR.ALL.GPU"] == sass["CCTL.IVALL"]:
            problems.append("SASS: cluster arrives, waits, their MEMBAR.ALL.GPU and CCTL.IVALL do not pair up "
                            f"({sass['UCGABAR_ARV']}, {sass['UCGABAR_WAIT']}, {sass['MEMBAR.ALL.GPU']}, "
                            f"{sass['CCTL.IVALL']})")
    return problems


def sync_of(kernels, posteriors, ptx_path, cubin, cuobjdump):
    """{kernel key: (PTX Counter, SASS Counter)} of compiled kernels (keys as in required_sync)."""
    ptx = parse_ptx_sync(open(ptx_path).read())
    sass = parse_sass_sync(parse_sass(_run([cuobjdump, "-sass", cubin])))
    out = {}
    for key in [("recurrence", *k) for k in kernels] + [("posterior", *k) for k in posteriors]:
        mangled = _mangled_key(*key[1:]) if key[0] == "recurrence" else _mangled_posterior(*key[1:])
        p = next((v for k, v in ptx.items() if mangled in k), None)
        s = next((v for k, v in sass.items() if mangled in k), None)
        if p is None or s is None:
            raise RuntimeError(f"kernel {key} not found in the compiled PTX/SASS")
        out[key] = (p, s)
    return out


def compile_sync(kernels, posteriors, csrc=CSRC, tools=None):
    """Compiles the kernels from the sources in `csrc` and returns sync_of(...) (tests, mutation suite)."""
    nvcc, cuobjdump = tools or find_tools()
    with tempfile.TemporaryDirectory() as workdir:
        _, cubin, ptx_path, _ = compile_kernels(nvcc, kernels, workdir, csrc=csrc, posteriors=posteriors)
        return sync_of(kernels, posteriors, ptx_path, cubin, cuobjdump)


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

# The start-of-cluster fix of issue 19 (no DSMEM store before the first cluster barrier), measured like the
# rest of this report on the cluster plans' kernels (fp32 / fp64, preserve / standard, VT = 4, 4 stages).
FIX_COST = """The start-of-cluster fix (issue 19: the frame-0 edge cell is no longer pushed into the neighbour CTA
before the first cluster barrier; each CTA writes that -inf cell itself), measured with the same toolkit, flags
and rules on the cluster plans' kernels, before (9588246) -> after: no barrier added (4 static cluster
arrive/wait pairs per kernel, as before; the alternative fix, an early barrier.cluster.arrive.relaxed with its
wait before the first push, would add one cluster barrier per launch); step loop unchanged in fp32 (236 / 341
instructions per warp-step, preserve / standard), fp64 839 -> 844 / 1686 -> 1667; registers 55 -> 58 / 63 -> 62
(fp32), 62 -> 64 / 96 -> 97 (fp64), so wide-preserve fp32 holds 4 instead of 5 CTAs per SM and wide-standard
fp64 2 instead of 3, irrelevant for their 20 CTAs on 132 SMs; whole kernel 2216 -> 2240 / 2536 -> 2632 (fp32),
3384 -> 3512 / 5400 -> 5504 (fp64) static SASS instructions, run once per thread (the -inf writes); static
DSMEM stores (generic ST) 4 -> 2 (preserve) / 8 -> 4 (standard): the prologue's are gone.
Non-cluster kernels: byte-identical SASS (so are all kernels under the checked-pointer refactor of the emulator)."""

# A model of what bounds a plan's time (SPEC G2: lattice <= 0.5 ms, <= 1 ms as a first step). Not a measurement.
CLOCK_GHZ = 1.98         # H200 boost clock (background/kernels.md §6)
HBM_TBPS = 4.8
LATENCY_CYCLES = "150-250"  # per step, one warp's dependent chain [est.]: bar.sync, LDS, SHFL, 2 MUFU, ~6 ALU, STS


def bound_model(row):
    """Cycles per step and time of a plan's recurrence (alpha and beta run at once on different SMs) plus the
    posterior pass's memory traffic, from the static counts: one CTA per SM (B * 2 CTAs << 132 SMs), warp w
    on sub-partition w % 4, each sub-partition issuing one instruction per cycle and 4 SFU results per cycle."""
    p, loop = row["plan"], row["loop"]
    warps = p["threads"] // 32
    busiest = -(-warps // 4)
    issue = busiest * loop["total"]
    mufu = busiest * loop["mufu"] * 8
    steps = row["T"]
    acc = 4 if row["dtype"] == "fp32" else 8
    W = p["W"]
    arrays = 1 if row["mode"] == PRESERVE else 2
    store = 2 * arrays * row["B"] * (steps + 1) * (W + 1) * acc  # written by the recurrence, read by the posterior
    table = row["B"] * steps * W * acc                           # read and written by the posterior
    traffic = 2 * store + 2 * table
    recurrence_ms = steps * max(issue, mufu) / (CLOCK_GHZ * 1e6)
    posterior_ms = traffic / (HBM_TBPS * 1e9)
    return dict(warps=warps, busiest=busiest, issue=issue, mufu=mufu, steps=steps, recurrence_ms=recurrence_ms,
                traffic_mb=traffic / 1e6, posterior_ms=posterior_ms)


def render_bounds(rows):
    lines = [
        "## What bounds each plan (a model from the counts above, not a measurement)",
        "",
        f"Per step, the busiest SM sub-partition issues `busiest warps x instr / warp-step` instructions (one per "
        f"cycle; warp w runs on sub-partition w % 4) and `busiest x MUFU x 8` cycles of SFU work; a step cannot "
        f"be shorter than one warp's dependent chain either (~{LATENCY_CYCLES} cycles [est.]: the step barrier, an "
        f"edge-cell load, a shuffle, two MUFU, ~6 ALU and the edge-cell store; a cluster step adds a cluster "
        f"barrier whose release is a MEMBAR.ALL.GPU, not measured). The recurrence takes T steps at "
        f"{CLOCK_GHZ} GHz (alpha and beta run at once); the posterior pass then moves the band rows (written by "
        f"the recurrence, read back) and the table (read and written) at {HBM_TBPS} TB/s. Occupancy is not a "
        f"bound here: B x 2 CTAs (or clusters) of a SPEC shape all fit in one wave, one CTA per SM.",
        "",
        "| shape | dtype | warps / CTA | busiest sub-partition | issue cycles / step | SFU cycles / step | steps "
        "| recurrence (issue-bound) | posterior traffic | posterior (HBM) | bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.get("loop") is None:
            continue
        m = bound_model(row)
        bound = "instruction issue" if m["issue"] >= m["mufu"] else "SFU"
        lines.append(f"| {row['name']} | {row['dtype']} | {m['warps']} | {m['busiest']} warps | {m['issue']} "
                     f"| {m['mufu']} | {m['steps']} | {m['recurrence_ms']:.2f} ms | {m['traffic_mb']:.0f} MB "
                     f"| {m['posterior_ms']:.2f} ms | {bound} x steps |")
    lines += ["", LEVERS]
    return lines


LEVERS = """What this says about SPEC G2 (B=8, T=2048, U=1024; fp32): the recurrence is bound by instruction issue per
step x 2048 steps: its band of 1025 slots takes 9 warps at VT = 4 (the ninth holds one slot), so one
sub-partition issues for 3 warps, ~3 x 212 (preserve) / 3 x 319 (standard) cycles a step, ~0.66 / ~0.99 ms,
plus 0.08 / 0.14 ms of posterior traffic: ~0.74 / ~1.13 ms, above the 0.5 ms goal (the latency floor,
2048 x ~200 cycles ~ 0.2 ms, is not what binds). Measured levers (static counts, this toolkit), none adopted without a GPU to time
them:
* idle warps: in a triangular band (T = 2U) the warps above the band's top hold -inf, about half of them at any
  step; skipping their cells (a warp-uniform branch, a -inf edge refresh) takes an idle warp to ~121 (preserve) /
  ~135 (standard) instructions a step, but the branch costs the live path +11..+28 instructions (the codegen of
  three variants tried): G2 modelled -19% (preserve) / -25% (standard), plateau bands (G1, G3) +6%;
* the fixed per-step cost: the prefetch of a future step's emissions (index math, VT predicated cp.async, the
  special emission, between the step barrier and the commit) is ~95 of the 212 instructions of G2-preserve's
  loop and ~98 of G2-standard's 319, paid by every warp, in band or not;
* one warp per sub-partition (4 warps: VT = 9 at S = 1025) would issue ~300 instructions a step (~0.3 ms) but
  exposes the whole dependent chain and needs a VT outside {1, 2, 4, 8}."""


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
        posteriors = sorted({(key[0], key[1]) for key in kernels})
        log, cubin, ptx_path, flags = compile_kernels(nvcc, kernels, workdir, posteriors=posteriors)
        resources = parse_ptxas(log)
        sass = parse_sass(_run([cuobjdump, "-sass", cubin]))
        sync = sync_of(kernels, posteriors, ptx_path, cubin, cuobjdump)
    for row in rows:
        if row["key"] is None:
            continue
        mangled = _mangled_key(*row["key"])
        row["res"] = next((v for k, v in resources.items() if mangled in k), None)
        function = next((v for k, v in sass.items() if mangled in k), None)
        body = step_loop(function, row["key"][4]) if function else None
        row["loop"] = classify(body) if body else None
        row["kernel_instructions"] = len(function) if function else None
    return rows, flags, sync


def _kernel_label(key):
    if key[0] == "posterior":
        return f"posterior_kernel<{key[1]}, {key[2]}>"
    return kernel_name(*key[1:])


def render_sync(sync):
    """The barrier, fence, cluster, shuffle and cp.async instructions of each compiled kernel, with their
    semantics and the design check."""
    lines = [
        "## Synchronisation of the compiled kernels (the device-only code the emulator cannot run)",
        "",
        "Every barrier, fence, cluster, shuffle and cp.async instruction of each kernel above (and of the "
        "posterior kernels), from the PTX (the semantics asked for; registers resolved to the constants "
        "moved into them) and from the SASS (what ptxas made of it), with the number of static occurrences. "
        "`design` compares them with the list the kernel's design requires (`required_sync` in "
        "benchmarks/static_cuda.py; tests/test_static_cuda.py fails CI on any difference).",
        "",
        "| kernel | PTX | SASS | design |",
        "|---|---|---|---|",
    ]
    for key, (ptx, sass) in sync.items():
        problems = check_sync(key, ptx, sass)
        lines.append(f"| `{_kernel_label(key)}` | " + "<br>".join(f"{n} x `{i}`" for i, n in sorted(ptx.items()))
                     + " | " + "<br>".join(f"{n} x `{i}`" for i, n in sorted(sass.items())) + " | "
                     + ("as required" if not problems else "DIFFERS: " + "; ".join(problems)) + " |")
    seen_ptx = sorted({i for ptx, _ in sync.values() for i in ptx})
    seen_sass = sorted({i for _, sass in sync.values() for i in sass})
    lines += ["", "What they mean (PTX ISA §9.7.13 bar/barrier, barrier.cluster, membar/fence; §9.7.9.25 cp.async; "
              "§9.7.9.6 shfl.sync; the SASS by what the PTX compiles to):", ""]
    lines += [f"* `{i}`: {_semantics(i, PTX_SEMANTICS) or '?'}" for i in seen_ptx]
    lines += [f"* `{i}` (SASS): {_semantics(i, SASS_SEMANTICS) or '?'}" for i in seen_sass]
    return lines


def render(rows, flags, nvcc, cuobjdump, sync=None):
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
    lines += ["", BEFORE, "", FIX_COST, ""]
    lines += render_bounds(rows) + [""]
    if sync:
        lines += render_sync(sync) + [""]
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
    rows, flags, sync = build_report(shapes, args.dtypes, nvcc, cuobjdump)
    text = render(rows, flags, nvcc, cuobjdump, sync)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
