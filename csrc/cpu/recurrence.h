// fastrnn CPU: the fused Elman recurrence, forward and backward, for one or
// more independent recurrences at once (the layer-directions that can run
// together, e.g. both directions of a bidirectional layer).
//
//   forward   h_t  = act(P_t + h_{t-1} W_hh^T)          P_t = X_t W_ih^T + b, in out on entry
//   backward  dA_t = (dY_t + dh_t) * act'(h_t)          dh_{t-1} = dA_t W_hh
//
// Step semantics are those of the per-step loops in csrc/stepwise.h: rows
// [0, carried) of a step continue rows [0, carried) of the step visited
// before it; rows [carried, count) start from the same rows of h0.
//
// How it runs. The kernel runs inside one torch::stable::parallel_for over
// "slots" (at most get_num_threads(), and at most the CPUs there are: a slot
// waits for the others at its barriers, so two must never share a CPU). Each
// recurrence gets one or more slots
// arranged as a grid: row groups (blocks of batch rows, independent for the
// whole sequence) times column groups (blocks of hidden units). A slot owns
// its rows x columns of every step and packs its columns of W_hh once per
// call into its own panels (tile_kernels.h), which stay in its core's cache.
// Per step a slot runs one pass: register-blocked GEMM with the bias add and
// activation (forward) or the act' product (backward) as the epilogue. Slots
// that split a recurrence's columns read each other's h_{t-1} and meet at a
// spin barrier once per step; a row split needs no barrier at all; separate
// recurrences never wait for each other. The grid is chosen per call by a
// cost model (rows per tile, panels per slot, barriers), simulated over the
// real batch sizes; rows win unless splitting them leaves tiles too short.
//
// Results are the same bits for any thread count and any grid: each output
// element is summed over k in order by one accumulator, with the same vector
// code, whoever computes it (tile_kernels.h). They depend on the ISA path
// (FMA or not): AVX-512 and AVX2 agree, the baseline path differs in the
// last bits.
//
// Types: float and double (tanh: activation.h's tanh_rational_inplace and
// tanh_exp_inplace, on vectors). bfloat16 and half calls come as float32
// (in_float.h); a bfloat16 call's products run on bfloat16 pairs where the CPU
// has AVX512-BF16 (bf16_pairs.h), on AMX tiles where it has AMX (amx_tiles.h).
#pragma once

#include "../activation.h"
#include "../layout.h"
#include "../scratch.h"
#include "spin_barrier.h"
#include "tile_kernels.h"

#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <span>
#include <string_view>
#include <thread>
#include <type_traits>
#include <vector>

#if __has_include(<unistd.h>)
#include <unistd.h>
#endif


