// C++ CPU kernels for both CTC lattices (backend "cpu"): the loss forward with the posteriors the
// gradient needs, and the gradient pass. The recurrences, bands and the posterior layout are in
// lattice.h (shared with the CUDA kernels), the lattice of one row in lattice_cpu.h;
// mdlm_ctc/reference.py is the readable oracle.
//
// Layouts (B = batch, T = frames, V = vocabulary, U = padded target length, W = band width):
//   logits        [B, T, V]  float32/float64/bfloat16/float16, any strides on B and T, V contiguous
//   targets       [B, U]     int64;  input_lengths, target_lengths [B] int64;  observed [B, T] int64
//   nll           [B]        acc     -log p(target); +inf for an infeasible row
//   lse           [B, T]     acc     logsumexp over V (0 where t >= input length or unnormalised)
//   post_target   [B, T, W]  acc     posterior of target column column_lo(t+1) + j at frame t
//   post_special  [B, T]     acc     posterior of the special token at frame t
// acc is float64 for float64 logits and float32 otherwise. The windowed stages (emissions_window,
// gradient_window; ops.cpp) take a window of the flat frames i = b*T + t as [n, V] (or [n, v], a
// vocabulary window) logits with the per-frame inputs and outputs of those n frames; they run the same
// per-frame code (emit_frame, gradient_frame) as the whole-tensor stages.
//
// Parallelisation: the vocabulary passes (logsumexp, gradient) run over B*T rows, the lattice over
// the B rows, all through at::parallel_for (OpenMP). Within a row the lattice is sequential in t and
// vectorised over the band (`#pragma omp simd`; the exp/log it uses are branch-free for that).
// Nothing depends on the thread count or schedule: results are bitwise reproducible.
//
// Robustness: lengths are clamped to the padded sizes and token ids to [0, V) before any memory
// access, so even unvalidated input never reads or writes out of bounds.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "lattice_cpu.h"

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace mdlm_ctc {
namespace {

using cpu::preserve_row;
using cpu::Row;
using cpu::standard_row;

template <typename scalar_t, typename acc_t>
inline acc_t load_as(const scalar_t* p) {
  return static_cast<acc_t>(*p);
}

template <>
inline float load_as<c10::BFloat16, float>(const c10::BFloat16* p) {
  return bits_to_float(static_cast<int32_t>(p->x) << 16);
}

// acc -> the logits' dtype, rounding to nearest even. bfloat16 with integer ops (a NaN stays a quiet
// NaN), the same result as c10::BFloat16's conversion but branch-free, so the gradient's store loops
// vectorise.
template <typename scalar_t, typename acc_t>
inline scalar_t store_as(acc_t value) {
  return static_cast<scalar_t>(value);
}

template <>
inline c10::BFloat16 store_as<c10::BFloat16, float>(float value) {
  const uint32_t bits = static_cast<uint32_t>(float_to_bits(value));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(value != value ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

// exp(x - m) for the vocabulary and gradient passes (x <= m up to rounding; -inf gives 0, NaN stays NaN).
// Float: 2^((x - m) log2 e) with the lattice's base-2 polynomial (lattice_cpu.h, 1e-7 relative on the
// reduced argument): x - m is exact near the maximum, and the one rounding of the product costs at most
// |x - m| 6e-8 relative, i.e. < 3e-8 of the frame's sum at any x. Fewer instructions than logspace.h's
// general exp (no natural-log range reduction), which was about a third of these passes' time at C1.
template <typename acc_t>
inline acc_t exp_below(acc_t x, acc_t m) {
  return LogMath<acc_t>::exp(x - m);
}

template <>
inline float exp_below<float>(float x, float m) {
  return cpu::exp2f_any((x - m) * cpu::LatticeMath<float>::kFromLn);
}

// exp_below where x - m is finite or -inf and at most a rounding above 0: a frame with no NaN and no +inf
// logit, m its maximum or its finite logsumexp. The same values without the NaN test, its select and the
// upper clamp (the float version's other instructions are the polynomial's).
template <typename acc_t>
inline acc_t exp_below_finite(acc_t x, acc_t m) {
  return exp_below(x, m);
}

template <>
inline float exp_below_finite<float>(float x, float m) {
  const float d = (x - m) * cpu::LatticeMath<float>::kFromLn;
  return cpu::exp2_clamped<cpu::exp2_reduced6>(d > -127.0f ? d : -127.0f);
}

// out[c] = round(g * work[c]) for c < n: a gradient row. With `stream` (the whole-tensor gradient, read by
// the next operation and not by this pass), float rows of at least kStreamMin values bypass the cache
// (streaming stores, AVX): the gradient is as large as the logits, and ordinary stores first read every
// line they write, a third of this pass's memory traffic. Same values either way (one multiply per
// element). A thread that streamed ends its share with store_fence(), so that the rows are visible to
// whoever reads them next. The fused LM head's windows are not streamed: a GEMM reads them at once.
template <typename scalar_t, typename acc_t>
inline void store_scaled(scalar_t* out, const acc_t* work, acc_t g, int64_t n, bool /*stream*/) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) out[c] = store_as<scalar_t, acc_t>(g * work[c]);
}

constexpr int64_t kStreamMin = 256;

#if defined(__AVX__)
template <>
inline void store_scaled<float, float>(float* out, const float* work, float g, int64_t n, bool stream) {
  int64_t c = 0;
  if (stream && n >= kStreamMin) {
    for (; (reinterpret_cast<uintptr_t>(out + c) & 31) != 0; ++c) out[c] = g * work[c];
    const __m256 gv = _mm256_set1_ps(g);
    for (; c + 8 <= n; c += 8) _mm256_stream_ps(out + c, _mm256_mul_ps(gv, _mm256_loadu_ps(work + c)));
  }
  for (; c < n; ++c) out[c] = g * work[c];
}
#endif

inline void store_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

template <typename scalar_t>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// Output buffers (the band table, the gradient) are tens of MB. glibc serves allocations above 32 MB
// with fresh mmaps, whose page faults and zeroing cost a fifth of a C1-sized loss, on every call.
// This pool keeps freed output buffers (up to MDLM_CTC_CPU_POOL_MB, default 512; 0 disables it) and
// hands them out again for the next request of the same size class. It reports every buffer it hands
// out and takes back to the profiler as the c10 CPU allocator does, so memory profiles (and
// benchmarks/common.py's allocator peak) see pooled buffers as live for exactly as long as a tensor
// holds them; cached free buffers are not live.
class OutputPool {
 public:
  static OutputPool& get() {
    static OutputPool* pool = new OutputPool();  // never destroyed: tensors may outlive static teardown
    return *pool;
  }

  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    int64_t numel = 1;
    for (const int64_t s : sizes) numel *= s;
    const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
    if (bytes < kMinBytes || cap_bytes_ == 0) return at::empty(sizes, options);
    const size_t rounded = round_up(bytes);
    void* data = take(rounded);
    if (data == nullptr) {
      data = std::aligned_alloc(64, rounded);
      TORCH_CHECK(data != nullptr, "mdlm_ctc: out of memory allocating ", rounded, " bytes");
    }
    report(data, static_cast<int64_t>(rounded));
    return at::from_blob(data, sizes, [rounded](void* p) { OutputPool::get().give_back(p, rounded); }, options);
  }

 private:
  static constexpr size_t kMinBytes = size_t(4) << 20;  // smaller buffers: the allocator is fine
  OutputPool() {
    const char* env = std::getenv("MDLM_CTC_CPU_POOL_MB");
    cap_bytes_ = (env != nullptr ? static_cast<size_t>(std::max(0L, std::atol(env))) : size_t(512)) << 20;
  }
  static size_t round_up(size_t bytes) {  // size classes: multiples of 1/8 of the next power of two
    size_t power = 1;
    while (power < bytes) power <<= 1;
    const size_t step = std::max<size_t>(power / 8, 4096);
    return (bytes + step - 1) / step * step;
  }
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = free_.find(bytes);
    if (it == free_.end()) return nullptr;
    void* data = it->second;
    free_.erase(it);
    cached_ -= bytes;
    return data;
  }
  void report(void* data, int64_t delta) {
    std::lock_guard<std::mutex> lock(mutex_);
    live_ += delta;
    c10::reportMemoryUsageToProfiler(data, delta, live_, live_ + cached_, c10::Device(c10::DeviceType::CPU));
  }
  void give_back(void* data, size_t bytes) {
    report(data, -static_cast<int64_t>(bytes));
    std::lock_guard<std::mutex> lock(mutex_);
    while (cached_ + bytes > cap_bytes_ && !free_.empty()) {  // evict the largest cached buffers first
      auto largest = std::prev(free_.end());
      std::free(largest->second);
      cached_ -= largest->first;
      free_.erase(largest);
    }
    if (cached_ + bytes > cap_bytes_) {
      std::free(data);
      return;
    }
    free_.emplace(bytes, data);
    cached_ += bytes;
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;
  size_t cached_ = 0, cap_bytes_ = 0;
  size_t live_ = 0;  // bytes held by tensors
};

// ---------------------------------------------------------------------------------------------
// vocabulary pass: logsumexp over V and the band's emissions, one (b, t) row (in L1 once read)
// ---------------------------------------------------------------------------------------------

// logsumexp over V. With a `kept` buffer [V] (the two-pass vocabulary pass) it also keeps
// exp(x_v - max) there and their sum in *kept_sum; then *kept_sum > 0 unless the frame is degenerate
// (every logit -inf or NaN, or a +inf logit), where the buffer is not filled and *kept_sum is 0. The sum
// is the same loop either way, so the loss has the same bits with and without the gradient.
template <typename scalar_t, typename acc_t>
acc_t row_logsumexp(const scalar_t* x, int64_t V, acc_t* kept = nullptr, acc_t* kept_sum = nullptr) {
  if (kept_sum != nullptr) *kept_sum = 0;
  acc_t mx = neg_inf<acc_t>();
  int32_t any_nan = 0;
#pragma omp simd reduction(max : mx) reduction(| : any_nan)
  for (int64_t v = 0; v < V; ++v) {
    const acc_t xv = load_as<scalar_t, acc_t>(x + v);
    mx = xv > mx ? xv : mx;  // skips NaN; a NaN logit makes the sum below NaN instead
    any_nan |= static_cast<int32_t>(xv != xv);  // (an int flag: a bool reduction does not vectorise)
  }
  if (mx == neg_inf<acc_t>()) {  // every logit -inf (an impossible frame) or NaN
    for (int64_t v = 0; v < V; ++v) {
      const acc_t xv = load_as<scalar_t, acc_t>(x + v);
      if (xv != xv) return xv;
    }
    return mx;
  }
  if (mx == std::numeric_limits<acc_t>::infinity()) return mx;
  // mx is finite here, so a frame without NaN takes exp_below_finite (same values, fewer instructions)
  const auto sum_exps = [&](auto exp_fn) {
    acc_t sum = 0;
    if (kept == nullptr) {
#pragma omp simd reduction(+ : sum)
      for (int64_t v = 0; v < V; ++v) sum += exp_fn(load_as<scalar_t, acc_t>(x + v), mx);
    } else {
#pragma omp simd reduction(+ : sum)
      for (int64_t v = 0; v < V; ++v) {
        const acc_t e = exp_fn(load_as<scalar_t, acc_t>(x + v), mx);
        kept[v] = e;
        sum += e;
      }
      *kept_sum = sum;
    }
    return sum;
  };
  const acc_t sum = any_nan ? sum_exps([](acc_t a, acc_t b) { return exp_below(a, b); })
                            : sum_exps([](acc_t a, acc_t b) { return exp_below_finite(a, b); });
  return mx + LogMath<acc_t>::log(sum);
}

// log p_t(token), with an observed frame forced to 0 (its token) / -inf (any other) (SPEC §3.4).
template <typename scalar_t, typename acc_t>
acc_t emission(const scalar_t* x, acc_t lse, int64_t observed, int64_t token, bool normalize) {
  if (observed >= 0) return observed == token ? acc_t(0) : neg_inf<acc_t>();
  const acc_t logit = load_as<scalar_t, acc_t>(x + token);
  if (!normalize) return logit;
  return lse == neg_inf<acc_t>() ? neg_inf<acc_t>() : logit - lse;
}

// ---------------------------------------------------------------------------------------------
// launchers
// ---------------------------------------------------------------------------------------------

int64_t clamp_len(int64_t v, int64_t hi) { return std::min<int64_t>(std::max<int64_t>(v, 0), hi); }

at::Tensor as_long(const at::Tensor& x) { return x.to(at::kLong).contiguous(); }

// Where frame i = b*T + t sits in the lattice: its row's clamped lengths and band (lattice.h).
struct FrameGeometry {
  const int64_t* input_lengths;   // [B]
  const int64_t* target_lengths;  // [B]
  const int64_t* tokens;          // [B, U_max], clamped to the vocabulary
  int64_t T, U_max, max_shift;

  int64_t row(int64_t i) const { return i / T; }
  int64_t frame(int64_t i) const { return i % T; }
  int64_t input_length(int64_t i) const { return clamp_len(input_lengths[row(i)], T); }
  int64_t target_length(int64_t i) const { return clamp_len(target_lengths[row(i)], U_max); }
  bool active(int64_t i) const { return frame(i) < input_length(i); }
  // first band column of frame i and its width (at most W); tokens_from(i)[j] is column c_lo + j's token
  int64_t band_lo(int64_t i) const { return column_lo(frame(i) + 1, input_length(i), target_length(i), max_shift); }
  int64_t band_count(int64_t i, int64_t W) const {
    return std::max<int64_t>(0, std::min(column_hi(frame(i) + 1, target_length(i)) - band_lo(i) + 1, W));
  }
  const int64_t* tokens_from(int64_t i) const { return tokens + row(i) * U_max + (band_lo(i) - 1); }
};

// The band's emissions of a free frame, slots [from, width) one by one: row[j] = x[y[j]] - l (y: token ids,
// already clamped to the vocabulary); returns whether any is NaN.
template <typename scalar_t, typename acc_t>
inline bool gather_band_from(const scalar_t* x, const int64_t* y, int64_t from, int64_t width, acc_t l, acc_t* row) {
  bool nan = false;
#pragma omp simd reduction(| : nan)
  for (int64_t j = from; j < width; ++j) {
    row[j] = load_as<scalar_t, acc_t>(x + y[j]) - l;
    nan |= row[j] != row[j];
  }
  return nan;
}

// All width slots of the band (one by one, or below with AVX2).
template <typename scalar_t, typename acc_t>
inline bool gather_band(const scalar_t* x, const int64_t* y, int64_t width, acc_t l, acc_t* row) {
  return gather_band_from(x, y, 0, width, l, row);
}

// Float logits with AVX2: hardware gathers, 8 tokens per iteration. GCC does not emit gathers when it
// tunes for AMD cores, and the scalar loop (a load, a subtract, a NaN test and a store per token) was a
// sixth of the vocabulary pass at C1, whose bands are 1,024 tokens wide. Same values.
#if defined(__AVX2__)
template <>
inline bool gather_band<float, float>(const float* x, const int64_t* y, int64_t width, float l, float* row) {
  const __m256 lv = _mm256_set1_ps(l);
  __m256 bad = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= width; j += 8) {
    const __m128 lo = _mm256_i64gather_ps(x, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y + j)), 4);
    const __m128 hi = _mm256_i64gather_ps(x, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y + j + 4)), 4);
    const __m256 v = _mm256_sub_ps(_mm256_set_m128(hi, lo), lv);
    _mm256_storeu_ps(row + j, v);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  return gather_band_from(x, y, j, width, l, row) || _mm256_movemask_ps(bad) != 0;  // the rest one by one
}
#endif

