// fastrnn CPU: a bfloat16 call's products on AMX tiles (AMX-BF16): the step
// kernels' (tile_kernels.h) and those around the recurrence (linear.h).
//
// Where the CPU has AMX (Intel's Xeons from Sapphire Rapids on), one
// tdpbf16ps multiplies a 16 x 32 block of bfloat16 A by a 32 x 16 block of
// bfloat16 B into 16 x 16 float32 sums: 16 times the products of one
// vdpbf16ps. The operands are the pair kernels' (bf16_pairs.h) as they lie:
//   A   rows of x_t and h_{t-1} (or dA_t) as pairs, pairs::row_words(K_x, K)
//       words a row (StepTask::a_pairs): a 16-row tile of 16 words per row is
//       16 rows by 32 values of k;
//   B   a panel of pair rows, W vectors of 16 words each (its 16 columns' two
//       values of k): 16 pair rows of one vector are a tile as AMX reads B.
// The kernels that run on tiles pack their panels with each part of k (x_t's
// K_x values, then A's K) padded with zeros to whole tiles, pairs::words(K_x)
// and pairs::words(K) pair rows (layout_fits, a_offset), as a_pairs' rows are;
// and each slot's room for a_pairs holds whole tiles of rows (kRows), so a
// tile past the slot's last row reads its own room (what it sums is dropped).
//
// An element's sum runs over k in the same blocks of 32 whichever tile and
// thread computes it, so results are the same bits for any thread count and
// split, as the pair kernels'. They are not always the pair kernels' bits:
// of a pair of k, tdpbf16ps adds the even k's product to the sum first,
// vdpbf16ps the odd k's (as Intel's manual says, and the tests check). Both
// take denormal operands as zero.
//
// The tile registers: C(r, v) = tmm(2r + v) for two row tiles r and two
// column tiles v, A(r) = tmm(4 + r), B(v) = tmm(6 + v), all 16 rows by 64
// bytes. Each step configures them (ldtilecfg) and releases them (tilerelease)
// around its products: the thread may run oneDNN's AMX kernels in between.
// Linux only: a process must ask the kernel for the tile state first.
#pragma once

#include "bf16_pairs.h"
#include "simd.h"

#include <cstdint>
#include <cstdlib>

namespace fastrnn::cpu::amx {

// Rows and 32-bit columns of every tile.
constexpr int64_t kRows = 16;
constexpr int64_t kWords = 16;

// Whether a bfloat16 call's products that run on pairs run on tiles: where
// the CPU has them. FASTRNN_CPU_AMX=0 keeps them on vdpbf16ps (read per call:
// the tests and benchmarks compare the two in one process).
inline bool tiles() {
  if (!simd::has_amx_bf16()) return false;
  const char* v = std::getenv("FASTRNN_CPU_AMX");
  return !(v && v[0] == '0' && !v[1]);
}

// Whether a product over K_x values of x_t and K of A can take the tile
// layout: its two parts padded to whole tiles of k must fit the K_x + K pair
// rows a panel has room for (pairs take half the float panel's): from
// K_x + K = 64 on, and from K = 16 without x_t.
inline bool layout_fits(int64_t K_x, int64_t K) {
  return pairs::words(K_x) + pairs::words(K) <= K_x + K;
}

// Where the packers put A's rows of k (W_hh's, below W_ih's K_x) in the tile
// layout: at pair row pairs::words(K_x), as a_pairs' rows hold them.
inline int64_t a_offset(int64_t K_x) { return 2 * pairs::words(K_x); }

#if FASTRNN_AMX_DISPATCH
struct alignas(64) Config {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline const Config& config() {
  static const Config cfg = [] {
    Config c;
    for (int i = 0; i < 8; ++i) {
      c.colsb[i] = kWords * 4;
      c.rows[i] = kRows;
    }
    return c;
  }();
  return cfg;
}

FASTRNN_INLINE void configure() { asm volatile("ldtilecfg %0" ::"m"(config())); }
FASTRNN_INLINE void release() { asm volatile("tilerelease" ::: "memory"); }

template <int Tile>
FASTRNN_INLINE void zero() {
  asm volatile("tilezero %%tmm%c0" ::"i"(Tile));
}
// 16 rows of 64 bytes from p, `stride` bytes apart.
template <int Tile>
FASTRNN_INLINE void load(const void* p, int64_t stride) {
  asm volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(p), "r"(stride), "i"(Tile) : "memory");
}
template <int Tile>
FASTRNN_INLINE void store(void* p, int64_t stride) {
  asm volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(p), "r"(stride), "i"(Tile) : "memory");
}
// C += A B (tdpbf16ps).
template <int C, int A, int B>
FASTRNN_INLINE void dot() {
  asm volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(C), "i"(A), "i"(B));
}

// One part of a product: rows of A as pairs from a (lda words a row), pair
// rows of B from b (ldb words a row, the block's first column), q < Q pair
// rows (a whole number of tiles).
struct Part {
  const uint32_t* a = nullptr;
  const uint32_t* b = nullptr;
  int64_t Q = 0;
};

// sums[r * 16 + i][v * 16 + j] = the sums of R row tiles by V column tiles
// over parts (R, V in {1, 2}), ldc floats a row.
template <int R, int V>
FASTRNN_INLINE void product(const Part (&parts)[2], int64_t lda, int64_t ldb, float* sums,
                            int64_t ldc) {
  zero<0>();
  if constexpr (V > 1) zero<1>();
  if constexpr (R > 1) zero<2>();
  if constexpr (R > 1 && V > 1) zero<3>();
  for (const Part& part : parts) {
    for (int64_t q = 0; q < part.Q; q += kWords) {
      load<4>(part.a + q, lda * 4);
      load<6>(part.b + q * ldb, ldb * 4);
      dot<0, 4, 6>();
      if constexpr (V > 1) {
        load<7>(part.b + q * ldb + kWords, ldb * 4);
        dot<1, 4, 7>();
      }
      if constexpr (R > 1) {
        load<5>(part.a + kRows * lda + q, lda * 4);
        dot<2, 5, 6>();
        if constexpr (V > 1) dot<3, 5, 7>();
      }
    }
  }
  store<0>(sums, ldc * 4);
  if constexpr (V > 1) store<1>(sums + kWords, ldc * 4);
  if constexpr (R > 1) store<2>(sums + kRows * ldc, ldc * 4);
  if constexpr (R > 1 && V > 1) store<3>(sums + kRows * ldc + kWords, ldc * 4);
}
#endif

}  // namespace fastrnn::cpu::amx
