"""Static resource report of the Triton kernels (SPEC §6 S2), from sm_90 cubins, no GPU needed.

For each SPEC §6 shape (G1-G4, plus G1 unvalidated without a band bound), every kernel the launchers
launch there is compiled for sm_90 exactly as the launcher would launch it (constexprs, num_warps,
Triton's argument specialisation; see ``mdlm_ctc.triton_kernels.resources``), and its registers,
spills, shared memory, blocks per SM and resident warps per SM (H200 limits) are tabulated, with the
lattice plan's tiling (tile, tiles per step, states in the last tile) and sequential depth (dependent
barrier-separated tile steps on the critical path, for a full-length row and the cost model's bound). A
second table lists every other config a launcher can choose (the dense kernel's autotune list and the
block-size caps per dtype and chunk length). Writes ``benchmarks/results/static_triton.md``.

The lattice's cost model is calibrated on these cubins: ``sass_counts`` reads each lattice kernel's
SASS (cuobjdump, as benchmarks/static_cuda.py does for the CUDA lattice) and counts the instructions one
warp issues per tile of a step (the innermost loop holding special-function work) and per dependent step
beyond its tiles (the loop around it); ``--calibrate`` fits ``slack_ctc.SASS_TILE`` / ``SASS_STEP`` on every
lattice config, and the report's calibration table compares the fitted model with the counts at the SPEC
§6 shapes, beside the predicted lattice times of both GPU backends and the one ``backend="auto"`` picks.

    python benchmarks/static_triton.py              # write the report
    python benchmarks/static_triton.py --check      # also exit 1 on a spill (CI runs the same check as a test)
    python benchmarks/static_triton.py --calibrate  # fit the cost model's SASS constants (minutes)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compiled, not interpreted (before Triton is imported)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402
import static_cuda  # noqa: E402  (its SASS parser)

from mdlm_ctc import lattice_cost  # noqa: E402
from mdlm_ctc.triton_kernels import resources, slack_ctc  # noqa: E402

MODELLED = {"_transfer_kernel": "transfer", "_boundary_kernel": "boundary", "_sweep_kernel": "sweep"}

COLUMNS = ("kernel", "config", "grid", "regs", "spills (B)", "smem (B)", "blocks/SM", "warps/SM", "limited by",
           "logits KB read per iteration per SM")


def _in_flight_kb(launch, r):
    """Vocabulary passes: logits bytes that one loop iteration of every resident block loads (issued
    before any of them is used); the emissions loop reads two tiles per iteration."""
    if launch.name not in resources.VOCAB_KERNELS:
        return ""
    logits = next(a for a in launch.args if hasattr(a, "dtype") and a.dtype.is_floating_point)
    per_block = launch.kwargs["BLOCK_V"] * logits.element_size() * (2 if launch.name == "_emissions_kernel" else 1)
    return f"{r.blocks_per_sm * per_block / 1024:.0f}"


def _row(launch):
    r = resources.resources(launch)
    grid = " x ".join(str(g) for g in launch.grid)
    return (f"`{launch.name}`", launch_config(launch), grid, str(r.regs), str(r.spills), str(r.smem),
            str(r.blocks_per_sm), str(r.resident_warps), r.limiter, _in_flight_kb(launch, r)), r


def launch_config(launch):
    return resources.describe(launch)


def _table(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _plan(workload):
    if workload.linear:
        return None
    W = workload.width()
    S = W + 1 if workload.mode == slack_ctc.PRESERVE else 2 * W + 1
    L = slack_ctc.choose_chunk_len(workload.B, workload.T, S, workload.mode, resources.H200_SMS)
    depth = slack_ctc.sequential_depth(workload.T, S, workload.mode, L)
    row = slack_ctc.row_depth(workload.T, workload.U, S, workload.mode, L)
    return W, S, L, depth, row


def sass_counts(launch) -> dict:
    """SASS instructions of a compiled lattice launch: ``tile``, one warp's instructions per tile of a step (the
    innermost loop holding MUFU work, the longer direction), ``step``, those of the loop around it beyond one
    tile (0 where the tile loop is the step loop), and ``elements`` per thread of a tile."""
    from triton import knobs

    _, compiled = resources.compile_launch(launch)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    instructions = next(iter(static_cuda.parse_sass(text).values()))
    loops = []
    for address, text in instructions:
        m = static_cuda.BRANCH.search(text)
        if m and int(m.group(1), 16) < address:
            body = [t for a, t in instructions if int(m.group(1), 16) <= a <= address]
            loops.append((int(m.group(1), 16), address, len(body), any("MUFU" in t for t in body)))
    work = [lp for lp in loops if lp[3]]
    inner = [lp for lp in work if not any(o is not lp and lp[0] <= o[0] and o[1] <= lp[1] for o in work)]
    tile, step = 0, 0
    for lo, hi, n, _ in inner:
        around = [o for o in loops if o[:2] != (lo, hi) and o[0] <= lo and hi <= o[1]]
        tile = max(tile, n)
        if around:
            step = max(step, min(around, key=lambda o: o[1] - o[0])[2] - n)
    return dict(tile=tile, step=step, elements=_elements(launch))


def _elements(launch) -> float:
    meta = launch.kwargs
    lanes = {"_transfer_kernel": meta.get("TILE_I", 1) * meta.get("BLOCK_D", 1),
             "_boundary_kernel": meta.get("BLOCK_X", 1) * meta.get("BLOCK_D", 1)}.get(launch.name, meta.get("BLOCK_S", 1))
    return lanes / (32 * meta.get("num_warps", 4))


def model_tile(launch) -> float:
    return slack_ctc.sass_per_tile(MODELLED[launch.name], launch.kwargs["MODE"], _elements(launch),
                                   launch.kwargs.get("TAIL", 0) > 0, launch.kwargs.get("BLOCK_D", 0))


def _calibration_rows():
    """The SPEC §6 lattice launches (and the sweep's): counted SASS per tile and per step against the model."""
    rows, seen = [], set()
    for workload, launch in [(w, la) for w in resources.spec_workloads() if not w.linear for la in resources.record(w)] + \
            resources.benchmark_launches():
        if launch.name not in MODELLED:
            continue
        key = (launch.name, resources.describe(launch))
        if key in seen:
            continue
        seen.add(key)
        counted = sass_counts(launch)
        modelled = model_tile(launch)
        step = slack_ctc.SASS_STEP.get((MODELLED[launch.name], launch.kwargs["MODE"]), 0)
        rows.append((workload.name, f"`{launch.name}`", resources.describe(launch), f"{counted['elements']:g}",
                     str(counted["tile"]), f"{modelled:.0f}", f"{(modelled - counted['tile']) / counted['tile']:+.0%}",
                     str(counted["step"] or ""), str(step if counted["step"] else "")))
    return rows


def calibrate():
    """Least-squares fit of SASS_TILE (a + b x elements + c x tail) and SASS_STEP (median) on every lattice
    config ``lattice_configs`` can give; prints the constants and the fit's worst errors."""
    import numpy as np

    data = {}
    for _, launch in resources.lattice_launches():
        if launch.name in MODELLED:
            c = sass_counts(launch)
            data.setdefault((MODELLED[launch.name], launch.kwargs["MODE"]), []).append(
                (max(c["elements"], 1.0), 1.0 if launch.kwargs.get("TAIL") else 0.0, c["tile"], c["step"]))
    for key, points in sorted(data.items()):
        X = np.array([[1.0, e, t] for e, t, _, _ in points])
        y = np.array([p[2] for p in points], dtype=float)
        if key[0] == "transfer":
            X = X[:, :2]
        coef = np.linalg.lstsq(X, y, rcond=None)[0]
        rel = np.abs(X @ coef - y) / y
        steps = [p[3] for p in points if p[3]]
        print(f"SASS_TILE[{key}] = {tuple(int(round(c)) for c in coef)}; {len(points)} configs, worst {rel.max():.0%}, "
              f"rms {np.sqrt((rel ** 2).mean()):.0%}" + (f"; SASS_STEP = {int(np.median(steps))}" if steps else ""))


def _prediction_line(workload, W, L):
    """Predicted lattice times of both GPU backends at an H200 and the one ``backend="auto"`` runs."""
    B, T, mode = workload.B, workload.T, workload.mode
    posterior = slack_ctc.posterior_us(B, T, W, mode, resources.H200_SMS)
    triton_us = lattice_cost.triton_lattice_us(B, T, W, mode, resources.H200_SMS) + posterior
    cuda_us = lattice_cost.cuda_lattice_us(B, T, W, mode, resources.H200_SMS) + posterior
    choice, _ = lattice_cost.gpu_lattice(B, T, W, mode, resources.H200_SMS)
    return (f"Predicted lattice (alpha, beta, posteriors) at an H200 [est.]: Triton {triton_us:.0f} us at L = "
            f"{L or 'one chunk'}, CUDA {cuda_us:.0f} us; `backend=\"auto\"` runs `{choice}`.")


def _tile_rows(workload, S, L, row):
    """The lattice plan's tiling: per kernel with dependent tile steps, its tile, the tiles of a step over a
    band of S states (the last one holding the rest and up to TAIL more), and the dependent tile steps."""
    configs = slack_ctc.lattice_configs(workload.T, workload.width(), workload.mode, L)
    kernels = [("_sweep_kernel", "BLOCK_S", "step")] + ([("_boundary_kernel", "BLOCK_X", "chunk")] if L else [])
    rows = []
    for name, key, per in kernels:
        block, tail = configs[name][key], configs[name]["TAIL"]
        n = slack_ctc.n_tiles(S, block, tail)
        last = S - (n - 1) * block
        rows.append((f"`{name}`", f"{block} + {tail}", f"{n} per {per}", f"{last} of {block + tail}",
                     str(row["sweep" if name == "_sweep_kernel" else "boundary"])))
    if L:  # one tile per program; its programs run side by side, so their count is not depth
        tile_i = configs["_transfer_kernel"]["TILE_I"]
        programs = -(-S // tile_i)
        rows.append(("`_transfer_kernel`", f"{tile_i} x {configs['_transfer_kernel']['BLOCK_D']} per program",
                     f"1 per step (2 barriers); {programs} programs per chunk, in parallel",
                     f"{S - (programs - 1) * tile_i} of {tile_i} ({S / (programs * tile_i):.0%} of all lanes used)",
                     str(row["transfer"])))
    header = ("kernel", "tile (states + tail)", "tiles, band of S states", "states in the last tile / its lanes",
              "dependent tile steps, full-length row")
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(common.RESULTS, "static_triton.md"))
    parser.add_argument("--check", action="store_true", help="exit 1 if any choosable config spills")
    parser.add_argument("--calibrate", action="store_true", help="fit the cost model's SASS constants and exit")
    args = parser.parse_args(argv)
    if args.calibrate:
        calibrate()
        return 0

    stamp = common.stamp()
    lines = ["# Triton kernels: static resources at sm_90 (H200)", "",
             f"Generated by `benchmarks/static_triton.py` on {stamp['date']}, commit `{stamp['commit']}`; "
             f"triton {stamp['versions']['triton']}, torch {stamp['versions']['torch']}, "
             f"{resources.ptxas_version()} (Triton's bundled ptxas, `-v --gpu-name=sm_90a`). "
             f"Machine: {stamp['machine']['host_cpu']} (no GPU: cubins compiled, nothing run).", "",
             "Limits used: 65,536 registers per SM (allocated per warp in units of 256), 228 KB shared memory "
             "per SM (+1 KB reserved per block), 64 warps and 32 blocks per SM, 132 SMs. \"warps/SM\" is "
             "resident warps per SM (S2 asks >= 32 for the bandwidth-bound vocabulary passes: "
             "`_emissions_kernel`, `_dense_kernel`; the fused LM head, G4, has no Triton kernel of its own: "
             "it runs these kernels over its windows of frames and vocabulary). "
             "Lattice depth: dependent, barrier-separated tile steps on the critical path of the chosen plan, "
             "counted as the kernels' loops run them (`slack_ctc.row_depth`: the transfer kernel's steps, the "
             "boundary kernel's tiles over all chunks, the longest sweep program's tiles), and the predicted "
             "lattice times (the calibrated cost models: Triton's, see the calibration table, and the CUDA "
             "lattice's from its step loop in static_cuda.md) [est.: no GPU has timed either]. A step over a "
             "band of 2^k + r states, r <= 8, is tiles of 2^k whose last one takes the r extra states (`slack_ctc.tile_plan`), so "
             "no dependent step (sweep, boundary) has a nearly empty extra tile: the tiling table gives the "
             "states of the last tile. The transfer kernel's tiles are separate programs that run side by "
             "side (its last program's fill is shown; it adds no depth).", ""]
    spills = []
    for workload in resources.spec_workloads():
        shape = (f"N={workload.B * workload.T:,} frames" if workload.linear else
                 f"B={workload.B}, T={workload.T}, U={workload.U}")
        lines += [f"## {workload.name}: {shape}, V={workload.V:,}" + (f" ({workload.note})" if workload.note else ""),
                  ""]
        plan = _plan(workload)
        if plan is not None:
            W, S, L, depth, row = plan
            lines += [f"Table width W = {W}, states S = {S}; chunk length {L or 'none (one chunk)'}; "
                      f"lattice depth {row['total']} dependent tile steps for a full-length row (widest band "
                      f"{row['widest']} states), {depth} for a row whose band fills the table at every frame "
                      f"(the cost model's bound). " + _prediction_line(workload, W, L), ""]
            lines += _tile_rows(workload, S, L, row) + [""]
        rows = []
        for launch in resources.record(workload):
            row, r = _row(launch)
            rows.append(row)
            if r.spills or r.stack:
                spills.append((workload.name, row))
        lines += _table(rows) + [""]

    lines += ["## Cost-model calibration: SASS instructions per tile", "",
              "Instructions one warp issues per tile of a lattice step (the innermost loop holding MUFU work, the "
              "longer of alpha and beta), counted in the cubins of the SPEC §6 plans and the benchmark's sweep, "
              "against the fitted model `slack_ctc.SASS_TILE` (a + b x elements per thread + c with a tail; "
              "fitted over every lattice config by `--calibrate`), and per dependent step beyond its tiles "
              "against `SASS_STEP`. The model prices a dependent step as these instructions issued by the CTA's "
              "warps on 4 schedulers at 1.98 GHz plus 0.3 us of store, barrier and L2 round trip, and a parallel "
              "phase at the whole GPU's issue rate [est.: the counts are read, the rates are not measured].", "",
              "| workload | kernel | config | elements / thread | SASS per tile | model | error | SASS per step "
              "beyond tiles | model |", "|---|---|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in _calibration_rows()] + [""]

    lines += ["## Every other config the launchers or the benchmarks can compile", "",
              "The gradient's dense-kernel autotune list at G1 and at each cap shape, and the block-size caps "
              "(V = 262,144, W = 4,096, observed tokens) for each logits dtype, each mode and every chunk-length "
              "candidate, then one row per lattice-kernel config that `slack_ctc.lattice_configs` can give "
              "(`lattice W=...`: the first table width that gives it), and the lattice configs of the benchmark's "
              "chunk-length sweep (`sweep G1/G2/G3`, every length of `resources.SWEEP_CHUNKS` at each shape). "
              "`tests/test_triton_resources.py` fails CI on a spill in any row of this report.", ""]
    spec_names = {w.name for w in resources.spec_workloads()}
    seen, rows = set(), []
    for workload, launch in resources.choosable_launches():
        if workload.name in spec_names and launch.name != "_dense_kernel":
            continue
        row, r = _row(launch)
        key = (launch.name, row[1])
        if key in seen:
            continue
        seen.add(key)
        rows.append((workload.name,) + row)
        if r.spills or r.stack:
            spills.append((workload.name, row))
    lines += ["| workload | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    lines += [f"Spilling configs: {len(spills)}." if spills else "No config spills.", ""]

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {args.out}")
    return 1 if (args.check and spills) else 0


if __name__ == "__main__":
    sys.exit(main())
