// csrc/cuda/persistent.cuh's kernels, compiled for the CPU: one std::thread per
// CUDA thread, a std::barrier per cluster for its barrier, a buffer per CTA for
// its shared memory (in_rank maps an address between them). The kernels' own
// code runs, cluster by cluster; only these four primitives and the launch are
// the host's. tests/test_persistent_on_host.py builds this file and checks the
// kernels against autograd, float64, with a layer's worth of arguments:
// contiguous [rows, width] buffers, launch shape (units, tile, cluster size) given;
// and asks persistent::plan where layers run on a given device.
#include <algorithm>
#include <barrier>
#include <cstdint>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __grid_constant__
#define FASTRNN_PERSISTENT_ON_HOST

using std::max;
using std::min;

struct dim3 {
  unsigned x = 0, y = 0, z = 0;
};
struct Cluster {
  std::barrier<>* barrier;
  std::vector<unsigned char*> smem;
};
thread_local dim3 threadIdx, blockIdx;
thread_local Cluster* this_cluster = nullptr;
thread_local unsigned this_rank = 0;

inline void cluster_sync(int) { this_cluster->barrier->arrive_and_wait(); }
inline unsigned cluster_rank(int) { return this_rank; }
template <typename U>
U* in_rank(U* p, unsigned rank, int) {
  const auto offset = reinterpret_cast<unsigned char*>(p) - this_cluster->smem[this_rank];
  return reinterpret_cast<U*>(this_cluster->smem[rank] + offset);
}
inline unsigned char* shared_memory() { return this_cluster->smem[this_rank]; }

#include "cuda/persistent.cuh"

using namespace fastrnn;
using namespace fastrnn::persistent;

namespace {

// Runs kernel() as `clusters` clusters of `size` CTAs of kThreads threads, one
// cluster at a time, each CTA with smem_bytes of shared memory (filled with
// garbage, as a GPU's would be).
template <typename Kernel>
void launch(int64_t batch, int tile, int size, size_t smem_bytes, const Kernel& kernel) {
  const int64_t clusters = (batch + tile - 1) / tile;
  for (int64_t c = 0; c < clusters; ++c) {
    std::barrier<> barrier(size * kThreads);
    std::vector<std::vector<unsigned char>> memory(size, std::vector<unsigned char>(smem_bytes, 0xCD));
    Cluster cluster{&barrier, {}};
    for (auto& m : memory) cluster.smem.push_back(m.data());
    std::vector<std::thread> threads;
    for (int r = 0; r < size; ++r) {
      for (int t = 0; t < kThreads; ++t) {
        threads.emplace_back([&, r, t] {
          threadIdx.x = t;
          blockIdx.x = static_cast<unsigned>(c * size + r);
          this_cluster = &cluster;
          this_rank = r;
          kernel();
        });
      }
    }
    for (auto& thread : threads) thread.join();
  }
}

// The kernels' Runs for batch sizes bs [steps], null for a padded sequence
// (the tests check that bs fits first: count_runs).
Runs runs_of(const int64_t* bs, int64_t steps) {
  Runs r{};
  if (bs) make_runs(bs, steps, r);
  return r;
}

}  // namespace

