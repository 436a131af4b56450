// CUDA kernels of backend "cuda": the lattice stage `mdlm_ctc_C::lattice_band` (csrc/ops.cpp), between the
// Triton vocabulary pass and the Triton gradient pass (mdlm_ctc/backends.py). It computes exactly what
// lattice_band_cpu computes: nll [B] (+inf infeasible, NaN for NaN rows) and, with need_grad, the
// posteriors written in place over `table` and `special` (0 on infeasible rows and past the input
// length, NaN on NaN rows). The kernel bodies live in lattice_cuda.cuh (recurrences, shared with the
// CPU through lattice.h, and a host emulator for tests); this file holds the device execution model,
// the kernels and the launcher.
//
// Recurrences (lattice.h): preserve alpha_t(u) = logaddexp(alpha_{t-1}(u) + e_t(k), alpha_{t-1}(u-1) + e_t(y_u)),
// standard CTC split into blank / label arrays; beta mirrors them; posteriors = exp(alpha + e + beta - loglik).
//
// Layouts: table [B, T, W] and special [B, T] float32 (float64 for float64 logits), contiguous; targets
// [B, U] and lengths [B] any integer dtype (converted to int64 on the device, never read on the host).
// Scratch: the band rows of alpha and beta, [2, arrays, B, T + 1, W + 1] in the table's dtype (only
// with need_grad), a status word per row, and for standard CTC the skip mask [B, U + 2] (float).
//
// Launch plan (per call, decided on the host from shapes only: no host sync, no .item()):
//   S = W + 1 bounds every valid row's band in slots (W = the table width = the widest column band).
//   (1) one CTA per (row, direction), grid (1, B, 2): the band in registers, VT slots per thread,
//       VT = 1 / 2 / 4 / 8 for S <= 256 / 512 / 2048 / 8192 and threads = ceil(S / VT) rounded to a
//       warp; warp shuffles for the u +- 1 neighbours, shared-memory edge cells between warps, one named
//       barrier per step counting only the warps the row's own band needs; cp.async ring of R stages
//       (2 <= R <= 8, as many as shared memory allows) prefetching the emissions R - 1 frames ahead.
//   (2) Hopper thread-block clusters (sm_90+, only when the device supports cluster launch and the
//       cluster fits, cudaOccupancyMaxActiveClusters > 0): one row's band split over C CTAs of a cluster,
//       grid (C, B, 2), cluster (C, 1, 1), neighbours across CTAs read from the other CTA's shared
//       memory (DSMEM) after the per-step cluster barrier. Used when S > 2048, with C = the next power
//       of two of S / 1024 (at most 8) halved until B * directions * C CTAs fit on the SMs at once, and
//       always when S > 8192 (one CTA holds at most 8192 slots). The runtime falls back to (1) when a
//       cluster cannot be scheduled; a band of more than 8 * 8192 slots is an error (use backend="cpu"
//       or "triton").
//   (3) posterior pass: one warp per frame, 8 warps per CTA, fully parallel over B * T.
//   MDLM_CTC_CUDA_CLUSTER=auto|0|N overrides the cluster choice (0: never; N: C = N when S > 256).
// These thresholds are a plan, not a measurement: no GPU was available when this file was written, so
// the GPU check script's benchmark (rows G2/G3 of SPEC §6) has to confirm or move them.
//
// Numerics: fp32 accumulation for float32 tables, fp64 for float64 (expf/logf resp. exp/log via
// logspace.h). No atomics; every reduction has a fixed order: results are bitwise reproducible.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <cuda_pipeline_primitives.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "lattice_cuda.cuh"

