"""Log-space numerics for the Triton kernels, written once (the twin of ``csrc/logspace.h``).

Every lattice value is a natural log of a probability and -inf means "impossible". Two rules, the
same as in the C++ kernels:

* a log-sum-exp whose terms are all -inf is -inf, never NaN (the "all -inf guard": the maximum is
  replaced by 0 before it is subtracted, so ``-inf - -inf`` never happens);
* NaN is not tracked through these helpers (``tl.maximum`` drops it on the GPU, NumPy keeps it in
  the interpreter). A NaN logit is caught by the vocabulary pass, which marks its frame, and the
  lattice then marks the whole row NaN; nothing computed here is used on such a row.

The largest term of a log-sum-exp contributes exp(0) = 1 exactly, so ``logaddexp`` costs one exp and
one log, and ``logaddexp3`` two exps and one log (the SFU is what bounds the lattice steps).
"""

import triton
import triton.language as tl

# module-level constants must be tl.constexpr to be visible inside @triton.jit functions
NEG_INF = tl.constexpr(float("-inf"))
POS_INF = tl.constexpr(float("inf"))
NAN = tl.constexpr(float("nan"))
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)    # ln(2):   log(x) = log2(x) * LN2


@triton.jit
def finite_or_zero(m):
    """``m`` where it is finite-or-+inf, 0 where it is -inf: the guard for ``x - m``."""
    return tl.where(m == NEG_INF, 0.0, m)


@triton.jit
def logaddexp(a, b):
    """log(exp(a) + exp(b)) elementwise; -inf when both are -inf."""
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    hi_safe = finite_or_zero(hi)
    # hi = -inf: lo = -inf too, exp(-inf - 0) = 0 and the result is -inf + log(1) = -inf
    return hi + tl.log(1.0 + tl.exp(lo - hi_safe))


@triton.jit
def logaddexp3(a, b, c):
    """log(exp(a) + exp(b) + exp(c)) elementwise; -inf when all three are -inf."""
    hi_ab = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    hi = tl.maximum(hi_ab, c)
    mid = tl.minimum(hi_ab, c)
    hi_safe = finite_or_zero(hi)
    return hi + tl.log(1.0 + tl.exp(lo - hi_safe) + tl.exp(mid - hi_safe))


@triton.jit
def logsumexp_axis1(x):
    """log-sum-exp of a 2-D tile along axis 1; -inf for an all -inf row."""
    hi = tl.max(x, axis=1)
    hi_safe = finite_or_zero(hi)
    total = tl.sum(tl.exp(x - hi_safe[:, None]), axis=1)
    # total = 0 exactly when every term is -inf: log(0) = -inf and hi_safe = 0
    return hi_safe + tl.log(total)


@triton.jit
def to_output_dtype(value, DTYPE: tl.constexpr):
    """fp32 -> the output dtype, rounding to nearest even. bfloat16 is rounded here with integer ops:
    the GPU's cast rounds to nearest too, but the interpreter's truncates, and the tests compare
    bf16 gradients to within one rounding of the float64 reference."""
    if DTYPE == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(value != value, 0x7FC0, rounded)  # a NaN stays a (quiet) NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return value.to(DTYPE)
