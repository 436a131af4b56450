// CUDA kernels of backend "cuda": the lattice stage `mdlm_ctc_C::lattice_band` (csrc/ops.cpp), between the
// Triton vocabulary pass and the Triton gradient pass (mdlm_ctc/backends.py). It computes exactly what
// lattice_band_cpu computes: nll [B] (+inf infeasible, NaN for NaN rows) and, with need_grad, the
// posteriors written in place over `table` and `special` (0 on infeasible rows and past the input
// length, NaN on NaN rows). The kernel bodies live in lattice_cuda.cuh (recurrences, shared with the
// CPU through lattice.h, and a host emulator for tests), the device execution model and the kernels
// in lattice_cuda_kernels.cuh; this file holds the launcher.
//
// Recurrences (lattice.h): preserve alpha_t(u) = logaddexp(alpha_{t-1}(u) + e_t(k), alpha_{t-1}(u-1) + e_t(y_u)),
// standard CTC split into blank / label arrays; beta mirrors them; posteriors = exp(alpha + e + beta - loglik).
//
// Layouts: table [B, T, W] and special [B, T] float32 (float64 for float64 logits), contiguous; targets
// [B, U] and lengths [B] any integer dtype (converted to int64 on the device, never read on the host).
// Scratch: the band rows of alpha and beta, [2, arrays, B, T + 1, W + 1] in the table's dtype (only
// with need_grad), a status word per row, and for standard CTC the skip mask [B, U + 2] (float).
//
// Launch plan (per call, from shapes and cached device properties only: no host sync, no .item()):
// csrc/lattice_cuda_plan.h, pure functions tested on CPU (tests/test_cuda_plan.py).
//   (1) one CTA per (row, direction), grid (1, B, 2): the band in registers, VT slots per thread; warp
//       shuffles for the u +- 1 neighbours, shared-memory edge cells between warps, one named barrier
//       per step counting only the warps the row's own band needs; a cp.async ring of 4 (or 2) stages.
//   (2) Hopper thread-block clusters, only with sm_90 code and a device with cluster launch: one row's
//       band split over C CTAs of a cluster, grid (C, B, 2), neighbours across CTAs read from the other
//       CTA's shared memory (DSMEM) after the per-step cluster barrier; C sized so that every CTA holds
//       useful slots and all B * directions clusters are resident at once (cudaOccupancyMaxActiveClusters).
//       A build without sm_90 code, or a device without clusters, falls back to (1) (a band of more
//       than 8192 slots is then an error naming the backends that can run it).
//   (3) posterior pass: one warp per frame, 8 warps per CTA, fully parallel over B * T.
//   MDLM_CTC_CUDA_CLUSTER=auto|0|N overrides the cluster choice (0: never; N: C <= N when S > 256).
// Device properties, cudaFuncSetAttribute and the occupancy queries are cached per device and kernel.
// These thresholds are a plan, not a measurement: no GPU was available when this file was written, so
// the GPU check script's benchmark (rows G2/G3 of SPEC §6) has to confirm or move them;
// benchmarks/static_cuda.py reports what the compiled step loop costs (registers, spills, SASS).
//
// Numerics: fp32 accumulation for float32 tables, fp64 for float64 (the SFU's ex2/lg2 resp. exp/log
// via logspace.h). No atomics; every reduction has a fixed order: results are bitwise reproducible.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "lattice_cuda_kernels.cuh"
#include "lattice_cuda_plan.h"

