// Host emulator of the CUDA execution model used by lattice_cuda.cuh, for testing the CUDA lattice on
// machines without a GPU (tests/cuda_emulator.py builds it with the host C++ compiler and calls it
// through ctypes). It runs the very same `recurrence_pass` and `posterior_row` code as the GPU kernels,
// every CUDA thread a user-level fiber, and it promises no more than the hardware does for the
// patterns the kernel uses:
//   * scheduling: a seeded random runnable fiber runs until it blocks at a barrier or shuffle, or is
//     preempted at a random shared-memory access; so a thread runs ahead into the next phase as far
//     as the barriers let it, and every CTA of the grid (all rows, both directions) interleaves;
//   * barriers: one counter per named barrier (bar.sync id, count completes when `count` threads have
//     arrived), __syncthreads_or counts the threads that have not exited, the cluster barrier counts
//     the cluster's; each orders memory between its participants only (vector clocks);
//   * shared and distributed shared memory is checked word by word: a read that is not ordered after
//     the last write of another thread by a barrier is a data race (it returns the stale value), a
//     write that is not ordered after another thread's read or write is one too; reads of memory no
//     one wrote are errors;
//   * cp.async: the destination is in flight (poisoned, and any read is an error) from the issue to
//     the wait that retires its group; the write then counts as the issuing thread's, at that wait;
//   * shuffles exchange values among the lanes of their mask only and order no memory; a lane outside
//     the mask, or a source lane outside it, is an error;
//   * a CTA's shared memory is poisoned when its last thread exits: a later DSMEM access is an error,
//     and so is a DSMEM read or write of another CTA that no barrier ordered before the exit.
// Numerics are those of the host build of logspace.h (the CPU kernels' exp/log), not CUDA's.
//
// Build (Linux, any C++17 compiler): c++ -O1 -std=c++17 -shared -fPIC -fvisibility=hidden -x c++ -DMDLM_CTC_EMULATOR_API
//   -Icsrc csrc/lattice_cuda_emulator.h -o emulator.so
// MDLM_EMU_VT=v / MDLM_EMU_STAGES=s / MDLM_EMU_FLOAT_ONLY restrict the instantiations (fast builds of
// the mutation tests).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "lattice_cuda.cuh"
#include "lattice_cuda_plan.h"

namespace mdlm_ctc {
namespace emulator {

enum Error : int {
  kOk = 0,
  kDeadlock = 1,
  kBadConfig = 2,
  kBarrierCount = 3,
  kOutOfRange = 4,
  kNoStatus = 5,
  kRace = 6,
  kCopyInFlight = 7,
  kExitedCta = 8,
  kShuffleMask = 9,
  kUninitialised = 10,
};

// The first violation (code and a sentence) and how many there were.
struct Report {
  int code = kOk;
  int64_t count = 0;
  std::string what;
  void fail(int c, const std::string& message) {
    if (code == kOk) {
      code = c;
      what = message;
    }
    ++count;
  }
};

// ---- fibers ----------------------------------------------------------------------------------

class Scheduler {
 public:
  Scheduler(uint64_t seed, int preempt_permille) : rng_(seed), preempt_(preempt_permille) {}

  int spawn(std::function<void()> body) {
    auto fiber = std::make_unique<Fiber>();
    fiber->body = std::move(body);
    fiber->stack.reset(new char[kStackBytes]);
    getcontext(&fiber->ctx);
    fiber->ctx.uc_stack.ss_sp = fiber->stack.get();
    fiber->ctx.uc_stack.ss_size = kStackBytes;
    fiber->ctx.uc_link = &main_;
    const int id = int(fibers_.size());
    makecontext(&fiber->ctx, reinterpret_cast<void (*)()>(&Scheduler::trampoline), 1, id);
    fibers_.push_back(std::move(fiber));
    make_runnable(id);
    return id;
  }

  void on_exit(std::function<void(int)> hook) { exit_hook_ = std::move(hook); }

  // Runs until no fiber can move; false if some fiber never finished (a deadlock).
  bool run() {
    Scheduler* outer = active_;
    active_ = this;
    while (!runnable_.empty()) {
      current_ = runnable_[std::uniform_int_distribution<size_t>(0, runnable_.size() - 1)(rng_)];
      swapcontext(&main_, &fibers_[current_]->ctx);
    }
    active_ = outer;
    for (const auto& f : fibers_)
      if (!f->done) return false;
    return true;
  }

