// The runtime of the CUDA lattice's host emulator (lattice_cuda_emulator.h says what it promises):
// fibers and their scheduler, clusters, CTAs and threads, the checked memory model (shared, DSMEM and
// global), barriers, shuffles and cp.async. It knows nothing of the kernel: the kernel side
// (lattice_cuda_emulator.cpp) registers its instantiations and launches them, so this file is compiled
// once and linked with every build of the kernel side (the mutation tests build dozens).
//
// Fibers start on their own stack through ucontext (makecontext + one swapcontext) and switch with
// _setjmp/_longjmp afterwards: swapcontext saves and restores the signal mask with a system call at every
// switch, which was most of the emulator's time.
#undef _FORTIFY_SOURCE  // longjmp_chk refuses jumps between stacks, which is all these jumps do
#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "lattice_cuda_emulator.h"

namespace mdlm_ctc {
namespace emulator {
namespace {

// ---- fibers ----------------------------------------------------------------------------------

class Scheduler {
 public:
  Scheduler(uint64_t seed, int preempt_permille) : rng_(seed), preempt_(preempt_permille) {}

  // A new fiber; it runs once start() made it runnable (spawn(body, true) at once).
  int spawn(std::function<void()> body, bool runnable) {
    auto fiber = std::make_unique<Fiber>();
    fiber->body = std::move(body);
    fiber->stack.reset(new char[kStackBytes]);
    getcontext(&fiber->ctx);
    fiber->ctx.uc_stack.ss_sp = fiber->stack.get();
    fiber->ctx.uc_stack.ss_size = kStackBytes;
    fiber->ctx.uc_link = nullptr;  // the trampoline never returns
    const int id = int(fibers_.size());
    makecontext(&fiber->ctx, reinterpret_cast<void (*)()>(&Scheduler::trampoline), 1, id);
    fibers_.push_back(std::move(fiber));
    if (runnable) make_runnable(id);
    return id;
  }

  void on_exit(std::function<void(int)> hook) { exit_hook_ = std::move(hook); }

  // Runs until no fiber can move; false if some fiber never finished (a deadlock, or halt()).
  bool run() {
    Scheduler* outer = active_;
    active_ = this;
    while (!runnable_.empty() && !halted_) {
      current_ = runnable_[std::uniform_int_distribution<size_t>(0, runnable_.size() - 1)(rng_)];
      Fiber& f = *fibers_[current_];
      if (_setjmp(main_) == 0) {
        if (f.started) {
          _longjmp(f.jump, 1);
        } else {
          f.started = true;
          ucontext_t here;
          swapcontext(&here, &f.ctx);  // never comes back here: the fiber jumps to main_
        }
      }
    }
    active_ = outer;
    for (const auto& f : fibers_)
      if (!f->done) return false;
    return true;
  }

  int current() const { return current_; }
  bool halted() const { return halted_; }
  // the running fiber waits until some other fiber calls wake() for it
  void block() {
    make_blocked(current_);
    yield();
  }
  void wake(int id) { make_runnable(id); }
  // a preemption point: with the configured probability another runnable fiber runs first
  void maybe_preempt() {
    if (preempt_ > 0 && std::uniform_int_distribution<int>(0, 999)(rng_) < preempt_) yield();
  }
  // stop scheduling (a runaway kernel): the running fiber never resumes
  void halt() {
    halted_ = true;
    yield();
  }
  uint64_t draw() { return rng_(); }

 private:
  static constexpr size_t kStackBytes = 128 * 1024;  // untouched pages are never resident
  struct Fiber {
    ucontext_t ctx;
    jmp_buf jump;
    std::unique_ptr<char[]> stack;
    std::function<void()> body;
    bool started = false, done = false;
    int slot = -1;  // position in runnable_, -1 when blocked, not started or done
  };
  // back to the scheduler loop; returns when the fiber is picked again
  void yield() {
    if (_setjmp(fibers_[current_]->jump) == 0) _longjmp(main_, 1);
  }
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
    _longjmp(self->main_, 1);
  }