namespace mdlm_ctc {
namespace cuda_lattice {
namespace {

// ---- launching (the plan itself is lattice_cuda_plan.h) ---------------------------------------

constexpr int kMaxDevices = 64;

// A failed query whose error is its own: clear it, but raise any earlier (asynchronous) error that the
// clearing would otherwise discard.
void clear_own_error(cudaError_t own, const char* what) {
  const cudaError_t last = cudaGetLastError();
  TORCH_CHECK(last == cudaSuccess || last == own, "lattice_band (CUDA): an earlier CUDA error surfaced while ", what,
              ": ", cudaGetErrorString(last));
}

// The kernel of (acc_t, MODE, vt, stages, cluster) as the untyped pointer the runtime API takes.
template <typename acc_t, int MODE>
const void* recurrence_kernel_for(int vt, int stages, bool cluster) {
#define MDLM_KERNEL(V, S)                                                                                   \
  if (vt == V && stages == S)                                                                               \
    return cluster ? reinterpret_cast<const void*>(&recurrence_kernel<acc_t, MODE, V, S, true>)             \
                   : reinterpret_cast<const void*>(&recurrence_kernel<acc_t, MODE, V, S, false>);
  MDLM_KERNEL(1, 2) MDLM_KERNEL(1, 4) MDLM_KERNEL(2, 2) MDLM_KERNEL(2, 4)
  MDLM_KERNEL(4, 2) MDLM_KERNEL(4, 4) MDLM_KERNEL(8, 2) MDLM_KERNEL(8, 4)
#undef MDLM_KERNEL
  TORCH_CHECK(false, "lattice_band (CUDA): no kernel for VT=", vt, ", ", stages, " stages");
  return nullptr;
}

struct DeviceInfo {
  cuda_plan::DeviceLimits limits;
  std::map<std::tuple<const void*, int, int, int64_t>, int64_t> resident;  // (kernel, cluster, threads, smem)
  std::map<const void*, int64_t> smem_set;                                  // dynamic smem opted in per kernel
};

std::mutex& device_mutex() {
  static std::mutex mutex;
  return mutex;
}

// What the plan needs from the device, queried once per device (under device_mutex()).
template <typename acc_t, int MODE>
DeviceInfo& device_info(int device) {
  static std::array<std::unique_ptr<DeviceInfo>, kMaxDevices> cache;
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "lattice_band: CUDA device index ", device, " out of range");
  if (cache[device] == nullptr) {
    auto info = std::make_unique<DeviceInfo>();
    int major = 0, sms = 0, smem = 0, cluster = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    const cudaError_t queried = cudaDeviceGetAttribute(&cluster, cudaDevAttrClusterLaunch, device);
    if (queried != cudaSuccess) {  // an old driver without the attribute: no clusters
      clear_own_error(queried, "querying cluster launch support");
      cluster = 0;
    }
    info->limits.sms = sms;
    info->limits.max_smem_per_block = smem;
    info->limits.cluster_launch = cluster != 0 && major >= 9;
    // A build without sm_90 code (e.g. sm_80 SASS or compute_80 PTX JIT-compiled here) has cluster
    // kernels that cannot synchronise a cluster: never launch them, use one CTA per row instead.
    cudaFuncAttributes attributes{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, recurrence_kernel_for<acc_t, MODE>(1, 2, true)));
    info->limits.cluster_code = attributes.ptxVersion >= 90 && attributes.binaryVersion >= 90;
    cache[device] = std::move(info);
  }
  return *cache[device];
}

struct ResidentQuery {
  DeviceInfo* info;
  const void* (*kernel_for)(int, int, bool);
  cudaStream_t stream;
};

// cuda_plan::ResidentFn: clusters (or CTAs) of this shape the device holds at once, cached per device.
int64_t resident_on_device(int cluster, int threads, int64_t smem, int vt, int stages, void* context) {
  auto& query = *static_cast<ResidentQuery*>(context);
  const void* kernel = query.kernel_for(vt, stages, cluster > 1);
  const auto key = std::make_tuple(kernel, cluster, threads, smem);
  const auto found = query.info->resident.find(key);
  if (found != query.info->resident.end()) return found->second;
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  int64_t count = 0;
  if (cluster > 1) {
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(unsigned(cluster), 1, 1);
    config.blockDim = dim3(unsigned(threads));
    config.dynamicSmemBytes = size_t(smem);
    config.stream = query.stream;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = unsigned(cluster);
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
    int clusters = 0;
    const cudaError_t queried = cudaOccupancyMaxActiveClusters(&clusters, kernel, &config);
    if (queried != cudaSuccess) clear_own_error(queried, "querying the active clusters");
    count = queried == cudaSuccess ? clusters : 0;  // 0: this cluster shape cannot be scheduled here
  } else {
    int blocks = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, size_t(smem)));
    count = int64_t(blocks) * query.info->limits.sms;
  }
  query.info->resident[key] = count;
  return count;
}

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

template <typename acc_t, int MODE>
void launch_recurrence(RecurrenceParams<acc_t> params, int64_t W, int64_t B, int dirs, int device,
                       cudaStream_t stream) {
  const int64_t U_max = params.U_max;
  cuda_plan::Plan plan;
  const void* kernel = nullptr;
  {
    std::lock_guard<std::mutex> lock(device_mutex());
    DeviceInfo& info = device_info<acc_t, MODE>(device);
    ResidentQuery query{&info, &recurrence_kernel_for<acc_t, MODE>, stream};
    plan = cuda_plan::plan_lattice(W, U_max, MODE, sizeof(acc_t), B, dirs, info.limits, cluster_override(),
                                   &resident_on_device, &query);
    TORCH_CHECK(plan.error == 0, "lattice_band (CUDA): a band of ", W + 1, " states (table width ", W,
                MODE == kStandard ? ", and a skip mask of U + 2 = " : "", MODE == kStandard ? U_max + 2 : 0,
                MODE == kStandard ? " states plus the CTA's slots" : "", ") is wider than this GPU's lattice kernel supports (",
                info.limits.cluster_launch && info.limits.cluster_code ? kMaxCluster * cuda_plan::kMaxSlotsPerCta
                                                                       : cuda_plan::kMaxSlotsPerCta,
                " states, ", info.limits.max_smem_per_block, " bytes of shared memory per CTA); use backend=\"cpu\" "
                "or \"triton\"");
    kernel = recurrence_kernel_for<acc_t, MODE>(plan.vt, plan.stages, plan.cluster > 1);
    int64_t& opted = info.smem_set[kernel];
    if (plan.smem > 48 * 1024 && plan.smem > opted) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.smem)));
      opted = plan.smem;
    }
  }
  params.slots_per_cta = plan.threads * plan.vt;
  void* args[] = {&params};
  if (plan.cluster > 1) {
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
    C10_CUDA_CHECK(cudaLaunchKernelExC(&config, kernel, args));
  } else {
    C10_CUDA_CHECK(cudaLaunchKernel(kernel, dim3(1, unsigned(B), unsigned(dirs)), dim3(unsigned(plan.threads)), args,
                                    size_t(plan.smem), stream));
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
  TORCH_CHECK(T < (int64_t(1) << 31) && targets_in.size(1) < (int64_t(1) << 31),
              "lattice_band (CUDA): T and U must be below 2^31; got ", T, " and ", targets_in.size(1));
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
    if (mode == kPreserve)
      launch_recurrence<acc_t, kPreserve>(rp, W, B, dirs, device.index(), stream);
    else
      launch_recurrence<acc_t, kStandard>(rp, W, B, dirs, device.index(), stream);

    if (need_grad && T > 0) {
      const PosteriorParams<acc_t> pp = posterior_params(rp, table.data_ptr<acc_t>(), special.data_ptr<acc_t>(), B);
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
