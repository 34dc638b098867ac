// fastrnn CPU: one thread's share of one recurrence step, as a register-
// blocked GEMM with the step's pointwise work as its epilogue.
//
// A step multiplies rows of A (h_{t-1} in forward, dA_t in backward) by W_hh
// packed into panels, and finishes each output element where its sum is
// still in a register:
//
//   forward   h[i, j]      = act(P[i, j] + sum_k h_prev[i, k] W[j, k])
//   backward  dA_prev[i, k] = (dA_prev[i, k] + sum_j dA[i, j] W[j, k]) * act'(h_prev[i, k])
//             grad_h0[i, k] = sum_j dA[i, j] W[j, k]     (rows that began at h0)
//
// Panels: the columns of the product in blocks of NR (= NV vectors of N
// lanes); panel p is a [K][NR] array (K = H) holding W^T's (forward) or W's
// (backward) columns [p*NR, p*NR + NR), zero beyond H; a last panel whose
// columns fit in one vector is one vector wide ([K][N]: H = 100 computes 112
// columns, not 128). A tile is M <= MR rows by one panel: M*NV accumulators
// stay in registers over the whole k loop, each k loads NV vectors of the
// panel and broadcasts M values of A.
//
// Every output element is one accumulator summed over k = 0 .. K-1 in order,
// and every column runs through the same vector code (a partial panel goes
// through a padded copy), whichever tile or thread computes it: results do
// not depend on how rows and panels are split among threads.
#pragma once

#include "../activation.h"
#include "../cells.h"
#include "amx_tiles.h"
#include "bf16_pairs.h"
#include "simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fastrnn::cpu {

// Row i of a matrix at base + i * ld.
template <typename T>
struct Rows {
  T* base = nullptr;
  int64_t ld = 0;
  T* row(int64_t i) const { return base + i * ld; }
};

// The rows of p from row `begin` on, or `otherwise` where p is null (a buffer
// read in place).
template <typename T>
Rows<const T> rows_or(const T* p, int64_t ld, int64_t begin, const Rows<T>& otherwise) {
  return p ? Rows<const T>{p + begin * ld, ld} : Rows<const T>{otherwise.base, otherwise.ld};
}

// What a tile does with its sums.
enum class Epilogue {
  Forward,   // d = act(d + acc)                      (d holds P)
  Backward,  // d_lo = (g_lo + acc) * act'(y_lo); d_hi = acc
  Linear,    // d = acc + bias (+ d if accumulate)    (bias may be null)
  LinearAT,  // as Linear, with A transposed: A(i, k) at a_lo.base[k * a_lo.ld + i]
  // The cells (CellStep below). Forward: panels of gate-interleaved columns
  // (pack_gate_panels), the tile's sums are every gate of its units and the
  // epilogue runs the cell's forward. Backward: the product dA_t W_hh over
  // units of h_{t-1}; d_lo = dh_{t-1} = d_lo + acc, then the earlier step's
  // cell gradient for those units (cell_grad); d_hi = acc (+ d_hi if accumulate).
  LstmForward,
  GruForward,
  LstmBackward,
  GruBackward,
};

// What a cell's epilogue reads and writes besides StepTask's rows, for one
// step: gate g of unit u is column g * H + u of a gates row; row i of a
// buffer is that step's row i.
template <typename T>
struct CellStep {
  int64_t H = 0;
  Rows<T> gates;  // forward: P on entry, the activated gates on exit;
                  // backward: the activated gates on entry, dA on exit
  Rows<T> c;      // LSTM: c_t (forward: written; backward: read)
  Rows<T> h;      // forward: LSTM's m_t = h_t, GRU's h_t (written)
  Rows<T> hn;     // GRU: hn = (h_{t-1} W_hh^T)_n + b_hn (forward: written; backward: -> dA_n)
  Rows<T> dh;     // backward: the whole gradient of h_t (read)
  // Backward: where the activated gates (and GRU's hn) are read; gates and hn
  // themselves when they are turned into their gradients in place.
  Rows<const T> saved_gates, saved_hn;
  // The previous state of row i (LSTM c_{t-1}, GRU h_{t-1}): prev_lo.row(i)
  // for i < prev_split (the rows carried from the step before), else
  // prev_hi.row(i) (c0 / h0).
  Rows<const T> prev_lo, prev_hi;
  int64_t prev_split = 0;
  const T* bias = nullptr;  // forward: GRU's b_hh [3H]; LSTM's b_ih + b_hh [4H] with the
                            // input projection inside; or null
  bool projected = false;   // LSTM forward: the input projection is inside the product
                            // (gates hold nothing on entry)
  // LSTM backward: the gradient reaching c_t, dc_lo.row(i) for i < dc_split
  // (from the next step), else dc_hi.row(i) (dc_n: the sequence's last row).
  Rows<const T> dc_lo, dc_hi;
  int64_t dc_split = 0;
  // Backward, what goes to the previous state of row i (out_lo for
  // i < prev_split, else out_hi): LSTM writes dc_{t-1} (into the dc buffer,
  // or grad_cx); GRU adds dh z into the previous step's dh rows, or writes it
  // into grad_hx.
  Rows<T> out_lo, out_hi;
  // cell_grad_rows: rows [row_begin, row_end), units [col_begin, col_end).
  int64_t row_begin = 0, row_end = 0, col_begin = 0, col_end = 0;
};

// One thread's share of one step: rows [row_begin, row_end) of the step and
// the columns of panels [panel_begin, panel_end).
template <typename T>
struct StepTask {
  // A's row i: a_lo.row(i) for i < a_split, else a_hi.row(i).
  Rows<const T> a_lo, a_hi;
  int64_t a_split = 0;
  // Output row i. Forward: d_lo.row(i) for every row (it holds P on entry).
  // Backward: i < d_split: d_lo.row(i) (the earlier step's dA, with y_lo its
  // h), else d_hi.row(i) (grad_h0).
  Rows<T> d_lo, d_hi;
  int64_t d_split = 0;
  Rows<const T> y_lo;
  Rows<const T> g_lo;  // Elman backward: dY of d_lo's rows (d_lo itself when dA was a copy of dY)
  const T* bias = nullptr;  // Linear, Elman forward with x (P's): [H] or null
  bool accumulate = false;  // Linear: add to what d holds; cells' backward: to what d_hi holds
  const CellStep<T>* cell = nullptr;  // the cells' epilogues
  // Elman or LSTM forward with the input projection inside: the product runs
  // over k < K_x on x's rows (row i at x.row(i)), then over K on A's rows;
  // the panels hold K_x + K rows.
  Rows<const T> x;
  int64_t K_x = 0;
  int64_t row_begin = 0, row_end = 0;
  // Forward: a_hi's rows are zero and the panels finite, so a tile of them
  // only would add K products of zero: it skips them (the same bits).
  bool a_hi_zero = false;
  const T* panels = nullptr;  // [panel_end - panel_begin][K_x + K][NR], 64-byte aligned
  // Bf16 kernels: room for the rows [row_begin, row_end) of x and A as pairs of
  // bfloat16, pairs::row_words(K_x, K) words a row (x's pairs, then A's at
  // pairs::words(K_x)), filled at each step's start: rounded once a step,
  // not once per panel. LinearAT: [(K + 1) / 2][row_end - row_begin] (pair
  // q of the rows side by side, as A lies); on AMX tiles, rows as the others'
  // (to_row_pairs), whole tiles of them.
  uint32_t* a_pairs = nullptr;
  int64_t panel_begin = 0, panel_end = 0;
  int64_t K = 0;  // reduction length (H; the input size for a Linear product; G*H for a cell's backward)
  int64_t H = 0;  // output columns (the cells' forward: units, G columns each)
  Activation act = Activation::Tanh;
  // The slot's panels do not fit in L2: while a panel's row tiles run, they
  // fetch the next panel (after the last, the first: the next step's) into
  // L2, a slice each, so that it is not waited for from L3. Not on pairs.
  bool l2_ahead = false;
  // Bf16 kernels: the products run on AMX tiles (amx_tiles.h; the panels and
  // the rows' room laid out for them).
  bool amx = false;
};

// Lines still to fetch into L2 ahead of use (StepTask::l2_ahead), per_k a k.
struct L2Ahead {
  const char* p = nullptr;
  int64_t lines = 0;
  int per_k = 1;
  FASTRNN_INLINE void next() {
    if (lines > 0) {
      for (int i = 0; i < per_k; ++i) __builtin_prefetch(p + i * 64, 0, 2);
      p += per_k * 64;
      lines -= per_k;
    }
  }
};

