// fastrnn: the step-by-step Elman driver, written once for every device.
//
// The driver owns the algorithm of elman.h (argument checks, one GEMM for the
// input projection, the sequential recurrence writing straight into the
// preallocated output, the dh recurrence, the weight-gradient GEMMs). A
// Backend supplies the few device-specific pieces:
//
//   static void addmm(Tensor& out, const Tensor& self, const Tensor& a, const Tensor& b);
//       out = self + a @ b  (out may alias self)
//   static void mm(Tensor& out, const Tensor& a, const Tensor& b);       out = a @ b
//   static void activation(Tensor& h, bool relu);   h = act(h) in place, h contiguous
//   static void activation_backward(Tensor& grad, const Tensor& out, bool relu);
//       grad *= act'(out), both contiguous with the same shape
//   static bool supports(ScalarType dtype);
//   static constexpr const char* device_name;
//   static bool fused_forward(const SequenceLayout&, bool reverse, bool relu,
//                             Tensor& out, const Tensor& hx, const Tensor& w_hh);
//       the whole recurrence in one kernel (out holds P on entry, h on exit),
//       or false where the backend has none for these sizes: the driver then
//       steps with one GEMM per step
//   static bool fused_backward(const SequenceLayout&, bool reverse, bool relu,
//                              Tensor& dA, const Tensor& out, Tensor& grad_hx,
//                              const Tensor& w_hh);
//       likewise for the dh recurrence (dA holds dY + dh_n on entry, dA on
//       exit; grad_hx gets the rows that began at hx)
//
// Everything else goes through torch's dispatcher, so results match torch's
// own kernels (tanh_, relu_, sum) bit for bit where the order of operations
// matches.
#pragma once

#include "elman.h"

#include <torch/csrc/stable/c/shim.h>
#include <torch/headeronly/version.h>

#include <algorithm>
#include <array>
#include <string>

