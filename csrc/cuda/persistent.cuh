// fastrnn: persistent recurrences (Elman, LSTM, GRU): one launch covers all T
// steps, and W_hh stays in shared memory throughout, split over the CTAs of a
// thread-block cluster (sm_90) where it does not fit one CTA; a "cluster" of
// one CTA runs anywhere. A cluster owns a tile of batch rows; CTA r of it
// owns hidden units [r * units, (r + 1) * units) and keeps W_hh's slice for
// them (every gate's) in shared memory. Each step every CTA computes its units
// for the tile's rows and writes what the next step needs from them into
// every CTA of the cluster (distributed shared memory, by st.async): the
// forward's h_t, the backward's dA_t; each CTA waits on its own mbarrier for
// them (Handover). Nothing goes through global memory between steps, and no
// cluster barrier runs inside the loop.
//
// Shapes (N rows of the flattened sequence, B batch, H hidden, T steps, G
// gates: 1 Elman, 4 LSTM (i f g o), 3 GRU (r z n); every [rows, width]
// argument has unit column stride and the row stride ld_<name>):
//   w_hh         [G*H, H] row-major, W[r][k] (gate row r, input unit k)
//   hx (h0), c0  [B, H]   initial state;  grad_hx, grad_cx [B, H] written for
//                         rows that began at the initial state
//   runs         the batch sizes of a packed sequence, by value (Runs, below);
//                count 0 for a padded one (batch B at every step, step t at row t * B)
// and per cell at its kernels below. Launch: grid = clusters * cluster_size
// CTAs of kThreads, cluster dims (cluster_size, 1, 1), dynamic shared memory
// *_smem(H, units, tile). Cluster c handles batch rows [c * tile, c * tile +
// tile), tile <= (kThreads / units) * kRows. Step t's rows [0, carried)
// continue from the previous step and rows [carried, batch_t) start from the
// initial state (layout.h, StepRows): a state row simply holds its row's
// latest state, the initial one until it starts.
#pragma once

#include "../activation.h"
#include "../cells.h"
#include "../numeric.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>

#if !defined(FASTRNN_PERSISTENT_ON_HOST)
#include <cooperative_groups.h>
#include <cuda/ptx>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>
#endif