// g = (src + extra) * act'(y) on rows [row_begin, row_end) of g, src, y (and
// extra, where its base is set), columns [col_begin, col_end). src may be g.
template <typename T>
struct ScaleTask {
  Rows<T> g;
  Rows<const T> src, extra;
  Rows<const T> y;
  int64_t row_begin = 0, row_end = 0, col_begin = 0, col_end = 0;
  Activation act = Activation::Tanh;
};

// T: float or double; N lanes per vector; NV vectors per panel row; MR rows
// per tile at most (MR * NV accumulators must fit the register file).
template <typename T, int N, int NV, int MR>
struct TileKernel {
  using V = typename simd::Vec<T, N>::type;
  static constexpr int kNR = N * NV;
  static constexpr int kMR = MR;
  static constexpr int kLanes = N;

  // Whether a last panel of at most N / 2 columns (the cells' forward: units)
  // runs on half vectors: 256 bits in the AVX-512 kernels, on float lanes
  // (not the Bf16 ones). Zen 4 executes a 512-bit multiply-add as two 256-bit
  // halves, so there a half vector costs half (hidden 100 = 3 panels of 32 and
  // 4 columns: with the 4 in a full vector the Elman forward op took 10-27%
  // longer than at hidden 96, for 4% more multiply-adds); elsewhere it costs
  // the same. Its panel is [K][N / 2], or [K][NV * N / 2] for the cells'
  // forward (pack_panels' and pack_gate_panels' half_tail, which the packer
  // must be given alike: KernelSet::half_tail, CellKernels::half_tail).
  template <bool Bf16>
  static constexpr bool kHalfTail = N * sizeof(T) == 64 && !Bf16;

  // n <= N lanes from p (the rest zero) / to p: one vector move when n == N.
  // Full: n == N is known at compile time. The cells' epilogues are compiled
  // apart for full vectors, where nothing of the lane-by-lane path is left to
  // keep their vectors in memory (with it, they spilled every gate and sum to
  // the stack: a third of the LSTM forward kernel's time).
  template <bool Full = false>
  static FASTRNN_INLINE void load_part(V& v, const T* p, int n) {
    if (Full || n == N) {
      simd::load(v, p);
    } else {
      v = V{};
      for (int l = 0; l < n; ++l) v[l] = p[l];
    }
  }
  template <bool Full = false>
  static FASTRNN_INLINE void store_part(T* p, const V& v, int n) {
    if (Full || n == N) {
      simd::store(p, v);
    } else {
      for (int l = 0; l < n; ++l) p[l] = v[l];
    }
  }

  static FASTRNN_INLINE void tanh_(V& v) {
    if constexpr (std::is_same_v<T, float>) {
      tanh_rational_inplace(v);
    } else {
      tanh_exp_inplace(v);
    }
  }

  // The activations of cells.h's element functions, on vectors.
  struct Act {
    static FASTRNN_INLINE void sigmoid(V& v) {
      if constexpr (std::is_same_v<T, float>) {
        sigmoid_rational_inplace(v);
      } else {
        sigmoid_exp_inplace(v);
      }
    }
    static FASTRNN_INLINE void tanh(V& v) { tanh_(v); }
  };

  // v = act(v), as activate<A> in activation.h.
  static FASTRNN_INLINE void activate_(V& v, Activation act) {
    if (act == Activation::Relu) {
      v = v < T(0) ? V{} : v;
    } else {
      tanh_(v);
    }
  }

  // g = g * act'(y), as activation_grad<A> in activation.h.
  static FASTRNN_INLINE void grad_(V& g, const V& y, Activation act) {
    if (act == Activation::Relu) {
      g = y <= T(0) ? V{} : g;
    } else {
      g = g * (T(1) - y * y);
    }
  }

  // The cell gradient of row i of a step, units [u0, u0 + n), n <= N, from
  // the whole gradient of its h (cs.dh): cells.h's backward element function
  // on one vector of units.
  template <Epilogue E, bool Full>
  static FASTRNN_INLINE void cell_grad(const CellStep<T>& cs, int64_t i, int64_t u0, int n) {
    const int64_t H = cs.H;
    T* g = cs.gates.row(i) + u0;
    const bool carried = i < cs.prev_split;
    V prev, d;
    load_part<Full>(prev, (carried ? cs.prev_lo.row(i) : cs.prev_hi.row(i)) + u0, n);
    load_part<Full>(d, cs.dh.row(i) + u0, n);
    T* out = (carried ? cs.out_lo.row(i) : cs.out_hi.row(i)) + u0;
    const T* sg = cs.saved_gates.row(i) + u0;
    if constexpr (E == Epilogue::LstmBackward) {
      V x[4], c, dc_in, dc_prev;
      for (int v = 0; v < 4; ++v) load_part<Full>(x[v], sg + v * H, n);
      load_part<Full>(c, cs.c.row(i) + u0, n);
      load_part<Full>(dc_in, (i < cs.dc_split ? cs.dc_lo.row(i) : cs.dc_hi.row(i)) + u0, n);
      lstm_backward_cell<Act, T>(x[0], x[1], x[2], x[3], c, prev, d, dc_in, dc_prev);
      for (int v = 0; v < 4; ++v) store_part<Full>(g + v * H, x[v], n);
      store_part<Full>(out, dc_prev, n);
    } else {
      V x[3], hn, direct;
      for (int v = 0; v < 3; ++v) load_part<Full>(x[v], sg + v * H, n);
      load_part<Full>(hn, cs.saved_hn.row(i) + u0, n);
      gru_backward_cell<Act, T>(x[0], x[1], x[2], hn, d, prev, direct);
      for (int v = 0; v < 3; ++v) store_part<Full>(g + v * H, x[v], n);
      store_part<Full>(cs.hn.row(i) + u0, hn, n);
      // Added to the previous step's dh, written into grad_hx (whose old
      // contents are not read: no 0 * NaN).
      if (carried) {
        V old;
        load_part<Full>(old, out, n);
        direct = old + direct;
      }
      store_part<Full>(out, direct, n);
    }
  }

  template <Epilogue E>
  static FASTRNN_INLINE void cell_grad(const CellStep<T>& cs, int64_t i, int64_t u0, int n) {
    if (n == N) {
      cell_grad<E, true>(cs, i, u0, N);
    } else {
      cell_grad<E, false>(cs, i, u0, n);
    }
  }

  // The cell gradient of rows and units no product feeds (cs.row_begin.., cs.col_begin..).
  template <Epilogue E>
  static FASTRNN_INLINE void cell_grad_rows(const CellStep<T>& cs) {
    for (int64_t i = cs.row_begin; i < cs.row_end; ++i) {
      for (int64_t u = cs.col_begin; u < cs.col_end; u += N) {
        cell_grad<E>(cs, i, u, static_cast<int>(std::min<int64_t>(N, cs.col_end - u)));
      }
    }
  }

  // The epilogues read rows that were last touched a whole layer ago (P,
  // dY, h; the cells' gates and c) out of L2 or memory: without help these
  // loads stalled the LSTM backward kernel for a third of its time, and the
  // Elman kernels for a tenth to a fifth at H = 512. The tile's product
  // takes long enough to bring them in, so they are asked for before its
  // last kPrefetchAhead k: not at its start, where a panel wider than L1
  // (K = 512: 64 KB) streamed them out again before the epilogue came.
  // (1x512/T128 ran 6% faster with the Elman rows fetched so; 64 or the
  // tile's start did no better.)
  static constexpr int64_t kPrefetchAhead = 128;
  // How many k ahead LinearAT asks for A's line (tile()).
  static constexpr int64_t kLinearAhead = 16;

  template <int M, int W, Epilogue E>
  static FASTRNN_INLINE void prefetch_epilogue(const StepTask<T>& t, int64_t i0, int64_t c0) {
    if constexpr (E == Epilogue::Forward) {
      for (int r = 0; r < M; ++r) {
        for (int v = 0; v < W; ++v) __builtin_prefetch(t.d_lo.row(i0 + r) + c0 + v * N, 1);
      }
    } else if constexpr (E == Epilogue::Backward) {
      for (int r = 0; r < M; ++r) {
        const int64_t i = i0 + r;
        if (i >= t.d_split) continue;  // grad_h0's rows: written only
        for (int v = 0; v < W; ++v) {
          __builtin_prefetch(t.g_lo.row(i) + c0 + v * N);
          __builtin_prefetch(t.y_lo.row(i) + c0 + v * N);
          if (t.g_lo.base != t.d_lo.base) __builtin_prefetch(t.d_lo.row(i) + c0 + v * N, 1);
        }
      }
    } else if constexpr (E >= Epilogue::LstmForward) {
      prefetch_cell_rows<M, W, E>(t, i0, c0);
    }
  }

