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

  static FASTRNN_INLINE void run(T* out, const T* t, int64_t rows, int64_t ld, int64_t col_begin,
                                 int64_t col_end) {
    int64_t j0 = col_begin;
    for (; j0 + kBlock <= col_end; j0 += kBlock) {
      VD acc[kVectors];
      for (int v = 0; v < kVectors; ++v) acc[v] = VD{};
      for (int64_t i = 0; i < rows; ++i) {
        const T* row = t + i * ld + j0;
        for (int v = 0; v < kVectors; ++v) {
          VT x;
          simd::load(x, row + v * D);
          acc[v] += __builtin_convertvector(x, VD);
        }
      }
      for (int v = 0; v < kVectors; ++v) {
        for (int l = 0; l < D; ++l) out[j0 + v * D + l] = static_cast<T>(acc[v][l]);
      }
    }
    // The last columns, fewer than a block, one vector of them at a time.
    for (; j0 < col_end; j0 += D) {
      const int width = static_cast<int>(std::min<int64_t>(D, col_end - j0));
      VD acc{};
      for (int64_t i = 0; i < rows; ++i) {
        const T* row = t + i * ld + j0;
        VD x{};
        for (int l = 0; l < width; ++l) x[l] = static_cast<double>(row[l]);
        acc += x;
      }
      for (int l = 0; l < width; ++l) out[j0 + l] = static_cast<T>(acc[l]);
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