  static inline thread_local Scheduler* active_ = nullptr;
  jmp_buf main_;
  std::vector<std::unique_ptr<Fiber>> fibers_;
  std::vector<int> runnable_;
  int current_ = -1;
  std::mt19937_64 rng_;
  int preempt_;
  bool halted_ = false;
  std::function<void(int)> exit_hook_;
};

// ---- memory, barriers, warps ------------------------------------------------------------------

// Shadow state of one 4-byte word. Threads are named by their index in the launch (`gid`).
struct Cell {
  int32_t writer = -1;     // last writer in this launch, -1: none (an earlier launch or the host)
  uint32_t epoch = 0;      // the writer's own clock at that write
  int32_t in_flight = -1;  // the thread whose cp.async to this word has not been waited for
  bool defined = false;    // written at all (shared: since the CTA started; global: ever)
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
  int live = 0;                                            // threads that have not exited
};

struct Cta {
  int rank;
  std::vector<unsigned char> storage;
  unsigned char* smem = nullptr;
  int64_t bytes = 0;
  std::vector<Cell> shadow;
  Barrier named[16];
  std::vector<Warp> warps;
  std::vector<int> fibers;
  int live = 0;
  bool started = true, exited = false;
  std::vector<uint32_t> exit_clock;  // join of the clocks of its exited threads
  Cta(int rank_, int threads, int64_t smem_bytes)
      : rank(rank_), storage(size_t(smem_bytes) + 64, 0xff), bytes(smem_bytes),
        shadow(size_t(smem_bytes + 3) / 4), warps(size_t(threads + 31) / 32), live(threads) {
    smem = storage.data() + (64 - reinterpret_cast<uintptr_t>(storage.data()) % 64) % 64;
    for (int t = 0; t < threads; ++t) ++warps[size_t(t / 32)].live;
  }
  bool holds(const void* p) const {
    const auto* c = static_cast<const unsigned char*>(p);
    return c >= smem && c < smem + bytes;
  }
};

struct Cluster {
  int64_t index;
  int threads_per_cta = 0, size = 0;
  std::vector<std::unique_ptr<Cta>> ctas;
  std::vector<uint32_t> clocks;  // [threads][threads] vector clocks
  Barrier barrier;
  int live = 0;
  bool pending_start = false;  // some CTAs have not started
  Cluster(int64_t index_, int ctas_, int threads, int64_t smem_bytes)
      : index(index_), threads_per_cta(threads), size(ctas_ * threads), live(ctas_ * threads) {
    for (int r = 0; r < ctas_; ++r) ctas.push_back(std::make_unique<Cta>(r, threads, smem_bytes));
    clocks.assign(size_t(size) * size, 0);
    for (int t = 0; t < size; ++t) clocks[size_t(t) * size + t] = 1;
  }
  uint32_t* clock(int t) { return clocks.data() + size_t(t) * size; }
};

struct Copy {
  void* dst;
  uint64_t data;
  size_t bytes;
};

struct Thread {
  Cluster* cluster;
  Cta* cta;
  int tid, me;   // index in the CTA, in the cluster
  int64_t gid;   // index in the launch
  int fiber = -1;
  std::vector<Copy> open;
  std::vector<std::vector<Copy>> groups;
};

struct Buffer {
  unsigned char* base;
  size_t bytes;
  std::string name;
  bool writable = false;
  std::vector<char> defined;  // per word
  std::vector<Cell> shadow;   // per word, while writable
};

std::string str(int64_t v) { return std::to_string(v); }

// the registered kernel instantiations
std::map<std::tuple<int, int, int, int, bool>, CtaBody>& registry() {
  static std::map<std::tuple<int, int, int, int, bool>, CtaBody> bodies;
  return bodies;
}

}  // namespace

void register_body(int acc_bytes, int mode, int vt, int stages, bool cluster, CtaBody body) {
  registry()[{acc_bytes, mode, vt, stages, cluster}] = body;
}

CtaBody find_body(int acc_bytes, int mode, int vt, int stages, bool cluster) {
  const auto found = registry().find({acc_bytes, mode, vt, stages, cluster});
  return found == registry().end() ? nullptr : found->second;
}

// ---- the machine: one emulated lattice call -----------------------------------------------------

struct Emulation::Impl {
  Options options;
  int code = kOk;
  int64_t count = 0;
  std::string first, message;
  std::vector<std::unique_ptr<Buffer>> buffers;
  // the launch in progress
  Scheduler* scheduler = nullptr;
  std::vector<std::unique_ptr<Thread>> threads;  // by fiber
  int64_t cluster_threads = 0;
  int cta_threads = 0;
  uint64_t operations = 0;
  // a bound on the work of one wave (~10x the largest test's): a planted endless loop fails, not hangs
  static constexpr uint64_t kMaxOperations = uint64_t(1) << 25;