namespace fastrnn::cpu {

// One forward recurrence (one layer, one direction).
template <typename T>
struct ForwardRecurrence {
  std::span<const StepRows> steps;  // [T] visiting order: steps_in_order(layout, reverse)
  int64_t hidden = 0;               // H
  T* out = nullptr;                 // [N, ld_out], columns [0, H): P on entry (unless x is
  int64_t ld_out = 0;               //   set), h on exit; ld_out >= H (2H for one direction
                                    //   of a bidirectional output)
  const T* h0 = nullptr;            // [B, ld_h0]: the initial state
  int64_t ld_h0 = 0;
  const T* w_hh = nullptr;          // [H, H] contiguous, row-major: w_hh[j * H + k] = W_hh[j][k]
  Activation act = Activation::Tanh;
  // The input projection inside the recurrence, where x is set (projection_inside):
  // each step's product runs over K = I + H, [x_t, h_{t-1}] times [W_ih; W_hh]^T,
  // and the epilogue adds the bias.
  const T* x = nullptr;             // [N, ld_x], columns [0, I); with ld_x_step, step t's
  int64_t ld_x = 0;                 //   rows start at x + t * ld_x_step (a padded input in
  int64_t ld_x_step = 0;            //   any layout, e.g. batch_first), not at its first row
  int64_t input = 0;                // I
  const T* w_ih = nullptr;          // [H, I] contiguous
  const T* bias = nullptr;          // [H] (b_ih + b_hh) or null
  bool h0_zero = false;             // every row of h0 is zero (zero_rows): see skip_zero_h0
};

// One backward (dh) recurrence, over the same steps as its forward.
template <typename T>
struct BackwardRecurrence {
  std::span<const StepRows> steps;  // [T] the forward visiting order (walked in reverse)
  int64_t hidden = 0;               // H
  T* grad = nullptr;                // [N, ld_grad]: dA = (dY + dh) * act'(h) on exit; on
  int64_t ld_grad = 0;              //   entry dY plus dh_n on each sequence's final row, unless dy is set
  const T* out = nullptr;           // [N, ld_out]: the forward's h
  int64_t ld_out = 0;
  T* grad_h0 = nullptr;             // [B, ld_grad_h0]: gets dh_{t-1} = dA_t W_hh of the rows
  int64_t ld_grad_h0 = 0;           //   that began at h0 (rows [carried, count) of a step)
  const T* w_hh = nullptr;          // [H, H] as in forward (used untransposed: dA W_hh)
  Activation act = Activation::Tanh;
  // Where dY is read from instead (grad is then written only), and dh_n, added
  // on each sequence's final row: the top layer reads the output's gradient
  // where it lies instead of from a copy.
  const T* dy = nullptr;            // [N, ld_dy] or null; with ld_dy_step, step t's rows
  int64_t ld_dy = 0;                //   start at dy + t * ld_dy_step (a padded gradient in
  int64_t ld_dy_step = 0;           //   any layout, e.g. batch-major), not at its first row
  const T* dh_n = nullptr;          // [B, ld_dh_n]; null with dy null
  int64_t ld_dh_n = 0;
};

// FASTRNN_CPU_FUSED=0 turns the kernel off (supports() is false), read on
// every call: benchmarks time the per-step path against it in one process,
// and it is a way out should the kernel misbehave somewhere.
inline bool enabled() {
  const char* v = std::getenv("FASTRNN_CPU_FUSED");
  return !(v && v[0] == '0' && v[1] == 0);
}

// Whether the fused kernel takes this dtype and hidden size;
// where it does not, the caller steps with one GEMM per step.
template <typename T>
bool supports(int64_t hidden) {
  constexpr bool dtype = std::is_same_v<T, float> || std::is_same_v<T, double>;
  return dtype && hidden >= 1 && enabled();
}

// Whether a forward (Elman or LSTM) should run the input projection inside
// its recurrence (the job's x) for this input size: where it saves the pass
// that writes P = X W_ih^T and the reads of it back, which cost more than the
// product itself when I is small (K = 28 ran at a quarter of the FMA rate,
// bound by memory), and the epilogue's cost spreads over K = I + H instead of
// H. Not below a batch of 8, and not past I = 2H: the panels, W_ih's rows
// with W_hh's, would outgrow the caches that keep them between row tiles.
// FASTRNN_CPU_PROJECT_INSIDE=1 / =0 takes it / leaves it wherever the kernel
// can (read per call: the tests run both paths, the benchmarks compare them).
template <typename T>
bool projection_inside(int64_t input, int64_t hidden, int64_t batch) {
  if (!supports<T>(hidden) || input < 1) return false;
  const char* v = std::getenv("FASTRNN_CPU_PROJECT_INSIDE");
  if (v && (v[0] == '0' || v[0] == '1') && !v[1]) return v[0] == '1';
  return batch >= 8 && input <= 2 * hidden;
}

// Step st's rows of a buffer read where it lies: rows with one stride ld
// (step_stride 0), or a padded layout's steps at p + t * step_stride.
template <typename T>
Rows<const T> step_rows(const T* p, int64_t ld, int64_t step_stride, const StepRows& st) {
  return {p + (step_stride ? st.t * step_stride : st.begin * ld), ld};
}

// Whether rows [0, rows) x [0, cols) at p (row stride ld) are all zero, of
// either sign.
template <typename T>
bool zero_rows(const T* p, int64_t ld, int64_t rows, int64_t cols) {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  U bits = 0;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      U b;
      std::memcpy(&b, p + i * ld + j, sizeof b);
      bits |= b << 1;  // the sign bit shifted out
    }
  }
  return bits == 0;
}

