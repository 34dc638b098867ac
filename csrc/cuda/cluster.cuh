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
#include "../cells.h"
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
// and p's address in CTA `rank`'s shared memory. A "cluster" of one CTA
// (size 1) is a plain launch on any device; larger ones need sm_90, and the
// host plans them only there.
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

template <typename U>
__device__ __forceinline__ U* in_rank(U* p, unsigned rank, int size) {
  if (size == 1) return p;
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
  const unsigned rank = cluster_rank(cluster_size);
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
  cluster_sync(cluster_size);
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
        for (int r = 0; r < cluster_size; ++r) in_rank(next, r, cluster_size)[b * ldh + j] = v;
      }
    }
    // Every CTA's share of h_t written everywhere, and h_{t-1} read by all.
    cluster_sync(cluster_size);
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
  const unsigned rank = cluster_rank(cluster_size);
  const int64_t b0 = static_cast<int64_t>(blockIdx.x / cluster_size) * tile;
  const int rows = persistent::clamp_rows(batch, b0, tile);
  const int k0 = static_cast<int>(rank) * units;
  const int nu = max(0, min(units, H - k0));
  for (int i = threadIdx.x; i < H * units; i += kThreads) {
    const int jj = i / units, u = i - jj * units;
    w[i] = u < nu ? load<acc_t>(w_hh[static_cast<int64_t>(jj) * H + k0 + u]) : acc_t(0);
  }
  for (int i = threadIdx.x; i < tile * units; i += kThreads) dh[i] = acc_t(0);
  cluster_sync(cluster_size);
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
        for (int r = 0; r < cluster_size; ++r) in_rank(da, r, cluster_size)[b * ldh + k] = d;
      }
    }
    cluster_sync(cluster_size);
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

// ---------------------------------------------------------------- LSTM
// The same design with the cells' math (cells.h) as each step's epilogue; no
// projection. A CTA's units bring all four gates of each; the state a step
// hands on is h (to every CTA), c stays with its units' CTA. Shapes, besides
// the Elman kernels' (G = 4 gates, i f g o in torch's order):
//   gates  [N, 4H]  forward: X W_ih^T + b_ih + b_hh on entry, the activated
//                   gates on exit; backward: the activated gates on entry, dA on exit
//   c      [N, H]   forward: written, c_t; backward: read
//   out    [N, H]   forward: written, h_t
//   dh     [N, H]   backward: dY (+ dh_n on final rows) on entry, the whole
//                   gradient of each h_t on exit
//   h0, c0 [B, H];  dc_n [B, H];  grad_hx, grad_cx [B, H] written
//   w_hh   [4H, H]  row-major
constexpr int kLstmGates = 4;

template <typename acc_t>
__host__ __device__ inline size_t lstm_forward_smem(int H, int units, int tile) {
  return (static_cast<size_t>(kLstmGates) * H * units + 2 * static_cast<size_t>(tile) * state_ld(H) +
          static_cast<size_t>(tile) * units) * sizeof(acc_t);
}

