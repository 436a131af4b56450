// Host emulator of the CUDA execution model used by lattice_cuda.cuh, for testing the CUDA lattice on
// machines without a GPU (tests/test_slack_ctc_cuda.py builds it with the host C++ compiler and calls
// `mdlm_ctc_emulate_lattice_band` through ctypes). It runs the very same `recurrence_pass` and
// `posterior_row` code as the GPU kernels, with every CUDA thread a user-level fiber:
//   * __syncthreads_or / the named per-step barrier / cluster.sync() / shuffles are barriers between
//     fibers (a fiber waits by yielding to the scheduler), so any missing barrier shows up;
//   * fibers are scheduled in a seeded random order at every round, so code that relies on an
//     unsynchronised ordering between threads gives wrong results or a detected deadlock;
//   * cp.async copies can be deferred to the wait that retires them, with the destination poisoned
//     (NaN) until then: reading a stage before its copies are waited for, or reusing a stage another
//     thread still reads, turns the result into NaN;
//   * DSMEM (map_shared_rank) maps into the other emulated CTA's shared memory, and the named barrier
//     checks that its thread count matches the threads still running.
// Numerics are those of the host build of logspace.h (the CPU kernels' exp/log), not CUDA's.
//
// Build (Linux, any C++17 compiler): c++ -O1 -std=c++17 -shared -fPIC -x c++ -DMDLM_CTC_EMULATOR_API
//   -Icsrc csrc/lattice_cuda_emulator.h -o emulator.so
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <vector>

#include "lattice_cuda.cuh"

namespace mdlm_ctc {
namespace emulator {

class Scheduler {
 public:
  Scheduler(uint64_t seed, bool shuffle) : rng_(seed), shuffle_(shuffle) {}

  void spawn(std::function<void()> body) {
    auto fiber = std::make_unique<Fiber>();
    fiber->body = std::move(body);
    fiber->stack.reset(new char[kStackBytes]);
    getcontext(&fiber->ctx);
    fiber->ctx.uc_stack.ss_sp = fiber->stack.get();
    fiber->ctx.uc_stack.ss_size = kStackBytes;
    fiber->ctx.uc_link = &main_;
    makecontext(&fiber->ctx, reinterpret_cast<void (*)()>(&Scheduler::trampoline), 1, int(fibers_.size()));
    fibers_.push_back(std::move(fiber));
  }

  // Runs every fiber to completion; false if they deadlocked (a round in which nobody moved).
  bool run() {
    Scheduler* outer = active_;
    active_ = this;
    bool ok = true;
    while (true) {
      std::vector<int> order;
      for (int i = 0; i < int(fibers_.size()); ++i)
        if (!fibers_[i]->done) order.push_back(i);
      if (order.empty()) break;
      if (shuffle_) std::shuffle(order.begin(), order.end(), rng_);
      const uint64_t before = events_;
      for (int i : order) {
        current_ = i;
        swapcontext(&main_, &fibers_[i]->ctx);
      }
      if (events_ == before) {
        ok = false;
        break;
      }
    }
    active_ = outer;
    return ok;
  }

  void yield() { swapcontext(&fibers_[current_]->ctx, &main_); }
  void progress() { ++events_; }

 private:
  static constexpr size_t kStackBytes = 256 * 1024;
  struct Fiber {
    ucontext_t ctx;
    std::unique_ptr<char[]> stack;
    std::function<void()> body;
    bool done = false;
  };
  static void trampoline(int index) {
    Scheduler* self = active_;
    self->fibers_[index]->body();
    self->fibers_[index]->done = true;
    self->progress();
  }  // returns to uc_link = main_

  static inline thread_local Scheduler* active_ = nullptr;
  ucontext_t main_;
  std::vector<std::unique_ptr<Fiber>> fibers_;
  int current_ = -1;
  uint64_t events_ = 0;
  std::mt19937_64 rng_;
  bool shuffle_;
};

struct Barrier {
  int expected = 0, count = 0;
  uint64_t generation = 0;
  void wait(Scheduler& s) {
    const uint64_t g = generation;
    s.progress();
    if (++count >= expected) {
      count = 0;
      ++generation;
    } else {
      while (generation == g) s.yield();
    }
  }
  void drop(Scheduler& s) {
    --expected;
    s.progress();
    if (count > 0 && count >= expected) {
      count = 0;
      ++generation;
    }
  }
};

struct Cta {
  std::vector<unsigned char> smem_storage;
  unsigned char* smem = nullptr;
  int64_t smem_bytes = 0;
  Barrier block;
  std::vector<Barrier> warp_barrier;
  std::vector<unsigned char> exchange;  // [warps][32][8 bytes]
  std::vector<char> flags;              // block_any
  int declared_active = -1;             // the thread count every per-step barrier was given
  Cta(int threads, int64_t bytes) : smem_storage(size_t(bytes) + 64), smem_bytes(bytes) {
    smem = smem_storage.data() + (64 - reinterpret_cast<uintptr_t>(smem_storage.data()) % 64) % 64;
    block.expected = threads;
    warp_barrier.resize(threads / cuda_lattice::kWarpSize);
    for (auto& w : warp_barrier) w.expected = cuda_lattice::kWarpSize;
    exchange.resize(size_t(threads) * 8);
    flags.resize(threads);
  }
};

struct Cluster {
  std::vector<std::unique_ptr<Cta>> ctas;
  Barrier barrier;
};

struct Errors {
  int barrier_count = 0, remote_range = 0;
};

class EmuDev {
 public:
  EmuDev(Scheduler& s, Cluster& cluster, Errors& errors, int rank, int tid, int threads, int64_t row, int dir,
         bool use_cluster, bool lazy)
      : s_(s), cluster_(cluster), errors_(errors), cta_(*cluster.ctas[rank]), rank_(rank), tid_(tid),
        threads_(threads), row_(row), dir_(dir), use_cluster_(use_cluster), lazy_(lazy) {}