namespace mdlm_ctc {
namespace cuda_lattice {
namespace {

// ---- the device execution model the passes are written against (lattice_cuda.cuh) -------------

template <bool CLUSTER>
struct CudaDev {
  __device__ int thread_rank() const { return int(threadIdx.x); }
  __device__ int block_size() const { return int(blockDim.x); }
  __device__ int cluster_rank() const { return CLUSTER ? int(blockIdx.x) : 0; }  // cluster dims (gridDim.x, 1, 1)
  __device__ int cluster_size() const { return CLUSTER ? int(gridDim.x) : 1; }
  __device__ int64_t row() const { return int64_t(blockIdx.y); }
  __device__ int direction() const { return int(blockIdx.z); }
  __device__ bool block_any(bool pred) const { return __syncthreads_or(pred) != 0; }
  __device__ void retire() const {}  // the named barrier of `sync` counts the remaining threads
  __device__ void sync(int active_threads) const {
    if (CLUSTER) {
      cluster_sync();
    } else {
      asm volatile("bar.sync 1, %0;" ::"r"(active_threads) : "memory");
    }
  }
  __device__ void cluster_sync() const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    cooperative_groups::this_cluster().sync();
#else
    __trap();
#endif
  }
  template <typename T>
  __device__ T* remote(T* local, int rank) const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    return cooperative_groups::this_cluster().map_shared_rank(local, rank);
#else
    __trap();
    return local;
#endif
  }
  template <typename T>
  __device__ T shfl_up(T v) const {
    return __shfl_up_sync(0xffffffffu, v, 1);
  }
  template <typename T>
  __device__ T shfl_down(T v) const {
    return __shfl_down_sync(0xffffffffu, v, 1);
  }
  template <typename T>
  __device__ T shfl_xor(T v, int mask) const {
    return __shfl_xor_sync(0xffffffffu, v, mask);
  }
  __device__ void warp_sync() const { __syncwarp(); }
  template <typename T>
  __device__ void copy_async(T* shared_dst, const T* global_src) const {
    __pipeline_memcpy_async(shared_dst, global_src, sizeof(T));
  }
  __device__ void commit() const { __pipeline_commit(); }
  __device__ void wait_prior(int groups) const { __pipeline_wait_prior(groups); }
  __device__ void wait_all() const { __pipeline_wait_prior(0); }
};

// ---- kernels ---------------------------------------------------------------------------------

template <typename acc_t, int MODE, int VT, bool CLUSTER>
__global__ void __launch_bounds__(kMaxThreads) recurrence_kernel(const RecurrenceParams<acc_t> p) {
  extern __shared__ __align__(16) unsigned char smem[];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  if (CLUSTER) {  // never launched there (the launcher checks the device); keeps pre-Hopper builds valid
    __trap();
    return;
  }
#endif
  CudaDev<CLUSTER> dev;
  recurrence_pass<acc_t, MODE, VT, CLUSTER>(p, smem, dev);
}

constexpr int kPosteriorWarps = 8;

template <typename acc_t, int MODE>
__global__ void __launch_bounds__(kPosteriorWarps* kWarpSize) posterior_kernel(const PosteriorParams<acc_t> p) {
  const int64_t frame = int64_t(blockIdx.x) * kPosteriorWarps + threadIdx.x / kWarpSize;
  if (frame >= p.B * p.T) return;  // whole warps leave
  CudaDev<false> dev;
  posterior_row<acc_t, MODE>(p, frame / p.T, frame % p.T, int(threadIdx.x % kWarpSize), dev);
}

__global__ void skip_kernel(float* out, const int64_t* targets, const int64_t* target_lengths, int64_t B,
                            int64_t U_max) {
  const int64_t n = B * (U_max + 2);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = skip_value(targets, target_lengths, U_max, i / (U_max + 2), i % (U_max + 2));
}

// ---- launch planning -------------------------------------------------------------------------

constexpr int64_t kMaxSlotsPerCta = int64_t(kMaxThreads) * kMaxVT;  // 8192
constexpr int64_t kClusterMinSlots = 2048;                          // provisional (see the header)
constexpr int64_t kClusterSlotsPerCta = 1024;

struct DeviceInfo {
  int major = 0, sms = 0;
  int64_t max_smem = 48 * 1024;
  bool cluster_launch = false;
};

const DeviceInfo& device_info(int device) {
  static std::mutex mutex;
  static std::array<DeviceInfo, 64> cache;
  static std::array<bool, 64> known{};
  TORCH_CHECK(device >= 0 && device < 64, "lattice_band: CUDA device index ", device, " out of range");
  std::lock_guard<std::mutex> lock(mutex);
  if (!known[device]) {
    DeviceInfo info;
    int value = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    info.max_smem = value;
    value = 0;
    if (cudaDeviceGetAttribute(&value, cudaDevAttrClusterLaunch, device) != cudaSuccess) {
      (void)cudaGetLastError();  // an old driver without the attribute: no clusters
      value = 0;
    }
    info.cluster_launch = value != 0 && info.major >= 9;
    cache[device] = info;
    known[device] = true;
  }
  return cache[device];
}

struct Plan {
  int cluster = 1, threads = 32, vt = 1, stages = 2;
  int64_t smem = 0;
};

// -1: automatic; 0: never; N > 0: force cluster size N
int cluster_override() {
  const char* env = std::getenv("MDLM_CTC_CUDA_CLUSTER");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return -1;
  if (std::strcmp(env, "off") == 0) return 0;
  const int n = std::atoi(env);
  TORCH_CHECK(n >= 0 && n <= kMaxCluster, "MDLM_CTC_CUDA_CLUSTER must be auto, off, or 0..", kMaxCluster, "; got ",
              env);
  return n;
}

int64_t next_pow2(int64_t x) {
  int64_t p = 1;
  while (p < x) p *= 2;
  return p;
}

// Threads, slots per thread and stages for `slots` slots on one CTA; false if shared memory is too small.
bool plan_cta(int64_t slots, int mode, int64_t acc_bytes, const DeviceInfo& info, Plan& plan) {
  if (slots > kMaxSlotsPerCta) return false;
  plan.vt = slots <= 256 ? 1 : slots <= 512 ? 2 : slots <= 2048 ? 4 : 8;
  plan.threads = int(round_up((slots + plan.vt - 1) / plan.vt, kWarpSize));
  const SmemLayout layout = smem_layout(mode, acc_bytes, plan.threads, plan.vt);
  const int64_t stages = (info.max_smem - layout.edges_bytes) / layout.stage_bytes;
  if (stages < 2) return false;
  plan.stages = int(imin<int64_t>(stages, kMaxStages));
  plan.smem = layout.total(plan.stages);
  return true;
}

Plan make_plan(int64_t W, int mode, int64_t acc_bytes, const DeviceInfo& info, int64_t B, int dirs) {
  const int64_t S = W + 1;
  const int forced = cluster_override();
  int64_t cluster = 1;
  if (info.cluster_launch && forced != 0) {
    if (forced > 0) {
      if (S > 256) cluster = forced;
    } else if (S > kMaxSlotsPerCta) {  // one CTA cannot hold the band: the smallest cluster that can
      cluster = imin<int64_t>(kMaxCluster, next_pow2((S + kMaxSlotsPerCta - 1) / kMaxSlotsPerCta));
    } else if (S > kClusterMinSlots) {
      // ~1024 slots per CTA, but only while every row's cluster still fits in one wave of SMs:
      // a second wave would double the sequential time that the cluster is meant to cut
      cluster = imin<int64_t>(kMaxCluster, next_pow2((S + kClusterSlotsPerCta - 1) / kClusterSlotsPerCta));
      while (cluster > 1 && B * dirs * cluster > info.sms) cluster /= 2;
    }
  }
  Plan plan;
  plan.cluster = int(cluster);
  const bool ok = plan_cta((S + cluster - 1) / cluster, mode, acc_bytes, info, plan);
  TORCH_CHECK(ok, "lattice_band (CUDA): a band of ", S, " states (table width ", W,
              ") is wider than this GPU's lattice kernel supports (",
              info.cluster_launch ? kMaxCluster * kMaxSlotsPerCta : kMaxSlotsPerCta,
              " with the shared memory available); use backend=\"cpu\" or \"triton\"");
  return plan;
}

template <typename Kernel>
void set_smem(Kernel kernel, int64_t smem) {
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
}

template <typename acc_t, int MODE, int VT>
bool launch_cluster(const Plan& plan, const RecurrenceParams<acc_t>& params, int64_t B, int dirs,
                    cudaStream_t stream) {
  auto kernel = recurrence_kernel<acc_t, MODE, VT, true>;
  set_smem(kernel, plan.smem);
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(unsigned(plan.cluster), unsigned(B), unsigned(dirs));
  config.blockDim = dim3(unsigned(plan.threads));
  config.dynamicSmemBytes = size_t(plan.smem);
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeClusterDimension;
  attribute[0].val.clusterDim.x = unsigned(plan.cluster);
  attribute[0].val.clusterDim.y = 1;
  attribute[0].val.clusterDim.z = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess || clusters < 1) {
    (void)cudaGetLastError();
    return false;  // this cluster shape cannot be scheduled here: the caller falls back
  }
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, params));
  return true;
}