// The vocabulary pass of one frame i: its lse, its W band slots and its special emission, from its
// logits row xr [V] (see ops.cpp for the values). A NaN anywhere in the frame is carried by the
// special emission, which the lattice checks.
// `kept` / `kept_sum`: row_logsumexp's (the two-pass pass keeps the exponentials of a free frame).
template <typename scalar_t, typename acc_t>
void emit_frame(const scalar_t* xr, int64_t V, int64_t i, const FrameGeometry& geo, int64_t o, int64_t k, int64_t W,
                bool normalize, acc_t* lse, acc_t* row, acc_t* special, acc_t* kept = nullptr,
                acc_t* kept_sum = nullptr) {
  if (!geo.active(i)) {
    *lse = *special = 0;
    std::fill(row, row + W, acc_t(0));
    return;
  }
  const acc_t l = normalize ? row_logsumexp<scalar_t, acc_t>(xr, V, kept, kept_sum) : acc_t(0);
  const int64_t width = geo.band_count(i, W);
  const int64_t* y = geo.tokens_from(i);
  bool nan = l != l;
  if (o < 0 && l != neg_inf<acc_t>()) {  // the common case, a free frame
    nan = gather_band(xr, y, width, l, row) || nan;
  } else {
    for (int64_t j = 0; j < width; ++j) {
      row[j] = emission(xr, l, o, y[j], normalize);
      nan |= row[j] != row[j];
    }
  }
  std::fill(row + width, row + W, acc_t(0));
  *lse = l;
  const acc_t e_special = emission(xr, l, o, k, normalize);
  *special = nan ? std::numeric_limits<acc_t>::quiet_NaN() : e_special;
}