template <typename acc_t>
__host__ __device__ inline size_t lstm_backward_smem(int H, int units, int tile) {
  return (static_cast<size_t>(kLstmGates) * H * units +
          2 * static_cast<size_t>(tile) * state_ld(kLstmGates * H) +
          2 * static_cast<size_t>(tile) * units) * sizeof(acc_t);
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads)
lstm_forward_kernel(T* __restrict__ gates, int64_t ld_g, T* __restrict__ c, int64_t ld_c,
                    T* __restrict__ out, int64_t ld_out, const T* __restrict__ h0, int64_t ld_h0,
                    const T* __restrict__ c0, int64_t ld_c0, const T* __restrict__ w_hh,
                    const int64_t* __restrict__ batch_sizes, const int64_t* __restrict__ offsets,
                    int64_t steps, int64_t batch, int H, int units, int tile, int cluster_size,
                    bool reverse) {
  constexpr int G = kLstmGates;
  extern __shared__ __align__(16) unsigned char smem[];
  const int ldh = state_ld(H);
  acc_t* w = reinterpret_cast<acc_t*>(smem);  // [H][G][units], W[g * H + j0 + u][k]
  acc_t* state = w + G * H * units;           // [2][tile][ldh]: h_{t-1}, h_t of the tile's rows
  acc_t* cell = state + 2 * tile * ldh;       // [tile][units]: each row's latest c, c0 until it starts
  const unsigned rank = cluster_rank(cluster_size);
  const int64_t b0 = static_cast<int64_t>(blockIdx.x / cluster_size) * tile;
  const int rows = persistent::clamp_rows(batch, b0, tile);
  const int j0 = static_cast<int>(rank) * units;
  const int nu = max(0, min(units, H - j0));
  for (int i = threadIdx.x; i < G * H * units; i += kThreads) {
    const int k = i / (G * units), g = (i / units) % G, u = i % units;
    w[i] = u < nu ? load<acc_t>(w_hh[(static_cast<int64_t>(g) * H + j0 + u) * H + k]) : acc_t(0);
  }
  for (int i = threadIdx.x; i < rows * H; i += kThreads) {
    const int b = i / H, k = i - b * H;
    state[b * ldh + k] = load<acc_t>(h0[(b0 + b) * ld_h0 + k]);
  }
  for (int i = threadIdx.x; i < rows * nu; i += kThreads) {
    const int b = i / nu, u = i - b * nu;
    cell[b * units + u] = load<acc_t>(c0[(b0 + b) * ld_c0 + j0 + u]);
  }
  cluster_sync(cluster_size);
  const Share me(units, nu);
  const int j = j0 + me.u;
  int cur = 0;
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t t = reverse ? steps - 1 - s : s;
    const int active = persistent::clamp_rows(persistent::rows_at(batch_sizes, batch, t, steps), b0, tile);
    const int64_t row0 = (offsets ? offsets[t] : t * batch) + b0;
    const acc_t* h = state + cur * tile * ldh;
    acc_t* next = state + (cur ^ 1) * tile * ldh;
    if (me.works) {
      acc_t acc[kRows][G];
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int b = me.row(i);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          acc[i][g] = b < active ? load<acc_t>(gates[(row0 + b) * ld_g + g * H + j]) : acc_t(0);
        }
      }
      for (int k = 0; k < H; ++k) {
        acc_t wk[G];
#pragma unroll
        for (int g = 0; g < G; ++g) wk[g] = w[(k * G + g) * units + me.u];
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
          const int b = me.row(i);
          if (b < active) {
            const acc_t hk = h[b * ldh + k];
#pragma unroll
            for (int g = 0; g < G; ++g) acc[i][g] += hk * wk[g];
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int b = me.row(i);
        if (b >= rows) break;
        acc_t v = h[b * ldh + j];  // a row not in this step keeps its state
        if (b < active) {
          const int64_t row = row0 + b;
          acc_t ct, mt;
          lstm_forward_cell<ScalarAct, acc_t>(acc[i][0], acc[i][1], acc[i][2], acc[i][3],
                                              cell[b * units + me.u], ct, mt);
#pragma unroll
          for (int g = 0; g < G; ++g) gates[row * ld_g + g * H + j] = store<T>(acc[i][g]);
          c[row * ld_c + j] = store<T>(ct);
          out[row * ld_out + j] = store<T>(mt);
          cell[b * units + me.u] = ct;
          v = mt;
        }
        for (int r = 0; r < cluster_size; ++r) in_rank(next, r, cluster_size)[b * ldh + j] = v;
      }
    }
    cluster_sync(cluster_size);
    cur ^= 1;
  }
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads)
lstm_backward_kernel(T* __restrict__ dh, int64_t ld_dh, T* __restrict__ gates, int64_t ld_g,
                     const T* __restrict__ c, int64_t ld_c, const T* __restrict__ c0, int64_t ld_c0,
                     const T* __restrict__ dc_n, int64_t ld_dcn, T* __restrict__ grad_hx,
                     int64_t ld_ghx, T* __restrict__ grad_cx, int64_t ld_gcx,
                     const T* __restrict__ w_hh, const int64_t* __restrict__ batch_sizes,
                     const int64_t* __restrict__ offsets, int64_t steps, int64_t batch, int H,
                     int units, int tile, int cluster_size, bool reverse) {
  constexpr int G = kLstmGates;
  extern __shared__ __align__(16) unsigned char smem[];
  const int ldg = state_ld(G * H);
  acc_t* w = reinterpret_cast<acc_t*>(smem);  // [4H][units], W[r][k0 + u]
  acc_t* grads = w + G * H * units;           // [2][tile][ldg]: dA_t of the tile's rows, all gates
  acc_t* dhr = grads + 2 * tile * ldg;        // [tile][units]: dh_t through W_hh (the recurrent part)
  acc_t* dcr = dhr + tile * units;            // [tile][units]: the gradient reaching c_t
  const unsigned rank = cluster_rank(cluster_size);
  const int64_t b0 = static_cast<int64_t>(blockIdx.x / cluster_size) * tile;
  const int rows = persistent::clamp_rows(batch, b0, tile);
  const int k0 = static_cast<int>(rank) * units;
  const int nu = max(0, min(units, H - k0));
  for (int i = threadIdx.x; i < G * H * units; i += kThreads) {
    const int r = i / units, u = i - r * units;
    w[i] = u < nu ? load<acc_t>(w_hh[static_cast<int64_t>(r) * H + k0 + u]) : acc_t(0);
  }
  // Every row's last step comes first: its c_t gets dc_n (dh_n is already in dh).
  for (int i = threadIdx.x; i < tile * units; i += kThreads) {
    const int b = i / units, u = i - b * units;
    dhr[i] = acc_t(0);
    dcr[i] = b < rows && u < nu ? load<acc_t>(dc_n[(b0 + b) * ld_dcn + k0 + u]) : acc_t(0);
  }
  cluster_sync(cluster_size);
  const Share me(units, nu);
  const int k = k0 + me.u;  // this thread's unit: of the cell (as j) and of dh_{t-1} (as k)
  int cur = 0;
  for (int64_t s = steps - 1; s >= 0; --s) {
    const int64_t t = reverse ? steps - 1 - s : s;
    const int64_t prev = reverse ? t + 1 : t - 1;
    const int64_t rows_t = persistent::rows_at(batch_sizes, batch, t, steps);
    const int64_t rows_prev = persistent::rows_at(batch_sizes, batch, prev, steps);
    const int active = persistent::clamp_rows(rows_t, b0, tile);
    const int carried = persistent::clamp_rows(min(rows_t, rows_prev), b0, tile);
    const int64_t row0 = (offsets ? offsets[t] : t * batch) + b0;
    const int64_t prev0 = rows_prev > 0 ? (offsets ? offsets[prev] : prev * batch) + b0 : 0;
    acc_t* da = grads + cur * tile * ldg;
    if (me.works) {
      // The cell's gradients for this CTA's units: dA_t to every CTA, dc_{t-1} kept.
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int b = me.row(i);
        if (b >= rows) break;
        acc_t ga[G] = {};
        if (b < active) {
          const int64_t row = row0 + b;
#pragma unroll
          for (int g = 0; g < G; ++g) ga[g] = load<acc_t>(gates[row * ld_g + g * H + k]);
          const acc_t dm = load<acc_t>(dh[row * ld_dh + k]) + dhr[b * units + me.u];
          dh[row * ld_dh + k] = store<T>(dm);
          const acc_t cp = load<acc_t>(b < carried ? c[(prev0 + b) * ld_c + k] : c0[(b0 + b) * ld_c0 + k]);
          acc_t dc_prev;
          lstm_backward_cell<ScalarAct, acc_t>(ga[0], ga[1], ga[2], ga[3], load<acc_t>(c[row * ld_c + k]),
                                               cp, dm, dcr[b * units + me.u], dc_prev);
#pragma unroll
          for (int g = 0; g < G; ++g) gates[row * ld_g + g * H + k] = store<T>(ga[g]);
          // To the previous step's row, or to grad_cx for a row that began at c0.
          if (b < carried) {
            dcr[b * units + me.u] = dc_prev;
          } else {
            grad_cx[(b0 + b) * ld_gcx + k] = store<T>(dc_prev);
          }
        }
        for (int r = 0; r < cluster_size; ++r) {
          acc_t* dst = in_rank(da, r, cluster_size) + b * ldg + k;
#pragma unroll
          for (int g = 0; g < G; ++g) dst[g * H] = ga[g];
        }
      }
    }
    cluster_sync(cluster_size);
    if (me.works) {
      // dh_{t-1} = dA_t W_hh for this CTA's units: the previous step's rows, or grad_hx.
      acc_t acc[kRows];
#pragma unroll
      for (int i = 0; i < kRows; ++i) acc[i] = acc_t(0);
      for (int r = 0; r < G * H; ++r) {
        const acc_t wr = w[r * units + me.u];
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
          const int b = me.row(i);
          if (b < active) acc[i] += da[b * ldg + r] * wr;
        }
      }
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int b = me.row(i);
        if (b >= rows) break;
        dhr[b * units + me.u] = b < carried ? acc[i] : acc_t(0);
        if (b >= carried && b < active) grad_hx[(b0 + b) * ld_ghx + k] = store<T>(acc[i]);
      }
    }
    cur ^= 1;
  }
}