namespace fastrnn {
namespace detail {

inline void call_inplace(const char* op, const Tensor& t) {
  std::array<StableIValue, 1> stack{torch::stable::detail::from(t)};
  TORCH_ERROR_CODE_CHECK(
      torch_call_dispatcher(op, "", stack.data(), TORCH_ABI_VERSION));
  // The op returns a new handle to `t`; take ownership so that it is freed.
  (void)torch::stable::detail::to<Tensor>(stack[0]);
}

// Rows [start, start + count) of a 2-D tensor: a view, no copy.
inline Tensor rows(const Tensor& t, int64_t start, int64_t count) {
  Tensor view = t;
  return torch::stable::narrow(view, 0, start, count);
}

inline Tensor transposed(const Tensor& t) {
  return torch::stable::transpose(t, 0, 1);
}

inline bool same_device(const Tensor& a, const Tensor& b) {
  return a.device() == b.device();
}

inline std::string shape_str(const Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) {
    s += (d ? ", " : "") + std::to_string(t.size(d));
  }
  return s + "]";
}

template <class Backend>
void check_same(const char* op, const char* name, const Tensor& t,
                const Tensor& input) {
  FASTRNN_CHECK(same_device(t, input), op, ": ", name,
                  " must be on the same device as input");
  FASTRNN_CHECK(t.scalar_type() == input.scalar_type(), op, ": ", name,
                  " must have the same dtype as input (",
                  torch::headeronly::toString(input.scalar_type()), "), got ",
                  torch::headeronly::toString(t.scalar_type()));
}

inline void check_shape(const char* op, const char* name, const Tensor& t,
                        std::initializer_list<int64_t> expected) {
  bool ok = t.dim() == static_cast<int64_t>(expected.size());
  int64_t d = 0;
  std::string want = "[";
  for (int64_t e : expected) {
    if (ok && t.size(d) != e) ok = false;
    want += (d ? ", " : "") + std::to_string(e);
    ++d;
  }
  want += "]";
  FASTRNN_CHECK(ok, op, ": ", name, " must have shape ", want, ", got ",
                  shape_str(t));
}

// A None passed for a Tensor argument arrives as an undefined tensor, which
// must not reach any other tensor call.
inline void check_defined(const char* op, const char* name, const Tensor& t) {
  FASTRNN_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
}

// Validates every argument shared by forward and backward and works out where
// each step's rows live.
template <class Backend>
SequenceLayout check_and_layout(const char* op, const Tensor& input,
                                const Tensor& hx, const Tensor& weight_ih,
                                const Tensor& weight_hh,
                                const std::optional<Tensor>& batch_sizes) {
  const bool packed = batch_sizes.has_value();
  check_defined(op, "input", input);
  check_defined(op, "hx", hx);
  check_defined(op, "weight_ih", weight_ih);
  check_defined(op, "weight_hh", weight_hh);
  if (packed) check_defined(op, "batch_sizes", *batch_sizes);
  FASTRNN_CHECK(Backend::supports(input.scalar_type()), op,
                  ": input dtype ",
                  torch::headeronly::toString(input.scalar_type()),
                  " is not supported on ", Backend::device_name);
  FASTRNN_CHECK(input.dim() == (packed ? 2 : 3), op, ": input must be ",
                  packed ? "2-D [N, I] when batch_sizes is given"
                         : "3-D [T, B, I] when batch_sizes is None",
                  ", got ", input.dim(), "-D");
  FASTRNN_CHECK(hx.dim() == 2, op, ": hx must be 2-D [B, H], got ",
                  hx.dim(), "-D");
  FASTRNN_CHECK(weight_hh.dim() == 2, op,
                  ": weight_hh must be 2-D [H, H], got ", weight_hh.dim(),
                  "-D");
  const int64_t H = weight_hh.size(0);
  const int64_t I = input.size(input.dim() - 1);
  check_shape(op, "weight_hh", weight_hh, {H, H});
  check_shape(op, "weight_ih", weight_ih, {H, I});
  check_same<Backend>(op, "hx", hx, input);
  check_same<Backend>(op, "weight_ih", weight_ih, input);
  check_same<Backend>(op, "weight_hh", weight_hh, input);

  SequenceLayout L;
  L.packed = packed;
  if (!packed) {
    L.steps = input.size(0);
    L.batch = input.size(1);
    L.rows = L.steps * L.batch;
    L.batch_sizes.assign(L.steps, L.batch);
  } else {
    const Tensor& bs = *batch_sizes;
    FASTRNN_CHECK(bs.is_cpu() && bs.dim() == 1 &&
                        bs.scalar_type() == ScalarType::Long,
                    op, ": batch_sizes must be a 1-D int64 CPU tensor");
    Tensor bsc = torch::stable::contiguous(bs);
    const int64_t* p = static_cast<const int64_t*>(bsc.data_ptr());
    L.steps = bs.size(0);
    L.batch_sizes.assign(p, p + L.steps);
    L.batch = L.steps ? L.batch_sizes[0] : hx.size(0);
    int64_t total = 0;
    for (int64_t t = 0; t < L.steps; ++t) {
      const int64_t b = L.batch_sizes[t];
      FASTRNN_CHECK(b > 0, op, ": batch_sizes must be positive, got batch_sizes[", t,
                    "] = ", b);
      FASTRNN_CHECK(t == 0 || b <= L.batch_sizes[t - 1], op,
                    ": batch_sizes must be non-increasing, got batch_sizes[",
                    t, "] = ", b, " after ", L.batch_sizes[t - 1]);
      // Checked before adding, so that absurd sizes cannot overflow the sum
      // (wrapping around to input's row count).
      FASTRNN_CHECK(b <= input.size(0) - total, op, ": input has ", input.size(0),
                    " rows but batch_sizes sums to more (", total, " + ", b,
                    " by batch_sizes[", t, "])");
      total += b;
    }
    L.rows = total;
    FASTRNN_CHECK(input.size(0) == total, op, ": input has ", input.size(0),
                    " rows but batch_sizes sums to ", total);
  }
  L.offsets.resize(L.steps);
  for (int64_t t = 0, off = 0; t < L.steps; ++t) {
    L.offsets[t] = off;
    off += L.batch_sizes[t];
  }
  check_shape(op, "hx", hx, {L.batch, H});
  return L;
}

// Views of one step into a sequence tensor [N, H] (the output in forward,
// dA in backward) and a state tensor [B, H] (hx in forward, grad_hx in
// backward). Made before the time loop, so that the loop only runs kernels.
struct StepViews {
  Tensor all, carried, prev_carried, fresh, state_fresh;
};

inline StepViews step_views(const StepRows& s, const Tensor& seq, const Tensor& state) {
  const int64_t fresh = s.count - s.carried;
  Tensor all = rows(seq, s.begin, s.count);
  return {all,
          s.carried ? (fresh ? rows(seq, s.begin, s.carried) : all) : Tensor(),
          s.carried ? rows(seq, s.prev_begin, s.carried) : Tensor(),
          fresh ? rows(seq, s.begin + s.carried, fresh) : Tensor(),
          fresh ? rows(state, s.carried, fresh) : Tensor()};
}

inline Tensor empty_rows(const Tensor& like, int64_t rows, int64_t cols) {
  return torch::stable::new_empty(like, {rows, cols});
}

}  // namespace detail