  int thread_rank() const { return tid_; }
  int block_size() const { return threads_; }
  int cluster_rank() const { return use_cluster_ ? rank_ : 0; }
  int cluster_size() const { return use_cluster_ ? int(cluster_.ctas.size()) : 1; }
  int64_t row() const { return row_; }
  int direction() const { return dir_; }

  bool block_any(bool pred) {
    cta_.flags[tid_] = pred;
    cta_.block.wait(s_);
    bool any = false;
    for (char f : cta_.flags) any |= f != 0;
    cta_.block.wait(s_);
    return any;
  }
  void retire() { cta_.block.drop(s_); }
  void sync(int active_threads) {
    if (use_cluster_) {
      cluster_sync();
      return;
    }
    // bar.sync's count must be the same everywhere and equal the threads still running (checked after the run)
    if (cta_.declared_active < 0) cta_.declared_active = active_threads;
    if (active_threads != cta_.declared_active) ++errors_.barrier_count;
    cta_.block.wait(s_);
  }
  void cluster_sync() { cluster_.barrier.wait(s_); }

  template <typename T>
  T* remote(T* local, int rank) {
    const auto offset = reinterpret_cast<unsigned char*>(local) - cta_.smem;
    if (rank < 0 || rank >= int(cluster_.ctas.size()) || offset < 0 ||
        offset + int64_t(sizeof(T)) > cta_.smem_bytes) {
      ++errors_.remote_range;
      return local;
    }
    return reinterpret_cast<T*>(cluster_.ctas[rank]->smem + offset);
  }

  template <typename T>
  T shfl_up(T v) {
    const int lane = tid_ % cuda_lattice::kWarpSize;
    return shuffle(v, lane >= 1 ? lane - 1 : lane);
  }
  template <typename T>
  T shfl_down(T v) {
    const int lane = tid_ % cuda_lattice::kWarpSize;
    return shuffle(v, lane + 1 < cuda_lattice::kWarpSize ? lane + 1 : lane);
  }
  template <typename T>
  T shfl_xor(T v, int mask) {
    return shuffle(v, (tid_ % cuda_lattice::kWarpSize) ^ mask);
  }
  void warp_sync() { cta_.warp_barrier[tid_ / cuda_lattice::kWarpSize].wait(s_); }

  template <typename T>
  void copy_async(T* dst, const T* src) {
    if (!lazy_) {
      *dst = *src;
      return;
    }
    *dst = std::numeric_limits<T>::quiet_NaN();  // poison until the wait that retires the copy
    open_.push_back({dst, src, sizeof(T)});
  }
  void commit() {
    groups_.push_back(std::move(open_));
    open_.clear();
  }
  void wait_prior(int groups) {
    while (int(groups_.size()) > groups) {
      for (const Copy& c : groups_.front()) std::memcpy(c.dst, c.src, c.bytes);
      groups_.erase(groups_.begin());
    }
  }
  void wait_all() { wait_prior(0); }

