// The CUDA lattice passes (backend "cuda", stage 2 of csrc/ops.cpp): the band recurrences and the
// posterior pass, written once against a small execution-model interface `Dev` so that the same code
// runs on the GPU (CudaDev in slack_ctc_cuda.cu) and, for tests on machines without a GPU, under a
// host emulator of CUDA threads, warps, barriers, clusters and cp.async (lattice_cuda_emulator.h).
// The cells, bands and posterior layout come from lattice.h, shared with the CPU kernels.
//
// Work split (one lattice call):
//   1. recurrence pass, grid (C, B, 1 or 2): CTA cluster `C` (C = 1 without clusters) of row b runs
//      alpha (blockIdx.z = 0) or beta (blockIdx.z = 1). alpha and beta only read the emission table,
//      so with need_grad they run concurrently on different SMs: the sequential depth of the whole
//      lattice is max(alpha, beta) = T steps instead of 2T. Every step stores the band row to global
//      memory (band-relative, `store`) when the posteriors are needed; alpha writes nll and a row status.
//   2. posterior pass, one warp per frame (b, t), fully parallel: reads alpha_{t-1}/beta_t (preserve)
//      or alpha_t/beta_t (standard), overwrites the table row with the target posteriors and `special`
//      with the posterior of k, exactly like lattice_band_cpu (NaN rows NaN, infeasible rows 0, frames
//      past the input length 0). Sums run in a fixed order: results are bitwise reproducible.
//
// The band in registers. A row's states at frame t live in a sliding window of slots j = u - base(t)
// with base(t) = preserve_state_lo (preserve) or standard_blank_lo (standard, shared by the blank and
// the label array); base grows by d in {0, 1} per frame and the window is at most
// S_row = min(U, T - U, max_shift) + 1 slots wide (<= table width + 1). Thread i of CTA r holds slots
// r * slots_per_cta + i * VT + [0, VT) in registers. A step needs slots j + d and j + d - 1 of the
// previous frame (alpha) or j - d and j - d + 1 (beta): neighbours inside a thread are registers, the
// ones of the next/previous lane come by one warp shuffle each way, the ones across a warp boundary
// through two shared-memory edge cells per warp (double-buffered by step parity, so one barrier per
// step suffices), and across a CTA boundary of a cluster through distributed shared memory: the CTA
// at each end of a cluster boundary pushes its edge cell into the neighbour's edge array (a remote
// store before the per-step cluster barrier), so every edge read is a local shared-memory load. The
// first remote store comes after the first cluster barrier (step 1's): before it, a neighbour CTA may
// not have started yet.
//
// Emissions are staged. The step's emissions for the CTA's slots are copied from global memory into
// a ring of R shared-memory stages with cp.async, R - 1 frames ahead of the step that reads them, so
// global latency leaves the sequential critical path. Only the stage indices inside the table's column
// band are copied; the others keep an older frame's emission (or the 0 the ring starts with), and
// they only ever meet a -inf predecessor, like the CPU kernel's 0 there.
//
// Slots outside the band always hold -inf, so bounds never need checking on reads; lengths are
// clamped to the padded sizes and every table read is bounded by the column band, so bad lengths
// never read or write out of bounds. A row whose band is wider than the table (an invalid call that
// the CPU op rejects with an error, which the GPU cannot do without a host sync) gets NaN.
#pragma once

#include "lattice.h"

#if defined(__CUDACC__)
#define MDLM_DEV __device__ __forceinline__
#else
#define MDLM_DEV inline
#endif

