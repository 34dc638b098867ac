// fastrnn: the whole-stack driver of fastrnn::rnn and fastrnn::rnn_backward
// (contracts in ops.h), written once for every device. Per layer it runs one
// input-projection GEMM per direction straight into the layer's output
// columns, hands the directions' recurrences to the backend together (they
// are independent), and applies dropout between layers; backward walks the
// layers down with the weight gradients as single GEMMs.
//
// A Backend supplies:
//   static constexpr const char* device_name;
//   static bool supports(ScalarType dtype);
//   static void gemm(const Tensor& c, const Tensor& a, const Tensor& b, bool accumulate);
//   static void addmm(const Tensor& c, const Tensor& bias, const Tensor& a, const Tensor& b);
//       c = bias + a @ b, bias [cols] broadcast over the rows
//   static void forward_recurrences(const std::vector<ForwardJob>&, Activation);
//   static void backward_recurrences(const std::vector<BackwardJob>&, Activation);
//       independent recurrences (recurrence.h), e.g. both directions of a layer
#pragma once

#include "checks.h"
#include "recurrence.h"
#include "tensor_util.h"

#include <string>
#include <vector>

namespace fastrnn {
namespace detail {

// The tensors of one stack, as views into the op's arguments and outputs.
struct StackViews {
  const RnnConfig& c;
  const std::vector<Tensor>& weights;
  Tensor reserve;  // [R] (ops.h)

