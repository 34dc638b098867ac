// fastrnn: the cells' pointwise math, written once for CPU loops and CUDA
// kernels. Each functor updates element (b, j) of one time step (row b of the
// step, hidden unit j) after the step's GEMM; a backend calls it for every
// element (Backend::for_each), a fused kernel may call it from its epilogue.
//
// Row b of a step continues row b of the previous step when b < carried, and
// starts from the initial state otherwise (layout.h, StepRows): PrevOrInit
// reads "the previous state of row b" from the right place.
#pragma once

#include "activation.h"
#include "numeric.h"

#include <cstdint>

namespace fastrnn {

// Rows of a 2-D buffer: element (r, c) at base[r * ld + c].
template <typename T>
struct Rows {
  T* base = nullptr;
  int64_t ld = 0;
  FASTRNN_HD T& operator()(int64_t r, int64_t c) const { return base[r * ld + c]; }
};

// The previous state of a step's rows: rows [0, carried) from the previous
// step (prev), the others from the initial state (init).
template <typename T>
struct PrevOrInit {
  Rows<const T> prev, init;
  int64_t carried = 0;
  // A select of the row's address, not of two loads: loops over j then keep
  // one pointer, and vectorise.
  FASTRNN_HD T operator()(int64_t b, int64_t j) const {
    const T* row = b < carried ? prev.base + b * prev.ld : init.base + b * init.ld;
    return row[j];
  }
};

// ---------------------------------------------------------------- Elman

// h = act(h): the step's rows hold P + h_{t-1} W_hh^T on entry.
template <typename T, Activation A>
struct ElmanForward {
  Rows<T> h;
  FASTRNN_HD void operator()(int64_t b, int64_t j) const {
    h(b, j) = store<T>(activate<A>(load<acc_type<T>>(h(b, j))));
  }
};

// dA = (dY + dh) * act'(h): dA holds dY + dh on entry.
template <typename T, Activation A>
struct ElmanBackward {
  Rows<T> dA;
  Rows<const T> h;
  FASTRNN_HD void operator()(int64_t b, int64_t j) const {
    using acc_t = acc_type<T>;
    dA(b, j) = store<T>(activation_grad<A>(load<acc_t>(dA(b, j)), load<acc_t>(h(b, j))));
  }
};

// ---------------------------------------------------------------- LSTM
// gates [rows, 4H]: i f g o, in torch's order.

// gates hold the pre-activations (X W_ih^T + b_ih + b_hh + h_{t-1} W_hh^T) on
// entry and the activated gates on exit; writes c_t and m_t = o tanh(c_t)
// (h_t itself without a projection).
template <typename T>
struct LstmForward {
  Rows<T> gates, c, m;
  PrevOrInit<T> c_prev;
  int64_t H;
  FASTRNN_HD void operator()(int64_t b, int64_t j) const {
    using acc_t = acc_type<T>;
    const acc_t i = sigmoid_acc(load<acc_t>(gates(b, j)));
    const acc_t f = sigmoid_acc(load<acc_t>(gates(b, H + j)));
    const acc_t g = tanh_acc(load<acc_t>(gates(b, 2 * H + j)));
    const acc_t o = sigmoid_acc(load<acc_t>(gates(b, 3 * H + j)));
    const acc_t ct = f * load<acc_t>(c_prev(b, j)) + i * g;
    gates(b, j) = store<T>(i);
    gates(b, H + j) = store<T>(f);
    gates(b, 2 * H + j) = store<T>(g);
    gates(b, 3 * H + j) = store<T>(o);
    c(b, j) = store<T>(ct);
    m(b, j) = store<T>(o * tanh_acc(ct));
  }
};

// gates hold the activated gates on entry and the pre-activation gradients
// dA on exit; dm is the gradient reaching m_t (h_t's, through W_hr with a
// projection); dc holds the gradient reaching c_t from later steps for rows
// [0, final_from) and takes dc_n for the rest (each sequence's last row), and
// receives the gradient of c_{t-1}.
template <typename T>
struct LstmBackward {
  Rows<T> gates, dc;
  Rows<const T> c, dm, dc_n;
  PrevOrInit<T> c_prev;
  int64_t H, final_from;
  FASTRNN_HD void operator()(int64_t b, int64_t j) const {
    using acc_t = acc_type<T>;
    const acc_t i = load<acc_t>(gates(b, j)), f = load<acc_t>(gates(b, H + j));
    const acc_t g = load<acc_t>(gates(b, 2 * H + j)), o = load<acc_t>(gates(b, 3 * H + j));
    const acc_t tc = tanh_acc(load<acc_t>(c(b, j)));
    const acc_t d_m = load<acc_t>(dm(b, j));
    const T* dc_row = b < final_from ? &dc(b, 0) : &dc_n(b, 0);
    const acc_t dc_in = load<acc_t>(dc_row[j]);
    const acc_t dct = dc_in + d_m * o * (acc_t(1) - tc * tc);
    gates(b, j) = store<T>(dct * g * i * (acc_t(1) - i));
    gates(b, H + j) = store<T>(dct * load<acc_t>(c_prev(b, j)) * f * (acc_t(1) - f));
    gates(b, 2 * H + j) = store<T>(dct * i * (acc_t(1) - g * g));
    gates(b, 3 * H + j) = store<T>(d_m * tc * o * (acc_t(1) - o));
    dc(b, j) = store<T>(dct * f);
  }
};

// ---------------------------------------------------------------- GRU
// gates [rows, 3H]: r z n, in torch's order.

// gates hold X W_ih^T + b_ih on entry and the activated r, z, n on exit; hg
// holds h_{t-1} W_hh^T + b_hh; writes hn = hg's n part (backward reads it) and h_t.
template <typename T>
struct GruForward {
  Rows<T> gates, hn, h;
  Rows<const T> hg;
  PrevOrInit<T> h_prev;
  int64_t H;
  FASTRNN_HD void operator()(int64_t b, int64_t j) const {
    using acc_t = acc_type<T>;
    const acc_t r = sigmoid_acc(load<acc_t>(gates(b, j)) + load<acc_t>(hg(b, j)));
    const acc_t z = sigmoid_acc(load<acc_t>(gates(b, H + j)) + load<acc_t>(hg(b, H + j)));
    const acc_t hn_j = load<acc_t>(hg(b, 2 * H + j));
    const acc_t n = tanh_acc(load<acc_t>(gates(b, 2 * H + j)) + r * hn_j);
    gates(b, j) = store<T>(r);
    gates(b, H + j) = store<T>(z);
    gates(b, 2 * H + j) = store<T>(n);
    hn(b, j) = store<T>(hn_j);
    h(b, j) = store<T>((acc_t(1) - z) * n + z * load<acc_t>(h_prev(b, j)));
  }
};

// gates hold r z n on entry and the gradients of the recurrent pre-activations
// [dA_r, dA_z, dA_hn] on exit (dA_hn: of h_{t-1} W_hn^T + b_hn); hn holds the
// forward's hn on entry and dA_n (of the input-side n pre-activation) on exit.
// The direct part of dh_{t-1}, dh z, is added to the previous step's rows
// (prev_dh, for rows [0, carried)) or written to grad_h0 (the others).
template <typename T>
struct GruBackward {
  Rows<T> gates, hn, prev_dh, grad_h0;
  Rows<const T> dh;
  PrevOrInit<T> h_prev;
  int64_t H, carried;
  FASTRNN_HD void operator()(int64_t b, int64_t j) const {
    using acc_t = acc_type<T>;
    const acc_t r = load<acc_t>(gates(b, j)), z = load<acc_t>(gates(b, H + j));
    const acc_t n = load<acc_t>(gates(b, 2 * H + j));
    const acc_t d = load<acc_t>(dh(b, j));
    const acc_t dan = d * (acc_t(1) - z) * (acc_t(1) - n * n);
    gates(b, j) = store<T>(dan * load<acc_t>(hn(b, j)) * r * (acc_t(1) - r));
    gates(b, H + j) = store<T>(d * (load<acc_t>(h_prev(b, j)) - n) * z * (acc_t(1) - z));
    gates(b, 2 * H + j) = store<T>(dan * r);
    hn(b, j) = store<T>(dan);
    // Accumulated into the previous step's rows, written into grad_h0 (whose
    // old contents are discarded by the select, not multiplied by 0).
    T* dst = b < carried ? &prev_dh(b, 0) : &grad_h0(b, 0);
    const acc_t before = load<acc_t>(dst[j]);
    dst[j] = store<T>((b < carried ? before : acc_t(0)) + d * z);
  }
};

}  // namespace fastrnn
