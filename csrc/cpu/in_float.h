// fastrnn CPU: bfloat16 and float16 calls run the float32 kernels.
//
// InFloat<Op>::call widens every floating-point tensor of a call in one half
// type (bfloat16 or float16) to float32, which holds their values exactly,
// runs Op, and narrows each float32 result back to that type. The fused
// recurrences then take the call (they are float32 and float64 only), and
// the state and the sums stay in float32 from step to step where the
// per-step path in the half type rounded them at every step; what the call
// returns is in the half type, as torch.nn's modules' results are. A call
// whose floating-point tensors are not all of one half type goes to Op as it
// is, whose checks name what is wrong.
//
// Except the reserve (ops.h), which only the backward reads: it stays
// float32, as the kernels wrote it and will read it. Narrowing an LSTM's
// saved gates and cell states to the half type and widening them again took
// a tenth of a bfloat16 training step.
//
// On a CPU with AVX512-BF16 where they pay (AMD's, and those with AMX:
// bf16_pairs.h) a bfloat16 call's products run on bfloat16 operands instead,
// h_{t-1} and dA rounded where they read them, as torch.nn's bfloat16
// modules' do (Bf16CallScope tells them).
#pragma once

#include "../checks.h"
#include "../tensor_util.h"
#include "bf16_pairs.h"

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

namespace fastrnn::cpu {
namespace in_float {

inline bool is_half(ScalarType t) { return t == ScalarType::BFloat16 || t == ScalarType::Half; }

inline bool is_floating(ScalarType t) {
  return is_half(t) || t == ScalarType::Float || t == ScalarType::Double;
}

// The floating-point dtypes of a call's arguments: the one half type they
// all share, if they do.
struct Dtypes {
  std::optional<ScalarType> seen;
  bool one = true;

  // reserve: a backward's reserve argument, which may be float32 in a half-type call.
  void add(const Tensor& t, bool reserve = false) {
    if (!t.defined() || !is_floating(t.scalar_type())) return;
    if (reserve && t.scalar_type() == ScalarType::Float) return;
    if (seen && *seen != t.scalar_type()) one = false;
    seen = t.scalar_type();
  }
  void add(const std::optional<Tensor>& t, bool = false) {
    if (t) add(*t);
  }
  void add(const std::vector<Tensor>& ts, bool = false) {
    for (const Tensor& t : ts) add(t);
  }
  template <typename U>
  void add(const U&, bool = false) {}

  std::optional<ScalarType> half() const {
    return one && seen && is_half(*seen) ? seen : std::nullopt;
  }
};

inline Tensor cast(const Tensor& t, ScalarType from, ScalarType to) {
  if (!t.defined() || t.scalar_type() != from) return t;
  if (std::optional<Tensor> kept = to_kept(t, to)) return *std::move(kept);
  return torch::stable::to(t, to);
}

inline std::optional<Tensor> cast(const std::optional<Tensor>& t, ScalarType from, ScalarType to) {
  return t ? std::optional<Tensor>(cast(*t, from, to)) : std::nullopt;
}

inline std::vector<Tensor> cast(const std::vector<Tensor>& ts, ScalarType from, ScalarType to) {
  std::vector<Tensor> out;
  out.reserve(ts.size());
  for (const Tensor& t : ts) out.push_back(cast(t, from, to));
  return out;
}

template <typename U>
U cast(U u, ScalarType, ScalarType) {
  return u;
}

// Every result cast but the last one when keep_last (a forward's reserve).
template <typename... Ts, size_t... I>
std::tuple<Ts...> cast(const std::tuple<Ts...>& results, ScalarType from, ScalarType to,
                       bool keep_last, std::index_sequence<I...>) {
  return std::tuple<Ts...>(
      (keep_last && I + 1 == sizeof...(Ts) ? std::get<I>(results) : cast(std::get<I>(results), from, to))...);
}

}  // namespace in_float

// ReserveArg: the position of a backward op's reserve among its arguments;
// -1 for a forward op, whose last result is its reserve.
template <auto Op, int ReserveArg = -1>
struct InFloat;

template <typename R, typename... Args, R (*Op)(Args...), int ReserveArg>
struct InFloat<Op, ReserveArg> {
  static R call(Args... args) { return run(std::index_sequence_for<Args...>{}, std::move(args)...); }

 private:
  template <size_t... I>
  static R run(std::index_sequence<I...>, Args... args) {
    in_float::Dtypes dtypes;
    (dtypes.add(args, static_cast<int>(I) == ReserveArg), ...);
    const std::optional<ScalarType> half = dtypes.half();
    if (!half) return Op(std::move(args)...);
    const Bf16CallScope scope(*half == ScalarType::BFloat16);
    return in_float::cast(Op(in_float::cast(std::move(args), *half, ScalarType::Float)...),
                          ScalarType::Float, *half, ReserveArg < 0,
                          std::make_index_sequence<std::tuple_size_v<R>>{});
  }
};

}  // namespace fastrnn::cpu
