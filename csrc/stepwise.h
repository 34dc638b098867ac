// fastrnn: the recurrences of recurrence.h with one GEMM per step, for any
// backend that supplies a GEMM and the pointwise activation kernels:
//
//   static void gemm(const Tensor& c, const Tensor& a, const Tensor& b, bool accumulate);
//       c = a @ b, or c += a @ b (2-D views)
//   static void activation(const Tensor& h, Activation act);           h = act(h)
//   static void activation_backward(const Tensor& grad, const Tensor& out, Activation act);
//       grad *= act'(out), computed from the output
//
// It works for every size and dtype; backends call it where their fused
// kernels do not apply. Views of each step are made before the time loop, so
// that the loop only runs kernels.
#pragma once

#include "recurrence.h"
#include "tensor_util.h"

namespace fastrnn {
namespace stepwise {

// Views of one step into a sequence [N, H] (out or dA) and a state [B, H]
// (h0 or grad_hx).
struct StepViews {
  Tensor all, carried, prev_carried, fresh, state_fresh;
};

inline Tensor rows(const Tensor& t, int64_t begin, int64_t count) {
  return view2d(t, count, t.size(1), t.stride(0), begin * t.stride(0));
}

inline StepViews step_views(const StepRows& s, const Tensor& seq, const Tensor& state) {
  const int64_t fresh = s.count - s.carried;
  const Tensor all = rows(seq, s.begin, s.count);
  return {all,
          s.carried ? (fresh ? rows(seq, s.begin, s.carried) : all) : Tensor(),
          s.carried ? rows(seq, s.prev_begin, s.carried) : Tensor(),
          fresh ? rows(seq, s.begin + s.carried, fresh) : Tensor(),
          fresh ? rows(state, s.carried, fresh) : Tensor()};
}

// dst += src
inline void add_into(const Tensor& dst, const Tensor& src) {
  Tensor d = dst;
  torch::stable::copy_(d, torch::stable::subtract(dst, src, -1.0));
}

// Each sequence's last h, from the output rows to h_n.
inline void copy_final_rows(const ForwardJob& job) {
  const std::vector<StepRows>& steps = *job.steps;
  for (size_t i = 0; i < steps.size(); ++i) {
    const int64_t first = final_from(steps, i), count = steps[i].count - first;
    if (count > 0) {
      Tensor dst = rows(job.h_n, first, count);
      torch::stable::copy_(dst, rows(job.out, steps[i].begin + first, count));
    }
  }
}

// dh_n added into each sequence's last dA row.
inline void add_final_rows(const BackwardJob& job) {
  const std::vector<StepRows>& steps = *job.steps;
  for (size_t i = 0; i < steps.size(); ++i) {
    const int64_t first = final_from(steps, i), count = steps[i].count - first;
    if (count > 0) add_into(rows(job.dA, steps[i].begin + first, count), rows(job.dh_n, first, count));
  }
}

template <class Backend>
void forward(const ForwardJob& job, Activation act) {
  const Tensor w_hh_t = transposed(job.w_hh);
  std::vector<StepViews> views;
  views.reserve(job.steps->size());
  for (const StepRows& s : *job.steps) views.push_back(step_views(s, job.out, job.h0));
  for (const StepViews& v : views) {
    if (v.carried.defined()) Backend::gemm(v.carried, v.prev_carried, w_hh_t, true);
    if (v.fresh.defined()) Backend::gemm(v.fresh, v.state_fresh, w_hh_t, true);
    Backend::activation(v.all, act);
  }
  copy_final_rows(job);
}

template <class Backend>
void backward(const BackwardJob& job, Activation act) {
  add_final_rows(job);
  std::vector<std::pair<StepViews, Tensor>> views;  // (views into dA, the step's h)
  views.reserve(job.steps->size());
  for (auto it = job.steps->rbegin(); it != job.steps->rend(); ++it) {
    views.emplace_back(step_views(*it, job.dA, job.grad_hx), rows(job.out, it->begin, it->count));
  }
  for (const auto& [v, out_t] : views) {
    // dA_t = (dY_t + dh_t) * act'(h_t); dh_{t-1} = dA_t W_hh, added into the
    // previous step's dA rows, or written to grad_hx for rows that began at h0.
    Backend::activation_backward(v.all, out_t, act);
    if (v.carried.defined()) Backend::gemm(v.prev_carried, v.carried, job.w_hh, true);
    if (v.fresh.defined()) Backend::gemm(v.state_fresh, v.fresh, job.w_hh, false);
  }
}

}  // namespace stepwise
}  // namespace fastrnn
