// csrc/cuda/persistent.cuh's kernels, compiled for the CPU: each CUDA thread a
// fiber (a stack of its own, entered once by a ucontext), all of a cluster's on one OS thread;
// per cluster a barrier and a buffer per CTA for its shared memory (in_rank maps
// an address between them); per CTA a barrier; per warp a barrier and a slot per
// lane for its shuffles and votes; a word for each mbarrier. A thread that waits
// (at a barrier, on an mbarrier's phase) yields, and the fibers run in turns, each
// turn in a new pseudo-random order: the interleavings of threads racing, but
// reproducible; and a switch costs a fraction of a microsecond, against a futex
// wake-up for an OS thread (a 16-CTA cluster is 4096 threads).
// The kernels' own code runs, cluster by cluster; only the primitives below and
// the launch are the host's.
// tests/test_persistent_on_host.py builds this file and checks the kernels
// against autograd, with a layer's worth of arguments: contiguous [rows, width]
// buffers, launch shape (units, tile, cluster size) given; and asks
// persistent::plan where layers run on a given device.
#if defined(__APPLE__)
#define _XOPEN_SOURCE 700  // <ucontext.h>'s functions: deprecated there, but present
#endif
// A turn ends and starts with _setjmp/_longjmp between the fibers' stacks; a fortified
// longjmp takes a jump to another stack for a corrupt one and aborts.
#undef _FORTIFY_SOURCE
#include <setjmp.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define FASTRNN_PERSISTENT_ON_HOST

using std::max;
using std::min;

struct dim3 {
  unsigned x = 0, y = 0, z = 0;
};

// Gives the turn to the next fiber (launch's scheduler).
void yield_turn();

struct Barrier {
  explicit Barrier(int count) : expected(count) {}
  void arrive_and_wait() {
    const uint64_t phase = generation;
    if (++arrived == expected) {
      arrived = 0;
      ++generation;
      return;
    }
    while (generation == phase) yield_turn();
  }
  int expected, arrived = 0;
  uint64_t generation = 0;
};
struct Cluster {
  Barrier* barrier;
  std::vector<unsigned char*> smem;
  std::vector<std::unique_ptr<Barrier>> cta;  // each CTA's own barrier
};
struct Warp {
  Barrier barrier{32};
  unsigned char slot[32][sizeof(double)];
};
// The running fiber's CUDA thread: set by the scheduler before each turn.
dim3 threadIdx, blockIdx;
Cluster* this_cluster = nullptr;
unsigned this_rank = 0;
Warp* this_warp = nullptr;

// The fibers of a launch, and whose turn it is. A fiber's first turn enters its context
// (swapcontext); every later switch is a _setjmp/_longjmp pair, which, unlike swapcontext,
// makes no system call for the signal mask (one per swapcontext, two per turn: they took
// over half of tests/test_persistent_on_host.py's time).
struct Fiber {
  ucontext_t context;
  jmp_buf jump;  // where its next turn resumes, once started
  std::unique_ptr<unsigned char[]> stack;
  dim3 thread, block;
  unsigned rank = 0;
  Warp* warp = nullptr;
  bool started = false, done = false;
};
ucontext_t scheduler;
jmp_buf scheduler_jump;  // where the running fiber's turn returns to
Fiber* running = nullptr;
const std::function<void()>* fiber_body = nullptr;

void yield_turn() {
  if (_setjmp(running->jump) == 0) _longjmp(scheduler_jump, 1);
}