  static inline thread_local Impl* active = nullptr;

  void fail(int c, const std::string& what) {
    if (code == kOk) {
      code = c;
      first = what;
    }
    ++count;
  }

  Thread& me() { return *threads[size_t(scheduler->current())]; }

  // every memory access and synchronisation: a preemption point, and a bound on the work of a launch
  void step() {
    if (++operations > kMaxOperations) {
      fail(kRunaway, "the kernel ran more than " + str(int64_t(kMaxOperations)) + " operations (an endless loop?)");
      scheduler->halt();
    }
    scheduler->maybe_preempt();
  }

  bool ordered_after(const Thread& t, int64_t gid, uint32_t epoch) {
    if (gid < 0 || gid == t.gid) return true;
    if (gid / cluster_threads != t.cluster->index) return false;  // another cluster: never ordered here
    return t.cluster->clock(t.me)[gid % cluster_threads] >= epoch;
  }
  uint32_t now(const Thread& t) { return t.cluster->clock(t.me)[t.me]; }

  std::string who(const Thread& t) {
    return "thread " + str(t.tid) + " of CTA rank " + str(t.cta->rank) + " (cluster " + str(t.cluster->index) + ")";
  }
  std::string who(int64_t gid) {
    const int64_t cluster = gid / cluster_threads, in = gid % cluster_threads;
    return "thread " + str(in % cta_threads) + " of CTA rank " +
           str(in / cta_threads) + " (cluster " + str(cluster) + ")";
  }

  // ---- locating a word ----

  struct Where {
    Cell* cell = nullptr;
    Cta* cta = nullptr;        // shared memory
    Buffer* buffer = nullptr;  // global memory
    size_t word = 0;
  };

  static std::string space(const Thread& t, const Where& w) {
    return w.cta == nullptr ? w.buffer->name : w.cta == t.cta ? "shared" : "DSMEM";
  }
  static bool defined(const Where& w, size_t bytes) {
    if (w.cta != nullptr) return w.cell->defined;
    for (size_t k = 0; k < (bytes + 3) / 4; ++k)
      if (!w.buffer->defined[w.word + k]) return false;
    return true;
  }