template <class Backend>
ForwardResult elman_forward(Tensor input, Tensor hx, Tensor weight_ih,
                            Tensor weight_hh, std::optional<Tensor> bias_ih,
                            std::optional<Tensor> bias_hh,
                            std::optional<Tensor> batch_sizes, bool relu,
                            bool reverse) {
  using namespace detail;
  const char* op = "fastrnn::elman_forward";
  const SequenceLayout L = check_and_layout<Backend>(op, input, hx, weight_ih,
                                                     weight_hh, batch_sizes);
  const int64_t H = weight_hh.size(0);
  const int64_t I = weight_ih.size(1);
  for (const auto* b : {&bias_ih, &bias_hh}) {
    if (b->has_value()) {
      const char* name = b == &bias_ih ? "bias_ih" : "bias_hh";
      check_defined(op, name, **b);
      check_shape(op, name, **b, {H});
      check_same<Backend>(op, name, **b, input);
    }
  }

  const Tensor x = torch::stable::view(torch::stable::contiguous(input), {L.rows, I});
  const Tensor h0 = torch::stable::contiguous(hx);
  const Tensor w_hh_t = transposed(torch::stable::contiguous(weight_hh));
  Tensor out = empty_rows(input, L.rows, H);

  // P = X W_ih^T + (b_ih + b_hh), straight into the output buffer.
  std::optional<Tensor> bias;
  if (bias_ih.has_value() && bias_hh.has_value()) {
    bias = torch::stable::subtract(*bias_ih, *bias_hh, -1.0);  // b_ih + b_hh
  } else if (bias_ih.has_value() || bias_hh.has_value()) {
    bias = bias_ih.has_value() ? *bias_ih : *bias_hh;
  }
  if (bias.has_value()) {
    Backend::addmm(out, *bias, x, transposed(weight_ih));
  } else {
    Backend::mm(out, x, transposed(weight_ih));
  }

  if (!Backend::fused_forward(L, reverse, relu, out, h0, torch::stable::contiguous(weight_hh))) {
    std::vector<StepViews> steps;
    for (const StepRows& st : steps_in_order(L, reverse)) steps.push_back(step_views(st, out, h0));
    for (StepViews& v : steps) {
      // h_t = act(P_t + h_{t-1} W_hh^T), in place in the output.
      if (v.carried.defined()) Backend::addmm(v.carried, v.carried, v.prev_carried, w_hh_t);
      if (v.fresh.defined()) Backend::addmm(v.fresh, v.fresh, v.state_fresh, w_hh_t);
      Backend::activation(v.all, relu);
    }
  }

  // h_n: each sequence's last state (batch order of hx).
  Tensor h_n = empty_rows(h0, L.batch, H);
  if (L.steps == 0) {
    torch::stable::copy_(h_n, h0);
  }
  for (int64_t t = 0; t < L.steps; ++t) {
    const int64_t first = first_final_row(L, t, reverse);
    const int64_t count = L.batch_at(t) - first;
    if (count > 0) {
      Tensor dst = rows(h_n, first, count);
      torch::stable::copy_(dst, rows(out, L.offsets[t] + first, count));
    }
  }

  if (!L.packed) out = torch::stable::view(out, {L.steps, L.batch, H});
  return {out, h_n};
}