namespace fastrnn {

namespace persistent {

// A kernel's CTAs have kThreads threads, one CTA per SM (__launch_bounds__(kThreads, 1):
// W's slice takes the SM's shared memory), so a thread may have up to 255 registers.
constexpr int kThreads = 256;
constexpr int kRows = 4;  // batch rows per thread at most
constexpr int kMaxLanes = 8;  // lanes of a warp that share one unit's sum at most
constexpr int kLstmGates = 4;
constexpr int kGruGates = 3;

// A packed sequence's batch sizes as runs of steps of equal size, passed by
// value in the kernels' parameters (__grid_constant__): nothing to copy to the
// device before a launch, so no host sync, and a CUDA graph keeps them in its
// kernel nodes. Run i covers steps [first[i], first[i + 1]) (the last to the
// sequence's end), size[i] rows each, from row offset[i] on. A non-increasing
// batch_sizes has one run per distinct length; kMaxRuns keeps the kernels'
// parameters inside the portable 4 KB.
constexpr int kMaxRuns = 192;
struct Runs {
  int count = 0;  // 0: a padded sequence
  int32_t first[kMaxRuns];
  int32_t size[kMaxRuns];
  int64_t offset[kMaxRuns];
};
static_assert(sizeof(Runs) <= 3200, "the kernels' other parameters need the rest of 4 KB");

// Runs of batch_sizes [steps] (non-increasing, positive); false where more
// than kMaxRuns (the caller steps with GEMMs instead).
inline bool make_runs(const int64_t* batch_sizes, int64_t steps, Runs& r) {
  r.count = 0;
  if (steps > INT32_MAX) return false;
  int64_t row = 0;
  for (int64_t t = 0; t < steps; ++t) {
    if (t == 0 || batch_sizes[t] != batch_sizes[t - 1]) {
      if (r.count == kMaxRuns || batch_sizes[t] > INT32_MAX) return false;
      r.first[r.count] = static_cast<int32_t>(t);
      r.size[r.count] = static_cast<int32_t>(batch_sizes[t]);
      r.offset[r.count] = row;
      ++r.count;
    }
    row += batch_sizes[t];
  }
  return true;
}

__device__ __forceinline__ int clamp_rows(int64_t rows, int64_t b0, int tile) {
  const int64_t n = rows - b0;
  return n <= 0 ? 0 : (n >= tile ? tile : static_cast<int>(n));
}

// Lanes per sum: where a CTA's units x tile rows leave threads idle, F adjacent
// lanes of a warp share each unit and row, each summing its own range of k, and
// add their sums with F - 1 shuffles: a step's chain of multiply-adds is F times
// shorter. F is a power of two up to kMaxLanes with units * tile * F <= kThreads.
__host__ __device__ inline int lanes(int units, int tile) {
  int F = 1;
  while (F < kMaxLanes && static_cast<int64_t>(units) * tile * F * 2 <= kThreads) F *= 2;
  return F;
}

// k per vector load: 16 bytes of the arithmetic's type (a row of h or dA in
// shared memory), V values of W in the storage type beside them.
template <typename acc_t>
constexpr int kVec = 16 / static_cast<int>(sizeof(acc_t));

// N values from a pointer aligned to all N of them: one vector load.
template <typename U, int N>
struct alignas(sizeof(U) * N) Block {
  U v[N];
};
template <int N, typename U>
__device__ __forceinline__ Block<U, N> load_block(const U* p) {
  return *reinterpret_cast<const Block<U, N>*>(p);
}

// A product of the rows of a buffer (h or dA, K values each) with W's slice:
// C sums per unit (the forward's G gates over k < H; the backward's one sum
// over k < G * H). Lane f of a unit's F takes k in [f * blocks * V, (f + 1) *
// blocks * V), in blocks of V; K is padded with zeros up to F * blocks * V. W's
// slice is one run of `stride` blocks per thread (unit u, lane f: run u * F + f),
// block m * C + c holding sum c's V values of W at the lane's block m, so that a
// thread reads its W at fixed offsets, with vector loads. Bank conflicts: the
// threads of a load's phase read runs `stride` blocks apart, so stride is odd;
// the F lanes read a row `blocks` blocks apart, so blocks is odd where F > 1;
// rows are an odd number of blocks apart too (ld: F * blocks * V, or V more).
// What is left is two-way, in phases that straddle two groups of threads
// (tests/test_persistent_on_host.py counts them).
struct Slice {
  int C, K, F, V;
  int blocks;  // per lane
  int stride;  // blocks of W per thread
  int ld;      // values per row of the buffers
  __host__ __device__ Slice(int C_, int K_, int F_, int V_) : C(C_), K(K_), F(F_), V(V_) {
    blocks = ((K + V - 1) / V + F - 1) / F;
    if (F > 1 && blocks % 2 == 0) ++blocks;
    stride = blocks * C;
    if (stride % 2 == 0) ++stride;
    ld = ((F * blocks) | 1) * V;
  }
  // W's slice for `units` units, in values.
  __host__ __device__ size_t values(int units) const { return static_cast<size_t>(units) * F * stride * V; }
  // Where unit u's lane f keeps sum c's block m, in values.
  __host__ __device__ size_t offset(int u, int f, int m, int c) const {
    return (static_cast<size_t>(u * F + f) * stride + m * C + c) * V;
  }
};

// The forward's product (C = G sums over k < H) or the backward's (one sum over
// k < width = G * H), for a CTA's units and tile.
template <typename acc_t>
__host__ __device__ inline Slice slice_of(int G, int H, int width, int units, int tile) {
  const int F = lanes(units, tile);
  return width == H ? Slice(G, H, F, kVec<acc_t>) : Slice(1, width, F, kVec<acc_t>);
}

// Shared memory: two mbarriers (Handover, below); W's slice in the storage
// type T (the weights as given: half types take half the room of float, and no
// rounding); then, 16-byte aligned, in acc_t: two buffers of the tile's rows of
// the product's input (h or dA, Slice::ld values each), and `extra` [tile][units]
// buffers.
__host__ __device__ inline size_t aligned16(size_t bytes) { return (bytes + 15) / 16 * 16; }
constexpr size_t kBarrierBytes = 2 * sizeof(uint64_t);

template <typename T, typename acc_t>
__host__ __device__ inline size_t smem_bytes(int G, int H, int units, int tile, int width, int extra) {
  const Slice s = slice_of<acc_t>(G, H, width, units, tile);
  return kBarrierBytes + aligned16(s.values(units) * sizeof(T)) +
         (2 * static_cast<size_t>(tile) * s.ld + static_cast<size_t>(extra) * tile * units) * sizeof(acc_t);
}

template <typename T, typename acc_t>
__host__ __device__ inline size_t forward_smem(int H, int units, int tile) {
  return smem_bytes<T, acc_t>(1, H, units, tile, H, 0);
}
template <typename T, typename acc_t>
__host__ __device__ inline size_t backward_smem(int H, int units, int tile) {
  return smem_bytes<T, acc_t>(1, H, units, tile, H, 1);
}
template <typename T, typename acc_t>
__host__ __device__ inline size_t lstm_forward_smem(int H, int units, int tile) {
  return smem_bytes<T, acc_t>(kLstmGates, H, units, tile, H, 1);
}
template <typename T, typename acc_t>
__host__ __device__ inline size_t lstm_backward_smem(int H, int units, int tile) {
  return smem_bytes<T, acc_t>(kLstmGates, H, units, tile, kLstmGates * H, 2);
}
template <typename T, typename acc_t>
__host__ __device__ inline size_t gru_forward_smem(int H, int units, int tile) {
  return smem_bytes<T, acc_t>(kGruGates, H, units, tile, H, 0);
}
template <typename T, typename acc_t>
__host__ __device__ inline size_t gru_backward_smem(int H, int units, int tile) {
  return smem_bytes<T, acc_t>(kGruGates, H, units, tile, kGruGates * H, 1);
}

// How a launch splits a layer: CTAs per cluster (0: none fits), units per CTA,
// batch rows per cluster, clusters, and a CTA's shared memory in bytes.
struct Plan {
  int size = 0;
  int units = 0;
  int tile = 0;
  int clusters = 0;
  size_t smem = 0;
};

// What the plan needs of the device: the largest cluster it launches (1: no
// clusters; sm_90: 8, the portable size, or 16 with non-portable sizes
// allowed), a CTA's shared memory (the opt-in maximum), its SMs.
struct Device {
  int max_cluster;
  int64_t max_smem;
  int64_t sms;
};
constexpr int kMaxCluster = 16;

// A kernel's shared memory in bytes for (H, units, tile): *_smem<T, acc_t> above.
using SmemBytes = size_t (*)(int, int, int);

// The cluster size with the shortest step, by a rough count of a thread's
// serial multiply-adds (G gates per unit, over its lanes), the lanes'
// shuffles, a barrier, and waves where the
// clusters outnumber what the SMs hold at once: 1 (one CTA, a plain launch,
// any device) or 2, 4, 8 (the portable cluster sizes, sm_90), or 16 where
// nothing smaller fits (a non-portable size: a GPC holds one such cluster at
// most). Each cluster takes as few rows as lets every SM hold a CTA, fewer
// where shared memory runs out. Plan::size 0 where no size fits.
inline Plan plan(int64_t batch, int64_t H, int G, const Device& d, SmemBytes smem) {
  Plan best;
  if (H <= 0 || batch <= 0) return best;
  const auto bytes = [&](int64_t units, int64_t tile) {
    return static_cast<int64_t>(smem(static_cast<int>(H), static_cast<int>(units), static_cast<int>(tile)));
  };
  double best_cost = 0;
  for (int size : {1, 2, 4, 8, kMaxCluster}) {
    const int64_t units = (H + size - 1) / size;
    if (size > d.max_cluster || units > kThreads || (size == kMaxCluster && best.size != 0)) continue;
    const int64_t groups = kThreads / units;
    int64_t tile = std::min<int64_t>(
        {groups * kRows, batch, std::max<int64_t>(1, (batch * size + d.sms - 1) / d.sms)});
    while (tile > 1 && bytes(units, tile) > d.max_smem) --tile;
    if (bytes(units, tile) > d.max_smem) continue;
    const int F = lanes(static_cast<int>(units), static_cast<int>(tile));
    const int64_t rows = (tile + kThreads / F / units - 1) / (kThreads / F / units);
    const int64_t clusters = (batch + tile - 1) / tile;
    const int64_t waves = (clusters * size + d.sms - 1) / d.sms;
    const double cost = waves * (2.0 * G * H * rows / F + 30.0 * (F - 1) + (size > 1 ? 600 : 200));
    if (best.size == 0 || cost < best_cost) {
      best_cost = cost;
      best = {size, static_cast<int>(units), static_cast<int>(tile), static_cast<int>(clusters),
              static_cast<size_t>(bytes(units, tile))};
    }
  }
  return best;
}

#if !defined(FASTRNN_PERSISTENT_ON_HOST)
// The cluster's barrier (with release / acquire: shared-memory writes to other
// CTAs before it are seen by them after it), this CTA's rank in the cluster,
// the CTA's dynamic shared memory; cta_sync, the CTA's barrier; lane_xor, a warp's shuffle; warp_any and
// warp_sync; copy_async; and the mbarrier operations of a step's hand-over
// (Handover, below). A "cluster" of one CTA (size 1) is a plain launch on any
// device; larger ones need sm_90, and the host plans them only there. (Tests
// run the kernels on the CPU with their own definitions of these:
// tests/persistent_on_host.cpp.)
__device__ __forceinline__ void cluster_sync(int size) {
  if (size == 1) {
    __syncthreads();
    return;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#else
  __trap();
#endif
}

__device__ __forceinline__ unsigned cluster_rank(int size) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (size > 1) return cooperative_groups::this_cluster().block_rank();
#endif
  return 0;
}

__device__ __forceinline__ unsigned char* shared_memory() {
  extern __shared__ __align__(16) unsigned char smem[];
  return smem;
}

// v of the lane whose index differs from this one's in `mask`'s bits; every lane
// of the warp takes part.
template <typename U>
__device__ __forceinline__ U lane_xor(U v, int mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask);
}

// *dst = *src (shared from global), bytes 4, 8 or 16, aligned to them, in
// flight until copy_async_wait (cp.async, sm_80); copy_value: one value of T
// so, or by a load and a store where T is narrower than 4 bytes.
__device__ __forceinline__ void copy_async(void* dst, const void* src, size_t bytes) {
  __pipeline_memcpy_async(dst, src, bytes);
}
template <typename T>
__device__ __forceinline__ void copy_value(T* dst, const T* src) {
  if constexpr (sizeof(T) >= 4) {
    __pipeline_memcpy_async(dst, src, sizeof(T));
  } else {
    *dst = *src;
  }
}
__device__ __forceinline__ void copy_async_wait() {
  __pipeline_commit();
  __pipeline_wait_prior(0);
}

__device__ __forceinline__ void cta_sync() { __syncthreads(); }
__device__ __forceinline__ bool warp_any(bool v) { return __any_sync(0xffffffffu, v); }
__device__ __forceinline__ void warp_sync() { __syncwarp(); }

// An mbarrier that completes a phase when one arrival (arrive_expect's) and
// the bytes it announces have come.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cuda::ptx::mbarrier_init(bar, 1);
#else
  __trap();
#endif
}