  Where locate(Thread& t, const void* p, size_t bytes, const char* op) {
    Where w;
    const auto* c = static_cast<const unsigned char*>(p);
    for (auto& cta : t.cluster->ctas) {
      if (!cta->holds(p)) continue;
      const int64_t offset = c - cta->smem;
      if (offset + int64_t(bytes) > cta->bytes || offset % int64_t(bytes) != 0) break;
      const bool remote = cta.get() != t.cta;
      if (!cta->started) {
        fail(kNotStarted, std::string(remote ? "DSMEM " : "shared-memory ") + op + " by " + who(t) +
                              " into CTA rank " + str(cta->rank) + " before that CTA started");
        return w;
      }
      if (cta->exited) {
        fail(kExitedCta, std::string(op) + " by " + who(t) + " of the shared memory of CTA rank " + str(cta->rank) +
                             ", which has exited");
        return w;
      }
      w.cta = cta.get();
      w.word = size_t(offset) / 4;
      w.cell = &cta->shadow[w.word];
      return w;
    }
    for (auto& buffer : buffers) {
      if (c < buffer->base || c >= buffer->base + buffer->bytes) continue;
      const int64_t offset = c - buffer->base;
      if (offset + bytes > buffer->bytes || offset % int64_t(bytes) != 0) break;
      w.buffer = buffer.get();
      w.word = size_t(offset) / 4;
      if (buffer->writable) w.cell = &buffer->shadow[w.word];
      return w;
    }
    fail(kOutOfRange, std::string(op) + " by " + who(t) + " of " + str(int64_t(bytes)) +
                          " bytes outside the launch's shared memory and buffers");
    return w;
  }

  // ---- loads and stores ----

  void load(const void* p, void* out, size_t bytes) {
    step();
    Thread& t = me();
    std::memset(out, 0xff, bytes);  // what an erroneous read returns: NaN, or -1
    Where w = locate(t, p, bytes, "load");
    if (w.buffer != nullptr && !w.buffer->writable) {  // a read-only input (or an earlier launch's output)
      if (!defined(w, bytes))
        fail(kUninitialised, "load by " + who(t) + " of " + w.buffer->name + " word " + str(int64_t(w.word)) +
                                 ", which no kernel wrote");
      else
        std::memcpy(out, p, bytes);
      return;
    }
    if (w.cell == nullptr) return;
    Cell& c = *w.cell;
    if (c.in_flight >= 0) {
      fail(kCopyInFlight, space(t, w) + " load by " + who(t) + " of a word whose cp.async (" + who(c.in_flight) +
                              ") has not been waited for");
      return;
    }
    if (!defined(w, bytes)) {
      fail(kUninitialised, space(t, w) + " load by " + who(t) + " of a word no thread wrote");
      return;
    }
    if (!ordered_after(t, c.writer, c.epoch)) {
      fail(kRace, space(t, w) + " load by " + who(t) + " not ordered after the store of " + who(c.writer));
      std::memcpy(out, &c.stale, bytes);
    } else {
      std::memcpy(out, p, bytes);
    }
    const uint32_t clock = now(t);
    for (auto& r : c.reads)
      if (r.first == t.gid) {
        r.second = clock;
        return;
      }
    c.reads.push_back({int32_t(t.gid), clock});
  }

  // the checks of a store (or of a cp.async issue) to the word at p; nullptr if it must not happen
  Cell* check_store(Thread& t, const void* p, size_t bytes, Where& w) {
    w = locate(t, p, bytes, "store");
    if (w.buffer != nullptr && !w.buffer->writable) {
      fail(kOutOfRange, "store by " + who(t) + " into " + w.buffer->name + ", read-only in this kernel");
      return nullptr;
    }
    if (w.cell == nullptr) return nullptr;
    Cell& c = *w.cell;
    if (c.in_flight >= 0)
      fail(kRace, space(t, w) + " store by " + who(t) + " to a word with a cp.async in flight");
    if (!ordered_after(t, c.writer, c.epoch))
      fail(kRace, space(t, w) + " store by " + who(t) + " not ordered after the store of " + who(c.writer));
    for (const auto& r : c.reads)
      if (!ordered_after(t, r.first, r.second))
        fail(kRace, space(t, w) + " store by " + who(t) + " not ordered after the load of " + who(r.first));
    return &c;
  }

  void commit_store(Thread& t, Where& w, void* p, const void* v, size_t bytes) {
    Cell& c = *w.cell;
    c.stale = 0;
    std::memcpy(&c.stale, p, bytes);
    std::memcpy(p, v, bytes);
    c.writer = int32_t(t.gid);
    c.epoch = now(t);
    c.reads.clear();
    if (w.cta != nullptr)
      c.defined = true;
    else
      for (size_t k = 0; k < (bytes + 3) / 4; ++k) w.buffer->defined[w.word + k] = 1;
  }