// The gradient pass of one frame i over the vocabulary window [v0, v0 + v) of a V-token vocabulary:
// reads xr [v] (the logits of that window) into the acc-typed scratch `work` [v], then writes out [v]
// (which may be xr itself: every value is read before any is written). Posteriors of tokens outside the
// window are skipped. `stream`: store_scaled's.
template <typename scalar_t, typename acc_t>
void gradient_frame(const scalar_t* xr, scalar_t* out, int64_t v0, int64_t v, int64_t V, int64_t i,
                    const FrameGeometry& geo, bool observed, acc_t g, bool infeasible, bool zero_infinity,
                    acc_t lse, acc_t post_k, const acc_t* post, int64_t W, int64_t k, bool normalize, acc_t* work,
                    bool stream) {
  if (!geo.active(i) || observed) {
    std::fill(out, out + v, scalar_t(0));
    return;
  }
  if (infeasible) {  // PyTorch's convention
    std::fill(out, out + v, zero_infinity ? scalar_t(0) : scalar_t(std::numeric_limits<float>::quiet_NaN()));
    return;
  }
  // the frame's posterior row, a fresh page of the band table that the scatter below would wait for
  cpu::prefetch(post, geo.band_count(i, W));
  // a finite logsumexp comes from a frame with no NaN and no +inf logit: the vocabulary pass took it over
  // these logits (ops.cpp)
  if (normalize && lse > neg_inf<acc_t>() && lse < std::numeric_limits<acc_t>::infinity()) {
#pragma omp simd
    for (int64_t c = 0; c < v; ++c) work[c] = exp_below_finite(load_as<scalar_t, acc_t>(xr + c), lse);
  } else if (normalize && lse != neg_inf<acc_t>()) {
#pragma omp simd
    for (int64_t c = 0; c < v; ++c) work[c] = exp_below(load_as<scalar_t, acc_t>(xr + c), lse);
  } else {
    std::fill(work, work + v, acc_t(0));
  }
  if (k >= v0 && k < v0 + v) work[k - v0] -= post_k;
  const int64_t width = geo.band_count(i, W);
  const int64_t* y = geo.tokens_from(i);
  // in order: repeats of a token sum exactly (tokens are clamped to the vocabulary, so a whole-vocabulary
  // window needs no test: the scatter is most of this pass at bands as wide as the vocabulary)
  if (v0 == 0 && v == V) {
    for (int64_t j = 0; j < width; ++j) work[y[j]] -= post[j];
  } else {
    for (int64_t j = 0; j < width; ++j)
      if (y[j] >= v0 && y[j] < v0 + v) work[y[j] - v0] -= post[j];
  }
  store_scaled<scalar_t, acc_t>(out, work, g, v, stream);
}

// ---- the two-pass path: the gradient's softmax written in the vocabulary pass -----------------------

// The two-pass vocabulary pass of one frame i: emit_frame's values, and with w = scale the gradient's
// softmax part round(w * softmax_v) written into out [V] (which may be xr itself: every read of the frame
// comes first), 0 at frames past the input length and at observed frames; soft_row [W] and *soft_special
// get the unrounded softmax at the band's slots and at k. softmax_v = exp(x_v - max) / sum from the
// logsumexp's own exponentials (`work` [V]): one exp per logit for the whole frame.
template <typename scalar_t, typename acc_t>
void emit_grad_frame(const scalar_t* xr, scalar_t* out, int64_t V, int64_t i, const FrameGeometry& geo, int64_t o,
                     int64_t k, int64_t W, acc_t scale, acc_t* lse, acc_t* row, acc_t* special, acc_t* soft_row,
                     acc_t* soft_special, acc_t* work) {
  if (!geo.active(i) || o >= 0) {  // no gradient here
    emit_frame<scalar_t, acc_t>(xr, V, i, geo, o, k, W, true, lse, row, special);
    std::fill(out, out + V, scalar_t(0));
    std::fill(soft_row, soft_row + W, acc_t(0));
    *soft_special = 0;
    return;
  }
  acc_t sum;
  emit_frame<scalar_t, acc_t>(xr, V, i, geo, -1, k, W, true, lse, row, special, work, &sum);
  const acc_t l = *lse;
  const int64_t* y = geo.tokens_from(i);
  // softmax_v = work[v] * inv: from the kept exponentials, or (a degenerate frame, see row_logsumexp)
  // the three-pass formula with inv = 1
  acc_t inv = acc_t(1);
  if (sum > 0) {
    inv = acc_t(1) / sum;
  } else {
    for (int64_t v = 0; v < V; ++v)
      work[v] = l == neg_inf<acc_t>() ? acc_t(0) : exp_below(load_as<scalar_t, acc_t>(xr + v), l);
  }
  const int64_t width = geo.band_count(i, W);
  for (int64_t j = 0; j < width; ++j) soft_row[j] = work[y[j]] * inv;  // the values scaled below, unrounded
  std::fill(soft_row + width, soft_row + W, acc_t(0));
  *soft_special = work[k] * inv;
#pragma omp simd
  for (int64_t v = 0; v < V; ++v) out[v] = store_as<scalar_t, acc_t>(scale * (work[v] * inv));
}