// This thread's mbarrier_inits seen by the cluster's other CTAs (with the
// cluster barrier that follows).
__device__ __forceinline__ void publish_mbarriers() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cuda::ptx::fence_mbarrier_init(cuda::ptx::sem_release, cuda::ptx::scope_cluster);
#else
  __trap();
#endif
}

__device__ __forceinline__ void arrive_expect(uint64_t* bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cuda::ptx::mbarrier_arrive_expect_tx(cuda::ptx::sem_release, cuda::ptx::scope_cta, cuda::ptx::space_shared, bar,
                                       bytes);
#else
  __trap();
#endif
}

// *dst = v in CTA `rank`'s shared memory (dst and bar: their addresses in this
// CTA's), counted there by bar's mbarrier in that CTA.
template <typename U>
__device__ __forceinline__ void store_counted(U* dst, U v, uint64_t* bar, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const auto cluster = cooperative_groups::this_cluster();
  cuda::ptx::st_async(cluster.map_shared_rank(dst, rank), v, cluster.map_shared_rank(bar, rank));
#else
  __trap();
#endif
}

// Until bar's phase of the given parity has completed; what was counted in it
// is then seen. A cluster's CTAs run together, so a step's wait is as long as
// the slowest CTA's step; one that lasts about 10 seconds of clock means a
// CTA will never send (a fault), and the kernel traps rather than hang.
__device__ __forceinline__ void wait_phase(uint64_t* bar, unsigned parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const long long start = clock64();
  while (!cuda::ptx::mbarrier_try_wait_parity(cuda::ptx::sem_acquire, cuda::ptx::scope_cluster, bar, parity)) {
    if (clock64() - start > (1LL << 34)) __trap();
  }
#else
  __trap();
#endif
}
#endif

// Where a CTA works: its cluster's tile of batch rows and its own units.
struct Place {
  int size;       // CTAs in the cluster
  int64_t b0;     // the tile's first batch row
  int tile;       // rows per tile
  int rows;       // this tile's rows (fewer in the batch's last tile)
  int units;      // units per CTA
  unsigned rank;  // this CTA's in the cluster
  int j0;         // this CTA's first unit
  int nu;         // this CTA's units (fewer in the cluster's last CTA)
  int lanes;      // lanes per sum (lanes(), above)
  __device__ Place(int64_t batch, int H, int units_, int tile_, int cluster_size)
      : size(cluster_size), tile(tile_), units(units_), lanes(persistent::lanes(units_, tile_)) {
    b0 = static_cast<int64_t>(blockIdx.x / cluster_size) * tile;
    rows = clamp_rows(batch, b0, tile);
    rank = cluster_rank(cluster_size);
    j0 = static_cast<int>(rank) * units;
    nu = max(0, min(units, H - j0));
  }
};

// A CTA's shared memory as smem_bytes counts it: the buffers' mbarriers full[2],
// W's slice w (in T, laid out as `s` says), the two buffers of the tile's rows
// that the product reads (buffer(0), buffer(1): h or dA, s.ld values per row),
// and the [tile][units] buffers extra(0), extra(1), ...
template <typename T, typename acc_t>
struct Smem {
  uint64_t* full;
  T* w;
  acc_t* buffers;
  Slice s;
  int tile, units;
  __device__ Smem(const Place& p, int G, int H, int width)
      : s(slice_of<acc_t>(G, H, width, p.units, p.tile)), tile(p.tile), units(p.units) {
    full = reinterpret_cast<uint64_t*>(shared_memory());
    w = reinterpret_cast<T*>(shared_memory() + kBarrierBytes);
    buffers = reinterpret_cast<acc_t*>(shared_memory() + kBarrierBytes + aligned16(s.values(units) * sizeof(T)));
  }
  // After every thread has put its part of the initial state in place: the
  // mbarriers ready (a cluster's), and every CTA of the cluster running, with
  // its state (so its shared memory may be written).
  __device__ void begin(const Place& p) const {
    if (p.size > 1 && threadIdx.x == 0) {
      mbarrier_init(full);
      mbarrier_init(full + 1);
      publish_mbarriers();
    }
    cluster_sync(p.size);
  }
  __device__ acc_t* buffer(int i) const { return buffers + i * tile * s.ld; }
  __device__ acc_t* extra(int i) const { return buffer(2) + i * tile * units; }
};

// A thread's share of its CTA's units x tile rows: unit u (j = j0 + u), rows
// g, g + groups, ... (at most kRows of them), lane f of the p.lanes adjacent
// lanes that share them. Lane 0 holds the sums and finishes the step (works).
struct Share {
  int f, u, g, groups, j;
  bool works;
  __device__ explicit Share(const Place& p) {
    f = threadIdx.x % p.lanes;
    const int t = threadIdx.x / p.lanes;
    groups = kThreads / p.lanes / p.units;
    u = t % p.units;
    g = t / p.units;
    j = p.j0 + u;
    works = f == 0 && g < groups && u < p.nu;
  }
  __device__ int row(int i) const { return g + i * groups; }
};

