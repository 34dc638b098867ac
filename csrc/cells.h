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

// dst = src over [T, B, W] (rows r = t * B + b) with unit column strides and
// each side's step and batch strides: a padded layout's steps, or rows (B = 1).
template <typename T>
struct CopySteps {
  T* dst;
  const T* src;
  int64_t batch, dst_t, dst_b, src_t, src_b;
  FASTRNN_HD void operator()(int64_t r, int64_t j) const {
    const int64_t t = batch == 1 ? r : r / batch, b = batch == 1 ? 0 : r % batch;
    dst[t * dst_t + b * dst_b + j] = src[t * src_t + b * src_b + j];
  }
};

// out = a + b over one row (b_ih + b_hh), in acc_type and rounded once, as
// torch's add rounds.
template <typename T>
struct AddRow {
  T* out;
  const T* a;
  const T* b;
  FASTRNN_HD void operator()(int64_t, int64_t j) const {
    out[j] = store<T>(load<acc_type<T>>(a[j]) + load<acc_type<T>>(b[j]));
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

// ---------------------------------------------------------------- the cells' math
// One element function per cell and direction: the whole pointwise math, on a
// value of the accumulation type (the functors below, for CPU loops and CUDA
// kernels) or on a vector of them (the fused CPU kernels' epilogues,
// csrc/cpu/tile_kernels.h). S is the scalar type (acc_t, or the vector's
// lane type), Act supplies the activations in place (ScalarAct here; the CPU
// kernels bring their vector ones). Values are passed by reference: a wide
// vector must not cross a function boundary by value (csrc/cpu/simd.h).

struct ScalarAct {
  template <typename A>
  static FASTRNN_HD void sigmoid(A& v) { v = sigmoid_acc(v); }
  template <typename A>
  static FASTRNN_HD void tanh(A& v) { v = tanh_acc(v); }
};

// LSTM: i, f, g, o hold the gates' pre-activations on entry and the activated
// gates on exit; writes c_t and m_t = o tanh(c_t).
template <class Act, typename S, typename V>
FASTRNN_HD void lstm_forward_cell(V& i, V& f, V& g, V& o, const V& c_prev, V& c, V& m) {
  Act::sigmoid(i);
  Act::sigmoid(f);
  Act::tanh(g);
  Act::sigmoid(o);
  c = f * c_prev + i * g;
  m = c;
  Act::tanh(m);
  m = o * m;
}

// LSTM: the activated gates in, their pre-activation gradients dA out (in
// place); dm reaches m_t, dc_in reaches c_t from later steps (or dc_n);
// writes dc_prev, the gradient reaching c_{t-1}.
template <class Act, typename S, typename V>
FASTRNN_HD void lstm_backward_cell(V& i, V& f, V& g, V& o, const V& c, const V& c_prev,
                                   const V& dm, const V& dc_in, V& dc_prev) {
  V tc = c;
  Act::tanh(tc);
  const V dct = dc_in + dm * o * (S(1) - tc * tc);
  const V di = dct * g * i * (S(1) - i);
  const V df = dct * c_prev * f * (S(1) - f);
  const V dg = dct * i * (S(1) - g * g);
  const V d_o = dm * tc * o * (S(1) - o);
  dc_prev = dct * f;
  i = di;
  f = df;
  g = dg;
  o = d_o;
}

// GRU: r, z, n hold X W_ih^T + b_ih's parts on entry and the activated gates
// on exit; hg_r, hg_z, hn: h_{t-1} W_hh^T + b_hh's parts; writes h_t.
template <class Act, typename S, typename V>
FASTRNN_HD void gru_forward_cell(V& r, V& z, V& n, const V& hg_r, const V& hg_z, const V& hn,
                                 const V& h_prev, V& h) {
  r = r + hg_r;
  Act::sigmoid(r);
  z = z + hg_z;
  Act::sigmoid(z);
  n = n + r * hn;
  Act::tanh(n);
  h = (S(1) - z) * n + z * h_prev;
}

// GRU: r z n (activated) and hn in, d the whole gradient of h_t; r z n become
// [dA_r, dA_z, dA_hn] (of the recurrent pre-activations; dA_hn of
// h_{t-1} W_hn^T + b_hn), hn becomes dA_n (of the input-side n
// pre-activation); dh_direct = d z, the part of dh_{t-1} that skips W_hh.
template <class Act, typename S, typename V>
FASTRNN_HD void gru_backward_cell(V& r, V& z, V& n, V& hn, const V& d, const V& h_prev,
                                  V& dh_direct) {
  const V dan = d * (S(1) - z) * (S(1) - n * n);
  const V dar = dan * hn * r * (S(1) - r);
  const V daz = d * (h_prev - n) * z * (S(1) - z);
  dh_direct = d * z;
  n = dan * r;
  r = dar;
  z = daz;
  hn = dan;
}

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
    acc_t i = load<acc_t>(gates(b, j)), f = load<acc_t>(gates(b, H + j));
    acc_t g = load<acc_t>(gates(b, 2 * H + j)), o = load<acc_t>(gates(b, 3 * H + j));
    const acc_t cp = load<acc_t>(c_prev(b, j));
    acc_t ct, mt;
    lstm_forward_cell<ScalarAct, acc_t>(i, f, g, o, cp, ct, mt);
    gates(b, j) = store<T>(i);
    gates(b, H + j) = store<T>(f);
    gates(b, 2 * H + j) = store<T>(g);
    gates(b, 3 * H + j) = store<T>(o);
    c(b, j) = store<T>(ct);
    m(b, j) = store<T>(mt);
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
    acc_t i = load<acc_t>(gates(b, j)), f = load<acc_t>(gates(b, H + j));
    acc_t g = load<acc_t>(gates(b, 2 * H + j)), o = load<acc_t>(gates(b, 3 * H + j));
    const T* dc_row = b < final_from ? &dc(b, 0) : &dc_n(b, 0);
    const acc_t ct = load<acc_t>(c(b, j)), cp = load<acc_t>(c_prev(b, j));
    const acc_t d_m = load<acc_t>(dm(b, j)), dc_in = load<acc_t>(dc_row[j]);
    acc_t dc_prev;
    lstm_backward_cell<ScalarAct, acc_t>(i, f, g, o, ct, cp, d_m, dc_in, dc_prev);
    gates(b, j) = store<T>(i);
    gates(b, H + j) = store<T>(f);
    gates(b, 2 * H + j) = store<T>(g);
    gates(b, 3 * H + j) = store<T>(o);
    dc(b, j) = store<T>(dc_prev);
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
    acc_t r = load<acc_t>(gates(b, j)), z = load<acc_t>(gates(b, H + j));
    acc_t n = load<acc_t>(gates(b, 2 * H + j));
    const acc_t hg_r = load<acc_t>(hg(b, j)), hg_z = load<acc_t>(hg(b, H + j));
    const acc_t hn_j = load<acc_t>(hg(b, 2 * H + j)), hp = load<acc_t>(h_prev(b, j));
    acc_t ht;
    gru_forward_cell<ScalarAct, acc_t>(r, z, n, hg_r, hg_z, hn_j, hp, ht);
    gates(b, j) = store<T>(r);
    gates(b, H + j) = store<T>(z);
    gates(b, 2 * H + j) = store<T>(n);
    hn(b, j) = store<T>(hn_j);
    h(b, j) = store<T>(ht);
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
    acc_t r = load<acc_t>(gates(b, j)), z = load<acc_t>(gates(b, H + j));
    acc_t n = load<acc_t>(gates(b, 2 * H + j)), hn_j = load<acc_t>(hn(b, j));
    const acc_t d = load<acc_t>(dh(b, j)), hp = load<acc_t>(h_prev(b, j));
    acc_t direct;
    gru_backward_cell<ScalarAct, acc_t>(r, z, n, hn_j, d, hp, direct);
    gates(b, j) = store<T>(r);
    gates(b, H + j) = store<T>(z);
    gates(b, 2 * H + j) = store<T>(n);
    hn(b, j) = store<T>(hn_j);
    // Accumulated into the previous step's rows, written into grad_h0 (whose
    // old contents are discarded by the select, not multiplied by 0).
    T* dst = b < carried ? &prev_dh(b, 0) : &grad_h0(b, 0);
    const acc_t before = load<acc_t>(dst[j]);
    dst[j] = store<T>((b < carried ? before : acc_t(0)) + direct);
  }
};

}  // namespace fastrnn