// Whether rows [0, rows) x [0, cols) at p hold no infinity and no NaN.
template <typename T>
bool finite(const T* p, int64_t ld, int64_t rows, int64_t cols) {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  constexpr U magnitude = ~U(0) >> 1;
  constexpr U infinity = sizeof(T) == 4 ? U(0x7f800000u) : U(0x7ff0000000000000ull);
  U top = 0;
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) {
      U b;
      std::memcpy(&b, p + i * ld + j, sizeof b);
      top = std::max<U>(top, b & magnitude);
    }
  }
  return top < infinity;
}

namespace detail {

// Rows of a sequence that run as one block: [row_begin, row_end) of every
// step, and panels [panel_begin, panel_end) of the columns.
struct Slot {
  int64_t job = 0;
  int64_t team = 0;  // the barrier its column group meets at; a team's slots are consecutive
  int64_t row_begin = 0, row_end = 0;
  int64_t panel_begin = 0, panel_end = 0;
  int64_t pack_offset = 0;  // elements into the panel buffer
  int64_t rows_at = 0;      // elements from its panels to its rows' room (JobShape::row_elems)
  bool l2_ahead = false;    // StepTask::l2_ahead
};

// Points t at what slot s computes of a step of `rows` rows: its rows, and
// its panels (packed for it at `panels`).
template <typename T>
void take_slot(StepTask<T>& t, const Slot& s, int64_t rows, const T* panels) {
  t.row_begin = s.row_begin;
  t.row_end = std::min(s.row_end, rows);
  t.panels = panels;
  // Its own rows' room (make_plan), written by this slot only.
  t.a_pairs = reinterpret_cast<uint32_t*>(const_cast<T*>(panels) + s.rows_at);
  t.panel_begin = s.panel_begin;
  t.panel_end = s.panel_end;
  t.l2_ahead = s.l2_ahead;
}

struct Plan {
  std::vector<Slot> slots;
  std::vector<int64_t> team_size;  // slots per team
  int64_t pack_elems = 0;
};

// What the plan needs to know of one recurrence's per-step product: its
// depth, its columns in panels, and the tile shape the kernel runs it with.
struct JobShape {
  std::span<const StepRows> steps;
  int64_t depth;        // K
  int64_t cols;         // columns of the product (for the work estimate)
  int64_t panels;       // panels the columns are packed into
  int64_t panel_width;  // elements per k of one panel (nr)
  int vectors;          // vectors per panel row (W)
  int mr;               // rows per tile at most
  int64_t row_elems = 0;  // room per row of the slot beside its panels (StepTask::a_pairs)
  // What streaming one panel vector per k costs a slot once per step, whatever its rows
  // (make_plan's units); 0 where the panels stay in L1 between a step's row tiles.
  double panel_cost = 0;
  int64_t row_tile = 1;  // the rows' room holds whole tiles of this many rows (amx::kRows)
};

// The cost model, in units of one vector FMA (half a cycle). A tile of m rows
// costs max(W m, m + W) per k with W panel vectors (FMA-bound from m = 2;
// one row is bound by its loads). A column split pays a barrier per step and
// some 5% for the skew between threads that each barrier exposes. The
// barrier is charged at 1-2 us, several times what it takes on an idle
// machine: a step of a few microseconds (B = 1, H = 256) ran slower split
// than on one thread, and much slower when a waiter's partner was preempted;
// a row split has nothing to wait for. Whether a slot's slice of W_hh fits
// its L2 did not matter while it did: a panel is reused by every row tile of
// a step, and W_hh at H = 512 (1 MB, a whole L2 on Zen 4) ran as fast split by
// rows. Past L2 it does: every step streams the slot's panels from L3 again,
// about 8 bytes a cycle on a Xeon (2 MB of L2), which a few rows' multiply-adds
// do not hide. So a slot whose panels exceed its L2 (l2_bytes) pays
// kL3PanelCost per panel vector and k, once per step: it halves with a column
// split. There Elman H = 1024, I = 32, T = 28 ran 2.4x (B = 4), 2.0x (B = 8),
// 1.5x (B = 16) and 1.05x (B = 32) faster split by columns, H = 768, B = 16
// 1.4x, and the same at B = 64.
//
// On Intel a slot's panels that fill half of its L2 or more (where they are
// fetched ahead: l2_ahead) cost kL2PanelCost more per vector and k: Elman
// H = 512 (1-1.1 MB a slot split by rows, half that by columns), T = 28, ran
// 1.37x (B = 2), 1.54x (B = 4) and 1.24x (B = 8) faster split by columns in
// inference (1.28x, 1.35x, 1.14x forward+backward), 1.02x at B = 16, and
// 0.99x-0.97x at B = 32 and 64 (also at T = 128), where rows stay: that
// leaves kL2PanelCost between 0.8 and 1.35.
constexpr double kBarrierCost = 10000;
constexpr double kL3PanelCost = 16;
constexpr double kL2PanelCost = 1;
constexpr double kInlineFmas = 1 << 17;
constexpr double kColumnSplitFactor = 1.05;

inline double rows_cost(int64_t n, int mr, int vectors) {
  if (n <= 0) return 0;
  const int64_t tiles = (n + mr - 1) / mr, base = n / tiles, extra = n % tiles;
  auto tile = [&](int64_t m) { return double(std::max(vectors * m, m + vectors)); };
  return extra * tile(base + 1) + (tiles - extra) * tile(base);
}

inline int64_t split(int64_t n, int64_t parts, int64_t i) { return n * i / parts; }

// FASTRNN_CPU_SPLIT=rows|cols forces the grid's shape where it is possible
// (tests and benchmarks use it to run both on one machine; read per call).
inline int forced_split() {
  const char* s = std::getenv("FASTRNN_CPU_SPLIT");
  const std::string_view v(s ? s : "");
  return v == "rows" ? 1 : v == "cols" ? 2 : 0;
}

// This CPU's L2 per core, in bytes (1 MB where the OS does not say).
inline int64_t l2_bytes() {
  static const int64_t bytes = [] {
    long v = -1;
#ifdef _SC_LEVEL2_CACHE_SIZE
    v = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return v > 0 ? int64_t{v} : int64_t{1} << 20;
  }();
  return bytes;
}

// Whether panels of `bytes` crowd a slot's L2: half of it or more, on Intel.
inline bool l2_crowded(int64_t bytes) {
  return simd::cpu_vendor() == simd::Vendor::Intel && 2 * bytes >= l2_bytes();
}

// Whether a slot whose panels take `bytes` fetches its next panel into L2
// (StepTask::l2_ahead): on Intel CPUs, where they fill half of L2 or more.
// Without it each step waited on L3 for panels that L2 could not keep.
// Measured on a Xeon with 2 MB of L2 per core (2 threads, T = 28, B = 64,
// forward+backward / inference): LSTM H = 512 (2.2 MB a slot) 1.08x / 1.08x,
// GRU H = 512 1.13x / 1.03x, Elman H = 1024 1.18x / 1.18x; inference at
// Elman H = 768 (2.4 MB) 1.13x, Elman H = 512 with I = 512 (2 MB) 1.09x,
// LSTM H = 384 (1.3 MB) 1.03x. Forced on where the panels fit in half of L2,
// the same times within 0.5%. Off elsewhere until measured there (AMD's
// prefetch hints may all fill L1). FASTRNN_CPU_L2_AHEAD=0|1 forces it off /
// on (read per call).
inline bool l2_ahead(int64_t bytes) {
  const char* v = std::getenv("FASTRNN_CPU_L2_AHEAD");
  if (v && (v[0] == '0' || v[0] == '1') && !v[1]) return v[0] == '1';
  return l2_crowded(bytes);
}

// Chooses each job's grid and lays out the slots.
inline Plan make_plan(std::span<const JobShape> jobs, int64_t threads, int64_t elem_bytes) {
  Plan plan;
  const int64_t R = static_cast<int64_t>(jobs.size());
  const int forced = forced_split();
  for (int64_t r = 0; r < R; ++r) {
    const JobShape& job = jobs[r];
    const int64_t K = job.depth, panels = job.panels;
    int64_t batch = 0;
    for (const StepRows& st : job.steps) batch = std::max(batch, st.count);
    // Threads are shared out among the jobs; more jobs than threads run one
    // slot each, several to a thread.
    const int64_t budget = std::max<int64_t>(1, threads / R + (r < threads % R));

    int64_t best_rs = 1, best_cs = 1;
    double best = std::numeric_limits<double>::infinity();
    for (int64_t rs = 1; rs <= std::min(budget, std::max<int64_t>(batch, 1)); ++rs) {
      for (int64_t cs = 1; rs * cs <= budget && cs <= panels; ++cs) {
        if ((forced == 1 && cs > 1) || (forced == 2 && rs > 1)) continue;
        const int64_t max_panels = (panels + cs - 1) / cs;
        const int64_t bytes = max_panels * K * job.panel_width * elem_bytes;
        double panel_cost = job.panel_cost;
        if (bytes > l2_bytes()) {
          panel_cost += kL3PanelCost;
        } else if (l2_crowded(bytes)) {
          panel_cost += kL2PanelCost;
        }
        double cost = 0;
        for (const StepRows& st : job.steps) {
          double worst = 0;
          for (int64_t g = 0; g < rs; ++g) {
            const int64_t lo = split(batch, rs, g), hi = std::min(split(batch, rs, g + 1), st.count);
            if (hi > lo) {
              worst = std::max(worst, rows_cost(hi - lo, job.mr, job.vectors) +
                                          panel_cost * job.vectors);
            }
          }
          cost += cs > 1 ? worst * max_panels * K * kColumnSplitFactor + kBarrierCost
                         : worst * max_panels * K;
        }
        // Ties go to the split with fewer barriers (rows first).
        if (cost < best * 0.999) {
          best = cost;
          best_rs = rs;
          best_cs = cs;
        }
      }
    }

    for (int64_t g = 0; g < best_rs; ++g) {
      const int64_t team = static_cast<int64_t>(plan.team_size.size());
      plan.team_size.push_back(best_cs);
      for (int64_t c = 0; c < best_cs; ++c) {
        Slot s;
        s.job = r;
        s.team = team;
        s.row_begin = split(batch, best_rs, g);
        s.row_end = split(batch, best_rs, g + 1);
        s.panel_begin = split(panels, best_cs, c);
        s.panel_end = split(panels, best_cs, c + 1);
        s.pack_offset = plan.pack_elems;
        // Each slot's panels, and its rows' room, start on their own cache line.
        const int64_t line = 64 / elem_bytes;
        s.rows_at = ((s.panel_end - s.panel_begin) * K * job.panel_width + line - 1) / line * line;
        s.l2_ahead = l2_ahead(s.rows_at * elem_bytes);
        const int64_t room_rows = (s.row_end - s.row_begin + job.row_tile - 1) / job.row_tile * job.row_tile;
        plan.pack_elems += s.rows_at + (room_rows * job.row_elems + line - 1) / line * line;
        plan.slots.push_back(s);
      }
    }
  }
  return plan;
}

// Threads to plan for: torch's intra-op threads, but no more than the CPUs.
inline int64_t slot_budget() {
  const int64_t threads = torch::stable::get_num_threads();
  // hardware_concurrency reads /sys on every call: once is enough.
  static const int64_t cpus = std::thread::hardware_concurrency();
  return std::max<int64_t>(1, cpus > 0 ? std::min(threads, cpus) : threads);
}

// Runs every job's phases on the plan's slots: pack(slot, job, panels) packs
// the slot's panels once, phase(slot, job, panels, phase) does a slot's work
// of one phase; a team's slots meet after each phase they share. Every job
// has its steps plus extra_phases phases. The functions must not throw (a
// thread that left would leave the others spinning).
template <typename T, typename Job, typename PackFn, typename PhaseFn>
void run_slots(std::span<const Job> jobs, std::span<const JobShape> shapes, const Plan& plan,
               int64_t extra_phases, PackFn pack_fn, PhaseFn phase_fn) {
  const int64_t S = static_cast<int64_t>(plan.slots.size());
  std::unique_ptr<SpinBarrier[]> barriers(new SpinBarrier[plan.team_size.size()]);
  for (size_t i = 0; i < plan.team_size.size(); ++i) barriers[i].reset(plan.team_size[i]);
  std::vector<int64_t> tickets(S, -1);
  scratch::Buffer<T> pack(plan.pack_elems);
  int64_t phases = 0;
  for (const JobShape& j : shapes) phases = std::max<int64_t>(phases, j.steps.size() + extra_phases);

  auto job_phases = [&](const Slot& s) {
    return static_cast<int64_t>(shapes[s.job].steps.size()) + extra_phases;
  };
  // A call with less work than it takes to start the thread team (a few
  // microseconds: T = 1 of a tiny stack ran 40% slower with it) runs every
  // slot on the calling thread: parallel_for stays serial when the range is
  // no larger than the grain.
  double fmas = 0;
  for (const JobShape& j : shapes) {
    for (const StepRows& st : j.steps) fmas += double(st.count) * j.depth * j.cols;
  }
  const int64_t grain = fmas < kInlineFmas ? S : 1;

  torch::stable::parallel_for(0, S, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Slot& s = plan.slots[i];
      pack_fn(s, jobs[s.job], pack.data + s.pack_offset);
    }
    for (int64_t p = 0; p < phases; ++p) {
      for (int64_t i = begin; i < end; ++i) {
        const Slot& s = plan.slots[i];
        if (p < job_phases(s)) phase_fn(s, jobs[s.job], pack.data + s.pack_offset, p);
      }
      // Arrive at every team this chunk holds slots of (all its slots of the
      // team at once), then wait: no order among teams, so no deadlock.
      for (int64_t i = begin; i < end;) {
        const Slot& s = plan.slots[i];
        int64_t held = 1;
        while (i + held < end && plan.slots[i + held].team == s.team) ++held;
        const bool meet = plan.team_size[s.team] > 1 && p + 1 < job_phases(s);
        tickets[i] = meet ? barriers[s.team].arrive(held) : -1;
        i += held;
      }
      for (int64_t i = begin; i < end; ++i) {
        if (tickets[i] >= 0) barriers[plan.slots[i].team].wait(tickets[i]);
      }
    }
  });
}