// The sequence: its layout and the forward's order.
struct Sequence {
  const Runs* runs;  // the kernel's __grid_constant__ parameter
  int64_t steps, batch;
  bool reverse;

  // Step t's rows and its first row (0 rows outside the sequence). run: the
  // run of the step looked up last, a hint; steps come in order, so it moves
  // by at most one run per step.
  __device__ __forceinline__ void at(int64_t t, int& run, int64_t& rows, int64_t& first_row) const {
    rows = 0;
    first_row = 0;
    if (t < 0 || t >= steps) return;
    if (runs->count == 0) {
      rows = batch;
      first_row = t * batch;
      return;
    }
    while (run > 0 && t < runs->first[run]) --run;
    while (run + 1 < runs->count && t >= runs->first[run + 1]) ++run;
    rows = runs->size[run];
    first_row = runs->offset[run] + (t - runs->first[run]) * rows;
  }
};

// Step s of the forward's order (t = T-1-s when reverse): the tile's rows in it
// (active), those that continue the previous step's (carried; the others begin
// at the initial state), and the first rows of the step and the previous one.
// run: Sequence::at's hint, kept by the caller from step to step.
struct Step {
  int active, carried;
  int64_t row0, prev0;
  __device__ Step(const Place& p, const Sequence& q, int64_t s, int& run) {
    const int64_t t = q.reverse ? q.steps - 1 - s : s, prev = q.reverse ? t + 1 : t - 1;
    int64_t rows_t, rows_prev, first_t, first_prev;
    int prev_run = run;
    q.at(prev, prev_run, rows_prev, first_prev);
    q.at(t, run, rows_t, first_t);
    active = clamp_rows(rows_t, p.b0, p.tile);
    carried = clamp_rows(min(rows_t, rows_prev), p.b0, p.tile);
    row0 = first_t + p.b0;
    prev0 = rows_prev > 0 ? first_prev + p.b0 : 0;
  }
};

// W's slice in s's layout: zeros first (the padding), then W's values, copied
// asynchronously (cp.async, no register in between), so that the copies of the
// whole slice are in flight at once rather than one load's latency per value
// or few: the slice is up to the SM's whole shared memory, loaded at every
// launch. The caller's next barrier makes the slice seen by every thread.
template <typename T>
__device__ void clear_slice(T* w, const Slice& s, const Place& p) {
  const int values = static_cast<int>(s.values(p.units));
  const int chunks = values * static_cast<int>(sizeof(T)) / 16, tail = chunks * 16 / static_cast<int>(sizeof(T));
  for (int i = threadIdx.x; i < chunks; i += kThreads) reinterpret_cast<Block<uint32_t, 4>*>(w)[i] = {};
  for (int i = tail + threadIdx.x; i < values; i += kThreads) w[i] = store<T>(0.0f);
  cta_sync();  // the zeros before the copies
}

// The forward's slice: sum c of unit j (= j0 + u) takes W[c * H + j][k] at k < H.
// A thread copies a block of V values of k at a time, contiguous in W and in
// the slice (where W's rows are aligned to it; else value by value).
template <typename T>
__device__ void load_unit_rows(T* w, const Slice& s, const T* w_hh, int H, const Place& p) {
  clear_slice(w, s, p);
  const int V = s.V, blocks = s.blocks;
  const bool whole = H % V == 0 && reinterpret_cast<uintptr_t>(w_hh) % (V * sizeof(T)) == 0;
  const int n = s.C * p.nu * s.F * blocks;  // (c, u, f, block), block fastest
  for (int q = threadIdx.x; q < n; q += kThreads) {
    const int mb = q % blocks, run_f = q / blocks, f = run_f % s.F, t = run_f / s.F, u = t % p.nu, c = t / p.nu;
    const int k0 = (f * blocks + mb) * V;
    if (k0 >= H) continue;
    T* dst = w + s.offset(u, f, mb, c);
    const T* src = w_hh + (static_cast<int64_t>(c) * H + p.j0 + u) * H + k0;
    if (whole) {
      copy_async(dst, src, V * sizeof(T));
    } else {
      for (int v = 0; v < V && k0 + v < H; ++v) copy_value(dst + v, src + v);
    }
  }
  copy_async_wait();
}

// The backward's slice: unit j's one sum takes W[r][j] at r < G * H: copied
// value by value, consecutive threads on consecutive units (W's rows).
template <typename T>
__device__ void load_unit_columns(T* w, const Slice& s, const T* w_hh, int H, const Place& p) {
  clear_slice(w, s, p);
  const int V = s.V, span = s.blocks * V;
  const int n = s.K * p.nu;  // (r, u), u fastest
  for (int q = threadIdx.x; q < n; q += kThreads) {
    const int u = q % p.nu, r = q / p.nu, f = r / span, rl = r - f * span;
    T* dst = w + s.offset(u, f, rl / V, 0) + rl % V;
    copy_value(dst, w_hh + static_cast<int64_t>(r) * H + p.j0 + u);
  }
  copy_async_wait();
}

// dst[b * ld + k] = src[(b0 + b) * ld_src + k0 + k] for the tile's rows b and k
// < width; 0 in the rest of dst's tile x ld values (rows past the batch,
// padding the product reads).
template <typename T, typename acc_t>
__device__ void load_tile(acc_t* dst, int ld, const T* src, int64_t ld_src, int k0, int width,
                          const Place& p) {
  for (int i = threadIdx.x; i < p.tile * ld; i += kThreads) {
    const int b = i / ld, k = i - b * ld;
    dst[i] = b < p.rows && k < width ? load<acc_t>(src[(p.b0 + b) * ld_src + k0 + k]) : acc_t(0);
  }
}

template <typename acc_t>
__device__ void clear(acc_t* dst, int n) {
  for (int i = threadIdx.x; i < n; i += kThreads) dst[i] = acc_t(0);
}

// Where a thread's product reads, in values: its run of W's slice (block m,
// sum c at + (m * C + c) * V), and its lane's range of its i-th row of the
// buffer (block m at + m * V; rows past the tile read row 0's).
__device__ inline size_t run_offset(const Slice& s, const Share& me) { return s.offset(me.u, me.f, 0, 0); }
__device__ inline int row_offset(const Slice& s, const Place& p, const Share& me, int i) {
  const int b = me.row(i) < p.tile ? me.row(i) : 0;
  return b * s.ld + me.f * s.blocks * s.V;
}