// ---------------------------------------------------------------- GRU
// The same design again; r z n in torch's order. Shapes, besides the Elman
// kernels' (3 gates):
//   gates  [N, 3H]  forward: X W_ih^T + b_ih on entry, the activated r z n on
//                   exit; backward: r z n on entry, [dA_r, dA_z, dA_hn] on exit
//   hn     [N, H]   forward: written, (h_{t-1} W_hh^T)_n + b_hn; backward: read,
//                   then dA_n (cells.h, gru_backward_cell)
//   out    [N, H]   forward: written, h_t; backward: read (h_{t-1})
//   dh     [N, H]   backward: dY (+ dh_n on final rows) on entry, the whole
//                   gradient of each h_t on exit
//   b_hh   [3H] or null;  w_hh [3H, H] row-major
constexpr int kGruGates = 3;

template <typename acc_t>
__host__ __device__ inline size_t gru_forward_smem(int H, int units, int tile) {
  return (static_cast<size_t>(kGruGates) * H * units + 2 * static_cast<size_t>(tile) * state_ld(H)) *
         sizeof(acc_t);
}

template <typename acc_t>
__host__ __device__ inline size_t gru_backward_smem(int H, int units, int tile) {
  return (static_cast<size_t>(kGruGates) * H * units +
          2 * static_cast<size_t>(tile) * state_ld(kGruGates * H) + static_cast<size_t>(tile) * units) *
         sizeof(acc_t);
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads)
gru_forward_kernel(T* __restrict__ gates, int64_t ld_g, T* __restrict__ hn, int64_t ld_hn,
                   T* __restrict__ out, int64_t ld_out, const T* __restrict__ h0, int64_t ld_h0,
                   const T* __restrict__ w_hh, const T* __restrict__ b_hh,
                   const int64_t* __restrict__ batch_sizes, const int64_t* __restrict__ offsets,
                   int64_t steps, int64_t batch, int H, int units, int tile, int cluster_size,
                   bool reverse) {
  constexpr int G = kGruGates;
  extern __shared__ __align__(16) unsigned char smem[];
  const int ldh = state_ld(H);
  acc_t* w = reinterpret_cast<acc_t*>(smem);  // [H][G][units], W[g * H + j0 + u][k]
  acc_t* state = w + G * H * units;           // [2][tile][ldh]: h_{t-1}, h_t of the tile's rows
  const unsigned rank = cluster_rank(cluster_size);
  const int64_t b0 = static_cast<int64_t>(blockIdx.x / cluster_size) * tile;
  const int rows = persistent::clamp_rows(batch, b0, tile);
  const int j0 = static_cast<int>(rank) * units;
  const int nu = max(0, min(units, H - j0));
  for (int i = threadIdx.x; i < G * H * units; i += kThreads) {
    const int k = i / (G * units), g = (i / units) % G, u = i % units;
    w[i] = u < nu ? load<acc_t>(w_hh[(static_cast<int64_t>(g) * H + j0 + u) * H + k]) : acc_t(0);
  }
  for (int i = threadIdx.x; i < rows * H; i += kThreads) {
    const int b = i / H, k = i - b * H;
    state[b * ldh + k] = load<acc_t>(h0[(b0 + b) * ld_h0 + k]);
  }
  cluster_sync(cluster_size);
  const Share me(units, nu);
  const int j = j0 + me.u;
  acc_t bias[G];
#pragma unroll
  for (int g = 0; g < G; ++g) bias[g] = b_hh && me.works ? load<acc_t>(b_hh[g * H + j]) : acc_t(0);
  int cur = 0;
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t t = reverse ? steps - 1 - s : s;
    const int active = persistent::clamp_rows(persistent::rows_at(batch_sizes, batch, t, steps), b0, tile);
    const int64_t row0 = (offsets ? offsets[t] : t * batch) + b0;
    const acc_t* h = state + cur * tile * ldh;
    acc_t* next = state + (cur ^ 1) * tile * ldh;
    if (me.works) {
      acc_t acc[kRows][G];  // h_{t-1} W_hh^T + b_hh for this unit's gates
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
#pragma unroll
        for (int g = 0; g < G; ++g) acc[i][g] = bias[g];
      }
      for (int k = 0; k < H; ++k) {
        acc_t wk[G];
#pragma unroll
        for (int g = 0; g < G; ++g) wk[g] = w[(k * G + g) * units + me.u];
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
          const int b = me.row(i);
          if (b < active) {
            const acc_t hk = h[b * ldh + k];
#pragma unroll
            for (int g = 0; g < G; ++g) acc[i][g] += hk * wk[g];
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int b = me.row(i);
        if (b >= rows) break;
        acc_t v = h[b * ldh + j];  // a row not in this step keeps its state
        if (b < active) {
          const int64_t row = row0 + b;
          acc_t r = load<acc_t>(gates[row * ld_g + j]), z = load<acc_t>(gates[row * ld_g + H + j]);
          acc_t n = load<acc_t>(gates[row * ld_g + 2 * H + j]), ht;
          gru_forward_cell<ScalarAct, acc_t>(r, z, n, acc[i][0], acc[i][1], acc[i][2], v, ht);
          gates[row * ld_g + j] = store<T>(r);
          gates[row * ld_g + H + j] = store<T>(z);
          gates[row * ld_g + 2 * H + j] = store<T>(n);
          hn[row * ld_hn + j] = store<T>(acc[i][2]);
          out[row * ld_out + j] = store<T>(ht);
          v = ht;
        }
        for (int r = 0; r < cluster_size; ++r) in_rank(next, r, cluster_size)[b * ldh + j] = v;
      }
    }
    cluster_sync(cluster_size);
    cur ^= 1;
  }
}

