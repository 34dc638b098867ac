// fastrnn CPU: C (+)= A B + bias with the recurrence's tiles
// (tile_kernels.h), for the products around the recurrence: the input
// projection P = X W_ih^T + b, the input gradient dX = dA W_ih and the weight
// gradients dW_ih = dA^T X, dW_hh = dA^T H_prev (A transposed).
//
// Why: torch's BLAS (MKL) runs AVX2 kernels on AMD CPUs: on Zen 5, half the
// AVX-512 rate, so there these products cost more than the whole recurrence;
// on Zen 4, whose AVX-512 runs at the AVX2 rate, the backward op still ran
// 3-11% faster with these than with BLAS (tanh-1x512-T128, tanh-2x256).
// prefer_linear() says where to use this instead of BLAS: AMD with AVX-512
// (FASTRNN_CPU_LINEAR=1/0 forces it on/off, read per call). Elsewhere BLAS
// runs at its peak and stays.
//
// A bfloat16 call's products run on bfloat16 pairs where the CPU has
// AVX512-BF16 (bf16_pairs.h): both operands rounded, float32 sums; on AMX
// tiles where the CPU has them (amx_tiles.h), which beat float32 BLAS, so
// there prefer_linear() takes these for a bfloat16 call on any CPU.
//
// Threads split C's rows or its panels (no barrier): panels where B is big
// (dW_hh: B = H_prev, [T*B, H]) so that each thread packs only its own, rows
// otherwise (each thread packs all of a small B, e.g. W_ih). Each output
// element is one accumulator over k in order: the same bits for any thread
// count.
#pragma once

#include "recurrence.h"

