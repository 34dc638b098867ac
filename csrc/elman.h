// fastrnn: contracts of the Elman RNN ops, shared by every backend.
//
// One op call runs ONE layer in ONE direction over the whole sequence:
//
//   P        = X W_ih^T + (b_ih + b_hh)              one GEMM over all rows
//   h_t      = act(P_t + h_{t-1} W_hh^T)             act = tanh | relu
//
// backward, with dY reaching the output and dh_n reaching h_n:
//
//   dA_t     = (dY_t + dh_t) * act'(h_t)             tanh' = 1 - h^2, relu' = [h > 0]
//   dh_{t-1} = dA_t W_hh
//   dW_hh = sum_t dA_t^T h_{t-1}   dW_ih = dA^T X   dX = dA W_ih   db = sum_rows dA
//
// Sizes: T steps, B batch (max batch for packed input), I input features,
// H hidden units, N rows of X (T*B padded, sum(batch_sizes) packed).
//
// Layouts. Padded: input [T, B, I], output [T, B, H] (time major; the module
// transposes batch_first input). Packed (batch_sizes given): input [N, I] with
// the rows of step t at offset sum(batch_sizes[:t]), batch_sizes[t] of them,
// sequences sorted by decreasing length exactly as in torch PackedSequence;
// output [N, H] in the same layout.
//
// fastrnn::elman_forward(
//   input        [T, B, I] | [N, I]
//   hx           [B, H]      initial hidden state
//   weight_ih    [H, I]
//   weight_hh    [H, H]
//   bias_ih      [H] or None
//   bias_hh      [H] or None
//   batch_sizes  [T] int64 on the CPU, non-increasing, or None (padded)
//   relu         false: tanh, true: relu
//   reverse      run t = T-1 .. 0 (the backward direction of a bidirectional layer)
// ) -> (output [T, B, H] | [N, H], h_n [B, H])
//
// fastrnn::elman_backward(
//   grad_output  like output
//   grad_h_n     [B, H]
//   input, hx, weight_ih, weight_hh, batch_sizes, relu, reverse: as in forward
//   output       the forward's output (the activation derivative is read from it)
//   need_input_grad, need_weight_grad, need_bias_grad: outputs not needed are
//                returned as empty [0] tensors and cost nothing
// ) -> (grad_input like input, grad_hx [B, H], grad_weight_ih [H, I],
//       grad_weight_hh [H, H], grad_bias [H])   (grad_bias is the gradient of
//       bias_ih and of bias_hh alike)
#pragma once

#include "layout.h"

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <tuple>
#include <vector>

namespace fastrnn {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

// The op schemas, defined once (csrc/fastrnn.cpp) and implemented per device.
inline constexpr const char* kForwardSchema =
    "elman_forward(Tensor input, Tensor hx, Tensor weight_ih, Tensor weight_hh, "
    "Tensor? bias_ih, Tensor? bias_hh, Tensor? batch_sizes, bool relu, bool reverse) "
    "-> (Tensor output, Tensor h_n)";
inline constexpr const char* kBackwardSchema =
    "elman_backward(Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor hx, "
    "Tensor weight_ih, Tensor weight_hh, Tensor output, Tensor? batch_sizes, bool relu, "
    "bool reverse, bool need_input_grad, bool need_weight_grad, bool need_bias_grad) "
    "-> (Tensor grad_input, Tensor grad_hx, Tensor grad_weight_ih, Tensor grad_weight_hh, "
    "Tensor grad_bias)";

// Argument errors reach Python as RuntimeError carrying exactly this message
// (STD_TORCH_CHECK would prefix the C++ function, file and line).
template <typename... Args>
[[noreturn]] void fail(const Args&... parts) {
  std::ostringstream msg;
  (msg << ... << parts);
  throw std::runtime_error(msg.str());
}
#define FASTRNN_CHECK(cond, ...) \
  do {                           \
    if (!(cond)) ::fastrnn::fail(__VA_ARGS__); \
  } while (0)

using ForwardResult = std::tuple<Tensor, Tensor>;
using BackwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

}  // namespace fastrnn
