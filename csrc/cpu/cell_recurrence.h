// fastrnn CPU: the fused LSTM and GRU recurrences, forward and backward, on
// the Elman kernel's machinery (recurrence.h: slots, plan, barriers;
// tile_kernels.h: packed panels, register tiles). Compiled in cells_cpu.cpp.
//
//   forward   one product per step, h_{t-1} W_hh^T over all G gates, with W_hh
//             packed gate-interleaved by unit (pack_gate_panels): a panel's
//             columns are the G gates of `lanes` units, so a tile holds every
//             gate of its units and its epilogue runs the cell's forward
//             (cells.h's element function on vectors) and writes the gates, c
//             and h (LSTM) or the gates, hn and h (GRU, b_hh added there).
//             With the input projection inside (the panels then hold W_ih's
//             rows too), the LSTM's product runs over [x_t, h_{t-1}] in one
//             sum; the GRU's runs over x_t first and writes X W_ih^T + b_ih
//             into the gates, then over h_{t-1}.
//   backward  one product per step, dA_t W_hh (K = G*H) over units of h_{t-1},
//             with an epilogue that forms dh_{t-1} = dY_{t-1} + that product
//             for its units and then runs step t-1's cell gradient for those
//             same units (LSTM: dA of the 4 gates and dc_{t-2}; GRU: dA_r,
//             dA_z, dA_hn, dA_n and the direct term dh_{t-1} z into
//             dh_{t-2}). Rows that no product feeds (each sequence's last
//             row: dh_n and dc_n) get the cell gradient on their own.
//
// A slot owns its rows and units of every step, in both passes: c, the
// gradient reaching c (a [B, H] buffer of the call) and GRU's direct term are
// only ever touched by the slot that owns their units, so the only meeting
// point is the one Elman has, a barrier per step for column splits.
//
// Buffers on exit are those of recurrence.h's LstmBackwardJob / GruBackwardJob
// (the gates hold dA; GRU's hn holds dA_n; dh the whole gradient of each h_t),
// which the driver turns into the weight gradients.
//
// Types: float and double (double's sigmoid and tanh per lane, as the
// per-step path's); bfloat16 and half calls come as float32 (in_float.h), a
// bfloat16 call's products on bfloat16 pairs where the CPU has AVX512-BF16
// (bf16_pairs.h), on AMX tiles where it has AMX (amx_tiles.h). Not taken
// (supports() false; the caller steps with one GEMM per step): LSTM with
// proj_size (the caller's test).
// Results are the same bits for any thread count and split, as Elman's.
#pragma once

#include "../layout.h"

#include <cstdint>
#include <span>