template <class Backend>
BackwardResult elman_backward(Tensor grad_output, Tensor grad_h_n, Tensor input,
                              Tensor hx, Tensor weight_ih, Tensor weight_hh,
                              Tensor output, std::optional<Tensor> batch_sizes,
                              bool relu, bool reverse, bool need_input_grad,
                              bool need_weight_grad, bool need_bias_grad) {
  using namespace detail;
  const char* op = "fastrnn::elman_backward";
  const SequenceLayout L = check_and_layout<Backend>(op, input, hx, weight_ih,
                                                     weight_hh, batch_sizes);
  check_defined(op, "grad_output", grad_output);
  check_defined(op, "grad_h_n", grad_h_n);
  check_defined(op, "output", output);
  const int64_t H = weight_hh.size(0);
  const int64_t I = weight_ih.size(1);
  std::vector<int64_t> out_shape;
  for (int64_t d = 0; d + 1 < input.dim(); ++d) out_shape.push_back(input.size(d));
  out_shape.push_back(H);
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"output", &output},
                                {"grad_output", &grad_output}}) {
    FASTRNN_CHECK(t->dim() == input.dim(), op, ": ", name, " must be ",
                    input.dim(), "-D, got ", t->dim(), "-D");
    for (int64_t d = 0; d < input.dim(); ++d) {
      FASTRNN_CHECK(t->size(d) == out_shape[d], op, ": ", name,
                      " must have the shape of the forward output, got ",
                      shape_str(*t));
    }
    check_same<Backend>(op, name, *t, input);
  }
  check_shape(op, "grad_h_n", grad_h_n, {L.batch, H});
  check_same<Backend>(op, "grad_h_n", grad_h_n, input);

  const Tensor out = torch::stable::view(torch::stable::contiguous(output), {L.rows, H});
  const Tensor h0 = torch::stable::contiguous(hx);
  const Tensor w_hh = torch::stable::contiguous(weight_hh);

  // dA starts as dY; each step then adds the carried dh into its slot in place.
  // (A copy of grad_output: contiguous() already made one unless it was contiguous.)
  Tensor dA = torch::stable::contiguous(grad_output);
  if (dA.data_ptr() == grad_output.data_ptr()) dA = torch::stable::clone(dA);
  dA = torch::stable::view(dA, {L.rows, H});
  const Tensor dh_n = torch::stable::contiguous(grad_h_n);
  for (int64_t t = 0; t < L.steps; ++t) {
    const int64_t first = first_final_row(L, t, reverse);
    const int64_t count = L.batch_at(t) - first;
    if (count > 0) {
      Tensor dst = rows(dA, L.offsets[t] + first, count);
      // dst + dh_n rows (subtract with alpha = -1 is add without a Scalar).
      torch::stable::copy_(dst, torch::stable::subtract(dst, rows(dh_n, first, count), -1.0));
    }
  }

  Tensor grad_hx = empty_rows(h0, L.batch, H);
  if (L.steps == 0) torch::stable::copy_(grad_hx, dh_n);

  if (!Backend::fused_backward(L, reverse, relu, dA, out, grad_hx, w_hh)) {
    std::vector<StepRows> order = steps_in_order(L, reverse);
    std::vector<std::pair<StepViews, Tensor>> steps;  // (views into dA, out_t)
    for (auto it = order.rbegin(); it != order.rend(); ++it) {
      steps.emplace_back(step_views(*it, dA, grad_hx), rows(out, it->begin, it->count));
    }
    for (auto& [v, out_t] : steps) {
      // dA_t = (dY_t + dh_t) * act'(h_t); dh_{t-1} = dA_t W_hh, added into the
      // previous step's dA slot, or written to grad_hx for rows that began at hx.
      Backend::activation_backward(v.all, out_t, relu);
      if (v.carried.defined()) Backend::addmm(v.prev_carried, v.prev_carried, v.carried, w_hh);
      if (v.fresh.defined()) Backend::mm(v.state_fresh, v.fresh, w_hh);
    }
  }

  // Outputs that are not needed are distinct empty tensors (outputs of an op
  // must not alias each other).
  auto nothing = [&] { return torch::stable::new_empty(input, {0}); };
  Tensor grad_input = nothing(), grad_w_ih = nothing(), grad_w_hh = nothing(),
         grad_bias = nothing();
  const Tensor dA_t = transposed(dA);
  if (need_input_grad) {
    grad_input = empty_rows(input, L.rows, I);
    Backend::mm(grad_input, dA, torch::stable::contiguous(weight_ih));
    std::vector<int64_t> in_shape(out_shape);
    in_shape.back() = I;
    grad_input = torch::stable::view(grad_input, in_shape);
  }
  if (need_weight_grad) {
    grad_w_ih = empty_rows(input, H, I);
    const Tensor x = torch::stable::view(torch::stable::contiguous(input), {L.rows, I});
    Backend::mm(grad_w_ih, dA_t, x);

    // dW_hh = dA^T Hprev, Hprev being each row's h_{t-1}: one GEMM per
    // contiguous block, or one GEMM over a gathered Hprev when there are many.
    grad_w_hh = empty_rows(input, H, H);
    std::vector<PrevRows> blocks = prev_row_blocks(L, reverse);
    auto source = [&](const PrevRows& b) { return rows(b.from_hx ? h0 : out, b.src, b.count); };
    if (blocks.size() > 2) {
      Tensor hprev = empty_rows(out, L.rows, H);
      for (const PrevRows& b : blocks) {
        Tensor dst = rows(hprev, b.dst, b.count);
        torch::stable::copy_(dst, source(b));
      }
      blocks = {PrevRows{0, 0, L.rows, false}};
      Backend::mm(grad_w_hh, dA_t, hprev);
    } else if (blocks.empty()) {
      torch::stable::zero_(grad_w_hh);
    } else {
      for (size_t i = 0; i < blocks.size(); ++i) {
        const PrevRows& b = blocks[i];
        const Tensor lhs = transposed(rows(dA, b.dst, b.count));
        if (i == 0) {
          Backend::mm(grad_w_hh, lhs, source(b));
        } else {
          Backend::addmm(grad_w_hh, grad_w_hh, lhs, source(b));
        }
      }
    }
  }
  if (need_bias_grad) {
    const std::vector<int64_t> row_dim{0};
    grad_bias = torch::stable::sum(dA, torch::headeronly::IntHeaderOnlyArrayRef(row_dim));
  }
  return {grad_input, grad_hx, grad_w_ih, grad_w_hh, grad_bias};
}

}  // namespace fastrnn
