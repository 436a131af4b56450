// The kernel side of the CUDA lattice's host emulator (lattice_cuda_emulator.h): the instantiations of the
// kernel code of lattice_cuda.cuh with the emulator's execution model, the launches of one lattice call
// (what csrc/slack_ctc_cuda.cu launches, with the buffers it allocates) and the C entry points for ctypes.
//
// Build (tests/cuda_emulator.py does it, and caches the objects by content):
//   c++ -O2 -std=c++17 -fPIC -fvisibility=hidden -c csrc/lattice_cuda_emulator_runtime.cpp
//   c++ -O1 -std=c++17 -fPIC -fvisibility=hidden -c csrc/lattice_cuda_emulator.cpp   (one or more times)
//   c++ -shared runtime.o kernels.o... -o emulator.so
// Instantiations (each registers itself with the runtime; a launch shape without one is a kBadConfig):
// MDLM_EMU_VT=v / MDLM_EMU_STAGES=s / MDLM_EMU_CLUSTER=0|1 restrict them, MDLM_EMU_ACC=4|8 to float or
// double kernels (the driver and the posterior pass keep both unless MDLM_EMU_FLOAT_ONLY), and
// MDLM_EMU_NO_DRIVER leaves out the driver and the C entry points (a second object of one library).
#include <string>
#include <vector>

#include "lattice_cuda_emulator.h"
#include "lattice_cuda.cuh"
#include "lattice_cuda_plan.h"

namespace mdlm_ctc {
namespace emulator {
namespace {

namespace cl = cuda_lattice;

// ---- the recurrence kernel's instantiations ----------------------------------------------------

template <typename acc_t>
struct RecurrenceLaunch {
  cl::RecurrenceParams<acc_t, Ptr> params;
  int64_t B;
  int threads, ctas;
};

template <typename acc_t, int MODE, int VT, int STAGES, bool CLUSTER>
void recurrence_body(void* context, int cluster, int rank, int tid, Ptr<unsigned char> smem) {
  const auto& launch = *static_cast<const RecurrenceLaunch<acc_t>*>(context);
  // grid (C, B, directions): cluster index = direction * B + row
  EmuDev dev{tid, launch.threads, CLUSTER ? rank : 0, CLUSTER ? launch.ctas : 1, cluster % launch.B,
             int(cluster / launch.B)};
  cl::recurrence<acc_t, MODE, VT, STAGES, CLUSTER>(launch.params, smem, dev);
}

template <typename acc_t, int MODE, int VT, int STAGES, bool CLUSTER>
void register_one() {
  register_body(int(sizeof(acc_t)), MODE, VT, STAGES, CLUSTER, &recurrence_body<acc_t, MODE, VT, STAGES, CLUSTER>);
}

template <typename acc_t, int MODE, int VT, int STAGES>
void register_stages() {
  // only the selected instantiations are compiled: the others are discarded with the if constexpr
  constexpr bool vt_ok =
#if defined(MDLM_EMU_VT)
      VT == MDLM_EMU_VT;
#else
      true;
#endif
  constexpr bool stages_ok =
#if defined(MDLM_EMU_STAGES)
      STAGES == MDLM_EMU_STAGES;
#else
      true;
#endif
  if constexpr (vt_ok && stages_ok) {
#if !defined(MDLM_EMU_CLUSTER) || MDLM_EMU_CLUSTER == 0
    register_one<acc_t, MODE, VT, STAGES, false>();
#endif
#if !defined(MDLM_EMU_CLUSTER) || MDLM_EMU_CLUSTER == 1
    register_one<acc_t, MODE, VT, STAGES, true>();
#endif
  }
}

template <typename acc_t, int MODE, int VT>
void register_vt() {
  register_stages<acc_t, MODE, VT, 2>();
  register_stages<acc_t, MODE, VT, 4>();
  register_stages<acc_t, MODE, VT, 8>();
}

template <typename acc_t>
void register_acc() {
  register_vt<acc_t, kPreserve, 1>();
  register_vt<acc_t, kPreserve, 2>();
  register_vt<acc_t, kPreserve, 4>();
  register_vt<acc_t, kPreserve, 8>();
  register_vt<acc_t, kStandard, 1>();
  register_vt<acc_t, kStandard, 2>();
  register_vt<acc_t, kStandard, 4>();
  register_vt<acc_t, kStandard, 8>();
}

const bool registered = [] {
#if !defined(MDLM_EMU_ACC) || MDLM_EMU_ACC == 4
  register_acc<float>();
#endif
#if (!defined(MDLM_EMU_ACC) || MDLM_EMU_ACC == 8) && !defined(MDLM_EMU_FLOAT_ONLY)
  register_acc<double>();
#endif
  return true;
}();

}  // namespace
}  // namespace emulator
}  // namespace mdlm_ctc

