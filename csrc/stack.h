// fastrnn: the whole-stack driver of every op (contracts in ops.h), written
// once for every device and cell. Per layer it runs one input-projection GEMM
// per direction straight into the layer's output (Elman) or gate buffer
// (LSTM, GRU), hands the directions' recurrences to the backend together
// (they are independent), and applies dropout between layers; backward walks
// the layers down with the weight gradients as single GEMMs.
//
// A Backend supplies, besides what stepwise.h needs:
//   static constexpr const char* device_name;
//   static bool supports(ScalarType dtype);
//   static void forward_recurrences(const std::vector<Job>&[, Activation]);
//   static void backward_recurrences(const std::vector<Job>&[, Activation]);
//       for each job type of recurrence.h: independent recurrences (both
//       directions of a layer)
#pragma once

#include "cells.h"
#include "checks.h"
#include "recurrence.h"
#include "scratch.h"
#include "tensor_util.h"

#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace fastrnn {
namespace detail {

// The tensors of one stack, as views into the op's arguments and reserve.
struct StackViews {
  const RnnConfig& c;
  const std::vector<Tensor>& weights;
  Tensor reserve;  // [R] (ops.h); a forward without one: the layers' outputs and masks
  // A forward without a reserve (need_reserve false) takes the rest from here:
  // one block of saved tensors, which the layers use in turn, and the cells'
  // two-step rings (LstmForwardJob::ring), each made when first asked for.
  scratch::Tensors* workspace = nullptr;
  mutable Tensor shared_block, rings;

  int64_t N() const { return c.layout.rows; }
  int64_t W() const { return c.layer_width(); }
  const Tensor& weight(int64_t cell, int64_t k) const { return weights[cell * c.per_cell() + k]; }
  const Tensor& w_ih(int64_t cell) const { return weight(cell, 0); }
  const Tensor& w_hh(int64_t cell) const { return weight(cell, 1); }
  std::optional<Tensor> b_ih(int64_t cell) const {
    return c.has_biases ? std::optional<Tensor>(weight(cell, 2)) : std::nullopt;
  }
  std::optional<Tensor> b_hh(int64_t cell) const {
    return c.has_biases ? std::optional<Tensor>(weight(cell, 3)) : std::nullopt;
  }
  Tensor w_hr(int64_t cell) const { return c.proj ? weight(cell, c.per_cell() - 1) : Tensor(); }

