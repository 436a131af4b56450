// The CPU lattice (backend "cpu"): alpha, beta and the posteriors of one row over its band table, for
// both collapses. slack_ctc_cpu.cpp launches it (lattice_band, one row per task); the recurrences, bands
// and posterior layout are lattice.h's, shared with the CUDA kernels; mdlm_ctc/reference.py is the
// readable oracle. Within a row the lattice is sequential in t and vectorised over the band
// (`#pragma omp simd`: 8 float lanes with AVX2, 16 with AVX-512).
//
// Arithmetic (CPU only: the CUDA lattice keeps logspace.h's):
//
// * Base 2 for float rows. Every lattice value of a float row is the log2 of a probability: emissions
//   are scaled by log2(e) as they are read, the log-likelihood by ln(2) at the end. A log-add-exp is
//   then max + log2(1 + 2^(min - max)), and both functions get short polynomials on the only ranges
//   they see: 2^d for d <= 0 builds the exponent from the bits and needs 2^f only on [-1/2, 1/2]
//   (degree 5), and log2(1 + z) for z in [0, 1] needs no range reduction at all (degree 8). A
//   vectorised log-add-exp is then 26 AVX2 instructions per 8 lanes where logspace.h's general exp
//   and log took 96 (and a posterior's exp 25 where it took 37); the lattice does one log-add-exp
//   per state and step, which is most of its time. Errors in fp32: 2^f within 2e-7 relative,
//   log2(1 + z) within 1.6e-7 absolute (4.6e-8 of it the polynomial, the rest rounding; the
//   rounding of 1 + exp(d) alone was 6e-8 in the natural form).
// * Double rows keep natural logarithms and the C library (logspace.h's logaddexp, exp).
// * Per-frame offsets (both types). Row t of alpha is stored minus O_t, the sum of the maxima of the
//   rows before it (kept in double), and beta likewise, so a stored value is within one frame's
//   emissions and the band's spread of 0 instead of growing to the size of the loss. Shifting a row
//   by a constant is exact (logaddexp(a - c, b - c) = logaddexp(a, b) - c); it costs one max per
//   state, folded into the recurrence loops, and the shift rides on the emissions (e - c) the next
//   step adds anyway. A posterior is then exp(a + e + b + c_t) with small a, e, b and c_t = O + P -
//   loglik formed in double. Without offsets |alpha| reaches the size of the loss (~3e4 at C2, where
//   one fp32 ulp is 2e-3), and a posterior formed from such values was off by up to 0.08 at C2 and
//   0.014 at C1 (float64 on the same fp32 emissions as the oracle); with them, 1e-3 and 2e-5.
//
// Memory (at C1-sized rows the stored alpha rows and the band table are tens of MB, in DRAM rather than
// cache; profiles of the lattice alone once put a third of its samples on waiting for them, and the
// changes below brought that down to about a tenth):
//
// * The standard lattice keeps only its label rows of alpha for the backward sweep. The special
//   token's posterior at frame t is the blanks' total occupancy, and since every path is in exactly one
//   state at every frame, that is 1 minus the labels' posteriors (summed in double, clamped at 0):
//   no stored blank rows and no exp per blank state. Its error is then absolute, like the labels'
//   own: at C1 the gradient's largest difference from the float64 lattice went from 1.6e-5 at the
//   blank (1.7e-5 at the labels) to 2.4e-5, and a blank posterior far below the lattice's rounding
//   reads as 0 or that rounding instead of its tiny value. The preserve lattice needs its one set of
//   alpha rows for the targets anyway and keeps the direct sum.
// * Both sweeps of the standard lattice prefetch the next step's table row and stored alpha row while
//   they compute the current one: each step's loads are a fresh 2-4 KB in DRAM that the hardware
//   prefetchers find only after they have missed. (Alternating builds measured the lattice 21.3 -> 20.3
//   ms with the prefetch; a later paired A/B inside one process found no difference either way, so
//   its worth is within this machine's noise.)
// * Kept alpha rows are stored at their own band's width (Rows), about half the widest at C1.
// * The standard lattice writes only its band's posteriors: the slots past a frame's band already hold
//   the vocabulary pass's zeros (ops.cpp). At C1 rewriting them was about half of the table's lines.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "lattice.h"

