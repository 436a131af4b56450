"""Which implementations exist on this machine, and which one a call uses.

Backends (every one implements the same stage contract, see ``csrc/ops.cpp``: the vocabulary pass, the
lattice, the gradient, and the two-pass path's vocabulary pass and backward, :func:`two_pass_stages`):

* ``reference``: pure PyTorch (``mdlm_ctc/reference.py``), any device, float64-capable; slow.
* ``cpu``: the C++ kernels of ``mdlm_ctc._C`` (OpenMP), CPU tensors.
* ``cuda``: the CUDA lattice of ``mdlm_ctc._C`` (built when a CUDA toolkit was found) between the
  Triton vocabulary and gradient passes, CUDA tensors.
* ``triton``: the Triton kernels of ``mdlm_ctc.triton_kernels``, CUDA tensors (CPU tensors too under
  ``TRITON_INTERPRET=1``, for tests).

The fused LM head (``mdlm_ctc/linear.py``) runs stages 1 and 3 over windows of the flat frames
(and, for the gradient, of the vocabulary): :func:`window_stages`.

Capabilities are probed lazily, on the first call that needs them: importing the package never
touches CUDA. ``backend="auto"`` picks ``cpu`` for CPU tensors and, for CUDA tensors, the GPU backend
whose lattice is faster for the call's shape (see :func:`resolve` and ``mdlm_ctc/lattice_cost.py``),
falling back to ``reference``.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

_EXTENSION_ERROR: str | None = None


@functools.lru_cache(maxsize=None)
def extension_loaded() -> bool:
    """Import ``mdlm_ctc._C`` (the AOT build), or JIT-compile it when ``MDLM_CTC_JIT=1``."""
    global _EXTENSION_ERROR
    try:
        importlib.import_module("mdlm_ctc._C")
        return True
    except ImportError as error:
        _EXTENSION_ERROR = f"mdlm_ctc._C is not built ({error})"
    if os.environ.get("MDLM_CTC_JIT", "0") == "1":
        try:
            from . import _jit

            _jit.load()
            return True
        except Exception as error:  # a failed JIT build must leave the package usable
            _EXTENSION_ERROR = f"JIT build of the kernels failed: {error}"
            warnings.warn(_EXTENSION_ERROR, RuntimeWarning, stacklevel=2)
    return False


def _has_kernel(dispatch_key: str) -> bool:
    return extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "mdlm_ctc_C::lattice_band", dispatch_key)


@functools.lru_cache(maxsize=None)
def _has_pooled_empty() -> bool:
    try:
        return extension_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(
            "mdlm_ctc_C::pooled_empty", "CPU")
    except RuntimeError:  # an extension built before the op existed
        return False


def work_buffer(like: torch.Tensor, numel: int) -> torch.Tensor:
    """An uninitialised 1-D buffer of ``numel`` elements of ``like``'s dtype and device, for a chunk of
    logits. On the CPU it comes from the C++ kernels' buffer pool (``csrc/slack_ctc_cpu.cpp``,
    ``MDLM_CTC_CPU_POOL_MB``), so a buffer of tens of MB is not a fresh mmap, page-faulted and zeroed,
    on every call; CUDA's caching allocator already reuses its blocks."""
    if like.device.type == "cpu" and _has_pooled_empty():
        return torch.ops.mdlm_ctc_C.pooled_empty(like, [numel])
    return like.new_empty(numel)


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        for name in ("emissions", "slack_ctc", "grad"):
            importlib.import_module(f"mdlm_ctc.triton_kernels.{name}")
        return True
    except ImportError:
        return False


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends usable for tensors on ``device`` (every device this machine has when ``None``).

    >>> mdlm_ctc.available_backends("cpu")
    ['reference', 'cpu']
    """
    device_type = None if device is None else torch.device(device).type
    names = ["reference"]
    if device_type in (None, "cpu") and _has_kernel("CPU"):
        names.append("cpu")
    cuda_ok = device_type in (None, "cuda") and torch.cuda.is_available()
    if _triton_importable() and (cuda_ok or (device_type in (None, "cpu") and _triton_interpreted())):
        names.append("triton")
    if cuda_ok and _has_kernel("CUDA") and _triton_importable():
        names.append("cuda")
    return names


def resolve(backend: str, device: torch.device, shape: tuple | None = None) -> str:
    """The backend a call with ``backend=...`` on ``device`` runs; a clear error if it cannot run there.

    ``"auto"`` on CPU tensors: ``cpu``, else ``reference``. On CUDA tensors (the GPU rule): when both GPU
    backends are present and ``shape`` = (B, T, table width, collapse mode) is known on the host, the one
    whose lattice ``mdlm_ctc.lattice_cost.gpu_lattice`` says is faster for that shape: measured times
    where the GPU benchmark has filled ``lattice_cost.MEASURED_LATTICE_US`` for the shape's class, else the
    cost models calibrated on both lattices' sm_90 instruction counts (no GPU has timed either yet: at the
    SPEC §6 shapes they predict ``triton`` for G1 and G3, whose bands are narrow and long rows gain from
    Triton's time-chunked scan, and ``cuda`` for G2's full-width bands). Both backends share the
    vocabulary and gradient passes, so only the lattice differs. Without a shape, and while
    ``torch.compile`` traces (whose sizes may be symbolic): ``triton``, else ``cuda`` (pass ``backend=`` to
    choose there). Otherwise the one present, else ``reference``. The rule reads host values only (the SM
    count at call time, never at import).
    """
    name = _resolve(backend, device)
    if backend == "auto" and name == "triton" and shape is not None and not torch.compiler.is_compiling():
        return _gpu_lattice(device, *(int(v) for v in shape))
    return name


@torch.compiler.assume_constant_result  # probed once at trace time, never traced into
def _resolve(backend: str, device: torch.device) -> str:
    if backend == "auto":
        present = available_backends(device)
        if device.type == "cpu":
            return "cpu" if "cpu" in present else "reference"
        for name in ("triton", "cuda"):  # the GPU rule without a shape
            if name in present:
                return name
        return "reference"
    present = available_backends(device)
    if backend not in present:
        reason = ""
        if backend in ("cpu", "cuda") and _EXTENSION_ERROR:
            reason = f" ({_EXTENSION_ERROR})"
        elif backend == "cuda" and device.type == "cuda" and extension_loaded() and not _has_kernel("CUDA"):
            reason = (" (mdlm_ctc._C was built without CUDA kernels: reinstall where torch has CUDA and nvcc is "
                      "found, or install with MDLM_CTC_BUILD=none and run with MDLM_CTC_JIT=1)")
        elif backend in ("triton", "cuda") and device.type == "cuda" and not _triton_importable():
            reason = " (Triton is not importable)"
        raise ValueError(f"`backend`={backend!r} is not available for tensors on {device}{reason}; "
                         f"available there: {', '.join(present)}")
    return backend


def _gpu_lattice(device: torch.device, B: int, T: int, W: int, mode: int) -> str:
    """``cuda`` or ``triton`` for a shape (``lattice_cost.gpu_lattice``) where both are present."""
    if "cuda" not in available_backends(device):
        return "triton"
    return _gpu_lattice_cached(device, B, T, W, mode)


@functools.lru_cache(maxsize=4096)
def _gpu_lattice_cached(device: torch.device, B: int, T: int, W: int, mode: int) -> str:
    from . import lattice_cost

    return lattice_cost.gpu_lattice(B, T, W, mode, _sm_count(device))[0]


def _sm_count(device: torch.device) -> int:
    from .triton_kernels.emissions import sm_count

    return sm_count(device.index if device.index is not None else torch.cuda.current_device())


def stages(backend: str):
    """``(emissions, lattice_band, gradient)`` of a backend: the three-stage contract of ``csrc/ops.cpp``.

    ``cuda`` pairs the CUDA lattice with the Triton vocabulary and gradient passes (bandwidth-bound
    passes that Triton already does at the memory roofline).
    """
    if backend == "reference":
        from . import reference

        return reference.emissions_reference, reference.lattice_band_reference, reference.gradient_reference
    if backend == "cpu":
        ops = torch.ops.mdlm_ctc_C
        return ops.emissions, ops.lattice_band, ops.gradient
    if backend in ("triton", "cuda"):
        from .triton_kernels import emissions, grad, slack_ctc

        lattice = torch.ops.mdlm_ctc_C.lattice_band if backend == "cuda" else slack_ctc.lattice_band
        return emissions.emissions, lattice, grad.gradient
    raise ValueError(f"unknown backend {backend!r}")


def two_pass_stages(backend: str):
    """``(emissions_grad, gradient_finish)`` of a backend: the two-pass path's vocabulary pass (stage 1 that
    also writes the scaled softmax into the gradient buffer) and its backward (in place on that buffer);
    the contract is in ``csrc/ops.cpp``, the op layer in ``mdlm_ctc/_ops.py``."""
    if backend == "reference":
        from . import reference

        return reference.emissions_grad_reference, reference.gradient_finish_reference
    if backend == "cpu":
        ops = torch.ops.mdlm_ctc_C
        return ops.emissions_grad, ops.gradient_finish
    if backend in ("triton", "cuda"):
        from .triton_kernels import emissions, grad

        return emissions.emissions_grad, grad.gradient_finish
    raise ValueError(f"unknown backend {backend!r}")


def window_two_pass_stages(backend: str):
    """``(emissions_grad_window, band_values_window)`` of a backend, for the fused LM head's gradient in the
    forward (``mdlm_ctc/linear.py``): the two-pass vocabulary pass over a window of frames, and the exact
    gradient at the band's tokens that its backward subtracts sparsely (``csrc/ops.cpp``)."""
    if backend == "reference":
        from . import reference

        return reference.emissions_grad_window_reference, reference.band_values_window_reference
    if backend == "cpu":
        extension_loaded()
        ops = torch.ops.mdlm_ctc_C
        return ops.emissions_grad_window, ops.band_values_window
    if backend in ("triton", "cuda"):
        from .triton_kernels import emissions, grad

        return emissions.emissions_grad_window, grad.band_values_window
    raise ValueError(f"unknown backend {backend!r}")