  // Layer l's output [N, D*R], l < L-1, and its dropout mask.
  Tensor layer_output(int64_t l) const { return view2d(reserve, N(), W(), W(), l * N() * W()); }
  Tensor mask(int64_t l) const { return layer_output(c.layers - 1 + l); }
  // Direction d's part of layer l's saved tensors (ops.h): `width` columns
  // starting at column `col` of each row's saved_per_row(). Layer l's block
  // holds, per saved tensor, [N, D*width] with direction d's columns; `copy`,
  // when given, is a copy of the block's start to read instead of the reserve.
  Tensor saved(int64_t l, int64_t d, int64_t col, int64_t width, const Tensor* copy = nullptr) const {
    const int64_t D = c.directions, at = N() * D * col + d * width;
    if (copy) return view2d(*copy, N(), width, D * width, at);
    if (!workspace) return view2d(reserve, N(), width, D * width, block_offset(l) + at);
    if (!shared_block.defined()) shared_block = workspace->empty(reserve, {N() * D * c.saved_per_row()});
    return view2d(shared_block, N(), width, D * width, at);
  }
  int64_t block_offset(int64_t l) const {
    const int64_t outputs = (c.layers - 1) * N() * W() * (c.dropout_applied() ? 2 : 1);
    return outputs + l * N() * c.directions * c.saved_per_row();
  }
  // Direction d's two-step ring of a cell's gates ([2B, G*H]) and the [2B, H]
  // tensor after them (LSTM's c, GRU's hn).
  std::pair<Tensor, Tensor> cell_ring(int64_t d) const {
    const int64_t rows = 2 * c.layout.batch, GH = c.gates * c.hidden, per = rows * (GH + c.hidden);
    if (!rings.defined()) rings = workspace->empty(reserve, {c.directions * per});
    return {view2d(rings, rows, GH, GH, d * per), view2d(rings, rows, c.hidden, c.hidden, d * per + rows * GH)};
  }
  Tensor gates(int64_t l, int64_t d, const Tensor* copy = nullptr) const {
    return saved(l, d, 0, c.gates * c.hidden, copy);
  }
  // LSTM's c and m, GRU's hn: the [N, H] tensors after the gates.
  Tensor after_gates(int64_t l, int64_t d, int64_t i, const Tensor* copy = nullptr) const {
    return saved(l, d, c.gates * c.hidden + i * c.hidden, c.hidden, copy);
  }
  // Direction d's columns of a layer's [N, D*R] tensor.
  Tensor columns(const Tensor& t, int64_t d) const {
    return view2d(t, N(), c.state_size(), W(), d * c.state_size());
  }
  // Cell `cell`'s [B, size] slice of a [L*D, B, size] state.
  static Tensor state(const Tensor& t, int64_t cell) {
    return view2d(t, t.size(1), t.size(2), t.size(2), cell * t.size(1) * t.size(2));
  }
};

// The input of layer l > 0: the previous layer's output, dropped out.
inline Tensor layer_input(const StackViews& s, int64_t l) {
  const Tensor prev = s.layer_output(l - 1);
  return s.c.dropout_applied() ? multiply(prev, s.mask(l - 1)) : prev;
}

// b_ih + b_hh, or the one that is there: by one pointwise launch of the
// backend's own where both are vectors (a dispatcher call costs a GPU's
// host several times that), else by torch's add.
template <class Backend>
std::optional<Tensor> bias_sum(const std::optional<Tensor>& a, const std::optional<Tensor>& b) {
  if (!a || !b) return a ? a : b;
  if (a->dim() != 1 || a->stride(0) != 1 || b->dim() != 1 || b->stride(0) != 1 ||
      a->scalar_type() != b->scalar_type() || a->size(0) != b->size(0)) {
    return torch::stable::subtract(*a, *b, -1.0);
  }
  Tensor sum = empty(*a, {a->size(0)});
  Backend::with_dtype(sum.scalar_type(), [&]<typename T>() {
    Backend::for_each(sum, 1, sum.size(0),
                      AddRow<T>{static_cast<T*>(sum.data_ptr()), static_cast<const T*>(a->data_ptr()),
                                static_cast<const T*>(b->data_ptr())});
  });
  return sum;
}

// out = x W^T (+ bias).
template <class Backend>
void project(const Tensor& out, const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias) {
  if (bias) {
    Backend::addmm(out, *bias, x, transposed(w));
  } else {
    Backend::gemm(out, x, transposed(w), false);
  }
}

// Whether the backend runs this Elman or LSTM job's input projection inside
// its recurrence (Backend::input_projection_inside(job), where it has one;
// asked with x set, w_ih and bias not yet): the job then carries x, W_ih and
// the bias, and P (the gates) holds nothing on entry.
template <class Backend, class Job>
bool input_projection_inside(const Job& job) {
  if constexpr (requires { Backend::input_projection_inside(job); }) {
    return Backend::input_projection_inside(job);
  } else {
    return false;
  }
}

// t ([N, W] rows of L) where it lies, for a kernel that reads it in place:
// rows with one stride, or a padded layout's [T, B, W] steps in any layout
// (e.g. a batch_first tensor's). False where neither.
inline bool as_lying(const Tensor& t, const SequenceLayout& L, int64_t W, Tensor& lying) {
  return as_rows(t, L.rows, W, lying) || (!L.packed && as_steps(t, W, lying));
}

// A layer's input as the forward hands it on: where it lies (rows with one
// stride, or a padded layout's [T, B, I] steps in any layout, e.g. a
// batch_first input) for a recurrence that projects it inside, and as
// contiguous [N, I] rows for a product outside, copied on first use.
class LayerInput {
 public:
  LayerInput(const Tensor& input, const SequenceLayout& L, int64_t I, scratch::Tensors& tmp)
      : input_(input), N_(L.rows), I_(I), tmp_(&tmp) {
    if (!as_lying(input, L, I, lying_)) lying_ = rows();
  }
  explicit LayerInput(const Tensor& rows) : lying_(rows), rows_(rows) {}

  const Tensor& lying() const { return lying_; }
  const Tensor& rows() {
    if (!rows_.defined()) rows_ = view2d(tmp_->contiguous(input_), N_, I_, I_);
    return rows_;
  }

