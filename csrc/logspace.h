// Log-space numerics shared by the CPU (C++) and CUDA lattice kernels.
//
// Every lattice value is a natural log of a probability; -inf is "impossible". Two rules:
//   * a log-sum-exp whose terms are all -inf is -inf (never NaN: the "all -inf guard");
//   * NaN is not propagated through the lattice helpers (their max/min would drop it, and checking
//     every cell costs a fifth of the lattice). A NaN logit still surfaces: the vocabulary pass sees
//     it (the logsumexp, or a gathered emission, is NaN) and the kernel marks the whole row NaN.
//
// Float accumulation uses vectorisable polynomial exp/log on the CPU (the SSE-mathfun / Cephes
// single-precision kernels, about 1 ulp on the ranges used here) and the CUDA intrinsics on the
// GPU; double accumulation uses the C library. `LogMath<acc_t>` is the single entry point, so a
// kernel is written once for both accumulation types.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__)
#define MDLM_HD __host__ __device__ __forceinline__
#else
#define MDLM_HD inline __attribute__((always_inline))
#endif

namespace mdlm_ctc {

template <typename T>
MDLM_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

#if !defined(__CUDA_ARCH__)
// ---- CPU single precision: branch-free, so that `#pragma omp simd` loops vectorise ----------

MDLM_HD float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
}

MDLM_HD int32_t float_to_bits(float f) {
  int32_t i;
  std::memcpy(&i, &f, sizeof(i));
  return i;
}

// exp(x) for x <= ~88; exactly 0 for x < -87.3 (including -inf); NaN stays NaN.
MDLM_HD float cpu_expf(float x) {
  const float xc = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const float z = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * z + r + 1.0f;
  const float scale = bits_to_float((static_cast<int32_t>(n) + 127) << 23);
  const float y = p * scale;
  return x != x ? x : (x < -87.3f ? 0.0f : y);
}

// log(x) for positive normal x, no special cases (the Cephes polynomial on [sqrt(1/2), sqrt(2))).
MDLM_HD float cpu_logf_normal(float x) {
  const int32_t bits = float_to_bits(x);
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126);
  float m = bits_to_float((bits & 0x007fffff) | 0x3f000000);  // in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float p = 7.0376836292e-2f;
  p = p * m - 1.1514610310e-1f;
  p = p * m + 1.1676998740e-1f;
  p = p * m - 1.2420140846e-1f;
  p = p * m + 1.4249322787e-1f;
  p = p * m - 1.6668057665e-1f;
  p = p * m + 2.0000714765e-1f;
  p = p * m - 2.4999993993e-1f;
  p = p * m + 3.3333331174e-1f;
  float y = p * m * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  return m + y + e * 0.693359375f;
}

// log(x) for x >= 0: log(0) = -inf, NaN stays NaN, +inf stays +inf, subnormals are treated as 0.
MDLM_HD float cpu_logf(float x) {
  const float r = cpu_logf_normal(x);
  const bool is_zero = x < 1.17549435e-38f;  // zero or subnormal
  return x != x ? x : (is_zero ? neg_inf<float>() : (x == std::numeric_limits<float>::infinity() ? x : r));
}
#endif  // !__CUDA_ARCH__

template <typename acc_t>
struct LogMath;

// On the GPU, float exp and log_1_to_4 run on the special function unit, one MUFU instruction and one
// multiply each (the precise expf / logf are ~10 and ~30 instructions with branches): exp(x) =
// ex2.approx.ftz(x log2 e), log(x) = lg2.approx.ftz(x) ln 2. The PTX ISA documents ex2.approx.f32 to
// 2 ulp over its range and lg2.approx.f32 to ~2^-22 absolute (so < 3e-7 absolute for x in [1, 4)); the
// scaling adds half an ulp each, and flushing subnormals to zero only drops terms below 2^-126 that are
// added to 1. In a log-add-exp the sum 1 + exp(min - max) is therefore off by < 2^-21 and its log by
// < 4e-7 absolute, per cell. A lattice value is a sum of T log-probabilities (|alpha| ~ 1e2..1e4) whose
// own float32 rounding (ulp 8e-6..1e-3) is larger than that: the SFU does not limit the lattice's
// accuracy. The GPU tests compare against the float64 reference at the float32 tolerances (the host
// build, emulator included, keeps the CPU polynomials). Double precision keeps exp/log.
#if defined(__CUDA_ARCH__)
__device__ __forceinline__ float sfu_exp(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.44269504088896341f));
  return y;
}
__device__ __forceinline__ float sfu_log(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y * 0.693147180559945309f;
}
#endif

template <>
struct LogMath<float> {
  MDLM_HD static float exp(float x) {
#if defined(__CUDA_ARCH__)
    return sfu_exp(x);
#else
    return cpu_expf(x);
#endif
  }
  MDLM_HD static float log(float x) {
#if defined(__CUDA_ARCH__)
    return ::logf(x);
#else
    return cpu_logf(x);
#endif
  }
  // log(x) for x in [1, 4) only
  MDLM_HD static float log_1_to_4(float x) {
#if defined(__CUDA_ARCH__)
    return sfu_log(x);
#else
    return cpu_logf_normal(x);
#endif
  }
};

template <>
struct LogMath<double> {
  MDLM_HD static double exp(double x) { return ::exp(x); }
  MDLM_HD static double log(double x) { return ::log(x); }
  MDLM_HD static double log_1_to_4(double x) { return ::log(x); }
};

// On the GPU one FMNMX / DMNMX instead of a compare and a select. (fmax drops a NaN where the
// comparison would keep one or the other: NaN rows never reach the helpers there, see the top.)
template <typename T>
MDLM_HD T max2(T a, T b) {
#if defined(__CUDA_ARCH__)
  return ::fmax(a, b);
#else
  return a > b ? a : b;
#endif
}

template <typename T>
MDLM_HD T min2(T a, T b) {
#if defined(__CUDA_ARCH__)
  return ::fmin(a, b);
#else
  return a < b ? a : b;
#endif
}

// log(exp(a) + exp(b)) with the all -inf guard. The larger term contributes exp(0) = 1 exactly, so
// only the smaller one needs an exp: max + log(1 + exp(min - max)). The guard is branch-free: when
// both are -inf, min - max is NaN and max2(NaN, -inf) = -inf (fmax drops a NaN, and so does the host
// form's compare), so the sum is 1 and the result max + log(1) = -inf. Finite maxima are unchanged.
template <typename acc_t>
MDLM_HD acc_t logaddexp(acc_t a, acc_t b) {
  const acc_t m = max2(a, b);
  const acc_t s = acc_t(1) + LogMath<acc_t>::exp(max2(min2(a, b) - m, neg_inf<acc_t>()));
  return m + LogMath<acc_t>::log_1_to_4(s);
}

// log(exp(a) + exp(b) + exp(c)) with the all -inf guard (as above); two exps (the maximum contributes 1).
template <typename acc_t>
MDLM_HD acc_t logaddexp3(acc_t a, acc_t b, acc_t c) {
  const acc_t hi = max2(a, b), lo = min2(a, b);
  const acc_t m = max2(hi, c), mid = min2(hi, c);
  const acc_t s = acc_t(1) + LogMath<acc_t>::exp(max2(lo - m, neg_inf<acc_t>())) +
                  LogMath<acc_t>::exp(max2(mid - m, neg_inf<acc_t>()));
  return m + LogMath<acc_t>::log_1_to_4(s);
}

}  // namespace mdlm_ctc
