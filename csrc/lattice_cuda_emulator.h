// Host emulator of the CUDA execution model used by lattice_cuda.cuh, for testing the CUDA lattice on
// machines without a GPU (tests/cuda_emulator.py builds it with the host C++ compiler and calls it
// through ctypes). It runs the very same `recurrence_pass` and `posterior_row` code as the GPU kernels,
// every CUDA thread a user-level fiber, and it promises no more than the hardware does for the
// patterns the kernel uses:
//   * every memory access is checked: the kernel's pointers (parameters and shared memory) are
//     `Ptr<T>` here, whose loads and stores go through the emulator whatever the syntax (`dev.ld(p)`,
//     `*p`, `p[i]`, `p[i] = v`); a raw pointer never reaches the kernel code;
//   * scheduling: a seeded random runnable fiber runs until it blocks at a barrier or shuffle, or is
//     preempted at a random memory access; so a thread runs ahead into the next phase as far as the
//     barriers let it, the lanes of a warp interleave between shuffles (which order no memory), and
//     every CTA of the grid (all rows, both directions) interleaves;
//   * cluster start: a CTA of a cluster may start only after the others have run up to their first
//     cluster barrier (or exited); until then its shared memory does not exist (a DSMEM access is an
//     error), and when it starts it holds garbage (reads before a write are errors);
//   * barriers: one counter per named barrier (bar.sync id, count completes when `count` threads have
//     arrived, whole warps only: the instruction is .aligned), __syncthreads_or counts the threads that
//     have not exited, the cluster barrier (arrive.release + wait.acquire) the cluster's; each orders
//     memory between its participants only (vector clocks);
//   * shared, distributed shared and global memory are checked word by word: a read that is not
//     ordered after the last write of another thread by a barrier is a data race (it returns the stale
//     value), a write that is not ordered after another thread's read or write is one too; reads of
//     memory no one wrote (shared memory, and the scratch buffers the launcher allocates uninitialised)
//     are errors; global words of different CTAs (clusters) are never ordered within one kernel; loads
//     and stores outside the launch's buffers are errors, and so are stores into its read-only inputs;
//   * cp.async: the destination is in flight (poisoned, and any read is an error) from the issue to
//     the wait that retires its group; the write then counts as the issuing thread's, at that wait;
//   * shuffles exchange values among the lanes of their mask only and order no memory; a lane outside
//     the mask, or a source lane outside it, is an error;
//   * a CTA's shared memory is poisoned when its last thread exits: a later DSMEM access is an error,
//     and so is a DSMEM read or write of another CTA that no barrier ordered before the exit.
// Numerics are those of the host build of logspace.h (the CPU kernels' exp/log), not CUDA's.
//
// What the emulator cannot see is the device-only code (CudaDev's inline PTX and intrinsics in
// lattice_cuda_kernels.cuh): benchmarks/static_cuda.py lists every barrier, fence, cluster, shuffle and
// cp.async instruction of the compiled sm_90 kernels and tests/test_static_cuda.py compares that list
// with the one the design requires.
//
// Layout: this header (the kernel's view: EmuDev, Ptr, the runtime's entry points), the runtime
// (lattice_cuda_emulator_runtime.cpp: fibers, memory model, barriers; it never includes the kernel) and
// the kernel side (lattice_cuda_emulator.cpp: the kernel instantiations, the launches of one lattice
// call and the C entry points). tests/cuda_emulator.py compiles the runtime once and the kernel side per
// kernel source (the mutation tests' planted bugs), and caches both by content.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

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
  kNotStarted = 11,
  kRunaway = 12,
};

// ---- the running thread's operations (the runtime) -------------------------------------------