 private:
  Tensor input_, lying_, rows_;
  int64_t N_ = 0, I_ = 0;
  scratch::Tensors* tmp_ = nullptr;
};

// The input projection of a layer's job, job.x set to x where it lies: inside
// its recurrence where the backend takes it (inside: input_projection_inside),
// else P = x W_ih^T + bias into p first.
template <class Backend, class Job>
void take_projection(Job& job, LayerInput& x, const Tensor& w_ih,
                     const std::optional<Tensor>& bias, const Tensor& p, bool inside) {
  if (inside) {
    job.w_ih = as_contiguous(w_ih);
    if (bias) job.bias = as_contiguous(*bias);
  } else {
    project<Backend>(p, x.rows(), w_ih, bias);
    job.x = Tensor();
  }
}

// dW_ih (rows of it) = dA^T x, reading x where it lies: rows with one stride,
// or a padded input's steps where the backend's product takes them
// (Backend::gemm_steps), else x's rows copied.
template <class Backend>
void input_weight_grad(const Tensor& dW, const Tensor& dA_t, LayerInput& x) {
  const Tensor& lying = x.lying();
  if (lying.dim() == 2) return Backend::gemm(dW, dA_t, lying, false);
  if constexpr (requires { Backend::gemm_steps(dW, dA_t, lying); }) {
    if (Backend::gemm_steps(dW, dA_t, lying)) return;
  }
  Backend::gemm(dW, dA_t, x.rows(), false);
}

// Direction d's H columns of the top layer's gradient as it lies ([N, W] rows
// or [T, B, W] steps), or undefined.
inline Tensor top_columns(const Tensor& dY, int64_t N, int64_t H, int64_t d) {
  if (!dY.defined()) return Tensor();
  if (dY.dim() == 3) {
    return reinterpret(dY, {dY.size(0), dY.size(1), H}, {dY.stride(0), dY.stride(1), 1}, d * H);
  }
  return view2d(dY, N, H, dY.stride(0), d * H);
}

// A cell job's x (where it lies), gates and the [N, H] tensor after them
// (LSTM's c, GRU's hn); returns whether the backend projects x inside. Where
// the forward keeps no reserve and it does, no step reads the buffers past the
// next, and a two-step ring holds them (job.ring); else the layer's block of
// saved tensors.
template <class Backend, class Job>
bool take_cell_buffers(const StackViews& s, int64_t l, int64_t d, LayerInput& x, Job& job,
                       Tensor& after) {
  const auto saved = [&] {
    job.gates = s.gates(l, d);
    after = s.after_gates(l, d, 0);
  };
  job.x = x.lying();
  if constexpr (requires { Backend::input_projection_inside(job); }) {
    if (s.workspace) {
      std::tie(job.gates, after) = s.cell_ring(d);
      job.ring = Backend::input_projection_inside(job);
      if (!job.ring) saved();  // buffers of the same dtype and shape: the answer stands
      return job.ring;
    }
  }
  saved();
  return input_projection_inside<Backend>(job);
}

// What a layer's forward hands to the backend, per cell kind.
struct LayerJobs {
  std::vector<ForwardJob> elman;
  std::vector<LstmForwardJob> lstm;
  std::vector<GruForwardJob> gru;
};

template <class Backend>
void forward_layer(const StackViews& s, int64_t l, LayerInput& x, const Tensor& out,
                   const Tensor& h0, const Tensor& c0, const Tensor& h_n, const Tensor& c_n,
                   const std::vector<StepRows>* order) {
  const RnnConfig& c = s.c;
  LayerJobs jobs;
  for (int64_t d = 0; d < c.directions; ++d) {
    const int64_t cell = l * c.directions + d;
    const Tensor out_d = s.columns(out, d), w_hh = as_contiguous(s.w_hh(cell));
    switch (c.cell) {
      case CellKind::Elman: {
        ForwardJob job{&c.layout, d == 1, &order[d], out_d, StackViews::state(h0, cell),
                       StackViews::state(h_n, cell), w_hh};
        const std::optional<Tensor> bias = bias_sum<Backend>(s.b_ih(cell), s.b_hh(cell));
        job.x = x.lying();
        const bool inside = input_projection_inside<Backend>(job);
        take_projection<Backend>(job, x, s.w_ih(cell), bias, out_d, inside);
        jobs.elman.push_back(job);
        break;
      }
      case CellKind::Lstm: {
        const std::optional<Tensor> bias = bias_sum<Backend>(s.b_ih(cell), s.b_hh(cell));
        LstmForwardJob job{&c.layout, d == 1, &order[d], Tensor(), Tensor(),
                           c.proj ? s.after_gates(l, d, 1) : Tensor(), out_d,
                           StackViews::state(h0, cell), StackViews::state(c0, cell),
                           StackViews::state(h_n, cell), StackViews::state(c_n, cell), w_hh,
                           s.w_hr(cell)};
        const bool inside = take_cell_buffers<Backend>(s, l, d, x, job, job.c);
        take_projection<Backend>(job, x, s.w_ih(cell), bias, job.gates, inside);
        jobs.lstm.push_back(job);
        break;
      }
      case CellKind::Gru: {
        const std::optional<Tensor> b_hh = s.b_hh(cell);
        GruForwardJob job{&c.layout, d == 1, &order[d], Tensor(), Tensor(), out_d,
                          StackViews::state(h0, cell), StackViews::state(h_n, cell), w_hh,
                          b_hh ? *b_hh : Tensor()};
        const bool inside = take_cell_buffers<Backend>(s, l, d, x, job, job.hn);
        take_projection<Backend>(job, x, s.w_ih(cell), s.b_ih(cell), job.gates, inside);
        jobs.gru.push_back(job);
        break;
      }
    }
  }
  if (c.layout.steps == 0) return;
  if (!jobs.elman.empty()) Backend::forward_recurrences(jobs.elman, c.act);
  if (!jobs.lstm.empty()) Backend::forward_recurrences(jobs.lstm);
  if (!jobs.gru.empty()) Backend::forward_recurrences(jobs.gru);
}

// The whole forward: (output [N, D*R], the reserve).
template <class Backend>
Tensor stack_forward(const StackViews& s, const Tensor& input, const Tensor& h0, const Tensor& c0,
                     const Tensor& h_n, const Tensor& c_n) {
  const RnnConfig& c = s.c;
  const SequenceLayout& L = c.layout;
  Tensor output = empty(input, {L.rows, c.layer_width()});
  const std::vector<StepRows> order[2] = {steps_in_order(L, false), steps_in_order(L, true)};
  scratch::Tensors tmp;
  LayerInput x(input, L, c.input_size, tmp);
  for (int64_t l = 0; l < c.layers; ++l) {
    const Tensor out = l + 1 == c.layers ? output : s.layer_output(l);
    forward_layer<Backend>(s, l, x, out, h0, c0, h_n, c_n, order);
    if (l + 1 < c.layers) {
      if (c.dropout_applied()) {
        Tensor mask = s.mask(l);
        if (c.dropout < 1) {
          fill_dropout_mask(mask, 1 - c.dropout);
        } else {
          torch::stable::zero_(mask);  // as torch's dropout at p = 1 (no 0/0)
        }
      }
      x = LayerInput(layer_input(s, l + 1));
    }
  }
  if (!L.packed) output = reinterpret(output, {L.steps, L.batch, c.layer_width()}, {L.batch * c.layer_width(), c.layer_width(), 1});
  return output;
}

// Whether rows of h0 ([B, H]) add nothing to dW = dA^T Hprev: h0 all zero and
// their rows of dA finite (0 * inf is NaN), where the backend tells cheaply
// (the CPU's, on the host); false where it cannot.
template <class Backend>
bool adds_nothing(const Tensor& h0, const Tensor& dA_rows) {
  if constexpr (requires { Backend::zero_state(h0); Backend::finite(dA_rows); }) {
    return Backend::zero_state(h0) && Backend::finite(dA_rows);
  } else {
    return false;
  }
}

// dW = dA^T Hprev, Hprev being each row's h_{t-1} (from h0 or the output):
// one GEMM per contiguous block, or one GEMM over a gathered Hprev when there are many.
// A block of a zero h0 adds nothing (the modules' default h0: a step's worth of
// the product) unless its rows of dA hold an infinity or a NaN (0 * inf is NaN).
template <class Backend>
void recurrent_weight_grad(const SequenceLayout& L, bool reverse, const Tensor& grad_w,
                           const Tensor& dA, const Tensor& h0, const Tensor& out,
                           scratch::Tensors& tmp) {
  std::vector<PrevRows> blocks = prev_row_blocks(L, reverse);
  const int64_t R = out.size(1);
  auto source = [&](const PrevRows& b) {
    const Tensor& from = b.from_hx ? h0 : out;
    return view2d(from, b.count, R, from.stride(0), b.src * from.stride(0));
  };
  auto dA_rows = [&](const PrevRows& b) {
    return view2d(dA, b.count, dA.size(1), dA.stride(0), b.dst * dA.stride(0));
  };
  if (blocks.size() <= 2) {
    std::erase_if(blocks, [&](const PrevRows& b) { return b.from_hx && adds_nothing<Backend>(h0, dA_rows(b)); });
  }
  if (blocks.empty()) {
    Tensor g = grad_w;
    torch::stable::zero_(g);
  } else if (blocks.size() > 2) {
    Tensor hprev = tmp.empty(out, {L.rows, R});
    for (const PrevRows& b : blocks) {
      Tensor dst = view2d(hprev, b.count, R, R, b.dst * R);
      copy_into<Backend>(dst, source(b));
    }
    Backend::gemm(grad_w, transposed(dA), hprev, false);
  } else {
    for (size_t i = 0; i < blocks.size(); ++i) {
      Backend::gemm(grad_w, transposed(dA_rows(blocks[i])), source(blocks[i]), i > 0);
    }
  }
}

// One piece of a layer's input-side gradient: dA_x's columns [col, col + width)
// of a gate buffer, which multiply W_ih's rows [col, col + width).
struct InputGrad {
  Tensor dA;  // [N, width]
  int64_t col;
};

// The whole backward: fills grad_input, grad_hx (and grad_cx) and grad_weights.
template <class Backend>
void stack_backward(const StackViews& s, const Tensor& input, const Tensor& h0, const Tensor& c0,
                    const Tensor& output, const Tensor& grad_output, const Tensor& dh_n,
                    const Tensor& dc_n, const Tensor& grad_hx, const Tensor& grad_cx,
                    bool need_input_grad, bool need_weight_grad, Tensor& grad_input,
                    std::vector<Tensor>& grad_weights) {
  const RnnConfig& c = s.c;
  const SequenceLayout& L = c.layout;
  const int64_t N = L.rows, W = c.layer_width(), H = c.hidden, GH = c.gates * H;
  const std::vector<StepRows> order[2] = {steps_in_order(L, false), steps_in_order(L, true)};

  // dY of the top layer. The Elman recurrences read it where it lies (rows
  // with one stride, or a padded layout's steps in any layout, e.g. the
  // batch-major gradient of a batch_first output) and write dA to a buffer of
  // their own; LSTM's and GRU's accumulate into a copy of it. Below the top,
  // dY is the dX of the layer above, a buffer of the call's, taken over in
  // place.
  scratch::Tensors tmp;
  Tensor dY, dY_top;
  if (c.cell == CellKind::Elman && as_lying(grad_output, L, W, dY_top)) {
    dY = tmp.empty(grad_output, {N, W});
  } else {
    dY = view2d(tmp.copy(grad_output), N, W, W);
  }
  const Tensor top_output = view2d(as_contiguous(output), N, W, W);

  for (int64_t l = c.layers - 1; l >= 0; --l) {
    const Tensor out = l + 1 == c.layers ? top_output : s.layer_output(l);
    // LSTM's and GRU's recurrences read the saved gates (and GRU's hn) from
    // the reserve, which stays as it is (a retained graph runs backward again
    // from it), and write their gradients into a buffer laid out like the
    // reserve's block.
    Tensor scratch;
    if (c.cell != CellKind::Elman) {
      scratch = tmp.empty(s.reserve, {N * c.directions * (GH + (c.cell == CellKind::Gru ? H : 0))});
    }
    const Tensor* sc = scratch.defined() ? &scratch : nullptr;
    std::vector<BackwardJob> elman;
    std::vector<LstmBackwardJob> lstm;
    std::vector<GruBackwardJob> gru;
    for (int64_t d = 0; d < c.directions; ++d) {
      const int64_t cell = l * c.directions + d;
      const Tensor w_hh = as_contiguous(s.w_hh(cell));
      const auto state = [&](const Tensor& t) { return StackViews::state(t, cell); };
      switch (c.cell) {
        case CellKind::Elman:
          elman.push_back({&L, d == 1, &order[d], s.columns(dY, d), s.columns(out, d), state(dh_n),
                           state(grad_hx), w_hh,
                           top_columns(dY_top, N, H, d)});
          break;
        case CellKind::Lstm:
          lstm.push_back({&L, d == 1, &order[d], s.columns(dY, d), s.gates(l, d, sc), s.after_gates(l, d, 0),
                          c.proj ? s.after_gates(l, d, 1) : Tensor(), state(c0), state(dh_n),
                          state(dc_n), state(grad_hx), state(grad_cx), w_hh,
                          c.proj ? as_contiguous(s.w_hr(cell)) : Tensor(), s.gates(l, d)});
          break;
        case CellKind::Gru:
          gru.push_back({&L, d == 1, &order[d], s.columns(dY, d), s.gates(l, d, sc), s.after_gates(l, d, 0, sc),
                         s.columns(out, d), state(h0), state(dh_n), state(grad_hx), w_hh,
                         s.gates(l, d), s.after_gates(l, d, 0)});
          break;
      }
    }
    dY_top = Tensor();  // read by the top layer only
    if (L.steps > 0) {
      if (!elman.empty()) Backend::backward_recurrences(elman, c.act);
      if (!lstm.empty()) Backend::backward_recurrences(lstm);
      if (!gru.empty()) Backend::backward_recurrences(gru);
    }
    const int64_t I = c.layer_input_size(l);
    LayerInput x = l == 0 ? LayerInput(input, L, I, tmp) : LayerInput(layer_input(s, l));

    // Per direction: the gradients of the recurrent pre-activations (dA_h) and
    // of the input-side ones, in pieces (InputGrad).
    std::vector<std::vector<InputGrad>> input_grads(c.directions);
    for (int64_t d = 0; d < c.directions; ++d) {
      Tensor dA_h;
      switch (c.cell) {
        case CellKind::Elman:
          dA_h = s.columns(dY, d);
          input_grads[d] = {{dA_h, 0}};
          break;
        case CellKind::Lstm:
          dA_h = s.gates(l, d, sc);
          input_grads[d] = {{dA_h, 0}};
          break;
        case CellKind::Gru: {  // gates hold [dA_r, dA_z, dA_hn], hn holds dA_n (cells.h)
          dA_h = s.gates(l, d, sc);
          input_grads[d] = {{view2d(dA_h, N, 2 * H, dA_h.stride(0)), 0}, {s.after_gates(l, d, 0, sc), 2 * H}};
          break;
        }
      }
      if (!need_weight_grad) continue;
      const int64_t cell = l * c.directions + d, first = cell * c.per_cell();
      // The bias gradients first, while the dA the recurrence has just written
      // is still partly in cache: the weight products stream X and h through it.
      if (c.has_biases) {
        grad_weights[first + 3] = column_sums<Backend>(dA_h);
        grad_weights[first + 2] = empty(input, {GH});
        if (c.cell == CellKind::Gru) {
          for (const InputGrad& g : input_grads[d]) {
            const int64_t width = g.dA.size(1);
            const Tensor into = reinterpret(grad_weights[first + 2], {width}, {1}, g.col);
            if (g.dA.data_ptr() == dA_h.data_ptr() && g.dA.stride(0) == dA_h.stride(0)) {
              // dA_r and dA_z are dA_h's first columns: b_hh's sums, already made.
              copy_into<Backend>(into, reinterpret(grad_weights[first + 3], {width}, {1}, 0));
            } else {
              column_sums<Backend>(g.dA, into);
            }
          }
        } else {
          copy_into<Backend>(grad_weights[first + 2], grad_weights[first + 3]);
        }
      }
      grad_weights[first] = empty(input, {GH, I});
      for (const InputGrad& g : input_grads[d]) {
        const Tensor rows = view2d(grad_weights[first], g.dA.size(1), I, I, g.col * I);
        input_weight_grad<Backend>(rows, transposed(g.dA), x);
      }
      grad_weights[first + 1] = empty(input, {GH, c.state_size()});
      recurrent_weight_grad<Backend>(L, d == 1, grad_weights[first + 1], dA_h,
                                     StackViews::state(h0, cell), s.columns(out, d), tmp);
      if (c.proj) {  // dW_hr = dh^T m
        grad_weights[first + c.per_cell() - 1] = empty(input, {c.proj, H});
        Backend::gemm(grad_weights[first + c.per_cell() - 1], transposed(s.columns(dY, d)),
                      s.after_gates(l, d, 1), false);
      }
    }

    if (l > 0 || need_input_grad) {
      // dX = sum over directions and pieces of dA_x W_ih: the gradient of this
      // layer's input (layer 0's is returned: not a temporary).
      Tensor dX = l > 0 ? tmp.empty(input, {N, I}) : empty(input, {N, I});
      bool first = true;
      for (int64_t d = 0; d < c.directions; ++d) {
        const Tensor& w_ih = s.w_ih(l * c.directions + d);
        for (const InputGrad& g : input_grads[d]) {
          // W_ih's rows [col, col + width), with W_ih's own strides.
          const Tensor w_rows = reinterpret(w_ih, {g.dA.size(1), I}, {w_ih.stride(0), w_ih.stride(1)},
                                            g.col * w_ih.stride(0));
          Backend::gemm(dX, g.dA, w_rows, !first);
          first = false;
        }
      }
      if (l > 0) {
        if (c.dropout_applied()) inplace_binary("aten::mul_", dX, s.mask(l - 1));
        dY = dX;
      } else {
        grad_input = L.packed ? dX : reinterpret(dX, {L.steps, L.batch, I}, {L.batch * I, I, 1});
      }
    }
  }
}

// Outputs that were not computed become distinct empty tensors (outputs of an
// op must not alias each other).
inline std::vector<Tensor> or_no_grads(std::vector<Tensor> grads, const Tensor& like) {
  for (Tensor& g : grads) {
    if (!g.defined()) g = empty(like, {0});
  }
  return grads;
}

}  // namespace detail

