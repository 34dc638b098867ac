// fastrnn: persistent Elman recurrences split over a thread-block cluster
// (sm_90), for hidden sizes whose W_hh does not fit one CTA's shared memory
// (persistent.cuh). One launch covers all T steps. A cluster owns a tile of
// batch rows; CTA r of it owns hidden units [r * units, (r + 1) * units) and
// keeps W_hh's slice for them in shared memory for the whole sequence. Each
// step, every CTA computes its units for the tile's rows and writes them into
// every CTA's copy of the state (distributed shared memory): one cluster
// barrier per step, and no global memory between steps.
//
// Shapes (N rows of the flattened sequence, B batch, H hidden, T steps; every
// [rows, H] argument has unit column stride and the row stride ld_<name>):
//   out        [N, H]  forward: P = X W_ih^T + b on entry, h on exit
//   dA         [N, H]  backward: dY (+ dh_n on final rows) on entry, dA on exit
//   hx         [B, H]  initial state;  grad_hx [B, H] written for rows that began at hx
//   w_hh       [H, H]  row-major, W[j][k] (output unit j, input unit k)
//   batch_sizes, offsets [T] int64 on the device, or null for a padded sequence
// Launch: grid = clusters * cluster_size CTAs of kThreads, cluster dims
// (cluster_size, 1, 1), dynamic shared memory forward_smem / backward_smem.
// Cluster c handles batch rows [c * tile, c * tile + tile), with tile <=
// (kThreads / units) * kRows. Rows are carried between steps as in
// persistent.cuh: a state row holds its row's latest state, hx until it starts.
#pragma once

#include "../activation.h"
#include "../numeric.h"
#include "persistent.cuh"

#include <cooperative_groups.h>
#include <cuda_runtime.h>

namespace fastrnn {

namespace cluster {

constexpr int kThreads = 256;
constexpr int kRows = 4;  // batch rows per thread at most

// The state buffers' row stride: H + 1, so that a warp's threads on different
// rows read different banks.
__host__ __device__ inline int state_ld(int H) { return H + 1; }

template <typename acc_t>
__host__ __device__ inline size_t forward_smem(int H, int units, int tile) {
  return (static_cast<size_t>(H) * units + 2 * static_cast<size_t>(tile) * state_ld(H)) * sizeof(acc_t);
}

template <typename acc_t>
__host__ __device__ inline size_t backward_smem(int H, int units, int tile) {
  return forward_smem<acc_t>(H, units, tile) + static_cast<size_t>(tile) * units * sizeof(acc_t);
}

// The cluster's barrier (with release / acquire: shared-memory writes to other
// CTAs before it are seen by them after it), this CTA's rank in the cluster,
// and p's address in CTA `rank`'s shared memory. sm_90 and later; the host
// plans clusters only there.
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#else
  __trap();
#endif
}

__device__ __forceinline__ unsigned cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().block_rank();
#else
  return 0;
#endif
}

template <typename U>
__device__ __forceinline__ U* in_rank(U* p, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
#else
  __trap();
  return p;
#endif
}

// A thread's share of its CTA's units x tile rows: unit u, rows g, g + groups,
// ... (at most kRows of them).
struct Share {
  int u, g, groups;
  bool works;
  __device__ Share(int units, int nu) {
    groups = kThreads / units;
    u = threadIdx.x % units;
    g = threadIdx.x / units;
    works = g < groups && u < nu;
  }
  __device__ int row(int i) const { return g + i * groups; }
};

template <typename T, typename acc_t, Activation A>
__global__ void __launch_bounds__(kThreads)
forward_kernel(T* __restrict__ out, int64_t ld_out, const T* __restrict__ hx, int64_t ld_hx,
               const T* __restrict__ w_hh, const int64_t* __restrict__ batch_sizes,
               const int64_t* __restrict__ offsets, int64_t steps, int64_t batch, int H, int units,
               int tile, int cluster_size, bool reverse) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int ldh = state_ld(H);
  acc_t* w = reinterpret_cast<acc_t*>(smem);  // [H][units], w[k * units + u] = W[j0 + u][k]
  acc_t* state = w + H * units;                // [2][tile][ldh]: h_{t-1}, h_t of the tile's rows
  const unsigned rank = cluster_rank();
  const int64_t b0 = static_cast<int64_t>(blockIdx.x / cluster_size) * tile;
  const int rows = persistent::clamp_rows(batch, b0, tile);
  const int j0 = static_cast<int>(rank) * units;
  const int nu = max(0, min(units, H - j0));
  for (int i = threadIdx.x; i < H * units; i += kThreads) {
    const int k = i / units, u = i - k * units;
    w[i] = u < nu ? load<acc_t>(w_hh[static_cast<int64_t>(j0 + u) * H + k]) : acc_t(0);
  }
  for (int i = threadIdx.x; i < rows * H; i += kThreads) {
    const int b = i / H, k = i - b * H;
    state[b * ldh + k] = load<acc_t>(hx[(b0 + b) * ld_hx + k]);
  }
  // Every CTA of the cluster runs (its shared memory may be written) and has its state.
  cluster_sync();
  const Share me(units, nu);
  const int j = j0 + me.u;
  int cur = 0;
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t t = reverse ? steps - 1 - s : s;
    const int active = persistent::clamp_rows(persistent::rows_at(batch_sizes, batch, t, steps), b0, tile);
    T* out_t = out + ((offsets ? offsets[t] : t * batch) + b0) * ld_out;
    const acc_t* h = state + cur * tile * ldh;
    acc_t* next = state + (cur ^ 1) * tile * ldh;
    if (me.works) {
      acc_t acc[kRows];
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int b = me.row(i);
        acc[i] = b < active ? load<acc_t>(out_t[b * ld_out + j]) : acc_t(0);
      }
      for (int k = 0; k < H; ++k) {
        const acc_t wk = w[k * units + me.u];
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
          const int b = me.row(i);
          if (b < active) acc[i] += h[b * ldh + k] * wk;
        }
      }
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int b = me.row(i);
        if (b >= rows) break;
        // A row not in this step keeps its state.
        const acc_t v = b < active ? activate<A>(acc[i]) : h[b * ldh + j];
        if (b < active) out_t[b * ld_out + j] = store<T>(v);
        for (int r = 0; r < cluster_size; ++r) in_rank(next, r)[b * ldh + j] = v;
      }
    }
    // Every CTA's share of h_t written everywhere, and h_{t-1} read by all.
    cluster_sync();
    cur ^= 1;
  }
}