// acc[i][c] += sum over k < K of src[b * ld + k] * (unit u's sum c at k in the
// slice w), for this thread's rows b = me.row(i), i < R (rows past R stay as
// they are). A step's time is this loop's, latency- and issue-bound where a
// thread has one or two rows: so a thread's loop is compiled for the rows it
// has, reads V k at a time with one vector load of W per sum and one of src per
// row at fixed offsets, and keeps R * C * V independent sums; lane f takes its
// own range of k (Slice), and the F lanes then add theirs. Rows past the
// step's are summed too (their sums go unused: a uniform loop costs less than
// a predicated one), from row 0 where past the tile. Every thread of the CTA
// calls this (the shuffles need every lane of a warp); only lane 0's acc is
// complete.
template <int C, int R, typename T, typename acc_t>
__device__ __forceinline__ void accumulate_rows(acc_t (&acc)[kRows][C], const acc_t* src, const T* w,
                                                const Slice& s, const Place& p, const Share& me) {
  constexpr int V = kVec<acc_t>;
  const T* w_run = w + run_offset(s, me);
  const acc_t* rows[R];
#pragma unroll
  for (int i = 0; i < R; ++i) rows[i] = src + row_offset(s, p, me, i);
  acc_t part[R][C][V] = {};
  constexpr int kUnroll = R * C * V * sizeof(acc_t) > 128 ? 2 : 4;  // the widest (LSTM, 4 rows) in registers
#pragma unroll kUnroll
  for (int m = 0; m < s.blocks; ++m) {
    acc_t wk[C][V];
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const Block<T, V> wb = load_block<V>(w_run + (m * C + c) * V);
#pragma unroll
      for (int v = 0; v < V; ++v) wk[c][v] = load<acc_t>(wb.v[v]);
    }
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const Block<acc_t, V> x = load_block<V>(rows[i] + m * V);
#pragma unroll
      for (int c = 0; c < C; ++c) {
#pragma unroll
        for (int v = 0; v < V; ++v) part[i][c][v] += x.v[v] * wk[c][v];
      }
    }
  }
#pragma unroll
  for (int i = 0; i < R; ++i) {
#pragma unroll
    for (int c = 0; c < C; ++c) {
      acc_t sum = part[i][c][0];
#pragma unroll
      for (int v = 1; v < V; ++v) sum += part[i][c][v];
      for (int lane = s.F / 2; lane > 0; lane /= 2) sum += lane_xor(sum, lane);
      acc[i][c] += sum;
    }
  }
}

// accumulate_rows for as many rows as the CTA's threads have: ceil(tile / groups),
// the same in every thread, so the branch does not diverge.
template <int C, typename T, typename acc_t>
__device__ __forceinline__ void accumulate(acc_t (&acc)[kRows][C], const acc_t* src, const Smem<T, acc_t>& m,
                                           const Place& p, const Share& me) {
  const int rows = (p.tile + me.groups - 1) / me.groups;
  if (rows == 1) {
    accumulate_rows<C, 1>(acc, src, m.w, m.s, p, me);
  } else if (rows == 2) {
    accumulate_rows<C, 2>(acc, src, m.w, m.s, p, me);
  } else {
    accumulate_rows<C, kRows>(acc, src, m.w, m.s, p, me);
  }
}

// A step's hand-over of its values (the forward's h_t, the backward's dA_t)
// to every CTA of the cluster, and the wait until all of them are there. One
// CTA: plain stores, then __syncthreads. A cluster: a CTA's own values go into
// its buffer by plain stores, seen by its threads after a __syncthreads; into
// the other CTAs' buffers by st.async, whose bytes the buffer's mbarrier there
// counts, and a CTA waits on its own mbarrier for them. (A cluster barrier per
// step would cost a round trip to L2: its release waits for every global store
// and load before it.) A buffer is written again two steps later, by CTAs that
// have received this CTA's values of the step between, which its threads send
// after they have read the buffer (their warps synchronised, warps that read
// nothing skipping the reads): no CTA writes a buffer that another still reads.
template <typename acc_t>
struct Handover {
  uint64_t* full;       // this CTA's mbarriers, one per buffer
  int size;             // CTAs in the cluster
  unsigned rank;        // this CTA's
  uint32_t bytes;       // what a step puts into each of this CTA's buffers from the other CTAs
  bool reads;           // this thread's warp reads the buffers (one of its threads works)
  unsigned parity = 0;  // bit b: the parity of buffer b's phase to wait for next

  // values: what a CTA puts into every buffer per step for each of its H units' worth.
  __device__ Handover(uint64_t* full_, const Place& p, const Share& me, int H, int values)
      : full(full_), size(p.size), rank(p.rank),
        bytes(static_cast<uint32_t>(static_cast<size_t>(values) * (H - p.nu) * sizeof(acc_t))),
        reads(warp_any(me.works)) {}

  // Thread 0 announces a step's bytes for buffer b: the phase's one arrival.
  __device__ void expect(int b) const {
    if (size > 1 && threadIdx.x == 0) arrive_expect(full + b, bytes);
  }
  // v[g] into buffer b's (buf's) row r at j + g * H, in every CTA.
  template <int G>
  __device__ __forceinline__ void put(acc_t* buf, int b, int ld, int r, int j, int H, const acc_t (&v)[G]) const {
    acc_t* dst = buf + r * ld + j;
#pragma unroll
    for (int g = 0; g < G; ++g) dst[g * H] = v[g];
    for (unsigned other = 0; other < static_cast<unsigned>(size); ++other) {
      if (other == rank) continue;
#pragma unroll
      for (int g = 0; g < G; ++g) store_counted(dst + g * H, v[g], full + b, other);
    }
  }
  // Until buffer b holds the step's values from every CTA. Warp 0 waits even
  // where it reads nothing (a CTA with no units of its own), so that every
  // value sent into this CTA has landed before it leaves.
  __device__ void wait(int b) {
    cta_sync();  // this CTA's own values
    if (size == 1) return;
    if (reads || threadIdx.x < 32) wait_phase(full + b, (parity >> b) & 1u);
    parity ^= 1u << b;
  }
};

// A thread's values for its rows of a step, from global memory: load(b, v)
// fills v[N] for row b (0 for rows outside the step). The steps load them a
// step ahead, so that their latency passes during the step before rather than
// at the head of the step's chain of work.
template <int N, typename acc_t>
struct Ahead {
  acc_t v[kRows][N];
  template <typename Load>
  __device__ __forceinline__ void load(const Share& me, const Step& st, const Load& f) {
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int b = me.row(i);
      if (me.works && b < st.active) {
        f(b, v[i]);
      } else {
#pragma unroll
        for (int n = 0; n < N; ++n) v[i][n] = acc_t(0);
      }
    }
  }
};