namespace detail {

// A forward's views: into a new reserve, or, where no backward will follow
// (need_reserve false), into memory from `tmp` (cached on the CPU) that keeps
// the layers' outputs and one layer's saved tensors at a time.
inline StackViews forward_views(const RnnConfig& c, const std::vector<Tensor>& weights,
                                const Tensor& input, bool need_reserve, scratch::Tensors& tmp) {
  if (need_reserve) return {c, weights, empty(input, {c.reserve_size()})};
  return {c, weights, tmp.empty(input, {c.reserve_size(0)}), &tmp};
}

// What a forward returns as its reserve.
inline Tensor returned_reserve(const StackViews& s, const Tensor& input) {
  return s.workspace ? empty(input, {0}) : s.reserve;
}

// The RNN's and the GRU's entries: one state, so the same body (op names the
// op in messages; nonlinearity is the RNN's, "" for the GRU).
template <class Backend>
RnnResult one_state_forward(const char* op, CellKind kind, Tensor input, Tensor hx,
                            std::vector<Tensor> weights, bool has_biases, int64_t num_layers,
                            double dropout, bool train, bool bidirectional,
                            const std::string& nonlinearity, std::optional<Tensor> batch_sizes,
                            bool need_reserve) {
  const RnnConfig c = check_rnn_args<Backend>(op, kind, input, hx, nullptr, weights, has_biases,
                                              num_layers, dropout, train, bidirectional,
                                              nonlinearity, batch_sizes);
  scratch::Tensors tmp;
  const StackViews s = forward_views(c, weights, input, need_reserve, tmp);
  const Tensor h0 = tmp.contiguous(hx);
  Tensor h_n = empty(hx, {c.cells(), c.layout.batch, c.hidden});
  if (c.layout.steps == 0) torch::stable::copy_(h_n, h0);
  Tensor output = stack_forward<Backend>(s, input, h0, Tensor(), h_n, Tensor());
  return {output, h_n, returned_reserve(s, input)};
}

template <class Backend>
RnnBackwardResult one_state_backward(const char* op, CellKind kind, Tensor input, Tensor hx,
                                     std::vector<Tensor> weights, bool has_biases,
                                     int64_t num_layers, double dropout, bool train,
                                     bool bidirectional, const std::string& nonlinearity,
                                     std::optional<Tensor> batch_sizes, Tensor output,
                                     Tensor reserve, Tensor grad_output, Tensor grad_h_n,
                                     bool need_input_grad, bool need_weight_grad) {
  const RnnConfig c = check_rnn_args<Backend>(op, kind, input, hx, nullptr, weights, has_biases,
                                              num_layers, dropout, train, bidirectional,
                                              nonlinearity, batch_sizes);
  check_backward_args(op, c, input, output, reserve, grad_output, grad_h_n);
  const StackViews s{c, weights, as_contiguous(reserve)};
  scratch::Tensors tmp;
  const Tensor dh_n = tmp.contiguous(grad_h_n);
  Tensor grad_hx = empty(hx, {c.cells(), c.layout.batch, c.hidden});
  if (c.layout.steps == 0) torch::stable::copy_(grad_hx, dh_n);
  Tensor grad_input = empty(input, {0});
  std::vector<Tensor> grad_weights(weights.size());
  stack_backward<Backend>(s, input, tmp.contiguous(hx), Tensor(), output, grad_output, dh_n,
                          Tensor(), grad_hx, Tensor(), need_input_grad, need_weight_grad,
                          grad_input, grad_weights);
  return {grad_input, grad_hx, or_no_grads(std::move(grad_weights), input)};
}

}  // namespace detail