namespace mdlm_ctc {
namespace cuda_lattice {

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;
constexpr int kMaxVT = 8;
constexpr int kMaxStages = 8;
constexpr int kMaxCluster = 8;
enum Direction : int { kAlpha = 0, kBeta = 1 };
enum RowStatus : int32_t { kRowOk = 0, kRowZero = 1, kRowNaN = 2 };

// The kernels' pointers: plain pointers on the GPU; the host emulator passes checked pointers of its own
// (emulator::Ptr, whose every load and store it checks), so the kernel code below never touches memory
// except through them. MDLM_SHARED_CAST is the reinterpret_cast of a byte pointer into shared memory: the
// emulator's ptr_cast overload (found by argument-dependent lookup) on the host; spelt out on the GPU,
// where even a force-inlined call there changes nvcc's step loop (+5 SASS instructions per step, VT = 4)
// (the static_cast keeps nvcc's front end from rejecting the cast of a dependent pointer type).
template <typename T>
using RawPtr = T*;
template <typename U, typename T>
MDLM_DEV U* ptr_cast(T* p) {
  return reinterpret_cast<U*>(p);
}
#if defined(__CUDACC__)
#define MDLM_SHARED_CAST(T, p) reinterpret_cast<T*>(static_cast<unsigned char*>(p))
#else
#define MDLM_SHARED_CAST(T, p) ptr_cast<T>(p)
#endif
template <typename T>
struct NonDeduced {
  using type = T;
};

template <typename acc_t>
MDLM_HD acc_t quiet_nan() {
  return std::numeric_limits<acc_t>::quiet_NaN();
}
template <typename acc_t>
MDLM_HD acc_t pos_inf() {
  return std::numeric_limits<acc_t>::infinity();
}

// ---- band geometry (host and device) ---------------------------------------------------------

// Slots a row needs: the widest band over all frames, min(U, T - U, max_shift) + 1, for both
// collapses (standard: the label band's top minus the shared blank base). 0 for an infeasible row.
MDLM_HD int64_t row_slots(int64_t T, int64_t U, int64_t max_shift) {
  if (U > T) return 0;
  int64_t w = imin(U, T - U);
  if (max_shift >= 0) w = imin(w, max_shift);
  return w + 1;
}

template <int MODE>
struct Band {
  int64_t T, U, m;  // m: max_shift (preserve), -1 for none
  MDLM_HD int64_t base(int64_t t) const {
    return MODE == kPreserve ? preserve_state_lo(t, T, U, m) : standard_blank_lo(t, T, U);
  }
  // preserve states, or standard blank states (array 0) / label states (array 1)
  MDLM_HD bool valid(int arr, int64_t t, int64_t u) const {
    if (MODE == kPreserve) return u >= preserve_state_lo(t, T, U, m) && u <= preserve_state_hi(t, U);
    if (arr == 0) return u >= standard_blank_lo(t, T, U) && u <= standard_blank_hi(t, U);
    return u >= standard_label_lo(t, T, U) && u <= standard_label_hi(t, U);
  }
};

// ---- launch geometry (host and device) --------------------------------------------------------

template <int MODE>
struct Arrays {
  static constexpr int kStates = MODE == kPreserve ? 1 : 2;  // preserve states | standard blank + label
};

// Shared memory of one recurrence CTA: edge cells [2 parities][arrays][lo, hi][warps + 2] (acc_t: warp w's
// at w + 1; hi[0] and lo[warps + 1] the neighbour CTAs' cells, pushed by them, or -inf); for standard
// CTC the skip mask of states s0 .. s0 + U_max + 1 + threads * VT (float, loaded once: it does not depend
// on the frame); then R stages of `stage_stride` emissions (acc_t; slot q at q - s0 + 1, the special
// emission at the end).
struct SmemLayout {
  int64_t edge_elems;    // acc_t
  int64_t stage_stride;  // elements per stage
  int64_t stage_bytes;   // one stage
  int64_t edges_bytes;
  int64_t skip_bytes;
  MDLM_HD int64_t total(int stages) const { return edges_bytes + skip_bytes + stages * stage_bytes; }
};

MDLM_HD int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

MDLM_HD SmemLayout smem_layout(int mode, int64_t acc_bytes, int threads, int vt, int64_t U_max) {
  SmemLayout l;
  const int arrays = mode == kPreserve ? 1 : 2;
  l.edge_elems = int64_t(2) * arrays * 2 * (threads / kWarpSize + 2);
  l.edges_bytes = round_up(l.edge_elems * acc_bytes, 16);
  l.stage_stride = round_up(int64_t(threads) * vt + 3, 4);
  l.stage_bytes = l.stage_stride * acc_bytes;
  l.skip_bytes = mode == kStandard ? round_up((U_max + 2 + int64_t(threads) * vt) * int64_t(sizeof(float)), 16) : 0;
  return l;
}

// ---- parameters ------------------------------------------------------------------------------

template <typename acc_t, template <typename> class Ptr = RawPtr>
struct RecurrenceParams {
  Ptr<const acc_t> table;             // [B, T, W] emissions of the target columns (lattice.h layout)
  Ptr<const acc_t> special;           // [B, T]    emission of k
  Ptr<const float> skip;              // [B, U_max + 2] standard: 0 where label u may follow label u - 1, else -inf
  Ptr<const int64_t> input_lengths;   // [B]
  Ptr<const int64_t> target_lengths;  // [B]
  Ptr<acc_t> nll;                     // [B] out (written by the alpha CTAs)
  Ptr<int32_t> status;                // [B] out: RowStatus
  Ptr<acc_t> store[2][2];             // [direction][array]: [B, T + 1, store_stride] band rows, or nullptr
  int64_t T, W, U_max, store_stride, max_shift;
  int32_t slots_per_cta;          // threads * VT
};

template <typename acc_t, template <typename> class Ptr = RawPtr>
struct PosteriorParams {
  Ptr<acc_t> table;                   // [B, T, W] in: emissions, out: target posteriors
  Ptr<acc_t> special;                 // [B, T]    in: emission of k, out: its posterior
  Ptr<const int64_t> input_lengths;
  Ptr<const int64_t> target_lengths;
  Ptr<const acc_t> nll;
  Ptr<const int32_t> status;
  Ptr<const acc_t> alpha[2];          // [B, T + 1, store_stride] per array
  Ptr<const acc_t> beta[2];
  int64_t B, T, W, U_max, store_stride, max_shift;
};

// The posterior pass's parameters: what the recurrence wrote (band rows, nll, status) and the table it
// overwrites (the launcher and the emulator both launch it from these).
template <typename acc_t, template <typename> class Ptr>
MDLM_HD PosteriorParams<acc_t, Ptr> posterior_params(const RecurrenceParams<acc_t, Ptr>& rp,
                                                     typename NonDeduced<Ptr<acc_t>>::type table,
                                                     typename NonDeduced<Ptr<acc_t>>::type special, int64_t B) {
  PosteriorParams<acc_t, Ptr> pp{};
  pp.table = table;
  pp.special = special;
  pp.input_lengths = rp.input_lengths;
  pp.target_lengths = rp.target_lengths;
  pp.nll = rp.nll;
  pp.status = rp.status;
  for (int a = 0; a < 2; ++a) {
    pp.alpha[a] = rp.store[0][a];
    pp.beta[a] = rp.store[1][a];
  }
  pp.B = B;
  pp.T = rp.T;
  pp.W = rp.W;
  pp.U_max = rp.U_max;
  pp.store_stride = rp.store_stride;
  pp.max_shift = rp.max_shift;
  return pp;
}

MDLM_HD int64_t clamp_length(int64_t v, int64_t hi) { return imin<int64_t>(imax<int64_t>(v, 0), hi); }

// skip mask of standard CTC, one element (b, u) of [B, U_max + 2]
MDLM_HD float skip_value(const int64_t* targets, const int64_t* target_lengths, int64_t U_max, int64_t b,
                         int64_t u) {
  const int64_t U = clamp_length(target_lengths[b], U_max);
  const int64_t* y = targets + b * U_max;  // y_u = y[u - 1]
  return (u >= 2 && u <= U && y[u - 1] != y[u - 2]) ? 0.0f : -std::numeric_limits<float>::infinity();
}

// ---------------------------------------------------------------------------------------------
// recurrence pass: alpha (frames 0 -> T) or beta (frames T -> 0) of one row, one CTA or one cluster
// ---------------------------------------------------------------------------------------------

// The step barrier: named barrier 1 over the row's active threads, or the whole cluster (it orders the
// edge cells read through DSMEM as well). Barrier 0 is the __syncthreads_or of the NaN scan.
constexpr int kStepBarrier = 1;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename acc_t, int MODE, int VT, int STAGES, bool CLUSTER, int DIR, template <typename> class Ptr,
          class Dev>
MDLM_DEV void recurrence_pass(const RecurrenceParams<acc_t, Ptr>& p, typename NonDeduced<Ptr<unsigned char>>::type smem,
                              Dev& dev) {
  static_assert(STAGES >= 2 && (STAGES & (STAGES - 1)) == 0, "the stage ring is a power of two");
  constexpr int A = Arrays<MODE>::kStates;
  const acc_t NEG = neg_inf<acc_t>();
  const int tid = dev.thread_rank(), threads = dev.block_size();
  const int lane = tid % kWarpSize, warp = tid / kWarpSize, cta_warps = threads / kWarpSize;
  const int rank = dev.cluster_rank(), csize = dev.cluster_size();
  const int64_t b = dev.row();
  constexpr int dir = DIR;
  const int64_t T = p.T, W = p.W;
  // lengths are clamped to the padded sizes; the launcher guarantees T, U_max < 2^31, so frame and state
  // indices fit int from here on (only row offsets into the tables are int64)
  const int T_b = int(clamp_length(p.input_lengths[b], T)), U_b = int(clamp_length(p.target_lengths[b], p.U_max));
  // a max_shift of T or more restricts nothing, so clamping it keeps it an int
  const int shift = MODE == kPreserve ? int(imin<int64_t>(imax<int64_t>(p.max_shift, -1), T)) : -1;
  const Ptr<const acc_t> special = p.special + b * T;

  const SmemLayout layout = smem_layout(MODE, sizeof(acc_t), threads, VT, p.U_max);
  const int stride = int(layout.stage_stride);
  const Ptr<unsigned char> stages = smem + layout.edges_bytes + layout.skip_bytes;
  // The ring starts as 0 (the barrier of the NaN scan orders it before every copy into it): a stage index
  // outside the column band keeps what it holds.
  for (int i = tid; i < STAGES * stride; i += threads) dev.st(MDLM_SHARED_CAST(acc_t, stages) + i, acc_t(0));

  // A NaN emission anywhere in the row makes the row NaN (the vocabulary pass marks it in `special`).
  bool nan = false;
  for (int i = tid; i < T_b; i += threads) nan |= special[i] != special[i];
  nan = dev.syncthreads_or(nan);
  const int S_row = int(row_slots(T_b, U_b, shift));
  const bool infeasible = U_b > T_b;
  const bool too_narrow = !infeasible && (W < column_band_width(T_b, U_b, shift) ||
                                          int64_t(S_row) > int64_t(p.slots_per_cta) * csize);
  if (nan || infeasible || too_narrow) {  // uniform over the CTA and the cluster
    if (dir == kAlpha && rank == 0 && tid == 0) {
      p.nll[b] = infeasible && !nan ? pos_inf<acc_t>() : quiet_nan<acc_t>();
      p.status[b] = infeasible && !nan ? kRowZero : kRowNaN;
    }
    return;
  }

  const int s0 = rank * p.slots_per_cta;  // first slot of this CTA
  // Without a cluster, warps whose slots lie beyond the row's band for every frame leave now, and the
  // step barrier counts only the others (the launch is sized for the widest row of the batch).
  int active = threads;
  if (!CLUSTER) {
    const int needed = (S_row + VT - 1) / VT;
    active = imin(threads, imax(kWarpSize, int(round_up(needed, kWarpSize))));
    if (tid >= active) return;
  }
  const int warps = active / kWarpSize;
  const int span = active * VT;  // slots of this CTA: [s0, s0 + span)
  const Ptr<acc_t> edges = MDLM_SHARED_CAST(acc_t, smem);
  const Ptr<float> skip_s = MDLM_SHARED_CAST(float, smem + layout.edges_bytes);  // standard: skip of state s0 + i at [i]
  // edge cell of slot w (warp w - 1's, or a neighbour CTA's at 0 and cta_warps + 1), in `base`'s edge array
  auto edge_in = [&](Ptr<acc_t> base, int parity, int arr, int side, int w) -> Ptr<acc_t> {
    return base + ((parity * A + arr) * 2 + side) * (cta_warps + 2) + w;
  };
  auto edge = [&](int parity, int arr, int side, int w) { return edge_in(edges, parity, arr, side, w); };
  auto stage_emit = [&](int n) -> Ptr<acc_t> {
    return MDLM_SHARED_CAST(acc_t, stages + (n & (STAGES - 1)) * layout.stage_bytes);
  };
  // band base of frame f: the lowest state of the row's band (preserve) or of its blank band (standard)
  auto base_of = [&](int f) {
    int lo = imax(0, U_b - (T_b - f));
    if (MODE == kPreserve && shift >= 0) lo = imax(lo, imin(f - shift, U_b));
    return lo;
  };
  auto frame_of = [&](int n) { return dir == kAlpha ? n : T_b + 1 - n; };  // step n = 1..T_b

  // Copy step n's emissions (frame f) into its stage: stage index i holds state u = base + s0 - 1 + i, whose
  // column is row[i - first] when it lies in the table's column band (0 <= i - first < cols); indices
  // outside it are not copied. Thread tid copies its own VT indices 1 + tid * VT + [0, VT); thread 0
  // also index 0 and the special emission, the last active thread index span + 1.
  // Standard CTC: the skip mask of states s0 .. s0 + U_max + span + 1 (-inf past U_max + 1), so that every
  // slot of every frame reads its own without a bound (base <= U_max). Ordered before its first use by the
  // step barrier of step 1.
  if (MODE == kStandard) {
    const Ptr<const float> skip_row = p.skip + b * (p.U_max + 2);
    const int skip_hi = int(p.U_max) + 1;
    for (int i = tid; i <= skip_hi + span; i += active)
      dev.st(skip_s + i, s0 + i <= skip_hi ? skip_row[s0 + i] : -std::numeric_limits<float>::infinity());
  }
  const int Wi = int(W);  // <= T
  // stage_step runs for steps n = 1, 2, ..., T_b in order: the table row moves by one frame each time
  Ptr<const acc_t> stage_row = p.table + (b * T + (dir == kAlpha ? 0 : T_b - 1)) * W;
  const int64_t stage_row_step = dir == kAlpha ? W : -W;
  Ptr<const acc_t> stage_special = special + (dir == kAlpha ? 0 : T_b - 1);
  auto stage_step = [&](int n) {
    const int f = frame_of(n);
    const int lowest = base_of(f) + s0 - 1;  // the state of stage index 0
    int c_lo = imax(1, U_b - T_b + f);
    if (MODE == kPreserve && shift >= 0) c_lo = imax(c_lo, f - shift);
    const int c_hi = imin(imin(f, U_b), c_lo + Wi - 1);
    const unsigned cols = unsigned(imax(c_hi - c_lo + 1, 0));
    const int first = c_lo - lowest;
    const Ptr<const acc_t> row = stage_row;
    stage_row += stage_row_step;
    const Ptr<acc_t> e = stage_emit(n);
    const int x = 1 + tid * VT - first;  // column of this thread's first index
    const Ptr<acc_t> dst = e + 1 + tid * VT;
    const Ptr<const acc_t> src = row + x;
#pragma unroll
    for (int v = 0; v < VT; ++v)
      if (unsigned(x + v) < cols) dev.copy_async(dst + v, src + v);
    if (tid == 0) {
      if (unsigned(-first) < cols) dev.copy_async(e, row - first);
      dev.copy_async(e + stride - 1, stage_special);
    }
    stage_special += dir == kAlpha ? 1 : -1;
    if (tid == active - 1 && unsigned(span + 1 - first) < cols)
      dev.copy_async(e + span + 1, row + (span + 1 - first));
  };

  const int j0 = s0 + tid * VT;  // this thread's first slot
  // this thread's slots of the band row of the current frame in the store (alpha: frames up, beta: down)
  const bool storing = p.store[dir][0] != nullptr;
  const int64_t store_step = dir == kAlpha ? p.store_stride : -p.store_stride;
  Ptr<acc_t> out[2] = {nullptr, nullptr};
  if (storing)
    for (int a = 0; a < A; ++a) out[a] = p.store[dir][a] + (b * (T + 1) + (dir == kAlpha ? 0 : T_b)) * p.store_stride + j0;
  auto store_row = [&](const acc_t (&v)[2][VT]) {  // then moves to the next frame
    if (!storing) return;
#pragma unroll
    for (int a = 0; a < A; ++a) {
#pragma unroll
      for (int k = 0; k < VT; ++k)
        if (j0 + k < S_row) out[a][k] = v[a][k];
      out[a] += store_step;
    }
  };
  // Lane 0 writes the warp's lo cell and reads warp - 1's hi cell, lane 31 writes the hi cell and reads
  // warp + 1's lo cell (one pointer each, per parity and array at fixed offsets). Across a cluster boundary
  // the end thread also pushes its cell into the neighbour CTA's edge array (lo[cta_warps + 1], hi[0]).
  const int edge_arr = 2 * (cta_warps + 2), edge_parity = A * edge_arr;  // element offsets
  const bool end_lane = lane == 0 || lane == kWarpSize - 1;
  const Ptr<acc_t> own_edge = lane == 0 ? edge(0, 0, 0, warp + 1) : edge(0, 0, 1, warp + 1);
  const Ptr<const acc_t> next_edge = lane == 0 ? edge(0, 0, 1, warp) : edge(0, 0, 0, warp + 2);
  Ptr<acc_t> push_edge = nullptr;
  bool push = false;
  if (CLUSTER) {
    if (tid == 0 && rank > 0) {
      push = true;
      push_edge = edge_in(dev.map_remote(edges, rank - 1), 0, 0, 0, cta_warps + 1);
    } else if (tid == threads - 1 && rank < csize - 1) {
      push = true;
      push_edge = edge_in(dev.map_remote(edges, rank + 1), 0, 0, 1, 0);
    }
  }
  auto write_edges = [&](int parity, const acc_t (&v)[2][VT]) {
#pragma unroll
    for (int a = 0; a < A; ++a) {
      const acc_t x = lane == 0 ? v[a][0] : v[a][VT - 1];
      const int at = parity * edge_parity + a * edge_arr;
      if (end_lane) dev.st(own_edge + at, x);
      if (CLUSTER && push) dev.st_remote(push_edge + at, x);
    }
  };
  // The cells no thread of this CTA writes, read from step 1 on (ordered by its barrier): the row's ends
  // (-inf at every frame) and, at a CTA boundary inside a cluster, the neighbour's cell of frame 0 (parity
  // 0). The neighbour pushes its cells of frames 1, 2, ... after the cluster barrier of step 1, 2, ...,
  // but never its frame-0 cell: distributed shared memory may be accessed only once every CTA of
  // the cluster is known to have started (CUDA C++ Programming Guide, "Distributed Shared Memory":
  // "Accessing data in distributed shared memory requires all the thread blocks to exist", which a
  // cluster barrier guarantees), and before step 1's barrier nothing does. That cell is -inf anyway (at
  // frame 0 only slot 0, the first thread's of rank 0, is live, and a pushed cell is slot s0 >= 32 or
  // s0 + span - 1 >= 31), so every CTA writes it itself. This costs no barrier (the other fix, an early
  // barrier.cluster.arrive.relaxed and a wait before the push, costs a cluster barrier per launch).
#pragma unroll
  for (int parity = 0; parity < 2; ++parity)
#pragma unroll
    for (int a = 0; a < A; ++a) {
      if (tid == 0 && (!CLUSTER || rank == 0 || parity == 0)) dev.st(edge(parity, a, 1, 0), NEG);
      if (tid == active - 1 && (!CLUSTER || rank == csize - 1 || parity == 0)) dev.st(edge(parity, a, 0, warps + 1), NEG);
    }
  auto step_barrier = [&] {
    if (CLUSTER)
      dev.cluster_sync();
    else
      dev.bar_sync(kStepBarrier, active);
  };

  // frame 0 (alpha) or T_b (beta): the only live state is slot 0 (u = 0, resp. u = U)
  acc_t r[2][VT];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int k = 0; k < VT; ++k) r[a][k] = NEG;
  if (j0 == 0) {
    if (dir == kAlpha) {
      r[0][0] = 0;  // alpha_0(0) (preserve state 0, standard blank 0)
    } else if (MODE == kPreserve) {
      r[0][0] = 0;  // beta_T(U)
    } else {
      r[0][0] = standard_blank_hi(T_b, U_b) >= U_b ? acc_t(0) : NEG;
      r[1][0] = U_b > 0 ? acc_t(0) : NEG;
    }
  }
  store_row(r);
  // frame 0's cells; in a cluster the own ones only: no DSMEM store before the first cluster barrier (see
  // above). (The same stores as write_edges(0, r) without a cluster, which is what that path calls: nvcc's
  // code for the kernels without clusters stays byte for byte what it was.)
  if (CLUSTER) {
    if (end_lane)
#pragma unroll
      for (int a = 0; a < A; ++a) dev.st(own_edge + a * edge_arr, lane == 0 ? r[a][0] : r[a][VT - 1]);
  } else {
    write_edges(0, r);
  }
#pragma unroll
  for (int n = 1; n < STAGES; ++n) {
    if (n <= T_b) stage_step(n);
    dev.commit();
  }