// The exact gradient at the band's tokens and at k of one live frame: work[token] = softmax - posterior
// (the posteriors of a repeated token subtracted in band order, after k's, as gradient_frame does), for
// the W band slots y[0..width) and k; `work` [V] is touched only there.
template <typename acc_t>
void band_totals(const int64_t* y, int64_t width, int64_t k, acc_t soft_k, acc_t post_k, const acc_t* soft,
                 const acc_t* post, acc_t* work) {
  for (int64_t j = 0; j < width; ++j) work[y[j]] = soft[j];
  work[k] = soft_k;
  work[k] -= post_k;
  for (int64_t j = 0; j < width; ++j) work[y[j]] -= post[j];
}

// The two-pass backward of one frame i, in place on out [V] (round(w * softmax) from emit_grad_frame):
// with g the row's upstream gradient and gw = g * w, a row whose g is not exactly 1 is scaled, an
// infeasible row filled (0 / NaN), and the band's tokens and k get round(gw * (softmax - posterior)).
template <typename scalar_t, typename acc_t>
void finish_frame(scalar_t* out, int64_t V, int64_t i, const FrameGeometry& geo, bool observed, acc_t g, acc_t gw,
                  bool infeasible, bool zero_infinity, acc_t soft_k, acc_t post_k, const acc_t* soft,
                  const acc_t* post, int64_t W, int64_t k, acc_t* work) {
  if (!geo.active(i) || observed) return;  // the forward wrote 0
  if (infeasible) {  // PyTorch's convention
    std::fill(out, out + V, zero_infinity ? scalar_t(0) : scalar_t(std::numeric_limits<float>::quiet_NaN()));
    return;
  }
  if (!(g == acc_t(1))) {
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) out[v] = store_as<scalar_t, acc_t>(g * load_as<scalar_t, acc_t>(out + v));
  }
  const int64_t width = geo.band_count(i, W);
  const int64_t* y = geo.tokens_from(i);
  band_totals(y, width, k, soft_k, post_k, soft, post, work);
  for (int64_t j = 0; j < width; ++j) out[y[j]] = store_as<scalar_t, acc_t>(gw * work[y[j]]);
  out[k] = store_as<scalar_t, acc_t>(gw * work[k]);
}

void check_batch(const char* op, const at::Tensor& targets, const at::Tensor& input_lengths,
                 const at::Tensor& target_lengths, int64_t B) {
  TORCH_CHECK(targets.dim() == 2 && targets.size(0) == B, op, ": targets must be [B, U]");
  TORCH_CHECK(input_lengths.dim() == 1 && input_lengths.size(0) == B, op, ": input_lengths must be [B]");
  TORCH_CHECK(target_lengths.dim() == 1 && target_lengths.size(0) == B, op, ": target_lengths must be [B]");
  TORCH_CHECK(input_lengths.device().is_cpu() && target_lengths.device().is_cpu() && targets.device().is_cpu(),
              op, ": all tensors must be on the CPU");
}

// ---- stage 1: the vocabulary pass -----------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> emissions_cpu(
    const at::Tensor& logits, const at::Tensor& targets_in, const at::Tensor& input_lengths_in,
    const at::Tensor& target_lengths_in, const c10::optional<at::Tensor>& observed_in, int64_t special_id,
    int64_t max_shift, int64_t band_width, bool normalize) {
  TORCH_CHECK(logits.dim() == 3 && (logits.stride(2) == 1 || logits.size(2) == 1), "emissions: logits must be [B, T, V], V contiguous");
  TORCH_CHECK(logits.size(2) > 0, "emissions: empty vocabulary");
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2), U_max = targets_in.size(1);
  check_batch("emissions", targets_in, input_lengths_in, target_lengths_in, B);
  const at::Tensor input_lengths = as_long(input_lengths_in), target_lengths = as_long(target_lengths_in);
  const at::Tensor tokens = as_long(targets_in).clamp(0, V - 1).contiguous();
  c10::optional<at::Tensor> observed;
  if (observed_in.has_value()) {
    TORCH_CHECK(observed_in->dim() == 2 && observed_in->size(0) == B && observed_in->size(1) == T,
                "emissions: observed must be [B, T]");
    observed = as_long(*observed_in);
  }
  const int64_t* in_len = input_lengths.data_ptr<int64_t>();
  const int64_t* tg_len = target_lengths.data_ptr<int64_t>();
  int64_t needed = 1;
  for (int64_t b = 0; b < B; ++b)
    needed = std::max(needed, column_band_width(clamp_len(in_len[b], T), clamp_len(tg_len[b], U_max), max_shift));
  TORCH_CHECK(band_width >= needed, "emissions: band_width=", band_width, " is smaller than a row's band (", needed,
              ")");
  const auto opts = logits.options().dtype(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor lse = at::empty({B, T}, opts), table = OutputPool::get().empty({B, T, band_width}, opts),
             special = at::empty({B, T}, opts);
  if (B * T == 0) return {lse, table, special};
  const int64_t W = band_width, k = std::min<int64_t>(std::max<int64_t>(special_id, 0), V - 1);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "mdlm_ctc_emissions", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const int64_t sb = logits.stride(0), st = logits.stride(1);
    const FrameGeometry geo{in_len, tg_len, tokens.data_ptr<int64_t>(), T, U_max, max_shift};
    const int64_t* obs = observed.has_value() ? observed->data_ptr<int64_t>() : nullptr;
    acc_t* lse_p = lse.data_ptr<acc_t>();
    acc_t* table_p = table.data_ptr<acc_t>();
    acc_t* special_p = special.data_ptr<acc_t>();
    at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        emit_frame<scalar_t, acc_t>(x + (i / T) * sb + (i % T) * st, V, i, geo, obs ? obs[i] : -1, k, W, normalize,
                                    lse_p + i, table_p + i * W, special_p + i);
    });
  });
  return {lse, table, special};
}

// ---- stage 2: the lattice over the band table -----------------------------------------------