  int current() const { return current_; }
  // the running fiber waits until some other fiber calls wake() for it
  void block() {
    make_blocked(current_);
    swapcontext(&fibers_[current_]->ctx, &main_);
  }
  void wake(int id) { make_runnable(id); }
  // a preemption point: with the configured probability another runnable fiber runs first
  void maybe_preempt() {
    if (preempt_ > 0 && std::uniform_int_distribution<int>(0, 999)(rng_) < preempt_)
      swapcontext(&fibers_[current_]->ctx, &main_);
  }

 private:
  static constexpr size_t kStackBytes = 128 * 1024;  // untouched pages are never resident
  struct Fiber {
    ucontext_t ctx;
    std::unique_ptr<char[]> stack;
    std::function<void()> body;
    bool done = false;
    int slot = -1;  // position in runnable_, -1 when blocked or done
  };
  void make_runnable(int id) {
    Fiber& f = *fibers_[id];
    if (f.slot >= 0 || f.done) return;
    f.slot = int(runnable_.size());
    runnable_.push_back(id);
  }
  void make_blocked(int id) {
    Fiber& f = *fibers_[id];
    if (f.slot < 0) return;
    const int last = runnable_.back();
    runnable_[f.slot] = last;
    fibers_[last]->slot = f.slot;
    runnable_.pop_back();
    f.slot = -1;
  }
  static void trampoline(int id) {
    Scheduler* self = active_;
    self->fibers_[id]->body();
    self->make_blocked(id);
    self->fibers_[id]->done = true;
    if (self->exit_hook_) self->exit_hook_(id);
  }  // returns to uc_link = main_

  static inline thread_local Scheduler* active_ = nullptr;
  ucontext_t main_;
  std::vector<std::unique_ptr<Fiber>> fibers_;
  std::vector<int> runnable_;
  int current_ = -1;
  std::mt19937_64 rng_;
  int preempt_;
  std::function<void(int)> exit_hook_;
};

// ---- memory, barriers, warps ------------------------------------------------------------------

// Shadow state of one 4-byte word of shared memory. Thread ids are ranks within the cluster.
struct Cell {
  int32_t writer = -1;     // last writer, -1: never written
  uint32_t epoch = 0;      // the writer's own clock at that write
  int32_t in_flight = -1;  // the thread whose cp.async to this word has not been waited for
  uint64_t stale = 0;      // the value before the last write (what an unordered reader sees)
  std::vector<std::pair<int32_t, uint32_t>> reads;  // (reader, its clock) since the last write
};

struct Arrival {
  int thread, fiber;
  bool* result;
};

struct Barrier {
  int declared = -1;  // the count of the first arrival of the current instance
  bool any = false;
  std::vector<Arrival> arrivals;
};

struct Exchange {
  uint64_t value[32] = {};
  unsigned arrived = 0, taken = 0;
  std::vector<int> waiters;
};

struct Warp {
  std::map<std::pair<unsigned, uint64_t>, Exchange> open;  // (mask, sequence number) -> exchange
  std::map<unsigned, uint64_t> sequence[32];               // per lane, per mask
};

struct Cta {
  std::vector<unsigned char> storage;
  unsigned char* smem = nullptr;
  int64_t bytes = 0;
  std::vector<Cell> shadow;
  Barrier named[16];
  std::vector<Warp> warps;
  int live = 0;
  bool exited = false;
  std::vector<uint32_t> exit_clock;  // join of the clocks of its exited threads
  Cta(int threads, int64_t smem_bytes)
      : storage(size_t(smem_bytes) + 64, 0xff), bytes(smem_bytes), shadow(size_t(smem_bytes + 3) / 4),
        warps(size_t(threads + 31) / 32), live(threads) {
    smem = storage.data() + (64 - reinterpret_cast<uintptr_t>(storage.data()) % 64) % 64;
  }
};

struct Cluster {
  int threads_per_cta = 0, size = 0;
  std::vector<std::unique_ptr<Cta>> ctas;
  std::vector<uint32_t> clocks;  // [threads][threads] vector clocks
  Barrier barrier;
  int live = 0;
  Cluster(int ctas_, int threads, int64_t smem_bytes)
      : threads_per_cta(threads), size(ctas_ * threads), live(ctas_ * threads) {
    for (int r = 0; r < ctas_; ++r) ctas.push_back(std::make_unique<Cta>(threads, smem_bytes));
    clocks.assign(size_t(size) * size, 0);
    for (int t = 0; t < size; ++t) clocks[size_t(t) * size + t] = 1;
  }
  uint32_t* clock(int t) { return clocks.data() + size_t(t) * size; }
  // a barrier instance completes: its participants' clocks become their join, then each advances its own
  void release(Scheduler& s, Barrier& bar) {
    std::vector<uint32_t> join(size_t(size), 0);
    for (const Arrival& a : bar.arrivals) {
      const uint32_t* c = clock(a.thread);
      for (int i = 0; i < size; ++i) join[i] = std::max(join[i], c[i]);
    }
    for (const Arrival& a : bar.arrivals) {
      uint32_t* c = clock(a.thread);
      std::copy(join.begin(), join.end(), c);
      c[a.thread] += 1;
      *a.result = bar.any;
      s.wake(a.fiber);
    }
    bar.arrivals.clear();
    bar.any = false;
    bar.declared = -1;
  }
};

template <typename T>
T poison() {
  if constexpr (std::is_floating_point_v<T>)
    return std::numeric_limits<T>::quiet_NaN();
  else
    return T(-1);
}

// ---- the execution model the kernel code is written against (CudaDev on the GPU) -------------

class EmuDev {
 public:
  EmuDev(Scheduler& s, Cluster& cluster, Report& report, int rank, int tid, int threads, int64_t row, int dir,
         bool use_cluster, bool lazy)
      : s_(s), cluster_(cluster), report_(report), cta_(*cluster.ctas[rank]), rank_(rank), tid_(tid),
        threads_(threads), me_(rank * threads + tid), row_(row), dir_(dir), use_cluster_(use_cluster),
        lazy_(lazy) {}
  int fiber = -1;