  template <int M, int W, Epilogue E>
  static FASTRNN_INLINE void prefetch_cell_rows(const StepTask<T>& t, int64_t i0, int64_t c0) {
    const CellStep<T>& cs = *t.cell;
    constexpr int G = (E == Epilogue::LstmForward || E == Epilogue::LstmBackward) ? 4 : 3;
    constexpr bool forward = E == Epilogue::LstmForward || E == Epilogue::GruForward;
    // Forward: one vector of units per gate; backward: W vectors.
    constexpr int vectors = forward ? 1 : W;
    for (int r = 0; r < M; ++r) {
      const int64_t i = i0 + r;
      if (!forward && i >= t.d_split) continue;  // no cell gradient on this row
      for (int v = 0; v < vectors; ++v) {
        const int64_t u = c0 + v * N;
        const T* g = cs.gates.row(i) + u;
        for (int k = 0; k < G; ++k) __builtin_prefetch(g + k * cs.H, 1);
        if constexpr (!forward) {
          if (cs.saved_gates.base != cs.gates.base) {
            const T* sg = cs.saved_gates.row(i) + u;
            for (int k = 0; k < G; ++k) __builtin_prefetch(sg + k * cs.H);
          }
          __builtin_prefetch(cs.dh.row(i) + u);
          if constexpr (G == 4) {
            __builtin_prefetch(cs.c.row(i) + u);
          } else {
            __builtin_prefetch(cs.hn.row(i) + u, 1);
            if (cs.saved_hn.base != cs.hn.base) __builtin_prefetch(cs.saved_hn.row(i) + u);
          }
          __builtin_prefetch((i < cs.prev_split ? cs.prev_lo.row(i) : cs.prev_hi.row(i)) + u);
        }
      }
    }
  }

  // The cells' forward epilogue of one tile row: units [c0, c0 + nc); acc[g]: gate g's sums.
  template <Epilogue E, bool Full, int W>
  static FASTRNN_INLINE void cell_forward(const StepTask<T>& t, int64_t i, int64_t c0, int nc,
                                          V (&acc)[W]) {
    if constexpr (E == Epilogue::LstmForward) {
      const CellStep<T>& cs = *t.cell;
      const int64_t H = cs.H;
      T* g = cs.gates.row(i) + c0;
      V x[4];
      for (int v = 0; v < 4; ++v) {
        if (cs.projected) {
          x[v] = acc[v];
          if (cs.bias) {
            V b;
            load_part<Full>(b, cs.bias + v * H + c0, nc);
            x[v] = x[v] + b;
          }
        } else {
          load_part<Full>(x[v], g + v * H, nc);
          x[v] = x[v] + acc[v];
        }
      }
      V cp, c, m;
      load_part<Full>(cp, (i < cs.prev_split ? cs.prev_lo.row(i) : cs.prev_hi.row(i)) + c0, nc);
      lstm_forward_cell<Act, T>(x[0], x[1], x[2], x[3], cp, c, m);
      for (int v = 0; v < 4; ++v) store_part<Full>(g + v * H, x[v], nc);
      store_part<Full>(cs.c.row(i) + c0, c, nc);
      store_part<Full>(cs.h.row(i) + c0, m, nc);
    } else if constexpr (E == Epilogue::GruForward) {
      const CellStep<T>& cs = *t.cell;
      const int64_t H = cs.H;
      T* g = cs.gates.row(i) + c0;
      V x[3], hg[3];
      for (int v = 0; v < 3; ++v) {
        load_part<Full>(x[v], g + v * H, nc);
        hg[v] = acc[v];
        if (cs.bias) {
          V b;
          load_part<Full>(b, cs.bias + v * H + c0, nc);
          hg[v] = b + hg[v];
        }
      }
      V hp, h;
      load_part<Full>(hp, (i < cs.prev_split ? cs.prev_lo.row(i) : cs.prev_hi.row(i)) + c0, nc);
      gru_forward_cell<Act, T>(x[0], x[1], x[2], hg[0], hg[1], hg[2], hp, h);
      for (int v = 0; v < 3; ++v) store_part<Full>(g + v * H, x[v], nc);
      store_part<Full>(cs.hn.row(i) + c0, hg[2], nc);
      store_part<Full>(cs.h.row(i) + c0, h, nc);
    }
  }

  // The epilogue of one tile row: columns [c0, c0 + nc) of row i, from a
  // panel of W vectors (nc <= W * N). A vector that straddles nc is moved
  // lane by lane, so that its columns see exactly the arithmetic of a full
  // one (a library memcpy per row cost more than the row's tanh). Full:
  // nc == W * N, known at compile time (finish_rows).
  template <int W, Epilogue E, bool Full = false>
  static FASTRNN_INLINE void finish_row(const StepTask<T>& t, int64_t i, int64_t c0, int nc,
                                        V (&acc)[W]) {
    if constexpr (E == Epilogue::Linear || E == Epilogue::LinearAT) {
      T* d = t.d_lo.row(i) + c0;
      for (int v = 0; v < W; ++v) {
        const int n = Full ? N : std::min(N, nc - v * N);
        if (!Full && n <= 0) break;
        V h = acc[v];
        if (t.bias) {
          V b;
          load_part<Full>(b, t.bias + c0 + v * N, n);
          h = b + h;
        }
        if (t.accumulate) {
          V old;
          load_part<Full>(old, d + v * N, n);
          h = old + h;
        }
        store_part<Full>(d + v * N, h, n);
      }
    } else if constexpr (E == Epilogue::Forward) {
      T* d = t.d_lo.row(i) + c0;
      for (int v = 0; v < W; ++v) {
        const int n = Full ? N : std::min(N, nc - v * N);
        if (!Full && n <= 0) break;
        V h;
        load_part<Full>(h, d + v * N, n);
        h = h + acc[v];
        activate_(h, t.act);
        store_part<Full>(d + v * N, h, n);
      }
    } else if constexpr (E == Epilogue::LstmForward || E == Epilogue::GruForward) {
      if (nc == N) {
        cell_forward<E, true>(t, i, c0, N, acc);
      } else {
        cell_forward<E, false>(t, i, c0, nc, acc);
      }
    } else if constexpr (E == Epilogue::LstmBackward || E == Epilogue::GruBackward) {
      if (i < t.d_split) {
        T* d = t.d_lo.row(i) + c0;
        for (int v = 0; v < W; ++v) {
          const int n = Full ? N : std::min(N, nc - v * N);
          if (!Full && n <= 0) break;
          V g;
          load_part<Full>(g, d + v * N, n);
          g = g + acc[v];
          store_part<Full>(d + v * N, g, n);
        }
        for (int v = 0; v < W; ++v) {
          const int n = Full ? N : std::min(N, nc - v * N);
          if (!Full && n <= 0) break;
          cell_grad<E>(*t.cell, i, c0 + v * N, n);
        }
      } else {
        T* d = t.d_hi.row(i) + c0;
        for (int v = 0; v < W; ++v) {
          const int n = Full ? N : std::min(N, nc - v * N);
          if (!Full && n <= 0) break;
          V g = acc[v];
          if (t.accumulate) {
            V old;
            load_part<Full>(old, d + v * N, n);
            g = old + g;
          }
          store_part<Full>(d + v * N, g, n);
        }
      }
    } else if (i < t.d_split) {
      T* d = t.d_lo.row(i) + c0;
      const T* dy = t.g_lo.row(i) + c0;
      const T* y = t.y_lo.row(i) + c0;
      for (int v = 0; v < W; ++v) {
        const int n = Full ? N : std::min(N, nc - v * N);
        if (!Full && n <= 0) break;
        V g, yy;
        load_part<Full>(g, dy + v * N, n);
        load_part<Full>(yy, y + v * N, n);
        g = g + acc[v];
        grad_(g, yy, t.act);
        store_part<Full>(d + v * N, g, n);
      }
    } else {
      T* d = t.d_hi.row(i) + c0;
      for (int v = 0; v < W; ++v) {
        const int n = Full ? N : std::min(N, nc - v * N);
        if (!Full && n <= 0) break;
        store_part<Full>(d + v * N, acc[v], n);
      }
    }
  }