  void store(void* p, const void* v, size_t bytes) {
    step();
    Thread& t = me();
    Where w;
    if (check_store(t, p, bytes, w) != nullptr) commit_store(t, w, p, v, bytes);
  }

  // ---- cp.async ----

  void copy_async(void* dst, const void* src, size_t bytes) {
    Thread& t = me();
    if (!t.cta->holds(dst)) {
      step();
      fail(kOutOfRange, "cp.async by " + who(t) + " into memory outside its CTA's shared memory");
      return;
    }
    uint64_t data = 0;
    load(src, &data, bytes);  // the global read (checked like any other)
    if (!options.lazy_copies) {
      store(dst, &data, bytes);
      return;
    }
    Where w;
    Cell* c = check_store(t, dst, bytes, w);
    if (c == nullptr) return;
    c->stale = 0;
    std::memcpy(&c->stale, dst, bytes);
    const uint64_t poison = ~uint64_t(0);
    std::memcpy(dst, &poison, bytes);
    c->in_flight = int32_t(t.gid);
    t.open.push_back({dst, data, bytes});
  }
  void commit() {
    Thread& t = me();
    t.groups.push_back(std::move(t.open));
    t.open.clear();
  }
  void wait_prior(int n) {
    Thread& t = me();
    while (int(t.groups.size()) > n) {
      for (const Copy& copy : t.groups.front()) {
        Cell& c = t.cta->shadow[size_t(static_cast<unsigned char*>(copy.dst) - t.cta->smem) / 4];
        std::memcpy(copy.dst, &copy.data, copy.bytes);
        c.in_flight = -1;
        c.writer = int32_t(t.gid);
        c.epoch = now(t);
        c.defined = true;
        c.reads.clear();
      }
      t.groups.erase(t.groups.begin());
    }
  }

  void* map_remote(void* local, int rank) {
    Thread& t = me();
    if (!t.cta->holds(local)) {
      fail(kOutOfRange, "mapa by " + who(t) + " of an address outside its CTA's shared memory");
      return local;
    }
    if (rank < 0 || rank >= int(t.cluster->ctas.size())) {
      fail(kOutOfRange, "mapa by " + who(t) + " to cluster rank " + str(rank));
      return local;
    }
    return t.cluster->ctas[size_t(rank)]->smem + (static_cast<unsigned char*>(local) - t.cta->smem);
  }

  // ---- barriers ----

  // A barrier instance completes: its participants' clocks become their join, then each advances its own.
  // .aligned barriers (bar.sync, bar.red, barrier.cluster...aligned) are warp-wide: every non-exited
  // lane of an arriving warp must be in the same instance.
  void release(Cluster& cluster, Barrier& bar, const char* what) {
    std::map<std::pair<Cta*, int>, int> per_warp;
    for (const Arrival& a : bar.arrivals) {
      Thread& t = *threads[size_t(a.fiber)];
      ++per_warp[{t.cta, t.tid / 32}];
    }
    for (const auto& [warp, arrived] : per_warp)
      if (arrived != warp.first->warps[size_t(warp.second)].live)
        fail(kBarrierCount, std::string(what) + ": " + str(arrived) + " of the " +
                                str(warp.first->warps[size_t(warp.second)].live) + " live lanes of warp " +
                                str(warp.second) + " (CTA rank " + str(warp.first->rank) +
                                ") arrive at one instance of this warp-wide barrier");
    std::vector<uint32_t> join(size_t(cluster.size), 0);
    for (const Arrival& a : bar.arrivals) {
      const uint32_t* c = cluster.clock(a.thread);
      for (int i = 0; i < cluster.size; ++i) join[i] = std::max(join[i], c[i]);
    }
    for (const Arrival& a : bar.arrivals) {
      uint32_t* c = cluster.clock(a.thread);
      std::copy(join.begin(), join.end(), c);
      c[a.thread] += 1;
      *a.result = bar.any;
      scheduler->wake(a.fiber);
    }
    bar.arrivals.clear();
    bar.any = false;
    bar.declared = -1;
  }