  int thread_rank() const { return tid_; }
  int block_size() const { return threads_; }
  int cluster_rank() const { return use_cluster_ ? rank_ : 0; }
  int cluster_size() const { return use_cluster_ ? int(cluster_.ctas.size()) : 1; }
  int64_t row() const { return row_; }
  int direction() const { return dir_; }

  // __syncthreads_or: barrier 0 over the CTA's threads that have not exited
  bool syncthreads_or(bool pred) { return arrive(cta_.named[0], -1, pred, false); }
  // bar.sync id, count
  void bar_sync(int id, int count) {
    if (id < 0 || id >= 16 || count <= 0 || count % 32 != 0 || count > threads_) {
      report_.fail(kBarrierCount, "bar.sync " + std::to_string(id) + ", " + std::to_string(count) +
                                      ": the count must be a positive multiple of 32 within the CTA");
      return;
    }
    arrive(cta_.named[id], count, false, false);
  }
  // barrier.cluster.arrive (release) + barrier.cluster.wait (acquire) over every thread of the cluster
  void cluster_sync() { arrive(cluster_.barrier, -1, false, true); }

  template <typename T>
  T shfl(unsigned mask, T v, int src) {
    return shuffle(mask, v, src);
  }
  template <typename T>
  T shfl_up(unsigned mask, T v, int delta) {
    const int lane = tid_ % 32;
    return shuffle(mask, v, lane - delta >= 0 ? lane - delta : lane);
  }
  template <typename T>
  T shfl_down(unsigned mask, T v, int delta) {
    const int lane = tid_ % 32;
    return shuffle(mask, v, lane + delta < 32 ? lane + delta : lane);
  }
  template <typename T>
  T shfl_xor(unsigned mask, T v, int lane_mask) {
    return shuffle(mask, v, (tid_ % 32) ^ lane_mask);
  }