  // finish_row over rows [i0, i0 + M) of a tile. A whole panel's rows (every
  // panel but a last partial one) are compiled apart: with nc a runtime value
  // GCC stored the sums to the stack and looped over them with a branch per
  // vector. Apart, the Elman ops ran up to 1.11x faster on Zen 3 (AVX2;
  // 1.05x typical).
  template <int M, int W, Epilogue E>
  static FASTRNN_INLINE void finish_rows(const StepTask<T>& t, int64_t i0, int64_t c0, int nc,
                                         V (&acc)[M][W]) {
    if (nc == W * N) {
      for (int r = 0; r < M; ++r) finish_row<W, E, true>(t, i0 + r, c0, nc, acc[r]);
    } else {
      for (int r = 0; r < M; ++r) finish_row<W, E>(t, i0 + r, c0, nc, acc[r]);
    }
  }

  // A GRU tile row's input projection into its gates: gate v of units
  // [u0, u0 + nc) = acc[v] + b_ih (t.bias, or none).
  template <int W>
  static FASTRNN_INLINE void store_gate_projection(const StepTask<T>& t, int64_t i, int64_t u0,
                                                   int nc, V (&acc)[W]) {
    const int64_t H = t.cell->H;
    T* g = t.cell->gates.row(i) + u0;
    for (int v = 0; v < W; ++v) {
      V p = acc[v];
      if (t.bias) {
        V b;
        load_part(b, t.bias + v * H + u0, nc);
        p = b + p;
      }
      store_part(g + v * H, p, nc);
    }
  }

  // acc[r] += sum over k < K of a[r][k] * panel row k ([K][W * N]). Unrolled
  // by hand: GCC otherwise kept the loops over W = 3 or 4 vectors (the AVX2
  // cells' forward), copied each panel row to the stack and kept every
  // accumulator there, 5x slower than these unrolled ones.
  template <int M, int W>
  static FASTRNN_INLINE void multiply_add(V (&acc)[M][W], const T* const (&a)[M], const T* panel,
                                          int64_t K, L2Ahead& ahead) {
    for (int64_t k = 0; k < K; ++k) {
      ahead.next();
      V b[W];
#pragma GCC unroll 8
      for (int v = 0; v < W; ++v) simd::load(b[v], panel + (k * W + v) * N);
#pragma GCC unroll 8
      for (int r = 0; r < M; ++r) {
        const T x = a[r][k];
#pragma GCC unroll 8
        for (int v = 0; v < W; ++v) acc[r][v] = acc[r][v] + x * b[v];
      }
    }
  }

  // acc += a's rows times the panel's rows [0, K). prefetch: the epilogue's
  // rows are asked for before the last kPrefetchAhead k.
  template <int M, int W, Epilogue E>
  static FASTRNN_INLINE void product(const StepTask<T>& t, int64_t i0, int64_t c0, V (&acc)[M][W],
                                     const T* const (&a)[M], const T* panel, int64_t K,
                                     bool prefetch, L2Ahead& ahead) {
    const int64_t head = prefetch ? std::max<int64_t>(0, K - kPrefetchAhead) : K;
    multiply_add<M, W>(acc, a, panel, head, ahead);
    if (head < K) {
      prefetch_epilogue<M, W, E>(t, i0, c0);
      const T* rest[M];
      for (int r = 0; r < M; ++r) rest[r] = a[r] + head;
      multiply_add<M, W>(acc, rest, panel + head * W * N, K - head, ahead);
    }
  }

#if FASTRNN_BF16_DISPATCH
  // acc[r] += the pair a[r] times one pair row of a panel ([W * N] pairs).
  template <int M, int W>
  static FASTRNN_INLINE void multiply_add_pair(V (&acc)[M][W], const uint32_t (&a)[M],
                                               const uint32_t* panel_row) {
    static_assert(std::is_same_v<T, float> && N == 16);
    // Unrolled by hand: GCC's own estimate of the asm kept these loops.
    pairs::U16 b[W];
#pragma GCC unroll 8
    for (int v = 0; v < W; ++v) std::memcpy(&b[v], panel_row + v * N, sizeof(b[v]));
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      const pairs::U16 x = pairs::U16{} + a[r];
#pragma GCC unroll 8
      for (int v = 0; v < W; ++v) pairs::dot(acc[r][v], x, b[v]);
    }
  }

  // product() on bfloat16 pairs (the Bf16 kernels; bf16_pairs.h): a's rows
  // and the panel's hold (K + 1) / 2 pairs.
  template <int M, int W, Epilogue E>
  static FASTRNN_INLINE void product(const StepTask<T>& t, int64_t i0, int64_t c0, V (&acc)[M][W],
                                     const uint32_t* const (&a)[M], const T* panel, int64_t K,
                                     bool prefetch, L2Ahead&) {
    const uint32_t* p = reinterpret_cast<const uint32_t*>(panel);
    const int64_t pairs = (K + 1) / 2;
    const int64_t fetch_at = prefetch ? std::max<int64_t>(0, pairs - kPrefetchAhead / 2) : -1;
    for (int64_t q = 0; q < pairs; ++q) {
      if (q == fetch_at) prefetch_epilogue<M, W, E>(t, i0, c0);
      uint32_t x[M];
      for (int r = 0; r < M; ++r) x[r] = a[r][q];
      multiply_add_pair<M, W>(acc, x, p + q * W * N);
    }
  }
#endif

#if FASTRNN_AMX_DISPATCH
  // sums[r][v * N + j] = the sums of rows r < m by the W column tiles of
  // parts' panels, two column tiles at a time (amx::product).
  template <int W>
  static FASTRNN_INLINE void amx_sums(int m, const amx::Part (&parts)[2], int64_t lda,
                                      float (&sums)[2 * amx::kRows][W * N]) {
    constexpr int64_t ldc = W * N;
    for (int v = 0; v < W; v += 2) {
      const amx::Part at_v[2] = {{parts[0].a, parts[0].b + v * N, parts[0].Q},
                                 {parts[1].a, parts[1].b + v * N, parts[1].Q}};
      float* out = &sums[0][v * N];
      if (m > amx::kRows) {
        if (v + 1 < W) amx::product<2, 2>(at_v, lda, ldc, out, ldc);
        else amx::product<2, 1>(at_v, lda, ldc, out, ldc);
      } else {
        if (v + 1 < W) amx::product<1, 2>(at_v, lda, ldc, out, ldc);
        else amx::product<1, 1>(at_v, lda, ldc, out, ldc);
      }
    }
  }

  // The epilogue of rows [i0, i0 + m) from their sums, a row's W vectors at a
  // time as tile() runs it; projection: x_t's sum alone (Elman's P, GRU's
  // gate projection), finished as tile() finishes it.
  template <int W, Epilogue E, bool projection>
  static FASTRNN_INLINE void amx_finish(const StepTask<T>& t, int64_t i0, int m, int64_t c0, int nc,
                                        const float (&sums)[2 * amx::kRows][W * N]) {
    for (int r = 0; r < m; ++r) {
      V acc[W];
      for (int v = 0; v < W; ++v) simd::load(acc[v], &sums[r][v * N]);
      if constexpr (!projection) {
        finish_row<W, E>(t, i0 + r, c0, nc, acc);
      } else if constexpr (E == Epilogue::Forward) {
        finish_row<W, Epilogue::Linear>(t, i0 + r, c0, nc, acc);
      } else {
        store_gate_projection<W>(t, i0 + r, c0, nc, acc);
      }
    }
  }

  // Rows [i0, i0 + m), m <= 2 * amx::kRows, by one panel of W vectors on AMX
  // tiles (amx_tiles.h): the sums go through memory into tile()'s epilogue.
  template <int W, Epilogue E>
  static FASTRNN_INLINE void amx_rows(const StepTask<T>& t, int64_t i0, int m, const T* panel,
                                      int64_t c0, int nc) {
    static_assert(std::is_same_v<T, float> && N == amx::kWords);
    alignas(64) float sums[2 * amx::kRows][W * N];
    for (int r = 0; r < m; ++r) prefetch_epilogue<1, W, E>(t, i0 + r, c0);
    const int64_t lda = pairs::row_words(t.K_x, t.K), Qx = pairs::words(t.K_x);
    const uint32_t* x = t.a_pairs + (i0 - t.row_begin) * lda;
    const uint32_t* px = reinterpret_cast<const uint32_t*>(panel);
    const amx::Part xs{x, px, Qx};
    const amx::Part as{x + Qx, px + Qx * W * N,
                       t.a_hi_zero && i0 >= t.a_split ? 0 : pairs::words(t.K)};
    if constexpr (E == Epilogue::Forward || E == Epilogue::GruForward) {
      if (Qx > 0) {
        amx_sums<W>(m, {xs, {}}, lda, sums);
        amx_finish<W, E, true>(t, i0, m, c0, nc, sums);
        amx_sums<W>(m, {{}, as}, lda, sums);
        amx_finish<W, E, false>(t, i0, m, c0, nc, sums);
        return;
      }
    }
    amx_sums<W>(m, {xs, as}, lda, sums);
    amx_finish<W, E, false>(t, i0, m, c0, nc, sums);
  }

  // step() on AMX tiles: row tiles in pairs, the panels as step()'s.
  template <Epilogue E>
  static FASTRNN_INLINE void step_amx(const StepTask<T>& t) {
    amx::configure();
    // The cells' forward panels: every gate of N units (step()).
    constexpr bool cell = E == Epilogue::LstmForward || E == Epilogue::GruForward;
    const int64_t stride = (t.K_x + t.K) * kNR;
    const int64_t n = t.row_end - t.row_begin;
    for (int64_t p = t.panel_begin; p < t.panel_end; ++p) {
      const T* panel = t.panels + (p - t.panel_begin) * stride;
      const int64_t c0 = cell ? p * N : p * kNR;
      const int nc = static_cast<int>(std::min<int64_t>(cell ? N : kNR, t.H - c0));
      for (int64_t i = 0; i < n; i += 2 * amx::kRows) {
        const int m = static_cast<int>(std::min<int64_t>(2 * amx::kRows, n - i));
        if (!cell && NV > 1 && nc <= N) {
          amx_rows<1, E>(t, t.row_begin + i, m, panel, c0, nc);
        } else {
          amx_rows<NV, E>(t, t.row_begin + i, m, panel, c0, nc);
        }
      }
    }
    amx::release();
  }