// The forward's steps. Per step, for this thread's unit and rows in it: the
// sums acc[g] = init[g] + h_{t-1} W_hh^T's G gates, with init(me, st, b, init)
// what the step starts from (loaded ahead), then v = finish(b, acc, h) with
// h the row's state; v, the row's h_t, goes to every CTA. A row not in the
// step keeps its state. m.buffer(0) holds h_0's rows on entry.
template <int G, typename T, typename acc_t, typename Init, typename Finish>
__device__ __forceinline__ void forward_steps(const Place& p, const Sequence& q, const Smem<T, acc_t>& m,
                                              int H, const Init& init, const Finish& finish) {
  const int ldh = m.s.ld;
  const Share me(p);
  Handover<acc_t> x(m.full, p, me, H, p.rows);
  int cur = 0, run = 0;
  Step st(p, q, 0, run);
  Ahead<G, acc_t> ahead;
  ahead.load(me, st, [&](int b, acc_t (&v)[G]) { init(me, st, b, v); });
  for (int64_t s = 0; s < q.steps; ++s) {
    x.expect(cur ^ 1);
    const acc_t* h = m.buffer(cur);
    acc_t acc[kRows][G];
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
#pragma unroll
      for (int g = 0; g < G; ++g) acc[i][g] = ahead.v[i][g];
    }
    const Step next(p, q, s + 1, run);  // no rows past the last step
    ahead.load(me, next, [&](int b, acc_t (&v)[G]) { init(me, next, b, v); });
    if (x.reads) {
      accumulate<G>(acc, h, m, p, me);
      warp_sync();
    }
    if (me.works) {
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int b = me.row(i);
        if (b >= p.rows) break;
        acc_t v[1] = {h[b * ldh + me.j]};
        if (b < st.active) v[0] = finish(me, st, b, acc[i], v[0]);
        x.put(m.buffer(cur ^ 1), cur ^ 1, ldh, b, me.j, H, v);
      }
    }
    x.wait(cur ^ 1);  // h_t from every CTA
    cur ^= 1;
    st = next;
  }
  // No CTA leaves while another may still write into its shared memory.
  if (p.size > 1) cluster_sync(p.size);
}

// The backward's steps, in the opposite order. Per step, for this thread's unit
// and rows in it: load(st, b, in) fills in[L], the row's values from global
// memory (loaded a step ahead); cell(st, b, in, dh_t's part from later steps,
// ga, direct) computes the G gates' dA_t (ga, to every CTA) and a part of
// dh_{t-1} that skips W_hh (direct: GRU's d z). Then dh_{t-1} = dA_t W_hh +
// direct for this unit: kept in dh [tile][units] for the rows the previous
// step carries (0 elsewhere: their h was final, and dh_n is already in dY),
// written to grad_hx for those that began at hx. m's buffers hold dA_t
// ([tile][m.s.ld]); dh zero on entry.
template <int G, int L, typename T, typename acc_t, typename Load, typename Cell>
__device__ __forceinline__ void backward_steps(const Place& p, const Sequence& q, const Smem<T, acc_t>& m,
                                               acc_t* dh, T* grad_hx, int64_t ld_ghx, int H,
                                               const Load& load, const Cell& cell) {
  const int ldg = m.s.ld;
  const Share me(p);
  Handover<acc_t> x(m.full, p, me, H, p.rows * G);
  int cur = 0, run = q.runs->count - 1;
  Step st(p, q, q.steps - 1, run);
  Ahead<L, acc_t> ahead;
  ahead.load(me, st, [&](int b, acc_t (&in)[L]) { load(me, st, b, in); });
  for (int64_t s = q.steps - 1; s >= 0; --s) {
    x.expect(cur);
    acc_t* da = m.buffer(cur);
    acc_t in[kRows][L];
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
#pragma unroll
      for (int n = 0; n < L; ++n) in[i][n] = ahead.v[i][n];
    }
    const Step next(p, q, s - 1, run);  // no rows before the first step
    ahead.load(me, next, [&](int b, acc_t (&v)[L]) { load(me, next, b, v); });
    acc_t acc[kRows][1] = {};
    if (me.works) {
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int b = me.row(i);
        if (b >= p.rows) break;
        acc_t ga[G] = {};
        if (b < st.active) cell(me, st, b, in[i], dh[b * p.units + me.u], ga, acc[i][0]);
        x.put(da, cur, ldg, b, me.j, H, ga);
      }
    }
    x.wait(cur);  // dA_t from every CTA
    if (x.reads) {
      accumulate<1>(acc, da, m, p, me);
      warp_sync();
    }
    if (me.works) {
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int b = me.row(i);
        if (b >= p.rows) break;
        dh[b * p.units + me.u] = b < st.carried ? acc[i][0] : acc_t(0);
        if (b >= st.carried && b < st.active) grad_hx[(p.b0 + b) * ld_ghx + me.j] = store<T>(acc[i][0]);
      }
    }
    cur ^= 1;
    st = next;
  }
  // No CTA leaves while another may still write into its shared memory.
  if (p.size > 1) cluster_sync(p.size);
}

// ---------------------------------------------------------------- Elman
//   out  [N, H]  forward: P = X W_ih^T + b on entry, h on exit
//   dA   [N, H]  backward: dY (+ dh_n on final rows) on entry, dA on exit

template <typename T, typename acc_t, Activation A>
__global__ void __launch_bounds__(kThreads, 1)
forward_kernel(T* __restrict__ out, int64_t ld_out, const T* __restrict__ hx, int64_t ld_hx,
               const T* __restrict__ w_hh, const __grid_constant__ Runs runs, int64_t steps, int64_t batch, int H, int units,
               int tile, int cluster_size, bool reverse) {
  const Place p(batch, H, units, tile, cluster_size);
  const Smem<T, acc_t> m(p, 1, H, H);  // buffers: h_{t-1}, h_t
  load_unit_rows(m.w, m.s, w_hh, H, p);
  load_tile(m.buffer(0), m.s.ld, hx, ld_hx, 0, H, p);
  clear(m.buffer(1), p.tile * m.s.ld);
  // Every CTA of the cluster runs (its shared memory may be written) and has its state.
  m.begin(p);
  forward_steps<1>(
      p, {&runs, steps, batch, reverse}, m, H,
      [&](const Share& me, const Step& st, int b, acc_t (&init)[1]) {
        init[0] = load<acc_t>(out[(st.row0 + b) * ld_out + me.j]);
      },
      [&](const Share& me, const Step& st, int b, acc_t (&acc)[1], acc_t) {
        const acc_t v = activate<A>(acc[0]);
        out[(st.row0 + b) * ld_out + me.j] = store<T>(v);
        return v;
      });
}