  template <typename T>
  T ld(const T* p) {
    return read(cta_, p, "shared");
  }
  template <typename T>
  void st(T* p, T v) {
    write(cta_, p, v);
  }
  // mapa: `local`'s word in CTA `rank` of the cluster
  template <typename T>
  T* map_remote(T* local, int rank) {
    if (rank < 0 || rank >= int(cluster_.ctas.size())) {
      report_.fail(kOutOfRange, "DSMEM address of cluster rank " + std::to_string(rank));
      return local;
    }
    const int64_t offset = reinterpret_cast<unsigned char*>(local) - cta_.smem;
    return reinterpret_cast<T*>(cluster_.ctas[size_t(rank)]->smem + offset);
  }
  // st.shared::cluster through a map_remote address
  template <typename T>
  void st_remote(T* remote, T v) {
    for (auto& other : cluster_.ctas) {
      const int64_t offset = reinterpret_cast<unsigned char*>(remote) - other->smem;
      if (offset >= 0 && offset < other->bytes) {
        write(*other, remote, v);
        return;
      }
    }
    report_.fail(kOutOfRange, "DSMEM store outside the cluster's shared memory");
  }

  template <typename T>
  void copy_async(T* dst, const T* src) {
    if (!lazy_) {
      write(cta_, dst, *src);
      return;
    }
    Cell* c = check_write(cta_, dst, sizeof(T));
    if (c == nullptr) return;
    T bad = poison<T>();
    std::memcpy(dst, &bad, sizeof(T));
    c->in_flight = me_;
    open_.push_back({dst, src, sizeof(T)});
  }
  void commit() {
    groups_.push_back(std::move(open_));
    open_.clear();
  }
  template <int N>
  void wait_prior() {
    while (int(groups_.size()) > N) {
      for (const Copy& copy : groups_.front()) {
        Cell& c = cta_.shadow[size_t(static_cast<unsigned char*>(copy.dst) - cta_.smem) / 4];
        std::memcpy(&c.stale, copy.dst, copy.bytes);
        std::memcpy(copy.dst, copy.src, copy.bytes);
        c.in_flight = -1;
        c.writer = me_;
        c.epoch = cluster_.clock(me_)[me_];
        c.reads.clear();
      }
      groups_.erase(groups_.begin());
    }
  }

  // the fiber's thread has exited
  void exited() {
    const uint32_t* mine = cluster_.clock(me_);
    cta_.exit_clock.resize(size_t(cluster_.size), 0);
    for (int i = 0; i < cluster_.size; ++i) cta_.exit_clock[i] = std::max(cta_.exit_clock[i], mine[i]);
    --cta_.live;
    --cluster_.live;
    if (!cta_.named[0].arrivals.empty() && int(cta_.named[0].arrivals.size()) >= cta_.live)
      cluster_.release(s_, cta_.named[0]);
    if (!cluster_.barrier.arrivals.empty() && int(cluster_.barrier.arrivals.size()) >= cluster_.live)
      cluster_.release(s_, cluster_.barrier);
    if (cta_.live == 0) {  // the CTA's shared memory goes away
      // every DSMEM read of another CTA must be ordered before that (a cluster barrier), or on the GPU it
      // may come after it, whatever order it had here
      for (const Cell& c : cta_.shadow)
        for (const auto& r : c.reads)
          if (r.first / cluster_.threads_per_cta != rank_ && cta_.exit_clock[size_t(r.first)] < r.second)
            report_.fail(kExitedCta, "DSMEM read by thread " + std::to_string(r.first) +
                                         " not ordered before the exit of the CTA it reads (rank " +
                                         std::to_string(rank_) + ")");
      // and so must every DSMEM write into it
      for (const Cell& c : cta_.shadow)
        if (c.writer >= 0 && c.writer / cluster_.threads_per_cta != rank_ &&
            cta_.exit_clock[size_t(c.writer)] < c.epoch)
          report_.fail(kExitedCta, "DSMEM write by thread " + std::to_string(c.writer) +
                                       " not ordered before the exit of the CTA it writes (rank " +
                                       std::to_string(rank_) + ")");
      cta_.exited = true;
      std::memset(cta_.smem, 0xff, size_t(cta_.bytes));
    }
  }

 private:
  bool arrive(Barrier& bar, int count, bool pred, bool cluster_scope) {
    s_.maybe_preempt();
    if (count > 0) {
      if (bar.declared >= 0 && bar.declared != count)
        report_.fail(kBarrierCount, "threads arrive at one named barrier with counts " +
                                        std::to_string(bar.declared) + " and " + std::to_string(count));
      bar.declared = count;
    }
    bool result = false;
    bar.arrivals.push_back({me_, fiber, &result});
    bar.any |= pred;
    const int expected = count > 0 ? count : (cluster_scope ? cluster_.live : cta_.live);
    if (int(bar.arrivals.size()) >= expected)
      cluster_.release(s_, bar);
    else
      s_.block();
    return result;
  }