extern "C" {

// persistent::make_runs: the runs of bs [steps], -1 where they do not fit the kernels.
int count_runs(const int64_t* bs, int64_t steps) {
  Runs r{};
  return make_runs(bs, steps, r) ? r.count : -1;
}

// persistent::plan for a layer: cell 0 Elman, 1 LSTM, 2 GRU; its forward or
// backward kernel; float (acc float) or double. out: size, units, tile, clusters.
void plan_layer(int cell, bool backward, bool is_double, int64_t batch, int64_t H, bool clusters,
                int64_t max_smem, int64_t sms, int* out) {
  static const SmemBytes kSmem[2][3][2] = {
      {{forward_smem<float>, backward_smem<float>},
       {lstm_forward_smem<float>, lstm_backward_smem<float>},
       {gru_forward_smem<float>, gru_backward_smem<float>}},
      {{forward_smem<double>, backward_smem<double>},
       {lstm_forward_smem<double>, lstm_backward_smem<double>},
       {gru_forward_smem<double>, gru_backward_smem<double>}}};
  static const int kGates[3] = {1, kLstmGates, kGruGates};
  const Plan p = plan(batch, H, kGates[cell], Device{clusters, max_smem, sms}, kSmem[is_double][cell][backward]);
  out[0] = p.size;
  out[1] = p.units;
  out[2] = p.tile;
  out[3] = p.clusters;
}

// act: 0 tanh, 1 relu. bs: batch sizes [steps], null for a padded sequence.
void elman_forward(double* out, const double* hx, const double* w, const int64_t* bs, int64_t steps,
                   int64_t batch, int H, int units, int tile, int size, bool reverse, int act) {
  const Runs runs = runs_of(bs, steps);
  launch(batch, tile, size, forward_smem<double>(H, units, tile), [&] {
    (act ? forward_kernel<double, double, Activation::Relu> : forward_kernel<double, double, Activation::Tanh>)(
        out, H, hx, H, w, runs, steps, batch, H, units, tile, size, reverse);
  });
}

void elman_backward(double* dA, const double* out, double* grad_hx, const double* w, const int64_t* bs,
                    int64_t steps, int64_t batch, int H, int units, int tile, int size, bool reverse,
                    int act) {
  const Runs runs = runs_of(bs, steps);
  launch(batch, tile, size, backward_smem<double>(H, units, tile), [&] {
    (act ? backward_kernel<double, double, Activation::Relu> : backward_kernel<double, double, Activation::Tanh>)(
        dA, H, out, H, grad_hx, H, w, runs, steps, batch, H, units, tile, size, reverse);
  });
}

void lstm_forward(double* gates, double* c, double* out, const double* h0, const double* c0,
                  const double* w, const int64_t* bs, int64_t steps, int64_t batch, int H, int units,
                  int tile, int size, bool reverse) {
  const Runs runs = runs_of(bs, steps);
  launch(batch, tile, size, lstm_forward_smem<double>(H, units, tile), [&] {
    lstm_forward_kernel<double, double>(gates, 4 * H, c, H, out, H, h0, H, c0, H, w, runs, steps, batch, H,
                                        units, tile, size, reverse);
  });
}

void lstm_backward(double* dh, double* gates, const double* c, const double* c0, const double* dc_n,
                   double* grad_hx, double* grad_cx, const double* w, const int64_t* bs, int64_t steps,
                   int64_t batch, int H, int units, int tile, int size, bool reverse) {
  const Runs runs = runs_of(bs, steps);
  launch(batch, tile, size, lstm_backward_smem<double>(H, units, tile), [&] {
    lstm_backward_kernel<double, double>(dh, H, gates, 4 * H, c, H, c0, H, dc_n, H, grad_hx, H, grad_cx, H,
                                         w, runs, steps, batch, H, units, tile, size, reverse);
  });
}

void gru_forward(double* gates, double* hn, double* out, const double* h0, const double* w,
                 const double* b_hh, const int64_t* bs, int64_t steps, int64_t batch, int H, int units,
                 int tile, int size, bool reverse) {
  const Runs runs = runs_of(bs, steps);
  launch(batch, tile, size, gru_forward_smem<double>(H, units, tile), [&] {
    gru_forward_kernel<double, double>(gates, 3 * H, hn, H, out, H, h0, H, w, b_hh, runs, steps, batch, H,
                                       units, tile, size, reverse);
  });
}

void gru_backward(double* dh, double* gates, double* hn, const double* out, const double* h0,
                  double* grad_hx, const double* w, const int64_t* bs, int64_t steps, int64_t batch, int H,
                  int units, int tile, int size, bool reverse) {
  const Runs runs = runs_of(bs, steps);
  launch(batch, tile, size, gru_backward_smem<double>(H, units, tile), [&] {
    gru_backward_kernel<double, double>(dh, H, gates, 3 * H, hn, H, out, H, h0, H, grad_hx, H, w, runs, steps,
                                        batch, H, units, tile, size, reverse);
  });
}

}  // extern "C"
