// The CUDA lattice kernels (stage 2 of backend "cuda"): the device execution model `CudaDev` that the
// passes of lattice_cuda.cuh are written against, and the three kernels. Device code only (no torch), so
// that benchmarks/static_cuda.py compiles exactly these kernels for sm_90 without the launcher; the
// launcher is csrc/slack_ctc_cuda.cu, the launch planning csrc/lattice_cuda_plan.h.
#pragma once

#include <cooperative_groups.h>

#include "lattice_cuda.cuh"
#include "lattice_cuda_plan.h"

namespace mdlm_ctc {
namespace cuda_lattice {

// ---- the device execution model the passes are written against (lattice_cuda.cuh) -------------

template <bool CLUSTER>
struct CudaDev {
  __device__ int thread_rank() const { return int(threadIdx.x); }
  __device__ int block_size() const { return int(blockDim.x); }
  __device__ int cluster_rank() const { return CLUSTER ? int(blockIdx.x) : 0; }  // cluster dims (gridDim.x, 1, 1)
  __device__ int cluster_size() const { return CLUSTER ? int(gridDim.x) : 1; }
  __device__ int64_t row() const { return int64_t(blockIdx.y); }
  __device__ int direction() const { return int(blockIdx.z); }
  __device__ bool syncthreads_or(bool pred) const { return __syncthreads_or(pred) != 0; }
  __device__ void bar_sync(int id, int count) const { asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(count) : "memory"); }
  // barrier.cluster arrive (release) + wait (acquire), every thread of the cluster, warp-uniform
  // (.aligned): the DSMEM edge cells written before it are visible to every CTA after it.
  // (cooperative_groups' cluster.sync() adds a block size check, a MEMBAR.ALL.GPU and a CTA barrier.)
  __device__ void cluster_sync() const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.aligned;\n\tbarrier.cluster.wait.aligned;" ::: "memory");
#else
    __trap();  // unreachable: the launcher runs cluster kernels only when they were compiled for sm_90+
#endif
  }
  template <typename T>
  __device__ T shfl(unsigned mask, T v, int src) const {
    return __shfl_sync(mask, v, src);
  }
  template <typename T>
  __device__ T shfl_up(unsigned mask, T v, int delta) const {
    return __shfl_up_sync(mask, v, delta);
  }
  template <typename T>
  __device__ T shfl_down(unsigned mask, T v, int delta) const {
    return __shfl_down_sync(mask, v, delta);
  }
  template <typename T>
  __device__ T shfl_xor(unsigned mask, T v, int lane_mask) const {
    return __shfl_xor_sync(mask, v, lane_mask);
  }
  template <typename T>
  __device__ T ld(const T* shared) const {
    return *shared;
  }
  template <typename T>
  __device__ void st(T* shared, T v) const {
    *shared = v;
  }
  // the generic address of `local`'s word in CTA `rank` of the cluster (mapa), taken once before the loop
  template <typename T>
  __device__ T* map_remote(T* local, int rank) const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    return cooperative_groups::this_cluster().map_shared_rank(local, rank);
#else
    __trap();
    return local;
#endif
  }
  // a store into another CTA's shared memory through a map_remote address (the cluster barrier orders it)
  template <typename T>
  __device__ void st_remote(T* remote, T v) const {
    *remote = v;
  }
  // cp.async of one 4- or 8-byte element, one commit group per step, a compile-time wait depth
  template <typename T>
  __device__ void copy_async(T* shared_dst, const T* global_src) const {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "cp.async.ca copies 4, 8 or 16 bytes");
    const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(shared_dst));
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" ::"r"(dst), "l"(global_src), "n"(int(sizeof(T)))
                 : "memory");
  }
  __device__ void commit() const { asm volatile("cp.async.commit_group;" ::: "memory"); }
  template <int N>
  __device__ void wait_prior() const {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
  }
};

// ---- kernels ---------------------------------------------------------------------------------

// Launch bounds per (collapse, VT), the most threads a plan gives it: e.g. preserve VT <= 2 may use 255
// registers, VT = 4 128.
template <typename acc_t, int MODE, int VT, int STAGES, bool CLUSTER>
__global__ void __launch_bounds__(cuda_plan::max_threads_for_vt(MODE, VT)) recurrence_kernel(const RecurrenceParams<acc_t> p) {
  extern __shared__ __align__(16) unsigned char smem[];
  CudaDev<CLUSTER> dev;
  recurrence<acc_t, MODE, VT, STAGES, CLUSTER>(p, smem, dev);
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

}  // namespace cuda_lattice
}  // namespace mdlm_ctc