  Cell* cell_of(Cta& cta, const void* p, size_t bytes, const char* what) {
    const int64_t offset = static_cast<const unsigned char*>(p) - cta.smem;
    if (offset < 0 || offset + int64_t(bytes) > cta.bytes || offset % int64_t(bytes) != 0) {
      report_.fail(kOutOfRange, std::string(what) + " access at byte offset " + std::to_string(offset) +
                                    " outside the " + std::to_string(cta.bytes) + " bytes of shared memory");
      return nullptr;
    }
    if (cta.exited) {
      report_.fail(kExitedCta, std::string(what) + " access to the shared memory of a CTA that has exited");
      return nullptr;
    }
    return &cta.shadow[size_t(offset) / 4];
  }
  bool ordered_after(int other, uint32_t epoch) { return other == me_ || cluster_.clock(me_)[other] >= epoch; }

  template <typename T>
  T read(Cta& cta, const T* p, const char* what) {
    s_.maybe_preempt();
    Cell* c = cell_of(cta, p, sizeof(T), what);
    if (c == nullptr) return poison<T>();
    T out;
    if (c->in_flight >= 0) {
      report_.fail(kCopyInFlight, std::string(what) + " read by thread " + std::to_string(me_) +
                                      " of a word whose cp.async (thread " + std::to_string(c->in_flight) +
                                      ") has not been waited for");
      return poison<T>();
    }
    if (c->writer < 0) {
      report_.fail(kUninitialised, std::string(what) + " read of a word no thread wrote");
      return poison<T>();
    }
    if (!ordered_after(c->writer, c->epoch)) {
      report_.fail(kRace, std::string(what) + " read by thread " + std::to_string(me_) +
                              " not ordered after the write of thread " + std::to_string(c->writer));
      std::memcpy(&out, &c->stale, sizeof(T));
    } else {
      std::memcpy(&out, p, sizeof(T));
    }
    const uint32_t now = cluster_.clock(me_)[me_];
    bool seen = false;
    for (auto& r : c->reads)
      if (r.first == me_) {
        r.second = now;
        seen = true;
      }
    if (!seen) c->reads.push_back({me_, now});
    return out;
  }

  Cell* check_write(Cta& cta, const void* p, size_t bytes) {
    s_.maybe_preempt();
    Cell* c = cell_of(cta, p, bytes, "shared");
    if (c == nullptr) return nullptr;
    if (c->in_flight >= 0)
      report_.fail(kRace, "write by thread " + std::to_string(me_) + " to a word with a cp.async in flight");
    if (c->writer >= 0 && !ordered_after(c->writer, c->epoch))
      report_.fail(kRace, "write by thread " + std::to_string(me_) + " not ordered after the write of thread " +
                              std::to_string(c->writer));
    for (const auto& r : c->reads)
      if (!ordered_after(r.first, r.second))
        report_.fail(kRace, "write by thread " + std::to_string(me_) + " not ordered after the read of thread " +
                                std::to_string(r.first));
    return c;
  }

  template <typename T>
  void write(Cta& cta, T* p, T v) {
    Cell* c = check_write(cta, p, sizeof(T));
    if (c == nullptr) return;
    c->stale = 0;
    std::memcpy(&c->stale, p, sizeof(T));
    std::memcpy(p, &v, sizeof(T));
    c->writer = me_;
    c->epoch = cluster_.clock(me_)[me_];
    c->reads.clear();
  }