#endif

  // Rows [i0, i0 + M) by one panel of W vectors ([K][W * N], or pairs of it).
  template <int M, int W, Epilogue E, bool Bf16 = false>
  static FASTRNN_INLINE void tile(const StepTask<T>& t, int64_t i0, const T* panel, int64_t c0,
                                  int nc, L2Ahead ahead) {
    V acc[M][W];
    for (int r = 0; r < M; ++r) {
      for (int v = 0; v < W; ++v) acc[r][v] = V{};
    }
    const int64_t K = t.K;
    if constexpr (E == Epilogue::LinearAT && Bf16) {
#if FASTRNN_BF16_DISPATCH
      // The tile's M pairs at each q are adjacent (a_pairs' LinearAT layout).
      const int64_t ld = t.row_end - t.row_begin;
      const uint32_t* a = t.a_pairs + (i0 - t.row_begin);
      const uint32_t* p = reinterpret_cast<const uint32_t*>(panel);
      for (int64_t q = 0; q < (K + 1) / 2; ++q) {
        uint32_t x[M];
        for (int r = 0; r < M; ++r) x[r] = a[q * ld + r];
        multiply_add_pair<M, W>(acc, x, p + q * W * N);
      }
#endif
    } else if constexpr (E == Epilogue::LinearAT) {
      // The tile's M values of A at each k are adjacent (one cache line), and
      // each k's line is lda elements past the last one's.
      const T* a = t.a_lo.base + i0;
      const int64_t lda = t.a_lo.ld;
      auto at_k = [&](int64_t k) {
        V b[W];
        for (int v = 0; v < W; ++v) simd::load(b[v], panel + (k * W + v) * N);
        for (int r = 0; r < M; ++r) {
          const T x = a[k * lda + r];
          for (int v = 0; v < W; ++v) acc[r][v] = acc[r][v] + x * b[v];
        }
      };
      // The hardware does not fetch that stride ahead on every CPU: on Zen 4
      // the first multiply-add of each k waited for its line (a quarter of
      // the kernel's time), so the line kLinearAhead k ahead is asked for.
      const int64_t head = std::max<int64_t>(0, K - kLinearAhead);
      int64_t k = 0;
      for (; k < head; ++k) {
        __builtin_prefetch(a + (k + kLinearAhead) * lda);
        at_k(k);
      }
      for (; k < K; ++k) at_k(k);
    } else {
      if constexpr (E == Epilogue::Forward || E == Epilogue::LstmForward || E == Epilogue::GruForward) {
        if (t.K_x > 0) {
          std::conditional_t<Bf16, const uint32_t*, const T*> x[M];
          for (int r = 0; r < M; ++r) {
            if constexpr (Bf16) {
              x[r] = t.a_pairs + (i0 + r - t.row_begin) * pairs::row_words(t.K_x, K);
            } else {
              x[r] = t.x.row(i0 + r);
            }
          }
          product<M, W, E>(t, i0, c0, acc, x, panel, t.K_x, false, ahead);
          panel += (Bf16 ? (t.K_x + 1) / 2 : t.K_x) * W * N;
          if constexpr (E == Epilogue::Forward || E == Epilogue::GruForward) {
            // P = x_t W_ih^T + bias where the epilogue reads it, as the projection
            // outside writes it: the same bits either way (an Elman step sums P and
            // the recurrent product apart, as torch does; relu's derivative would
            // flip at pre-activations that round to the other side of 0). The GRU
            // keeps them apart anyway: r scales only the recurrent sum of n.
            if constexpr (E == Epilogue::Forward) {
              finish_rows<M, W, Epilogue::Linear>(t, i0, c0, nc, acc);
            } else {
              for (int r = 0; r < M; ++r) store_gate_projection<W>(t, i0 + r, c0, nc, acc[r]);
            }
            for (int r = 0; r < M; ++r) {
              for (int v = 0; v < W; ++v) acc[r][v] = V{};
            }
          }
        }
      }
      std::conditional_t<Bf16, const uint32_t*, const T*> a[M];
      for (int r = 0; r < M; ++r) {
        const int64_t i = i0 + r;
        if constexpr (Bf16) {
          a[r] = t.a_pairs + (i - t.row_begin) * pairs::row_words(t.K_x, K) + pairs::words(t.K_x);
        } else {
          a[r] = i < t.a_split ? t.a_lo.row(i) : t.a_hi.row(i);
        }
      }
      const int64_t depth = t.a_hi_zero && i0 >= t.a_split ? 0 : K;
      product<M, W, E>(t, i0, c0, acc, a, panel, depth, E != Epilogue::Linear, ahead);
    }
    finish_rows<M, W, E>(t, i0, c0, nc, acc);
  }

  // A tile of m rows, 1 <= m <= MR: one unrolled kernel per row count.
  template <int W, Epilogue E, bool Bf16, int M = MR>
  static FASTRNN_INLINE void tile_rows(int m, const StepTask<T>& t, int64_t i0, const T* panel,
                                       int64_t c0, int nc, const L2Ahead& ahead) {
    if (m == M) {
      tile<M, W, E, Bf16>(t, i0, panel, c0, nc, ahead);
    } else if constexpr (M > 1) {
      tile_rows<W, E, Bf16, M - 1>(m, t, i0, panel, c0, nc, ahead);
    }
  }

  // next: the panel to fetch into L2 meanwhile (StepTask::l2_ahead; lines of 64 bytes),
  // a slice per row tile. Not for a single row: its tiles wait on the panel's loads, not on
  // their multiply-adds, and fetching the next panel beside them was no faster (B = 1:
  // 0.96x-0.97x in three A/Bs, about the noise).
  template <int W, Epilogue E, bool Bf16>
  static FASTRNN_INLINE void panel_rows(const StepTask<T>& t, const T* panel, int64_t c0, int nc,
                                        L2Ahead next = {}) {
    // Row tiles as even as possible (50 rows: 8 + 6 * 7, not 6 * 8 + 2).
    const int64_t n = t.row_end - t.row_begin;
    const int64_t tiles = (n + MR - 1) / MR;
    const int64_t base = n / tiles, extra = n % tiles;
    if (n < 2) next.lines = 0;
    const int64_t slice = (next.lines + tiles - 1) / tiles;
    // A tile spreads its slice over its k, but asks for at most one line for every two it
    // loads a k. At one a k, batch 8 fetched half of an LSTM's next panel (4 lines a k, two
    // tiles of 4 rows) and a third of a GRU's (3 lines a k, one tile): two a k ran 1.04x-1.15x
    // faster. An Elman panel's 2 lines a k, both asked for, were slower (0.93x-0.98x).
    const int64_t depth = t.K_x + t.K, loaded = W * N * static_cast<int64_t>(sizeof(T)) / 64;
    const int per_k = static_cast<int>(
        std::clamp<int64_t>((slice + depth - 1) / depth, 1, std::max<int64_t>(1, (loaded + 1) / 2)));
    int64_t i = t.row_begin;
    for (int64_t b = 0; b < tiles; ++b) {
      const int m = static_cast<int>(base + (b < extra));
      const int64_t first = std::min(next.lines, b * slice);
      tile_rows<W, E, Bf16>(m, t, i, panel, c0, nc,
                            L2Ahead{next.p + first * 64, std::min(slice, next.lines - first), per_k});
      i += m;
    }
  }

  // What the row tiles of panel p fetch into L2 (StepTask::l2_ahead): panel p + 1 of the
  // slot's, or after its last its first; `stride`: elements from one panel to the next.
  template <bool Bf16>
  static FASTRNN_INLINE L2Ahead next_panel(const StepTask<T>& t, int64_t p, int64_t stride) {
    if (Bf16 || !t.l2_ahead) return {};
    const int64_t q = p + 1 < t.panel_end ? p + 1 : t.panel_begin;
    return {reinterpret_cast<const char*>(t.panels + (q - t.panel_begin) * stride),
            stride * static_cast<int64_t>(sizeof(T)) / 64};
  }

  // Bf16: the panels hold pairs of bfloat16 (bf16_pairs.h; float32 on AVX512-BF16 only).
  template <Epilogue E, bool Bf16 = false>
  static FASTRNN_INLINE void step(const StepTask<T>& t) {
    if (t.row_end <= t.row_begin) return;
#if FASTRNN_BF16_DISPATCH
    if constexpr (E == Epilogue::LinearAT && Bf16) {
      const int64_t n = t.row_end - t.row_begin;
#if FASTRNN_AMX_DISPATCH
      if (t.amx) {
        // The tiles take A's rows as rows, as the other kernels round them.
        to_row_pairs(t.a_lo.base + t.row_begin, t.a_lo.ld, t.K, n, t.a_pairs, pairs::row_words(0, t.K));
        step_amx<E>(t);
        return;
      }
#endif
      to_pairs(t.a_lo.base + t.row_begin, t.a_lo.ld, t.K, n, t.a_pairs, n);
    } else if constexpr (Bf16) {
      const int64_t ld = pairs::row_words(t.K_x, t.K);
      for (int64_t i = t.row_begin; i < t.row_end; ++i) {
        uint32_t* row = t.a_pairs + (i - t.row_begin) * ld;
        if (t.K_x > 0) pairs::round_row(t.x.row(i), t.K_x, row);
        pairs::round_row(i < t.a_split ? t.a_lo.row(i) : t.a_hi.row(i), t.K, row + pairs::words(t.K_x));
      }
#if FASTRNN_AMX_DISPATCH
      if (t.amx) {
        step_amx<E>(t);
        return;
      }
#endif
    }
#endif
    if constexpr (E == Epilogue::LstmForward || E == Epilogue::GruForward) {
      // Panel p: units [p*N, p*N + N), all NV (= G) gates of each; a last panel
      // of at most N / 2 units on half vectors (kHalfTail).
      for (int64_t p = t.panel_begin; p < t.panel_end; ++p) {
        const int64_t stride = (t.K_x + t.K) * kNR;
        const T* panel = t.panels + (p - t.panel_begin) * stride;
        const L2Ahead next = next_panel<Bf16>(t, p, stride);
        const int64_t u0 = p * N;
        const int nu = static_cast<int>(std::min<int64_t>(N, t.H - u0));
        if constexpr (kHalfTail<Bf16>) {
          if (nu <= N / 2) {
            TileKernel<T, N / 2, NV, MR>::template panel_rows<NV, E, Bf16>(t, panel, u0, nu, next);
            continue;
          }
        }
        panel_rows<NV, E, Bf16>(t, panel, u0, nu, next);
      }
      return;
    }
    for (int64_t p = t.panel_begin; p < t.panel_end; ++p) {
      const int64_t stride = (t.K_x + t.K) * kNR;
      const T* panel = t.panels + (p - t.panel_begin) * stride;
      const L2Ahead next = next_panel<Bf16>(t, p, stride);
      const int64_t c0 = p * kNR;
      const int nc = static_cast<int>(std::min<int64_t>(kNR, t.H - c0));
      // The last panel is one vector wide where its columns fit in one, and
      // half a vector (kHalfTail) where they fit in that.
      if (NV > 1 && nc <= N) {
        if constexpr (kHalfTail<Bf16>) {
          if (nc <= N / 2) {
            TileKernel<T, N / 2, NV, MR>::template panel_rows<1, E, Bf16>(t, panel, c0, nc, next);
            continue;
          }
        }
        panel_rows<1, E, Bf16>(t, panel, c0, nc, next);
      } else {
        panel_rows<NV, E, Bf16>(t, panel, c0, nc, next);
      }
    }
  }

  static FASTRNN_INLINE void scale(const ScaleTask<T>& s) {
    for (int64_t i = s.row_begin; i < s.row_end; ++i) {
      T* g = s.g.row(i);
      const T* src = s.src.row(i);
      const T* extra = s.extra.base ? s.extra.row(i) : nullptr;
      const T* y = s.y.row(i);
      for (int64_t c = s.col_begin; c < s.col_end; c += N) {
        const int n = static_cast<int>(std::min<int64_t>(N, s.col_end - c));
        V gv, yv;
        load_part(gv, src + c, n);
        if (extra) {
          V ev;
          load_part(ev, extra + c, n);
          gv = gv + ev;
        }
        load_part(yv, y + c, n);
        grad_(gv, yv, s.act);
        store_part(g + c, gv, n);
      }
    }
  }
};

