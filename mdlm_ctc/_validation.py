"""Argument checking for every public entry point (SPEC §4), in one place.

Two kinds of checks:

* **metadata** (ranks, shapes, dtypes, devices, options): free, always run;
* **values** (ids in range, lengths within their padded sizes, the special token inside a target,
  ``observed`` ids): one fused device-side reduction and a single host sync per call. They run in
  eager mode unless ``validate=False``, and are skipped while ``torch.compile`` traces or a CUDA graph
  is being captured. The same sync also returns the exact band width of the posterior table, so the
  kernels allocate no more than the band needs. Without it, a caller-given ``band_bound`` sizes the
  table instead of the worst case ``min(U_max, T)``, checked on the device (no host sync).

Every failure is a ``ValueError`` (``TypeError`` for a wrong type or dtype) that names the argument
and shows the offending value.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from .reference import COLLAPSE_MODES, column_band_width

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("none", "sum", "mean")
BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")


def _shape(t):
    return tuple(t.shape)


def _is_int_dtype(dtype):
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def check_tensor(x, name, *, ndim=None, ndim_text=None, integer=False, floating=False):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor; got {type(x).__name__}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"`{name}` must be float32, bfloat16, float16 or float64; got {x.dtype}")
    if integer and not _is_int_dtype(x.dtype):
        raise TypeError(f"`{name}` must hold integers (int32 or int64); got {x.dtype}")
    if ndim is not None:
        allowed = ndim if isinstance(ndim, tuple) else (ndim,)
        if x.dim() not in allowed:
            raise ValueError(f"`{name}` must be {ndim_text}; got shape {_shape(x)}")


def check_int(value, name, *, low=None, high=None, high_text=None):
    if isinstance(value, torch.Tensor) and value.dim() == 0 and _is_int_dtype(value.dtype):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int; got {value!r} ({type(value).__name__})")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"`{name}` must be >= {low}; got {value}")
    if high is not None and value >= high:
        raise ValueError(f"`{name}` must be < {high_text or high}; got {value}")
    return value


def check_choice(value, name, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


def as_lengths(lengths, name, batch, default, device):
    """Normalise a lengths argument (None, tensor, list or tuple) to an int64 tensor ``[B]`` on ``device``."""
    if lengths is None:
        return torch.full((batch,), default, dtype=torch.long, device=device), False
    if isinstance(lengths, (list, tuple)):
        for i, v in enumerate(lengths):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"`{name}` must hold integers; got {name}[{i}] = {v!r}")
        lengths = torch.tensor(lengths, dtype=torch.long)
    check_tensor(lengths, name, integer=True)
    if lengths.dim() == 0 and batch == 1:
        lengths = lengths.reshape(1)
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(f"`{name}` must have shape ({batch},) (one length per batch row); got {_shape(lengths)}")
    if lengths.device != device:
        if lengths.device.type == "cpu" and isinstance(lengths, torch.Tensor):
            lengths = lengths.to(device)  # a host tensor of lengths is moved, as PyTorch's ctc_loss allows
        else:
            raise ValueError(f"`{name}` is on {lengths.device} but the logits are on {device}")
    return lengths.long(), True


def check_same_device(x, name, device, ref_name):
    if x.device != device:
        raise ValueError(f"`{name}` is on {x.device} but `{ref_name}` is on {device}; move them to one device")


@dataclass
class LatticeArgs:
    """Checked, normalised arguments of one lattice call."""

    logits: torch.Tensor         # [B, T, V] (a view; V contiguous)
    targets: torch.Tensor        # [B, U] integer
    input_lengths: torch.Tensor  # [B] int64
    target_lengths: torch.Tensor  # [B] int64
    observed: torch.Tensor | None
    special_id: int
    mode: int
    max_shift: int               # -1: none
    band_width: int


def _skip_value_checks(validate, device):
    if not validate:
        return True
    if torch.compiler.is_compiling():
        return True
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return True
    return False


def check_band_bound(band_bound):
    """``band_bound``: None, or an int >= 1 (an upper bound on every row's band width)."""
    if band_bound is None:
        return None
    return check_int(band_bound, "band_bound", low=1)


def _assert_band_bound_on_device(width, band_bound):
    # no host sync: a device-side assert (a RuntimeError on CPU tensors, a device assert on CUDA)
    torch._assert_async(width.max() <= band_bound,
                        f"`band_bound`={band_bound} is smaller than the band width of a row, min(target length, "
                        f"input length - target length + 1) (checked on the device; with validate=True the error "
                        f"names the row)")


def check_lattice_values(args: LatticeArgs, *, names, explicit_lengths, validate, extra=(), band_bound=None):
    """The value checks of SPEC §4 (one device reduction, one host sync) and the exact band width.

    ``names`` maps roles to the caller's argument names (``logits`` or ``log_probs``); ``extra`` holds
    more ``(mask, values, message)`` checks for the same sync. Returns the band width the posterior
    table needs. Without the checks (``validate=False``, ``torch.compile``) the width is read from
    the shapes alone, or is ``band_bound`` when the caller gives one, checked on the device.
    """
    x, targets = args.logits, args.targets
    B, T, V = x.shape
    U_max = targets.shape[1]
    shift = None if args.max_shift < 0 else args.max_shift
    if _skip_value_checks(validate, x.device):
        # without reading lengths: exact when every row has T frames and U_max targets, else a bound
        if not explicit_lengths and U_max <= T:
            width = min(U_max, T - U_max + 1)
        else:
            width = min(U_max, T)
        if shift is not None:
            width = min(width, shift + 1)
        if band_bound is not None and band_bound < width:
            width = band_bound
            if B > 0:
                _assert_band_bound_on_device(column_band_width(args.input_lengths.clamp(0, T),
                                                               args.target_lengths.clamp(0, U_max), shift), band_bound)
        return max(width, 1)

    device = x.device
    T_b, U_b = args.input_lengths, args.target_lengths
    n_in, n_tl, n_x, n_t = names["input_lengths"], names["target_lengths"], names["logits"], names["targets"]
    j = torch.arange(U_max, device=device)
    in_target = j[None, :] < U_b.clamp(0, U_max)[:, None]
    ids = targets.long()

    def at(flat_index, width):
        return f"{flat_index // max(width, 1)}, {flat_index % max(width, 1)}"

    checks = [  # (mask, the tensor whose value is reported, message(flat index, value))
        (T_b < 0, T_b, lambda i, v: f"`{n_in}` must be >= 0; got {n_in}[{i}] = {v}"),
        (T_b > T, T_b, lambda i, v: f"`{n_in}[{i}]` = {v} is larger than the padded time dimension of `{n_x}` ({T})"),
        (U_b < 0, U_b, lambda i, v: f"`{n_tl}` must be >= 0; got {n_tl}[{i}] = {v}"),
        (U_b > U_max, U_b,
         lambda i, v: f"`{n_tl}[{i}]` = {v} is larger than the padded target dimension of `{n_t}` ({U_max})"),
        (in_target & ((ids < 0) | (ids >= V)), ids,
         lambda i, v: f"`{n_t}[{at(i, U_max)}]` = {v} is outside the vocabulary [0, {V})"),
    ]
    if args.mode == COLLAPSE_MODES["preserve"]:
        checks.append((in_target & (ids == args.special_id), ids,
                       lambda i, v: f"`{n_t}[{at(i, U_max)}]` is the slack id {v}: with collapse='preserve' the "
                                    f"slack token is deleted from every canvas, so no target may contain it"))
    if args.observed is not None:
        checks.append(((args.observed < -1) | (args.observed >= V), args.observed.long(),
                       lambda i, v: f"`observed[{at(i, T)}]` = {v} must be -1 (free) or a token id in [0, {V})"))
    checks.extend(extra)
    width = column_band_width(T_b.clamp(0, T), U_b.clamp(0, U_max), shift)
    if band_bound is not None:
        checks.append((width > band_bound, width,
                       lambda i, v: f"`band_bound`={band_bound} is smaller than the band width of row {i}, "
                                    f"min(target length, input length - target length + 1) = {v}"))

    summary = []
    for mask, values, _ in checks:
        flat = mask.reshape(-1)
        if flat.numel() == 0:
            summary.append(torch.zeros(3, dtype=torch.long, device=device))
            continue
        first = flat.long().argmax()
        summary.append(torch.stack([flat.any().long(), first, values.reshape(-1)[first].long()]))
    summary.append(width.max().reshape(1) if B > 0 else torch.zeros(1, dtype=torch.long, device=device))
    found = torch.cat(summary).tolist()  # the one host sync
    for n, (_, _, message) in enumerate(checks):
        if found[3 * n]:
            raise ValueError(message(found[3 * n + 1], found[3 * n + 2]))
    return max(int(found[-1]), 1)


def check_slack_ctc_args(logits, targets, target_lengths, slack_id, input_lengths, collapse, max_shift, observed,
                         reduction, zero_infinity, backend, validate, *, name="logits", band_bound=None):
    """Metadata checks for ``slack_ctc_loss`` / ``best_alignment``; returns a :class:`LatticeArgs`."""
    check_tensor(logits, name, ndim=3, ndim_text="3-D (batch, time, vocab)", floating=True)
    B, T, V = logits.shape
    if V == 0:
        raise ValueError(f"`{name}` must have a non-empty vocabulary dimension; got shape {_shape(logits)}")
    device = logits.device
    check_tensor(targets, "targets", ndim=2, ndim_text="2-D (batch, max target length), right-padded",
                 integer=True)
    check_same_device(targets, "targets", device, name)
    if targets.shape[0] != B:
        raise ValueError(f"`targets` has batch size {targets.shape[0]} but `{name}` has {B}")
    T_b, explicit_in = as_lengths(input_lengths, "input_lengths", B, T, device)
    U_b, explicit_tl = as_lengths(target_lengths, "target_lengths", B, targets.shape[1], device)
    slack_id = check_int(slack_id, "slack_id", low=0, high=V, high_text=f"the vocabulary size {V}")
    check_choice(collapse, "collapse", tuple(COLLAPSE_MODES))
    mode = COLLAPSE_MODES[collapse]
    if max_shift is not None:
        max_shift = check_int(max_shift, "max_shift", low=0)
        if collapse != "preserve":
            raise ValueError(f"`max_shift` is only defined for collapse='preserve'; got max_shift={max_shift} "
                             f"with collapse={collapse!r}")
    if observed is not None:
        check_tensor(observed, "observed", integer=True)
        if _shape(observed) != (B, T):
            raise ValueError(f"`observed` must have shape (batch, time) = {(B, T)}; got {_shape(observed)}")
        check_same_device(observed, "observed", device, name)
    if reduction is not None:
        check_choice(reduction, "reduction", REDUCTIONS)
    if not isinstance(zero_infinity, bool):
        raise TypeError(f"`zero_infinity` must be a bool; got {zero_infinity!r}")
    check_choice(backend, "backend", BACKENDS)
    if not isinstance(validate, bool):
        raise TypeError(f"`validate` must be a bool; got {validate!r}")
    args = LatticeArgs(logits, targets, T_b, U_b, observed, slack_id, mode,
                       -1 if max_shift is None else max_shift, 0)
    names = {"logits": name, "targets": "targets", "input_lengths": "input_lengths",
             "target_lengths": "target_lengths"}
    args.band_width = check_lattice_values(args, names=names, explicit_lengths=explicit_in or explicit_tl,
                                           validate=validate, band_bound=check_band_bound(band_bound))
    return args


def check_weight(weight, batch, device, ref_name="logits", name="weight"):
    """The per-row loss weight (``weight`` of ``slack_ctc_loss``, ``row_weight`` of the fused head): None or a
    floating ``[B]`` tensor on the logits' device."""
    if weight is None:
        return None
    check_tensor(weight, name, floating=True)
    if _shape(weight) != (batch,):
        raise ValueError(f"`{name}` must have shape ({batch},) (one weight per batch row); got {_shape(weight)}")
    check_same_device(weight, name, device, ref_name)
    return weight


def check_ctc_loss_args(log_probs, targets, input_lengths, target_lengths, blank, reduction, zero_infinity):
    """Checks and normalises PyTorch ``ctc_loss`` arguments into batch-first :class:`LatticeArgs`.

    Accepts what PyTorch accepts: ``log_probs`` ``[T, B, C]`` (or unbatched ``[T, C]``); targets padded
    ``[B, S]`` or concatenated 1-D; lengths as tensors or lists. Returns ``(args, unbatched)``.
    """
    check_tensor(log_probs, "log_probs", ndim=(2, 3), ndim_text="3-D (time, batch, classes) or 2-D (time, classes)",
                 floating=True)
    unbatched = log_probs.dim() == 2
    if unbatched:
        log_probs = log_probs.unsqueeze(1)
    T, B, C = log_probs.shape
    if C == 0:
        raise ValueError(f"`log_probs` must have a non-empty class dimension; got shape {_shape(log_probs)}")
    if T == 0 or B == 0:  # as torch.nn.functional.ctc_loss ("log_probs tensor must not be empty")
        raise ValueError(f"`log_probs` must not be empty (time and batch >= 1, as torch.nn.functional.ctc_loss "
                         f"requires); got shape {_shape(log_probs if not unbatched else log_probs[:, 0])}")
    device = log_probs.device
    check_tensor(targets, "targets", integer=True)
    check_same_device(targets, "targets", device, "log_probs")
    if unbatched:
        if targets.dim() != 1:
            raise ValueError(f"unbatched `log_probs` needs 1-D `targets`; got shape {_shape(targets)}")
        targets = targets.unsqueeze(0)
        input_lengths = _unbatched_length(input_lengths, "input_lengths")
        target_lengths = _unbatched_length(target_lengths, "target_lengths")
    T_b, _ = as_lengths(input_lengths, "input_lengths", B, T, device)
    extra = []
    if targets.dim() == 2:
        if targets.shape[0] != B:
            raise ValueError(f"`targets` has batch size {targets.shape[0]} but `log_probs` has {B}")
        U_b, _ = as_lengths(target_lengths, "target_lengths", B, targets.shape[1], device)
        padded = targets
    elif targets.dim() == 1:
        host_lengths = isinstance(target_lengths, (list, tuple))
        U_b, _ = as_lengths(target_lengths, "target_lengths", B, targets.shape[0], device)
        padded = _pad_concatenated(targets, U_b, target_lengths if host_lengths else None)
        if not host_lengths:
            ends = torch.cumsum(U_b, 0)
            total = targets.shape[0]
            extra = [(ends > total, ends, lambda i, v: f"`target_lengths` sum to {v} by row {i} but the "
                                                      f"concatenated `targets` hold only {total} ids")]
    else:
        raise ValueError(f"`targets` must be 2-D (batch, max target length) or 1-D (concatenated); "
                         f"got shape {_shape(targets)}")
    blank = check_int(blank, "blank", low=0, high=C, high_text=f"the number of classes {C}")
    check_choice(reduction, "reduction", REDUCTIONS)
    if not isinstance(zero_infinity, bool):
        raise TypeError(f"`zero_infinity` must be a bool; got {zero_infinity!r}")
    args = LatticeArgs(log_probs.transpose(0, 1), padded, T_b, U_b, None, blank, COLLAPSE_MODES["standard"], -1, 0)
    names = {"logits": "log_probs", "targets": "targets", "input_lengths": "input_lengths",
             "target_lengths": "target_lengths"}
    args.band_width = check_lattice_values(args, names=names, explicit_lengths=True, validate=True, extra=extra)
    return args, unbatched


def _unbatched_length(length, name):
    if isinstance(length, torch.Tensor):
        return length.reshape(1)
    if isinstance(length, (list, tuple)):
        return list(length)
    if isinstance(length, numbers.Integral) and not isinstance(length, bool):
        return [int(length)]
    raise TypeError(f"`{name}` must be an int, a list or a tensor; got {type(length).__name__}")


def _pad_concatenated(targets, lengths, host_lengths):
    """Concatenated 1-D targets -> right-padded ``[B, U]``, without a host sync.

    The padded width is ``max(lengths)`` when the lengths are host values, else the total length
    (an upper bound, so no device value is read).
    """
    B = lengths.shape[0]
    total = targets.shape[0]
    if host_lengths is not None:
        if sum(int(v) for v in host_lengths) > total:
            raise ValueError(f"`target_lengths` sum to {sum(int(v) for v in host_lengths)} but the concatenated "
                             f"`targets` hold only {total} ids")
        width = max([int(v) for v in host_lengths] + [0])
    else:
        width = total
    offsets = torch.cumsum(lengths, 0) - lengths
    j = torch.arange(width, device=targets.device)
    index = (offsets[:, None] + j[None, :]).clamp(0, max(total - 1, 0))
    if total == 0:
        return targets.new_zeros((B, width))
    padded = targets[index]
    return torch.where(j[None, :] < lengths[:, None], padded, torch.zeros_like(padded))


def check_collapse_args(tokens, slack_id, mode, lengths):
    check_tensor(tokens, "tokens", ndim=(1, 2), ndim_text="1-D (time) or 2-D (batch, time)", integer=True)
    check_int(slack_id, "slack_id")
    check_choice(mode, "mode", tuple(COLLAPSE_MODES))
    if lengths is not None:
        batch = 1 if tokens.dim() == 1 else tokens.shape[0]
        time = tokens.shape[-1]
        lengths_t, _ = as_lengths(lengths, "lengths", batch, time, tokens.device)
        if not torch.compiler.is_compiling():
            bad = (lengths_t < 0) | (lengths_t > time)
            if bool(bad.any()):
                i = int(bad.long().argmax())
                raise ValueError(f"`lengths[{i}]` = {int(lengths_t[i])} must be in [0, {time}]")