 private:
  template <typename T>
  T shuffle(T v, int src_lane) {
    const int warp = tid_ / cuda_lattice::kWarpSize, lane = tid_ % cuda_lattice::kWarpSize;
    unsigned char* slots = cta_.exchange.data() + size_t(warp) * cuda_lattice::kWarpSize * 8;
    std::memcpy(slots + lane * 8, &v, sizeof(T));
    warp_sync();
    T out;
    std::memcpy(&out, slots + src_lane * 8, sizeof(T));
    warp_sync();
    return out;
  }
  struct Copy {
    void* dst;
    const void* src;
    size_t bytes;
  };
  Scheduler& s_;
  Cluster& cluster_;
  Errors& errors_;
  Cta& cta_;
  int rank_, tid_, threads_;
  int64_t row_;
  int dir_;
  bool use_cluster_, lazy_;
  std::vector<Copy> open_;
  std::vector<std::vector<Copy>> groups_;
};

struct Config {
  int cluster, threads, vt, stages;
  bool lazy, shuffle;
  uint64_t seed;
};

// 0 ok, 1 deadlock, 3 barrier count mismatch, 4 DSMEM offset out of range
template <typename acc_t, int MODE, int VT, bool CLUSTER>
int run_recurrence(const cuda_lattice::RecurrenceParams<acc_t>& p, int64_t B, int dirs, const Config& cfg) {
  const cuda_lattice::SmemLayout layout = cuda_lattice::smem_layout(MODE, sizeof(acc_t), cfg.threads, VT);
  const int64_t smem = layout.total(cfg.stages);
  Errors errors;
  uint64_t seed = cfg.seed;
  for (int dir = 0; dir < dirs; ++dir) {
    for (int64_t b = 0; b < B; ++b) {
      const int ctas = CLUSTER ? cfg.cluster : 1;
      Cluster cluster;
      for (int r = 0; r < ctas; ++r) cluster.ctas.push_back(std::make_unique<Cta>(cfg.threads, smem));
      cluster.barrier.expected = ctas * cfg.threads;
      Scheduler s(seed++, cfg.shuffle);
      std::vector<std::unique_ptr<EmuDev>> devs;
      for (int r = 0; r < ctas; ++r)
        for (int tid = 0; tid < cfg.threads; ++tid) {
          devs.push_back(std::make_unique<EmuDev>(s, cluster, errors, r, tid, cfg.threads, b, dir, CLUSTER, cfg.lazy));
          EmuDev* dev = devs.back().get();
          unsigned char* mem = cluster.ctas[r]->smem;
          s.spawn([&p, dev, mem] { cuda_lattice::recurrence_pass<acc_t, MODE, VT, CLUSTER>(p, mem, *dev); });
        }
      if (!s.run()) return 1;
      for (const auto& cta : cluster.ctas)
        if (cta->declared_active >= 0 && cta->declared_active != cta->block.expected) ++errors.barrier_count;
    }
  }
  if (errors.barrier_count) return 3;
  if (errors.remote_range) return 4;
  return 0;
}

template <typename acc_t, int MODE>
int run_posteriors(const cuda_lattice::PosteriorParams<acc_t>& p, const Config& cfg) {
  constexpr int kWarps = 8;
  const int64_t frames = p.B * p.T;
  Errors errors;
  uint64_t seed = cfg.seed + 7919;
  for (int64_t first = 0; first < frames; first += kWarps) {
    Cluster cluster;
    cluster.ctas.push_back(std::make_unique<Cta>(kWarps * cuda_lattice::kWarpSize, 16));
    Scheduler s(seed++, cfg.shuffle);
    std::vector<std::unique_ptr<EmuDev>> devs;
    for (int tid = 0; tid < kWarps * cuda_lattice::kWarpSize; ++tid) {
      const int64_t frame = first + tid / cuda_lattice::kWarpSize;
      if (frame >= frames) break;
      devs.push_back(std::make_unique<EmuDev>(s, cluster, errors, 0, tid, kWarps * cuda_lattice::kWarpSize, 0, 0,
                                              false, false));
      EmuDev* dev = devs.back().get();
      const int lane = tid % cuda_lattice::kWarpSize;
      s.spawn([&p, dev, frame, lane] {
        cuda_lattice::posterior_row<acc_t, MODE>(p, frame / p.T, frame % p.T, lane, *dev);
      });
    }
    if (!s.run()) return 1;
  }
  return 0;
}

template <typename acc_t, int MODE>
int lattice_band(acc_t* table, acc_t* special, const int64_t* targets, const int64_t* input_lengths,
                 const int64_t* target_lengths, int64_t B, int64_t T, int64_t W, int64_t U_max, int64_t max_shift,
                 bool need_grad, acc_t* nll, const Config& cfg) {
  namespace cl = cuda_lattice;
  const int arrays = MODE == kPreserve ? 1 : 2;
  const int64_t shift = MODE == kPreserve ? max_shift : -1;
  std::vector<int32_t> status(B, -1);
  std::vector<float> skip(size_t(B * (U_max + 2)));
  for (int64_t i = 0; i < int64_t(skip.size()); ++i)
    skip[i] = cl::skip_value(targets, target_lengths, U_max, i / (U_max + 2), i % (U_max + 2));
  const int64_t row_elems = B * (T + 1) * (W + 1);
  // NaN-filled, so that a posterior reading a store cell nobody wrote shows up
  std::vector<acc_t> store(need_grad ? size_t(2 * arrays * row_elems) : 0, std::numeric_limits<acc_t>::quiet_NaN());
  cl::RecurrenceParams<acc_t> rp{};
  rp.table = table;
  rp.special = special;
  rp.skip = skip.data();
  rp.input_lengths = input_lengths;
  rp.target_lengths = target_lengths;
  rp.nll = nll;
  rp.status = status.data();
  for (int d = 0; d < 2; ++d)
    for (int a = 0; a < 2; ++a)
      rp.store[d][a] = (need_grad && a < arrays) ? store.data() + (d * arrays + a) * row_elems : nullptr;
  rp.T = T;
  rp.W = W;
  rp.U_max = U_max;
  rp.store_stride = W + 1;
  rp.max_shift = shift;
  rp.slots_per_cta = cfg.threads * cfg.vt;
  rp.stages = cfg.stages;
  const int dirs = need_grad ? 2 : 1;
  int rc = 0;
  const bool clustered = cfg.cluster > 1;
  switch (cfg.vt * 2 + (clustered ? 1 : 0)) {
    case 2: rc = run_recurrence<acc_t, MODE, 1, false>(rp, B, dirs, cfg); break;
    case 3: rc = run_recurrence<acc_t, MODE, 1, true>(rp, B, dirs, cfg); break;
    case 4: rc = run_recurrence<acc_t, MODE, 2, false>(rp, B, dirs, cfg); break;
    case 5: rc = run_recurrence<acc_t, MODE, 2, true>(rp, B, dirs, cfg); break;
    case 8: rc = run_recurrence<acc_t, MODE, 4, false>(rp, B, dirs, cfg); break;
    case 9: rc = run_recurrence<acc_t, MODE, 4, true>(rp, B, dirs, cfg); break;
    case 16: rc = run_recurrence<acc_t, MODE, 8, false>(rp, B, dirs, cfg); break;
    case 17: rc = run_recurrence<acc_t, MODE, 8, true>(rp, B, dirs, cfg); break;
    default: return 2;
  }
  if (rc != 0) return rc;
  for (int64_t b = 0; b < B; ++b)
    if (status[b] < 0) return 5;  // some row got no status
  if (!need_grad || T == 0) return 0;
  cl::PosteriorParams<acc_t> pp{};
  pp.table = table;
  pp.special = special;
  pp.input_lengths = input_lengths;
  pp.target_lengths = target_lengths;
  pp.nll = nll;
  pp.status = status.data();
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
  return run_posteriors<acc_t, MODE>(pp, cfg);
}

}  // namespace emulator
}  // namespace mdlm_ctc