inline void cluster_sync(int) { this_cluster->barrier->arrive_and_wait(); }
inline void cta_sync() { this_cluster->cta[this_rank]->arrive_and_wait(); }
inline unsigned cluster_rank(int) { return this_rank; }
template <typename U>
U* in_rank(U* p, unsigned rank, int) {
  const auto offset = reinterpret_cast<unsigned char*>(p) - this_cluster->smem[this_rank];
  return reinterpret_cast<U*>(this_cluster->smem[rank] + offset);
}
inline unsigned char* shared_memory() { return this_cluster->smem[this_rank]; }
// Every lane posts its value, then reads its partner's; the second wait keeps a
// lane's next post from overwriting a value not yet read.
template <typename U>
U lane_xor(U v, int mask) {
  static_assert(sizeof(U) <= sizeof(double));
  const unsigned lane = threadIdx.x % 32;
  std::memcpy(this_warp->slot[lane], &v, sizeof(U));
  this_warp->barrier.arrive_and_wait();
  U other;
  std::memcpy(&other, this_warp->slot[lane ^ static_cast<unsigned>(mask)], sizeof(U));
  this_warp->barrier.arrive_and_wait();
  return other;
}

bool warp_any(bool v) {
  const unsigned lane = threadIdx.x % 32;
  this_warp->slot[lane][0] = v;
  this_warp->barrier.arrive_and_wait();
  bool any = false;
  for (auto& slot : this_warp->slot) any = any || slot[0];
  this_warp->barrier.arrive_and_wait();
  return any;
}
inline void warp_sync() { this_warp->barrier.arrive_and_wait(); }
inline void copy_async(void* dst, const void* src, size_t bytes) { std::memcpy(dst, src, bytes); }
template <typename T>
void copy_value(T* dst, const T* src) {
  *dst = *src;
}
inline void copy_async_wait() {}

// An mbarrier as the kernels use it (one arrival per phase, and bytes): its
// phase, pending arrivals and transaction count in one 64-bit word.
// add(bar, bytes, arrivals) counts bytes and arrivals in; the phase completes
// when both are in (the count may run ahead of the announcement).
constexpr uint64_t kPhaseBit = uint64_t{1} << 48;
void add(uint64_t* bar, int64_t bytes, unsigned arrivals) {
  const uint64_t seen = *bar;
  int32_t tx = static_cast<int32_t>(static_cast<uint32_t>(seen));
  unsigned pending = static_cast<unsigned>(seen >> 32) & 0xffff;
  uint64_t phase = seen & kPhaseBit;
  tx += static_cast<int32_t>(bytes);
  pending -= arrivals;
  if (pending == 0 && tx == 0) {
    phase ^= kPhaseBit;
    pending = 1;
  }
  *bar = static_cast<uint32_t>(tx) | (static_cast<uint64_t>(pending) << 32) | phase;
}
inline void mbarrier_init(uint64_t* bar) { *bar = uint64_t{1} << 32; }
inline void publish_mbarriers() {}  // the cluster barrier after it orders the host's stores
inline void arrive_expect(uint64_t* bar, uint32_t bytes) { add(bar, bytes, 1); }
template <typename U>
void store_counted(U* dst, U v, uint64_t* bar, unsigned rank) {
  *in_rank(dst, rank, 0) = v;
  add(in_rank(bar, rank, 0), -static_cast<int64_t>(sizeof(U)), 0);
}
inline void wait_phase(uint64_t* bar, unsigned parity) {
  const uint64_t incomplete = parity ? kPhaseBit : 0;
  while ((*static_cast<volatile uint64_t*>(bar) & kPhaseBit) == incomplete) yield_turn();
}

#include "cuda/persistent.cuh"

using namespace fastrnn;
using namespace fastrnn::persistent;