#if !defined(MDLM_EMU_NO_DRIVER)
namespace mdlm_ctc {
namespace emulator {
namespace {

namespace cl = cuda_lattice;

// ---- the posterior kernel -------------------------------------------------------------------------

constexpr int kPosteriorWarps = 8;  // as posterior_kernel (lattice_cuda_kernels.cuh)

template <typename acc_t>
struct PosteriorLaunch {
  cl::PosteriorParams<acc_t, Ptr> params;
};

template <typename acc_t, int MODE>
void posterior_body(void* context, int cluster, int, int tid, Ptr<unsigned char>) {
  const auto& p = static_cast<const PosteriorLaunch<acc_t>*>(context)->params;
  const int64_t frame = int64_t(cluster) * kPosteriorWarps + tid / 32;
  if (frame >= p.B * p.T) return;  // whole warps leave
  EmuDev dev{tid, kPosteriorWarps * 32, 0, 1, 0, 0};
  cl::posterior_row<acc_t, MODE>(p, frame / p.T, frame % p.T, tid % 32, dev);
}

std::string last_error;

// ---- one lattice call: the launches of lattice_band_cuda (csrc/slack_ctc_cuda.cu) ------------------

struct Launch {
  int cluster, threads, vt, stages;
};

template <typename acc_t, int MODE>
int lattice_band(acc_t* table, acc_t* special, const int64_t* targets, const int64_t* input_lengths,
                 const int64_t* target_lengths, int64_t B, int64_t T, int64_t W, int64_t U_max, int64_t max_shift,
                 bool need_grad, acc_t* nll, const Launch& shape, const Options& options) {
  const int arrays = MODE == kPreserve ? 1 : 2;
  const int64_t shift = MODE == kPreserve ? max_shift : -1;
  const bool cluster = shape.cluster > 1;
  const CtaBody body = find_body(int(sizeof(acc_t)), MODE, shape.vt, shape.stages, cluster);
  if (body == nullptr) {
    last_error = "no emulated kernel for VT=" + std::to_string(shape.vt) + ", " + std::to_string(shape.stages) +
                 " stages" + (cluster ? ", clusters" : "") + " in this build";
    return kBadConfig;
  }
  Emulation emu(options);
  // the skip mask (skip_kernel on the GPU, a launch before the recurrence)
  std::vector<float> skip(size_t(B * (U_max + 2)));
  for (int64_t i = 0; i < int64_t(skip.size()); ++i)
    skip[size_t(i)] = cl::skip_value(targets, target_lengths, U_max, i / (U_max + 2), i % (U_max + 2));
  // the launcher's scratch: at::empty, so nothing in it is defined until a kernel writes it
  std::vector<int32_t> status(size_t(B), -1);
  const int64_t row_elems = B * (T + 1) * (W + 1);
  std::vector<acc_t> store(need_grad ? size_t(2 * arrays * row_elems) : 0, std::numeric_limits<acc_t>::quiet_NaN());
  emu.buffer(table, size_t(B * T * W) * sizeof(acc_t), true, "table");
  emu.buffer(special, size_t(B * T) * sizeof(acc_t), true, "special");
  emu.buffer(input_lengths, size_t(B) * sizeof(int64_t), true, "input_lengths");
  emu.buffer(target_lengths, size_t(B) * sizeof(int64_t), true, "target_lengths");
  emu.buffer(skip.data(), skip.size() * sizeof(float), true, "skip");
  emu.buffer(nll, size_t(B) * sizeof(acc_t), false, "nll");
  emu.buffer(status.data(), status.size() * sizeof(int32_t), false, "status");
  if (need_grad) emu.buffer(store.data(), store.size() * sizeof(acc_t), false, "store");

  RecurrenceLaunch<acc_t> rl{};
  auto& rp = rl.params;
  rp.table = Ptr<const acc_t>(table);
  rp.special = Ptr<const acc_t>(special);
  rp.skip = Ptr<const float>(skip.data());
  rp.input_lengths = Ptr<const int64_t>(input_lengths);
  rp.target_lengths = Ptr<const int64_t>(target_lengths);
  rp.nll = Ptr<acc_t>(nll);
  rp.status = Ptr<int32_t>(status.data());
  for (int d = 0; d < 2; ++d)
    for (int a = 0; a < 2; ++a)
      rp.store[d][a] = (need_grad && a < arrays) ? Ptr<acc_t>(store.data() + (d * arrays + a) * row_elems) : nullptr;
  rp.T = T;
  rp.W = W;
  rp.U_max = U_max;
  rp.store_stride = W + 1;
  rp.max_shift = shift;
  rp.slots_per_cta = shape.threads * shape.vt;
  rl.B = B;
  rl.threads = shape.threads;
  rl.ctas = cluster ? shape.cluster : 1;
  const int dirs = need_grad ? 2 : 1;
  const int64_t smem = cl::smem_layout(MODE, sizeof(acc_t), shape.threads, shape.vt, U_max).total(shape.stages);

  emu.writable(nll, true);
  emu.writable(status.data(), true);
  if (need_grad) emu.writable(store.data(), true);
  emu.launch(dirs * B, rl.ctas, shape.threads, smem, dirs * B, body, &rl);
  if (emu.code() == kOk)
    for (int64_t b = 0; b < B; ++b)
      if (!emu.is_defined(&status[size_t(b)], sizeof(int32_t)) || !emu.is_defined(nll + b, sizeof(acc_t)))
        emu.fail(kNoStatus, ("row " + std::to_string(b) + " got no status or loss").c_str());
  if (emu.code() == kOk && need_grad && T > 0) {
    PosteriorLaunch<acc_t> pl{cl::posterior_params(rp, Ptr<acc_t>(table), Ptr<acc_t>(special), B)};
    emu.writable(nll, false);
    emu.writable(status.data(), false);
    emu.writable(store.data(), false);
    emu.writable(table, true);
    emu.writable(special, true);
    const int64_t blocks = (B * T + kPosteriorWarps - 1) / kPosteriorWarps;
    emu.launch(blocks, 1, kPosteriorWarps * 32, 16, 1, &posterior_body<acc_t, MODE>, &pl);
  }
  if (emu.code() != kOk) last_error = emu.what();
  return emu.code();
}

}  // namespace
}  // namespace emulator
}  // namespace mdlm_ctc

