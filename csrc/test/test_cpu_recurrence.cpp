// C++ test of the fused CPU recurrence's entry points (csrc/cpu/recurrence.h):
// several recurrences run in one parallel region (as both directions of a
// bidirectional layer would, writing into the two column halves of one
// [N, 2H] output) must give exactly the bits of running each alone, and those
// must match a naive loop; a forward with the input projection inside must
// never read the output's entry values and give the bits of projecting
// outside with linear.h's kernels. The bias gradients' column sums give,
// on every ISA the CPU has, the bits of summing each column in row order in
// double.
//
// Exit status 0 on success; every mismatch is printed.
#include "cpu/column_sums.h"
#include "cpu/linear.h"
#include "cpu/recurrence.h"

#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

namespace {

using fastrnn::Activation;
using fastrnn::SequenceLayout;
using fastrnn::StepRows;
namespace cpu = fastrnn::cpu;

int g_failures = 0;

void expect(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAIL: %s\n", what);
    ++g_failures;
  }
}

std::vector<float> randoms(size_t n, unsigned seed, float scale) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = u(gen);
  return v;
}

// h_t = act(P_t + h_{t-1} W^T) in double, over columns [0, H) of rows with stride ld.
void naive_forward(const std::vector<StepRows>& steps, int64_t H, std::vector<float>& out,
                   int64_t off, int64_t ld, const std::vector<float>& h0,
                   const std::vector<float>& w, Activation act) {
  for (const StepRows& st : steps) {
    for (int64_t i = 0; i < st.count; ++i) {
      const float* prev = i < st.carried ? &out[off + (st.prev_begin + i) * ld] : &h0[i * H];
      for (int64_t j = 0; j < H; ++j) {
        double s = out[off + (st.begin + i) * ld + j];
        for (int64_t k = 0; k < H; ++k) s += double(prev[k]) * w[j * H + k];
        out[off + (st.begin + i) * ld + j] =
            act == Activation::Relu ? float(s < 0 ? 0 : s) : float(std::tanh(s));
      }
    }
  }
}

// Every ISA's column sums against the scalar loop in double, bit for bit: widths
// ending inside a vector and a block, column ranges starting at a block (a
// thread's share), rows with a stride wider than the columns.
template <typename T>
void check_column_sums() {
  const int64_t rows = 1000, ld = 203;
  const std::vector<float> src = randoms(rows * ld, 7, 2.f);
  const std::vector<T> t(src.begin(), src.end());
  std::vector<cpu::simd::Isa> isas{cpu::simd::Isa::Baseline};
  if (cpu::simd::runtime_isa() >= cpu::simd::Isa::Avx2) isas.push_back(cpu::simd::Isa::Avx2);
  if (cpu::simd::runtime_isa() >= cpu::simd::Isa::Avx512) isas.push_back(cpu::simd::Isa::Avx512);
  for (cpu::simd::Isa isa : isas) {
    const auto kernel = cpu::column_sums_kernel<T>(isa);
    for (const auto& [c0, c1] : std::vector<std::pair<int64_t, int64_t>>{
             {0, 1}, {0, 7}, {0, 36}, {0, 64}, {0, 100}, {64, 130}, {64, 203}, {128, 193}}) {
      std::vector<T> out(ld, T(-1));
      kernel(out.data(), t.data(), rows, ld, c0, c1);
      bool same = true;
      for (int64_t j = 0; j < ld; ++j) {
        double sum = 0;
        for (int64_t i = 0; i < rows; ++i) sum += static_cast<double>(t[i * ld + j]);
        same = same && (j >= c0 && j < c1 ? out[j] == static_cast<T>(sum) : out[j] == T(-1));
      }
      char what[128];
      std::snprintf(what, sizeof what, "column sums (%s, %s, columns %lld-%lld) = the row-order sums",
                    cpu::simd::isa_name(isa), sizeof(T) == 4 ? "float" : "double",
                    static_cast<long long>(c0), static_cast<long long>(c1));
      expect(same, what);
    }
  }
}

}  // namespace