// Width of panel p: nr columns, or one vector (`lanes`) for a last panel
// whose columns fit in one (TileKernel::step).
inline int panel_width(int64_t H, int nr, int lanes, int64_t p, bool half_tail = false) {
  const int64_t nc = std::min<int64_t>(nr, H - p * nr);
  if (half_tail && nc <= lanes / 2) return lanes / 2;
  return nc <= lanes ? lanes : nr;
}

// dst[k * ld_dst + c] = src[c * ld_src + k] for c < C, k < K: rows of src
// into columns of dst, by 16-byte square tiles through registers (4 x 4 float,
// 2 x 2 double: plain 16-byte vectors, so every ISA's build has them), one
// element at a time at the edges. What packing W's rows into panels costs is
// this transpose: element by element it ran at about 3 cycles per element.
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define FASTRNN_SHUFFLEVECTOR 1
template <typename T>
FASTRNN_INLINE void transpose_tile(const T* src, int64_t ld_src, T* dst, int64_t ld_dst) {
  constexpr int N = 16 / sizeof(T);
  using V = typename simd::Vec<T, N>::type;
  V r[N], out[N];
  for (int i = 0; i < N; ++i) simd::load(r[i], src + i * ld_src);
  if constexpr (N == 4) {
    const V t0 = __builtin_shufflevector(r[0], r[1], 0, 4, 1, 5), t1 = __builtin_shufflevector(r[0], r[1], 2, 6, 3, 7);
    const V t2 = __builtin_shufflevector(r[2], r[3], 0, 4, 1, 5), t3 = __builtin_shufflevector(r[2], r[3], 2, 6, 3, 7);
    out[0] = __builtin_shufflevector(t0, t2, 0, 1, 4, 5);
    out[1] = __builtin_shufflevector(t0, t2, 2, 3, 6, 7);
    out[2] = __builtin_shufflevector(t1, t3, 0, 1, 4, 5);
    out[3] = __builtin_shufflevector(t1, t3, 2, 3, 6, 7);
  } else {
    static_assert(N == 2);
    out[0] = __builtin_shufflevector(r[0], r[1], 0, 2);
    out[1] = __builtin_shufflevector(r[0], r[1], 1, 3);
  }
  for (int i = 0; i < N; ++i) simd::store(dst + i * ld_dst, out[i]);
}
#else
#define FASTRNN_SHUFFLEVECTOR 0  // older GCC: element by element
#endif

