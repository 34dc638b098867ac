// fastrnn CPU: a bfloat16 call's products on bfloat16 operands.
//
// A bfloat16 call runs the float32 kernels (in_float.h). Where the CPU has
// AVX512-BF16, its products multiply bfloat16 pairs into float32 sums
// (vdpbf16ps: two products per lane and instruction, twice the float32 FMA's
// rate per instruction), as torch.nn's bfloat16 modules do through oneDNN.
// Their operands:
//   - W (W_hh, and W_ih with the input projection inside): bfloat16 values
//     already, packed once per call as pairs of k (to_pairs);
//   - x_t: bfloat16 values already;
//   - h_{t-1} in the forward's steps and dA_t in the backward's
//     (dh_{t-1} = dA_t W_hh): rounded to bfloat16 (to nearest even) where the
//     product reads them, as torch.nn's bfloat16 modules hold them;
//   - in fastrnn's own products around the recurrence (linear.h, and the
//     small ones of backend.cpp: the input projection, dX = dA W_ih,
//     dW = dA^T X): both operands rounded. Where BLAS runs those (not AMD,
//     nor CPUs with AMX), they stay float32.
// On CPUs with AMX the pairs run on AMX tiles (amx_tiles.h).
// Everything else stays float32: the sums, the bias, the activations, the
// LSTM's c, what backward keeps, and h_t as the layer's output (rounded to
// bfloat16 only at the call's end).
//
// A pair is one 32-bit word: bfloat16(k even) in its low half, bfloat16(k + 1)
// in its high half (zero past the end of k). vdpbf16ps takes denormal
// operands and products as zero, whatever MXCSR says: values below 1e-38 fall
// out of a sum that float32 products would keep.
#pragma once

#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if FASTRNN_BF16_DISPATCH
#include <immintrin.h>
#endif