  for (int n = 1; n <= T_b; ++n) {
    dev.template wait_prior<STAGES - 2>();  // this thread's copies for step n have landed
    step_barrier();  // everyone's have; step n - 1's edges are visible; stage (n - 1) % STAGES is free
    if (n + STAGES - 1 <= T_b) stage_step(n + STAGES - 1);
    dev.commit();

    // neighbours: w[a][0] = slot j0 - 1, w[a][1 + k] = slot j0 + k, w[a][VT + 1] = slot j0 + VT
    const int parity = (n - 1) & 1;
    acc_t w[2][VT + 2];
#pragma unroll
    for (int a = 0; a < A; ++a) {
      acc_t left = dev.shfl_up(kFullMask, r[a][VT - 1], 1);
      acc_t right = dev.shfl_down(kFullMask, r[a][0], 1);
      // lane 0: warp - 1's hi cell (or the left CTA's), lane 31: warp + 1's lo cell (or the right CTA's)
      acc_t across = NEG;
      if (end_lane) across = dev.ld(next_edge + parity * edge_parity + a * edge_arr);
      if (lane == 0) left = across;
      if (lane == kWarpSize - 1) right = across;
      w[a][0] = left;
#pragma unroll
      for (int k = 0; k < VT; ++k) w[a][k + 1] = r[a][k];
      w[a][VT + 1] = right;
    }

    const Ptr<const acc_t> e = stage_emit(n);
    const acc_t e_special = dev.ld(e + stride - 1);
    const int f = frame_of(n);
    acc_t v[2][VT];
    // States past the band's top are -inf (slots below its base do not exist); the cells are computed
    // unconditionally and masked by one compare and select each: slot j0 + k holds u = rel + k (rel >= 0),
    // kept while u <= hi0 (hi1 for labels, which also need u >= 1).
    if (dir == kAlpha) {
      // alpha_f from alpha_{f-1}: slot j holds u = base(f) + j; u at f-1 is slot j + d, u - 1 is j + d - 1
      const int base = base_of(f);
      const bool d = base != base_of(f - 1);
      const int hi0 = MODE == kPreserve ? imin(f, U_b) : imin(U_b, imax(0, f - 1)), hi1 = imin(f, U_b);
      const int rel = base + j0, l0 = hi0 - rel, l1 = hi1 - rel;
      const Ptr<const float> skip_window = skip_s + (rel - s0);  // skip of u = rel + k at [k]
#pragma unroll
      for (int k = 0; k < VT; ++k) {
        const acc_t e_u = dev.ld(e + (j0 + k - s0 + 1));
        if (MODE == kPreserve) {
          const acc_t stay = d ? w[0][k + 2] : w[0][k + 1];
          const acc_t advance = d ? w[0][k + 1] : w[0][k];
          const acc_t cell = preserve_alpha_cell(stay, advance, e_special, e_u);
          v[0][k] = k <= l0 ? cell : NEG;
        } else {
          const acc_t blank_u = d ? w[0][k + 2] : w[0][k + 1], label_u = d ? w[1][k + 2] : w[1][k + 1];
          const acc_t blank_u1 = d ? w[0][k + 1] : w[0][k], label_u1 = d ? w[1][k + 1] : w[1][k];
          const acc_t skip_u = acc_t(dev.ld(skip_window + k));
          const acc_t blank = standard_blank_alpha_cell(blank_u, label_u, e_special);
          const acc_t label = standard_label_alpha_cell(label_u, blank_u1, label_u1 + skip_u, e_u);
          v[0][k] = k <= l0 ? blank : NEG;
          v[1][k] = (k > 0 || rel > 0) && k <= l1 ? label : NEG;
        }
      }
      store_row(v);
    } else {
      // beta_{f-1} from beta_f: slot j holds u = base(f-1) + j; u at f is slot j - d, u + 1 is j - d + 1;
      // the stage holds frame f's emissions by frame-f slot
      const int base = base_of(f - 1);
      const bool d = base_of(f) != base;
      const int g = f - 1;
      const int hi0 = MODE == kPreserve ? imin(g, U_b) : imin(U_b, imax(0, g - 1)), hi1 = imin(g, U_b);
      const int rel = base + j0, l0 = hi0 - rel, l1 = hi1 - rel;
      const Ptr<const float> skip_window = skip_s + (rel - s0);  // skip of u = rel + k at [k]
#pragma unroll
      for (int k = 0; k < VT; ++k) {
        const int q = j0 + k - s0 + 1 - (d ? 1 : 0);  // stage index of u
        const acc_t e_u = dev.ld(e + q), e_u1 = dev.ld(e + q + 1);
        if (MODE == kPreserve) {
          const acc_t own = d ? w[0][k] : w[0][k + 1];
          const acc_t next = d ? w[0][k + 1] : w[0][k + 2];
          const acc_t cell = preserve_beta_cell(own, next, e_special, e_u1);
          v[0][k] = k <= l0 ? cell : NEG;
        } else {
          const acc_t blank_u = d ? w[0][k] : w[0][k + 1], label_u = d ? w[1][k] : w[1][k + 1];
          const acc_t label_u1 = d ? w[1][k + 1] : w[1][k + 2];
          const acc_t skip_u1 = acc_t(dev.ld(skip_window + k + 1));
          const acc_t blank = standard_blank_beta_cell(blank_u, label_u1, e_special, e_u1);
          const acc_t label = standard_label_beta_cell(label_u, blank_u, label_u1 + skip_u1, e_special, e_u, e_u1);
          v[0][k] = k <= l0 ? blank : NEG;
          v[1][k] = (k > 0 || rel > 0) && k <= l1 ? label : NEG;
        }
      }
      store_row(v);
    }
    write_edges(n & 1, v);
#pragma unroll
    for (int a = 0; a < A; ++a)
#pragma unroll
      for (int k = 0; k < VT; ++k) r[a][k] = v[a][k];
  }
  // no CTA leaves (its shared memory goes away) while a neighbour may still push into its edge cells
  if (CLUSTER) dev.cluster_sync();