// The input size a forward job projects inside its recurrence (0: none).
template <typename Job>
int64_t inside_input(const Job& j) {
  if constexpr (requires { j.x; }) {
    return j.x ? j.input : 0;
  } else {
    return 0;
  }
}

// How a bfloat16 call's step products run: on bfloat16 pairs (or float32
// products where not: bf16_products), and those on AMX tiles (amx_tiles.h)
// where the CPU has them and every job's depth takes their layout. kernel:
// whether this ISA has kernels on pairs.
struct Products {
  bool pairs = false;
  bool amx = false;
};
template <typename Job>
Products products_of(bool kernel, std::span<const JobShape> shapes, std::span<const Job> jobs) {
  const bool pairs = kernel && bf16_products();
  bool fits = true;
  for (size_t i = 0; i < jobs.size(); ++i) {
    const int64_t I = inside_input(jobs[i]);
    fits = fits && amx::layout_fits(I, shapes[i].depth - I);
  }
  return {pairs, pairs && fits && amx::tiles()};
}

// The room per row a kernel on bfloat16 pairs needs beside each slot's
// panels (StepTask::a_pairs): x_t's and A's values of its rows, as pairs;
// on AMX tiles, whole tiles of rows.
template <typename Job>
void room_for_pairs(std::vector<JobShape>& shapes, std::span<const Job> jobs, bool amx) {
  for (size_t i = 0; i < jobs.size(); ++i) {
    const int64_t I = inside_input(jobs[i]);
    shapes[i].row_elems = pairs::row_words(I, shapes[i].depth - I);
    if (amx) shapes[i].row_tile = amx::kRows;
  }
}