template <typename T, typename acc_t, Activation A>
__global__ void __launch_bounds__(kThreads, 1)
backward_kernel(T* __restrict__ dA, int64_t ld_dA, const T* __restrict__ out, int64_t ld_out,
                T* __restrict__ grad_hx, int64_t ld_ghx, const T* __restrict__ w_hh,
                const __grid_constant__ Runs runs,
                int64_t steps, int64_t batch, int H, int units, int tile, int cluster_size,
                bool reverse) {
  const Place p(batch, H, units, tile, cluster_size);
  const Smem<T, acc_t> m(p, 1, H, H);  // buffers: dA_t; extra(0): dh_t through W_hh
  acc_t* dh = m.extra(0);
  load_unit_columns(m.w, m.s, w_hh, H, p);
  clear(m.buffer(0), 2 * p.tile * m.s.ld);
  for (int i = threadIdx.x; i < tile * units; i += kThreads) dh[i] = acc_t(0);
  m.begin(p);
  // dA_t = (dY_t + dh_t) * act'(h_t).
  // in: dY_t (+ dh_n), h_t.
  backward_steps<1, 2>(
      p, {&runs, steps, batch, reverse}, m, dh, grad_hx, ld_ghx, H,
      [&](const Share& me, const Step& st, int b, acc_t (&in)[2]) {
        const int64_t row = st.row0 + b;
        in[0] = load<acc_t>(dA[row * ld_dA + me.j]);
        in[1] = load<acc_t>(out[row * ld_out + me.j]);
      },
      [&](const Share& me, const Step& st, int b, const acc_t (&in)[2], acc_t dh_later, acc_t (&ga)[1], acc_t&) {
        ga[0] = activation_grad<A>(in[0] + dh_later, in[1]);
        dA[(st.row0 + b) * ld_dA + me.j] = store<T>(ga[0]);
      });
}

// The cells' backward inputs: in[0, G) the G gates of `row`, in[G] its dY (+ dh_n).
template <int G, int L, typename T, typename acc_t>
__device__ __forceinline__ void load_gates_and_dy(acc_t (&in)[L], const T* gates, int64_t ld_g, const T* dh,
                                                  int64_t ld_dh, int64_t row, int H, int j) {
#pragma unroll
  for (int g = 0; g < G; ++g) in[g] = load<acc_t>(gates[row * ld_g + g * H + j]);
  in[G] = load<acc_t>(dh[row * ld_dh + j]);
}

// ---------------------------------------------------------------- LSTM
// The cell's math (cells.h) as each step's epilogue; no projection. A CTA's
// units bring all four gates of each; h goes to every CTA, c stays with its
// units' CTA.
//   gates  [N, 4H]  forward: X W_ih^T + b_ih + b_hh on entry, the activated
//                   gates on exit; backward: the activated gates on entry, dA on exit
//   c      [N, H]   forward: written, c_t; backward: read
//   out    [N, H]   forward: written, h_t
//   dh     [N, H]   backward: dY (+ dh_n on final rows) on entry, the whole
//                   gradient of each h_t on exit
//   dc_n   [B, H]

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads, 1)
lstm_forward_kernel(T* __restrict__ gates, int64_t ld_g, T* __restrict__ c, int64_t ld_c,
                    T* __restrict__ out, int64_t ld_out, const T* __restrict__ h0, int64_t ld_h0,
                    const T* __restrict__ c0, int64_t ld_c0, const T* __restrict__ w_hh,
                    const __grid_constant__ Runs runs,
                    int64_t steps, int64_t batch, int H, int units, int tile, int cluster_size,
                    bool reverse) {
  constexpr int G = kLstmGates;
  const Place p(batch, H, units, tile, cluster_size);
  const Smem<T, acc_t> m(p, G, H, H);  // buffers: h_{t-1}, h_t
  acc_t* cell = m.extra(0);         // each row's latest c, c0 until it starts
  load_unit_rows(m.w, m.s, w_hh, H, p);
  load_tile(m.buffer(0), m.s.ld, h0, ld_h0, 0, H, p);
  clear(m.buffer(1), p.tile * m.s.ld);
  load_tile(cell, units, c0, ld_c0, p.j0, p.nu, p);
  m.begin(p);
  forward_steps<G>(
      p, {&runs, steps, batch, reverse}, m, H,
      [&](const Share& me, const Step& st, int b, acc_t (&init)[G]) {
#pragma unroll
        for (int g = 0; g < G; ++g) init[g] = load<acc_t>(gates[(st.row0 + b) * ld_g + g * H + me.j]);
      },
      [&](const Share& me, const Step& st, int b, acc_t (&a)[G], acc_t) {
        const int64_t row = st.row0 + b;
        acc_t& cb = cell[b * units + me.u];
        acc_t ct, mt;
        lstm_forward_cell<ScalarAct, acc_t>(a[0], a[1], a[2], a[3], cb, ct, mt);
#pragma unroll
        for (int g = 0; g < G; ++g) gates[row * ld_g + g * H + me.j] = store<T>(a[g]);
        c[row * ld_c + me.j] = store<T>(ct);
        out[row * ld_out + me.j] = store<T>(mt);
        cb = ct;
        return mt;
      });
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads, 1)
lstm_backward_kernel(T* __restrict__ dh, int64_t ld_dh, T* __restrict__ gates, int64_t ld_g,
                     const T* __restrict__ c, int64_t ld_c, const T* __restrict__ c0, int64_t ld_c0,
                     const T* __restrict__ dc_n, int64_t ld_dcn, T* __restrict__ grad_hx,
                     int64_t ld_ghx, T* __restrict__ grad_cx, int64_t ld_gcx,
                     const T* __restrict__ w_hh, const __grid_constant__ Runs runs, int64_t steps, int64_t batch, int H,
                     int units, int tile, int cluster_size, bool reverse) {
  constexpr int G = kLstmGates;
  const Place p(batch, H, units, tile, cluster_size);
  const Smem<T, acc_t> m(p, G, H, G * H);  // buffers: dA_t, all gates
  acc_t* dhr = m.extra(0);              // dh_t through W_hh
  acc_t* dcr = m.extra(1);              // the gradient reaching c_t
  load_unit_columns(m.w, m.s, w_hh, H, p);
  clear(m.buffer(0), 2 * p.tile * m.s.ld);
  for (int i = threadIdx.x; i < tile * units; i += kThreads) dhr[i] = acc_t(0);
  // Every row's last step comes first: its c_t gets dc_n (dh_n is already in dh).
  load_tile(dcr, units, dc_n, ld_dcn, p.j0, p.nu, p);
  m.begin(p);
  // in: the four gates, dY_t (+ dh_n), c_t, c_{t-1}.
  backward_steps<G, G + 3>(
      p, {&runs, steps, batch, reverse}, m, dhr, grad_hx, ld_ghx, H,
      [&](const Share& me, const Step& st, int b, acc_t (&in)[G + 3]) {
        const int64_t row = st.row0 + b;
        load_gates_and_dy<G>(in, gates, ld_g, dh, ld_dh, row, H, me.j);
        in[G + 1] = load<acc_t>(c[row * ld_c + me.j]);
        in[G + 2] = load<acc_t>(b < st.carried ? c[(st.prev0 + b) * ld_c + me.j] : c0[(p.b0 + b) * ld_c0 + me.j]);
      },
      [&](const Share& me, const Step& st, int b, const acc_t (&in)[G + 3], acc_t dh_later, acc_t (&ga)[G],
          acc_t&) {
        const int64_t row = st.row0 + b;
#pragma unroll
        for (int g = 0; g < G; ++g) ga[g] = in[g];
        const acc_t dm = in[G] + dh_later;
        dh[row * ld_dh + me.j] = store<T>(dm);
        acc_t& dc = dcr[b * units + me.u];
        acc_t dc_prev;
        lstm_backward_cell<ScalarAct, acc_t>(ga[0], ga[1], ga[2], ga[3], in[G + 1], in[G + 2], dm, dc, dc_prev);
#pragma unroll
        for (int g = 0; g < G; ++g) gates[row * ld_g + g * H + me.j] = store<T>(ga[g]);
        // To the previous step's row, or to grad_cx for a row that began at c0.
        if (b < st.carried) {
          dc = dc_prev;
        } else {
          grad_cx[(p.b0 + b) * ld_gcx + me.j] = store<T>(dc_prev);
        }
      });
}