namespace {

[[noreturn]] void fiber_main() {
  (*fiber_body)();
  running->done = true;
  // Back to the scheduler's latest turn (the context's uc_link would be its first).
  _longjmp(scheduler_jump, 1);
}

// The context switches stay out of launch, whose locals would otherwise live
// across them (getcontext and _setjmp return twice).
[[gnu::noinline]] void start(Fiber& f, size_t stack_bytes) {
  f.stack.reset(new unsigned char[stack_bytes]);
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack.get();
  f.context.uc_stack.ss_size = stack_bytes;
  f.context.uc_link = nullptr;  // fiber_main never returns
  makecontext(&f.context, fiber_main, 0);
}

[[gnu::noinline]] void resume(Fiber& f) {  // f's turn, until it waits or ends
  running = &f;
  threadIdx = f.thread;
  blockIdx = f.block;
  this_rank = f.rank;
  this_warp = f.warp;
  if (_setjmp(scheduler_jump) != 0) return;  // the turn ended
  if (f.started) _longjmp(f.jump, 1);
  f.started = true;
  swapcontext(&scheduler, &f.context);
}

// Runs kernel() as `clusters` clusters of `size` CTAs of kThreads threads, one
// cluster at a time, each CTA with smem_bytes of shared memory (filled with
// garbage, as a GPU's would be).
void launch(int64_t batch, int tile, int size, size_t smem_bytes, const std::function<void()>& kernel) {
  constexpr size_t kStack = 256 * 1024;  // the kernels' locals take a few KB; untouched pages cost nothing
  const int64_t clusters = (batch + tile - 1) / tile;
  const int count = size * kThreads;
  uint64_t seed = 0x9E3779B97F4A7C15u;  // the turns' orders, the same every run
  for (int64_t c = 0; c < clusters; ++c) {
    Barrier barrier(count);
    std::vector<std::vector<unsigned char>> memory(size, std::vector<unsigned char>(smem_bytes, 0xCD));
    Cluster cluster{&barrier, {}, {}};
    for (auto& m : memory) {
      cluster.smem.push_back(m.data());
      cluster.cta.push_back(std::make_unique<Barrier>(kThreads));
    }
    std::vector<std::unique_ptr<Warp>> warps;
    for (int w = 0; w < count / 32; ++w) warps.push_back(std::make_unique<Warp>());
    std::vector<Fiber> fibers(count);
    fiber_body = &kernel;
    this_cluster = &cluster;
    for (int i = 0; i < count; ++i) {
      Fiber& f = fibers[i];
      f.thread.x = i % kThreads;
      f.rank = i / kThreads;
      f.block.x = static_cast<unsigned>(c * size + f.rank);
      f.warp = warps[i / 32].get();
      start(f, kStack);
    }
    std::vector<int> order(count);
    for (int i = 0; i < count; ++i) order[i] = i;
    for (int alive = count; alive > 0;) {
      for (int i = count - 1; i > 0; --i) {  // Fisher-Yates with a 64-bit LCG
        seed = seed * 6364136223846793005u + 1442695040888963407u;
        std::swap(order[i], order[(seed >> 33) % static_cast<uint64_t>(i + 1)]);
      }
      for (int i : order) {
        Fiber& f = fibers[i];
        if (f.done) continue;
        resume(f);
        alive -= f.done;
      }
    }
  }
}

// The kernels' Runs for batch sizes bs [steps], null for a padded sequence
// (the tests check that bs fits first: count_runs).
Runs runs_of(const int64_t* bs, int64_t steps) {
  Runs r{};
  if (bs) make_runs(bs, steps, r);
  return r;
}

// The kernels, arithmetic in double, on buffers of T: double, or float for
// W_hh's slice in a storage type narrower than the arithmetic's (the half
// types' case on a GPU). bs: batch sizes [steps], null for a padded sequence.
template <typename T>
T* as(void* p) {
  return static_cast<T*>(p);
}

template <typename T, typename acc_t>
void elman_forward_as(void* out, void* hx, void* w, const int64_t* bs, int64_t steps, int64_t batch, int H,
                      int units, int tile, int size, bool reverse, int act) {
  const Runs runs = runs_of(bs, steps);
  launch(batch, tile, size, forward_smem<T, acc_t>(H, units, tile), [&] {
    (act ? forward_kernel<T, acc_t, Activation::Relu> : forward_kernel<T, acc_t, Activation::Tanh>)(
        as<T>(out), H, as<T>(hx), H, as<T>(w), runs, steps, batch, H, units, tile, size, reverse);
  });
}

template <typename T, typename acc_t>
void elman_backward_as(void* dA, void* out, void* grad_hx, void* w, const int64_t* bs, int64_t steps,
                       int64_t batch, int H, int units, int tile, int size, bool reverse, int act) {
  const Runs runs = runs_of(bs, steps);
  launch(batch, tile, size, backward_smem<T, acc_t>(H, units, tile), [&] {
    (act ? backward_kernel<T, acc_t, Activation::Relu> : backward_kernel<T, acc_t, Activation::Tanh>)(
        as<T>(dA), H, as<T>(out), H, as<T>(grad_hx), H, as<T>(w), runs, steps, batch, H, units, tile, size,
        reverse);
  });
}

template <typename T, typename acc_t>
void lstm_forward_as(void* gates, void* c, void* out, void* h0, void* c0, void* w, const int64_t* bs,
                     int64_t steps, int64_t batch, int H, int units, int tile, int size, bool reverse) {
  const Runs runs = runs_of(bs, steps);
  launch(batch, tile, size, lstm_forward_smem<T, acc_t>(H, units, tile), [&] {
    lstm_forward_kernel<T, acc_t>(as<T>(gates), 4 * H, as<T>(c), H, as<T>(out), H, as<T>(h0), H, as<T>(c0), H,
                                   as<T>(w), runs, steps, batch, H, units, tile, size, reverse);
  });
}

template <typename T, typename acc_t>
void lstm_backward_as(void* dh, void* gates, void* c, void* c0, void* dc_n, void* grad_hx, void* grad_cx,
                      void* w, const int64_t* bs, int64_t steps, int64_t batch, int H, int units, int tile,
                      int size, bool reverse) {
  const Runs runs = runs_of(bs, steps);
  launch(batch, tile, size, lstm_backward_smem<T, acc_t>(H, units, tile), [&] {
    lstm_backward_kernel<T, acc_t>(as<T>(dh), H, as<T>(gates), 4 * H, as<T>(c), H, as<T>(c0), H, as<T>(dc_n), H,
                                    as<T>(grad_hx), H, as<T>(grad_cx), H, as<T>(w), runs, steps, batch, H, units,
                                    tile, size, reverse);
  });
}

template <typename T, typename acc_t>
void gru_forward_as(void* gates, void* hn, void* out, void* h0, void* w, void* b_hh, const int64_t* bs,
                    int64_t steps, int64_t batch, int H, int units, int tile, int size, bool reverse) {
  const Runs runs = runs_of(bs, steps);
  launch(batch, tile, size, gru_forward_smem<T, acc_t>(H, units, tile), [&] {
    gru_forward_kernel<T, acc_t>(as<T>(gates), 3 * H, as<T>(hn), H, as<T>(out), H, as<T>(h0), H, as<T>(w),
                                  as<T>(b_hh), runs, steps, batch, H, units, tile, size, reverse);
  });
}

template <typename T, typename acc_t>
void gru_backward_as(void* dh, void* gates, void* hn, void* out, void* h0, void* grad_hx, void* w,
                     const int64_t* bs, int64_t steps, int64_t batch, int H, int units, int tile, int size,
                     bool reverse) {
  const Runs runs = runs_of(bs, steps);
  launch(batch, tile, size, gru_backward_smem<T, acc_t>(H, units, tile), [&] {
    gru_backward_kernel<T, acc_t>(as<T>(dh), H, as<T>(gates), 3 * H, as<T>(hn), H, as<T>(out), H, as<T>(h0), H,
                                   as<T>(grad_hx), H, as<T>(w), runs, steps, batch, H, units, tile, size, reverse);
  });
}

// The most distinct addresses that one bank takes in one phase of a warp's
// vector load, over a step's product (accumulate_rows' loads, through the
// kernels' own run_offset and row_offset): out[0] for W's slice, out[1] for
// the rows of h or dA; 1 means free of bank conflicts. A phase: the threads
// whose loads one pass of the 32 banks serves (8 for 16 bytes each, 16 for 8).
template <typename T, typename acc_t>
void bank_ways(int G, bool backward, int H, int units, int tile, int size, int* out) {
  const Slice s = slice_of<acc_t>(G, H, backward ? G * H : H, units, tile);
  blockIdx.x = 0;
  this_rank = 0;
  const Place p(tile, H, units, tile, size);
  std::vector<Share> shares;
  for (unsigned t = 0; t < kThreads; ++t) {
    threadIdx.x = t;
    shares.emplace_back(p);
  }
  const int R = std::min(kRows, (p.tile + shares[0].groups - 1) / shares[0].groups);
  // ways(bytes per load, address of thread t's load)
  const auto ways = [&](int bytes, const auto& address) {
    int worst = 1;
    const int phase = 128 / bytes;
    for (int w = 0; w < kThreads / 32; ++w) {
      bool reads = false;
      for (int l = 0; l < 32; ++l) reads = reads || shares[w * 32 + l].works;
      if (!reads) continue;  // such warps skip the product
      for (int first = w * 32; first < w * 32 + 32; first += phase) {
        std::vector<std::vector<size_t>> bank(phase);
        for (int t = first; t < first + phase; ++t) {
          const size_t a = address(shares[t]);
          auto& seen = bank[(a / bytes) % phase];
          if (std::find(seen.begin(), seen.end(), a) == seen.end()) seen.push_back(a);
        }
        for (auto& seen : bank) worst = std::max(worst, static_cast<int>(seen.size()));
      }
    }
    return worst;
  };
  out[0] = out[1] = 1;
  for (int m : {0, 1, s.blocks - 1}) {
    for (int c = 0; c < s.C; ++c) {
      out[0] = std::max(out[0], ways(s.V * sizeof(T), [&](const Share& me) {
        return (run_offset(s, me) + static_cast<size_t>(m * s.C + c) * s.V) * sizeof(T);
      }));
    }
    for (int i = 0; i < R; ++i) {
      out[1] = std::max(out[1], ways(16, [&](const Share& me) {
        return static_cast<size_t>(row_offset(s, p, me, i) + m * s.V) * sizeof(acc_t);
      }));
    }
  }
}

// f<T, acc_t> for a mode (below).
#define by_mode(f, mode) ((mode) == 2 ? f<float, float> : (mode) == 1 ? f<float, double> : f<double, double>)

}  // namespace

