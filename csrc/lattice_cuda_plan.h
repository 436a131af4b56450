// Launch planning of the CUDA lattice (csrc/slack_ctc_cuda.cu) as pure host functions of the shapes and
// of what the device reports, so that CPU tests check the plan of every SPEC §6 shape through the host
// build of the emulator (tests/test_cuda_plan.py). The launcher only gathers the device's numbers
// (cached per device) and launches what `plan_lattice` returns.
//
//   S = W + 1 slots bound every valid row's band (W = the table width = the widest column band).
//   One CTA holds up to 8192 slots: VT = 1 / 2 / 4 / 8 slots per thread for <= 256 / 512 / 2048 / 8192
//   slots and threads = ceil(slots / VT) rounded up to a warp (at most max_threads_for_vt, the kernel's
//   launch bounds). The ring holds 4 stages of emissions, or 2 where 4 do not fit; standard CTC also
//   keeps the row's skip mask (4 (U_max + 2 + threads * VT) bytes) in shared memory, which bounds U_max to
//   ~50k there.
//   Clusters (sm_90 code, a device with cluster launch): used when S > 2048 (~1024 slots per CTA) and
//   always when S > 8192; the cluster size is then recomputed from the CTA's capacity, so that the
//   last CTA holds useful slots, and lowered while the B * directions clusters do not all fit at once
//   (the device's max active clusters, which accounts for their placement on GPCs). Where no cluster
//   fits, one CTA per row (S <= 8192) or a clear error.
#pragma once

#include <cstdint>
#include <initializer_list>

#include "lattice_cuda.cuh"

namespace mdlm_ctc {
namespace cuda_plan {

using cuda_lattice::kMaxCluster;
using cuda_lattice::kMaxThreads;
using cuda_lattice::kWarpSize;

constexpr int64_t kMaxSlotsPerCta = int64_t(kMaxThreads) * 8;  // 8192
constexpr int64_t kClusterMinSlots = 2048;                     // provisional: no GPU measurement yet
constexpr int64_t kClusterSlotsPerCta = 1024;

// Slots per thread: VT = 1 / 2 / 4 / 8 for <= 256 / 512 / 2048 / 8192 slots, for both collapses.
// (Standard CTC holds two cells per slot. Halving its VT would bring the per-warp count of the step
// loop down, but the per-warp overhead of a step, ~150 instructions, then comes twice as often: more
// instructions per step in all, on an SM that issues for all warps. See benchmarks/static_cuda.py.)
MDLM_HD constexpr int vt_for(int64_t slots, int /*mode*/) {
  return slots <= 256 ? 1 : slots <= 512 ? 2 : slots <= 2048 ? 4 : 8;
}

// The kernel's launch bounds per (collapse, VT): the most threads any plan gives it.
MDLM_HD constexpr int max_threads_for_vt(int /*mode*/, int vt) { return vt <= 2 ? 256 : vt == 4 ? 512 : 1024; }

struct DeviceLimits {
  int sms = 0;
  int64_t max_smem_per_block = 48 * 1024;  // the opt-in maximum
  bool cluster_launch = false;             // the device can launch clusters
  bool cluster_code = false;               // the cluster kernels were compiled to sm_90+ code
};

struct Plan {
  int cluster = 1, threads = 0, vt = 0, stages = 0;
  int64_t smem = 0;
  int64_t slots = 0;       // S
  int64_t resident = 0;    // clusters (or CTAs) the device holds at once for this plan; -1 unknown
  bool one_wave = false;   // B * directions clusters (CTAs) all resident at once
  int error = 0;           // 0: ok; 1: the band is too wide for any plan on this device
};

// How many clusters of `cluster` CTAs (of `threads` threads and `smem` bytes each) the device can hold
// at once; for cluster = 1, CTAs. The launcher asks cudaOccupancyMaxActiveClusters / ...BlocksPerSM.
using ResidentFn = int64_t (*)(int cluster, int threads, int64_t smem, int vt, int stages, void* context);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t smem_bytes(int mode, int64_t acc_bytes, int threads, int vt, int stages, int64_t U_max) {
  return cuda_lattice::smem_layout(mode, acc_bytes, threads, vt, U_max).total(stages);
}

// One CTA for `slots` slots; false if it cannot hold them or shared memory is too small.
inline bool plan_cta(int64_t slots, int mode, int64_t acc_bytes, int64_t U_max, const DeviceLimits& dev,
                     Plan& plan) {
  if (slots < 1 || slots > kMaxSlotsPerCta) return false;
  plan.vt = vt_for(slots, mode);
  plan.threads = int(cuda_lattice::round_up(ceil_div(slots, plan.vt), kWarpSize));
  for (int stages : {4, 2}) {
    const int64_t bytes = smem_bytes(mode, acc_bytes, plan.threads, plan.vt, stages, U_max);
    if (bytes <= dev.max_smem_per_block) {
      plan.stages = stages;
      plan.smem = bytes;
      return true;
    }
  }
  return false;
}

// forced_cluster: -1 automatic, 0 never, N > 0 clusters of N CTAs whenever S > 256.
// W: the table width; U_max: the padded target length (standard CTC keeps the row's skip mask in shared
// memory).
inline Plan plan_lattice(int64_t W, int64_t U_max, int mode, int64_t acc_bytes, int64_t B, int dirs,
                         const DeviceLimits& dev, int forced_cluster, ResidentFn resident, void* context) {
  const int64_t S = W + 1;
  const int64_t needed = B * dirs;
  const bool clusters_ok = dev.cluster_launch && dev.cluster_code && forced_cluster != 0;
  int64_t want = 1, least = 1;
  if (S > kMaxSlotsPerCta) least = ceil_div(S, kMaxSlotsPerCta);
  if (clusters_ok) {
    if (forced_cluster > 0)
      want = S > 256 ? forced_cluster : 1;
    else if (S > kClusterMinSlots)
      want = imin<int64_t>(kMaxCluster, ceil_div(S, kClusterSlotsPerCta));
    want = imax(want, least);
  }
  if (least > kMaxCluster) {  // wider than the largest cluster holds
    Plan plan;
    plan.slots = S;
    plan.error = 1;
    return plan;
  }
  for (int64_t c = imin<int64_t>(want, kMaxCluster); clusters_ok && c >= imax<int64_t>(least, 2); --c) {
    Plan plan;
    if (!plan_cta(ceil_div(S, c), mode, acc_bytes, U_max, dev, plan)) continue;
    // the CTA's capacity decides the size: no CTA without a useful slot
    plan.cluster = int(ceil_div(S, int64_t(plan.threads) * plan.vt));
    if (plan.cluster < 2) continue;
    plan.slots = S;
    plan.resident = resident(plan.cluster, plan.threads, plan.smem, plan.vt, plan.stages, context);
    if (plan.resident < 1) continue;  // this cluster shape cannot be scheduled here
    plan.one_wave = plan.resident >= needed;
    // a second wave doubles the sequential time the cluster is meant to cut: a smaller cluster, unless
    // the band needs this one or forced
    if (!plan.one_wave && plan.cluster > least && forced_cluster < 0) continue;
    return plan;
  }
  Plan plan;
  plan.slots = S;
  if (!plan_cta(S, mode, acc_bytes, U_max, dev, plan)) {
    plan.error = 1;
    return plan;
  }
  plan.resident = resident(1, plan.threads, plan.smem, plan.vt, plan.stages, context);
  plan.one_wave = plan.resident >= needed;
  return plan;
}

}  // namespace cuda_plan
}  // namespace mdlm_ctc