namespace mdlm_ctc {
namespace cpu {

// ---------------------------------------------------------------------------------------------
// base-2 arithmetic of the float lattice (branch-free, so that `#pragma omp simd` loops vectorise)
// ---------------------------------------------------------------------------------------------

// 2^f for f in [-1/2, 1/2] as 1 + f R(f): minimax relative error 2e-7 in fp32 (degree 5), exactly 1 at 0.
MDLM_HD float exp2_reduced5(float f) {
  float p = 1.3264730805531144e-3f;
  p = p * f + 9.671512991189957e-3f;
  p = p * f + 5.550733581185341e-2f;
  p = p * f + 2.4022242426872253e-1f;
  p = p * f + 6.931470036506653e-1f;
  return p * f + 1.0f;
}

// The same to 1e-7 relative (degree 6): for the posteriors, which are probabilities, not terms added to 1.
MDLM_HD float exp2_reduced6(float f) {
  float p = 1.5353376511484385e-4f;
  p = p * f + 1.3398876180872321e-3f;
  p = p * f + 9.61843691766262e-3f;
  p = p * f + 5.5503323674201965e-2f;
  p = p * f + 2.4022647738456726e-1f;
  p = p * f + 6.931471824645996e-1f;
  return p * f + 1.0f;
}

// 2^x for x in [-127, 127] with the polynomial P on the reduced argument: x = n + f, n an integer,
// |f| <= 1/2; 2^n goes into the exponent bits. Exactly 0 at x = -127 (P(0) = 1 and n = -127 cancel the
// bias); results below 2^-126 are not accurate (they are only ever negligible here).
template <float (*P)(float)>
MDLM_HD float exp2_clamped(float x) {
  const float shifted = x + 12582912.0f;  // 1.5 * 2^23: n sits in the low mantissa bits
  const float n = shifted - 12582912.0f;
  return bits_to_float(float_to_bits(P(x - n)) + (float_to_bits(shifted) << 23));
}

// log2(1 + z) for z in [0, 1] as z S(z): absolute error 1.6e-7 in fp32, exactly 0 at z = 0.
MDLM_HD float log2_1p_unit(float z) {
  float p = -9.30915679782629e-3f;
  p = p * z + 5.205909162759781e-2f;
  p = p * z - 1.3752171397209167e-1f;
  p = p * z + 2.4186530709266663e-1f;
  p = p * z - 3.473014533519745e-1f;
  p = p * z + 4.7868382930755615e-1f;
  p = p * z - 7.211658358573914e-1f;
  p = p * z + 1.4426898956298828f;
  return p * z;
}

// log2(2^a + 2^b) with logspace.h's all -inf guard: when both are -inf, min - max is NaN, which the
// clamp (a compare that is false for NaN) turns into -127 and so 2^d into exactly 0: max + 0 = -inf.
// One side -inf gives exactly the other side.
MDLM_HD float logaddexp2f(float a, float b) {
  const float hi = a > b ? a : b, lo = a > b ? b : a;
  const float d = lo - hi;
  return hi + log2_1p_unit(exp2_clamped<exp2_reduced5>(d > -127.0f ? d : -127.0f));
}

// 2^x for any x: 0 for x <= -127 (and -inf), NaN stays NaN, saturates at 2^127.
MDLM_HD float exp2f_any(float x) {
  const float below = x < 127.0f ? x : 127.0f;  // a NaN becomes 127 here; the select below returns it as NaN
  const float c = below > -127.0f ? below : -127.0f;
  const float y = exp2_clamped<exp2_reduced6>(c);
  return x != x ? x : y;
}

// The lattice's number system: kFromLn converts a natural-log emission into lattice units, kToLn the
// log-likelihood back; add is logaddexp and prob the probability of a lattice value.
template <typename acc_t>
struct LatticeMath;

template <>
struct LatticeMath<float> {  // base 2
  static constexpr float kFromLn = 1.44269504088896341f;  // log2(e)
  static constexpr double kToLn = 0.693147180559945309;   // ln(2)
  MDLM_HD static float add(float a, float b) { return logaddexp2f(a, b); }
  MDLM_HD static float prob(float x) { return exp2f_any(x); }
};

template <>
struct LatticeMath<double> {  // natural logarithms
  static constexpr double kFromLn = 1.0, kToLn = 1.0;
  MDLM_HD static double add(double a, double b) { return logaddexp(a, b); }
  MDLM_HD static double prob(double x) { return LogMath<double>::exp(x); }
};

// The shift that renormalises a row whose maximum is mx: mx itself when finite, else 0 (a row of -inf,
// an infeasible row, stays as it is).
template <typename acc_t>
MDLM_HD acc_t row_shift(acc_t mx) {
  return mx > neg_inf<acc_t>() && mx < std::numeric_limits<acc_t>::infinity() ? mx : acc_t(0);
}

// Zero the slots of a posterior row [0, W) outside [lo, hi] (all of them when lo > hi).
template <typename acc_t>
inline void zero_outside(acc_t* post, int64_t W, int64_t lo, int64_t hi) {
  lo = std::clamp<int64_t>(lo, 0, W);
  hi = std::clamp<int64_t>(hi, lo - 1, W - 1);
  std::fill(post, post + lo, acc_t(0));
  std::fill(post + hi + 1, post + W, acc_t(0));
}

// A row of lattice values indexed by absolute state, with two -inf guard cells on each side so the
// recurrences can read s-2 .. s+2 without bounds checks.
template <typename acc_t>
struct StateRow {
  std::vector<acc_t> data;
  explicit StateRow(int64_t num_states) : data(num_states + 4, neg_inf<acc_t>()) {}
  acc_t* at() { return data.data() + 2; }
  void guard(int64_t lo, int64_t hi) {
    acc_t* a = at();
    a[lo - 1] = a[lo - 2] = neg_inf<acc_t>();
    a[hi + 1] = a[hi + 2] = neg_inf<acc_t>();
  }
};

// Asks for the cache lines of [p, p + count) ahead of their use (`write`: lines about to be stored).
template <typename acc_t>
inline void prefetch(const acc_t* p, int64_t count, bool write = false) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = count * static_cast<int64_t>(sizeof(acc_t));
  for (int64_t o = 0; o < bytes; o += 64) {
    if (write)
      __builtin_prefetch(c + o, 1, 3);
    else
      __builtin_prefetch(c + o, 0, 3);
  }
}

// One row of the batch as the lattice sees it: the band emission table written by the vocabulary
// pass (and overwritten with posteriors by the beta pass), and the clamped sizes.
template <typename acc_t>
struct Row {
  acc_t* table;    // [T][W]: e_t(y_u) at [t-1][u - column_lo(t)], later the posteriors
  acc_t* special;  // [T]:    e_t(k), later the posterior of k
  const int64_t* target;  // y_1..y_U at target[0..U-1], clamped to the vocabulary
  int64_t T, U, W, max_shift;