// ---- C entry points (built with -fvisibility=hidden: several builds live in one process) ----------

#define MDLM_EMU_API extern "C" __attribute__((visibility("default")))

// mdlm_ctc_emulate_lattice_band returns an emulator::Error (0 on success); mdlm_ctc_emulator_last_error
// says what the first violation of the last call was.
MDLM_EMU_API const char* mdlm_ctc_emulator_last_error() { return mdlm_ctc::emulator::last_error.c_str(); }

MDLM_EMU_API int mdlm_ctc_emulate_lattice_band(int is_double, void* table, void* special, const int64_t* targets,
                                               const int64_t* input_lengths, const int64_t* target_lengths,
                                               int64_t B, int64_t T, int64_t W, int64_t U_max, int mode,
                                               int64_t max_shift, int need_grad, void* nll, int cluster, int threads,
                                               int vt, int stages, int lazy_copies, int preempt_permille,
                                               uint64_t seed, int late_start) {
  using namespace mdlm_ctc;
  using emulator::last_error;
  last_error.clear();
  if (threads <= 0 || threads % cuda_lattice::kWarpSize || threads > cuda_lattice::kMaxThreads || cluster < 1 ||
      cluster > cuda_lattice::kMaxCluster || T >= (int64_t(1) << 31) || U_max >= (int64_t(1) << 31)) {
    last_error = "bad configuration";
    return emulator::kBadConfig;
  }
  const emulator::Launch shape{cluster, threads, vt, stages};
  emulator::Options options;
  options.lazy_copies = lazy_copies != 0;
  options.preempt_permille = preempt_permille;
  options.seed = seed;
  options.late_start = late_start != 0;
  if (is_double) {
#if defined(MDLM_EMU_FLOAT_ONLY)
    last_error = "this build has no float64 kernels";
    return emulator::kBadConfig;
#else
    auto* t = static_cast<double*>(table);
    auto* s = static_cast<double*>(special);
    auto* n = static_cast<double*>(nll);
    return mode == kPreserve ? emulator::lattice_band<double, kPreserve>(t, s, targets, input_lengths, target_lengths,
                                                                         B, T, W, U_max, max_shift, need_grad, n,
                                                                         shape, options)
                             : emulator::lattice_band<double, kStandard>(t, s, targets, input_lengths, target_lengths,
                                                                         B, T, W, U_max, max_shift, need_grad, n,
                                                                         shape, options);
#endif
  }
  auto* t = static_cast<float*>(table);
  auto* s = static_cast<float*>(special);
  auto* n = static_cast<float*>(nll);
  return mode == kPreserve ? emulator::lattice_band<float, kPreserve>(t, s, targets, input_lengths, target_lengths, B,
                                                                      T, W, U_max, max_shift, need_grad, n, shape,
                                                                      options)
                           : emulator::lattice_band<float, kStandard>(t, s, targets, input_lengths, target_lengths, B,
                                                                      T, W, U_max, max_shift, need_grad, n, shape,
                                                                      options);
}

