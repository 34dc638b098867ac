// fastrnn: the checks of every op argument, in one place. The C++ ops own the
// error messages; the Python fake kernels (fastrnn/ops.py) only work out
// shapes. A check passed here is what every kernel may rely on.
#pragma once

#include "activation.h"
#include "layout.h"
#include "ops.h"
#include "tensor_util.h"

#include <ostream>
#include <string>
#include <vector>

namespace fastrnn {

enum class CellKind { Elman, Lstm, Gru };

// A whole stack's sizes and settings, read from checked arguments.
struct RnnConfig {
  CellKind cell = CellKind::Elman;
  int64_t gates = 1;  // G: 1 Elman, 4 LSTM, 3 GRU
  int64_t layers = 0, directions = 0, hidden = 0, input_size = 0;
  int64_t proj = 0;   // LSTM's proj_size, 0 without a projection
  bool has_biases = false;
  Activation act = Activation::Tanh;
  double dropout = 0;
  bool train = false;
  SequenceLayout layout;

  int64_t cells() const { return layers * directions; }
  int64_t per_cell() const { return (has_biases ? 4 : 2) + (proj ? 1 : 0); }
  int64_t state_size() const { return proj ? proj : hidden; }  // R, the size of h
  int64_t layer_width() const { return directions * state_size(); }  // D*R
  int64_t layer_input_size(int64_t l) const { return l == 0 ? input_size : layer_width(); }
  bool dropout_applied() const { return train && dropout > 0 && layers > 1; }
  // What backward reads of one layer besides its output, per row and direction:
  // LSTM its gates, c (and m), GRU its gates and hn (ops.h).
  int64_t saved_per_row() const {
    switch (cell) {
      case CellKind::Lstm: return 4 * hidden + hidden + (proj ? hidden : 0);
      case CellKind::Gru: return 3 * hidden + hidden;
      default: return 0;
    }
  }
  // Elements of the reserve tensor (ops.h): the outputs of layers 0..L-2, their
  // dropout masks, then every layer's saved tensors (`saved_layers` of them: a
  // forward without a reserve keeps one layer's at a time).
  int64_t reserve_size(int64_t saved_layers = -1) const {
    if (saved_layers < 0) saved_layers = layers;
    return (layers - 1) * layout.rows * layer_width() * (dropout_applied() ? 2 : 1) +
           saved_layers * layout.rows * directions * saved_per_row();
  }
};

// torch's parameter names, for messages: weight_ih_l0, bias_hh_l1_reverse, ...
// Streamed (operator<<) only into a failing check's message, so that passing
// checks build no strings.
struct ParamName {
  const RnnConfig& c;
  int64_t index;
};
inline std::ostream& operator<<(std::ostream& os, const ParamName& p) {
  static const char* with_bias[] = {"weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr"};
  static const char* without[] = {"weight_ih", "weight_hh", "weight_hr"};
  const int64_t cell = p.index / p.c.per_cell(), k = p.index % p.c.per_cell();
  return os << (p.c.has_biases ? with_bias[k] : without[k]) << "_l" << cell / p.c.directions
            << (cell % p.c.directions ? "_reverse" : "");
}

namespace detail {

template <typename Name>
void check_defined(const char* op, const Name& name, const Tensor& t) {
  FASTRNN_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
}

template <typename Name>
void check_like_input(const char* op, const Name& name, const Tensor& t, const Tensor& input) {
  FASTRNN_CHECK(t.device() == input.device(), op, ": ", name,
                " must be on the same device as input");
  FASTRNN_CHECK(t.scalar_type() == input.scalar_type(), op, ": ", name,
                " must have the same dtype as input (",
                torch::headeronly::toString(input.scalar_type()), "), got ",
                torch::headeronly::toString(t.scalar_type()));
}

template <typename Name>
void check_shape(const char* op, const Name& name, const Tensor& t,
                 std::initializer_list<int64_t> expected) {
  bool ok = t.dim() == static_cast<int64_t>(expected.size());
  int64_t d = 0;
  for (int64_t e : expected) ok = ok && t.size(d++) == e;
  if (ok) return;
  std::string want = "[";
  d = 0;
  for (int64_t e : expected) want += (d++ ? ", " : "") + std::to_string(e);
  fail(op, ": ", name, " must have shape ", want, "], got ", shape_str(t));
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
// stack's configuration from them. `supports(dtype)` is the backend's. cx is
// LSTM's initial cell state (null for the other cells).
template <class Backend>
RnnConfig check_rnn_args(const char* op, CellKind cell, const Tensor& input, const Tensor& hx,
                         const Tensor* cx, const std::vector<Tensor>& weights, bool has_biases,
                         int64_t num_layers, double dropout, bool train, bool bidirectional,
                         const std::string& nonlinearity,
                         const std::optional<Tensor>& batch_sizes) {
  using namespace detail;
  RnnConfig c;
  c.cell = cell;
  c.gates = cell == CellKind::Lstm ? 4 : cell == CellKind::Gru ? 3 : 1;
  const bool packed = batch_sizes.has_value();
  check_defined(op, "input", input);
  check_defined(op, "hx", hx);
  if (cx) check_defined(op, "cx", *cx);
  if (cell == CellKind::Elman) {
    FASTRNN_CHECK(parse_activation(nonlinearity, c.act), op, ": unknown nonlinearity '",
                  nonlinearity, "', expected 'tanh' or 'relu'");
  }
  FASTRNN_CHECK(num_layers >= 1, op, ": num_layers must be at least 1, got ", num_layers);
  FASTRNN_CHECK(dropout >= 0 && dropout <= 1, op, ": dropout must be in [0, 1], got ", dropout);
  c.layers = num_layers;
  c.directions = bidirectional ? 2 : 1;
  c.has_biases = has_biases;
  c.dropout = dropout;
  c.train = train;
  const int64_t n = static_cast<int64_t>(weights.size()), base = has_biases ? 4 : 2;
  // Every layer has at least two weights, so a num_layers past n cannot match
  // (and c.cells() * ... below cannot overflow).
  const bool plausible = num_layers <= n;
  // LSTM's projection adds one weight per cell.
  const bool proj = plausible && cell == CellKind::Lstm && n == c.cells() * (base + 1);
  const int64_t per_cell = base + (proj ? 1 : 0);
  FASTRNN_CHECK(plausible && n == c.cells() * per_cell, op, ": expected ", c.layers,
                " layer(s) x ", c.directions, " direction(s) x ", per_cell, " weights (",
                has_biases ? "weight_ih, weight_hh, bias_ih, bias_hh" : "weight_ih, weight_hh",
                cell == CellKind::Lstm ? " and, with proj_size, weight_hr" : "", "), got ", n);
  FASTRNN_CHECK(Backend::supports(input.scalar_type()), op, ": input dtype ",
                torch::headeronly::toString(input.scalar_type()), " is not supported on ",
                Backend::device_name);
  FASTRNN_CHECK(input.dim() == (packed ? 2 : 3), op, ": input must be ",
                packed ? "2-D [N, I] when batch_sizes is given" : "3-D [T, B, I] when batch_sizes is None",
                ", got ", input.dim(), "-D");
  FASTRNN_CHECK(hx.dim() == 3, op, ": hx must be 3-D [L*D, B, H], got ", hx.dim(), "-D");
  c.proj = proj ? 1 : 0;  // for ParamName until the real size is read below
  for (int64_t i = 0; i < n; ++i) check_defined(op, ParamName{c, i}, weights[i]);
  const Tensor& w_hh0 = weights[1];
  FASTRNN_CHECK(w_hh0.dim() == 2 && w_hh0.size(0) % c.gates == 0, op, ": weight_hh_l0 must be 2-D [",
                c.gates > 1 ? std::to_string(c.gates) + "*H" : "H", ", ", proj ? "proj_size" : "H",
                "], got ", shape_str(w_hh0));
  c.hidden = w_hh0.size(0) / c.gates;
  c.proj = proj ? w_hh0.size(1) : 0;
  c.input_size = input.size(input.dim() - 1);
  const int64_t GH = c.gates * c.hidden, R = c.state_size();
  for (int64_t cell_i = 0; cell_i < c.cells(); ++cell_i) {
    const int64_t l = cell_i / c.directions;
    for (int64_t k = 0; k < c.per_cell(); ++k) {
      const int64_t i = cell_i * c.per_cell() + k;
      const ParamName name{c, i};
      // weight_ih [G*H, I_l], weight_hh [G*H, R], the biases [G*H], weight_hr [R, H]
      if (k == 0) {
        check_shape(op, name, weights[i], {GH, c.layer_input_size(l)});
      } else if (k == 1) {
        check_shape(op, name, weights[i], {GH, R});
      } else if (proj && k == c.per_cell() - 1) {
        check_shape(op, name, weights[i], {R, c.hidden});
      } else {
        check_shape(op, name, weights[i], {GH});
      }
      check_like_input(op, name, weights[i], input);
    }
  }
  check_like_input(op, "hx", hx, input);
  c.layout = check_layout(op, input, batch_sizes, hx.size(1));
  check_shape(op, "hx", hx, {c.cells(), c.layout.batch, R});
  if (cx) {
    check_like_input(op, "cx", *cx, input);
    check_shape(op, "cx", *cx, {c.cells(), c.layout.batch, c.hidden});
  }
  return c;
}

// The backward op's own tensors: the forward's output and reserve, and the
// incoming gradients (grad_c_n: LSTM's, null for the other cells).
inline void check_backward_args(const char* op, const RnnConfig& c, const Tensor& input,
                                const Tensor& output, const Tensor& reserve,
                                const Tensor& grad_output, const Tensor& grad_h_n,
                                const Tensor* grad_c_n = nullptr) {
  using namespace detail;
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"output", &output},
                                {"grad_output", &grad_output}}) {
    check_defined(op, name, *t);
    if (c.layout.packed) {
      check_shape(op, name, *t, {input.size(0), c.layer_width()});
    } else {
      check_shape(op, name, *t, {input.size(0), input.size(1), c.layer_width()});
    }
    check_like_input(op, name, *t, input);
  }
  check_defined(op, "reserve", reserve);
  FASTRNN_CHECK(reserve.dim() != 1 || reserve.size(0) > 0 || c.reserve_size() == 0, op,
                ": reserve is empty: its forward ran with need_reserve=False, which keeps none "
                "for a backward");
  check_shape(op, "reserve", reserve, {c.reserve_size()});
  check_like_input(op, "reserve", reserve, input);
  check_defined(op, "grad_h_n", grad_h_n);
  check_shape(op, "grad_h_n", grad_h_n, {c.cells(), c.layout.batch, c.state_size()});
  check_like_input(op, "grad_h_n", grad_h_n, input);
  if (grad_c_n) {
    check_defined(op, "grad_c_n", *grad_c_n);
    check_shape(op, "grad_c_n", *grad_c_n, {c.cells(), c.layout.batch, c.hidden});
    check_like_input(op, "grad_c_n", *grad_c_n, input);
  }
}

}  // namespace fastrnn