void load(const void* p, void* out, size_t bytes);
void store(void* p, const void* value, size_t bytes);
bool barrier_or(bool pred);            // __syncthreads_or: bar.red.or 0 over the CTA's non-exited threads
void bar_sync(int id, int count);      // bar.sync id, count
void cluster_sync();                   // barrier.cluster.arrive (release) + barrier.cluster.wait (acquire)
void shuffle(unsigned mask, const void* value, void* out, size_t bytes, int src_lane);
void copy_async(void* shared_dst, const void* global_src, size_t bytes);
void commit();
void wait_prior(int n);
void* map_remote(void* local_shared, int rank);

// ---- checked pointers ------------------------------------------------------------------------

// A reference to one element: reading converts, writing assigns, both through the runtime.
template <typename T>
class Ref {
 public:
  using value_type = std::remove_const_t<T>;
  explicit Ref(T* p) : p_(p) {}
  Ref(const Ref&) = default;
  operator value_type() const {
    value_type v;
    load(p_, &v, sizeof v);
    return v;
  }
  const Ref& operator=(value_type v) const {
    static_assert(!std::is_const_v<T>, "store through a pointer to const");
    store(p_, &v, sizeof v);
    return *this;
  }
  const Ref& operator=(const Ref& other) const { return *this = value_type(other); }
  const Ref& operator+=(value_type v) const { return *this = value_type(*this) + v; }
  const Ref& operator-=(value_type v) const { return *this = value_type(*this) - v; }

 private:
  T* p_;
};

// The kernel's pointer type in the emulator (a plain T* on the GPU): arithmetic like a pointer, every
// dereference a Ref.
template <typename T>
class Ptr {
 public:
  Ptr() = default;
  Ptr(std::nullptr_t) {}
  explicit Ptr(T* p) : p_(p) {}
  template <typename U, typename = std::enable_if_t<std::is_convertible_v<U*, T*>>>
  Ptr(const Ptr<U>& other) : p_(other.raw()) {}
  T* raw() const { return p_; }
  Ref<T> operator*() const { return Ref<T>(p_); }
  Ref<T> operator[](int64_t i) const { return Ref<T>(p_ + i); }
  Ptr operator+(int64_t i) const { return Ptr(p_ + i); }
  Ptr operator-(int64_t i) const { return Ptr(p_ - i); }
  friend Ptr operator+(int64_t i, Ptr p) { return p + i; }
  int64_t operator-(Ptr other) const { return p_ - other.p_; }
  Ptr& operator+=(int64_t i) { p_ += i; return *this; }
  Ptr& operator-=(int64_t i) { p_ -= i; return *this; }
  Ptr& operator++() { ++p_; return *this; }
  Ptr& operator--() { --p_; return *this; }
  Ptr operator++(int) { Ptr old = *this; ++p_; return old; }
  Ptr operator--(int) { Ptr old = *this; --p_; return old; }
  bool operator==(Ptr other) const { return p_ == other.p_; }
  bool operator!=(Ptr other) const { return p_ != other.p_; }
  bool operator<(Ptr other) const { return p_ < other.p_; }
  bool operator==(std::nullptr_t) const { return p_ == nullptr; }
  bool operator!=(std::nullptr_t) const { return p_ != nullptr; }

 private:
  T* p_ = nullptr;
};

// reinterpret_cast of a shared-memory pointer (cuda_lattice::ptr_cast on the GPU; found by ADL)
template <typename U, typename T>
Ptr<U> ptr_cast(Ptr<T> p) {
  return Ptr<U>(reinterpret_cast<U*>(p.raw()));
}

template <typename T>
struct NonDeduced {
  using type = T;
};

// ---- the execution model the kernel code is written against (CudaDev on the GPU) -------------

struct EmuDev {
  int tid, threads, rank, csize;
  int64_t b;
  int dir;

  int thread_rank() const { return tid; }
  int block_size() const { return threads; }
  int cluster_rank() const { return rank; }
  int cluster_size() const { return csize; }
  int64_t row() const { return b; }
  int direction() const { return dir; }

  bool syncthreads_or(bool pred) const { return barrier_or(pred); }
  void bar_sync(int id, int count) const { emulator::bar_sync(id, count); }
  void cluster_sync() const { emulator::cluster_sync(); }

