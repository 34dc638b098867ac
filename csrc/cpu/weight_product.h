// fastrnn CPU: the weight gradients' products, C (+)= A^T B, where A and B
// are row-major over the same K rows: dW_hh = dA^T H_prev and dW_ih = dA^T X
// over a sequence's T * B rows (K long; M and N a layer's widths).
//
//   A  [K, lda]  C's rows are A's columns [0, M)    (dA)
//   B  [K, ldb]  C's columns are B's columns [0, N)  (H_prev or X)
//   C  [M, ldc]  A^T B, plus C on entry if accumulate
//
// Why not BLAS: on Intel, torch's MKL ran these at 62-77% of its 2048^3
// sgemm rate (M = N = 128-256, K = 1800-3600). Rows of A and B lie a
// power of two apart (1 KB at H = 256), so an unpacked block of B maps onto
// a few of L1's sets and does not stay there; packed, an MR x NR tile of C
// runs from L1 near the FMA rate.
//
// How: K in chunks of kChunk rows; per chunk A's columns are packed
// tile-major ([M / MR][kc][MR]), then B's columns one block of NR at a time
// ([kc][NR], 16 KB, which stays in L1 while every tile of A passes it). A
// tile of C stays in registers over the chunk.
//
// Threads: K in two fixed halves when it is long (kMinHalf), each summed in
// row order by one accumulator per element of C (the second half into a
// scratch, then added to the first's): the same bits for any thread count.
// More threads than halves split C's columns too, which changes no sum.
#pragma once

#include "../scratch.h"
#include "simd.h"

#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace fastrnn::cpu {

template <typename T>
struct WeightProduct {
  int64_t M = 0, N = 0, K = 0;
  const T* a = nullptr;
  int64_t lda = 0;
  const T* b = nullptr;
  int64_t ldb = 0;
  T* c = nullptr;
  int64_t ldc = 0;
  bool accumulate = false;
};

// D lanes of T; an MR x NV vectors tile of C in registers.
template <typename T, int D>
struct WeightTiles {
  using V = typename simd::Vec<T, D>::type;
  static constexpr int MR = 8, NV = 2, NR = NV * D;
  static constexpr int64_t kChunk = 128;

  // The tile of C at c (+)= ap^T bp over kc rows: MR rows of W vectors;
  // ap [kc][MR], bp [kc][W * D], packed with zeros past C's rows and columns.
  template <int W>
  static FASTRNN_INLINE void tile(const T* ap, const T* bp, int64_t kc, T* c, int64_t ldc, bool load) {
    V acc[MR][W];
    for (int r = 0; r < MR; ++r) {
      for (int v = 0; v < W; ++v) {
        if (load) {
          simd::load(acc[r][v], c + r * ldc + v * D);
        } else {
          acc[r][v] = V{};
        }
      }
    }
    for (int64_t k = 0; k < kc; ++k) {
      V b[W];
      for (int v = 0; v < W; ++v) simd::load(b[v], bp + (k * W + v) * D);
      for (int r = 0; r < MR; ++r) {
        const T x = ap[k * MR + r];
        for (int v = 0; v < W; ++v) acc[r][v] = acc[r][v] + x * b[v];
      }
    }
    for (int r = 0; r < MR; ++r) {
      for (int v = 0; v < W; ++v) simd::store(c + r * ldc + v * D, acc[r][v]);
    }
  }

  // dst [kc][W] = src's rows [0, kc) (row stride ld), columns [0, n), zeros past n.
  template <int W>
  static FASTRNN_INLINE void pack(T* dst, const T* src, int64_t ld, int64_t kc, int n) {
    if (n == W) {
      for (int64_t k = 0; k < kc; ++k) std::memcpy(dst + k * W, src + k * ld, W * sizeof(T));
      return;
    }
    for (int64_t k = 0; k < kc; ++k) {
      int l = 0;
      for (; l < n; ++l) dst[k * W + l] = src[k * ld + l];
      for (; l < W; ++l) dst[k * W + l] = T(0);
    }
  }

  // Every tile of C's block of W vectors of columns at c over the chunk. The
  // last tile, where C's rows end inside it, goes through whole rows in
  // `rows` (lane by lane at every chunk's ends it cost as much as its products).
  template <int W>
  static FASTRNN_INLINE void block(const WeightProduct<T>& p, const T* ap, const T* bp, int64_t kc, T* c,
                                   int64_t ldc, bool load) {
    int64_t i0 = 0;
    for (; i0 + MR <= p.M; i0 += MR) tile<W>(ap + i0 * kc, bp, kc, c + i0 * ldc, ldc, load);
    if (i0 == p.M) return;
    alignas(64) T rows[MR * W * D];
    const size_t bytes = W * D * sizeof(T);
    if (load) {
      for (int64_t r = 0; i0 + r < p.M; ++r) std::memcpy(rows + r * W * D, c + (i0 + r) * ldc, bytes);
    }
    tile<W>(ap + i0 * kc, bp, kc, rows, W * D, load);
    for (int64_t r = 0; i0 + r < p.M; ++r) std::memcpy(c + (i0 + r) * ldc, rows + r * W * D, bytes);
  }

  static int64_t packed_a(int64_t M) { return (M + MR - 1) / MR * MR * kChunk; }
  static constexpr int64_t packed_b() { return kChunk * NR; }
  static int64_t edge_size(int64_t M) { return M * NR; }