// ---------------------------------------------------------------- GRU
//   gates  [N, 3H]  forward: X W_ih^T + b_ih on entry, the activated r z n on
//                   exit; backward: r z n on entry, [dA_r, dA_z, dA_hn] on exit
//   hn     [N, H]   forward: written, (h_{t-1} W_hh^T)_n + b_hn; backward: read,
//                   then dA_n (cells.h, gru_backward_cell)
//   out    [N, H]   forward: written, h_t; backward: read (h_{t-1})
//   dh     [N, H]   backward: dY (+ dh_n on final rows) on entry, the whole
//                   gradient of each h_t on exit
//   b_hh   [3H] or null

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads, 1)
gru_forward_kernel(T* __restrict__ gates, int64_t ld_g, T* __restrict__ hn, int64_t ld_hn,
                   T* __restrict__ out, int64_t ld_out, const T* __restrict__ h0, int64_t ld_h0,
                   const T* __restrict__ w_hh, const T* __restrict__ b_hh,
                   const __grid_constant__ Runs runs,
                   int64_t steps, int64_t batch, int H, int units, int tile, int cluster_size,
                   bool reverse) {
  constexpr int G = kGruGates;
  const Place p(batch, H, units, tile, cluster_size);
  const Smem<T, acc_t> m(p, G, H, H);  // buffers: h_{t-1}, h_t
  load_unit_rows(m.w, m.s, w_hh, H, p);
  load_tile(m.buffer(0), m.s.ld, h0, ld_h0, 0, H, p);
  clear(m.buffer(1), p.tile * m.s.ld);
  m.begin(p);
  // The sums are h_{t-1} W_hh^T + b_hh; the input side (gates) joins in the cell.
  forward_steps<G>(
      p, {&runs, steps, batch, reverse}, m, H,
      [&](const Share& me, const Step&, int, acc_t (&init)[G]) {
#pragma unroll
        for (int g = 0; g < G; ++g) init[g] = b_hh ? load<acc_t>(b_hh[g * H + me.j]) : acc_t(0);
      },
      [&](const Share& me, const Step& st, int b, acc_t (&a)[G], acc_t h_prev) {
        const int64_t row = st.row0 + b;
        acc_t r = load<acc_t>(gates[row * ld_g + me.j]), z = load<acc_t>(gates[row * ld_g + H + me.j]);
        acc_t n = load<acc_t>(gates[row * ld_g + 2 * H + me.j]), ht;
        gru_forward_cell<ScalarAct, acc_t>(r, z, n, a[0], a[1], a[2], h_prev, ht);
        gates[row * ld_g + me.j] = store<T>(r);
        gates[row * ld_g + H + me.j] = store<T>(z);
        gates[row * ld_g + 2 * H + me.j] = store<T>(n);
        hn[row * ld_hn + me.j] = store<T>(a[2]);
        out[row * ld_out + me.j] = store<T>(ht);
        return ht;
      });
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads, 1)
gru_backward_kernel(T* __restrict__ dh, int64_t ld_dh, T* __restrict__ gates, int64_t ld_g,
                    T* __restrict__ hn, int64_t ld_hn, const T* __restrict__ out, int64_t ld_out,
                    const T* __restrict__ h0, int64_t ld_h0, T* __restrict__ grad_hx, int64_t ld_ghx,
                    const T* __restrict__ w_hh, const __grid_constant__ Runs runs, int64_t steps, int64_t batch, int H,
                    int units, int tile, int cluster_size, bool reverse) {
  constexpr int G = kGruGates;
  const Place p(batch, H, units, tile, cluster_size);
  const Smem<T, acc_t> m(p, G, H, G * H);  // buffers: [dA_r, dA_z, dA_hn]
  acc_t* dhr = m.extra(0);              // dh_t from the later step
  load_unit_columns(m.w, m.s, w_hh, H, p);
  clear(m.buffer(0), 2 * p.tile * m.s.ld);
  for (int i = threadIdx.x; i < tile * units; i += kThreads) dhr[i] = acc_t(0);
  m.begin(p);
  // in: r z n, dY_t (+ dh_n), h_{t-1}, hn_t.
  backward_steps<G, G + 3>(
      p, {&runs, steps, batch, reverse}, m, dhr, grad_hx, ld_ghx, H,
      [&](const Share& me, const Step& st, int b, acc_t (&in)[G + 3]) {
        const int64_t row = st.row0 + b;
        load_gates_and_dy<G>(in, gates, ld_g, dh, ld_dh, row, H, me.j);
        in[G + 1] = load<acc_t>(b < st.carried ? out[(st.prev0 + b) * ld_out + me.j] : h0[(p.b0 + b) * ld_h0 + me.j]);
        in[G + 2] = load<acc_t>(hn[row * ld_hn + me.j]);
      },
      [&](const Share& me, const Step& st, int b, const acc_t (&in)[G + 3], acc_t dh_later, acc_t (&ga)[G],
          acc_t& direct) {
        const int64_t row = st.row0 + b;
        const acc_t d = in[G] + dh_later;
        dh[row * ld_dh + me.j] = store<T>(d);
#pragma unroll
        for (int g = 0; g < G; ++g) ga[g] = in[g];
        acc_t hn_j = in[G + 2];
        gru_backward_cell<ScalarAct, acc_t>(ga[0], ga[1], ga[2], hn_j, d, in[G + 1], direct);
#pragma unroll
        for (int g = 0; g < G; ++g) gates[row * ld_g + g * H + me.j] = store<T>(ga[g]);
        hn[row * ld_hn + me.j] = store<T>(hn_j);
      });
}

}  // namespace persistent
}  // namespace fastrnn
