// The two CTC lattices, written once for the CPU and CUDA kernels: state bands and recurrence
// steps. See SPEC §3 and mdlm_ctc/reference.py (the readable oracle these must agree with).
//
// Per row: T = input length, U = target length, y_1..y_U the target, k the special token
// (<slack> or the CTC blank); e_t(x) = log p_t(x) is the emission of token x at frame t (1-based),
// already 0 / -inf at observed frames (SPEC §3.4).
//
// preserve (the collapse deletes k only; states u = 0..U = target tokens emitted so far):
//     alpha_0(0) = 0, alpha_0(u > 0) = -inf
//     alpha_t(u) = logaddexp(alpha_{t-1}(u) + e_t(k), alpha_{t-1}(u-1) + e_t(y_u))
//     beta_T(U) = 0,  beta_{t-1}(u) = logaddexp(beta_t(u) + e_t(k), beta_t(u+1) + e_t(y_{u+1}))
//     loglik = alpha_T(U);  max_shift m keeps state u at frame t only if u >= t - m or u = U.
//
// standard (classic CTC; states s = 0..2U over the extended label l' = k y_1 k y_2 ... y_U k):
//     alpha_0(0) = 0 (a virtual frame 0 that makes alpha_1 the usual CTC initialisation)
//     alpha_t(s) = logsumexp(alpha_{t-1}(s), alpha_{t-1}(s-1), [skip_s] alpha_{t-1}(s-2)) + e_t(l'_s)
//     skip_s: s odd, s >= 3, y_{(s+1)/2} != y_{(s-1)/2}
//     beta_T(2U) = beta_T(2U-1) = 0,
//     beta_{t-1}(s) = logsumexp(beta_t(s) + e_t(l'_s), beta_t(s+1) + e_t(l'_{s+1}),
//                               [skip_{s+2}] beta_t(s+2) + e_t(l'_{s+2}))
//     loglik = logaddexp(alpha_T(2U), alpha_T(2U-1))  (alpha_T(0) when U = 0)
//
// Bands. Only states that lie on some complete path are computed: for preserve
// max(0, U-(T-t), min(t-m, U)) <= u <= min(t, U), for standard
// max(0, 2(U-T+t)-1) <= s <= min(2U, max(0, 2t-1)). A lattice therefore costs O(T * band width),
// and band width = min(T-U, m) + 1 (preserve) or 2(T-U) + 1 (standard). The kernels store the
// standard lattice split by parity (blank states s = 2u, label states s = 2u - 1, each indexed by
// u), which makes every emission row contiguous and every recurrence a plain vector loop.
//
// Posterior table (the contract between every forward kernel and the gradient pass): for frame
// t (1-based) the probability of emitting target column u sits at post_target[t-1][u - column_lo(t)]
// for column_lo(t) <= u <= column_hi(t), and the probability of emitting k at post_special[t-1].
// Its width is at most column_band_width(T, U, m).
#pragma once

#include "logspace.h"