  // Target emissions of frame t (1-based), in lattice units minus `shift`, into e[u] for the state band [lo, hi]
  // (absolute index u): e[u] = scale * e_t(y_u) - shift. Columns outside the table (only the band's lower edge,
  // whose predecessor is -inf) read as -shift.
  void load_targets(int64_t t, int64_t lo, int64_t hi, acc_t scale, acc_t shift, acc_t* e) const {
    const int64_t c_lo = column_lo(t, T, U, max_shift);
    const int64_t from = std::max(lo, c_lo), to = std::min({hi, column_hi(t, U), c_lo + W - 1});
    for (int64_t u = std::max<int64_t>(lo, 0); u < std::min(from, hi + 1); ++u) e[u] = -shift;
    const acc_t* x = table + (t - 1) * W - c_lo;
#pragma omp simd
    for (int64_t u = from; u <= to; ++u) e[u] = x[u] * scale - shift;
    for (int64_t u = std::max(to + 1, lo); u <= hi; ++u) e[u] = -shift;
  }

  // prefetch() of what load_targets(t, lo, hi, ...) will read
  void prefetch_targets(int64_t t, int64_t lo, int64_t hi) const {
    if (t < 1 || t > T) return;
    const int64_t c_lo = column_lo(t, T, U, max_shift);
    const int64_t from = std::max(lo, c_lo), to = std::min({hi, column_hi(t, U), c_lo + W - 1});
    if (from <= to) prefetch(table + (t - 1) * W - c_lo + from, to - from + 1);
  }
};

// The band of states for every frame t = 0..T, inclusive [lo[t], hi[t]].
struct Bands {
  std::vector<int64_t> lo, hi;
  template <typename Lo, typename Hi>
  Bands(int64_t T, Lo lo_of, Hi hi_of) : lo(T + 1), hi(T + 1) {
    for (int64_t t = 0; t <= T; ++t) {
      lo[t] = lo_of(t);
      hi[t] = hi_of(t);
    }
  }
};

// A per-thread scratch buffer that is reused across calls: the alpha store of a long row is tens of
// MB, and fresh pages cost more than the lattice itself. Buffers above the cap are not kept.
template <typename acc_t>
acc_t* thread_scratch(int slot, size_t count, std::unique_ptr<acc_t[]>& fallback) {
  constexpr size_t kKeepBytes = size_t(64) << 20;
  thread_local std::vector<acc_t> buffers[2];
  if (count * sizeof(acc_t) > kKeepBytes) {
    fallback.reset(new acc_t[count]);
    return fallback.get();
  }
  std::vector<acc_t>& buffer = buffers[slot];
  if (buffer.size() < count) buffer.resize(count);
  return buffer.data();
}

// Lattice rows for t = 0..T, each addressable by absolute state over [lo[t] - 2, hi[t] + 2] (two -inf
// guards each side, set by seal). keep_all stores every row (the posteriors need every alpha_{t-1}),
// each in its own band's width plus the guards, back to back: a band is a parallelogram whose rows are
// often much narrower than its widest (half as wide on average at C1), and these rows are what the
// backward sweep reads back from memory. Otherwise two full-width rows alternate.
template <typename acc_t>
class Rows {
 public:
  // keep_all rows live in the calling thread's scratch `slot` (one slot per live Rows object).
  Rows(const Bands& bands, int64_t num_states, bool keep_all, int slot = 0) : bands_(bands), keep_all_(keep_all) {
    if (keep_all) {
      start_.resize(bands.lo.size());
      int64_t total = 0;
      for (size_t t = 0; t < bands.lo.size(); ++t) {
        start_[t] = total + 2 - bands.lo[t];
        total += std::max<int64_t>(bands.hi[t] - bands.lo[t] + 1, 0) + 4;
      }
      data_ = thread_scratch<acc_t>(slot, static_cast<size_t>(total), owned_);
    } else {
      stride_ = num_states + 4;
      owned_.reset(new acc_t[2 * stride_]);
      data_ = owned_.get();
      std::fill(data_, data_ + 2 * stride_, neg_inf<acc_t>());
    }
  }
  acc_t* row(int64_t t) { return keep_all_ ? data_ + start_[t] : data_ + (t & 1) * stride_ + 2; }
  void seal(int64_t t) {
    acc_t* r = row(t);
    const int64_t lo = bands_.lo[t], hi = std::max(bands_.hi[t], lo - 1);
    r[lo - 1] = r[lo - 2] = r[hi + 1] = r[hi + 2] = neg_inf<acc_t>();
  }