template <class Backend>
RnnResult rnn_forward(Tensor input, Tensor hx, std::vector<Tensor> weights, bool has_biases,
                      int64_t num_layers, double dropout, bool train, bool bidirectional,
                      std::string nonlinearity, std::optional<Tensor> batch_sizes,
                      bool need_reserve) {
  return detail::one_state_forward<Backend>("fastrnn::rnn", CellKind::Elman, input, hx,
                                            std::move(weights), has_biases, num_layers, dropout,
                                            train, bidirectional, nonlinearity, batch_sizes,
                                            need_reserve);
}

template <class Backend>
RnnBackwardResult rnn_backward(Tensor input, Tensor hx, std::vector<Tensor> weights,
                               bool has_biases, int64_t num_layers, double dropout, bool train,
                               bool bidirectional, std::string nonlinearity,
                               std::optional<Tensor> batch_sizes, Tensor output, Tensor reserve,
                               Tensor grad_output, Tensor grad_h_n, bool need_input_grad,
                               bool need_weight_grad) {
  return detail::one_state_backward<Backend>(
      "fastrnn::rnn_backward", CellKind::Elman, input, hx, std::move(weights), has_biases,
      num_layers, dropout, train, bidirectional, nonlinearity, batch_sizes, output, reserve,
      grad_output, grad_h_n, need_input_grad, need_weight_grad);
}