at::Tensor lattice_band_cpu(const at::Tensor& table, const at::Tensor& special, const at::Tensor& targets_in,
                            const at::Tensor& input_lengths_in, const at::Tensor& target_lengths_in, int64_t mode,
                            int64_t max_shift, bool need_grad) {
  TORCH_CHECK(mode == kPreserve || mode == kStandard, "lattice_band: mode must be 0 (preserve) or 1 (standard)");
  TORCH_CHECK(table.dim() == 3 && table.is_contiguous() && special.dim() == 2 && special.is_contiguous(),
              "lattice_band: table [B, T, W] and special [B, T] must be contiguous");
  TORCH_CHECK(table.scalar_type() == special.scalar_type() &&
                  (table.scalar_type() == at::kFloat || table.scalar_type() == at::kDouble),
              "lattice_band: table and special must both be float32 or float64");
  const int64_t B = table.size(0), T = table.size(1), W = table.size(2), U_max = targets_in.size(1);
  TORCH_CHECK(special.size(0) == B && special.size(1) == T, "lattice_band: special must be [B, T]");
  check_batch("lattice_band", targets_in, input_lengths_in, target_lengths_in, B);
  const at::Tensor targets = as_long(targets_in), input_lengths = as_long(input_lengths_in),
                   target_lengths = as_long(target_lengths_in);
  const int64_t shift = mode == kPreserve ? max_shift : -1;
  const int64_t* in_len = input_lengths.data_ptr<int64_t>();
  const int64_t* tg_len = target_lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(W >= column_band_width(clamp_len(in_len[b], T), clamp_len(tg_len[b], U_max), shift),
                "lattice_band: the table is narrower than row ", b, "'s band");
  at::Tensor nll = at::empty({B}, table.options());

  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "mdlm_ctc_lattice_band", [&] {
    using acc_t = scalar_t;
    acc_t* table_p = table.data_ptr<acc_t>();
    acc_t* special_p = special.data_ptr<acc_t>();
    const int64_t* tg = targets.data_ptr<int64_t>();
    acc_t* nll_p = nll.data_ptr<acc_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const Row<acc_t> row{table_p + b * T * W, special_p + b * T, tg + b * U_max, clamp_len(in_len[b], T),
                             clamp_len(tg_len[b], U_max), W, shift};
        if (std::any_of(row.special, row.special + row.T, [](acc_t v) { return v != v; })) {
          nll_p[b] = std::numeric_limits<acc_t>::quiet_NaN();  // NaN in, NaN out (loss and gradient)
          if (need_grad) {
            std::fill(row.table, row.table + T * W, std::numeric_limits<acc_t>::quiet_NaN());
            std::fill(row.special, row.special + T, std::numeric_limits<acc_t>::quiet_NaN());
          }
          continue;
        }
        nll_p[b] = mode == kPreserve ? preserve_row(row, need_grad) : standard_row(row, need_grad);
        if (need_grad) {  // frames past the input length have no posteriors
          std::fill(row.table + row.T * W, row.table + T * W, acc_t(0));
          std::fill(row.special + row.T, row.special + T, acc_t(0));
        }
        if (need_grad && !(nll_p[b] < std::numeric_limits<acc_t>::infinity())) {
          std::fill(row.table, row.table + T * W, acc_t(0));  // an infeasible row has no posteriors
          std::fill(row.special, row.special + T, acc_t(0));
        }
      }
    });
  });
  return nll;
}

// ---- stage 3: the gradient pass -------------------------------------------------------------

// Inputs of a gradient pass, converted once: acc-typed per-frame values, the geometry.
struct GradientInputs {
  at::Tensor g, lse, post_target, post_special, nll, input_lengths, target_lengths, tokens;
  c10::optional<at::Tensor> observed;
  GradientInputs(const at::Tensor& grad_nll, const at::Tensor& lse_in, const at::Tensor& targets,
                 const at::Tensor& input_lengths_in, const at::Tensor& target_lengths_in,
                 const c10::optional<at::Tensor>& observed_in, const at::Tensor& post_target_in,
                 const at::Tensor& post_special_in, const at::Tensor& nll_in, int64_t V, at::ScalarType acc)
      : g(grad_nll.to(acc).contiguous()), lse(lse_in.to(acc).contiguous()),
        post_target(post_target_in.to(acc).contiguous()), post_special(post_special_in.to(acc).contiguous()),
        nll(nll_in.to(acc).contiguous()), input_lengths(as_long(input_lengths_in)),
        target_lengths(as_long(target_lengths_in)), tokens(as_long(targets).clamp(0, V - 1).contiguous()) {
    if (observed_in.has_value()) observed = as_long(*observed_in);
  }
  FrameGeometry geometry(int64_t T, int64_t max_shift) const {
    return FrameGeometry{input_lengths.data_ptr<int64_t>(), target_lengths.data_ptr<int64_t>(),
                         tokens.data_ptr<int64_t>(), T, tokens.size(1), max_shift};
  }
};

// The gradient pass over frames first .. first + n - 1 (flat b*T + t) and the vocabulary window
// [v0, v0 + v) of a V-token vocabulary. x(r) / out(r) are the logits / gradient rows of window frame r;
// the per-frame inputs (lse, posteriors) are indexed by r, observed by the flat frame. `stream`: see
// store_scaled.
template <typename scalar_t, typename XRow, typename OutRow>
void gradient_frames(const GradientInputs& in, int64_t first, int64_t n, int64_t T, int64_t v0, int64_t v,
                     int64_t V, int64_t special_id, int64_t max_shift, bool zero_infinity, bool normalize,
                     bool stream, XRow x_row, OutRow out_row) {
  using acc_t = typename AccOf<scalar_t>::type;
  const FrameGeometry geo = in.geometry(T, max_shift);
  const int64_t W = in.post_target.size(-1), k = std::min<int64_t>(std::max<int64_t>(special_id, 0), V - 1);
  const acc_t* g = in.g.data_ptr<acc_t>();
  const acc_t* lse = in.lse.data_ptr<acc_t>();
  const acc_t* pt = in.post_target.data_ptr<acc_t>();
  const acc_t* ps = in.post_special.data_ptr<acc_t>();
  const acc_t* nll = in.nll.data_ptr<acc_t>();
  const int64_t* obs = in.observed.has_value() ? in.observed->data_ptr<int64_t>() : nullptr;
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> work(v);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = first + r, b = geo.row(i);
      gradient_frame<scalar_t, acc_t>(x_row(r), out_row(r), v0, v, V, i, geo, obs != nullptr && obs[i] >= 0, g[b],
                                      nll[b] == std::numeric_limits<acc_t>::infinity(), zero_infinity, lse[r], ps[r],
                                      pt + r * W, W, k, normalize, work.data(), stream);
    }
    if (stream) store_fence();
  });
}

at::Tensor gradient_cpu(const at::Tensor& grad_nll_in, const at::Tensor& logits, const at::Tensor& lse_in,
                        const at::Tensor& targets_in, const at::Tensor& input_lengths_in,
                        const at::Tensor& target_lengths_in, const c10::optional<at::Tensor>& observed_in,
                        const at::Tensor& post_target_in, const at::Tensor& post_special_in, const at::Tensor& nll_in,
                        int64_t special_id, int64_t max_shift, bool zero_infinity, bool normalize) {
  TORCH_CHECK(logits.dim() == 3 && (logits.stride(2) == 1 || logits.size(2) == 1), "gradient: logits must be [B, T, V], V contiguous");
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  check_batch("gradient", targets_in, input_lengths_in, target_lengths_in, B);
  TORCH_CHECK(post_target_in.dim() == 3 && post_target_in.size(0) == B && post_target_in.size(1) == T &&
                  post_special_in.dim() == 2 && post_special_in.size(1) == T,
              "gradient: the posteriors were not computed (the forward ran without need_grad)");
  at::Tensor grad = OutputPool::get().empty({B, T, V}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (grad.numel() == 0) return grad;
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const GradientInputs in(grad_nll_in, lse_in, targets_in, input_lengths_in, target_lengths_in, observed_in,
                          post_target_in, post_special_in, nll_in, V, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "mdlm_ctc_gradient", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const int64_t sb = logits.stride(0), st = logits.stride(1);
    scalar_t* out = grad.data_ptr<scalar_t>();
    gradient_frames<scalar_t>(
        in, 0, B * T, T, 0, V, V, special_id, max_shift, zero_infinity, normalize, /*stream=*/true,
        [&](int64_t i) { return x + (i / T) * sb + (i % T) * st; }, [&](int64_t i) { return out + i * V; });
  });
  return grad;
}