  int64_t N() const { return c.layout.rows; }
  const Tensor& w_ih(int64_t cell) const { return weights[cell * c.per_cell()]; }
  const Tensor& w_hh(int64_t cell) const { return weights[cell * c.per_cell() + 1]; }
  // Layer l's output [N, D*H], l < L-1.
  Tensor layer_output(int64_t l) const {
    return view2d(reserve, N(), c.layer_width(), c.layer_width(), l * N() * c.layer_width());
  }
  // The dropout mask applied to layer l's output, l < L-1.
  Tensor mask(int64_t l) const { return layer_output(c.layers - 1 + l); }
  // Direction d's columns of a layer's [N, D*H] tensor.
  Tensor columns(const Tensor& t, int64_t d) const {
    return view2d(t, N(), c.hidden, c.layer_width(), d * c.hidden);
  }
  // Cell `cell`'s [B, H] slice of a [L*D, B, H] state.
  Tensor state(const Tensor& t, int64_t cell) const {
    const int64_t B = c.layout.batch;
    return view2d(t, B, c.hidden, c.hidden, cell * B * c.hidden);
  }
};

// The input of layer l > 0: the previous layer's output, dropped out.
inline Tensor layer_input(const StackViews& s, int64_t l) {
  const Tensor prev = s.layer_output(l - 1);
  return s.c.dropout_applied() ? multiply(prev, s.mask(l - 1)) : prev;
}

}  // namespace detail

template <class Backend>
RnnResult rnn_forward(Tensor input, Tensor hx, std::vector<Tensor> weights, bool has_biases,
                      int64_t num_layers, double dropout, bool train, bool bidirectional,
                      std::string nonlinearity, std::optional<Tensor> batch_sizes) {
  const RnnConfig c =
      check_rnn_args<Backend>("fastrnn::rnn", input, hx, weights, has_biases, num_layers,
                              dropout, train, bidirectional, nonlinearity, batch_sizes);
  const SequenceLayout& L = c.layout;
  const int64_t N = L.rows, W = c.layer_width();
  const detail::StackViews s{c, weights, empty(input, {c.reserve_size()})};
  const Tensor h0 = as_contiguous(hx);
  Tensor h_n = empty(hx, {c.cells(), L.batch, c.hidden});
  Tensor output = empty(input, {N, W});
  if (L.steps == 0) torch::stable::copy_(h_n, h0);
  const std::vector<StepRows> order[2] = {steps_in_order(L, false), steps_in_order(L, true)};

  Tensor x = view2d(as_contiguous(input), N, c.input_size, c.input_size);
  for (int64_t l = 0; l < c.layers; ++l) {
    const Tensor out = l + 1 == c.layers ? output : s.layer_output(l);
    std::vector<ForwardJob> jobs;
    for (int64_t d = 0; d < c.directions; ++d) {
      const int64_t cell = l * c.directions + d;
      const Tensor out_d = s.columns(out, d);
      // P = X W_ih^T + (b_ih + b_hh), straight into this direction's columns.
      const Tensor w_ih_t = transposed(s.w_ih(cell));
      if (c.has_biases) {
        const int64_t b = cell * c.per_cell() + 2;
        Backend::addmm(out_d, torch::stable::subtract(weights[b], weights[b + 1], -1.0), x, w_ih_t);
      } else {
        Backend::gemm(out_d, x, w_ih_t, false);
      }
      jobs.push_back({&L, d == 1, &order[d], out_d, s.state(h0, cell), s.state(h_n, cell),
                      as_contiguous(s.w_hh(cell))});
    }
    if (L.steps > 0) Backend::forward_recurrences(jobs, c.act);
    if (l + 1 < c.layers) {
      if (c.dropout_applied()) {
        Tensor mask = s.mask(l);
        if (c.dropout < 1) {
          fill_dropout_mask(mask, 1 - c.dropout);
        } else {
          torch::stable::zero_(mask);  // as torch's dropout at p = 1 (no 0/0)
        }
      }
      x = detail::layer_input(s, l + 1);
    }
  }
  if (!L.packed) output = reinterpret(output, {L.steps, L.batch, W}, {L.batch * W, W, 1});
  return {output, h_n, s.reserve};
}

template <class Backend>
RnnBackwardResult rnn_backward(Tensor input, Tensor hx, std::vector<Tensor> weights,
                               bool has_biases, int64_t num_layers, double dropout, bool train,
                               bool bidirectional, std::string nonlinearity,
                               std::optional<Tensor> batch_sizes, Tensor output, Tensor reserve,
                               Tensor grad_output, Tensor grad_h_n, bool need_input_grad,
                               bool need_weight_grad) {
  const char* op = "fastrnn::rnn_backward";
  const RnnConfig c = check_rnn_args<Backend>(op, input, hx, weights, has_biases, num_layers,
                                              dropout, train, bidirectional, nonlinearity,
                                              batch_sizes);
  check_backward_args(op, c, input, output, reserve, grad_output, grad_h_n);
  const SequenceLayout& L = c.layout;
  const int64_t N = L.rows, W = c.layer_width(), H = c.hidden;
  const detail::StackViews s{c, weights, as_contiguous(reserve)};
  const Tensor h0 = as_contiguous(hx);
  const Tensor dh_n = as_contiguous(grad_h_n);
  Tensor grad_hx = empty(hx, {c.cells(), L.batch, H});
  if (L.steps == 0) torch::stable::copy_(grad_hx, dh_n);
  const std::vector<StepRows> order[2] = {steps_in_order(L, false), steps_in_order(L, true)};

  // Outputs that are not needed are distinct empty tensors (outputs of an op
  // must not alias each other).
  auto nothing = [&] { return empty(input, {0}); };
  Tensor grad_input = nothing();
  std::vector<Tensor> grad_weights;
  for (size_t i = 0; i < weights.size(); ++i) grad_weights.push_back(nothing());

  // dY of the top layer: a copy of grad_output, which becomes dA in place.
  Tensor dY = as_contiguous(grad_output);
  if (dY.data_ptr() == grad_output.data_ptr()) dY = torch::stable::clone(dY);
  dY = view2d(dY, N, W, W);
  const Tensor top_output = view2d(as_contiguous(output), N, W, W);

  for (int64_t l = c.layers - 1; l >= 0; --l) {
    const Tensor out = l + 1 == c.layers ? top_output : s.layer_output(l);
    std::vector<BackwardJob> jobs;
    for (int64_t d = 0; d < c.directions; ++d) {
      const int64_t cell = l * c.directions + d;
      jobs.push_back({&L, d == 1, &order[d], s.columns(dY, d), s.columns(out, d), s.state(dh_n, cell),
                      s.state(grad_hx, cell), as_contiguous(s.w_hh(cell))});
    }
    if (L.steps > 0) Backend::backward_recurrences(jobs, c.act);
    const int64_t I = c.layer_input_size(l);
    const Tensor x = l == 0 ? view2d(as_contiguous(input), N, I, I) : detail::layer_input(s, l);

    for (int64_t d = 0; need_weight_grad && d < c.directions; ++d) {
      const int64_t cell = l * c.directions + d, first = cell * c.per_cell();
      const Tensor dA = jobs[d].dA, dA_t = transposed(dA);
      grad_weights[first] = empty(input, {H, I});
      Backend::gemm(grad_weights[first], dA_t, x, false);

      // dW_hh = dA^T Hprev, Hprev being each row's h_{t-1}: one GEMM per
      // contiguous block, or one GEMM over a gathered Hprev when there are many.
      Tensor& grad_w_hh = grad_weights[first + 1];
      grad_w_hh = empty(input, {H, H});
      std::vector<PrevRows> blocks = prev_row_blocks(L, d == 1);
      const Tensor h0_d = s.state(h0, cell), out_d = s.columns(out, d);
      auto source = [&](const PrevRows& b) {
        const Tensor& from = b.from_hx ? h0_d : out_d;
        return view2d(from, b.count, H, from.stride(0), b.src * from.stride(0));
      };
      auto dA_rows = [&](int64_t begin, int64_t count) {
        return transposed(view2d(dA, count, H, dA.stride(0), begin * dA.stride(0)));
      };
      if (blocks.empty()) {
        torch::stable::zero_(grad_w_hh);
      } else if (blocks.size() > 2) {
        Tensor hprev = empty(input, {N, H});
        for (const PrevRows& b : blocks) {
          Tensor dst = view2d(hprev, b.count, H, H, b.dst * H);
          torch::stable::copy_(dst, source(b));
        }
        Backend::gemm(grad_w_hh, dA_t, hprev, false);
      } else {
        for (size_t i = 0; i < blocks.size(); ++i) {
          Backend::gemm(grad_w_hh, dA_rows(blocks[i].dst, blocks[i].count), source(blocks[i]),
                        i > 0);
        }
      }
      if (c.has_biases) {
        grad_weights[first + 2] = column_sum(dA);
        grad_weights[first + 3] = torch::stable::clone(grad_weights[first + 2]);
      }
    }

    if (l > 0 || need_input_grad) {
      // dX = sum_d dA_d W_ih_d: the gradient of this layer's input.
      Tensor dX = empty(input, {N, I});
      for (int64_t d = 0; d < c.directions; ++d) {
        Backend::gemm(dX, jobs[d].dA, s.w_ih(l * c.directions + d), d > 0);
      }
      if (l > 0) {
        if (c.dropout_applied()) inplace_binary("aten::mul_", dX, s.mask(l - 1));
        dY = dX;
      } else {
        grad_input = L.packed ? dX : reinterpret(dX, {L.steps, L.batch, I}, {L.batch * I, I, 1});
      }
    }
  }
  return {grad_input, grad_hx, grad_weights};
}

}  // namespace fastrnn