template <class Backend>
RnnResult gru_forward(Tensor input, Tensor hx, std::vector<Tensor> weights, bool has_biases,
                      int64_t num_layers, double dropout, bool train, bool bidirectional,
                      std::optional<Tensor> batch_sizes, bool need_reserve) {
  return detail::one_state_forward<Backend>("fastrnn::gru", CellKind::Gru, input, hx,
                                            std::move(weights), has_biases, num_layers, dropout,
                                            train, bidirectional, "", batch_sizes, need_reserve);
}

template <class Backend>
RnnBackwardResult gru_backward(Tensor input, Tensor hx, std::vector<Tensor> weights,
                               bool has_biases, int64_t num_layers, double dropout, bool train,
                               bool bidirectional, std::optional<Tensor> batch_sizes,
                               Tensor output, Tensor reserve, Tensor grad_output, Tensor grad_h_n,
                               bool need_input_grad, bool need_weight_grad) {
  return detail::one_state_backward<Backend>(
      "fastrnn::gru_backward", CellKind::Gru, input, hx, std::move(weights), has_biases,
      num_layers, dropout, train, bidirectional, "", batch_sizes, output, reserve, grad_output,
      grad_h_n, need_input_grad, need_weight_grad);
}

template <class Backend>
LstmResult lstm_forward(Tensor input, Tensor hx, Tensor cx, std::vector<Tensor> weights,
                        bool has_biases, int64_t num_layers, double dropout, bool train,
                        bool bidirectional, std::optional<Tensor> batch_sizes,
                        bool need_reserve) {
  const RnnConfig c = check_rnn_args<Backend>("fastrnn::lstm", CellKind::Lstm, input, hx, &cx,
                                              weights, has_biases, num_layers, dropout, train,
                                              bidirectional, "", batch_sizes);
  scratch::Tensors tmp;
  const detail::StackViews s = detail::forward_views(c, weights, input, need_reserve, tmp);
  const Tensor h0 = tmp.contiguous(hx), c0 = tmp.contiguous(cx);
  Tensor h_n = empty(hx, {c.cells(), c.layout.batch, c.state_size()});
  Tensor c_n = empty(cx, {c.cells(), c.layout.batch, c.hidden});
  if (c.layout.steps == 0) {
    torch::stable::copy_(h_n, h0);
    torch::stable::copy_(c_n, c0);
  }
  Tensor output = detail::stack_forward<Backend>(s, input, h0, c0, h_n, c_n);
  return {output, h_n, c_n, detail::returned_reserve(s, input)};
}