  template <typename T>
  T shuffle(unsigned mask, T v, int src) {
    static_assert(sizeof(T) <= 8, "shuffled values are at most 8 bytes");
    s_.maybe_preempt();
    const int lane = tid_ % 32;
    Warp& warp = cta_.warps[size_t(tid_ / 32)];
    if (!((mask >> lane) & 1u)) {
      report_.fail(kShuffleMask, "lane " + std::to_string(lane) + " shuffles with a mask that excludes it");
      return poison<T>();
    }
    const std::pair<unsigned, uint64_t> key{mask, warp.sequence[lane][mask]++};
    {
      Exchange& x = warp.open[key];
      std::memcpy(&x.value[lane], &v, sizeof(T));
      x.arrived |= 1u << lane;
      if (x.arrived != mask) {
        x.waiters.push_back(fiber);
        s_.block();
      } else {
        for (int f : x.waiters) s_.wake(f);
      }
    }
    Exchange& x = warp.open[key];
    T out = v;
    if (src < 0 || src >= 32 || !((mask >> src) & 1u)) {
      report_.fail(kShuffleMask, "lane " + std::to_string(lane) + " reads lane " + std::to_string(src) +
                                     ", outside the shuffle's mask");
      out = poison<T>();
    } else {
      std::memcpy(&out, &x.value[src], sizeof(T));
    }
    x.taken |= 1u << lane;
    if (x.taken == mask) warp.open.erase(key);
    return out;
  }