template <typename T>
void transpose(const T* src, int64_t ld_src, int64_t C, int64_t K, T* dst, int64_t ld_dst) {
  constexpr int64_t N = 16 / sizeof(T);
  int64_t c = 0;
  for (; FASTRNN_SHUFFLEVECTOR && c + N <= C; c += N) {
    int64_t k = 0;
#if FASTRNN_SHUFFLEVECTOR
    for (; k + N <= K; k += N) transpose_tile(src + c * ld_src + k, ld_src, dst + k * ld_dst + c, ld_dst);
#endif
    for (; k < K; ++k) {
      for (int64_t i = c; i < c + N; ++i) dst[k * ld_dst + i] = src[i * ld_src + k];
    }
  }
  for (; c < C; ++c) {
    for (int64_t k = 0; k < K; ++k) dst[k * ld_dst + c] = src[c * ld_src + k];
  }
}

#if FASTRNN_BF16_DISPATCH
// Columns [0, block) of a panel's rows as pairs of bfloat16 (the Bf16
// kernels' panels), straight from float W: [(K + 1) / 2] pair rows at
// dst + q * ld_dst, column c from W's row c (transposed: K values at
// w + c * ldw) or W's column c (w + k * ldw + c), zero in [nc, block). A row
// of W rounds to its pairs in order (pairs::round_row); 16 rows' blocks of 16
// pairs then go into the panel as pack_panels' floats do (transpose).
FASTRNN_TARGET_AVX512_BF16 inline void pack_pairs(const float* w, int64_t ldw, bool transposed,
                                                  int64_t nc, int64_t K, uint32_t* dst,
                                                  int64_t ld_dst, int64_t block) {
  const int64_t Q = (K + 1) / 2;
  if (transposed) {
    alignas(64) uint32_t rows[16][16];
    for (int64_t c0 = 0; c0 < nc; c0 += 16) {
      const int64_t n = std::min<int64_t>(16, nc - c0);
      for (int64_t k0 = 0; k0 < K; k0 += 32) {
        for (int64_t r = 0; r < n; ++r) pairs::round_row(w + (c0 + r) * ldw + k0, std::min<int64_t>(32, K - k0), rows[r]);
        transpose(&rows[0][0], 16, n, std::min<int64_t>(16, Q - k0 / 2), dst + k0 / 2 * ld_dst + c0, ld_dst);
      }
    }
  } else {
    to_pairs(w, ldw, K, nc, dst, ld_dst);
  }
  for (int64_t q = 0; q < Q; ++q) std::fill(dst + q * ld_dst + nc, dst + q * ld_dst + block, 0u);
}
#endif

// Packs the panels [panel_begin, panel_end) of a product's right operand B
// ([K][cols]) from a row-major W with row stride ldw: transposed, B = W^T
// (W is [cols][K]: panel[k][c] = W[p*nr + c][k]; the forward's W_hh^T, an
// input projection's W_ih^T), or not, B = W (W is [K][cols]: panel[k][c] =
// W[k][p*nr + c]; the backward's W_hh). Zero beyond cols; panel p starts at
// (p - panel_begin) * depth * nr (depth = K unless given), its rows from
// k_offset on (an Elman forward with the input projection inside packs W_ih^T
// into rows [0, I) and W_hh^T into [I, I + H) of each panel). pairs (float
// only, AVX512-BF16): the panels as the Bf16 kernels read them, the rows from
// k_offset on as pairs from pair row (k_offset + 1) / 2 on (x's pairs, then
// A's, as TileKernel::tile reads them).
template <typename T>
void pack_panels(const T* w, int64_t ldw, int64_t cols, int64_t K, int nr, int lanes,
                 bool transposed, int64_t panel_begin, int64_t panel_end, T* dst,
                 int64_t k_offset = 0, int64_t depth = -1, bool pairs = false,
                 bool half_tail = false) {
  if (depth < 0) depth = K;
  for (int64_t p = panel_begin; p < panel_end; ++p) {
    const int64_t c0 = p * nr;
    const int nc = static_cast<int>(std::min<int64_t>(nr, cols - c0));
    const int width = panel_width(cols, nr, lanes, p, half_tail && !pairs);
    T* panel = dst + (p - panel_begin) * depth * nr + k_offset * width;
#if FASTRNN_BF16_DISPATCH
    if constexpr (std::is_same_v<T, float>) {
      if (pairs) {
        uint32_t* out = reinterpret_cast<uint32_t*>(dst + (p - panel_begin) * depth * nr) +
                        (k_offset + 1) / 2 * width;
        pack_pairs(w + (transposed ? c0 * ldw : c0), ldw, transposed, nc, K, out, width, width);
        continue;
      }
    }
#endif
    if (transposed) {
      // In blocks of 16 k: the block's rows of W are read a cache line at a
      // time and its panel rows stay in L1 while they fill.
      constexpr int64_t kb = 16;
      for (int64_t k0 = 0; k0 < K; k0 += kb) {
        const int64_t k1 = std::min(K, k0 + kb);
        transpose(w + c0 * ldw + k0, ldw, nc, k1 - k0, panel + k0 * width, width);
        for (int64_t k = k0; k < k1; ++k) std::fill(panel + k * width + nc, panel + (k + 1) * width, T(0));
      }
    } else {
      for (int64_t k = 0; k < K; ++k) {
        std::memcpy(panel + k * width, w + k * ldw + c0, nc * sizeof(T));
        std::fill(panel + k * width + nc, panel + (k + 1) * width, T(0));
      }
    }
  }
}

// Packs the panels [panel_begin, panel_end) of a cell's forward product
// h_{t-1} W_hh^T with the gates interleaved by unit: w is W_hh, [G*H][K]
// row-major (row g*H + u: gate g of unit u); panel p is [depth][G*lanes]
// with panel[k_offset + k][g*lanes + l] = w[(g*H + p*lanes + l) * K + k],
// zero for units past H; panel p starts at (p - panel_begin) * depth * G *
// lanes. (W_ih and W_hh go into one panel's rows [0, I) and [I, I + H) when
// the input projection is inside.) pairs: as pack_panels'. half_tail (not
// with pairs): a last panel of at most lanes / 2 units is [depth][G * lanes / 2]
// (TileKernel::kHalfTail).
template <typename T>
void pack_gate_panels(const T* w, int64_t H, int64_t K, int G, int lanes, int64_t panel_begin,
                      int64_t panel_end, T* dst, int64_t k_offset = 0, int64_t depth = -1,
                      bool pairs = false, bool half_tail = false) {
  if (depth < 0) depth = K;
  for (int64_t p = panel_begin; p < panel_end; ++p) {
    const int64_t u0 = p * lanes;
    const int64_t nu = std::clamp<int64_t>(H - u0, 0, lanes);  // units of the panel in W
    const int64_t full = static_cast<int64_t>(G) * lanes;
    const int lanes_p = panel_width(H, lanes, lanes, p, half_tail && !pairs);  // units the panel holds
    const int width = G * lanes_p;
    T* panel = dst + (p - panel_begin) * depth * full + k_offset * width;
#if FASTRNN_BF16_DISPATCH
    if constexpr (std::is_same_v<T, float>) {
      if (pairs) {
        uint32_t* out = reinterpret_cast<uint32_t*>(dst + (p - panel_begin) * depth * full) +
                        (k_offset + 1) / 2 * full;
        for (int g = 0; g < G; ++g) {
          pack_pairs(w + (g * H + u0) * K, K, true, nu, K, out + g * lanes, full, lanes);
        }
        continue;
      }
    }
#endif
    constexpr int64_t kb = 16;  // as pack_panels: W's rows a line at a time, the panel rows in L1
    for (int64_t k0 = 0; k0 < K; k0 += kb) {
      const int64_t k1 = std::min(K, k0 + kb);
      for (int g = 0; g < G; ++g) {
        transpose(w + (g * H + u0) * K + k0, K, nu, k1 - k0, panel + k0 * width + g * lanes_p, width);
        for (int64_t k = k0; k < k1; ++k) {
          std::fill(panel + k * width + g * lanes_p + nu, panel + k * width + (g + 1) * lanes_p, T(0));
        }
      }
    }
  }
}

// Turns packed float panels into pairs of bfloat16 in place (the Bf16
// kernels; linear.h, whose panels pack_depth may fill a step's rows at a
// time): panel i of n at dst + i * stride, its K rows width(i) columns wide.
template <typename WidthFn>
void panels_to_pairs(float* dst, int64_t n, int64_t stride, int64_t K, WidthFn width) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t w = width(i);
    to_pairs(dst + i * stride, w, K, w, reinterpret_cast<uint32_t*>(dst + i * stride), w);
  }
}