int main() {
  check_column_sums<float>();
  check_column_sums<double>();

  // A packed batch (lengths 5, 3, 3, 1): both directions share one [N, 2H] output.
  const std::vector<int64_t> sizes{4, 3, 3, 1, 1};
  const SequenceLayout L = SequenceLayout::packed_from(sizes.data(), 5, 4);
  const int64_t H = 37, B = L.batch, N = L.rows, ld = 2 * H;
  for (Activation act : {Activation::Tanh, Activation::Relu}) {
    const std::vector<float> P = randoms(N * ld, 1, 1.f);
    const std::vector<float> h0 = randoms(2 * B * H, 2, 1.f);
    const std::vector<float> w = randoms(2 * H * H, 3, 0.3f);
    const std::vector<StepRows> fwd = fastrnn::steps_in_order(L, false);
    const std::vector<StepRows> rev = fastrnn::steps_in_order(L, true);
    auto job = [&](std::vector<float>& out, int d) {
      return cpu::ForwardRecurrence<float>{d ? rev : fwd, H, out.data() + d * H, ld,
                                           h0.data() + d * B * H, H, w.data() + d * H * H, act};
    };

    std::vector<float> together = P, alone = P, naive = P;
    const cpu::ForwardRecurrence<float> both[2] = {job(together, 0), job(together, 1)};
    expect(cpu::forward_recurrences<float>(both), "forward_recurrences took two jobs");
    for (int d = 0; d < 2; ++d) {
      const cpu::ForwardRecurrence<float> one = job(alone, d);
      cpu::forward_recurrences<float>({&one, 1});
      const std::vector<float> h0d(h0.begin() + d * B * H, h0.begin() + (d + 1) * B * H);
      const std::vector<float> wd(w.begin() + d * H * H, w.begin() + (d + 1) * H * H);
      naive_forward(d ? rev : fwd, H, naive, d * H, ld, h0d, wd, act);
    }
    expect(together == alone, "two recurrences at once give the bits of each alone (forward)");
    double worst = 0;
    for (int64_t i = 0; i < N * ld; ++i) worst = std::max(worst, double(std::fabs(together[i] - naive[i])));
    expect(worst < 1e-4, "forward matches the naive loop");

    // Backward: dA from dY = P's values, joint vs alone.
    const std::vector<float> dY = randoms(N * ld, 4, 1.f);
    std::vector<float> g_together = dY, g_alone = dY, gh_together(2 * B * H), gh_alone(2 * B * H);
    auto bjob = [&](std::vector<float>& g, std::vector<float>& gh, int d) {
      return cpu::BackwardRecurrence<float>{d ? rev : fwd, H, g.data() + d * H, ld,
                                            together.data() + d * H, ld, gh.data() + d * B * H, H,
                                            w.data() + d * H * H, act};
    };
    const cpu::BackwardRecurrence<float> bboth[2] = {bjob(g_together, gh_together, 0),
                                                     bjob(g_together, gh_together, 1)};
    cpu::backward_recurrences<float>(bboth);
    for (int d = 0; d < 2; ++d) {
      const cpu::BackwardRecurrence<float> one = bjob(g_alone, gh_alone, d);
      cpu::backward_recurrences<float>({&one, 1});
    }
    expect(g_together == g_alone && gh_together == gh_alone,
           "two recurrences at once give the bits of each alone (backward)");
  }

  // The input projection inside (x, W_ih and the bias in the job): out starts
  // as NaN, which a read of it would spread.
  for (Activation act : {Activation::Tanh, Activation::Relu}) {
    const int64_t I = 28, H2 = 100, B2 = 64, T2 = 5, N2 = B2 * T2;
    const SequenceLayout P2 = SequenceLayout::padded(T2, B2);
    const std::vector<StepRows> steps = fastrnn::steps_in_order(P2, false);
    const std::vector<float> x = randoms(N2 * I, 5, 1.f), w_ih = randoms(H2 * I, 6, 0.3f);
    const std::vector<float> w_hh = randoms(H2 * H2, 7, 0.1f), bias = randoms(H2, 8, 0.5f);
    const std::vector<float> h0 = randoms(B2 * H2, 9, 1.f);
    std::vector<float> inside(N2 * H2, std::numeric_limits<float>::quiet_NaN());
    cpu::ForwardRecurrence<float> job{steps, H2, inside.data(), H2, h0.data(), H2, w_hh.data(), act,
                                      x.data(), I, 0, I, w_ih.data(), bias.data()};
    expect(cpu::forward_recurrences<float>({&job, 1}), "forward_recurrences took x");

    std::vector<float> outside(N2 * H2);
    cpu::LinearProduct<float> p;
    p.rows = N2, p.cols = H2, p.depth = I;
    p.a = x.data(), p.lda = I, p.w = w_ih.data(), p.ldw = I, p.w_transposed = true;
    p.bias = bias.data(), p.c = outside.data(), p.ldc = H2;
    std::vector<float> naive;
    if (cpu::linear<float>(p)) {  // linear.h's kernels: AVX-512 only
      naive = outside;
      job.out = outside.data(), job.x = nullptr;
      cpu::forward_recurrences<float>({&job, 1});
      expect(inside == outside, "the projection inside gives the bits of linear.h's outside");
    } else {
      naive.assign(N2 * H2, 0.f);
      for (int64_t r = 0; r < N2; ++r) {
        for (int64_t j = 0; j < H2; ++j) {
          double s = bias[j];
          for (int64_t k = 0; k < I; ++k) s += double(x[r * I + k]) * w_ih[j * I + k];
          naive[r * H2 + j] = float(s);
        }
      }
    }
    naive_forward(steps, H2, naive, 0, H2, h0, w_hh, act);
    bool close = true;  // (a NaN compares false)
    for (int64_t i = 0; i < N2 * H2; ++i) close = close && std::fabs(inside[i] - naive[i]) < 1e-4;
    expect(close, "the projection inside matches the naive loop (and read no NaN)");
  }
  expect(cpu::projection_inside<float>(28, 100, 64) && !cpu::projection_inside<float>(28, 100, 7) &&
             !cpu::projection_inside<float>(201, 100, 64) && cpu::projection_inside<double>(200, 100, 8),
         "projection_inside's rule: batch >= 8, I <= 2H");
  {
    // The plan of a GRU forward's product at H = 256, batch 16, on 2 threads (16 panels of
    // 3 vectors, K = 28 + 256, tiles of 8 rows): by rows where a panel costs nothing beyond
    // its tiles' FMAs, by columns (one team of two slots) once streaming it costs
    // (cells_cpu.cpp's kForwardPanelCost), or where a slot's panels (850 KB split by rows)
    // do not sit in its L2 alone (a 512 KB L2, or Intel's crowded one: make_plan's own
    // cost). A batch of 2 at H = 64 stays on rows either way.
    const std::vector<StepRows> steps16(28, StepRows{0, 16, 0, 0, 0});
    const std::vector<StepRows> steps2(28, StepRows{0, 2, 0, 0, 0});
    auto teams = [](const std::vector<StepRows>& st, int64_t H, double panel_cost) {
      cpu::detail::JobShape shape{st, 28 + H, 3 * H, H / 16, 48, 3, 8};
      shape.panel_cost = panel_cost;
      return cpu::detail::make_plan(std::span(&shape, 1), 2, sizeof(float)).team_size;
    };
    // Whether a slot's panels of these bytes cost make_plan their streaming (past L2, or crowding it).
    auto streamed = [](int64_t bytes) {
      return bytes > cpu::detail::l2_bytes() || cpu::detail::l2_crowded(bytes);
    };
    expect(teams(steps16, 256, 0) == (streamed(int64_t{16} * (28 + 256) * 48 * 4) ? std::vector<int64_t>{2}
                                                                               : std::vector<int64_t>{1, 1}),
           "no panel cost: rows where the panels sit in L2");
    expect(teams(steps16, 256, 5) == std::vector<int64_t>{2}, "a panel cost: columns");
    expect(teams(steps2, 64, 5) == std::vector<int64_t>{1, 1}, "small H and batch: rows");
    // An Elman product at H = 1024, batch 4 (32 panels of 2 vectors, K = 32 + 1024: 4.3 MB):
    // split by rows, each slot would stream all its panels from L3 every step
    // (kL3PanelCost); by columns half of them. Where L2 holds them all, rows.
    const std::vector<StepRows> steps4(28, StepRows{0, 4, 0, 0, 0});
    cpu::detail::JobShape elman{steps4, 32 + 1024, 1024, 32, 32, 2, 8};
    const auto elman_teams = cpu::detail::make_plan(std::span(&elman, 1), 2, sizeof(float)).team_size;
    const bool past_l2 = int64_t{32} * 1056 * 32 * 4 > cpu::detail::l2_bytes();
    expect(elman_teams == (past_l2 ? std::vector<int64_t>{2} : std::vector<int64_t>{1, 1}),
           "panels past L2: columns");
    // Elman at H = 512, batch 4 (16 panels, K = 512: 1 MB): split by rows each slot streams
    // all of them with 2 rows a tile; on Intel, where they crowd L2 (half of it or more:
    // kL2PanelCost), columns.
    cpu::detail::JobShape h512{steps4, 512, 512, 16, 32, 2, 8};
    const auto h512_teams = cpu::detail::make_plan(std::span(&h512, 1), 2, sizeof(float)).team_size;
    const int64_t h512_bytes = int64_t{16} * 512 * 32 * 4;
    expect(h512_teams == (streamed(h512_bytes) ? std::vector<int64_t>{2} : std::vector<int64_t>{1, 1}),
           "panels crowding L2 on Intel: columns");
  }
  std::printf("%s\n", g_failures ? "FAILED" : "ok");
  return g_failures ? 1 : 0;
}
