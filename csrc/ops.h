// fastrnn: the contract of the RNN ops, shared by every backend.
//
// One call of fastrnn::rnn runs a whole torch.nn.RNN stack (every layer and
// direction, dropout between layers) over the whole sequence; one call of
// fastrnn::rnn_backward returns every gradient. Per layer l and direction d
// ("cell" c = l * D + d):
//
//   P        = X_l W_ih^T                                  one GEMM over all rows
//   h_t      = act(P_t + b_ih + b_hh + h_{t-1} W_hh^T)     act = tanh | relu (activation.h)
//   X_0      = input;  X_{l+1} = dropout([h^(l, d=0), h^(l, d=1)])  (features concatenated)
//
// backward, with dY reaching a layer's output and dh_n reaching its h_n:
//
//   dA_t     = (dY_t + dh_t) * act'(h_t)                   dh_t = dh_n on a sequence's last row
//   dh_{t-1} = dA_t W_hh
//   dW_hh = sum_t dA_t^T h_{t-1}   dW_ih = dA^T X_l   dX_l = sum_d dA W_ih   db = sum_rows dA
//
// Sizes: T steps, B batch (max batch for packed input), I input features,
// H hidden units, L layers, D directions (2 if bidirectional), N rows
// (T*B padded, sum(batch_sizes) packed).
//
// Layouts. Padded: input [T, B, I], output [T, B, D*H] (time major; the module
// transposes batch_first input). Packed (batch_sizes given): input [N, I] with
// step t's batch_sizes[t] rows at offset sum(batch_sizes[:t]), exactly as
// torch PackedSequence.data; output [N, D*H] alike. layout.h has the details.
//
// fastrnn::rnn(
//   input          [T, B, I] | [N, I]
//   hx             [L*D, B, H]
//   weights        L*D*(4 or 2) tensors, torch.nn.RNN's _flat_weights order:
//                  per cell weight_ih [H, I_l] (I_0 = I, I_l = D*H), weight_hh
//                  [H, H], then bias_ih [H], bias_hh [H] when has_biases
//   has_biases, num_layers
//   dropout        probability of zeroing a layer's output before the next
//                  layer reads it, in [0, 1]; applied only when train
//   train
//   bidirectional
//   nonlinearity   "tanh" | "relu"
//   batch_sizes    [T] int64 on the CPU, positive and non-increasing, or None (padded)
//   need_reserve   (default true) false: no backward will follow (inference),
//                  and the reserve comes back empty, [0]; the call then keeps
//                  what it needs of it in memory of its own, one layer's saved
//                  tensors at a time, and allocates nothing it does not return
// ) -> (output  [T, B, D*H] | [N, D*H],
//       h_n     [L*D, B, H],
//       reserve [R]: what backward reads besides the output: the outputs of
//               layers 0..L-2 ([N, D*H] each), then, when dropout is applied,
//               their dropout masks (0 or 1/(1-p), [N, D*H] each);
//               R = (L-1) * N * D*H * (2 if dropout is applied else 1); in
//               the input's dtype, but float32 for a bfloat16 or float16 call
//               on the CPU, whose kernels run in float32 (backward takes either))
//
// fastrnn::rnn_backward(
//   input, hx, weights, has_biases, num_layers, dropout, train, bidirectional,
//   nonlinearity, batch_sizes:  as in the forward call
//   output, reserve:            the forward's
//   grad_output    like output
//   grad_h_n       [L*D, B, H]
//   need_input_grad, need_weight_grad: gradients not needed are returned as
//                  empty [0] tensors and cost nothing
// ) -> (grad_input like input, grad_hx [L*D, B, H],
//       grad_weights: like weights (the gradients of bias_ih and bias_hh are equal))
//
// The masks are drawn from torch's default generator of the input's device
// (torch.manual_seed makes them repeatable).
//
// fastrnn::lstm and fastrnn::gru run torch.nn.LSTM and torch.nn.GRU stacks on
// the same engine; only the cell differs (gates in torch's order, G of them):
//
//   LSTM (G = 4, [i f g o]): A = X W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh
//        i, f, o = sigmoid(A_i, A_f, A_o); g = tanh(A_g)
//        c_t = f c_{t-1} + i g;  m_t = o tanh(c_t);  h_t = m_t (W_hr^T with proj_size)
//   GRU  (G = 3, [r z n]):  r, z = sigmoid((X W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)_{r,z})
//        n = tanh((X W_ih^T + b_ih)_n + r ((h_{t-1} W_hh^T)_n + b_hn))
//        h_t = (1 - z) n + z h_{t-1}
//
// fastrnn::lstm(input, hx [L*D, B, R], cx [L*D, B, H], weights, has_biases,
//               num_layers, dropout, train, bidirectional, batch_sizes, need_reserve)
//   weights per cell: weight_ih [4H, I_l], weight_hh [4H, R], (bias_ih [4H],
//   bias_hh [4H],) (weight_hr [R, H] with proj_size R < H); R = H without it;
//   I_l = D*R for l > 0
//   -> (output [T, B, D*R] | [N, D*R], h_n [L*D, B, R], c_n [L*D, B, H],
//       reserve [R_lstm]: the outputs of layers 0..L-2 and their dropout
//               masks as for rnn; then per layer the activated gates
//               [N, D*4H], c [N, D*H] and, with proj_size, m [N, D*H])
// fastrnn::gru(input, hx [L*D, B, H], weights, has_biases, num_layers, dropout,
//              train, bidirectional, batch_sizes, need_reserve)
//   weights per cell: weight_ih [3H, I_l], weight_hh [3H, H], (bias_ih [3H], bias_hh [3H])
//   -> (output, h_n, reserve [R_gru]: as for rnn, then per layer the
//       activated gates [N, D*3H] and (h_{t-1} W_hh^T)_n + b_hn [N, D*H])
// lstm_backward / gru_backward take the forward's arguments, output and
// reserve, the gradients of every output, and the need_* flags, and return
// (grad_input, grad_hx[, grad_cx], grad_weights) as rnn_backward does. No
// backward op writes to its arguments: a retained graph runs it again.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <sstream>
#include <stdexcept>
#include <tuple>
#include <vector>

