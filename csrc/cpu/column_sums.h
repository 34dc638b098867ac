// fastrnn CPU: the column sums of a matrix in double (the bias gradients:
// sum over the rows of dA [T*B, H]), on the widest vectors the CPU has.
//
//   out[j] = sum over i < rows of t[i * ld + j],  j in [col_begin, col_end)
//
// t: [rows, ld] row-major, columns [col_begin, col_end) read; out: [cols].
// Each column is one double accumulator summed in row order, whatever the
// vector width or the columns' split among threads: the same bits on every
// ISA and thread count (the same as the scalar loop). The baseline build
// vectorised that loop on 16-byte vectors with its sums in memory, one
// store a pair of columns a row; here a block's sums stay in registers.
#pragma once

#include "simd.h"

#include <algorithm>
#include <cstdint>

namespace fastrnn::cpu {

// D double lanes per vector, kVectors vectors of sums per block of columns.
template <typename T, int D>
struct ColumnSums {
  using VD = typename simd::Vec<double, D>::type;
  using VT = typename simd::Vec<T, D>::type;
  static constexpr int kVectors = 8;
  static constexpr int64_t kBlock = int64_t{kVectors} * D;

  // Rows this far ahead are fetched into cache: a block reads a few lines
  // of each row, rows lie ld apart, and the hardware's stream stops at every
  // 4 KB page (H = 256: every 4 rows), so the sums waited on memory.
  static constexpr int64_t kAhead = 8;

  static FASTRNN_INLINE void fetch(const T* row, int64_t count) {
    for (int64_t c = 0; c < count; c += 64 / static_cast<int64_t>(sizeof(T))) __builtin_prefetch(row + c);
    __builtin_prefetch(row + count - 1);  // the line a row not aligned to 64 bytes ends in
  }

  // Columns [j0, j0 + count), count <= kBlock, in one pass over the rows: the
  // whole vectors loaded as vectors, the last partial one element-wise.
  static FASTRNN_INLINE void block(T* out, const T* t, int64_t rows, int64_t ld, int64_t j0, int64_t count) {
    const int whole = static_cast<int>(count / D), part = static_cast<int>(count % D);
    VD acc[kVectors];
    for (int v = 0; v < kVectors; ++v) acc[v] = VD{};
    for (int64_t i = 0; i < rows; ++i) {
      const T* row = t + i * ld + j0;
      if (i + kAhead < rows) fetch(row + kAhead * ld, count);
      for (int v = 0; v < whole; ++v) {
        VT x;
        VD wide;
        simd::load(x, row + v * D);
        simd::widen(wide, x);
        acc[v] += wide;
      }
      if (part) {
        VD x{};
        for (int l = 0; l < part; ++l) x[l] = static_cast<double>(row[whole * D + l]);
        acc[whole] += x;
      }
    }
    for (int64_t c = 0; c < count; ++c) out[j0 + c] = static_cast<T>(acc[c / D][c % D]);
  }

  static FASTRNN_INLINE void run(T* out, const T* t, int64_t rows, int64_t ld, int64_t col_begin,
                                 int64_t col_end) {
    for (int64_t j0 = col_begin; j0 < col_end; j0 += kBlock) {
      const int64_t count = std::min(kBlock, col_end - j0);
      if (count == kBlock) {
        block(out, t, rows, ld, j0, kBlock);  // constant bounds: the loops unroll
      } else {
        block(out, t, rows, ld, j0, count);
      }
    }
  }
};

namespace kernels {
template <typename T>
void column_sums_baseline(T* out, const T* t, int64_t rows, int64_t ld, int64_t c0, int64_t c1) {
  ColumnSums<T, 2>::run(out, t, rows, ld, c0, c1);
}
#if FASTRNN_X86_DISPATCH
template <typename T>
FASTRNN_TARGET_AVX2 void column_sums_avx2(T* out, const T* t, int64_t rows, int64_t ld, int64_t c0,
                                          int64_t c1) {
  ColumnSums<T, 4>::run(out, t, rows, ld, c0, c1);
}
template <typename T>
FASTRNN_TARGET_AVX512 void column_sums_avx512(T* out, const T* t, int64_t rows, int64_t ld,
                                              int64_t c0, int64_t c1) {
  ColumnSums<T, 8>::run(out, t, rows, ld, c0, c1);
}
#endif
}  // namespace kernels

template <typename T>
using ColumnSumsFn = void (*)(T*, const T*, int64_t, int64_t, int64_t, int64_t);

// The kernel for this ISA (a block is at most 64 columns: sum_columns splits
// the columns among threads in blocks of 64).
template <typename T>
ColumnSumsFn<T> column_sums_kernel(simd::Isa isa) {
#if FASTRNN_X86_DISPATCH
  if (isa == simd::Isa::Avx512) return kernels::column_sums_avx512<T>;
  if (isa == simd::Isa::Avx2) return kernels::column_sums_avx2<T>;
#else
  (void)isa;
#endif
  return kernels::column_sums_baseline<T>;
}

}  // namespace fastrnn::cpu