// A work buffer from the output pool: the fused LM head's chunk of logits (mdlm_ctc/linear.py), which
// would otherwise be a fresh mmap, page-faulted and zeroed by the kernel, on every call.
at::Tensor pooled_empty_cpu(const at::Tensor& like, at::IntArrayRef size) {
  for (const int64_t s : size) TORCH_CHECK(s >= 0, "pooled_empty: negative size ", size);
  return OutputPool::get().empty(size, like.options().memory_format(at::MemoryFormat::Contiguous));
}

// ---- the windowed stages: a window of flat frames (and for the gradient, of the vocabulary) --------

void check_window(const char* op, const at::Tensor& logits, int64_t frame_offset, int64_t T,
                  const at::Tensor& input_lengths) {
  TORCH_CHECK(logits.dim() == 2 && (logits.stride(1) == 1 || logits.size(1) == 1),
              op, ": logits must be [frames, vocabulary window], the vocabulary contiguous");
  TORCH_CHECK(T >= 1 && frame_offset >= 0 && frame_offset + logits.size(0) <= input_lengths.size(0) * T, op,
              ": the window of frames [", frame_offset, ", ", frame_offset + logits.size(0),
              ") is outside the B*T = ", input_lengths.size(0) * T, " frames");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emissions_window_cpu(
    const at::Tensor& logits, int64_t frame_offset, int64_t T, const at::Tensor& targets_in,
    const at::Tensor& input_lengths_in, const at::Tensor& target_lengths_in,
    const c10::optional<at::Tensor>& observed_in, int64_t special_id, int64_t max_shift, int64_t band_width,
    bool normalize) {
  check_window("emissions_window", logits, frame_offset, T, input_lengths_in);
  TORCH_CHECK(logits.size(1) > 0, "emissions_window: empty vocabulary");
  TORCH_CHECK(band_width >= 1, "emissions_window: band_width must be >= 1");
  const int64_t n = logits.size(0), V = logits.size(1), B = input_lengths_in.size(0), U_max = targets_in.size(1);
  check_batch("emissions_window", targets_in, input_lengths_in, target_lengths_in, B);
  const at::Tensor input_lengths = as_long(input_lengths_in), target_lengths = as_long(target_lengths_in);
  const at::Tensor tokens = as_long(targets_in).clamp(0, V - 1).contiguous();
  c10::optional<at::Tensor> observed;
  if (observed_in.has_value()) observed = as_long(*observed_in).reshape({-1});
  const int64_t* in_len = input_lengths.data_ptr<int64_t>();
  const int64_t* tg_len = target_lengths.data_ptr<int64_t>();
  const int64_t first_row = frame_offset / T, last_row = n > 0 ? (frame_offset + n - 1) / T : first_row - 1;
  for (int64_t b = first_row; b <= last_row; ++b)
    TORCH_CHECK(band_width >= column_band_width(clamp_len(in_len[b], T), clamp_len(tg_len[b], U_max), max_shift),
                "emissions_window: band_width=", band_width, " is smaller than row ", b, "'s band");
  const auto opts = logits.options().dtype(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor lse = at::empty({n}, opts), table = at::empty({n, band_width}, opts), special = at::empty({n}, opts);
  if (n == 0) return {lse, table, special};
  const int64_t W = band_width, k = std::min<int64_t>(std::max<int64_t>(special_id, 0), V - 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "mdlm_ctc_emissions_window", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const int64_t sr = logits.stride(0);
    const FrameGeometry geo{in_len, tg_len, tokens.data_ptr<int64_t>(), T, U_max, max_shift};
    const int64_t* obs = observed.has_value() ? observed->data_ptr<int64_t>() : nullptr;
    acc_t* lse_p = lse.data_ptr<acc_t>();
    acc_t* table_p = table.data_ptr<acc_t>();
    acc_t* special_p = special.data_ptr<acc_t>();
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t i = frame_offset + r;
        emit_frame<scalar_t, acc_t>(x + r * sr, V, i, geo, obs ? obs[i] : -1, k, W, normalize, lse_p + r,
                                    table_p + r * W, special_p + r);
      }
    });
  });
  return {lse, table, special};
}

void gradient_window_cpu(const at::Tensor& grad_nll, const at::Tensor& logits, int64_t frame_offset, int64_t T,
                         int64_t vocab_offset, int64_t vocab_size, const at::Tensor& lse, const at::Tensor& targets,
                         const at::Tensor& input_lengths, const at::Tensor& target_lengths,
                         const c10::optional<at::Tensor>& observed, const at::Tensor& post_target,
                         const at::Tensor& post_special, const at::Tensor& nll, int64_t special_id, int64_t max_shift,
                         bool zero_infinity, bool normalize, const at::Tensor& out) {
  check_window("gradient_window", logits, frame_offset, T, input_lengths);
  const int64_t n = logits.size(0), v = logits.size(1), B = input_lengths.size(0);
  check_batch("gradient_window", targets, input_lengths, target_lengths, B);
  TORCH_CHECK(vocab_offset >= 0 && vocab_size >= 1 && vocab_offset + v <= vocab_size,
              "gradient_window: the vocabulary window [", vocab_offset, ", ", vocab_offset + v,
              ") is outside the vocabulary of ", vocab_size);
  TORCH_CHECK(post_target.dim() == 2 && post_target.size(0) == n && post_special.numel() == n && lse.numel() == n,
              "gradient_window: lse [n], post_target [n, W] and post_special [n] must cover the window's frames");
  TORCH_CHECK(out.sizes() == logits.sizes() && out.scalar_type() == logits.scalar_type() &&
                  (out.stride(1) == 1 || v == 1),
              "gradient_window: out must be like logits, the vocabulary contiguous");
  TORCH_CHECK(nll.numel() == B && grad_nll.numel() == B, "gradient_window: nll and grad_nll must be [B]");
  if (n == 0 || v == 0) return;
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  c10::optional<at::Tensor> flat_observed;
  if (observed.has_value()) flat_observed = observed->reshape({-1});
  const GradientInputs in(grad_nll, lse, targets, input_lengths, target_lengths, flat_observed, post_target,
                          post_special, nll, vocab_size, acc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "mdlm_ctc_gradient_window", [&] {
    const scalar_t* x = logits.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t sx = logits.stride(0), so = out.stride(0);
    gradient_frames<scalar_t>(
        in, frame_offset, n, T, vocab_offset, v, vocab_size, special_id, max_shift, zero_infinity, normalize,
        /*stream=*/false, [&](int64_t r) { return x + r * sx; }, [&](int64_t r) { return o + r * so; });
  });
}

// ---- the two-pass stages: the gradient's softmax written in the vocabulary pass (ops.cpp) --------
// The whole-tensor stages run the per-frame code over all B*T frames, the windowed ones over a window.

// Where frame r of a stage's frames lies in a logits (or gradient) tensor: [B, T, V] at any strides on B
// and T, or a window [n, V] whose rows are `stride_t` apart (then stride_b is unused and first = 0 here).
struct RowAddress {
  bool window;
  int64_t first, T, stride_b, stride_t;
  int64_t operator()(int64_t r) const {
    if (window) return r * stride_t;
    const int64_t i = first + r;
    return (i / T) * stride_b + (i % T) * stride_t;
  }
  static RowAddress of(const at::Tensor& x, bool window, int64_t T) {
    return window ? RowAddress{true, 0, T, 0, x.stride(0)} : RowAddress{false, 0, T, x.stride(0), x.stride(1)};
  }
};

