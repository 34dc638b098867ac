// fastrnn: the checks of every op argument, in one place. The C++ ops own the
// error messages; the Python fake kernels (fastrnn/ops.py) only work out
// shapes. A check passed here is what every kernel may rely on.
#pragma once

#include "activation.h"
#include "layout.h"
#include "ops.h"
#include "tensor_util.h"

#include <string>
#include <vector>

namespace fastrnn {

// A whole stack's sizes and settings, read from checked arguments.
struct RnnConfig {
  int64_t layers = 0, directions = 0, hidden = 0, input_size = 0;
  bool has_biases = false;
  Activation act = Activation::Tanh;
  double dropout = 0;
  bool train = false;
  SequenceLayout layout;

  int64_t cells() const { return layers * directions; }
  int64_t per_cell() const { return has_biases ? 4 : 2; }
  int64_t layer_input_size(int64_t l) const { return l == 0 ? input_size : directions * hidden; }
  int64_t layer_width() const { return directions * hidden; }  // D*H
  bool dropout_applied() const { return train && dropout > 0 && layers > 1; }
  // Elements of the reserve tensor (ops.h).
  int64_t reserve_size() const {
    return (layers - 1) * layout.rows * layer_width() * (dropout_applied() ? 2 : 1);
  }
};

// torch.nn.RNN's parameter names, for messages: weight_ih_l0, bias_hh_l1_reverse, ...
inline std::string param_name(int64_t index, int64_t per_cell, int64_t directions) {
  static const char* kinds[] = {"weight_ih", "weight_hh", "bias_ih", "bias_hh"};
  const int64_t cell = index / per_cell;
  return std::string(kinds[index % per_cell]) + "_l" + std::to_string(cell / directions) +
         (cell % directions ? "_reverse" : "");
}

namespace detail {

inline void check_defined(const char* op, const std::string& name, const Tensor& t) {
  FASTRNN_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
}

inline void check_like_input(const char* op, const std::string& name, const Tensor& t,
                             const Tensor& input) {
  FASTRNN_CHECK(t.device() == input.device(), op, ": ", name,
                " must be on the same device as input");
  FASTRNN_CHECK(t.scalar_type() == input.scalar_type(), op, ": ", name,
                " must have the same dtype as input (",
                torch::headeronly::toString(input.scalar_type()), "), got ",
                torch::headeronly::toString(t.scalar_type()));
}

inline void check_shape(const char* op, const std::string& name, const Tensor& t,
                        std::vector<int64_t> expected) {
  bool ok = t.dim() == static_cast<int64_t>(expected.size());
  std::string want = "[";
  for (size_t d = 0; d < expected.size(); ++d) {
    ok = ok && t.size(d) == expected[d];
    want += (d ? ", " : "") + std::to_string(expected[d]);
  }
  FASTRNN_CHECK(ok, op, ": ", name, " must have shape ", want, "], got ", shape_str(t));
}

inline SequenceLayout check_layout(const char* op, const Tensor& input,
                                   const std::optional<Tensor>& batch_sizes, int64_t hx_batch) {
  if (!batch_sizes.has_value()) return SequenceLayout::padded(input.size(0), input.size(1));
  const Tensor& bs = *batch_sizes;
  check_defined(op, "batch_sizes", bs);
  FASTRNN_CHECK(bs.is_cpu() && bs.dim() == 1 && bs.scalar_type() == ScalarType::Long, op,
                ": batch_sizes must be a 1-D int64 CPU tensor");
  const Tensor sizes = as_contiguous(bs);
  const int64_t* p = sizes.const_data_ptr<int64_t>();
  const int64_t steps = bs.size(0);
  int64_t total = 0;
  for (int64_t t = 0; t < steps; ++t) {
    const int64_t b = p[t];
    FASTRNN_CHECK(b > 0, op, ": batch_sizes must be positive, got batch_sizes[", t, "] = ", b);
    FASTRNN_CHECK(t == 0 || b <= p[t - 1], op,
                  ": batch_sizes must be non-increasing, got batch_sizes[", t, "] = ", b,
                  " after ", p[t - 1]);
    // Checked before adding, so that absurd sizes cannot overflow the sum.
    FASTRNN_CHECK(b <= input.size(0) - total, op, ": input has ", input.size(0),
                  " rows but batch_sizes sums to more (", total, " + ", b, " by batch_sizes[", t,
                  "])");
    total += b;
  }
  FASTRNN_CHECK(input.size(0) == total, op, ": input has ", input.size(0),
                " rows but batch_sizes sums to ", total);
  return SequenceLayout::packed_from(p, steps, hx_batch);
}

}  // namespace detail

// Checks the arguments the forward and backward ops share and reads the
// stack's configuration from them. `supported(dtype)` is the backend's.
template <class Backend>
RnnConfig check_rnn_args(const char* op, const Tensor& input, const Tensor& hx,
                         const std::vector<Tensor>& weights, bool has_biases, int64_t num_layers,
                         double dropout, bool train, bool bidirectional,
                         const std::string& nonlinearity,
                         const std::optional<Tensor>& batch_sizes) {
  using namespace detail;
  RnnConfig c;
  const bool packed = batch_sizes.has_value();
  check_defined(op, "input", input);
  check_defined(op, "hx", hx);
  FASTRNN_CHECK(parse_activation(nonlinearity, c.act), op, ": unknown nonlinearity '",
                nonlinearity, "', expected 'tanh' or 'relu'");
  FASTRNN_CHECK(num_layers >= 1, op, ": num_layers must be at least 1, got ", num_layers);
  FASTRNN_CHECK(dropout >= 0 && dropout <= 1, op, ": dropout must be in [0, 1], got ", dropout);
  c.layers = num_layers;
  c.directions = bidirectional ? 2 : 1;
  c.has_biases = has_biases;
  c.dropout = dropout;
  c.train = train;
  const int64_t expected = c.cells() * c.per_cell();
  FASTRNN_CHECK(static_cast<int64_t>(weights.size()) == expected, op, ": expected ", expected,
                " weights (", c.layers, " layer(s) x ", c.directions, " direction(s) x ",
                c.per_cell(), has_biases ? ": weight_ih, weight_hh, bias_ih, bias_hh" : ": weight_ih, weight_hh",
                "), got ", weights.size());
  FASTRNN_CHECK(Backend::supports(input.scalar_type()), op, ": input dtype ",
                torch::headeronly::toString(input.scalar_type()), " is not supported on ",
                Backend::device_name);
  FASTRNN_CHECK(input.dim() == (packed ? 2 : 3), op, ": input must be ",
                packed ? "2-D [N, I] when batch_sizes is given" : "3-D [T, B, I] when batch_sizes is None",
                ", got ", input.dim(), "-D");
  FASTRNN_CHECK(hx.dim() == 3, op, ": hx must be 3-D [L*D, B, H], got ", hx.dim(), "-D");
  for (size_t i = 0; i < weights.size(); ++i) {
    check_defined(op, param_name(i, c.per_cell(), c.directions), weights[i]);
  }
  const Tensor& w_hh0 = weights[1];
  FASTRNN_CHECK(w_hh0.dim() == 2, op, ": weight_hh_l0 must be 2-D [H, H], got ", w_hh0.dim(), "-D");
  c.hidden = w_hh0.size(0);
  c.input_size = input.size(input.dim() - 1);
  for (int64_t cell = 0; cell < c.cells(); ++cell) {
    const int64_t l = cell / c.directions;
    const std::vector<int64_t> shapes[4] = {
        {c.hidden, c.layer_input_size(l)}, {c.hidden, c.hidden}, {c.hidden}, {c.hidden}};
    for (int64_t k = 0; k < c.per_cell(); ++k) {
      const int64_t i = cell * c.per_cell() + k;
      const std::string name = param_name(i, c.per_cell(), c.directions);
      check_shape(op, name, weights[i], shapes[k]);
      check_like_input(op, name, weights[i], input);
    }
  }
  check_like_input(op, "hx", hx, input);
  c.layout = check_layout(op, input, batch_sizes, hx.size(1));
  check_shape(op, "hx", hx, {c.cells(), c.layout.batch, c.hidden});
  return c;
}

// The backward op's own tensors: the forward's output and reserve, and the
// incoming gradients.
inline void check_backward_args(const char* op, const RnnConfig& c, const Tensor& input,
                                const Tensor& output, const Tensor& reserve,
                                const Tensor& grad_output, const Tensor& grad_h_n) {
  using namespace detail;
  std::vector<int64_t> out_shape;
  for (int64_t d = 0; d + 1 < input.dim(); ++d) out_shape.push_back(input.size(d));
  out_shape.push_back(c.layer_width());
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"output", &output},
                                {"grad_output", &grad_output}}) {
    check_defined(op, name, *t);
    check_shape(op, name, *t, out_shape);
    check_like_input(op, name, *t, input);
  }
  check_defined(op, "reserve", reserve);
  check_shape(op, "reserve", reserve, {c.reserve_size()});
  check_like_input(op, "reserve", reserve, input);
  check_defined(op, "grad_h_n", grad_h_n);
  check_shape(op, "grad_h_n", grad_h_n, {c.cells(), c.layout.batch, c.hidden});
  check_like_input(op, "grad_h_n", grad_h_n, input);
}

}  // namespace fastrnn