  bool arrive(Barrier& bar, int count, bool pred, bool cluster_scope, const char* what) {
    step();
    Thread& t = me();
    if (count > 0) {
      if (bar.declared >= 0 && bar.declared != count)
        fail(kBarrierCount, std::string(what) + ": threads arrive at one named barrier with counts " +
                                str(bar.declared) + " and " + str(count));
      bar.declared = count;
    }
    bool result = false;
    bar.arrivals.push_back({t.me, t.fiber, &result});
    bar.any |= pred;
    const int expected = count > 0 ? count : (cluster_scope ? t.cluster->live : t.cta->live);
    if (int(bar.arrivals.size()) >= expected) {
      release(*t.cluster, bar, what);
    } else {
      if (cluster_scope) maybe_start(*t.cluster);
      scheduler->block();
    }
    return result;
  }

  bool barrier_or(bool pred) { return arrive(me().cta->named[0], -1, pred, false, "__syncthreads_or"); }
  void bar_sync(int id, int count) {
    Thread& t = me();
    if (id < 0 || id >= 16 || count <= 0 || count % 32 != 0 || count > t.cluster->threads_per_cta) {
      step();
      fail(kBarrierCount, "bar.sync " + str(id) + ", " + str(count) +
                              ": the count must be a positive multiple of 32 within the CTA");
      return;
    }
    arrive(t.cta->named[id], count, false, false, "bar.sync");
  }
  void cluster_sync() { arrive(me().cluster->barrier, -1, false, true, "barrier.cluster"); }

  // ---- cluster start ----

  // The CTAs that have not started start once every thread of the started ones waits at the cluster
  // barrier or has exited: the latest moment the hardware may start them.
  void maybe_start(Cluster& cluster) {
    if (!cluster.pending_start) return;
    int waiting_for = 0;
    for (const auto& cta : cluster.ctas)
      if (cta->started) waiting_for += cta->live;
    if (int(cluster.barrier.arrivals.size()) < waiting_for) return;
    cluster.pending_start = false;
    for (auto& cta : cluster.ctas) {
      if (cta->started) continue;
      cta->started = true;
      std::fill(cta->storage.begin(), cta->storage.end(), 0xa5);  // whatever the SM's memory held
      for (Cell& c : cta->shadow) c = Cell();
      for (int fiber : cta->fibers) scheduler->wake(fiber);
    }
  }

  // ---- shuffles ----

  void shuffle(unsigned mask, const void* value, void* out, size_t bytes, int src) {
    step();
    Thread& t = me();
    const int lane = t.tid % 32;
    Warp& warp = t.cta->warps[size_t(t.tid / 32)];
    std::memset(out, 0xff, bytes);
    if (!((mask >> lane) & 1u)) {
      fail(kShuffleMask, "lane " + str(lane) + " shuffles with a mask that excludes it");
      return;
    }
    const std::pair<unsigned, uint64_t> key{mask, warp.sequence[lane][mask]++};
    {
      Exchange& x = warp.open[key];
      std::memcpy(&x.value[lane], value, bytes);
      x.arrived |= 1u << lane;
      if (x.arrived != mask) {
        x.waiters.push_back(t.fiber);
        scheduler->block();
      } else {
        for (int f : x.waiters) scheduler->wake(f);
      }
    }
    Exchange& x = warp.open[key];
    if (src < 0 || src >= 32 || !((mask >> src) & 1u))
      fail(kShuffleMask, "lane " + str(lane) + " reads lane " + str(src) + ", outside the shuffle's mask");
    else
      std::memcpy(out, &x.value[src], bytes);
    x.taken |= 1u << lane;
    if (x.taken == mask) warp.open.erase(key);
  }