namespace fastrnn::cpu {

// Set while this thread runs a bfloat16 call (in_float.h).
inline thread_local bool bf16_call = false;

struct Bf16CallScope {
  bool saved;
  explicit Bf16CallScope(bool on) : saved(bf16_call) { bf16_call = on; }
  ~Bf16CallScope() { bf16_call = saved; }
  Bf16CallScope(const Bf16CallScope&) = delete;
  Bf16CallScope& operator=(const Bf16CallScope&) = delete;
};

// Whether the pairs are faster than float32 products on this CPU: on AMD's
// (Zen 4 and Zen 5: the same calls 1.19x-1.75x faster than with float32
// products), and where all but the shallowest products run on AMX tiles
// (amx_tiles.h; on a Xeon up to 2.6x, at hidden 512); not on Intel's without AMX, where
// vdpbf16ps multiplies no faster than the float32 FMAs and the rounding
// comes on top (0.69x-0.89x on that Xeon with AMX turned off). The shallower
// products there run on vdpbf16ps, so that all of a call's products take
// bfloat16 operands.
inline bool bf16_pairs_pay() {
  return simd::cpu_vendor() == simd::Vendor::Amd || simd::has_amx_bf16();
}

// Whether this thread's call runs its products on bfloat16 pairs: where the
// CPU has AVX512-BF16 and they pay (bf16_pairs_pay).
// FASTRNN_CPU_BF16_PRODUCTS=0|1 keeps them float32 / takes the pairs on any
// CPU with AVX512-BF16 (read per call: the tests and benchmarks compare the
// two in one process).
inline bool bf16_products() {
  if (!bf16_call || !simd::has_bf16_dot()) return false;
  const char* v = std::getenv("FASTRNN_CPU_BF16_PRODUCTS");
  if (v && (v[0] == '0' || v[0] == '1') && !v[1]) return v[0] == '1';
  return bf16_pairs_pay();
}

// The bfloat16 nearest to x, ties to even; a NaN stays a (quiet) NaN.
inline uint16_t to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u | 0x00400000u) >> 16);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// x rounded to bfloat16, as a float.
inline float round_to_bf16(float x) {
  const uint32_t u = uint32_t(to_bf16(x)) << 16;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

namespace pairs {

// Words that a row of n values takes as pairs, in whole blocks of 16 (what
// round_row writes).
inline int64_t words(int64_t n) { return (n + 31) / 32 * 16; }

// Words per row of a step's rows of A as pairs (x_t's K_x values, then
// h_{t-1}'s K), in whole cache lines.
inline int64_t row_words(int64_t K_x, int64_t K) { return (words(K_x) + words(K) + 15) / 16 * 16; }

using U16 = simd::Vec<uint32_t, 16>::type;
using F16 = simd::Vec<float, 16>::type;

#if FASTRNN_BF16_DISPATCH
// a[0, n) as (n + 1) / 2 pairs at out (a zero past n), words(n) words in all,
// rounded by vcvtne2ps2bf16 (as to_bf16, but for denormals, which it takes as
// zero as vdpbf16ps does). Only ever inlined into a FASTRNN_TARGET_AVX512_BF16
// function (asm for the reason dot's is).
FASTRNN_INLINE void round_row(const float* a, int64_t n, uint32_t* out) {
  for (int64_t j = 0; j < n; j += 32) {
    F16 lo = F16{}, hi = F16{};
    if (j + 32 <= n) {
      std::memcpy(&lo, a + j, sizeof(lo));
      std::memcpy(&hi, a + j + 16, sizeof(hi));
    } else {
      const int64_t m = n - j;
      std::memcpy(&lo, a + j, std::min<int64_t>(m, 16) * sizeof(float));
      if (m > 16) std::memcpy(&hi, a + j + 16, (m - 16) * sizeof(float));
    }
    U16 words;
    asm("vcvtne2ps2bf16 %2, %1, %0" : "=v"(words) : "v"(hi), "v"(lo));
    std::memcpy(out + j / 2, &words, sizeof(words));
  }
}

// Word c of a pair row is 16-bit lanes (c, 16 + c) of vcvtne2ps2bf16's
// result: this permutation puts them side by side (to_pairs, to_row_pairs).
alignas(64) inline constexpr uint16_t kInterleave[32] = {
    0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
    8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

// acc += the pairwise products of x's and b's bfloat16 pairs (vdpbf16ps).
// Only ever inlined into a FASTRNN_TARGET_AVX512_BF16 function.
// (The asm takes a copy: an accumulator array whose elements an asm names
// itself stays in memory.)
template <typename V>
FASTRNN_INLINE void dot(V& acc, const U16& x, const U16& b) {
  static_assert(sizeof(V) == 64);
  V a = acc;
  asm("vdpbf16ps %2, %1, %0" : "+v"(a) : "v"(x), "v"(b));
  acc = a;
}
#endif

}  // namespace pairs

// Rows [0, K) of a matrix (row k, columns [0, width), at src + k * ld_src)
// as [(K + 1) / 2][width] pairs at dst (row q at dst + q * ld_dst): word
// (q, c) holds rows 2q and 2q + 1 of column c. In place too (a packed panel:
// dst = src, ld_src = ld_dst = width): pair row q only overwrites columns it
// has read, or rows before row 2q. Only ever called where the kernels run on
// pairs, so compiled for their ISA (in baseline vectors it took a third of the
// kernel's time); rounded as pairs::round_row.
#if FASTRNN_BF16_DISPATCH
FASTRNN_TARGET_AVX512_BF16
#endif
inline void to_pairs(const float* src, int64_t ld_src, int64_t K, int64_t width, uint32_t* dst,
                     int64_t ld_dst) {
#if FASTRNN_BF16_DISPATCH
  const __m512i interleave = _mm512_load_si512(pairs::kInterleave);
#endif
  for (int64_t q = 0; 2 * q < K; ++q) {
    const float* lo = src + 2 * q * ld_src;
    const float* hi = 2 * q + 1 < K ? lo + ld_src : nullptr;
    uint32_t* out = dst + q * ld_dst;
    int64_t c = 0;
#if FASTRNN_BF16_DISPATCH
    for (; c + 16 <= width; c += 16) {
      const __m512 a = _mm512_loadu_ps(lo + c), b = hi ? _mm512_loadu_ps(hi + c) : _mm512_setzero_ps();
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(b, a);
      _mm512_storeu_si512(out + c, _mm512_permutexvar_epi16(interleave, both));
    }
#endif
    for (; c < width; ++c) {
      const uint32_t word = to_bf16(lo[c]) | (hi ? uint32_t(to_bf16(hi[c])) << 16 : 0u);
      std::memcpy(out + c, &word, 4);
    }
  }
}

// Rows [0, n) of A, where A(i, k) = a[k * lda + i] for k < K (A transposed,
// as a LinearAT product takes it), as rows of pairs (pairs::round_row's
// layout) at dst + i * ld_dst, words(K) words each: 16 rows and 32 k at a
// time, rounded as to_pairs rounds them and turned into rows in registers.
#if FASTRNN_BF16_DISPATCH
FASTRNN_TARGET_AVX512_BF16 inline void to_row_pairs(const float* a, int64_t lda, int64_t K,
                                                    int64_t n, uint32_t* dst, int64_t ld_dst) {
  const __m512i interleave = _mm512_load_si512(pairs::kInterleave);
  for (int64_t i0 = 0; i0 < n; i0 += 16) {
    const int64_t rows = std::min<int64_t>(16, n - i0);
    const __mmask16 mask = static_cast<__mmask16>((1u << rows) - 1);
    for (int64_t k0 = 0; k0 < K; k0 += 32) {
      // r[q]: pair q of the block's 16 rows side by side (word i: row i0 + i).
      __m512i r[16];
      for (int q = 0; q < 16; ++q) {
        const int64_t k = k0 + 2 * q;
        const __m512 lo = k < K ? _mm512_maskz_loadu_ps(mask, a + k * lda + i0) : _mm512_setzero_ps();
        const __m512 hi = k + 1 < K ? _mm512_maskz_loadu_ps(mask, a + (k + 1) * lda + i0) : _mm512_setzero_ps();
        r[q] = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
      // 16 x 16 words transposed: words, pairs of words, then 128-bit lanes.
      __m512i t[16], u[16];
      for (int j = 0; j < 8; ++j) {
        t[2 * j] = _mm512_unpacklo_epi32(r[2 * j], r[2 * j + 1]);
        t[2 * j + 1] = _mm512_unpackhi_epi32(r[2 * j], r[2 * j + 1]);
      }
      for (int j = 0; j < 4; ++j) {
        u[4 * j] = _mm512_unpacklo_epi64(t[4 * j], t[4 * j + 2]);
        u[4 * j + 1] = _mm512_unpackhi_epi64(t[4 * j], t[4 * j + 2]);
        u[4 * j + 2] = _mm512_unpacklo_epi64(t[4 * j + 1], t[4 * j + 3]);
        u[4 * j + 3] = _mm512_unpackhi_epi64(t[4 * j + 1], t[4 * j + 3]);
      }
      // u[4j + c], lane L: row i0 + 4L + c, pairs [4j, 4j + 4).
      for (int c = 0; c < 4; ++c) {
        const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44);
        const __m512i v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
        const __m512i v2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
        const __m512i v3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
        const __m512i out[4] = {_mm512_shuffle_i32x4(v0, v2, 0x88), _mm512_shuffle_i32x4(v0, v2, 0xDD),
                                _mm512_shuffle_i32x4(v1, v3, 0x88), _mm512_shuffle_i32x4(v1, v3, 0xDD)};
        for (int L = 0; L < 4; ++L) {
          if (4 * L + c < rows) _mm512_storeu_si512(dst + (i0 + 4 * L + c) * ld_dst + k0 / 2, out[L]);
        }
      }
    }
  }
}
#endif

}  // namespace fastrnn::cpu