// Per-row inputs of a two-pass stage, converted once: lengths, clamped target ids, observed as [B*T],
// the row weights / upstream gradients in acc.
struct TwoPassInputs {
  at::Tensor input_lengths, target_lengths, tokens;
  c10::optional<at::Tensor> observed;
  TwoPassInputs(const at::Tensor& targets, const at::Tensor& input_lengths_in, const at::Tensor& target_lengths_in,
                const c10::optional<at::Tensor>& observed_in, int64_t V)
      : input_lengths(as_long(input_lengths_in)), target_lengths(as_long(target_lengths_in)),
        tokens(as_long(targets).clamp(0, V - 1).contiguous()) {
    if (observed_in.has_value()) observed = as_long(*observed_in).reshape({-1});
  }
  FrameGeometry geometry(int64_t T, int64_t max_shift) const {
    return FrameGeometry{input_lengths.data_ptr<int64_t>(), target_lengths.data_ptr<int64_t>(),
                         tokens.data_ptr<int64_t>(), T, tokens.size(1), max_shift};
  }
  const int64_t* observed_ptr() const { return observed.has_value() ? observed->data_ptr<int64_t>() : nullptr; }
};

at::Tensor per_row(const at::Tensor& x, int64_t B, at::ScalarType acc, const char* op, const char* name) {
  TORCH_CHECK(x.numel() == B, op, ": ", name, " must hold one value per batch row (", B, "); got ", x.numel());
  return x.reshape({B}).to(acc).contiguous();
}