// Zeros a slot's panels: the tile layout's padding between and after the
// parts of k (amx_tiles.h), which the packers do not write.
template <typename T>
void clear_panels(const Slot& s, T* dst) {
  std::fill_n(dst, s.rows_at, T(0));
}

// Elman's: the product's columns are the H units in panels of nr; its depth
// H, or I + H with the input projection inside.
template <typename Job, typename T>
std::vector<JobShape> shapes_of(std::span<const Job> jobs, const KernelSet<T>& ks) {
  std::vector<JobShape> shapes;
  for (const Job& j : jobs) {
    shapes.push_back({j.steps, inside_input(j) + j.hidden, j.hidden,
                      (j.hidden + ks.nr - 1) / ks.nr, ks.nr, ks.nr / ks.lanes, ks.mr});
  }
  return shapes;
}

// Packs the panels of an Elman job: forward W_hh^T (below W_ih^T's rows with
// the input projection inside), backward W_hh.
// pairs: as the kernels on bfloat16 pairs read them; amx: in the tile layout.
template <typename T>
auto elman_packer(const KernelSet<T>& ks, bool transposed, Products products = {}) {
  return [&ks, transposed, pairs = products.pairs, amx = products.amx](const Slot& s, const auto& j, T* dst) {
    const int64_t I = inside_input(j), depth = I + j.hidden;
    if (amx) clear_panels(s, dst);
    if constexpr (requires { j.w_ih; }) {
      if (I) {
        pack_panels(j.w_ih, I, j.hidden, I, ks.nr, ks.lanes, true, s.panel_begin, s.panel_end,
                    dst, 0, depth, pairs, ks.half_tail);
      }
    }
    pack_panels(j.w_hh, j.hidden, j.hidden, j.hidden, ks.nr, ks.lanes, transposed, s.panel_begin,
                s.panel_end, dst, amx ? amx::a_offset(I) : I, depth, pairs, ks.half_tail);
  };
}

}  // namespace detail