  if (dir == kAlpha && j0 == 0) {  // slot 0 of frame T_b is u = U
    const acc_t loglik = (MODE == kPreserve || U_b == 0) ? r[0][0] : logaddexp(r[0][0], r[1][0]);
    if (loglik > NEG) {
      p.nll[b] = -loglik;
      p.status[b] = kRowOk;
    } else {  // no complete path (or NaN): no posteriors, like the CPU kernel
      p.nll[b] = loglik != loglik ? loglik : pos_inf<acc_t>();
      p.status[b] = kRowZero;
    }
  }
}

// The direction is a template parameter: each CTA runs the loop of its own direction only.
template <typename acc_t, int MODE, int VT, int STAGES, bool CLUSTER, template <typename> class Ptr, class Dev>
MDLM_DEV void recurrence(const RecurrenceParams<acc_t, Ptr>& p, typename NonDeduced<Ptr<unsigned char>>::type smem,
                         Dev& dev) {
  if (dev.direction() == kAlpha)
    recurrence_pass<acc_t, MODE, VT, STAGES, CLUSTER, kAlpha>(p, smem, dev);
  else
    recurrence_pass<acc_t, MODE, VT, STAGES, CLUSTER, kBeta>(p, smem, dev);
}

// ---------------------------------------------------------------------------------------------
// posterior pass: one warp per frame row (b, f), f = 0..T-1 (frame t = f + 1)
// ---------------------------------------------------------------------------------------------

template <typename acc_t, int MODE, template <typename> class Ptr, class Dev>
MDLM_DEV void posterior_row(const PosteriorParams<acc_t, Ptr>& p, int64_t b, int64_t f, int lane, Dev& dev) {
  const int64_t T = p.T, W = p.W, S = p.store_stride;
  const Ptr<acc_t> row = p.table + (b * T + f) * W;
  const Ptr<acc_t> special = p.special + b * T + f;
  const int32_t status = p.status[b];
  const int64_t T_b = clamp_length(p.input_lengths[b], T), U_b = clamp_length(p.target_lengths[b], p.U_max);
  if (status != kRowOk || f >= T_b) {
    const acc_t fill = status == kRowNaN ? quiet_nan<acc_t>() : acc_t(0);
    for (int64_t j = lane; j < W; j += kWarpSize) row[j] = fill;
    if (lane == 0) *special = fill;
    return;
  }
  const int64_t shift = MODE == kPreserve ? p.max_shift : -1;
  const acc_t loglik = -p.nll[b];
  const int64_t t = f + 1;
  // lane 0 alone reads and later overwrites *special: no other lane touches it, so no ordering is needed
  const acc_t e_special = dev.shfl(kFullMask, lane == 0 ? *special : acc_t(0), 0);
  acc_t slack = 0;
  if (MODE == kPreserve) {
    const int64_t lo_t = preserve_state_lo(t, T_b, U_b, shift), hi_t = preserve_state_hi(t, U_b);
    const int64_t lo_p = preserve_state_lo(t - 1, T_b, U_b, shift), hi_p = preserve_state_hi(t - 1, U_b);
    const Ptr<const acc_t> a = p.alpha[0] + (b * (T + 1) + t - 1) * S;  // alpha_{t-1}(u) at u - lo_p
    const Ptr<const acc_t> n = p.beta[0] + (b * (T + 1) + t) * S;       // beta_t(u) at u - lo_t
    for (int64_t u = imax(lo_t, lo_p) + lane; u <= imin(hi_t, hi_p); u += kWarpSize)
      slack += LogMath<acc_t>::exp(a[u - lo_p] + e_special + n[u - lo_t] - loglik);
    const int64_t c_lo = column_lo(t, T_b, U_b, shift);
    const int64_t u_lo = imax(imax(c_lo, lo_t), lo_p + 1);
    const int64_t u_hi = imin(imin(column_hi(t, U_b), hi_t), imin(hi_p + 1, c_lo + W - 1));
    for (int64_t j = lane; j < W; j += kWarpSize) {
      const int64_t u = c_lo + j;
      row[j] = (u >= u_lo && u <= u_hi) ? LogMath<acc_t>::exp(a[u - 1 - lo_p] + row[j] + n[u - lo_t] - loglik)
                                        : acc_t(0);
    }
  } else {
    const int64_t base = standard_blank_lo(t, T_b, U_b);  // both arrays of frame t are stored from here
    const Ptr<const acc_t> ab = p.alpha[0] + (b * (T + 1) + t) * S;
    const Ptr<const acc_t> al = p.alpha[1] + (b * (T + 1) + t) * S;
    const Ptr<const acc_t> nb = p.beta[0] + (b * (T + 1) + t) * S;
    const Ptr<const acc_t> nl = p.beta[1] + (b * (T + 1) + t) * S;
    for (int64_t u = base + lane; u <= standard_blank_hi(t, U_b); u += kWarpSize)
      slack += LogMath<acc_t>::exp(ab[u - base] + nb[u - base] - loglik);
    const int64_t c_lo = standard_label_lo(t, T_b, U_b);
    const int64_t c_hi = imin(standard_label_hi(t, U_b), c_lo + W - 1);
    for (int64_t j = lane; j < W; j += kWarpSize) {
      const int64_t u = c_lo + j;
      row[j] = u <= c_hi ? LogMath<acc_t>::exp(al[u - base] + nl[u - base] - loglik) : acc_t(0);
    }
  }
  // fixed-order butterfly: the same sum on every run
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) slack += dev.shfl_xor(kFullMask, slack, offset);
  if (lane == 0) *special = slack;
}

}  // namespace cuda_lattice
}  // namespace mdlm_ctc