  struct Copy {
    void* dst;
    const void* src;
    size_t bytes;
  };
  Scheduler& s_;
  Cluster& cluster_;
  Report& report_;
  Cta& cta_;
  int rank_, tid_, threads_, me_;
  int64_t row_;
  int dir_;
  bool use_cluster_, lazy_;
  std::vector<Copy> open_;
  std::vector<std::vector<Copy>> groups_;
};

struct Config {
  int cluster, threads, vt, stages;
  bool lazy;
  int preempt_permille;
  uint64_t seed;
};

// One grid of the recurrence kernel: every (row, direction) cluster at once, interleaved.
template <typename acc_t, int MODE, int VT, int STAGES, bool CLUSTER>
void run_recurrence(const cuda_lattice::RecurrenceParams<acc_t>& p, int64_t B, int dirs, const Config& cfg,
                    Report& report) {
  const cuda_lattice::SmemLayout layout = cuda_lattice::smem_layout(MODE, sizeof(acc_t), cfg.threads, VT, p.U_max);
  const int64_t smem = layout.total(STAGES);
  const int ctas = CLUSTER ? cfg.cluster : 1;
  Scheduler s(cfg.seed, cfg.preempt_permille);
  std::vector<std::unique_ptr<Cluster>> clusters;
  std::vector<std::unique_ptr<EmuDev>> devs;
  for (int dir = 0; dir < dirs; ++dir)
    for (int64_t b = 0; b < B; ++b) {
      clusters.push_back(std::make_unique<Cluster>(ctas, cfg.threads, smem));
      Cluster& cluster = *clusters.back();
      for (int r = 0; r < ctas; ++r)
        for (int tid = 0; tid < cfg.threads; ++tid) {
          devs.push_back(
              std::make_unique<EmuDev>(s, cluster, report, r, tid, cfg.threads, b, dir, CLUSTER, cfg.lazy));
          EmuDev* dev = devs.back().get();
          unsigned char* mem = cluster.ctas[r]->smem;
          dev->fiber = s.spawn(
              [&p, dev, mem] { cuda_lattice::recurrence<acc_t, MODE, VT, STAGES, CLUSTER>(p, mem, *dev); });
        }
    }
  s.on_exit([&devs](int fiber) { devs[size_t(fiber)]->exited(); });
  if (!s.run()) report.fail(kDeadlock, "the recurrence kernel deadlocked (some thread waits forever)");
}

template <typename acc_t, int MODE>
void run_posteriors(const cuda_lattice::PosteriorParams<acc_t>& p, const Config& cfg, Report& report) {
  constexpr int kWarps = 8, kThreads = kWarps * 32;
  const int64_t frames = p.B * p.T;
  uint64_t seed = cfg.seed + 7919;
  for (int64_t first = 0; first < frames && report.code == kOk; first += kWarps) {
    Cluster cluster(1, kThreads, 16);
    Scheduler s(seed++, cfg.preempt_permille);
    std::vector<std::unique_ptr<EmuDev>> devs;
    for (int tid = 0; tid < kThreads; ++tid) {
      const int64_t frame = first + tid / 32;
      devs.push_back(std::make_unique<EmuDev>(s, cluster, report, 0, tid, kThreads, 0, 0, false, false));
      EmuDev* dev = devs.back().get();
      const int lane = tid % 32;
      dev->fiber = s.spawn([&p, dev, frame, frames, lane] {
        if (frame < frames) cuda_lattice::posterior_row<acc_t, MODE>(p, frame / p.T, frame % p.T, lane, *dev);
      });
    }
    s.on_exit([&devs](int fiber) { devs[size_t(fiber)]->exited(); });
    if (!s.run()) report.fail(kDeadlock, "the posterior kernel deadlocked");
  }
}

template <int VT, int STAGES>
constexpr bool instantiated() {
#if defined(MDLM_EMU_VT)
  if (VT != MDLM_EMU_VT) return false;
#endif
#if defined(MDLM_EMU_STAGES)
  if (STAGES != MDLM_EMU_STAGES) return false;
#endif
  return true;
}

template <typename acc_t, int MODE, int VT, int STAGES>
bool run_if(const cuda_lattice::RecurrenceParams<acc_t>& p, int64_t B, int dirs, const Config& cfg, Report& r) {
  if constexpr (instantiated<VT, STAGES>()) {
    if (cfg.cluster > 1)
      run_recurrence<acc_t, MODE, VT, STAGES, true>(p, B, dirs, cfg, r);
    else
      run_recurrence<acc_t, MODE, VT, STAGES, false>(p, B, dirs, cfg, r);
    return true;
  }
  return false;
}

template <typename acc_t, int MODE, int VT>
bool run_vt(const cuda_lattice::RecurrenceParams<acc_t>& p, int64_t B, int dirs, const Config& cfg, Report& r) {
  switch (cfg.stages) {
    case 2: return run_if<acc_t, MODE, VT, 2>(p, B, dirs, cfg, r);
    case 4: return run_if<acc_t, MODE, VT, 4>(p, B, dirs, cfg, r);
    case 8: return run_if<acc_t, MODE, VT, 8>(p, B, dirs, cfg, r);
    default: return false;
  }
}

template <typename acc_t, int MODE>
int lattice_band(acc_t* table, acc_t* special, const int64_t* targets, const int64_t* input_lengths,
                 const int64_t* target_lengths, int64_t B, int64_t T, int64_t W, int64_t U_max, int64_t max_shift,
                 bool need_grad, acc_t* nll, const Config& cfg, Report& report) {
  namespace cl = cuda_lattice;
  const int arrays = MODE == kPreserve ? 1 : 2;
  const int64_t shift = MODE == kPreserve ? max_shift : -1;
  std::vector<int32_t> status(size_t(B), -1);
  std::vector<float> skip(size_t(B * (U_max + 2)));
  for (int64_t i = 0; i < int64_t(skip.size()); ++i)
    skip[size_t(i)] = cl::skip_value(targets, target_lengths, U_max, i / (U_max + 2), i % (U_max + 2));
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
  const int dirs = need_grad ? 2 : 1;
  bool known = false;
  switch (cfg.vt) {
    case 1: known = run_vt<acc_t, MODE, 1>(rp, B, dirs, cfg, report); break;
    case 2: known = run_vt<acc_t, MODE, 2>(rp, B, dirs, cfg, report); break;
    case 4: known = run_vt<acc_t, MODE, 4>(rp, B, dirs, cfg, report); break;
    case 8: known = run_vt<acc_t, MODE, 8>(rp, B, dirs, cfg, report); break;
    default: break;
  }
  if (!known) {
    report.fail(kBadConfig, "no emulated kernel for VT=" + std::to_string(cfg.vt) + ", " +
                                std::to_string(cfg.stages) + " stages in this build");
    return report.code;
  }
  if (report.code != kOk) return report.code;
  for (int64_t b = 0; b < B; ++b)
    if (status[size_t(b)] < 0) report.fail(kNoStatus, "row " + std::to_string(b) + " got no status");
  if (report.code != kOk || !need_grad || T == 0) return report.code;
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
  run_posteriors<acc_t, MODE>(pp, cfg, report);
  return report.code;
}

}  // namespace emulator
}  // namespace mdlm_ctc

#if defined(MDLM_CTC_EMULATOR_API)
// built with -fvisibility=hidden: several builds (the mutation tests') live in one process
#define MDLM_EMU_API __attribute__((visibility("default")))
namespace {
thread_local std::string last_error;
}

