// fastrnn: the recurrences of recurrence.h with one GEMM per step and the
// cell's pointwise math (cells.h) after it, for any backend that supplies
//
//   static void gemm(const Tensor& c, const Tensor& a, const Tensor& b, bool accumulate);
//       c = a @ b, or c += a @ b (2-D views)
//   static void addmm(const Tensor& c, const Tensor& bias, const Tensor& a, const Tensor& b);
//   template <class F> static void for_each(const Tensor& like, int64_t rows, int64_t cols, const F& f);
//       f(b, j) for every element of a rows x cols step, on like's device
//   template <class F> static void with_dtype(ScalarType t, F&& f);
//       f.template operator()<T>() with T the backend's storage type for t
//
// It works for every size and dtype; backends call it where their fused
// kernels do not apply.
#pragma once

#include "cells.h"
#include "recurrence.h"
#include "tensor_util.h"

namespace fastrnn {
namespace stepwise {

// Rows [begin, begin + count) of a 2-D view.
inline Tensor rows(const Tensor& t, int64_t begin, int64_t count) {
  return view2d(t, count, t.size(1), t.stride(0), begin * t.stride(0));
}

// The same rows as raw pointers for the pointwise functors.
template <typename T>
Rows<T> at(const Tensor& t, int64_t first_row = 0) {
  return {static_cast<T*>(t.data_ptr()) + first_row * t.stride(0), t.stride(0)};
}

// The previous state of step s's rows: the previous step's rows of seq, or init.
template <typename T>
PrevOrInit<T> prev_or_init(const StepRows& s, const Tensor& seq, const Tensor& init) {
  return {at<const T>(seq, s.prev_begin), at<const T>(init), s.carried};
}

// out rows = h_prev @ w (+ bias), for the carried rows and the fresh ones:
// the GEMM of one step, in at most two pieces.
template <class Backend>
void step_gemm(const StepRows& s, const Tensor& out, int64_t out_begin, const Tensor& seq,
               const Tensor& init, const Tensor& w_t, bool accumulate) {
  if (s.carried) Backend::gemm(rows(out, out_begin, s.carried), rows(seq, s.prev_begin, s.carried), w_t, accumulate);
  const int64_t fresh = s.count - s.carried;
  if (fresh) Backend::gemm(rows(out, out_begin + s.carried, fresh), rows(init, s.carried, fresh), w_t, accumulate);
}

// dst(b, j) = src(b, j), or dst(b, j) += src(b, j).
template <typename T, bool Add>
struct CopyRows {
  Rows<T> dst;
  Rows<const T> src;
  FASTRNN_HD void operator()(int64_t b, int64_t j) const {
    if constexpr (Add) {
      dst(b, j) = store<T>(load<acc_type<T>>(dst(b, j)) + load<acc_type<T>>(src(b, j)));
    } else {
      dst(b, j) = src(b, j);
    }
  }
};

// Each sequence's last row of seq, into state [B, *].
template <class Backend>
void copy_final_rows(const std::vector<StepRows>& steps, const Tensor& seq, const Tensor& state) {
  Backend::with_dtype(seq.scalar_type(), [&]<typename T>() {
    for (size_t i = 0; i < steps.size(); ++i) {
      const int64_t first = final_from(steps, i), count = steps[i].count - first;
      if (count > 0) {
        Backend::for_each(seq, count, seq.size(1),
                          CopyRows<T, false>{at<T>(state, first), at<const T>(seq, steps[i].begin + first)});
      }
    }
  });
}

// state's rows added into each sequence's last row of seq.
template <class Backend>
void add_final_rows(const std::vector<StepRows>& steps, const Tensor& seq, const Tensor& state) {
  Backend::with_dtype(seq.scalar_type(), [&]<typename T>() {
    for (size_t i = 0; i < steps.size(); ++i) {
      const int64_t first = final_from(steps, i), count = steps[i].count - first;
      if (count > 0) {
        Backend::for_each(seq, count, seq.size(1),
                          CopyRows<T, true>{at<T>(seq, steps[i].begin + first), at<const T>(state, first)});
      }
    }
  });
}

// ---------------------------------------------------------------- Elman

template <class Backend>
void forward(const ForwardJob& job, Activation act) {
  const Tensor w_hh_t = transposed(job.w_hh);
  const int64_t H = job.w_hh.size(0);
  Backend::with_dtype(job.out.scalar_type(), [&]<typename T>() {
    with_activation(act, [&](auto a) {
      for (const StepRows& s : *job.steps) {
        step_gemm<Backend>(s, job.out, s.begin, job.out, job.h0, w_hh_t, true);
        Backend::for_each(job.out, s.count, H, ElmanForward<T, decltype(a)::value>{at<T>(job.out, s.begin)});
      }
    });
  });
  copy_final_rows<Backend>(*job.steps, job.out, job.h_n);
}

// dst = src where the job gives src apart from the buffer the loops below
// work on in place (BackwardJob::dY, the cells' saved gates and hn).
template <class Backend>
void take(const Tensor& dst, const Tensor& src) {
  if (!src.defined()) return;
  // A padded layout's [T, B, H] steps into [N, H] rows (row t * B + b).
  const Tensor d = src.dim() == 3 ? reinterpret(dst, {src.size(0), src.size(1), dst.size(1)},
                                                {src.size(1) * dst.stride(0), dst.stride(0), 1})
                                  : dst;
  copy_into<Backend>(d, src);
}

template <class Backend>
void backward(const BackwardJob& job, Activation act) {
  take<Backend>(job.dA, job.dY);
  const int64_t H = job.w_hh.size(0);
  add_final_rows<Backend>(*job.steps, job.dA, job.dh_n);
  Backend::with_dtype(job.dA.scalar_type(), [&]<typename T>() {
    with_activation(act, [&](auto a) {
      for (auto s = job.steps->rbegin(); s != job.steps->rend(); ++s) {
        // dA_t = (dY_t + dh_t) * act'(h_t); dh_{t-1} = dA_t W_hh, added into the
        // previous step's rows, or written to grad_hx for rows that began at h0.
        Backend::for_each(job.dA, s->count, H,
                          ElmanBackward<T, decltype(a)::value>{at<T>(job.dA, s->begin),
                                                               at<const T>(job.out, s->begin)});
        if (s->carried) {
          Backend::gemm(rows(job.dA, s->prev_begin, s->carried), rows(job.dA, s->begin, s->carried),
                        job.w_hh, true);
        }
        const int64_t fresh = s->count - s->carried;
        if (fresh) {
          Backend::gemm(rows(job.grad_hx, s->carried, fresh),
                        rows(job.dA, s->begin + s->carried, fresh), job.w_hh, false);
        }
      }
    });
  });
}

// ---------------------------------------------------------------- LSTM

template <class Backend>
void forward(const LstmForwardJob& job) {
  const Tensor w_hh_t = transposed(job.w_hh);
  const int64_t H = job.c.size(1);
  const bool proj = job.w_hr.defined();
  Backend::with_dtype(job.out.scalar_type(), [&]<typename T>() {
    for (const StepRows& s : *job.steps) {
      step_gemm<Backend>(s, job.gates, s.begin, job.out, job.h0, w_hh_t, true);
      Backend::for_each(job.c, s.count, H,
                        LstmForward<T>{at<T>(job.gates, s.begin), at<T>(job.c, s.begin),
                                       at<T>(proj ? job.m : job.out, s.begin),
                                       prev_or_init<T>(s, job.c, job.c0), H});
      if (proj) Backend::gemm(rows(job.out, s.begin, s.count), rows(job.m, s.begin, s.count), transposed(job.w_hr), false);
    }
  });
  copy_final_rows<Backend>(*job.steps, job.out, job.h_n);
  copy_final_rows<Backend>(*job.steps, job.c, job.c_n);
}

template <class Backend>
void backward(const LstmBackwardJob& job) {
  take<Backend>(job.gates, job.saved_gates);
  const int64_t H = job.c.size(1), B = job.grad_cx.size(0);
  const bool proj = job.w_hr.defined();
  add_final_rows<Backend>(*job.steps, job.dh, job.dh_n);
  const Tensor dc = empty(job.c, {B, H});                    // the gradient reaching c, per row
  const Tensor dm = proj ? empty(job.c, {B, H}) : Tensor();  // dh W_hr, per step
  const std::vector<StepRows>& steps = *job.steps;
  Backend::with_dtype(job.c.scalar_type(), [&]<typename T>() {
    for (size_t i = steps.size(); i-- > 0;) {
      const StepRows& s = steps[i];
      if (proj) Backend::gemm(rows(dm, 0, s.count), rows(job.dh, s.begin, s.count), job.w_hr, false);
      Backend::for_each(job.c, s.count, H,
                        LstmBackward<T>{at<T>(job.gates, s.begin), at<T>(dc),
                                        at<const T>(job.c, s.begin),
                                        proj ? at<const T>(dm) : at<const T>(job.dh, s.begin),
                                        at<const T>(job.dc_n), prev_or_init<T>(s, job.c, job.c0), H,
                                        final_from(steps, i)});
      const int64_t fresh = s.count - s.carried;
      if (fresh) {  // rows that began at c0: dc is now the gradient of c0
        Tensor dst = rows(job.grad_cx, s.carried, fresh);
        torch::stable::copy_(dst, rows(dc, s.carried, fresh));
      }
      // dh_{t-1} = dA W_hh: into the previous step's rows, or grad_hx.
      if (s.carried) {
        Backend::gemm(rows(job.dh, s.prev_begin, s.carried), rows(job.gates, s.begin, s.carried),
                      job.w_hh, true);
      }
      if (fresh) {
        Backend::gemm(rows(job.grad_hx, s.carried, fresh), rows(job.gates, s.begin + s.carried, fresh),
                      job.w_hh, false);
      }
    }
  });
}

// ---------------------------------------------------------------- GRU

template <class Backend>
void forward(const GruForwardJob& job) {
  const Tensor w_hh_t = transposed(job.w_hh);
  const int64_t H = job.hn.size(1), B = job.h0.size(0);
  const Tensor hg = empty(job.hn, {B, 3 * H});  // h_{t-1} W_hh^T + b_hh, per step
  Backend::with_dtype(job.out.scalar_type(), [&]<typename T>() {
    for (const StepRows& s : *job.steps) {
      if (job.b_hh.defined()) {
        if (s.carried) Backend::addmm(rows(hg, 0, s.carried), job.b_hh, rows(job.out, s.prev_begin, s.carried), w_hh_t);
        const int64_t fresh = s.count - s.carried;
        if (fresh) Backend::addmm(rows(hg, s.carried, fresh), job.b_hh, rows(job.h0, s.carried, fresh), w_hh_t);
      } else {
        step_gemm<Backend>(s, hg, 0, job.out, job.h0, w_hh_t, false);
      }
      Backend::for_each(job.hn, s.count, H,
                        GruForward<T>{at<T>(job.gates, s.begin), at<T>(job.hn, s.begin),
                                      at<T>(job.out, s.begin), at<const T>(hg),
                                      prev_or_init<T>(s, job.out, job.h0), H});
    }
  });
  copy_final_rows<Backend>(*job.steps, job.out, job.h_n);
}

template <class Backend>
void backward(const GruBackwardJob& job) {
  take<Backend>(job.gates, job.saved_gates);
  take<Backend>(job.hn, job.saved_hn);
  const int64_t H = job.hn.size(1);
  add_final_rows<Backend>(*job.steps, job.dh, job.dh_n);
  Backend::with_dtype(job.dh.scalar_type(), [&]<typename T>() {
    for (auto s = job.steps->rbegin(); s != job.steps->rend(); ++s) {
      Backend::for_each(job.hn, s->count, H,
                        GruBackward<T>{at<T>(job.gates, s->begin), at<T>(job.hn, s->begin),
                                       at<T>(job.dh, s->prev_begin), at<T>(job.grad_hx),
                                       at<const T>(job.dh, s->begin),
                                       prev_or_init<T>(*s, job.out, job.h0), H, s->carried});
      // dh_{t-1} += [dA_r, dA_z, dA_hn] W_hh: the previous step's rows, or grad_hx.
      if (s->carried) {
        Backend::gemm(rows(job.dh, s->prev_begin, s->carried), rows(job.gates, s->begin, s->carried),
                      job.w_hh, true);
      }
      const int64_t fresh = s->count - s->carried;
      if (fresh) {
        Backend::gemm(rows(job.grad_hx, s->carried, fresh), rows(job.gates, s->begin + s->carried, fresh),
                      job.w_hh, true);
      }
    }
  });
}

}  // namespace stepwise
}  // namespace fastrnn