#if defined(MDLM_CTC_EMULATOR_API)
// C entry point for ctypes. Returns 0 on success; 1 deadlock, 2 bad configuration, 3 named-barrier count
// mismatch, 4 DSMEM address out of range, 5 a row without a status.
extern "C" int mdlm_ctc_emulate_lattice_band(int is_double, void* table, void* special, const int64_t* targets,
                                             const int64_t* input_lengths, const int64_t* target_lengths, int64_t B,
                                             int64_t T, int64_t W, int64_t U_max, int mode, int64_t max_shift,
                                             int need_grad, void* nll, int cluster, int threads, int vt, int stages,
                                             int lazy_copies, int shuffle, uint64_t seed) {
  using namespace mdlm_ctc;
  if (threads <= 0 || threads % cuda_lattice::kWarpSize || threads > cuda_lattice::kMaxThreads) return 2;
  if (stages < 2 || stages > cuda_lattice::kMaxStages || cluster < 1 || cluster > cuda_lattice::kMaxCluster) return 2;
  const emulator::Config cfg{cluster, threads, vt, stages, lazy_copies != 0, shuffle != 0, seed};
  if (is_double) {
    auto* t = static_cast<double*>(table);
    auto* s = static_cast<double*>(special);
    auto* n = static_cast<double*>(nll);
    return mode == kPreserve ? emulator::lattice_band<double, kPreserve>(t, s, targets, input_lengths, target_lengths,
                                                                         B, T, W, U_max, max_shift, need_grad, n, cfg)
                             : emulator::lattice_band<double, kStandard>(t, s, targets, input_lengths, target_lengths,
                                                                         B, T, W, U_max, max_shift, need_grad, n, cfg);
  }
  auto* t = static_cast<float*>(table);
  auto* s = static_cast<float*>(special);
  auto* n = static_cast<float*>(nll);
  return mode == kPreserve ? emulator::lattice_band<float, kPreserve>(t, s, targets, input_lengths, target_lengths, B,
                                                                      T, W, U_max, max_shift, need_grad, n, cfg)
                           : emulator::lattice_band<float, kStandard>(t, s, targets, input_lengths, target_lengths, B,
                                                                      T, W, U_max, max_shift, need_grad, n, cfg);
}
#endif