template <typename T, typename acc_t, Activation A>
__global__ void __launch_bounds__(kThreads)
backward_kernel(T* __restrict__ dA, int64_t ld_dA, const T* __restrict__ out, int64_t ld_out,
                T* __restrict__ grad_hx, int64_t ld_ghx, const T* __restrict__ w_hh,
                const int64_t* __restrict__ batch_sizes, const int64_t* __restrict__ offsets,
                int64_t steps, int64_t batch, int H, int units, int tile, int cluster_size,
                bool reverse) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int ldh = state_ld(H);
  acc_t* w = reinterpret_cast<acc_t*>(smem);  // [H][units], w[j * units + u] = W[j][k0 + u]
  acc_t* grads = w + H * units;                // [2][tile][ldh]: dA_t of the tile's rows, all units
  acc_t* dh = grads + 2 * tile * ldh;          // [tile][units]: gradient reaching this CTA's units of h_t
  const unsigned rank = cluster_rank();
  const int64_t b0 = static_cast<int64_t>(blockIdx.x / cluster_size) * tile;
  const int rows = persistent::clamp_rows(batch, b0, tile);
  const int k0 = static_cast<int>(rank) * units;
  const int nu = max(0, min(units, H - k0));
  for (int i = threadIdx.x; i < H * units; i += kThreads) {
    const int jj = i / units, u = i - jj * units;
    w[i] = u < nu ? load<acc_t>(w_hh[static_cast<int64_t>(jj) * H + k0 + u]) : acc_t(0);
  }
  for (int i = threadIdx.x; i < tile * units; i += kThreads) dh[i] = acc_t(0);
  cluster_sync();
  const Share me(units, nu);
  const int k = k0 + me.u;  // this thread's unit: of dA_t (as j) and of dh_{t-1} (as k)
  int cur = 0;
  // Backward visits the steps in the opposite order to forward.
  for (int64_t s = steps - 1; s >= 0; --s) {
    const int64_t t = reverse ? steps - 1 - s : s;
    const int64_t prev = reverse ? t + 1 : t - 1;
    const int64_t rows_t = persistent::rows_at(batch_sizes, batch, t, steps);
    const int active = persistent::clamp_rows(rows_t, b0, tile);
    const int carried = persistent::clamp_rows(
        min(rows_t, persistent::rows_at(batch_sizes, batch, prev, steps)), b0, tile);
    const int64_t row0 = (offsets ? offsets[t] : t * batch) + b0;
    acc_t* da = grads + cur * tile * ldh;
    if (me.works) {
      // dA_t = (dY_t + dh_t) * act'(h_t) for this CTA's units, to every CTA.
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int b = me.row(i);
        if (b >= rows) break;
        acc_t d = acc_t(0);
        if (b < active) {
          const int64_t row = row0 + b;
          d = activation_grad<A>(load<acc_t>(dA[row * ld_dA + k]) + dh[b * units + me.u],
                                 load<acc_t>(out[row * ld_out + k]));
          dA[row * ld_dA + k] = store<T>(d);
        }
        for (int r = 0; r < cluster_size; ++r) in_rank(da, r)[b * ldh + k] = d;
      }
    }
    cluster_sync();
    if (me.works) {
      // dh_{t-1} = dA_t W_hh for this CTA's units: to the previous step's rows, or to grad_hx.
      acc_t acc[kRows];
#pragma unroll
      for (int i = 0; i < kRows; ++i) acc[i] = acc_t(0);
      for (int jj = 0; jj < H; ++jj) {
        const acc_t wj = w[jj * units + me.u];
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
          const int b = me.row(i);
          if (b < active) acc[i] += da[b * ldh + jj] * wj;
        }
      }
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int b = me.row(i);
        if (b >= rows) break;
        // Rows the previous step does not carry into this one have dh = 0 there
        // (their h was final; dh_n is already in dA).
        dh[b * units + me.u] = b < carried ? acc[i] : acc_t(0);
        if (b >= carried && b < active) grad_hx[(b0 + b) * ld_ghx + k] = store<T>(acc[i]);
      }
    }
    // The next step writes the other buffer: one barrier per step keeps a CTA
    // from overwriting what another still reads (it cannot pass this one first).
    cur ^= 1;
  }
  // No CTA leaves while another may still write into its shared memory: the
  // last writes came before the last barrier.
}

}  // namespace cluster
}  // namespace fastrnn
