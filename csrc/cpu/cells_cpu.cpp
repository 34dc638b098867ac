// fastrnn CPU: the fused LSTM and GRU recurrences (cell_recurrence.h says
// what they compute): their tile kernels per ISA, and the runners that lay
// the jobs out on recurrence.h's slots. A translation unit of its own, so
// that it compiles beside backend.cpp.
#include "cell_recurrence.h"

#include "recurrence.h"

#include <algorithm>
#include <cstdlib>
#include <type_traits>
#include <vector>

namespace fastrnn::cpu {
namespace {

// The kernels of one ISA for one dtype. Cells are indexed 0 = LSTM, 1 = GRU.
template <typename T>
struct CellKernels {
  int lanes;      // units per forward panel (one vector)
  int mr_fwd[2];  // forward rows per tile at most
  int nr, mr;     // backward: columns per panel, rows per tile at most
  void (*forward[2])(const StepTask<T>&);
  void (*backward[2])(const StepTask<T>&);
  void (*grad_rows[2])(const CellStep<T>&);
  // A last panel of at most half a vector runs on half vectors, forward and
  // backward, and is packed so (TileKernel::kHalfTail).
  bool half_tail;
  // forward and backward on bfloat16 pairs (bf16_pairs.h): float32 on CPUs
  // with AVX512-BF16, else null.
  void (*forward_pairs[2])(const StepTask<T>&) = {nullptr, nullptr};
  void (*backward_pairs[2])(const StepTask<T>&) = {nullptr, nullptr};
};

// Tile shapes, (lanes, vectors per panel row, rows per tile) per ISA, sized
// to the register file as Elman's (tile_kernels.h): the forward's panels
// hold one vector per gate. AVX-512 (32 registers): LSTM 6 x 4 and GRU 8 x 3
// accumulators, backward 8 x 2. AVX2 (16): LSTM 3 x 4, GRU 4 x 3, backward
// 6 x 2. Baseline (16 registers, no FMA: products need temporaries): 2 x 4,
// 2 x 3, 4 x 2.
#define FASTRNN_CELL_KERNELS(ISA, ATTR, BYTES, MR_LSTM, MR_GRU, MR_BWD)                        \
  template <typename T>                                                                        \
  using Lstm_##ISA = TileKernel<T, BYTES / sizeof(T), 4, MR_LSTM>;                             \
  template <typename T>                                                                        \
  using Gru_##ISA = TileKernel<T, BYTES / sizeof(T), 3, MR_GRU>;                               \
  template <typename T>                                                                        \
  using Bwd_##ISA = TileKernel<T, BYTES / sizeof(T), 2, MR_BWD>;                               \
  template <typename T>                                                                        \
  ATTR void lstm_forward_##ISA(const StepTask<T>& t) {                                         \
    Lstm_##ISA<T>::template step<Epilogue::LstmForward>(t);                                    \
  }                                                                                            \
  template <typename T>                                                                        \
  ATTR void gru_forward_##ISA(const StepTask<T>& t) {                                          \
    Gru_##ISA<T>::template step<Epilogue::GruForward>(t);                                      \
  }                                                                                            \
  template <typename T>                                                                        \
  ATTR void lstm_backward_##ISA(const StepTask<T>& t) {                                        \
    Bwd_##ISA<T>::template step<Epilogue::LstmBackward>(t);                                    \
  }                                                                                            \
  template <typename T>                                                                        \
  ATTR void gru_backward_##ISA(const StepTask<T>& t) {                                         \
    Bwd_##ISA<T>::template step<Epilogue::GruBackward>(t);                                     \
  }                                                                                            \
  template <typename T>                                                                        \
  ATTR void lstm_grad_rows_##ISA(const CellStep<T>& c) {                                       \
    Bwd_##ISA<T>::template cell_grad_rows<Epilogue::LstmBackward>(c);                          \
  }                                                                                            \
  template <typename T>                                                                        \
  ATTR void gru_grad_rows_##ISA(const CellStep<T>& c) {                                        \
    Bwd_##ISA<T>::template cell_grad_rows<Epilogue::GruBackward>(c);                           \
  }                                                                                            \
  template <typename T>                                                                        \
  CellKernels<T> kernels_##ISA() {                                                             \
    return {BYTES / static_cast<int>(sizeof(T)),                                               \
            {MR_LSTM, MR_GRU},                                                                 \
            Bwd_##ISA<T>::kNR,                                                                 \
            MR_BWD,                                                                            \
            {lstm_forward_##ISA<T>, gru_forward_##ISA<T>},                                     \
            {lstm_backward_##ISA<T>, gru_backward_##ISA<T>},                                   \
            {lstm_grad_rows_##ISA<T>, gru_grad_rows_##ISA<T>},                                 \
            Lstm_##ISA<T>::template kHalfTail<false>};                                        \
  }

#define FASTRNN_NO_TARGET
FASTRNN_CELL_KERNELS(baseline, FASTRNN_NO_TARGET, 16, 2, 2, 4)
#if FASTRNN_X86_DISPATCH
FASTRNN_CELL_KERNELS(avx2, FASTRNN_TARGET_AVX2, 32, 3, 4, 6)
FASTRNN_CELL_KERNELS(avx512, FASTRNN_TARGET_AVX512, 64, 6, 8, 8)
#endif

#if FASTRNN_BF16_DISPATCH
FASTRNN_TARGET_AVX512_BF16 void lstm_forward_pairs(const StepTask<float>& t) {
  Lstm_avx512<float>::step<Epilogue::LstmForward, true>(t);
}
FASTRNN_TARGET_AVX512_BF16 void gru_forward_pairs(const StepTask<float>& t) {
  Gru_avx512<float>::step<Epilogue::GruForward, true>(t);
}
FASTRNN_TARGET_AVX512_BF16 void lstm_backward_pairs(const StepTask<float>& t) {
  Bwd_avx512<float>::step<Epilogue::LstmBackward, true>(t);
}
FASTRNN_TARGET_AVX512_BF16 void gru_backward_pairs(const StepTask<float>& t) {
  Bwd_avx512<float>::step<Epilogue::GruBackward, true>(t);
}
#endif

template <typename T>
CellKernels<T> cell_kernels(simd::Isa isa) {
#if FASTRNN_X86_DISPATCH
  if (isa == simd::Isa::Avx512) {
    CellKernels<T> ks = kernels_avx512<T>();
#if FASTRNN_BF16_DISPATCH
    if constexpr (std::is_same_v<T, float>) {
      if (simd::has_bf16_dot()) {
        ks.forward_pairs[0] = lstm_forward_pairs, ks.forward_pairs[1] = gru_forward_pairs;
        ks.backward_pairs[0] = lstm_backward_pairs, ks.backward_pairs[1] = gru_backward_pairs;
      }
    }
#endif
    return ks;
  }
  if (isa == simd::Isa::Avx2) return kernels_avx2<T>();
#else
  (void)isa;
#endif
  return kernels_baseline<T>();
}

// The forward's panels hold all G gates of their units: K x G vectors, 54-73 KB at
// K = 284, more than a core's L1, so every row tile streams its panel from L2 again.
// make_plan charges that once per panel and step (JobShape::panel_cost), which more
// row tiles per panel share: a column split (half the panels, twice the rows each)
// then wins where it did in a survey of LSTM and GRU forwards (float32 and bfloat16,
// H 64-512, batch 2-64, 2 threads, Zen 4): by 1.05x-1.6x at H 128-512, where the model
// had taken rows everywhere. With 5, of the 96 cells, each choice it changed was the
// faster split or within 4% of it; GRU at H 128 still runs rows where columns were
// 1.05x-1.2x faster.
constexpr double kForwardPanelCost = 5;

template <typename T>
constexpr bool kTaken = std::is_same_v<T, float> || std::is_same_v<T, double>;

// The previous state's rows of step st: the step before's (carried rows) or the initial state's.
template <typename T>
void set_prev(CellStep<T>& cs, const StepRows& st, const T* seq, int64_t ld_seq, const T* init,
              int64_t ld_init) {
  cs.prev_lo = {seq + st.prev_begin * ld_seq, ld_seq};
  cs.prev_hi = {init, ld_init};
  cs.prev_split = st.carried;
}

// cell: 0 LSTM, 1 GRU.
template <int Cell, typename T, typename Job>
void run_forward(std::span<const Job> jobs) {
  const CellKernels<T> ks = cell_kernels<T>(simd::runtime_isa());
  constexpr int G = Cell == 0 ? 4 : 3;
  // LSTM: the input projection inside where the job has x.
  std::vector<detail::JobShape> shapes;
  for (const Job& j : jobs) {
    shapes.push_back({j.steps, detail::inside_input(j) + j.hidden, G * j.hidden,
                      (j.hidden + ks.lanes - 1) / ks.lanes, G * ks.lanes, G, ks.mr_fwd[Cell]});
    shapes.back().panel_cost = kForwardPanelCost;
  }
  const detail::Products products = detail::products_of(ks.forward_pairs[Cell], shapes, jobs);
  const bool pairs = products.pairs;
  const auto forward = pairs ? ks.forward_pairs[Cell] : ks.forward[Cell];
  if (pairs) detail::room_for_pairs(shapes, jobs, products.amx);
  const detail::Plan plan = detail::make_plan(shapes, detail::slot_budget(), sizeof(T));
  std::vector<char> skip_zero_h0(plan.slots.size(), 0);  // as Elman's (recurrence.h)
  detail::run_slots<T>(
      jobs, std::span<const detail::JobShape>(shapes), plan, 0,
      [&](const detail::Slot& s, const Job& j, T* dst) {
        const int64_t I = detail::inside_input(j);
        if (products.amx) detail::clear_panels(s, dst);
        if (I) {
          pack_gate_panels(j.w_ih, j.hidden, I, G, ks.lanes, s.panel_begin, s.panel_end, dst, 0,
                           I + j.hidden, pairs, ks.half_tail);
        }
        pack_gate_panels(j.w_hh, j.hidden, j.hidden, G, ks.lanes, s.panel_begin, s.panel_end, dst,
                         products.amx ? amx::a_offset(I) : I, I + j.hidden, pairs, ks.half_tail);
        if (!j.h0_zero) return;
        // The slot's units' rows of W_hh, gate by gate.
        const int64_t u0 = s.panel_begin * ks.lanes, u1 = std::min(s.panel_end * ks.lanes, j.hidden);
        bool ok = true;
        for (int g = 0; g < G && ok && u1 > u0; ++g) ok = finite(j.w_hh + (g * j.hidden + u0) * j.hidden, j.hidden, u1 - u0, j.hidden);
        skip_zero_h0[&s - plan.slots.data()] = ok;
      },
      [&](const detail::Slot& s, const Job& j, const T* panels, int64_t p) {
        const StepRows& st = j.steps[p];
        const StepRows& rs = j.state_steps.empty() ? st : j.state_steps[p];  // gates' rows
        CellStep<T> cs;
        cs.H = j.hidden;
        cs.gates = {j.gates + rs.begin * j.ld_gates, j.ld_gates};
        cs.h = {j.out + st.begin * j.ld_out, j.ld_out};
        StepTask<T> t;
        if (j.x) {
          t.x = step_rows(j.x, j.ld_x, j.ld_x_step, st);
          t.K_x = j.input;
        }
        if constexpr (Cell == 0) {
          cs.c = {j.c + rs.begin * j.ld_c, j.ld_c};
          set_prev<T>(cs, rs, j.c, j.ld_c, j.c0, j.ld_c0);
          if (j.x) {
            cs.projected = true;
            cs.bias = j.bias;
          }
        } else {
          cs.hn = {j.hn + rs.begin * j.ld_hn, j.ld_hn};
          cs.bias = j.b_hh;
          t.bias = j.bias;  // P's, written by the tile before the recurrent product
          set_prev<T>(cs, st, j.out, j.ld_out, j.h0, j.ld_h0);
        }
        t.a_lo = {j.out + st.prev_begin * j.ld_out, j.ld_out};
        t.a_hi = {j.h0, j.ld_h0};
        t.a_split = st.carried;
        t.a_hi_zero = skip_zero_h0[&s - plan.slots.data()];
        detail::take_slot(t, s, st.count, panels);
        t.K = t.H = j.hidden;
        t.cell = &cs;
        t.amx = products.amx;
        forward(t);
      });
}

template <int Cell, typename T, typename Job>
void run_backward(std::span<const Job> jobs) {
  const CellKernels<T> ks = cell_kernels<T>(simd::runtime_isa());
  constexpr int G = Cell == 0 ? 4 : 3;
  std::vector<detail::JobShape> shapes;
  // LSTM: the gradient reaching c of each row, from the step after: [B, H] per job.
  std::vector<int64_t> dc_offset;
  int64_t dc_elems = 0;
  for (const Job& j : jobs) {
    shapes.push_back({j.steps, G * j.hidden, j.hidden, (j.hidden + ks.nr - 1) / ks.nr, ks.nr,
                      ks.nr / ks.lanes, ks.mr});
    int64_t batch = 0;
    for (const StepRows& st : j.steps) batch = std::max(batch, st.count);
    dc_offset.push_back(dc_elems);
    if (Cell == 0) dc_elems += batch * j.hidden;
  }
  scratch::Buffer<T> dc_buffer(dc_elems);
  const detail::Products products = detail::products_of(ks.backward_pairs[Cell], shapes, jobs);
  const bool pairs = products.pairs;
  const auto backward = pairs ? ks.backward_pairs[Cell] : ks.backward[Cell];
  if (pairs) detail::room_for_pairs(shapes, jobs, products.amx);
  const detail::Plan plan = detail::make_plan(shapes, detail::slot_budget(), sizeof(T));

  // Step i's cell gradient: rows < dc_split take the gradient reaching c from
  // the step after (the dc buffer), the others dc_n (their sequence ends there).
  auto cell_step = [&](const Job& j, T* dc, size_t i, int64_t dc_split) {
    const StepRows& st = j.steps[i];
    CellStep<T> cs;
    cs.H = j.hidden;
    cs.gates = {j.gates + st.begin * j.ld_gates, j.ld_gates};
    cs.saved_gates = rows_or(j.saved_gates, j.ld_saved_gates, st.begin, cs.gates);
    cs.dh = {j.dh + st.begin * j.ld_dh, j.ld_dh};
    if constexpr (Cell == 0) {
      cs.c = {const_cast<T*>(j.c) + st.begin * j.ld_c, j.ld_c};  // read only
      set_prev<T>(cs, st, j.c, j.ld_c, j.c0, j.ld_c0);
      cs.dc_lo = {dc, j.hidden};
      cs.dc_hi = {j.dc_n, j.ld_dc_n};
      cs.dc_split = dc_split;
      cs.out_lo = {dc, j.hidden};
      cs.out_hi = {j.grad_c0, j.ld_grad_c0};
    } else {
      (void)dc_split;
      cs.hn = {j.hn + st.begin * j.ld_hn, j.ld_hn};
      cs.saved_hn = rows_or(j.saved_hn, j.ld_saved_hn, st.begin, cs.hn);
      set_prev<T>(cs, st, j.out, j.ld_out, j.h0, j.ld_h0);
      cs.out_lo = {j.dh + st.prev_begin * j.ld_dh, j.ld_dh};
      cs.out_hi = {j.grad_h0, j.ld_grad_h0};
    }
    return cs;
  };
  // Step i's rows from first_row on, which no product feeds: dh is dY + dh_n, dc is dc_n.
  auto grad_rows = [&](const detail::Slot& s, const Job& j, T* dc, size_t i, int64_t first_row) {
    CellStep<T> cs = cell_step(j, dc, i, first_row);
    cs.row_begin = std::max(s.row_begin, first_row);
    cs.row_end = std::min(s.row_end, j.steps[i].count);
    cs.col_begin = s.panel_begin * ks.nr;
    cs.col_end = std::min<int64_t>(s.panel_end * ks.nr, j.hidden);
    if (cs.row_begin < cs.row_end) ks.grad_rows[Cell](cs);
  };

  // Phase 0: the last step's cell gradient. Phase q >= 1: step i = n - q's
  // product dA_i W_hh, whose epilogue completes dh_{i-1} of the carried rows
  // and runs step i - 1's cell gradient on them; then step i - 1's other rows.
  detail::run_slots<T>(
      jobs, std::span<const detail::JobShape>(shapes), plan, 1,
      [&](const detail::Slot& s, const Job& j, T* dst) {
        if (products.amx) detail::clear_panels(s, dst);
        pack_panels(j.w_hh, j.hidden, j.hidden, G * j.hidden, ks.nr, ks.lanes, false,
                    s.panel_begin, s.panel_end, dst, 0, -1, pairs, ks.half_tail);
      },
      [&](const detail::Slot& s, const Job& j, const T* panels, int64_t p) {
        const size_t n = j.steps.size();
        if (n == 0) return;
        T* dc = dc_buffer.data + dc_offset[s.job];
        if (p == 0) {
          grad_rows(s, j, dc, n - 1, 0);
          return;
        }
        const size_t i = n - p;
        const StepRows& st = j.steps[i];
        CellStep<T> cs;
        if (i > 0) cs = cell_step(j, dc, i - 1, st.carried);
        StepTask<T> t;
        t.a_lo = {j.gates + st.begin * j.ld_gates, j.ld_gates};
        t.a_split = st.count;
        t.d_lo = {j.dh + st.prev_begin * j.ld_dh, j.ld_dh};
        t.d_split = st.carried;
        t.d_hi = {j.grad_h0, j.ld_grad_h0};
        t.accumulate = Cell == 1;  // GRU: grad_h0 holds the direct term dh z
        detail::take_slot(t, s, st.count, panels);
        t.K = G * j.hidden;
        t.H = j.hidden;
        t.cell = &cs;
        t.amx = products.amx;
        backward(t);
        if (i > 0) grad_rows(s, j, dc, i - 1, st.carried);
      });
}

template <typename T, typename Job>
bool all_supported(std::span<const Job> jobs) {
  for (const Job& j : jobs) {
    if (!cell_supports<T>(j.hidden)) return false;
  }
  return true;
}

}  // namespace

template <typename T>
bool cell_supports(int64_t hidden) {
  return kTaken<T> && hidden >= 1 && enabled();
}

template <typename T>
bool forward_recurrences(std::span<const LstmForwardRecurrence<T>> jobs) {
  if (!all_supported<T>(jobs)) return false;
  run_forward<0, T>(jobs);
  return true;
}
template <typename T>
bool backward_recurrences(std::span<const LstmBackwardRecurrence<T>> jobs) {
  if (!all_supported<T>(jobs)) return false;
  run_backward<0, T>(jobs);
  return true;
}
template <typename T>
bool forward_recurrences(std::span<const GruForwardRecurrence<T>> jobs) {
  if (!all_supported<T>(jobs)) return false;
  run_forward<1, T>(jobs);
  return true;
}
template <typename T>
bool backward_recurrences(std::span<const GruBackwardRecurrence<T>> jobs) {
  if (!all_supported<T>(jobs)) return false;
  run_backward<1, T>(jobs);
  return true;
}

#define FASTRNN_INSTANTIATE(T)                                                        \
  template bool cell_supports<T>(int64_t);                                            \
  template bool forward_recurrences<T>(std::span<const LstmForwardRecurrence<T>>);    \
  template bool backward_recurrences<T>(std::span<const LstmBackwardRecurrence<T>>);  \
  template bool forward_recurrences<T>(std::span<const GruForwardRecurrence<T>>);     \
  template bool backward_recurrences<T>(std::span<const GruBackwardRecurrence<T>>);
FASTRNN_INSTANTIATE(float)
FASTRNN_INSTANTIATE(double)

}  // namespace fastrnn::cpu
