"""Cost models of the two GPU lattices, from their sm_90 instruction counts, and the rule ``backend="auto"``
follows between them on CUDA tensors until GPU measurements replace it.

Both GPU backends share the Triton vocabulary and gradient passes; they differ in stage 2, the lattice.
Neither lattice has run on a GPU yet, so the choice is made by models priced from what the compiler
emitted, read from the cubins without a GPU:

* Triton (``mdlm_ctc/triton_kernels/slack_ctc.py``, ``_estimate_us``): every kernel's SASS instructions per
  warp per tile step and per dependent step, fitted on the compiled sm_90 cubins
  (``benchmarks/static_triton.py``'s calibration table); a dependent step costs the issue of its warps'
  instructions on the SM's 4 schedulers plus ``STEP_US`` of store, barrier and L2 round trip, and the
  fully parallel phases cost their total instructions at the whole GPU's issue rate.
* CUDA (``csrc/lattice_cuda_kernels.cuh``): one CTA (or cluster) per row and direction, the band in
  registers; ``benchmarks/static_cuda.py`` counts its step loop: 212 SASS instructions per warp-step
  (preserve) and 319 (standard) at 4 states per thread, fp32. A step costs the issue of its warps'
  instructions plus ``CUDA_STEP_US`` (named barrier and shared-memory exchange; no global round trip).

Both models are estimates [est.]: instruction issue at one instruction per scheduler per clock, and
latencies not yet measured. The GPU check (``benchmarks/gpu_run.py``) records each measured lattice time
beside the model's prediction; once a class of shapes has been measured on both backends, its times go
into ``MEASURED_LATTICE_US`` and replace the models for that class.

The rule (:func:`gpu_lattice`): on CUDA tensors with both backends present, the lattice with the smaller
time (measured for the shape's class where that exists, else predicted) decides between ``cuda`` and
``triton``. It reads only host values (B, T, the table width, the collapse; the SM count the launcher
already reads at call time), never the device at import.
"""

from __future__ import annotations

import math

from .reference import PRESERVE

CLOCK_GHZ = 1.98                # sm_90 boost clock (H100 SXM, H200)
SCHEDULERS = 4                  # warp schedulers per SM, one instruction issued per clock each
CUDA_VT = 4                     # states per thread of the CUDA plan at wide bands
CUDA_SASS_PER_WARP_STEP = {0: 212, 1: 319}  # preserve, standard: benchmarks/results/static_cuda.md, fp32, VT=4
CUDA_MAX_WARPS_PER_SM = 9       # wider bands run as clusters over several SMs (static_cuda.md: 5 x 224 threads)
CUDA_STEP_US = 0.1              # [est.] named barrier + shared-memory exchange per step
CUDA_CLUSTER_STEP_US = 0.3      # [est.] cluster barrier (DSMEM) per step

MEASURED_LATTICE_US: dict = {}
"""Lattice times measured on a GPU, ``{(mode, B, T, W): {"triton": us, "cuda": us}}`` (fill from the GPU
check's report: the G2 rows and the sweep). Empty: no GPU has run either lattice yet. A shape uses the
entry of the same mode whose (B, T, W) is nearest in log scale within a factor of 2 in each."""


def cuda_lattice_us(B: int, T: int, W: int, mode: int, n_sm: int = 132, clock_ghz: float = CLOCK_GHZ) -> float:
    """Predicted time of the CUDA lattice's alpha and beta recurrences (microseconds): T dependent steps of
    one CTA (cluster) per row and direction; rows and directions run side by side while 2B CTAs fit."""
    states = W + 1  # cells (standard: a blank/label pair per cell)
    warps = max(1, math.ceil(states / (32 * CUDA_VT)))
    per_sm = min(warps, CUDA_MAX_WARPS_PER_SM)
    cycles = math.ceil(per_sm / SCHEDULERS) * CUDA_SASS_PER_WARP_STEP[mode]
    latency = CUDA_STEP_US if warps <= CUDA_MAX_WARPS_PER_SM else CUDA_CLUSTER_STEP_US
    sms_per_row = math.ceil(warps / CUDA_MAX_WARPS_PER_SM)
    waves = math.ceil(2 * B * sms_per_row / n_sm)
    return waves * T * (cycles / (clock_ghz * 1e3) + latency)


def triton_lattice_us(B: int, T: int, W: int, mode: int, n_sm: int = 132, clock_ghz: float = CLOCK_GHZ,
                      chunk_len: int | None = None) -> float:
    """Predicted time of the Triton lattice's alpha and beta (microseconds) at ``chunk_len`` (None: the one
    the launcher chooses)."""
    from .triton_kernels import slack_ctc

    S = W + 1 if mode == PRESERVE else 2 * W + 1
    if chunk_len is None:
        chunk_len = slack_ctc.choose_chunk_len(B, T, S, mode, n_sm)
    chunk_len = chunk_len if 0 < chunk_len < T else 0
    return slack_ctc._estimate_us(B, T, S, mode, chunk_len, n_sm, clock_ghz)


def lattice_us(provider: str, B: int, T: int, W: int, mode: int, model: dict, chunk_len: int | None = None):
    """Predicted lattice time of a benchmark row (alpha, beta and the posterior pass), or None."""
    sms, clock = model["sms"], model["clock_ghz"]
    S = W + 1 if mode == PRESERVE else 2 * W + 1
    posterior = posterior_us(B, T, S, model["bandwidth_tbs"])
    if provider == "triton":
        return triton_lattice_us(B, T, W, mode, sms, clock, chunk_len) + posterior
    if provider == "cuda":
        return cuda_lattice_us(B, T, W, mode, sms, clock) + posterior
    return None


def posterior_us(B: int, T: int, S: int, bandwidth_tbs: float) -> float:
    """The posterior pass (both backends: fully parallel over frames): reading alpha and beta, fp32."""
    return 2 * B * T * S * 4 / (bandwidth_tbs * 1e12) * 1e6


def _measured(mode: int, B: int, T: int, W: int):
    best, best_distance = None, None
    for (m, b, t, w), times in MEASURED_LATTICE_US.items():
        if m != mode:
            continue
        ratios = [abs(math.log(x / y)) for x, y in ((B, b), (T, t), (W, w))]
        if max(ratios) > math.log(2):
            continue
        if best is None or sum(ratios) < best_distance:
            best, best_distance = times, sum(ratios)
    return best


def gpu_lattice(B: int, T: int, W: int, mode: int, n_sm: int = 132) -> tuple[str, str]:
    """(``"cuda"`` or ``"triton"``, why): the lattice ``backend="auto"`` runs for a shape when both are present."""
    times = _measured(mode, B, T, W)
    if times and "cuda" in times and "triton" in times:
        return ("cuda" if times["cuda"] < times["triton"] else "triton"), "measured"
    cuda = cuda_lattice_us(B, T, W, mode, n_sm)
    triton = triton_lattice_us(B, T, W, mode, n_sm)
    return ("cuda" if cuda < triton else "triton"), f"predicted: cuda {cuda:.0f} us, triton {triton:.0f} us"