template <class Backend>
LstmBackwardResult lstm_backward(Tensor input, Tensor hx, Tensor cx, std::vector<Tensor> weights,
                                 bool has_biases, int64_t num_layers, double dropout, bool train,
                                 bool bidirectional, std::optional<Tensor> batch_sizes,
                                 Tensor output, Tensor reserve, Tensor grad_output,
                                 Tensor grad_h_n, Tensor grad_c_n, bool need_input_grad,
                                 bool need_weight_grad) {
  const char* op = "fastrnn::lstm_backward";
  const RnnConfig c = check_rnn_args<Backend>(op, CellKind::Lstm, input, hx, &cx, weights,
                                              has_biases, num_layers, dropout, train, bidirectional,
                                              "", batch_sizes);
  check_backward_args(op, c, input, output, reserve, grad_output, grad_h_n, &grad_c_n);
  const detail::StackViews s{c, weights, as_contiguous(reserve)};
  scratch::Tensors tmp;
  const Tensor dh_n = tmp.contiguous(grad_h_n), dc_n = tmp.contiguous(grad_c_n);
  Tensor grad_hx = empty(hx, {c.cells(), c.layout.batch, c.state_size()});
  Tensor grad_cx = empty(cx, {c.cells(), c.layout.batch, c.hidden});
  if (c.layout.steps == 0) {
    torch::stable::copy_(grad_hx, dh_n);
    torch::stable::copy_(grad_cx, dc_n);
  }
  Tensor grad_input = empty(input, {0});
  std::vector<Tensor> grad_weights(weights.size());
  detail::stack_backward<Backend>(s, input, tmp.contiguous(hx), tmp.contiguous(cx), output,
                                  grad_output, dh_n, dc_n, grad_hx, grad_cx, need_input_grad,
                                  need_weight_grad, grad_input, grad_weights);
  return {grad_input, grad_hx, grad_cx, detail::or_no_grads(std::move(grad_weights), input)};
}

}  // namespace fastrnn