extern "C" {

// cells.h's CopySteps over [rows, cols] (the copy of CUDA's Backend::copy), in float64.
void copy_steps(double* dst, const double* src, int64_t rows, int64_t cols, int64_t batch, int64_t dst_t,
                int64_t dst_b, int64_t src_t, int64_t src_b) {
  const CopySteps<double> copy{dst, src, batch, dst_t, dst_b, src_t, src_b};
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; ++j) copy(r, j);
  }
}

// persistent::make_runs: the runs of bs [steps], -1 where they do not fit the kernels.
int count_runs(const int64_t* bs, int64_t steps) {
  Runs r{};
  return make_runs(bs, steps, r) ? r.count : -1;
}

// persistent::plan for a layer: cell 0 Elman, 1 LSTM, 2 GRU; its forward or
// backward kernel; storage 0 float, 1 double, 2 a half type (a 2-byte T,
// float arithmetic). out: size, units, tile, clusters.
void plan_layer(int cell, bool backward, int storage, int64_t batch, int64_t H, int max_cluster, int64_t max_smem,
                int64_t sms, int* out) {
  using Half = std::uint16_t;  // the half types' size: all the planner needs of them
  static const SmemBytes kSmem[3][3][2] = {
      {{forward_smem<float, float>, backward_smem<float, float>},
       {lstm_forward_smem<float, float>, lstm_backward_smem<float, float>},
       {gru_forward_smem<float, float>, gru_backward_smem<float, float>}},
      {{forward_smem<double, double>, backward_smem<double, double>},
       {lstm_forward_smem<double, double>, lstm_backward_smem<double, double>},
       {gru_forward_smem<double, double>, gru_backward_smem<double, double>}},
      {{forward_smem<Half, float>, backward_smem<Half, float>},
       {lstm_forward_smem<Half, float>, lstm_backward_smem<Half, float>},
       {gru_forward_smem<Half, float>, gru_backward_smem<Half, float>}}};
  static const int kGates[3] = {1, kLstmGates, kGruGates};
  const Plan p = plan(batch, H, kGates[cell], Device{max_cluster, max_smem, sms}, kSmem[storage][cell][backward]);
  out[0] = p.size;
  out[1] = p.units;
  out[2] = p.tile;
  out[3] = p.clusters;
}