  template <typename T>
  T shfl(unsigned mask, T v, int src) const {
    return exchange(mask, v, src);
  }
  template <typename T>
  T shfl_up(unsigned mask, T v, int delta) const {
    const int lane = tid % 32;
    return exchange(mask, v, lane - delta >= 0 ? lane - delta : lane);
  }
  template <typename T>
  T shfl_down(unsigned mask, T v, int delta) const {
    const int lane = tid % 32;
    return exchange(mask, v, lane + delta < 32 ? lane + delta : lane);
  }
  template <typename T>
  T shfl_xor(unsigned mask, T v, int lane_mask) const {
    return exchange(mask, v, (tid % 32) ^ lane_mask);
  }

  template <typename T>
  std::remove_const_t<T> ld(Ptr<T> p) const {
    return *p;
  }
  template <typename T>
  void st(Ptr<T> p, typename NonDeduced<T>::type v) const {
    *p = v;
  }
  template <typename T>
  Ptr<T> map_remote(Ptr<T> local, int r) const {
    return Ptr<T>(static_cast<T*>(emulator::map_remote(local.raw(), r)));
  }
  template <typename T>
  void st_remote(Ptr<T> remote, typename NonDeduced<T>::type v) const {
    *remote = v;
  }
  template <typename T>
  void copy_async(Ptr<T> dst, Ptr<const T> src) const {
    emulator::copy_async(dst.raw(), src.raw(), sizeof(T));
  }
  void commit() const { emulator::commit(); }
  template <int N>
  void wait_prior() const {
    emulator::wait_prior(N);
  }

 private:
  template <typename T>
  T exchange(unsigned mask, T v, int src) const {
    static_assert(sizeof(T) <= 8, "shuffled values are at most 8 bytes");
    T out;
    shuffle(mask, &v, &out, sizeof(T), src);
    return out;
  }
};

// ---- launches (the kernel side drives the runtime through these) -----------------------------

struct Options {
  bool lazy_copies = true;   // cp.async lands at its wait (false: at the issue)
  int preempt_permille = 60; // chance of a switch to another fiber at a memory access
  uint64_t seed = 0;
  bool late_start = true;    // some CTAs of each cluster start only when the others wait at the cluster barrier
};

// One CTA's code: cluster index in the grid, CTA rank in the cluster, thread index, the CTA's shared memory.
using CtaBody = void (*)(void* context, int cluster, int rank, int tid, Ptr<unsigned char> smem);

// A kernel's instantiation, registered by the kernel side: (acc bytes, collapse, VT, stages, cluster).
void register_body(int acc_bytes, int mode, int vt, int stages, bool cluster, CtaBody body);
CtaBody find_body(int acc_bytes, int mode, int vt, int stages, bool cluster);

class Emulation {
 public:
  explicit Emulation(const Options& options);
  ~Emulation();
  Emulation(const Emulation&) = delete;
  Emulation& operator=(const Emulation&) = delete;

  // A global-memory buffer of the call. `defined`: its contents are initialised (inputs) or not
  // (scratch the launcher allocates with at::empty); reads of undefined words are errors.
  void buffer(const void* base, size_t bytes, bool defined, const char* name);
  // Which buffers the next launches may write (the others are read-only there).
  void writable(const void* base, bool yes);
  bool is_defined(const void* p, size_t bytes) const;
  // One kernel launch: `clusters` clusters of `ctas` CTAs of `threads` threads, `smem_bytes` each, run
  // `wave` clusters at a time (the global memory checks span the whole launch).
  void launch(int64_t clusters, int ctas, int threads, int64_t smem_bytes, int64_t wave, CtaBody body,
              void* context);
  void fail(int code, const char* what);
  int code() const;
  const char* what() const;  // the first violation and the number of violations

  struct Impl;  // the runtime's

 private:
  Impl* impl_;
};

}  // namespace emulator
}  // namespace mdlm_ctc