namespace fastrnn {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// The op schemas, defined once (csrc/fastrnn.cpp) and implemented per device.
inline constexpr const char* kRnnSchema =
    "rnn(Tensor input, Tensor hx, Tensor[] weights, bool has_biases, int num_layers, "
    "float dropout, bool train, bool bidirectional, str nonlinearity, Tensor? batch_sizes, "
    "bool need_reserve=True) -> (Tensor output, Tensor h_n, Tensor reserve)";
inline constexpr const char* kRnnBackwardSchema =
    "rnn_backward(Tensor input, Tensor hx, Tensor[] weights, bool has_biases, int num_layers, "
    "float dropout, bool train, bool bidirectional, str nonlinearity, Tensor? batch_sizes, "
    "Tensor output, Tensor reserve, Tensor grad_output, Tensor grad_h_n, bool need_input_grad, "
    "bool need_weight_grad) -> (Tensor grad_input, Tensor grad_hx, Tensor[] grad_weights)";

inline constexpr const char* kLstmSchema =
    "lstm(Tensor input, Tensor hx, Tensor cx, Tensor[] weights, bool has_biases, int num_layers, "
    "float dropout, bool train, bool bidirectional, Tensor? batch_sizes, bool need_reserve=True) "
    "-> (Tensor output, Tensor h_n, Tensor c_n, Tensor reserve)";
inline constexpr const char* kLstmBackwardSchema =
    "lstm_backward(Tensor input, Tensor hx, Tensor cx, Tensor[] weights, bool has_biases, "
    "int num_layers, float dropout, bool train, bool bidirectional, Tensor? batch_sizes, "
    "Tensor output, Tensor reserve, Tensor grad_output, Tensor grad_h_n, "
    "Tensor grad_c_n, bool need_input_grad, bool need_weight_grad) "
    "-> (Tensor grad_input, Tensor grad_hx, Tensor grad_cx, Tensor[] grad_weights)";
inline constexpr const char* kGruSchema =
    "gru(Tensor input, Tensor hx, Tensor[] weights, bool has_biases, int num_layers, "
    "float dropout, bool train, bool bidirectional, Tensor? batch_sizes, bool need_reserve=True) "
    "-> (Tensor output, Tensor h_n, Tensor reserve)";
inline constexpr const char* kGruBackwardSchema =
    "gru_backward(Tensor input, Tensor hx, Tensor[] weights, bool has_biases, int num_layers, "
    "float dropout, bool train, bool bidirectional, Tensor? batch_sizes, Tensor output, "
    "Tensor reserve, Tensor grad_output, Tensor grad_h_n, bool need_input_grad, "
    "bool need_weight_grad) -> (Tensor grad_input, Tensor grad_hx, Tensor[] grad_weights)";

using RnnResult = std::tuple<Tensor, Tensor, Tensor>;
using LstmResult = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using LstmBackwardResult = std::tuple<Tensor, Tensor, Tensor, std::vector<Tensor>>;
using RnnBackwardResult = std::tuple<Tensor, Tensor, std::vector<Tensor>>;

// Argument errors reach Python as RuntimeError carrying exactly this message
// (STD_TORCH_CHECK would prefix the C++ function, file and line).
template <typename... Args>
[[noreturn]] void fail(const Args&... parts) {
  std::ostringstream msg;
  (msg << ... << parts);
  throw std::runtime_error(msg.str());
}
#define FASTRNN_CHECK(cond, ...)               \
  do {                                         \
    if (!(cond)) ::fastrnn::fail(__VA_ARGS__); \
  } while (0)

}  // namespace fastrnn
