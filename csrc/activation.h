// fastrnn: the Elman activations and their derivatives, defined once for the
// CPU loops and the CUDA kernels.
//
//   tanh:  y = tanh(v)            dv = dy * (1 - y^2)
//   relu:  y = v < 0 ? 0 : v      dv = y <= 0 ? 0 : dy      (as torch.relu /
//          threshold_backward: NaN propagates forward, and the derivative at 0 is 0)
//
// The derivative is computed from the saved output y, so backward needs no
// pre-activation values. acc_t is the accumulation type: float for float,
// half and bfloat16 storage, double for double.
#pragma once

#include "numeric.h"

#include <cmath>
#include <cstdint>
#include <string_view>
#include <type_traits>

namespace fastrnn {

enum class Activation : int32_t { Tanh = 0, Relu = 1 };

// The schema's `str nonlinearity`, as torch.nn.RNN spells it; false if unknown.
inline bool parse_activation(std::string_view name, Activation& out) {
  if (name == "tanh") return out = Activation::Tanh, true;
  if (name == "relu") return out = Activation::Relu, true;
  return false;
}

// tanh for float in [-9, 9] (beyond, tanh rounds to +-1) as a 13/6 rational
// function: within a few ulp of std::tanh, and plain arithmetic, so a loop of
// it vectorises (std::tanh / torch's tanh_ cost as much as a step's GEMM at
// hidden 128-256). NaN stays NaN: every comparison with it is false.
//
// Written once for a float and for a GCC/Clang vector of floats (the CPU
// recurrence kernel's epilogue, csrc/cpu/tile_kernels.h), in place: a vector
// wider than the caller's baseline ISA must not be passed by value (Clang
// rejects that ABI even for an inlined callee). `V{} + c` splats c.
template <typename V>
FASTRNN_HD void tanh_rational_inplace(V& v) {
  const V x = v < -9.f ? V{} - 9.f : (v > 9.f ? V{} + 9.f : v);
  const V x2 = x * x;
  V p = V{} + -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 - 8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  V q = V{} + 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  v = x * p / q;
}

FASTRNN_HD float tanh_rational(float v) {
  tanh_rational_inplace(v);
  return v;
}

FASTRNN_HD float tanh_acc(float v) {
#if defined(__CUDA_ARCH__)
  return tanhf(v);
#else
  return tanh_rational(v);
#endif
}
// expm1(y) for doubles |y| <= 708, in place: y = k ln2 + r with |r| <= ln2 / 2
// (ln2 in two parts, so r is exact), expm1(r) by its Taylor series to r^13
// (the rest is below 2^-56 of it), then 2^k (1 + expm1(r)) - 1. Plain
// arithmetic and bit moves, so that loops of it vectorise and it runs on
// vectors (std::tanh and std::exp are calls per element, slower than a step's
// GEMM in float64); for a double or a GCC vector of doubles, in place, as
// tanh_rational_inplace.
template <typename V>
FASTRNN_HOST_INLINE void expm1_inplace(V& y) {
  // The integer type as wide as V: what comparing two of them yields.
  using I = std::conditional_t<std::is_same_v<V, double>, int64_t, decltype(V{} < V{})>;
  const V shifter = V{} + 0x1.8p52;  // adding it rounds to an integer, kept in the low bits
  const V t = y * 0x1.71547652b82fep0 + shifter;
  const V k = t - shifter;
  const V r = (y - k * 0x1.62e42fefa3800p-1) - k * 0x1.ef35793c7673p-45;
  V p = V{} + 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r * r + r;
  const I ki = __builtin_bit_cast(I, t) - __builtin_bit_cast(I, shifter);
  const V scale = __builtin_bit_cast(V, (ki + 1023) << 52);  // 2^k
  y = scale * p + (scale - 1.0);
}

// tanh for doubles, within 3 ulp of std::tanh: -expm1(-2|v|) / (2 + expm1(-2|v|)),
// the sign put back (|v| capped at 20, where tanh rounds to 1; below 2^-27 tanh
// rounds to v itself, zeros' signs included; NaN stays NaN).
template <typename V>
FASTRNN_HOST_INLINE void tanh_exp_inplace(V& v) {
  const V a = v < 0.0 ? -v : v;
  V em = -2.0 * (a > 20.0 ? V{} + 20.0 : a);
  expm1_inplace(em);
  const V th = (V{} - em) / (2.0 + em);
  v = a < 0x1p-27 ? v : (v < 0.0 ? -th : th);
}

// 1 / (1 + exp(-v)) = 1 / (2 + expm1(-v)) for doubles (|v| capped at 708,
// where it is 1 or below 1e-307; NaN stays NaN).
template <typename V>
FASTRNN_HOST_INLINE void sigmoid_exp_inplace(V& v) {
  V em = -v;
  em = em > 708.0 ? V{} + 708.0 : (em < -708.0 ? V{} - 708.0 : em);
  expm1_inplace(em);
  v = 1.0 / (2.0 + em);
}

FASTRNN_HD double tanh_acc(double v) {
#if defined(__CUDA_ARCH__)
  return ::tanh(v);
#else
  tanh_exp_inplace(v);
  return v;
#endif
}

// 1 / (1 + exp(-v)) = tanh(v / 2) / 2 + 1 / 2, through tanh so that float loops
// vectorise like tanh's; for a float or a vector of floats, in place, as tanh_rational_inplace.
template <typename V>
FASTRNN_HD void sigmoid_rational_inplace(V& v) {
  v = 0.5f * v;
  tanh_rational_inplace(v);
  v = 0.5f * v + 0.5f;
}

FASTRNN_HD float sigmoid_acc(float v) {
#if defined(__CUDA_ARCH__)
  return 0.5f * tanhf(0.5f * v) + 0.5f;
#else
  sigmoid_rational_inplace(v);
  return v;
#endif
}
FASTRNN_HD double sigmoid_acc(double v) {
#if defined(__CUDA_ARCH__)
  return 1.0 / (1.0 + ::exp(-v));
#else
  sigmoid_exp_inplace(v);
  return v;
#endif
}

// y = act(v)
template <Activation A, typename acc_t>
FASTRNN_HD acc_t activate(acc_t v) {
  if constexpr (A == Activation::Relu) {
    return v < acc_t(0) ? acc_t(0) : v;
  } else {
    return tanh_acc(v);
  }
}

// dv = dy * act'(v), written in terms of y = act(v)
template <Activation A, typename acc_t>
FASTRNN_HD acc_t activation_grad(acc_t dy, acc_t y) {
  if constexpr (A == Activation::Relu) {
    return y <= acc_t(0) ? acc_t(0) : dy;
  } else {
    return dy * (acc_t(1) - y * y);
  }
}

// Calls f(std::integral_constant<Activation, A>{}) for the runtime value, so
// that kernels are compiled once per activation with it as a constant.
template <typename F>
inline decltype(auto) with_activation(Activation a, F&& f) {
  if (a == Activation::Relu) return f(std::integral_constant<Activation, Activation::Relu>{});
  return f(std::integral_constant<Activation, Activation::Tanh>{});
}

}  // namespace fastrnn