namespace mdlm_ctc {

enum Collapse : int64_t { kPreserve = 0, kStandard = 1 };

template <typename I>
MDLM_HD I imin(I a, I b) { return a < b ? a : b; }
template <typename I>
MDLM_HD I imax(I a, I b) { return a > b ? a : b; }

// ---- bands (frames t = 0..T, inclusive bounds; empty when lo > hi) --------------------------

MDLM_HD int64_t preserve_state_lo(int64_t t, int64_t T, int64_t U, int64_t max_shift) {
  int64_t lo = imax<int64_t>(0, U - (T - t));
  if (max_shift >= 0) lo = imax(lo, imin(t - max_shift, U));
  return lo;
}

MDLM_HD int64_t preserve_state_hi(int64_t t, int64_t U) { return imin(t, U); }

// The standard lattice split by state parity, as the kernels store it: blank states s = 2u
// (u = 0..U) and label states s = 2u - 1 (u = 1..U) each indexed by u. The same bands in u:
MDLM_HD int64_t standard_blank_lo(int64_t t, int64_t T, int64_t U) { return imax<int64_t>(0, U - T + t); }
MDLM_HD int64_t standard_blank_hi(int64_t t, int64_t U) { return imin<int64_t>(U, imax<int64_t>(0, t - 1)); }
MDLM_HD int64_t standard_label_lo(int64_t t, int64_t T, int64_t U) { return imax<int64_t>(1, U - T + t); }
MDLM_HD int64_t standard_label_hi(int64_t t, int64_t U) { return imin(t, U); }

// Target columns u in [1, U] that can be emitted at frame t (1-based).
MDLM_HD int64_t column_lo(int64_t t, int64_t T, int64_t U, int64_t max_shift) {
  int64_t lo = imax<int64_t>(1, U - T + t);
  if (max_shift >= 0) lo = imax(lo, t - max_shift);
  return lo;
}

MDLM_HD int64_t column_hi(int64_t t, int64_t U) { return imin(t, U); }

MDLM_HD int64_t column_band_width(int64_t T, int64_t U, int64_t max_shift) {
  if (U > T || U <= 0) return 0;
  int64_t w = imin(U, T - U + 1);
  if (max_shift >= 0) w = imin(w, max_shift + 1);
  return w;
}

// ---- one cell of each recurrence ------------------------------------------------------------

template <typename acc_t>
MDLM_HD acc_t preserve_alpha_cell(acc_t prev_u, acc_t prev_u_minus_1, acc_t e_special, acc_t e_target_u) {
  return logaddexp(prev_u + e_special, prev_u_minus_1 + e_target_u);
}

template <typename acc_t>
MDLM_HD acc_t preserve_beta_cell(acc_t next_u, acc_t next_u_plus_1, acc_t e_special, acc_t e_target_u_plus_1) {
  return logaddexp(next_u + e_special, next_u_plus_1 + e_target_u_plus_1);
}

// Split form of the standard recurrences (B = blank states, L = label states, both indexed by u):
//   alpha: B_t(u) = logaddexp(B_{t-1}(u), L_{t-1}(u)) + e_t(k)
//          L_t(u) = logsumexp(L_{t-1}(u), B_{t-1}(u-1), [skip_u] L_{t-1}(u-1)) + e_t(y_u)
//   beta:  B_{t-1}(u) = logaddexp(B_t(u) + e_t(k), L_t(u+1) + e_t(y_{u+1}))
//          L_{t-1}(u) = logsumexp(L_t(u) + e_t(y_u), B_t(u) + e_t(k), [skip_{u+1}] L_t(u+1) + e_t(y_{u+1}))
// with skip_u: y_u != y_{u-1} (u >= 2). `*_masked` arguments are already -inf where the skip is not allowed.
// The same values with the two-term sum the blank and the skip share factored out (one exp fewer per
// state; the CPU kernels use it):
//   alpha: m(u) = logaddexp(B_{t-1}(u), L_{t-1}(u)),  B_t(u) = m(u) + e_t(k),
//          L_t(u) = logaddexp(L_{t-1}(u), skip_u ? m(u-1) : B_{t-1}(u-1)) + e_t(y_u)
//   beta:  B_{t-1}(u) as below, L_{t-1}(u) = logaddexp(L_t(u) + e_t(y_u), skip_{u+1} ? B_{t-1}(u) : B_t(u) + e_t(k))
//          (B_{t-1}(u) is then needed one state past the blank band, where a label reads it)
template <typename acc_t>
MDLM_HD acc_t standard_blank_alpha_cell(acc_t blank_u, acc_t label_u, acc_t e_special) {
  return logaddexp(blank_u, label_u) + e_special;
}

template <typename acc_t>
MDLM_HD acc_t standard_label_alpha_cell(acc_t label_u, acc_t blank_u_minus_1, acc_t label_u_minus_1_masked,
                                        acc_t e_target_u) {
  return logaddexp3(label_u, blank_u_minus_1, label_u_minus_1_masked) + e_target_u;
}

template <typename acc_t>
MDLM_HD acc_t standard_blank_beta_cell(acc_t blank_u, acc_t label_u_plus_1, acc_t e_special, acc_t e_target_u_plus_1) {
  return logaddexp(blank_u + e_special, label_u_plus_1 + e_target_u_plus_1);
}

template <typename acc_t>
MDLM_HD acc_t standard_label_beta_cell(acc_t label_u, acc_t blank_u, acc_t label_u_plus_1_masked, acc_t e_special,
                                       acc_t e_target_u, acc_t e_target_u_plus_1) {
  return logaddexp3(label_u + e_target_u, blank_u + e_special, label_u_plus_1_masked + e_target_u_plus_1);
}

}  // namespace mdlm_ctc