// emissions_grad (whole tensor, window = false) and emissions_grad_window: emissions' outputs for the n
// frames first .. first + n - 1, and the scaled softmax into grad (which may be the logits).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> emissions_grad_frames(
    const char* op, const at::Tensor& logits, const at::Tensor& grad, bool window, int64_t first, int64_t T,
    const at::Tensor& targets, const at::Tensor& input_lengths, const at::Tensor& target_lengths,
    const c10::optional<at::Tensor>& observed, int64_t special_id, int64_t max_shift, int64_t band_width,
    const at::Tensor& row_scale) {
  const int64_t V = logits.size(-1), B = input_lengths.size(0), U_max = targets.size(1);
  const int64_t n = window ? logits.size(0) : logits.size(0) * logits.size(1);
  TORCH_CHECK(V > 0, op, ": empty vocabulary");
  TORCH_CHECK(band_width >= 1, op, ": band_width must be >= 1");
  check_batch(op, targets, input_lengths, target_lengths, B);
  TORCH_CHECK(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type() &&
                  (grad.stride(-1) == 1 || V == 1),
              op, ": grad must be like logits, the vocabulary contiguous");
  if (observed.has_value())
    TORCH_CHECK(observed->dim() == 2 && observed->size(0) == B && observed->size(1) == T, op,
                ": observed must be [B, T]");
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const TwoPassInputs in(targets, input_lengths, target_lengths, observed, V);
  const at::Tensor scale = per_row(row_scale, B, acc, op, "row_scale");
  const int64_t* in_len = in.input_lengths.data_ptr<int64_t>();
  const int64_t* tg_len = in.target_lengths.data_ptr<int64_t>();
  for (int64_t b = n > 0 ? first / T : 0; n > 0 && b <= (first + n - 1) / T; ++b)  // T >= 1 when n > 0
    TORCH_CHECK(band_width >= column_band_width(clamp_len(in_len[b], T), clamp_len(tg_len[b], U_max), max_shift),
                op, ": band_width=", band_width, " is smaller than row ", b, "'s band");
  const auto opts = logits.options().dtype(acc);
  const int64_t W = band_width, k = std::min<int64_t>(std::max<int64_t>(special_id, 0), V - 1);
  at::Tensor lse = at::empty({n}, opts), table = OutputPool::get().empty({n, W}, opts), special = at::empty({n}, opts);
  at::Tensor soft_target = OutputPool::get().empty({n, W}, opts), soft_special = at::empty({n}, opts);
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "mdlm_ctc_emissions_grad", [&] {
      using acc_t = typename AccOf<scalar_t>::type;
      const scalar_t* x = logits.data_ptr<scalar_t>();
      scalar_t* out = grad.data_ptr<scalar_t>();
      RowAddress x_at = RowAddress::of(logits, window, T), out_at = RowAddress::of(grad, window, T);
      x_at.first = out_at.first = window ? 0 : first;
      const FrameGeometry geo = in.geometry(T, max_shift);
      const int64_t* obs = in.observed_ptr();
      const acc_t* w = scale.data_ptr<acc_t>();
      acc_t *lse_p = lse.data_ptr<acc_t>(), *table_p = table.data_ptr<acc_t>(), *special_p = special.data_ptr<acc_t>();
      acc_t *soft_p = soft_target.data_ptr<acc_t>(), *soft_k_p = soft_special.data_ptr<acc_t>();
      at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> work(V);
        for (int64_t r = begin; r < end; ++r) {
          const int64_t i = first + r;
          emit_grad_frame<scalar_t, acc_t>(x + x_at(r), out + out_at(r), V, i, geo, obs ? obs[i] : -1, k, W,
                                           w[geo.row(i)], lse_p + r, table_p + r * W, special_p + r, soft_p + r * W,
                                           soft_k_p + r, work.data());
        }
      });
    });
  }
  if (!window) {
    const int64_t Bx = logits.size(0), Tx = logits.size(1);
    return {lse.view({Bx, Tx}), table.view({Bx, Tx, W}), special.view({Bx, Tx}), soft_target.view({Bx, Tx, W}),
            soft_special.view({Bx, Tx})};
  }
  return {lse, table, special, soft_target, soft_special};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> emissions_grad_cpu(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& input_lengths,
    const at::Tensor& target_lengths, const c10::optional<at::Tensor>& observed, int64_t special_id,
    int64_t max_shift, int64_t band_width, const at::Tensor& row_scale, const at::Tensor& grad) {
  TORCH_CHECK(logits.dim() == 3 && (logits.stride(2) == 1 || logits.size(2) == 1),
              "emissions_grad: logits must be [B, T, V], V contiguous");
  return emissions_grad_frames("emissions_grad", logits, grad, false, 0, logits.size(1), targets, input_lengths,
                               target_lengths, observed, special_id, max_shift, band_width, row_scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> emissions_grad_window_cpu(
    const at::Tensor& logits, int64_t frame_offset, int64_t T, const at::Tensor& targets,
    const at::Tensor& input_lengths, const at::Tensor& target_lengths, const c10::optional<at::Tensor>& observed,
    int64_t special_id, int64_t max_shift, int64_t band_width, const at::Tensor& row_scale, const at::Tensor& grad) {
  check_window("emissions_grad_window", logits, frame_offset, T, input_lengths);
  return emissions_grad_frames("emissions_grad_window", logits, grad, true, frame_offset, T, targets, input_lengths,
                               target_lengths, observed, special_id, max_shift, band_width, row_scale);
}

// The per-frame inputs of the two-pass backward (band softmax, posteriors) over n frames, in acc.
struct BandInputs {
  at::Tensor soft_target, soft_special, post_target, post_special, g, w, nll;
  BandInputs(const char* op, int64_t n, int64_t B, at::ScalarType acc, const at::Tensor& soft_target_in,
             const at::Tensor& soft_special_in, const at::Tensor& post_target_in, const at::Tensor& post_special_in,
             const at::Tensor& grad_rows, const at::Tensor& row_scale, const at::Tensor& nll_in)
      : soft_target(soft_target_in.reshape({n, -1}).to(acc).contiguous()),
        soft_special(soft_special_in.reshape({n}).to(acc).contiguous()),
        post_target(post_target_in.reshape({n, -1}).to(acc).contiguous()),
        post_special(post_special_in.reshape({n}).to(acc).contiguous()), g(per_row(grad_rows, B, acc, op, "grad_rows")),
        w(per_row(row_scale, B, acc, op, "row_scale")), nll(per_row(nll_in, B, acc, op, "nll")) {
    TORCH_CHECK(soft_target.size(1) == post_target.size(1), op,
                ": soft_target and post_target must have the same band width");
  }
};

void gradient_finish_cpu(const at::Tensor& grad_rows, const at::Tensor& row_scale, const at::Tensor& nll_in,
                         const at::Tensor& targets, const at::Tensor& input_lengths, const at::Tensor& target_lengths,
                         const c10::optional<at::Tensor>& observed, const at::Tensor& soft_target,
                         const at::Tensor& soft_special, const at::Tensor& post_target, const at::Tensor& post_special,
                         int64_t special_id, int64_t max_shift, bool zero_infinity, const at::Tensor& grad) {
  TORCH_CHECK(grad.dim() == 3 && (grad.stride(2) == 1 || grad.size(2) == 1),
              "gradient_finish: grad must be [B, T, V], V contiguous");
  const int64_t B = grad.size(0), T = grad.size(1), V = grad.size(2), n = B * T;
  check_batch("gradient_finish", targets, input_lengths, target_lengths, B);
  TORCH_CHECK(soft_target.numel() == post_target.numel() && post_target.numel() % std::max<int64_t>(n, 1) == 0 &&
                  soft_special.numel() == n && post_special.numel() == n,
              "gradient_finish: the band tables must be [B, T, W] and [B, T] (the forward ran the two-pass path)");
  if (n == 0 || V == 0) return;
  const auto acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const TwoPassInputs in(targets, input_lengths, target_lengths, observed, V);
  const BandInputs band("gradient_finish", n, B, acc, soft_target, soft_special, post_target, post_special, grad_rows,
                        row_scale, nll_in);
  const int64_t W = band.post_target.size(1), k = std::min<int64_t>(std::max<int64_t>(special_id, 0), V - 1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad.scalar_type(), "mdlm_ctc_gradient_finish", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    scalar_t* out = grad.data_ptr<scalar_t>();
    const RowAddress out_at = RowAddress::of(grad, false, T);
    const FrameGeometry geo = in.geometry(T, max_shift);
    const int64_t* obs = in.observed_ptr();
    const acc_t *g = band.g.data_ptr<acc_t>(), *w = band.w.data_ptr<acc_t>(), *nll = band.nll.data_ptr<acc_t>();
    const acc_t *st = band.soft_target.data_ptr<acc_t>(), *sk = band.soft_special.data_ptr<acc_t>();
    const acc_t *pt = band.post_target.data_ptr<acc_t>(), *pk = band.post_special.data_ptr<acc_t>();
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> work(V);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = geo.row(i);
        finish_frame<scalar_t, acc_t>(out + out_at(i), V, i, geo, obs != nullptr && obs[i] >= 0, g[b], g[b] * w[b],
                                      nll[b] == std::numeric_limits<acc_t>::infinity(), zero_infinity, sk[i], pk[i],
                                      st + i * W, pt + i * W, W, k, work.data());
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> band_values_window_cpu(
    const at::Tensor& grad_rows, const at::Tensor& row_scale, const at::Tensor& nll_in, int64_t frame_offset,
    int64_t T, int64_t vocab_size, const at::Tensor& targets, const at::Tensor& input_lengths,
    const at::Tensor& target_lengths, const c10::optional<at::Tensor>& observed, const at::Tensor& soft_target,
    const at::Tensor& soft_special, const at::Tensor& post_target, const at::Tensor& post_special, int64_t special_id,
    int64_t max_shift) {
  const int64_t B = input_lengths.size(0), n = soft_special.numel();
  check_batch("band_values_window", targets, input_lengths, target_lengths, B);
  TORCH_CHECK(vocab_size >= 1, "band_values_window: vocab_size must be >= 1");
  TORCH_CHECK(T >= 1 && frame_offset >= 0 && frame_offset + n <= B * T, "band_values_window: the window of frames [",
              frame_offset, ", ", frame_offset + n, ") is outside the B*T = ", B * T, " frames");
  TORCH_CHECK(soft_target.dim() == 2 && soft_target.size(0) == n && post_target.sizes() == soft_target.sizes() &&
                  post_special.numel() == n,
              "band_values_window: soft_target, post_target [n, W] and soft_special, post_special [n] must match");
  const auto acc = soft_target.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const TwoPassInputs in(targets, input_lengths, target_lengths, observed, vocab_size);
  const BandInputs band("band_values_window", n, B, acc, soft_target, soft_special, post_target, post_special,
                        grad_rows, row_scale, nll_in);
  const int64_t W = soft_target.size(1), k = std::min<int64_t>(std::max<int64_t>(special_id, 0), vocab_size - 1);
  at::Tensor values = at::zeros({n, W}, soft_target.options().dtype(acc));
  at::Tensor special = at::zeros({n}, soft_target.options().dtype(acc));
  if (n == 0) return {values, special};
  AT_DISPATCH_FLOATING_TYPES(acc, "mdlm_ctc_band_values_window", [&] {
    using acc_t = scalar_t;
    const FrameGeometry geo = in.geometry(T, max_shift);
    const int64_t* obs = in.observed_ptr();
    const acc_t *g = band.g.data_ptr<acc_t>(), *w = band.w.data_ptr<acc_t>(), *nll = band.nll.data_ptr<acc_t>();
    const acc_t *st = band.soft_target.data_ptr<acc_t>(), *sk = band.soft_special.data_ptr<acc_t>();
    const acc_t *pt = band.post_target.data_ptr<acc_t>(), *pk = band.post_special.data_ptr<acc_t>();
    acc_t *values_p = values.data_ptr<acc_t>(), *special_p = special.data_ptr<acc_t>();
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> work(vocab_size);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t i = frame_offset + r, b = geo.row(i);
        if (!geo.active(i) || (obs != nullptr && obs[i] >= 0) || nll[b] == std::numeric_limits<acc_t>::infinity())
          continue;  // not a live frame: its values are unspecified (left 0)
        const int64_t width = geo.band_count(i, W);
        const int64_t* y = geo.tokens_from(i);
        band_totals(y, width, k, sk[r], pk[r], st + r * W, pt + r * W, work.data());
        const acc_t gw = g[b] * w[b];
        for (int64_t j = 0; j < width; ++j) values_p[r * W + j] = gw * work[y[j]];
        special_p[r] = gw * work[k];
      }
    });
  });
  return {values, special};
}

}  // namespace

TORCH_LIBRARY_IMPL(mdlm_ctc_C, CPU, m) {
  m.impl("emissions", &emissions_cpu);
  m.impl("lattice_band", &lattice_band_cpu);
  m.impl("gradient", &gradient_cpu);
  m.impl("emissions_window", &emissions_window_cpu);
  m.impl("gradient_window", &gradient_window_cpu);
  m.impl("pooled_empty", &pooled_empty_cpu);
  m.impl("emissions_grad", &emissions_grad_cpu);
  m.impl("emissions_grad_window", &emissions_grad_window_cpu);
  m.impl("gradient_finish", &gradient_finish_cpu);
  m.impl("band_values_window", &band_values_window_cpu);
}

}  // namespace mdlm_ctc