 private:
  const Bands& bands_;
  bool keep_all_;
  int64_t stride_ = 0;          // the alternating rows' length
  std::vector<int64_t> start_;  // keep_all: state u of row t is data_[start_[t] + u]
  acc_t* data_;
  std::unique_ptr<acc_t[]> owned_;  // keep_all rows are uninitialised: only written cells are read
};

// ---------------------------------------------------------------------------------------------
// preserve lattice (collapse deletes the special token only)
// ---------------------------------------------------------------------------------------------

// The final log-likelihood (lattice units, offset included) as the loss: -loglik in nats, +inf for an
// infeasible row, NaN for NaN.
template <typename acc_t>
acc_t nll_of(double loglik) {
  if (!(loglik > neg_inf<double>())) return loglik != loglik ? acc_t(loglik) : std::numeric_limits<acc_t>::infinity();
  return static_cast<acc_t>(-loglik * LatticeMath<acc_t>::kToLn);
}

template <typename acc_t>
acc_t preserve_row(const Row<acc_t>& row, bool need_grad) {
  using M = LatticeMath<acc_t>;
  const int64_t T = row.T, U = row.U, m = row.max_shift;
  if (U > T) return std::numeric_limits<acc_t>::infinity();
  const Bands bands(T, [&](int64_t t) { return preserve_state_lo(t, T, U, m); },
                    [&](int64_t t) { return preserve_state_hi(t, U); });
  Rows<acc_t> alpha(bands, U + 1, need_grad);
  std::vector<double> offset(need_grad ? T + 1 : 0);  // alpha_t = stored row t + offset[t] (lattice units)
  StateRow<acc_t> emit(U + 2);
  acc_t* e = emit.at();
  alpha.row(0)[0] = 0;
  alpha.seal(0);
  double base = 0;  // the offset of row t - 1, then of row t
  acc_t shift = 0;  // row t - 1's maximum, moved into the offset at step t
  for (int64_t t = 1; t <= T; ++t) {
    if (need_grad) offset[t - 1] = base;
    base += shift;
    const int64_t lo = bands.lo[t], hi = bands.hi[t];
    const acc_t e_special = row.special[t - 1] * M::kFromLn - shift;
    row.load_targets(t, lo, hi, M::kFromLn, shift, e);
    e[0] = 0;  // u = 0 has no advance; alpha_{t-1}(-1) = -inf makes the term vanish
    const acc_t* a = alpha.row(t - 1);
    acc_t* c = alpha.row(t);
    acc_t mx = neg_inf<acc_t>();
#pragma omp simd reduction(max : mx)
    for (int64_t u = lo; u <= hi; ++u) {
      c[u] = M::add(a[u] + e_special, a[u - 1] + e[u]);
      mx = c[u] > mx ? c[u] : mx;
    }
    shift = row_shift(mx);
    alpha.seal(t);
  }
  if (need_grad) offset[T] = base;
  const double loglik = base + alpha.row(T)[U];
  if (!need_grad || !(loglik > neg_inf<double>())) return nll_of<acc_t>(loglik);

  // beta_{t-1} and the posteriors of frame t, for t = T .. 1; they overwrite frame t's emissions
  Rows<acc_t> beta(bands, U + 1, false);
  beta.row(T)[U] = 0;
  beta.seal(T);
  double beta_base = 0;  // the offset of beta row t
  acc_t beta_shift = 0;  // beta row t's maximum
  for (int64_t t = T; t >= 1; --t) {
    const int64_t lo_t = bands.lo[t], hi_t = bands.hi[t], lo_p = bands.lo[t - 1], hi_p = bands.hi[t - 1];
    const acc_t e_special = row.special[t - 1] * M::kFromLn - beta_shift;
    row.load_targets(t, std::max<int64_t>(lo_p + 1, 1), hi_p + 1, M::kFromLn, beta_shift, e);
    e[0] = 0;
    const acc_t* a = alpha.row(t - 1);
    const acc_t* n = beta.row(t);
    // log posterior = a + e + n + c: the offsets of alpha_{t-1} and beta_t, the shift taken off e, -loglik
    const acc_t c = static_cast<acc_t>(offset[t - 1] + beta_base + beta_shift - loglik);

    acc_t slack = 0;
    const int64_t s_lo = std::max(lo_t, lo_p), s_hi = std::min(hi_t, hi_p);
#pragma omp simd reduction(+ : slack)
    for (int64_t u = s_lo; u <= s_hi; ++u) slack += M::prob(a[u] + e_special + n[u] + c);
    row.special[t - 1] = slack;

    const int64_t c_lo = column_lo(t, T, U, m);
    acc_t* post = row.table + (t - 1) * row.W;
    const int64_t u_lo = std::max({c_lo, lo_t, lo_p + 1});
    const int64_t u_hi = std::min({column_hi(t, U), hi_t, hi_p + 1, c_lo + row.W - 1});
    zero_outside(post, row.W, u_lo - c_lo, u_hi - c_lo);
    post -= c_lo;
#pragma omp simd
    for (int64_t u = u_lo; u <= u_hi; ++u) post[u] = M::prob(a[u - 1] + e[u] + n[u] + c);

    acc_t* b = beta.row(t - 1);
    acc_t mx = neg_inf<acc_t>();
#pragma omp simd reduction(max : mx)
    for (int64_t u = lo_p; u <= hi_p; ++u) {
      b[u] = M::add(n[u] + e_special, n[u + 1] + e[u + 1]);
      mx = b[u] > mx ? b[u] : mx;
    }
    beta_base += beta_shift;
    beta_shift = row_shift(mx);
    beta.seal(t - 1);
  }
  return nll_of<acc_t>(loglik);
}

// ---------------------------------------------------------------------------------------------
// standard lattice (classic CTC: merge repeats, then delete the blank), split by state parity
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
acc_t standard_row(const Row<acc_t>& row, bool need_grad) {
  using M = LatticeMath<acc_t>;
  const int64_t T = row.T, U = row.U;
  if (U > T) return std::numeric_limits<acc_t>::infinity();
  // skip[u] = 0 where label u-1 -> label u may skip the blank (y_u != y_{u-1}), else -inf
  StateRow<acc_t> skip(U + 2);
  acc_t* k = skip.at();
  for (int64_t u = 2; u <= U; ++u)
    if (row.target[u - 1] != row.target[u - 2]) k[u] = 0;

  const Bands blanks(T, [&](int64_t t) { return standard_blank_lo(t, T, U); },
                     [&](int64_t t) { return standard_blank_hi(t, U); });
  const Bands labels(T, [&](int64_t t) { return standard_label_lo(t, T, U); },
                     [&](int64_t t) { return standard_label_hi(t, U); });
  // the factored form of lattice.h's split recurrences (one exp fewer per state). Only the label rows
  // are kept for the posteriors: the blanks' total is the complement of the labels' (see below).
  Rows<acc_t> alpha_b(blanks, U + 1, false), alpha_l(labels, U + 1, need_grad);
  std::vector<double> offset(need_grad ? T + 1 : 0);  // alpha_t = stored rows t + offset[t] (lattice units)
  StateRow<acc_t> emit(U + 2), merged(U + 1);
  acc_t* e = emit.at();
  acc_t* mg = merged.at();
  alpha_b.row(0)[0] = 0;
  alpha_b.seal(0);
  alpha_l.seal(0);
  double base = 0;
  acc_t shift = 0;  // the maximum of rows t - 1, moved into the offset at step t
  for (int64_t t = 1; t <= T; ++t) {
    if (need_grad) offset[t - 1] = base;
    base += shift;
    const acc_t e_special = row.special[t - 1] * M::kFromLn - shift;
    const acc_t* ab = alpha_b.row(t - 1);
    const acc_t* al = alpha_l.row(t - 1);
    acc_t* cb = alpha_b.row(t);
    acc_t* cl = alpha_l.row(t);
    const int64_t b_lo = blanks.lo[t], b_hi = blanks.hi[t], l_lo = labels.lo[t], l_hi = labels.hi[t];
    const int64_t m_lo = std::min(b_lo, l_lo - 1), m_hi = std::max(b_hi, l_hi - 1);
#pragma omp simd
    for (int64_t u = m_lo; u <= m_hi; ++u) mg[u] = M::add(ab[u], al[u]);
    acc_t mx = neg_inf<acc_t>();
#pragma omp simd reduction(max : mx)
    for (int64_t u = b_lo; u <= b_hi; ++u) {
      cb[u] = mg[u] + e_special;
      mx = cb[u] > mx ? cb[u] : mx;
    }
    row.load_targets(t, l_lo, l_hi, M::kFromLn, shift, e);
    if (t < T) {  // the next step's table row and (kept) label row, which it otherwise waits for
      row.prefetch_targets(t + 1, labels.lo[t + 1], labels.hi[t + 1]);
      if (need_grad) prefetch(alpha_l.row(t + 1) + labels.lo[t + 1], labels.hi[t + 1] - labels.lo[t + 1] + 1, true);
    }
#pragma omp simd reduction(max : mx)
    for (int64_t u = l_lo; u <= l_hi; ++u) {
      cl[u] = M::add(al[u], k[u] == 0 ? mg[u - 1] : ab[u - 1]) + e[u];
      mx = cl[u] > mx ? cl[u] : mx;
    }
    shift = row_shift(mx);
    alpha_b.seal(t);
    alpha_l.seal(t);
  }
  if (need_grad) offset[T] = base;
  const double loglik = base + (U == 0 ? alpha_b.row(T)[0] : M::add(alpha_b.row(T)[U], alpha_l.row(T)[U]));
  if (!need_grad || !(loglik > neg_inf<double>())) return nll_of<acc_t>(loglik);

  Rows<acc_t> beta_b(blanks, U + 1, false), beta_l(labels, U + 1, false);
  if (blanks.hi[T] >= U) beta_b.row(T)[U] = 0;
  beta_b.seal(T);
  if (U > 0) beta_l.row(T)[U] = 0;
  beta_l.seal(T);
  double beta_base = 0;  // the offset of beta rows t
  acc_t beta_shift = 0;  // their maximum
  // the states whose emissions step t reads: the label cells of t - 1 and the blank cells' successors
  const auto beta_lo = [&](int64_t t) { return std::min(labels.lo[t - 1], blanks.lo[t - 1] + 1); };
  const auto beta_hi = [&](int64_t t) {
    return std::max(std::max(blanks.hi[t - 1], labels.hi[t - 1]) + 1, labels.hi[t]);
  };
  for (int64_t t = T; t >= 1; --t) {
    const acc_t e_special = row.special[t - 1] * M::kFromLn - beta_shift;
    const acc_t* al = alpha_l.row(t);
    const acc_t* nb = beta_b.row(t);
    const acc_t* nl = beta_l.row(t);
    const int64_t lp_lo = labels.lo[t - 1], lp_hi = labels.hi[t - 1];
    const int64_t bp_lo = blanks.lo[t - 1], bp_hi = std::max(blanks.hi[t - 1], lp_hi);  // (see below)
    row.load_targets(t, beta_lo(t), beta_hi(t), M::kFromLn, beta_shift, e);
    if (t > 1) {  // the previous step's table row and kept label row
      row.prefetch_targets(t - 1, beta_lo(t - 1), beta_hi(t - 1));
      prefetch(alpha_l.row(t - 1) + labels.lo[t - 1], labels.hi[t - 1] - labels.lo[t - 1] + 1);
    }

    // posteriors of frame t: labels go to the table, and the blanks' total, the special token's, is what
    // the labels leave of 1 (every path is in exactly one state at frame t), their sum taken in double
    const acc_t c = static_cast<acc_t>(offset[t] + beta_base - loglik);
    const int64_t c_lo = labels.lo[t];
    acc_t* post = row.table + (t - 1) * row.W;
    const int64_t c_hi = std::min(labels.hi[t], c_lo + row.W - 1);
    // slots c_hi - c_lo + 1 .. W - 1 lie past the frame's last column and hold the vocabulary pass's 0
    // (ops.cpp): they are left as they are (rewriting them was about half the table's lines at C1)
    post -= c_lo;
    double labels_total = 0;
#pragma omp simd reduction(+ : labels_total)
    for (int64_t u = c_lo; u <= c_hi; ++u) {
      post[u] = M::prob(al[u] + nl[u] + c);
      labels_total += post[u];
    }
    const bool no_blank = blanks.lo[t] > blanks.hi[t];  // U == T: exactly 0, not the labels' rounding
    row.special[t - 1] = no_blank ? acc_t(0) : static_cast<acc_t>(std::max(0.0, 1.0 - labels_total));

    // B_{t-1}(u) over the blank band and one state past it: the label cells read it as their skip term
    // even where the blank state itself is off the band; seal() then restores the -inf guards
    acc_t* bb = beta_b.row(t - 1);
    acc_t* bl = beta_l.row(t - 1);
    acc_t mx = neg_inf<acc_t>();
#pragma omp simd reduction(max : mx)
    for (int64_t u = bp_lo; u <= bp_hi; ++u) {
      bb[u] = M::add(nb[u] + e_special, nl[u + 1] + e[u + 1]);
      mx = bb[u] > mx ? bb[u] : mx;
    }
#pragma omp simd reduction(max : mx)
    for (int64_t u = lp_lo; u <= lp_hi; ++u) {
      bl[u] = M::add(nl[u] + e[u], k[u + 1] == 0 ? bb[u] : nb[u] + e_special);
      mx = bl[u] > mx ? bl[u] : mx;
    }
    beta_base += beta_shift;
    beta_shift = row_shift(mx);
    beta_b.seal(t - 1);
    beta_l.seal(t - 1);
  }
  return nll_of<acc_t>(loglik);
}

}  // namespace cpu
}  // namespace mdlm_ctc