// bank_ways for a layer's forward or backward product: cell 0 Elman, 1 LSTM,
// 2 GRU; storage 0 float, 1 double, 2 a half type; a CTA of a cluster of
// `size` with `units` units and `tile` rows.
void bank_conflicts(int cell, bool backward, int storage, int H, int units, int tile, int size, int* out) {
  static const int kGates[3] = {1, kLstmGates, kGruGates};
  const int G = kGates[cell];
  if (storage == 1) {
    bank_ways<double, double>(G, backward, H, units, tile, size, out);
  } else if (storage == 2) {
    bank_ways<std::uint16_t, float>(G, backward, H, units, tile, size, out);
  } else {
    bank_ways<float, float>(G, backward, H, units, tile, size, out);
  }
}

// The kernels by mode: 0 double; 1 float storage, double arithmetic (a storage
// type narrower than the arithmetic's, as the half types' on a GPU); 2 float
// (float32's own: 4 k per vector load, where double takes 2). The arguments as
// *_as above.
void elman_forward(void* out, void* hx, void* w, const int64_t* bs, int64_t steps, int64_t batch, int H,
                   int units, int tile, int size, bool reverse, int mode, int act) {
  by_mode(elman_forward_as, mode)(out, hx, w, bs, steps, batch, H, units, tile, size, reverse, act);
}