// Launch planning (lattice_cuda_plan.h) for the tests: out = [cluster, threads, vt, stages, smem, slots,
// resident, one_wave, error].
MDLM_EMU_API void mdlm_ctc_plan_lattice(int64_t W, int64_t U_max, int mode, int64_t acc_bytes, int64_t B, int dirs,
                                        int sms, int64_t max_smem_per_block, int cluster_launch, int cluster_code,
                                        int forced, mdlm_ctc::cuda_plan::ResidentFn resident, void* context,
                                        int64_t* out) {
  using namespace mdlm_ctc::cuda_plan;
  DeviceLimits dev;
  dev.sms = sms;
  dev.max_smem_per_block = max_smem_per_block;
  dev.cluster_launch = cluster_launch != 0;
  dev.cluster_code = cluster_code != 0;
  const Plan p = plan_lattice(W, U_max, mode, acc_bytes, B, dirs, dev, forced, resident, context);
  const int64_t values[] = {p.cluster, p.threads, p.vt, p.stages, p.smem, p.slots, p.resident, p.one_wave, p.error};
  for (int i = 0; i < 9; ++i) out[i] = values[i];
}

MDLM_EMU_API int mdlm_ctc_plan_launch_bounds(int mode, int vt) {
  return mdlm_ctc::cuda_plan::max_threads_for_vt(mode, vt);
}
#endif  // !MDLM_EMU_NO_DRIVER