// Runs the forward recurrences; false (nothing done) where supports() is not
// met, so that the caller can fall back.
template <typename T>
bool forward_recurrences(std::span<const ForwardRecurrence<T>> jobs) {
  for (const auto& j : jobs) {
    if (!supports<T>(j.hidden)) return false;
  }
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    const KernelSet<T> ks = kernel_set<T>(simd::runtime_isa());
    std::vector<detail::JobShape> shapes = detail::shapes_of(jobs, ks);
    const detail::Products products = detail::products_of(ks.forward_pairs, shapes, jobs);
    const bool pairs = products.pairs;
    if (pairs) detail::room_for_pairs(shapes, jobs, products.amx);
    const detail::Plan plan = detail::make_plan(shapes, detail::slot_budget(), sizeof(T));
    // Rows that start from a zero h0 add nothing to their first product
    // (h0 W_hh^T = 0), unless the slot's rows of W_hh hold an infinity or a
    // NaN (0 * inf is NaN, as torch computes it): each slot checks its own
    // columns' rows after packing them, while they are in its cache.
    std::vector<char> skip_zero_h0(plan.slots.size(), 0);
    auto pack = [&, packer = detail::elman_packer(ks, true, products)](
                    const detail::Slot& s, const ForwardRecurrence<T>& j, T* dst) {
      packer(s, j, dst);
      if (!j.h0_zero) return;
      const int64_t c0 = s.panel_begin * ks.nr, c1 = std::min(s.panel_end * ks.nr, j.hidden);
      skip_zero_h0[&s - plan.slots.data()] = c1 <= c0 || finite(j.w_hh + c0 * j.hidden, j.hidden, c1 - c0, j.hidden);
    };
    detail::run_slots<T>(jobs, std::span<const detail::JobShape>(shapes), plan, 0, pack,
                         [&](const detail::Slot& s, const ForwardRecurrence<T>& j,
                             const T* panels, int64_t p) {
      const StepRows& st = j.steps[p];
      StepTask<T> t;
      t.a_hi_zero = skip_zero_h0[&s - plan.slots.data()];
      t.a_lo = {j.out + st.prev_begin * j.ld_out, j.ld_out};
      t.a_hi = {j.h0, j.ld_h0};
      t.a_split = st.carried;
      t.d_lo = {j.out + st.begin * j.ld_out, j.ld_out};
      t.d_split = st.count;
      if (j.x) {
        t.x = step_rows(j.x, j.ld_x, j.ld_x_step, st);
        t.K_x = j.input;
        t.bias = j.bias;
      }
      detail::take_slot(t, s, st.count, panels);
      t.K = t.H = j.hidden;
      t.act = j.act;
      t.amx = products.amx;
      (pairs ? ks.forward_pairs : ks.forward)(t);
    });
  }
  return true;
}

