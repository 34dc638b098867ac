// fastrnn: where each time step's rows live, for padded and packed sequences.
// Plain C++ (no torch types), shared by the drivers, the CPU recurrence
// kernels and the CUDA host code.
//
// A sequence is stored as N rows of a 2-D [N, *] tensor, time step after time
// step. Padded [T, B, *]: step t is rows [t*B, (t+1)*B). Packed (torch
// PackedSequence.data with batch_sizes [T], non-increasing): step t is the
// batch_sizes[t] rows at offset sum(batch_sizes[:t]); row b of every step
// belongs to sequence b, so a step's rows continue the first rows of the
// step before it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fastrnn {

struct SequenceLayout {
  int64_t steps = 0;                 // T
  int64_t batch = 0;                 // B (max batch)
  int64_t rows = 0;                  // N
  std::vector<int64_t> batch_sizes;  // [T]
  std::vector<int64_t> offsets;      // [T], first row of each step
  bool packed = false;

  // Rows of step t (0 outside the sequence).
  int64_t batch_at(int64_t t) const {
    return (t < 0 || t >= steps) ? 0 : batch_sizes[t];
  }

  static SequenceLayout padded(int64_t steps, int64_t batch) {
    SequenceLayout L;
    L.steps = steps;
    L.batch = batch;
    L.rows = steps * batch;
    L.batch_sizes.assign(steps, batch);
    L.fill_offsets();
    return L;
  }

  // batch_sizes already validated (positive, non-increasing).
  static SequenceLayout packed_from(const int64_t* sizes, int64_t steps, int64_t batch_if_empty) {
    SequenceLayout L;
    L.packed = true;
    L.steps = steps;
    L.batch_sizes.assign(sizes, sizes + steps);
    L.batch = steps ? sizes[0] : batch_if_empty;
    L.fill_offsets();
    return L;
  }

  void fill_offsets() {
    offsets.resize(steps);
    int64_t off = 0;
    for (int64_t t = 0; t < steps; ++t) {
      offsets[t] = off;
      off += batch_sizes[t];
    }
    rows = off;
  }
};

// Rows of step t that no later step reads: their h is the sequence's h_n.
// (Rows [first_final_row, batch_at(t)) of step t.)
inline int64_t first_final_row(const SequenceLayout& L, int64_t t, bool reverse) {
  return std::min(L.batch_at(t), L.batch_at(reverse ? t - 1 : t + 1));
}

// One step of the recurrence: its rows, and where their h_{t-1} comes from.
// Rows [0, carried) continue from the previous step's first `carried` rows;
// rows [carried, count) start from the same rows of hx (a packed sequence in
// the reverse direction starts there).
struct StepRows {
  int64_t begin;       // first row of step t in the flattened [N, *] layout
  int64_t count;       // rows of step t
  int64_t carried;     // rows fed by the previous step
  int64_t prev_begin;  // first row of the previous step (0 when carried == 0)
  int64_t t;           // the step's time index
};

// Every step, in the order the forward recurrence visits them (t = 0 .. T-1,
// or T-1 .. 0 when reverse). Backward visits them in the opposite order.
inline std::vector<StepRows> steps_in_order(const SequenceLayout& L, bool reverse) {
  std::vector<StepRows> steps;
  steps.reserve(L.steps);
  for (int64_t i = 0; i < L.steps; ++i) {
    const int64_t t = reverse ? L.steps - 1 - i : i;
    const int64_t p = reverse ? t + 1 : t - 1;
    const int64_t carried = std::min(L.batch_at(t), L.batch_at(p));
    steps.push_back({L.offsets[t], L.batch_at(t), carried, carried > 0 ? L.offsets[p] : 0, t});
  }
  return steps;
}

// One block of h_{t-1} rows: rows [dst, dst + count) of the flattened output
// read h_{t-1} from rows [src, src + count) of `from_hx ? hx : output`.
struct PrevRows {
  int64_t dst, src, count;
  bool from_hx;
};

// Every (h_t row <- h_{t-1} row) pairing of the sequence, in row order of the
// output, with contiguous runs merged (a padded sequence gives two).
inline std::vector<PrevRows> prev_row_blocks(const SequenceLayout& L, bool reverse) {
  std::vector<PrevRows> blocks;
  auto push = [&](PrevRows b) {
    if (b.count == 0) return;
    if (!blocks.empty()) {
      PrevRows& last = blocks.back();
      if (last.from_hx == b.from_hx && last.dst + last.count == b.dst &&
          last.src + last.count == b.src) {
        last.count += b.count;
        return;
      }
    }
    blocks.push_back(b);
  };
  std::vector<StepRows> steps = steps_in_order(L, reverse);
  if (reverse) std::reverse(steps.begin(), steps.end());  // row order
  for (const StepRows& st : steps) {
    push({st.begin, st.prev_begin, st.carried, false});
    push({st.begin + st.carried, st.carried, st.count - st.carried, true});
  }
  return blocks;
}

}  // namespace fastrnn