  // ---- exits ----

  void exited(Thread& t) {
    Cluster& cluster = *t.cluster;
    Cta& cta = *t.cta;
    const uint32_t* mine = cluster.clock(t.me);
    cta.exit_clock.resize(size_t(cluster.size), 0);
    for (int i = 0; i < cluster.size; ++i) cta.exit_clock[i] = std::max(cta.exit_clock[i], mine[i]);
    --cta.live;
    --cta.warps[size_t(t.tid / 32)].live;
    --cluster.live;
    if (!cta.named[0].arrivals.empty() && int(cta.named[0].arrivals.size()) >= cta.live)
      release(cluster, cta.named[0], "__syncthreads_or");
    if (!cluster.barrier.arrivals.empty() && int(cluster.barrier.arrivals.size()) >= cluster.live)
      release(cluster, cluster.barrier, "barrier.cluster");
    maybe_start(cluster);
    if (cta.live > 0) return;
    // the CTA's shared memory goes away: every DSMEM read or write of another CTA must be ordered before
    // that (a cluster barrier), or on the GPU it may come after it, whatever order it had here
    const int64_t base = cluster.index * cluster_threads;
    for (const Cell& c : cta.shadow) {
      for (const auto& r : c.reads)
        if ((r.first - base) / cluster.threads_per_cta != cta.rank &&
            cta.exit_clock[size_t(r.first - base)] < r.second)
          fail(kExitedCta, "DSMEM load by " + who(r.first) + " not ordered before the exit of the CTA it reads (rank " +
                               str(cta.rank) + ")");
      if (c.writer >= 0 && (c.writer - base) / cluster.threads_per_cta != cta.rank &&
          cta.exit_clock[size_t(c.writer - base)] < c.epoch)
        fail(kExitedCta, "DSMEM store by " + who(c.writer) + " not ordered before the exit of the CTA it writes (rank " +
                             str(cta.rank) + ")");
    }
    cta.exited = true;
    std::memset(cta.smem, 0xff, size_t(cta.bytes));
  }

  // ---- one launch ----