// The rows of dY of step st, or `otherwise` where dy is null (read in place).
template <typename T>
Rows<const T> dy_rows(const BackwardRecurrence<T>& j, const StepRows& st, const Rows<T>& otherwise) {
  if (!j.dy) return {otherwise.base, otherwise.ld};
  return step_rows(j.dy, j.ld_dy, j.ld_dy_step, st);
}

template <typename T>
bool backward_recurrences(std::span<const BackwardRecurrence<T>> jobs) {
  for (const auto& j : jobs) {
    if (!supports<T>(j.hidden)) return false;
  }
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    const KernelSet<T> ks = kernel_set<T>(simd::runtime_isa());
    std::vector<detail::JobShape> shapes = detail::shapes_of(jobs, ks);
    const detail::Products products = detail::products_of(ks.backward_pairs, shapes, jobs);
    const bool pairs = products.pairs;
    if (pairs) detail::room_for_pairs(shapes, jobs, products.amx);
    const detail::Plan plan = detail::make_plan(shapes, detail::slot_budget(), sizeof(T));
    // Phase 0 finishes the last step's dA; phase q >= 1 runs step n - q's
    // GEMM, whose epilogue finishes the earlier step's carried rows, and
    // finishes that step's other rows (no later step feeds them).
    // Rows first_row.. of step st are their sequences' final rows: dh_n's rows.
    auto scale_rows = [&](const detail::Slot& s, const BackwardRecurrence<T>& j,
                          const StepRows& st, int64_t first_row) {
      ScaleTask<T> c;
      c.g = {j.grad + st.begin * j.ld_grad, j.ld_grad};
      c.src = dy_rows(j, st, c.g);
      if (j.dh_n) c.extra = {j.dh_n, j.ld_dh_n};
      c.y = {j.out + st.begin * j.ld_out, j.ld_out};
      c.row_begin = std::max(s.row_begin, first_row);
      c.row_end = std::min(s.row_end, st.count);
      c.col_begin = s.panel_begin * ks.nr;
      c.col_end = std::min<int64_t>(s.panel_end * ks.nr, j.hidden);
      c.act = j.act;
      if (c.row_begin < c.row_end) ks.scale(c);
    };
    detail::run_slots<T>(jobs, std::span<const detail::JobShape>(shapes), plan, 1,
                         detail::elman_packer(ks, false, products), [&](const detail::Slot& s, const BackwardRecurrence<T>& j,
                             const T* panels, int64_t p) {
      const int64_t n = static_cast<int64_t>(j.steps.size());
      if (n == 0) return;
      if (p == 0) {
        scale_rows(s, j, j.steps[n - 1], 0);
        return;
      }
      const int64_t i = n - p;
      const StepRows& st = j.steps[i];
      StepTask<T> t;
      t.a_lo = {j.grad + st.begin * j.ld_grad, j.ld_grad};
      t.a_split = st.count;
      t.d_lo = {j.grad + st.prev_begin * j.ld_grad, j.ld_grad};
      t.g_lo = i > 0 ? dy_rows(j, j.steps[i - 1], t.d_lo) : Rows<const T>{t.d_lo.base, t.d_lo.ld};
      t.y_lo = {j.out + st.prev_begin * j.ld_out, j.ld_out};
      t.d_hi = {j.grad_h0, j.ld_grad_h0};
      t.d_split = st.carried;
      detail::take_slot(t, s, st.count, panels);
      t.K = t.H = j.hidden;
      t.act = j.act;
      t.amx = products.amx;
      (pairs ? ks.backward_pairs : ks.backward)(t);
      if (i > 0) scale_rows(s, j, j.steps[i - 1], st.carried);
    });
  }
  return true;
}

}  // namespace fastrnn::cpu
