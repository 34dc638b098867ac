// fastrnn CPU: a bfloat16 call's recurrent products on bfloat16 operands.
//
// A bfloat16 call runs the float32 kernels (in_float.h). Where the CPU has
// AVX512-BF16, its forward's per-step products multiply bfloat16 pairs into
// float32 sums (vdpbf16ps: two products per lane and instruction, twice the
// float32 FMA's rate per instruction), as torch.nn's bfloat16 modules do
// through oneDNN. Their operands:
//   - W (W_hh, and W_ih with the input projection inside): bfloat16 values
//     already, packed once per call as pairs of k (to_pairs);
//   - x_t: bfloat16 values already;
//   - h_{t-1}: rounded to bfloat16 (to nearest even) where the product reads
//     it, as torch.nn's bfloat16 modules hold their state between steps.
// Everything else stays float32: the sums, the bias, the activations, the
// LSTM's c, and h_t as the layer's output (rounded to bfloat16 only at the
// call's end). The backward's dh_{t-1} = dA_t W_hh the same way, dA_t
// rounded where the product reads it. fastrnn's own products around the
// recurrence (linear.h, and the small ones of backend.cpp) round both of
// their operands: the input projection, dX = dA W_ih, dW = dA^T X.
//
// A pair is one 32-bit word: bfloat16(k even) in its low half, bfloat16(k + 1)
// in its high half (zero past the end of k). vdpbf16ps takes denormal
// operands and products as zero, whatever MXCSR says: values below 1e-38 fall
// out of a sum that float32 products would keep.
#pragma once

#include "simd.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>

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

// Whether this thread's call runs its forward products on bfloat16 pairs.
// FASTRNN_CPU_BF16_PRODUCTS=0 keeps them float32 (read per call: the tests
// and benchmarks compare the two in one process).
inline bool bf16_products() {
  if (!bf16_call || !simd::has_bf16_dot()) return false;
  const char* v = std::getenv("FASTRNN_CPU_BF16_PRODUCTS");
  return !(v && v[0] == '0' && v[1] == 0);
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

// Words that a row of n values takes as pairs, in whole blocks of 8.
inline int64_t words(int64_t n) { return (n + 15) / 16 * 8; }

// Words per row of a step's rows of A as pairs (x_t's K_x values, then
// h_{t-1}'s K), in whole cache lines.
inline int64_t row_words(int64_t K_x, int64_t K) { return (words(K_x) + words(K) + 15) / 16 * 16; }

using U16 = simd::Vec<uint32_t, 16>::type;
using Q8 = simd::Vec<uint64_t, 8>::type;
using U8 = simd::Vec<uint32_t, 8>::type;

// 16 floats (as bits) rounded as to_bf16: each lane's bfloat16 in its upper half.
FASTRNN_INLINE U16 rounded(const U16& x) {
  const U16 nan = (x & 0x7FFFFFFFu) > 0x7F800000u;
  const U16 r = x + 0x7FFFu + ((x >> 16) & 1u);
  return nan ? (x | 0x00400000u) : r;
}

// 16 floats (as bits) to 8 pairs at out.
FASTRNN_INLINE void round_16(const U16& x, uint32_t* out) {
  const Q8 q = (Q8)rounded(x);
  const Q8 w = ((q >> 16) & 0xFFFFu) | ((q >> 32) & 0xFFFF0000u);
  const U8 o = __builtin_convertvector(w, U8);
  std::memcpy(out, &o, sizeof(o));
}

// a[0, n) as (n + 1) / 2 pairs at out (a zero past n), in whole blocks of 8
// words: out has room for words(n).
FASTRNN_INLINE void round_row(const float* a, int64_t n, uint32_t* out) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    U16 x;
    std::memcpy(&x, a + j, sizeof(x));
    round_16(x, out + j / 2);
  }
  if (j < n) {
    U16 x = U16{};
    std::memcpy(&x, a + j, (n - j) * sizeof(float));
    round_16(x, out + j / 2);
  }
}

}  // namespace pairs

// Rows [0, K) of a matrix (row k, columns [0, width), at src + k * ld_src)
// as [(K + 1) / 2][width] pairs at dst (row q at dst + q * ld_dst): word
// (q, c) holds rows 2q and 2q + 1 of column c. In place too (a packed panel:
// ld_src = ld_dst = width), where dst is src or below it (rows of the same
// buffer: an earlier part's pairs end there): pair row q only overwrites
// columns it has read, or rows before row 2q. (Only ever called where the
// kernels run on pairs, so compiled for their ISA: in baseline vectors it
// took a third of the kernel's time.)
#if FASTRNN_BF16_DISPATCH
FASTRNN_TARGET_AVX512_BF16
#endif
inline void to_pairs(const float* src, int64_t ld_src, int64_t K, int64_t width, uint32_t* dst,
                     int64_t ld_dst) {
  using pairs::U16;
  for (int64_t q = 0; 2 * q < K; ++q) {
    const float* lo = src + 2 * q * ld_src;
    const float* hi = 2 * q + 1 < K ? lo + ld_src : nullptr;
    uint32_t* out = dst + q * ld_dst;
    int64_t c = 0;
    for (; c + 16 <= width; c += 16) {
      U16 a, b = U16{};
      std::memcpy(&a, lo + c, sizeof(a));
      if (hi) std::memcpy(&b, hi + c, sizeof(b));
      const U16 word = (pairs::rounded(a) >> 16) | (pairs::rounded(b) & 0xFFFF0000u);
      std::memcpy(out + c, &word, sizeof(word));
    }
    for (; c < width; ++c) {
      const uint32_t word = to_bf16(lo[c]) | (hi ? uint32_t(to_bf16(hi[c])) << 16 : 0u);
      std::memcpy(out + c, &word, 4);
    }
  }
}

namespace pairs {

#if FASTRNN_BF16_DISPATCH
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
}  // namespace fastrnn::cpu