// The kernels of one ISA for one dtype, and their panel width.
template <typename T>
struct KernelSet {
  int nr;     // columns per panel
  int mr;     // rows per tile at most
  int lanes;  // columns per vector (the width of a narrow last panel)
  void (*forward)(const StepTask<T>&);
  void (*backward)(const StepTask<T>&);
  // forward and backward on bfloat16 pairs (bf16_pairs.h): float32 on CPUs
  // with AVX512-BF16, else null.
  void (*forward_pairs)(const StepTask<T>&);
  void (*backward_pairs)(const StepTask<T>&);
  // Linear / LinearAT (linear.h): AVX-512 only, the one ISA that uses them
  // by default (null elsewhere: the caller keeps BLAS).
  void (*linear)(const StepTask<T>&);
  void (*linear_at)(const StepTask<T>&);
  // Linear / LinearAT on bfloat16 pairs (as forward_pairs).
  void (*linear_pairs)(const StepTask<T>&);
  void (*linear_at_pairs)(const StepTask<T>&);
  void (*scale)(const ScaleTask<T>&);
  // The Elman and product kernels (not on pairs) run a last panel of at most
  // lanes / 2 columns on half vectors (TileKernel::kHalfTail), packed so.
  bool half_tail = false;
};

// The instantiations: (lanes, vectors per panel row, rows per tile) per ISA.
// AVX-512 (32 registers): 8 x 2 vectors = 16 accumulators. AVX2 (16
// registers): 6 x 2 = 12 accumulators, 2 panel vectors and a broadcast.
// Baseline (SSE2 / NEON, 16-byte vectors): 4 x 2.
namespace kernels {

template <typename T>
using Baseline = TileKernel<T, 16 / sizeof(T), 2, 4>;

inline void forward_baseline_f32(const StepTask<float>& t) { Baseline<float>::step<Epilogue::Forward>(t); }
inline void backward_baseline_f32(const StepTask<float>& t) { Baseline<float>::step<Epilogue::Backward>(t); }
inline void scale_baseline_f32(const ScaleTask<float>& s) { Baseline<float>::scale(s); }
inline void forward_baseline_f64(const StepTask<double>& t) { Baseline<double>::step<Epilogue::Forward>(t); }
inline void backward_baseline_f64(const StepTask<double>& t) { Baseline<double>::step<Epilogue::Backward>(t); }
inline void scale_baseline_f64(const ScaleTask<double>& s) { Baseline<double>::scale(s); }

#if FASTRNN_X86_DISPATCH
template <typename T>
using Avx2 = TileKernel<T, 32 / sizeof(T), 2, 6>;
template <typename T>
using Avx512 = TileKernel<T, 64 / sizeof(T), 2, 8>;

FASTRNN_TARGET_AVX2 inline void forward_avx2_f32(const StepTask<float>& t) { Avx2<float>::step<Epilogue::Forward>(t); }
FASTRNN_TARGET_AVX2 inline void backward_avx2_f32(const StepTask<float>& t) { Avx2<float>::step<Epilogue::Backward>(t); }
FASTRNN_TARGET_AVX2 inline void scale_avx2_f32(const ScaleTask<float>& s) { Avx2<float>::scale(s); }
FASTRNN_TARGET_AVX2 inline void forward_avx2_f64(const StepTask<double>& t) { Avx2<double>::step<Epilogue::Forward>(t); }
FASTRNN_TARGET_AVX2 inline void backward_avx2_f64(const StepTask<double>& t) { Avx2<double>::step<Epilogue::Backward>(t); }
FASTRNN_TARGET_AVX2 inline void scale_avx2_f64(const ScaleTask<double>& s) { Avx2<double>::scale(s); }

FASTRNN_TARGET_AVX512 inline void forward_avx512_f32(const StepTask<float>& t) { Avx512<float>::step<Epilogue::Forward>(t); }
FASTRNN_TARGET_AVX512 inline void backward_avx512_f32(const StepTask<float>& t) { Avx512<float>::step<Epilogue::Backward>(t); }
FASTRNN_TARGET_AVX512 inline void linear_avx512_f32(const StepTask<float>& t) { Avx512<float>::step<Epilogue::Linear>(t); }
FASTRNN_TARGET_AVX512 inline void linear_at_avx512_f32(const StepTask<float>& t) { Avx512<float>::step<Epilogue::LinearAT>(t); }
FASTRNN_TARGET_AVX512 inline void scale_avx512_f32(const ScaleTask<float>& s) { Avx512<float>::scale(s); }
FASTRNN_TARGET_AVX512 inline void forward_avx512_f64(const StepTask<double>& t) { Avx512<double>::step<Epilogue::Forward>(t); }
FASTRNN_TARGET_AVX512 inline void backward_avx512_f64(const StepTask<double>& t) { Avx512<double>::step<Epilogue::Backward>(t); }
FASTRNN_TARGET_AVX512 inline void linear_avx512_f64(const StepTask<double>& t) { Avx512<double>::step<Epilogue::Linear>(t); }
FASTRNN_TARGET_AVX512 inline void linear_at_avx512_f64(const StepTask<double>& t) { Avx512<double>::step<Epilogue::LinearAT>(t); }
FASTRNN_TARGET_AVX512 inline void scale_avx512_f64(const ScaleTask<double>& s) { Avx512<double>::scale(s); }
#endif
#if FASTRNN_BF16_DISPATCH
FASTRNN_TARGET_AVX512_BF16 inline void forward_avx512_pairs(const StepTask<float>& t) { Avx512<float>::step<Epilogue::Forward, true>(t); }
FASTRNN_TARGET_AVX512_BF16 inline void backward_avx512_pairs(const StepTask<float>& t) { Avx512<float>::step<Epilogue::Backward, true>(t); }
FASTRNN_TARGET_AVX512_BF16 inline void linear_avx512_pairs(const StepTask<float>& t) { Avx512<float>::step<Epilogue::Linear, true>(t); }
FASTRNN_TARGET_AVX512_BF16 inline void linear_at_avx512_pairs(const StepTask<float>& t) { Avx512<float>::step<Epilogue::LinearAT, true>(t); }
#endif

}  // namespace kernels

template <typename T>
KernelSet<T> kernel_set(simd::Isa isa) {
  using namespace kernels;
  constexpr bool f32 = std::is_same_v<T, float>;
#if FASTRNN_X86_DISPATCH
  if (isa == simd::Isa::Avx512) {
    if constexpr (f32) {
#if FASTRNN_BF16_DISPATCH
      const bool pairs = simd::has_bf16_dot();
      const auto forward_pairs = pairs ? forward_avx512_pairs : nullptr;
      const auto backward_pairs = pairs ? backward_avx512_pairs : nullptr;
      const auto linear_pairs = pairs ? linear_avx512_pairs : nullptr;
      const auto linear_at_pairs = pairs ? linear_at_avx512_pairs : nullptr;
#else
      const decltype(&forward_avx512_f32) forward_pairs = nullptr, backward_pairs = nullptr,
                                          linear_pairs = nullptr, linear_at_pairs = nullptr;
#endif
      return {Avx512<T>::kNR, Avx512<T>::kMR, Avx512<T>::kLanes, forward_avx512_f32, backward_avx512_f32, forward_pairs, backward_pairs, linear_avx512_f32, linear_at_avx512_f32, linear_pairs, linear_at_pairs, scale_avx512_f32, Avx512<T>::template kHalfTail<false>};
    } else {
      return {Avx512<T>::kNR, Avx512<T>::kMR, Avx512<T>::kLanes, forward_avx512_f64, backward_avx512_f64, nullptr, nullptr, linear_avx512_f64, linear_at_avx512_f64, nullptr, nullptr, scale_avx512_f64, Avx512<T>::template kHalfTail<false>};
    }
  }
  if (isa == simd::Isa::Avx2) {
    if constexpr (f32) {
      return {Avx2<T>::kNR, Avx2<T>::kMR, Avx2<T>::kLanes, forward_avx2_f32, backward_avx2_f32, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, scale_avx2_f32};
    } else {
      return {Avx2<T>::kNR, Avx2<T>::kMR, Avx2<T>::kLanes, forward_avx2_f64, backward_avx2_f64, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, scale_avx2_f64};
    }
  }
#else
  (void)isa;
#endif
  if constexpr (f32) {
    return {Baseline<T>::kNR, Baseline<T>::kMR, Baseline<T>::kLanes, forward_baseline_f32, backward_baseline_f32, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, scale_baseline_f32};
  } else {
    return {Baseline<T>::kNR, Baseline<T>::kMR, Baseline<T>::kLanes, forward_baseline_f64, backward_baseline_f64, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, scale_baseline_f64};
  }
}

}  // namespace fastrnn::cpu
