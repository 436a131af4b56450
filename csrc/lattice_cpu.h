// The CPU lattice (backend "cpu"): alpha, beta and the posteriors of one row over its band table, for
// both collapses. slack_ctc_cpu.cpp launches it (lattice_band, one row per task); the recurrences, bands
// and posterior layout are lattice.h's, shared with the CUDA kernels; mdlm_ctc/reference.py is the
// readable oracle. Within a row the lattice is sequential in t and vectorised over the band
// (`#pragma omp simd`).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "lattice.h"

namespace mdlm_ctc {
namespace cpu {

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

// One row of the batch as the lattice sees it: the band emission table written by the vocabulary
// pass (and overwritten with posteriors by the beta pass), and the clamped sizes.
template <typename acc_t>
struct Row {
  acc_t* table;    // [T][W]: e_t(y_u) at [t-1][u - column_lo(t)], later the posteriors
  acc_t* special;  // [T]:    e_t(k), later the posterior of k
  const int64_t* target;  // y_1..y_U at target[0..U-1], clamped to the vocabulary
  int64_t T, U, W, max_shift;

  // Target emissions of frame t (1-based) into e[u] for the state band [lo, hi] (absolute index u).
  // Columns outside the table (only the band's lower edge, whose predecessor is -inf) read as 0.
  void load_targets(int64_t t, int64_t lo, int64_t hi, acc_t* e) const {
    const int64_t c_lo = column_lo(t, T, U, max_shift);
    const int64_t from = std::max(lo, c_lo), to = std::min({hi, column_hi(t, U), c_lo + W - 1});
    for (int64_t u = std::max<int64_t>(lo, 0); u < std::min(from, hi + 1); ++u) e[u] = 0;
    if (to >= from) std::copy(table + (t - 1) * W + (from - c_lo), table + (t - 1) * W + (to - c_lo) + 1, e + from);
    for (int64_t u = std::max(to + 1, lo); u <= hi; ++u) e[u] = 0;
  }
};

// The band of states for every frame t = 0..T, inclusive [lo[t], hi[t]].
struct Bands {
  std::vector<int64_t> lo, hi;
  int64_t width = 0;
  template <typename Lo, typename Hi>
  Bands(int64_t T, Lo lo_of, Hi hi_of) : lo(T + 1), hi(T + 1) {
    for (int64_t t = 0; t <= T; ++t) {
      lo[t] = lo_of(t);
      hi[t] = hi_of(t);
      width = std::max(width, hi[t] - lo[t] + 1);
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
// guards each side, set by seal). keep_all stores every row, band-sized (the posteriors need every
// alpha_{t-1}); otherwise two rows alternate.
template <typename acc_t>
class Rows {
 public:
  // keep_all rows live in the calling thread's scratch `slot` (one slot per live Rows object).
  Rows(const Bands& bands, int64_t num_states, bool keep_all, int slot = 0) : bands_(bands), keep_all_(keep_all) {
    stride_ = keep_all ? std::max<int64_t>(bands.width, 0) + 4 : num_states + 4;
    if (keep_all) {
      data_ = thread_scratch<acc_t>(slot, bands.lo.size() * stride_, owned_);
    } else {
      owned_.reset(new acc_t[2 * stride_]);
      data_ = owned_.get();
      std::fill(data_, data_ + 2 * stride_, neg_inf<acc_t>());
    }
  }
  acc_t* row(int64_t t) {
    return keep_all_ ? data_ + t * stride_ + 2 - bands_.lo[t] : data_ + (t & 1) * stride_ + 2;
  }
  void seal(int64_t t) {
    acc_t* r = row(t);
    const int64_t lo = bands_.lo[t], hi = std::max(bands_.hi[t], lo - 1);
    r[lo - 1] = r[lo - 2] = r[hi + 1] = r[hi + 2] = neg_inf<acc_t>();
  }

 private:
  const Bands& bands_;
  bool keep_all_;
  int64_t stride_;
  acc_t* data_;
  std::unique_ptr<acc_t[]> owned_;  // keep_all rows are uninitialised: only written cells are read
};

// ---------------------------------------------------------------------------------------------
// preserve lattice (collapse deletes the special token only)
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
acc_t preserve_row(const Row<acc_t>& row, bool need_grad) {
  const int64_t T = row.T, U = row.U, m = row.max_shift;
  if (U > T) return std::numeric_limits<acc_t>::infinity();
  const Bands bands(T, [&](int64_t t) { return preserve_state_lo(t, T, U, m); },
                    [&](int64_t t) { return preserve_state_hi(t, U); });
  Rows<acc_t> alpha(bands, U + 1, need_grad);
  StateRow<acc_t> emit(U + 2);
  acc_t* e = emit.at();
  alpha.row(0)[0] = 0;
  alpha.seal(0);
  for (int64_t t = 1; t <= T; ++t) {
    const int64_t lo = bands.lo[t], hi = bands.hi[t];
    const acc_t e_special = row.special[t - 1];
    row.load_targets(t, lo, hi, e);
    e[0] = 0;  // u = 0 has no advance; alpha_{t-1}(-1) = -inf makes the term vanish
    const acc_t* a = alpha.row(t - 1);
    acc_t* c = alpha.row(t);
#pragma omp simd
    for (int64_t u = lo; u <= hi; ++u) c[u] = preserve_alpha_cell(a[u], a[u - 1], e_special, e[u]);
    alpha.seal(t);
  }
  const acc_t loglik = alpha.row(T)[U];
  if (!(loglik > neg_inf<acc_t>())) return loglik != loglik ? loglik : std::numeric_limits<acc_t>::infinity();
  if (!need_grad) return -loglik;

  // beta_{t-1} and the posteriors of frame t, for t = T .. 1; they overwrite frame t's emissions
  Rows<acc_t> beta(bands, U + 1, false);
  beta.row(T)[U] = 0;
  beta.seal(T);
  for (int64_t t = T; t >= 1; --t) {
    const int64_t lo_t = bands.lo[t], hi_t = bands.hi[t], lo_p = bands.lo[t - 1], hi_p = bands.hi[t - 1];
    const acc_t e_special = row.special[t - 1];
    row.load_targets(t, std::max<int64_t>(lo_p + 1, 1), hi_p + 1, e);
    e[0] = 0;
    const acc_t* a = alpha.row(t - 1);
    const acc_t* n = beta.row(t);

    acc_t slack = 0;
    const int64_t s_lo = std::max(lo_t, lo_p), s_hi = std::min(hi_t, hi_p);
#pragma omp simd reduction(+ : slack)
    for (int64_t u = s_lo; u <= s_hi; ++u) slack += LogMath<acc_t>::exp(a[u] + e_special + n[u] - loglik);
    row.special[t - 1] = slack;

    const int64_t c_lo = column_lo(t, T, U, m);
    acc_t* post = row.table + (t - 1) * row.W;
    std::fill(post, post + row.W, acc_t(0));
    const int64_t u_lo = std::max({c_lo, lo_t, lo_p + 1});
    const int64_t u_hi = std::min({column_hi(t, U), hi_t, hi_p + 1, c_lo + row.W - 1});
    post -= c_lo;
#pragma omp simd
    for (int64_t u = u_lo; u <= u_hi; ++u) post[u] = LogMath<acc_t>::exp(a[u - 1] + e[u] + n[u] - loglik);

    acc_t* b = beta.row(t - 1);
#pragma omp simd
    for (int64_t u = lo_p; u <= hi_p; ++u) b[u] = preserve_beta_cell(n[u], n[u + 1], e_special, e[u + 1]);
    beta.seal(t - 1);
  }
  return -loglik;
}

// ---------------------------------------------------------------------------------------------
// standard lattice (classic CTC: merge repeats, then delete the blank), split by state parity
// ---------------------------------------------------------------------------------------------

template <typename acc_t>
acc_t standard_row(const Row<acc_t>& row, bool need_grad) {
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
  // the factored form of lattice.h's split recurrences (one exp fewer per state)
  Rows<acc_t> alpha_b(blanks, U + 1, need_grad, 0), alpha_l(labels, U + 1, need_grad, 1);
  StateRow<acc_t> emit(U + 2), merged(U + 1);
  acc_t* e = emit.at();
  acc_t* mg = merged.at();
  alpha_b.row(0)[0] = 0;
  alpha_b.seal(0);
  alpha_l.seal(0);
  for (int64_t t = 1; t <= T; ++t) {
    const acc_t e_special = row.special[t - 1];
    const acc_t* ab = alpha_b.row(t - 1);
    const acc_t* al = alpha_l.row(t - 1);
    acc_t* cb = alpha_b.row(t);
    acc_t* cl = alpha_l.row(t);
    const int64_t b_lo = blanks.lo[t], b_hi = blanks.hi[t], l_lo = labels.lo[t], l_hi = labels.hi[t];
    const int64_t m_lo = std::min(b_lo, l_lo - 1), m_hi = std::max(b_hi, l_hi - 1);
#pragma omp simd
    for (int64_t u = m_lo; u <= m_hi; ++u) mg[u] = logaddexp(ab[u], al[u]);
#pragma omp simd
    for (int64_t u = b_lo; u <= b_hi; ++u) cb[u] = mg[u] + e_special;
    row.load_targets(t, l_lo, l_hi, e);
#pragma omp simd
    for (int64_t u = l_lo; u <= l_hi; ++u) cl[u] = logaddexp(al[u], k[u] == 0 ? mg[u - 1] : ab[u - 1]) + e[u];
    alpha_b.seal(t);
    alpha_l.seal(t);
  }
  const acc_t loglik = U == 0 ? alpha_b.row(T)[0] : logaddexp(alpha_b.row(T)[U], alpha_l.row(T)[U]);
  if (!(loglik > neg_inf<acc_t>())) return loglik != loglik ? loglik : std::numeric_limits<acc_t>::infinity();
  if (!need_grad) return -loglik;

  Rows<acc_t> beta_b(blanks, U + 1, false), beta_l(labels, U + 1, false);
  if (blanks.hi[T] >= U) beta_b.row(T)[U] = 0;
  beta_b.seal(T);
  if (U > 0) beta_l.row(T)[U] = 0;
  beta_l.seal(T);
  for (int64_t t = T; t >= 1; --t) {
    const acc_t e_special = row.special[t - 1];
    const acc_t* ab = alpha_b.row(t);
    const acc_t* al = alpha_l.row(t);
    const acc_t* nb = beta_b.row(t);
    const acc_t* nl = beta_l.row(t);
    const int64_t lp_lo = labels.lo[t - 1], lp_hi = labels.hi[t - 1];
    const int64_t bp_lo = blanks.lo[t - 1], bp_hi = std::max(blanks.hi[t - 1], lp_hi);  // (see below)
    row.load_targets(t, std::min(lp_lo, bp_lo + 1), std::max(bp_hi + 1, labels.hi[t]), e);

    // posteriors of frame t: blank occupancies sum into the special token, labels go to the table
    acc_t slack = 0;
#pragma omp simd reduction(+ : slack)
    for (int64_t u = blanks.lo[t]; u <= blanks.hi[t]; ++u) slack += LogMath<acc_t>::exp(ab[u] + nb[u] - loglik);
    row.special[t - 1] = slack;
    const int64_t c_lo = labels.lo[t];
    acc_t* post = row.table + (t - 1) * row.W;
    std::fill(post, post + row.W, acc_t(0));
    post -= c_lo;
    const int64_t c_hi = std::min(labels.hi[t], c_lo + row.W - 1);
#pragma omp simd
    for (int64_t u = c_lo; u <= c_hi; ++u) post[u] = LogMath<acc_t>::exp(al[u] + nl[u] - loglik);

    // B_{t-1}(u) over the blank band and one state past it: the label cells read it as their skip term
    // even where the blank state itself is off the band; seal() then restores the -inf guards
    acc_t* bb = beta_b.row(t - 1);
    acc_t* bl = beta_l.row(t - 1);
#pragma omp simd
    for (int64_t u = bp_lo; u <= bp_hi; ++u) bb[u] = standard_blank_beta_cell(nb[u], nl[u + 1], e_special, e[u + 1]);
#pragma omp simd
    for (int64_t u = lp_lo; u <= lp_hi; ++u)
      bl[u] = logaddexp(nl[u] + e[u], k[u + 1] == 0 ? bb[u] : nb[u] + e_special);
    beta_b.seal(t - 1);
    beta_l.seal(t - 1);
  }
  return -loglik;
}

}  // namespace cpu
}  // namespace mdlm_ctc