  // C's columns [j0, j1) from A's and B's rows [k0, k1), added to C as it is
  // if load. ap, bp, edge: packed_a(M), packed_b() and edge_size(M) elements.
  static FASTRNN_INLINE void run(const WeightProduct<T>& p, T* c, int64_t ldc, int64_t k0, int64_t k1,
                                 int64_t j0, int64_t j1, bool load, T* ap, T* bp, T* edge) {
    // Blocks of NR columns; a last one of at most D columns on one vector a
    // row. Where C's columns end inside a vector, that block sums in `edge`
    // ([M][its width]) on whole vectors, and goes to C at the end.
    const int64_t last = j0 + (j1 - j0 - 1) / NR * NR;
    const int64_t last_cols = j1 - last, last_width = last_cols <= D ? D : NR;
    const bool use_edge = last_cols % D != 0;
    auto edge_rows = [&](bool to_c) {
      for (int64_t i = 0; i < p.M; ++i) {
        T* e = edge + i * last_width;
        T* ci = c + i * ldc + last;
        if (to_c) {
          std::memcpy(ci, e, last_cols * sizeof(T));
        } else {
          std::memcpy(e, ci, last_cols * sizeof(T));
          std::fill(e + last_cols, e + last_width, T(0));
        }
      }
    };
    if (use_edge && load) edge_rows(false);
    for (int64_t kb = k0; kb < k1; kb += kChunk) {
      const int64_t kc = std::min(kChunk, k1 - kb);
      for (int64_t i0 = 0; i0 < p.M; i0 += MR) {
        pack<MR>(ap + i0 * kc, p.a + kb * p.lda + i0, p.lda, kc, static_cast<int>(std::min<int64_t>(MR, p.M - i0)));
      }
      const bool first = load || kb > k0;
      for (int64_t j = j0; j < j1; j += NR) {
        const int cols = static_cast<int>(std::min<int64_t>(NR, j1 - j));
        const T* b = p.b + kb * p.ldb + j;
        T* cj = use_edge && j == last ? edge : c + j;
        const int64_t ld = use_edge && j == last ? last_width : ldc;
        if (cols <= D) {
          pack<D>(bp, b, p.ldb, kc, cols);
          block<1>(p, ap, bp, kc, cj, ld, first);
        } else {
          pack<NR>(bp, b, p.ldb, kc, cols);
          block<NV>(p, ap, bp, kc, cj, ld, first);
        }
      }
    }
    if (use_edge) edge_rows(true);
  }
};

#if FASTRNN_X86_DISPATCH
namespace kernels {
FASTRNN_TARGET_AVX512 inline void weight_product_avx512(const WeightProduct<float>& p, float* c, int64_t ldc,
                                                        int64_t k0, int64_t k1, int64_t j0, int64_t j1,
                                                        bool load, float* ap, float* bp, float* edge) {
  WeightTiles<float, 16>::run(p, c, ldc, k0, k1, j0, j1, load, ap, bp, edge);
}
FASTRNN_TARGET_AVX512 inline void weight_product_avx512(const WeightProduct<double>& p, double* c, int64_t ldc,
                                                        int64_t k0, int64_t k1, int64_t j0, int64_t j1,
                                                        bool load, double* ap, double* bp, double* edge) {
  WeightTiles<double, 8>::run(p, c, ldc, k0, k1, j0, j1, load, ap, bp, edge);
}
}  // namespace kernels
#endif

// K of at least this many rows is summed in two halves.
constexpr int64_t kMinHalf = 512;

// Computes p; false (nothing done) where it has no kernel (a CPU without
// AVX-512), so that the caller falls back to BLAS.
template <typename T>
bool weight_product(const WeightProduct<T>& p) {
#if FASTRNN_X86_DISPATCH
  if (simd::runtime_isa() != simd::Isa::Avx512 || p.M <= 0 || p.N <= 0 || p.K <= 0) return false;
  using Tiles = WeightTiles<T, 64 / sizeof(T)>;
  const int64_t halves = p.K >= 2 * kMinHalf ? 2 : 1;
  const int64_t blocks = (p.N + Tiles::NR - 1) / Tiles::NR;
  const int64_t threads = torch::stable::get_num_threads();
  const int64_t parts = std::max<int64_t>(1, std::min(blocks, threads / halves));
  const int64_t items = halves * parts;
  const int64_t per_item = Tiles::packed_a(p.M) + Tiles::packed_b() + Tiles::edge_size(p.M);
  scratch::Buffer<T> pack(items * per_item);
  // The second half's sums, [M, N], where there is one.
  scratch::Buffer<T> second(halves > 1 ? p.M * p.N : 0);
  torch::stable::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / parts, q = item % parts;
      const int64_t k0 = p.K * h / halves, k1 = p.K * (h + 1) / halves;
      const int64_t j0 = blocks * q / parts * Tiles::NR, j1 = std::min(p.N, blocks * (q + 1) / parts * Tiles::NR);
      T* ap = pack.data + item * per_item;
      kernels::weight_product_avx512(p, h == 0 ? p.c : second.data, h == 0 ? p.ldc : p.N, k0, k1, j0, j1,
                                     h == 0 && p.accumulate, ap, ap + Tiles::packed_a(p.M),
                                     ap + Tiles::packed_a(p.M) + Tiles::packed_b());
    }
  });
  if (halves > 1) {
    torch::stable::parallel_for(0, p.M, std::max<int64_t>(1, 16384 / p.N), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        T* dst = p.c + i * p.ldc;
        const T* src = second.data + i * p.N;
#pragma GCC ivdep
        for (int64_t j = 0; j < p.N; ++j) dst[j] += src[j];
      }
    });
  }
  return true;
#else
  (void)p;
  return false;
#endif
}

}  // namespace fastrnn::cpu