namespace fastrnn::cpu {

// Row-major views: element (i, j) of a buffer at p[i * ld + j].

template <typename T>
struct LstmForwardRecurrence {
  std::span<const StepRows> steps;  // [T] visiting order
  int64_t hidden = 0;               // H
  T* gates = nullptr;               // [N, ld_gates], columns [0, 4H): P (both biases) on
  int64_t ld_gates = 0;             //   entry, the activated i f g o on exit
  T* c = nullptr;                   // [N, ld_c]: c_t, written
  int64_t ld_c = 0;
  T* out = nullptr;                 // [N, ld_out]: h_t, written
  int64_t ld_out = 0;
  const T* h0 = nullptr;            // [B, ld_h0]
  int64_t ld_h0 = 0;
  const T* c0 = nullptr;            // [B, ld_c0]
  int64_t ld_c0 = 0;
  const T* w_hh = nullptr;          // [4H, H] contiguous
  // The input projection inside the recurrence, where x is not null (the
  // gates then hold nothing on entry): each step's product runs over
  // K = I + H, [x_t, h_{t-1}] times [W_ih; W_hh]^T, and the epilogue adds the bias.
  const T* x = nullptr;             // [N, ld_x], columns [0, I), or steps as ForwardRecurrence's
  int64_t ld_x = 0;
  int64_t ld_x_step = 0;
  int64_t input = 0;                // I
  const T* w_ih = nullptr;          // [4H, I] contiguous
  const T* bias = nullptr;          // [4H] (b_ih + b_hh) or null
  // Where each step's rows of gates and c are (begin, prev_begin), where not
  // steps' own: a two-step ring (LstmForwardJob::ring); else empty.
  std::span<const StepRows> state_steps;
  bool h0_zero = false;             // every row of h0 is zero: as ForwardRecurrence's
};

template <typename T>
struct LstmBackwardRecurrence {
  std::span<const StepRows> steps;  // [T] the forward's visiting order (walked in reverse)
  int64_t hidden = 0;
  T* dh = nullptr;                  // [N, ld_dh]: dY, plus dh_n on each sequence's last row,
  int64_t ld_dh = 0;                //   on entry; the whole gradient of each h_t on exit
  T* gates = nullptr;               // [N, ld_gates]: the activated gates on entry, dA on exit
  int64_t ld_gates = 0;
  const T* c = nullptr;             // [N, ld_c]: the forward's c_t
  int64_t ld_c = 0;
  const T* c0 = nullptr;            // [B, ld_c0]
  int64_t ld_c0 = 0;
  const T* dc_n = nullptr;          // [B, ld_dc_n]: the gradient reaching c_n
  int64_t ld_dc_n = 0;
  T* grad_h0 = nullptr;             // [B, ld_grad_h0]: written
  int64_t ld_grad_h0 = 0;
  T* grad_c0 = nullptr;             // [B, ld_grad_c0]: written
  int64_t ld_grad_c0 = 0;
  const T* w_hh = nullptr;          // [4H, H] contiguous
  const T* saved_gates = nullptr;   // [N, ld_saved_gates] or null: the activated gates, read
  int64_t ld_saved_gates = 0;       //   here; gates is then written only
};

template <typename T>
struct GruForwardRecurrence {
  std::span<const StepRows> steps;
  int64_t hidden = 0;
  T* gates = nullptr;               // [N, ld_gates], columns [0, 3H): X W_ih^T + b_ih on
  int64_t ld_gates = 0;             //   entry (unless x is set), the activated r z n on exit
  T* hn = nullptr;                  // [N, ld_hn]: (h_{t-1} W_hh^T)_n + b_hn, written
  int64_t ld_hn = 0;
  T* out = nullptr;                 // [N, ld_out]: h_t, written
  int64_t ld_out = 0;
  const T* h0 = nullptr;            // [B, ld_h0]
  int64_t ld_h0 = 0;
  const T* w_hh = nullptr;          // [3H, H] contiguous
  const T* b_hh = nullptr;          // [3H] contiguous, or null
  // The input projection inside, as LstmForwardRecurrence's: each step's
  // product first runs over x_t alone and writes X W_ih^T + b_ih into the
  // gates (the cell keeps it apart from the recurrent sums: r scales only
  // the latter's n), then over h_{t-1}.
  const T* x = nullptr;
  int64_t ld_x = 0;
  int64_t ld_x_step = 0;
  int64_t input = 0;
  const T* w_ih = nullptr;          // [3H, I] contiguous
  const T* bias = nullptr;          // [3H] b_ih or null
  std::span<const StepRows> state_steps;  // as LstmForwardRecurrence's (gates and hn)
  bool h0_zero = false;
};

template <typename T>
struct GruBackwardRecurrence {
  std::span<const StepRows> steps;
  int64_t hidden = 0;
  T* dh = nullptr;                  // [N, ld_dh]: as LSTM's
  int64_t ld_dh = 0;
  T* gates = nullptr;               // [N, ld_gates]: r z n on entry, [dA_r, dA_z, dA_hn] on exit
  int64_t ld_gates = 0;
  T* hn = nullptr;                  // [N, ld_hn]: the forward's hn on entry, dA_n on exit
  int64_t ld_hn = 0;
  const T* out = nullptr;           // [N, ld_out]: the forward's h_t
  int64_t ld_out = 0;
  const T* h0 = nullptr;            // [B, ld_h0]
  int64_t ld_h0 = 0;
  T* grad_h0 = nullptr;             // [B, ld_grad_h0]: written
  int64_t ld_grad_h0 = 0;
  const T* w_hh = nullptr;          // [3H, H] contiguous
  const T* saved_gates = nullptr;   // [N, ld_saved_gates], [N, ld_saved_hn] or null: r z n
  int64_t ld_saved_gates = 0;       //   and hn, read here; gates and hn are then written only
  const T* saved_hn = nullptr;
  int64_t ld_saved_hn = 0;
};

// Whether the fused cell kernels take this dtype and hidden size (and
// FASTRNN_CPU_FUSED is not 0).
template <typename T>
bool cell_supports(int64_t hidden);

// Each runs its independent recurrences (e.g. both directions of a layer) in
// one parallel region; false (nothing done) where cell_supports() is not met.
template <typename T>
bool forward_recurrences(std::span<const LstmForwardRecurrence<T>> jobs);
template <typename T>
bool backward_recurrences(std::span<const LstmBackwardRecurrence<T>> jobs);
template <typename T>
bool forward_recurrences(std::span<const GruForwardRecurrence<T>> jobs);
template <typename T>
bool backward_recurrences(std::span<const GruBackwardRecurrence<T>> jobs);

}  // namespace fastrnn::cpu