  void launch(int64_t clusters, int ctas, int threads_per_cta, int64_t smem_bytes, int64_t wave, CtaBody body,
              void* context) {
    for (auto& buffer : buffers) {
      buffer->shadow.clear();
      if (buffer->writable) buffer->shadow.resize(buffer->defined.size());
    }
    cluster_threads = int64_t(ctas) * threads_per_cta;
    cta_threads = threads_per_cta;
    uint64_t seed = options.seed;
    for (int64_t first = 0; first < clusters && code == kOk; first += wave) {
      Scheduler s(seed++, options.preempt_permille);
      scheduler = &s;
      threads.clear();
      operations = 0;
      std::vector<std::unique_ptr<Cluster>> wave_clusters;
      for (int64_t index = first; index < std::min(clusters, first + wave); ++index) {
        wave_clusters.push_back(std::make_unique<Cluster>(index, ctas, threads_per_cta, smem_bytes));
        Cluster& cluster = *wave_clusters.back();
        if (options.late_start && ctas > 1) {  // a random nonempty proper subset starts late
          const uint64_t bits = s.draw();
          std::vector<bool> late(static_cast<size_t>(ctas));
          int count = 0;
          for (int r = 0; r < ctas; ++r) count += (late[size_t(r)] = (bits >> r) & 1u);
          if (count == 0) late[size_t((bits >> 16) % ctas)] = true;
          if (count == ctas) late[size_t((bits >> 16) % ctas)] = false;
          for (int r = 0; r < ctas; ++r)
            if (late[size_t(r)]) {
              cluster.ctas[size_t(r)]->started = false;
              cluster.pending_start = true;
            }
        }
        for (int r = 0; r < ctas; ++r) {
          Cta& cta = *cluster.ctas[size_t(r)];
          for (int tid = 0; tid < threads_per_cta; ++tid) {
            auto thread = std::make_unique<Thread>();
            thread->cluster = &cluster;
            thread->cta = &cta;
            thread->tid = tid;
            thread->me = r * threads_per_cta + tid;
            thread->gid = index * cluster_threads + thread->me;
            Ptr<unsigned char> smem(cta.smem);
            thread->fiber = s.spawn([body, context, index, r, tid, smem] { body(context, int(index), r, tid, smem); },
                                    cta.started);
            cta.fibers.push_back(thread->fiber);
            threads.push_back(std::move(thread));
          }
        }
      }
      s.on_exit([this](int fiber) { exited(*threads[size_t(fiber)]); });
      Impl* outer = active;
      active = this;
      const bool finished = s.run();
      active = outer;
      if (!finished && !s.halted()) fail(kDeadlock, "the kernel deadlocked (some thread waits forever)");
      scheduler = nullptr;
      threads.clear();
    }
    for (auto& buffer : buffers) buffer->shadow.clear();
  }
};

namespace {
Emulation::Impl& running() {
  Emulation::Impl* impl = Emulation::Impl::active;
  if (impl == nullptr) {
    std::fprintf(stderr, "mdlm_ctc emulator: a kernel memory access outside an emulated launch\n");
    std::abort();
  }
  return *impl;
}
}  // namespace

void load(const void* p, void* out, size_t bytes) { running().load(p, out, bytes); }
void store(void* p, const void* value, size_t bytes) { running().store(p, value, bytes); }
bool barrier_or(bool pred) { return running().barrier_or(pred); }
void bar_sync(int id, int count) { running().bar_sync(id, count); }
void cluster_sync() { running().cluster_sync(); }
void shuffle(unsigned mask, const void* value, void* out, size_t bytes, int src_lane) {
  running().shuffle(mask, value, out, bytes, src_lane);
}
void copy_async(void* shared_dst, const void* global_src, size_t bytes) {
  running().copy_async(shared_dst, global_src, bytes);
}
void commit() { running().commit(); }
void wait_prior(int n) { running().wait_prior(n); }
void* map_remote(void* local_shared, int rank) { return running().map_remote(local_shared, rank); }

Emulation::Emulation(const Options& options) : impl_(new Impl) { impl_->options = options; }
Emulation::~Emulation() { delete impl_; }

void Emulation::buffer(const void* base, size_t bytes, bool defined, const char* name) {
  auto buffer = std::make_unique<Buffer>();
  buffer->base = static_cast<unsigned char*>(const_cast<void*>(base));
  buffer->bytes = bytes;
  buffer->name = name;
  buffer->defined.assign((bytes + 3) / 4, defined ? 1 : 0);
  impl_->buffers.push_back(std::move(buffer));
}

void Emulation::writable(const void* base, bool yes) {
  for (auto& buffer : impl_->buffers)
    if (buffer->base == base) buffer->writable = yes;
}

bool Emulation::is_defined(const void* p, size_t bytes) const {
  const auto* c = static_cast<const unsigned char*>(p);
  for (const auto& buffer : impl_->buffers)
    if (c >= buffer->base && c + bytes <= buffer->base + buffer->bytes) {
      for (size_t w = size_t(c - buffer->base) / 4; w <= size_t(c + bytes - 1 - buffer->base) / 4; ++w)
        if (!buffer->defined[w]) return false;
      return true;
    }
  return false;
}

void Emulation::launch(int64_t clusters, int ctas, int threads, int64_t smem_bytes, int64_t wave, CtaBody body,
                       void* context) {
  impl_->launch(clusters, ctas, threads, smem_bytes, std::max<int64_t>(wave, 1), body, context);
}

void Emulation::fail(int code, const char* what) { impl_->fail(code, what); }
int Emulation::code() const { return impl_->code; }
const char* Emulation::what() const {
  impl_->message = impl_->first + " (" + str(impl_->count) + " violations)";
  return impl_->message.c_str();
}

}  // namespace emulator
}  // namespace mdlm_ctc
