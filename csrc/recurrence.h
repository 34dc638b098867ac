// fastrnn: the sequential part of one layer and direction, as the drivers
// hand it to a backend. Everything around it (input projections, weight
// gradients, dropout) is a few large GEMMs or pointwise ops; this is the part
// that backends fuse (csrc/cpu, csrc/cuda) and that stepwise.h runs with one
// GEMM per step where they do not.
//
// Views are 2-D with unit column stride and any row stride (a direction's
// columns of a bidirectional layer's [N, 2H] output have row stride 2H).
#pragma once

#include "layout.h"
#include "ops.h"

#include <vector>

namespace fastrnn {

// h_t = act(P_t + h_{t-1} W_hh^T) over the whole sequence.
struct ForwardJob {
  const SequenceLayout* layout;
  bool reverse;                        // visits t = T-1 .. 0
  const std::vector<StepRows>* steps;  // steps_in_order(*layout, reverse)
  Tensor out;                          // [N, H]  P (with both biases) on entry (unless x is
                                       //         defined), h on exit
  Tensor h0;                           // [B, H]  initial state
  Tensor h_n;                          // [B, H]  written: each sequence's last h
  Tensor w_hh;                         // [H, H]  contiguous, W[j][k]: unit j reads unit k
  // Defined when the backend runs the input projection inside the recurrence
  // (stack.h: input_projection_inside); out then holds nothing on entry.
  Tensor x;                            // [N, I]  the layer's input: rows with one stride, or
                                       //         [T, B, I] (a padded layout's steps, any
                                       //         strides); unit column stride
  Tensor w_ih;                         // [H, I]  contiguous
  Tensor bias;                         // [H]     b_ih + b_hh (or the one there is), contiguous;
                                       //         or undefined
};

// dA_t = (dY_t + dh_t) * act'(h_t), dh_{t-1} = dA_t W_hh, visiting the steps
// in the opposite order to the forward.
struct BackwardJob {
  const SequenceLayout* layout;
  bool reverse;                        // the forward visited t = T-1 .. 0
  const std::vector<StepRows>* steps;  // steps_in_order(*layout, reverse): the forward's order
  Tensor dA;                           // [N, H]  dY on entry (unless dY is given), dA on exit
  Tensor out;                          // [N, H]  the forward's h
  Tensor dh_n;                         // [B, H]  gradient reaching h_n (added on each
                                       //         sequence's last row)
  Tensor grad_hx;                      // [B, H]  written: dh_{-1}, the gradient of h0
  Tensor w_hh;                         // [H, H]  contiguous
  Tensor dY;                           // [N, H], [T, B, H] (a padded layout's steps, any
                                       //         strides) or undefined: dY where it lies, read
                                       //         only; dA then holds nothing on entry
};

// LSTM (cells.h): the recurrence of one layer and direction.
struct LstmForwardJob {
  const SequenceLayout* layout;
  bool reverse;
  const std::vector<StepRows>* steps;
  Tensor gates;   // [N, 4H]  X W_ih^T + b_ih + b_hh on entry (unless x is defined), activated
                  //          i f g o on exit
  Tensor c;       // [N, H]   written: c_t
  Tensor m;       // [N, H]   written: o tanh(c_t); the output itself without a projection
  Tensor out;     // [N, R]   written: h_t (m W_hr^T with a projection)
  Tensor h0, c0;  // [B, R], [B, H]
  Tensor h_n, c_n;  // [B, R], [B, H]  written
  Tensor w_hh;    // [4H, R]
  Tensor w_hr;    // [R, H]   the projection, or undefined
  // Defined when the backend runs the input projection inside the recurrence
  // (stack.h: input_projection_inside); gates then hold nothing on entry.
  Tensor x;       // [N, I]   the layer's input, as ForwardJob's
  Tensor w_ih;    // [4H, I]  contiguous
  Tensor bias;    // [4H]     b_ih + b_hh (or the one there is), contiguous; or undefined
  // A forward without a reserve, its projection inside: gates and c are
  // [2B, *] rings, the visiting order's step p at rows (p % 2) * B on.
  bool ring = false;
};

struct LstmBackwardJob {
  const SequenceLayout* layout;
  bool reverse;
  const std::vector<StepRows>* steps;
  Tensor dh;        // [N, R]  dY on entry, the whole gradient of each h_t on exit
  Tensor gates;     // [N, 4H] activated gates on entry (unless saved_gates is given), dA
                    //         (pre-activation gradients) on exit
  Tensor c, m;      // [N, H]  the forward's (m: with a projection only)
  Tensor c0;        // [B, H]
  Tensor dh_n, dc_n;       // [B, R], [B, H]
  Tensor grad_hx, grad_cx;  // [B, R], [B, H]  written
  Tensor w_hh, w_hr;
  Tensor saved_gates;  // [N, 4H] or undefined: the activated gates, read only (the
                       //         reserve); gates then hold nothing on entry
};

// GRU (cells.h): the recurrence of one layer and direction.
struct GruForwardJob {
  const SequenceLayout* layout;
  bool reverse;
  const std::vector<StepRows>* steps;
  Tensor gates;  // [N, 3H]  X W_ih^T + b_ih on entry (unless x is defined), activated r z n
                 //          on exit
  Tensor hn;     // [N, H]   written: (h_{t-1} W_hh^T)_n + b_hn
  Tensor out;    // [N, H]   written: h_t
  Tensor h0;     // [B, H]
  Tensor h_n;    // [B, H]   written
  Tensor w_hh;   // [3H, H]
  Tensor b_hh;   // [3H] or undefined
  // The input projection inside the recurrence, as LstmForwardJob's (bias: b_ih).
  Tensor x, w_ih, bias;
  // As LstmForwardJob's: gates and hn are [2B, *] rings.
  bool ring = false;
};

struct GruBackwardJob {
  const SequenceLayout* layout;
  bool reverse;
  const std::vector<StepRows>* steps;
  Tensor dh;     // [N, H]  dY on entry, the whole gradient of each h_t on exit
  Tensor gates;  // [N, 3H] r z n on entry (unless saved), [dA_r, dA_z, dA_hn] on exit (cells.h)
  Tensor hn;     // [N, H]  the forward's hn on entry (unless saved), dA_n on exit
  Tensor out;    // [N, H]  the forward's h_t
  Tensor h0;     // [B, H]
  Tensor dh_n;   // [B, H]
  Tensor grad_hx;  // [B, H] written
  Tensor w_hh;
  Tensor saved_gates, saved_hn;  // or undefined: r z n and hn, read only (the reserve);
                                 // gates and hn then hold nothing on entry
};

// Row ranges of a step whose h is a sequence's last (read by no later step):
// rows [final_from(steps, i), steps[i].count) of the i-th visited step.
inline int64_t final_from(const std::vector<StepRows>& steps, size_t i) {
  return i + 1 < steps.size() ? steps[i + 1].carried : 0;
}

// steps with their rows in a two-step ring of 2 * batch rows (LstmForwardJob::ring):
// the p-th step visited at (p % 2) * batch, its previous step at the other half
// (the previous step's rows carried into a step are its first ones).
inline std::vector<StepRows> two_step_ring(const std::vector<StepRows>& steps, int64_t batch) {
  std::vector<StepRows> ring(steps);
  for (size_t p = 0; p < ring.size(); ++p) {
    ring[p].begin = static_cast<int64_t>(p % 2) * batch;
    ring[p].prev_begin = ring[p].carried > 0 ? static_cast<int64_t>((p + 1) % 2) * batch : 0;
  }
  return ring;
}

}  // namespace fastrnn