// C entry points for ctypes. mdlm_ctc_emulate_lattice_band returns an emulator::Error (0 on success);
// mdlm_ctc_emulator_last_error says what the first violation of the last call was.
extern "C" MDLM_EMU_API const char* mdlm_ctc_emulator_last_error() { return last_error.c_str(); }

extern "C" MDLM_EMU_API int mdlm_ctc_emulate_lattice_band(int is_double, void* table, void* special, const int64_t* targets,
                                             const int64_t* input_lengths, const int64_t* target_lengths, int64_t B,
                                             int64_t T, int64_t W, int64_t U_max, int mode, int64_t max_shift,
                                             int need_grad, void* nll, int cluster, int threads, int vt, int stages,
                                             int lazy_copies, int preempt_permille, uint64_t seed) {
  using namespace mdlm_ctc;
  last_error.clear();
  if (threads <= 0 || threads % cuda_lattice::kWarpSize || threads > cuda_lattice::kMaxThreads || cluster < 1 ||
      cluster > cuda_lattice::kMaxCluster || T >= (int64_t(1) << 31) || U_max >= (int64_t(1) << 31)) {
    last_error = "bad configuration";
    return emulator::kBadConfig;
  }
  const emulator::Config cfg{cluster, threads, vt, stages, lazy_copies != 0, preempt_permille, seed};
  emulator::Report report;
  int rc;
  if (is_double) {
#if defined(MDLM_EMU_FLOAT_ONLY)
    last_error = "this build has no float64 kernels";
    return emulator::kBadConfig;
#else
    auto* t = static_cast<double*>(table);
    auto* s = static_cast<double*>(special);
    auto* n = static_cast<double*>(nll);
    rc = mode == kPreserve ? emulator::lattice_band<double, kPreserve>(t, s, targets, input_lengths, target_lengths,
                                                                       B, T, W, U_max, max_shift, need_grad, n, cfg,
                                                                       report)
                           : emulator::lattice_band<double, kStandard>(t, s, targets, input_lengths, target_lengths,
                                                                       B, T, W, U_max, max_shift, need_grad, n, cfg,
                                                                       report);
#endif
  } else {
    auto* t = static_cast<float*>(table);
    auto* s = static_cast<float*>(special);
    auto* n = static_cast<float*>(nll);
    rc = mode == kPreserve ? emulator::lattice_band<float, kPreserve>(t, s, targets, input_lengths, target_lengths, B,
                                                                      T, W, U_max, max_shift, need_grad, n, cfg, report)
                           : emulator::lattice_band<float, kStandard>(t, s, targets, input_lengths, target_lengths,
                                                                      B, T, W, U_max, max_shift, need_grad, n, cfg,
                                                                      report);
  }
  if (rc != 0) last_error = report.what + " (" + std::to_string(report.count) + " violations)";
  return rc;
}

// Launch planning (lattice_cuda_plan.h) for the tests: out = [cluster, threads, vt, stages, smem, slots,
// resident, one_wave, error].
extern "C" MDLM_EMU_API void mdlm_ctc_plan_lattice(int64_t W, int64_t U_max, int mode, int64_t acc_bytes, int64_t B,
                                                   int dirs, int sms,
                                      int64_t max_smem_per_block, int cluster_launch, int cluster_code, int forced,
                                      mdlm_ctc::cuda_plan::ResidentFn resident, void* context, int64_t* out) {
  using namespace mdlm_ctc::cuda_plan;
  DeviceLimits dev;
  dev.sms = sms;
  dev.max_smem_per_block = max_smem_per_block;
  dev.cluster_launch = cluster_launch != 0;
  dev.cluster_code = cluster_code != 0;
  const Plan p = plan_lattice(W, U_max, mode, acc_bytes, B, dirs, dev, forced, resident, context);
  const int64_t values[] = {p.cluster, p.threads, p.vt, p.stages, p.smem, p.slots, p.resident, p.one_wave, p.error};
  std::copy(std::begin(values), std::end(values), out);
}

extern "C" MDLM_EMU_API int mdlm_ctc_plan_launch_bounds(int mode, int vt) {
  return mdlm_ctc::cuda_plan::max_threads_for_vt(mode, vt);
}
#endif