template <typename acc_t, int MODE, int VT>
void launch_cta(const Plan& plan, const RecurrenceParams<acc_t>& params, int64_t B, int dirs, cudaStream_t stream) {
  auto kernel = recurrence_kernel<acc_t, MODE, VT, false>;
  set_smem(kernel, plan.smem);
  kernel<<<dim3(1, unsigned(B), unsigned(dirs)), plan.threads, plan.smem, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t, int MODE>
void launch_recurrence(Plan plan, RecurrenceParams<acc_t> params, int64_t W, int64_t B, int dirs,
                       const DeviceInfo& info, cudaStream_t stream) {
  if (plan.cluster > 1) {
    params.slots_per_cta = plan.threads * plan.vt;
    params.stages = plan.stages;
    bool launched = false;
    switch (plan.vt) {
      case 1: launched = launch_cluster<acc_t, MODE, 1>(plan, params, B, dirs, stream); break;
      case 2: launched = launch_cluster<acc_t, MODE, 2>(plan, params, B, dirs, stream); break;
      case 4: launched = launch_cluster<acc_t, MODE, 4>(plan, params, B, dirs, stream); break;
      default: launched = launch_cluster<acc_t, MODE, 8>(plan, params, B, dirs, stream); break;
    }
    if (launched) return;
    Plan single;  // fall back to one CTA per row
    TORCH_CHECK(plan_cta(W + 1, MODE, sizeof(acc_t), info, single),
                "lattice_band (CUDA): a band of ", W + 1, " states needs a thread-block cluster of ", plan.cluster,
                " CTAs, which this GPU cannot schedule; use backend=\"cpu\" or \"triton\"");
    plan = single;
  }
  params.slots_per_cta = plan.threads * plan.vt;
  params.stages = plan.stages;
  switch (plan.vt) {
    case 1: launch_cta<acc_t, MODE, 1>(plan, params, B, dirs, stream); break;
    case 2: launch_cta<acc_t, MODE, 2>(plan, params, B, dirs, stream); break;
    case 4: launch_cta<acc_t, MODE, 4>(plan, params, B, dirs, stream); break;
    default: launch_cta<acc_t, MODE, 8>(plan, params, B, dirs, stream); break;
  }
}

// ---- the op ----------------------------------------------------------------------------------

at::Tensor lattice_band_cuda(const at::Tensor& table, const at::Tensor& special, const at::Tensor& targets_in,
                             const at::Tensor& input_lengths_in, const at::Tensor& target_lengths_in, int64_t mode,
                             int64_t max_shift, bool need_grad) {
  TORCH_CHECK(mode == kPreserve || mode == kStandard, "lattice_band: mode must be 0 (preserve) or 1 (standard)");
  TORCH_CHECK(table.dim() == 3 && table.is_contiguous() && special.dim() == 2 && special.is_contiguous(),
              "lattice_band: table [B, T, W] and special [B, T] must be contiguous");
  TORCH_CHECK(table.scalar_type() == special.scalar_type() &&
                  (table.scalar_type() == at::kFloat || table.scalar_type() == at::kDouble),
              "lattice_band: table and special must both be float32 or float64");
  const int64_t B = table.size(0), T = table.size(1), W = table.size(2);
  TORCH_CHECK(special.size(0) == B && special.size(1) == T, "lattice_band: special must be [B, T]");
  TORCH_CHECK(targets_in.dim() == 2 && targets_in.size(0) == B, "lattice_band: targets must be [B, U]");
  TORCH_CHECK(input_lengths_in.dim() == 1 && input_lengths_in.size(0) == B, "lattice_band: input_lengths must be [B]");
  TORCH_CHECK(target_lengths_in.dim() == 1 && target_lengths_in.size(0) == B,
              "lattice_band: target_lengths must be [B]");
  const auto device = table.device();
  TORCH_CHECK(device.is_cuda() && special.device() == device && targets_in.device() == device &&
                  input_lengths_in.device() == device && target_lengths_in.device() == device,
              "lattice_band: all tensors must be on the same CUDA device");
  TORCH_CHECK(B <= 65535, "lattice_band (CUDA): at most 65535 rows per call; got ", B);
  const c10::cuda::CUDAGuard guard(device);
  const int64_t U_max = targets_in.size(1);
  const int64_t shift = mode == kPreserve ? max_shift : -1;
  at::Tensor nll = at::empty({B}, table.options());
  if (B == 0) return nll;
  // device-side conversions: no host sync
  const at::Tensor targets = targets_in.to(at::kLong).contiguous();
  const at::Tensor input_lengths = input_lengths_in.to(at::kLong).contiguous();
  const at::Tensor target_lengths = target_lengths_in.to(at::kLong).contiguous();
  at::Tensor status = at::empty({B}, table.options().dtype(at::kInt));
  const int arrays = mode == kPreserve ? 1 : 2;
  const int dirs = need_grad ? 2 : 1;
  at::Tensor store;
  if (need_grad) store = at::empty({2, arrays, B, T + 1, W + 1}, table.options());
  at::Tensor skip;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (mode == kStandard) {
    skip = at::empty({B, U_max + 2}, table.options().dtype(at::kFloat));
    const int64_t n = B * (U_max + 2);
    const int blocks = int(imin<int64_t>((n + 255) / 256, 4096));
    skip_kernel<<<blocks, 256, 0, stream>>>(skip.data_ptr<float>(), targets.data_ptr<int64_t>(),
                                            target_lengths.data_ptr<int64_t>(), B, U_max);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const DeviceInfo& info = device_info(device.index());

  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "mdlm_ctc_lattice_band_cuda", [&] {
    using acc_t = scalar_t;
    const int64_t row_elems = B * (T + 1) * (W + 1);
    acc_t* store_p = need_grad ? store.data_ptr<acc_t>() : nullptr;
    RecurrenceParams<acc_t> rp{};
    rp.table = table.data_ptr<acc_t>();
    rp.special = special.data_ptr<acc_t>();
    rp.skip = mode == kStandard ? skip.data_ptr<float>() : nullptr;
    rp.input_lengths = input_lengths.data_ptr<int64_t>();
    rp.target_lengths = target_lengths.data_ptr<int64_t>();
    rp.nll = nll.data_ptr<acc_t>();
    rp.status = status.data_ptr<int32_t>();
    for (int d = 0; d < 2; ++d)
      for (int a = 0; a < 2; ++a)
        rp.store[d][a] = (need_grad && a < arrays) ? store_p + (d * arrays + a) * row_elems : nullptr;
    rp.T = T;
    rp.W = W;
    rp.U_max = U_max;
    rp.store_stride = W + 1;
    rp.max_shift = shift;
    const Plan plan = make_plan(W, int(mode), sizeof(acc_t), info, B, dirs);
    if (mode == kPreserve)
      launch_recurrence<acc_t, kPreserve>(plan, rp, W, B, dirs, info, stream);
    else
      launch_recurrence<acc_t, kStandard>(plan, rp, W, B, dirs, info, stream);

    if (need_grad && T > 0) {
      PosteriorParams<acc_t> pp{};
      pp.table = table.data_ptr<acc_t>();
      pp.special = special.data_ptr<acc_t>();
      pp.input_lengths = rp.input_lengths;
      pp.target_lengths = rp.target_lengths;
      pp.nll = rp.nll;
      pp.status = rp.status;
      for (int a = 0; a < 2; ++a) {
        pp.alpha[a] = rp.store[0][a];
        pp.beta[a] = rp.store[1][a];
      }
      pp.B = B;
      pp.T = T;
      pp.W = W;
      pp.U_max = U_max;
      pp.store_stride = W + 1;
      pp.max_shift = shift;
      const int64_t blocks = (B * T + kPosteriorWarps - 1) / kPosteriorWarps;
      TORCH_CHECK(blocks <= int64_t(0x7fffffff), "lattice_band (CUDA): too many frames");
      if (mode == kPreserve)
        posterior_kernel<acc_t, kPreserve><<<unsigned(blocks), kPosteriorWarps * kWarpSize, 0, stream>>>(pp);
      else
        posterior_kernel<acc_t, kStandard><<<unsigned(blocks), kPosteriorWarps * kWarpSize, 0, stream>>>(pp);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return nll;
}

}  // namespace
}  // namespace cuda_lattice

TORCH_LIBRARY_IMPL(mdlm_ctc_C, CUDA, m) { m.impl("lattice_band", &cuda_lattice::lattice_band_cuda); }

}  // namespace mdlm_ctc