namespace fastrnn::cpu {

template <typename T>
struct LinearProduct {
  int64_t rows = 0;              // M
  int64_t cols = 0;              // N
  int64_t depth = 0;             // K
  const T* a = nullptr;          // [M, lda] row-major, columns [0, K); or, a_transposed,
  int64_t lda = 0;               //   [K, lda] with A(i, k) = a[k * lda + i]
  bool a_transposed = false;
  const T* w = nullptr;          // B = w^T with w [N, ldw] (w_transposed), or B = w with w [K, ldw]
  int64_t ldw = 0;               //   (with w_step_rows: B's row k = t * w_step_rows + b at
  bool w_transposed = false;     //   w + t * ldw_step + b * ldw, a padded sequence's steps
  int64_t w_step_rows = 0;       //   in any layout, e.g. a batch_first input's)
  int64_t ldw_step = 0;
  const T* bias = nullptr;       // [N] or null
  T* c = nullptr;                // [M, ldc]: A B + bias (+ c on entry if accumulate) on exit
  int64_t ldc = 0;               //   (must not overlap a, w, bias)
  bool accumulate = false;
};

// k in chunks of this many: a panel chunk (128 KB in float) stays in L2
// while every row tile of the slot streams past it. (Unchunked, dW at
// T*B = 8192 ran slower than BLAS: the operands came from L3 per panel.)
constexpr int64_t kDepthChunk = 1024;

// Rows of A a slot rounds to bfloat16 pairs at a time (a bfloat16 call's
// products; 512 KB of pairs at most).
constexpr int64_t kPairRows = 256;

inline bool prefer_linear() {
  if (const char* v = std::getenv("FASTRNN_CPU_LINEAR"); v && (v[0] == '0' || v[0] == '1') && !v[1]) {
    return v[0] == '1';
  }
  if (!enabled()) return false;
  if (amx::tiles() && bf16_products()) return true;
  return simd::cpu_vendor() == simd::Vendor::Amd && simd::runtime_isa() == simd::Isa::Avx512;
}

// The depth of the chunk of k from k0 on: kDepthChunk, but on AMX tiles never
// leaving a last chunk shallower than their layout takes (amx::layout_fits,
// 16): the one before leaves it 64 to 95 (chunks start at even k, as pairs do).
inline int64_t chunk_at(int64_t k0, int64_t depth, bool amx) {
  const int64_t rest = depth - k0, chunk = std::min(rest, kDepthChunk);
  if (amx && rest - chunk > 0 && rest - chunk < 64) return (rest - 64) / 32 * 32;
  return chunk;
}

// B's rows [k0, k0 + K) into panels [panel_begin, panel_end) (pack_panels),
// a step's rows at a time where B's rows lie in steps. half_tail: as the
// float kernels read a narrow last panel (not the kernels on pairs).
template <typename T>
void pack_depth(const LinearProduct<T>& p, int64_t k0, int64_t K, const KernelSet<T>& ks,
                int64_t panel_begin, int64_t panel_end, T* panels, bool half_tail) {
  if (p.w_transposed || p.w_step_rows <= 0) {
    const T* w = p.w + (p.w_transposed ? k0 : k0 * p.ldw);
    pack_panels(w, p.ldw, p.cols, K, ks.nr, ks.lanes, p.w_transposed, panel_begin, panel_end,
                panels, 0, -1, false, half_tail);
    return;
  }
  for (int64_t k = k0; k < k0 + K;) {
    const int64_t t = k / p.w_step_rows, b = k % p.w_step_rows;
    const int64_t n = std::min(p.w_step_rows - b, k0 + K - k);
    pack_panels(p.w + t * p.ldw_step + b * p.ldw, p.ldw, p.cols, n, ks.nr, ks.lanes, false,
                panel_begin, panel_end, panels, k - k0, K, false, half_tail);
    k += n;
  }
}

// Computes p; false (nothing done) for a dtype other than float / double, an
// empty product or a CPU without AVX-512, so that the caller falls back to
// BLAS.
template <typename T>
bool linear(const LinearProduct<T>& p) {
  if constexpr (!(std::is_same_v<T, float> || std::is_same_v<T, double>)) {
    return false;
  } else {
    if (p.rows <= 0 || p.cols <= 0 || p.depth <= 0) return false;
    const KernelSet<T> ks = kernel_set<T>(simd::runtime_isa());
    if (!ks.linear) return false;
    const int64_t panels = (p.cols + ks.nr - 1) / ks.nr;
    const int64_t budget = detail::slot_budget();
    // Packing an element of B costs about as much as 50 of a tile's
    // multiply-adds, so a thread that packs all of B (a row split) spends
    // some 50 * threads / M of its time packing: split panels instead where
    // that passes 10% and there are enough panels.
    const bool by_panels = budget > 1 && panels >= budget && p.rows < 500 * budget;
    const int64_t slots = by_panels ? budget
                                    : std::max<int64_t>(1, std::min(budget, (p.rows + ks.mr - 1) / ks.mr));
    const int64_t line = 64 / static_cast<int64_t>(sizeof(T));
    const int64_t max_panels = by_panels ? (panels + slots - 1) / slots : panels;
    const int64_t chunk = std::min(p.depth, kDepthChunk);
    // A bfloat16 call's products on pairs (bf16_pairs.h): each slot also
    // keeps rows of A as pairs (StepTask::a_pairs), one chunk of k and at
    // most kPairRows rows at a time (a slot's rows can be all T * B); on
    // AMX tiles, A transposed too as rows of pairs.
    const bool pairs = ks.linear_pairs && bf16_products();
    const bool amx = pairs && amx::layout_fits(0, p.depth) && amx::tiles();
    const int64_t pair_elems = !pairs ? 0
                               : p.a_transposed && !amx ? (chunk + 1) / 2 * kPairRows
                                                        : kPairRows * pairs::row_words(0, chunk);
    const int64_t panel_elems = (max_panels * chunk * ks.nr + line - 1) / line * line;
    const int64_t per_slot = panel_elems + (pair_elems + line - 1) / line * line;
    scratch::Buffer<T> pack(slots * per_slot);
    torch::stable::parallel_for(0, slots, 1, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        T* panels_s = pack.data + s * per_slot;
        StepTask<T> t;
        t.a_pairs = reinterpret_cast<uint32_t*>(panels_s + panel_elems);
        t.d_lo = {p.c, p.ldc};
        t.a_split = t.d_split = p.rows;
        t.row_begin = by_panels ? 0 : detail::split(p.rows, slots, s);
        t.row_end = by_panels ? p.rows : detail::split(p.rows, slots, s + 1);
        t.panel_begin = by_panels ? detail::split(panels, slots, s) : 0;
        t.panel_end = by_panels ? detail::split(panels, slots, s + 1) : panels;
        t.panels = panels_s;
        t.H = p.cols;
        t.amx = amx;
        for (int64_t k0 = 0; k0 < p.depth; k0 += t.K) {
          // Chunks after the first add to what the first wrote; the bias once.
          t.K = chunk_at(k0, p.depth, amx);
          t.a_lo = {p.a + (p.a_transposed ? k0 * p.lda : k0), p.lda};
          t.bias = k0 == 0 ? p.bias : nullptr;
          t.accumulate = p.accumulate || k0 > 0;
          pack_depth(p, k0, t.K, ks, t.panel_begin, t.panel_end, panels_s, ks.half_tail && !pairs);
          if constexpr (std::is_same_v<T, float>) {
            if (pairs) {
              auto width = [&](int64_t i) { return panel_width(p.cols, ks.nr, ks.lanes, t.panel_begin + i); };
              panels_to_pairs(panels_s, t.panel_end - t.panel_begin, t.K * ks.nr, t.K, width);
              if (amx) {
                // The tiles' whole tiles of k: zero pair rows past the chunk's.
                for (int64_t i = 0; i < t.panel_end - t.panel_begin; ++i) {
                  uint32_t* panel = reinterpret_cast<uint32_t*>(panels_s + i * t.K * ks.nr);
                  std::fill(panel + (t.K + 1) / 2 * width(i), panel + pairs::words(t.K) * width(i), 0u);
                }
              }
              StepTask<T> block = t;
              for (int64_t i = t.row_begin; i < t.row_end; i += kPairRows) {
                block.row_begin = i;
                block.row_end = std::min(t.row_end, i + kPairRows);
                (p.a_transposed ? ks.linear_at_pairs : ks.linear_pairs)(block);
              }
              continue;
            }
          }
          (p.a_transposed ? ks.linear_at : ks.linear)(t);
        }
      }
    });
    return true;
  }
}

}  // namespace fastrnn::cpu
