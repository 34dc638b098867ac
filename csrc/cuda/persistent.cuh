// fastrnn: persistent Elman recurrences. One launch covers all T steps: each
// CTA owns a tile of batch rows, keeps W_hh and its rows' state in shared
// memory (fp32 state for the half types, fp64 for double) for the whole
// sequence, and synchronises only within the CTA between steps.
//
// Shapes (N rows of the flattened sequence, B batch, H hidden, T steps; every
// [rows, H] argument has unit column stride and the row stride ld_<name>):
//   out        [N, H]  forward: P = X W_ih^T + b on entry, h on exit
//   dA         [N, H]  backward: dY (+ dh_n on final rows) on entry, dA on exit
//   hx         [B, H]  initial state;  grad_hx [B, H] written for rows that began at hx
//   w_hh       [H, H]  row-major, W[j][k] (output unit j, input unit k)
//   batch_sizes, offsets [T] int64 on the device, or null for a padded sequence
//                 (batch B at every step, step t at row t * B)
// Step t's rows [0, carried) continue from the previous step and rows
// [carried, batch_t) start from hx (elman_driver.h, StepRows): the shared
// state row b simply holds whatever row b's latest state is, hx until it starts.
#pragma once

#include "../activation.h"
#include "../numeric.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace fastrnn {

namespace persistent {

constexpr int kThreads = 256;
constexpr int kMaxPerThread = 8;  // outputs per thread per step: tile rows * H <= 2048

__device__ __forceinline__ int64_t rows_at(const int64_t* batch_sizes, int64_t batch,
                                           int64_t t, int64_t steps) {
  if (t < 0 || t >= steps) return 0;
  return batch_sizes ? batch_sizes[t] : batch;
}

__device__ __forceinline__ int clamp_rows(int64_t rows, int64_t b0, int tile) {
  const int64_t n = rows - b0;
  return n <= 0 ? 0 : (n >= tile ? tile : static_cast<int>(n));
}

template <typename T, typename acc_t, Activation A>
__global__ void __launch_bounds__(kThreads)
forward_kernel(T* __restrict__ out, int64_t ld_out, const T* __restrict__ hx, int64_t ld_hx,
               const T* __restrict__ w_hh, const int64_t* __restrict__ batch_sizes,
               const int64_t* __restrict__ offsets, int64_t steps, int64_t batch, int H, int tile,
               bool reverse) {
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* w_t = reinterpret_cast<acc_t*>(smem);  // [H][H], w_t[k * H + j] = W[j][k]
  acc_t* h = w_t + H * H;                        // [tile][H]
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * tile;
  const int tile_rows = clamp_rows(batch, b0, tile);
  for (int i = threadIdx.x; i < H * H; i += blockDim.x) {
    w_t[(i % H) * H + i / H] = load<acc_t>(w_hh[i]);
  }
  for (int i = threadIdx.x; i < tile_rows * H; i += blockDim.x) {
    h[i] = load<acc_t>(hx[(b0 + i / H) * ld_hx + i % H]);
  }
  __syncthreads();
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t t = reverse ? steps - 1 - s : s;
    const int active = clamp_rows(rows_at(batch_sizes, batch, t, steps), b0, tile);
    T* out_t = out + ((offsets ? offsets[t] : t * batch) + b0) * ld_out;
    acc_t v[kMaxPerThread];
#pragma unroll
    for (int r = 0; r < kMaxPerThread; ++r) {
      const int o = threadIdx.x + r * kThreads;
      if (o < active * H) {
        const int b = o / H, j = o - b * H;
        const acc_t* hb = h + b * H;
        acc_t acc = load<acc_t>(out_t[b * ld_out + j]);
        for (int k = 0; k < H; ++k) acc += hb[k] * w_t[k * H + j];
        v[r] = activate<A>(acc);
      }
    }
    __syncthreads();  // every h_{t-1} read before any h_t is written
#pragma unroll
    for (int r = 0; r < kMaxPerThread; ++r) {
      const int o = threadIdx.x + r * kThreads;
      if (o < active * H) {
        h[o] = v[r];
        out_t[(o / H) * ld_out + o % H] = store<T>(v[r]);
      }
    }
    __syncthreads();
  }
}

template <typename T, typename acc_t, Activation A>
__global__ void __launch_bounds__(kThreads)
backward_kernel(T* __restrict__ dA, int64_t ld_dA, const T* __restrict__ out, int64_t ld_out,
                T* __restrict__ grad_hx, int64_t ld_ghx, const T* __restrict__ w_hh,
                const int64_t* __restrict__ batch_sizes, const int64_t* __restrict__ offsets,
                int64_t steps, int64_t batch, int H, int tile, bool reverse) {
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* w = reinterpret_cast<acc_t*>(smem);  // [H][H], w[j * H + k] = W[j][k]
  acc_t* dh = w + H * H;                      // [tile][H], gradient w.r.t. this step's h
  acc_t* da = dh + tile * H;                  // [tile][H], this step's dA
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * tile;
  const int tile_rows = clamp_rows(batch, b0, tile);
  for (int i = threadIdx.x; i < H * H; i += blockDim.x) w[i] = load<acc_t>(w_hh[i]);
  for (int i = threadIdx.x; i < tile_rows * H; i += blockDim.x) dh[i] = acc_t(0);
  __syncthreads();
  // Backward visits the steps in the opposite order to forward.
  for (int64_t s = steps - 1; s >= 0; --s) {
    const int64_t t = reverse ? steps - 1 - s : s;
    const int64_t prev = reverse ? t + 1 : t - 1;
    const int64_t rows_t = rows_at(batch_sizes, batch, t, steps);
    const int active = clamp_rows(rows_t, b0, tile);
    const int64_t carried_rows = min(rows_t, rows_at(batch_sizes, batch, prev, steps));
    const int carried = clamp_rows(carried_rows, b0, tile);
    const int64_t row0 = (offsets ? offsets[t] : t * batch) + b0;
    // dA_t = (dY_t + dh_t) * act'(h_t)
    for (int o = threadIdx.x; o < active * H; o += blockDim.x) {
      const int64_t row = row0 + o / H, col = o % H;
      const acc_t y = load<acc_t>(out[row * ld_out + col]);
      const acc_t d = activation_grad<A>(load<acc_t>(dA[row * ld_dA + col]) + dh[o], y);
      da[o] = d;
      dA[row * ld_dA + col] = store<T>(d);
    }
    __syncthreads();
    // dh_{t-1} = dA_t W_hh: to the previous step's rows, or to grad_hx.
    acc_t v[kMaxPerThread];
#pragma unroll
    for (int r = 0; r < kMaxPerThread; ++r) {
      const int o = threadIdx.x + r * kThreads;
      if (o < active * H) {
        const int b = o / H, k = o - b * H;
        const acc_t* db = da + b * H;
        acc_t acc = acc_t(0);
        for (int j = 0; j < H; ++j) acc += db[j] * w[j * H + k];
        v[r] = acc;
      }
    }
    __syncthreads();  // dh is read above (first loop) before it is rewritten
#pragma unroll
    for (int r = 0; r < kMaxPerThread; ++r) {
      const int o = threadIdx.x + r * kThreads;
      if (o < tile_rows * H) {
        const int b = o / H;
        // Rows the previous step does not carry into this one have dh = 0
        // there (their h was final; dh_n is already in dA).
        dh[o] = b < carried ? v[r] : acc_t(0);
        if (b >= carried && b < active) grad_hx[(b0 + b) * ld_ghx + o % H] = store<T>(v[r]);
      }
    }
    __syncthreads();
  }
}

}  // namespace persistent
}  // namespace fastrnn