void elman_backward(void* dA, void* out, void* grad_hx, void* w, const int64_t* bs, int64_t steps, int64_t batch,
                    int H, int units, int tile, int size, bool reverse, int mode, int act) {
  by_mode(elman_backward_as, mode)(dA, out, grad_hx, w, bs, steps, batch, H, units, tile, size, reverse, act);
}

void lstm_forward(void* gates, void* c, void* out, void* h0, void* c0, void* w, const int64_t* bs, int64_t steps,
                  int64_t batch, int H, int units, int tile, int size, bool reverse, int mode) {
  by_mode(lstm_forward_as, mode)(gates, c, out, h0, c0, w, bs, steps, batch, H, units, tile, size, reverse);
}

void lstm_backward(void* dh, void* gates, void* c, void* c0, void* dc_n, void* grad_hx, void* grad_cx, void* w,
                   const int64_t* bs, int64_t steps, int64_t batch, int H, int units, int tile, int size,
                   bool reverse, int mode) {
  by_mode(lstm_backward_as, mode)(dh, gates, c, c0, dc_n, grad_hx, grad_cx, w, bs, steps, batch, H, units, tile,
                                  size, reverse);
}

void gru_forward(void* gates, void* hn, void* out, void* h0, void* w, void* b_hh, const int64_t* bs,
                 int64_t steps, int64_t batch, int H, int units, int tile, int size, bool reverse, int mode) {
  by_mode(gru_forward_as, mode)(gates, hn, out, h0, w, b_hh, bs, steps, batch, H, units, tile, size, reverse);
}

void gru_backward(void* dh, void* gates, void* hn, void* out, void* h0, void* grad_hx, void* w, const int64_t* bs,
                  int64_t steps, int64_t batch, int H, int units, int tile, int size, bool reverse, int mode) {
  by_mode(gru_backward_as, mode)(dh, gates, hn, out, h0, grad_hx, w, bs, steps, batch, H, units, tile, size,
                                 reverse);
}

}  // extern "C"