def gradient_buffer(logits: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous tensor like ``logits``: the two-pass path's gradient, written in the
    forward. On the CPU from the kernels' buffer pool (as :func:`work_buffer`)."""
    if logits.device.type == "cpu" and _has_pooled_empty():
        return torch.ops.mdlm_ctc_C.pooled_empty(logits, list(logits.shape))
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def window_stages(backend: str):
    """``(emissions_window, gradient_window)`` of a backend: stages 1 and 3 over a window of the flat
    frames (and of the vocabulary), the contract of ``csrc/ops.cpp``; the fused LM head
    (``mdlm_ctc/linear.py``) runs them on one chunk of logits at a time.

    ``triton`` and ``cuda`` run the Triton kernels of :func:`stages` on the window
    (``emissions.emissions_window``, ``grad.gradient_window``): the same kernels, configs and bits per
    frame as the whole-tensor passes; no host synchronisation, no autotuning, nothing probed. The only
    warm-up is Triton's compilation on first launch: it specialises integer arguments (offsets, window
    widths, strides) on their divisibility by 16, so a chunk schedule compiles a few variants, and one
    eager call with the shapes to be captured in a CUDA graph compiles all of them.
    """
    if backend == "cpu":
        extension_loaded()
        ops = torch.ops.mdlm_ctc_C
        return ops.emissions_window, ops.gradient_window
    if backend == "reference":
        from . import reference

        return reference.emissions_window_reference, reference.gradient_window_reference
    if backend in ("triton", "cuda"):
        from .triton_kernels import emissions, grad

        return emissions.emissions_window, grad.gradient_window
    raise ValueError(f"unknown backend {backend!r}")
