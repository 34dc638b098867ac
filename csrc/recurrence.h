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
  Tensor out;                          // [N, H]  P (with both biases) on entry, h on exit
  Tensor h0;                           // [B, H]  initial state
  Tensor h_n;                          // [B, H]  written: each sequence's last h
  Tensor w_hh;                         // [H, H]  contiguous, W[j][k]: unit j reads unit k
};

// dA_t = (dY_t + dh_t) * act'(h_t), dh_{t-1} = dA_t W_hh, visiting the steps
// in the opposite order to the forward.
struct BackwardJob {
  const SequenceLayout* layout;
  bool reverse;                        // the forward visited t = T-1 .. 0
  const std::vector<StepRows>* steps;  // steps_in_order(*layout, reverse): the forward's order
  Tensor dA;                           // [N, H]  dY on entry, dA on exit
  Tensor out;                          // [N, H]  the forward's h
  Tensor dh_n;                         // [B, H]  gradient reaching h_n (added on each
                                       //         sequence's last row)
  Tensor grad_hx;                      // [B, H]  written: dh_{-1}, the gradient of h0
  Tensor w_hh;                         // [H, H]  contiguous
};

// Row ranges of a step whose h is a sequence's last (read by no later step):
// rows [final_from(steps, i), steps[i].count) of the i-th visited step.
inline int64_t final_from(const std::vector<StepRows>& steps, size_t i) {
  return i + 1 < steps.size() ? steps[i + 1].carried : 0;
}

}  // namespace fastrnn