template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads)
gru_backward_kernel(T* __restrict__ dh, int64_t ld_dh, T* __restrict__ gates, int64_t ld_g,
                    T* __restrict__ hn, int64_t ld_hn, const T* __restrict__ out, int64_t ld_out,
                    const T* __restrict__ h0, int64_t ld_h0, T* __restrict__ grad_hx, int64_t ld_ghx,
                    const T* __restrict__ w_hh, const int64_t* __restrict__ batch_sizes,
                    const int64_t* __restrict__ offsets, int64_t steps, int64_t batch, int H,
                    int units, int tile, int cluster_size, bool reverse) {
  constexpr int G = kGruGates;
  extern __shared__ __align__(16) unsigned char smem[];
  const int ldg = state_ld(G * H);
  acc_t* w = reinterpret_cast<acc_t*>(smem);  // [3H][units], W[r][k0 + u]
  acc_t* grads = w + G * H * units;           // [2][tile][ldg]: [dA_r, dA_z, dA_hn] of the tile's rows
  acc_t* dhr = grads + 2 * tile * ldg;        // [tile][units]: dh_t from the later step (all but dY)
  const unsigned rank = cluster_rank(cluster_size);
  const int64_t b0 = static_cast<int64_t>(blockIdx.x / cluster_size) * tile;
  const int rows = persistent::clamp_rows(batch, b0, tile);
  const int k0 = static_cast<int>(rank) * units;
  const int nu = max(0, min(units, H - k0));
  for (int i = threadIdx.x; i < G * H * units; i += kThreads) {
    const int r = i / units, u = i - r * units;
    w[i] = u < nu ? load<acc_t>(w_hh[static_cast<int64_t>(r) * H + k0 + u]) : acc_t(0);
  }
  for (int i = threadIdx.x; i < tile * units; i += kThreads) dhr[i] = acc_t(0);
  cluster_sync(cluster_size);
  const Share me(units, nu);
  const int k = k0 + me.u;  // this thread's unit: of the cell (as j) and of dh_{t-1} (as k)
  int cur = 0;
  for (int64_t s = steps - 1; s >= 0; --s) {
    const int64_t t = reverse ? steps - 1 - s : s;
    const int64_t prev = reverse ? t + 1 : t - 1;
    const int64_t rows_t = persistent::rows_at(batch_sizes, batch, t, steps);
    const int64_t rows_prev = persistent::rows_at(batch_sizes, batch, prev, steps);
    const int active = persistent::clamp_rows(rows_t, b0, tile);
    const int carried = persistent::clamp_rows(min(rows_t, rows_prev), b0, tile);
    const int64_t row0 = (offsets ? offsets[t] : t * batch) + b0;
    const int64_t prev0 = rows_prev > 0 ? (offsets ? offsets[prev] : prev * batch) + b0 : 0;
    acc_t* da = grads + cur * tile * ldg;
    acc_t direct[kRows];  // d z: the part of dh_{t-1} that skips W_hh
    if (me.works) {
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int b = me.row(i);
        direct[i] = acc_t(0);
        if (b >= rows) break;
        acc_t ga[G] = {};
        if (b < active) {
          const int64_t row = row0 + b;
          const acc_t d = load<acc_t>(dh[row * ld_dh + k]) + dhr[b * units + me.u];
          dh[row * ld_dh + k] = store<T>(d);
          const acc_t hp = load<acc_t>(b < carried ? out[(prev0 + b) * ld_out + k] : h0[(b0 + b) * ld_h0 + k]);
#pragma unroll
          for (int g = 0; g < G; ++g) ga[g] = load<acc_t>(gates[row * ld_g + g * H + k]);
          acc_t hn_k = load<acc_t>(hn[row * ld_hn + k]);
          gru_backward_cell<ScalarAct, acc_t>(ga[0], ga[1], ga[2], hn_k, d, hp, direct[i]);
#pragma unroll
          for (int g = 0; g < G; ++g) gates[row * ld_g + g * H + k] = store<T>(ga[g]);
          hn[row * ld_hn + k] = store<T>(hn_k);
        }
        for (int r = 0; r < cluster_size; ++r) {
          acc_t* dst = in_rank(da, r, cluster_size) + b * ldg + k;
#pragma unroll
          for (int g = 0; g < G; ++g) dst[g * H] = ga[g];
        }
      }
    }
    cluster_sync(cluster_size);
    if (me.works) {
      // dh_{t-1} = [dA_r, dA_z, dA_hn] W_hh + d z: the previous step's rows, or grad_hx.
      acc_t acc[kRows];
#pragma unroll
      for (int i = 0; i < kRows; ++i) acc[i] = acc_t(0);
      for (int r = 0; r < G * H; ++r) {
        const acc_t wr = w[r * units + me.u];
#pragma unroll
        for (int i = 0; i < kRows; ++i) {
          const int b = me.row(i);
          if (b < active) acc[i] += da[b * ldg + r] * wr;
        }
      }
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int b = me.row(i);
        if (b >= rows) break;
        const acc_t g = acc[i] + direct[i];
        dhr[b * units + me.u] = b < carried ? g : acc_t(0);
        if (b >= carried && b < active) grad_hx[(b0 + b) * ld_ghx + k] = store<T>(g);
      }
    }
    cur ^= 1;
  }
}

}  // namespace cluster
}  // namespace fastrnn
