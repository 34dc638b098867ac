// fastrnn CPU kernels: the stack driver (stack.h) with the fused Elman
// recurrence (recurrence.h) and the fused LSTM / GRU recurrences
// (cell_recurrence.h) where they take the dtype (float32 and float64; the
// half types' calls run in float32, in_float.h), the cells' pointwise
// math (cells.h) in vectorisable loops after per-step GEMMs elsewhere, and
// the large products on fastrnn's own tiles (linear.h; the weight gradients:
// weight_product.h) where they beat torch's BLAS, else BLAS through torch's
// CPU shims.
#include "../stack.h"
#include "../stepwise.h"
#include "cell_recurrence.h"
#include "column_sums.h"
#include "in_float.h"
#include "linear.h"
#include "recurrence.h"
#include "weight_product.h"

#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cpu.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cstring>
#include <string_view>

namespace fastrnn {
namespace {

// Below this many elements a pointwise pass stays on one thread (torch's own
// grain size for pointwise kernels).
constexpr int64_t kGrain = 32768;

// c = a @ b (+ bias) (+ c) on fastrnn's tiles (linear.h) where they beat
// BLAS: float or double, c with unit column stride not overlapping a or b,
// a and b each row- or column-major, or b a padded sequence's [T, B, K]
// steps with unit column stride (K = T * B rows, row t * B + b), bias [N]
// contiguous. False: not taken.
template <typename T>
bool own_linear(const Tensor& c, const Tensor* bias, const Tensor& a, const Tensor& b,
                bool accumulate) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(b.dim() - 1);
  if (c.stride(1) != 1 || M < 2 || K < 2 || N < 2) return false;
  if (a.scalar_type() != c.scalar_type() || b.scalar_type() != c.scalar_type()) return false;
  cpu::LinearProduct<T> p;
  p.rows = M;
  p.cols = N;
  p.depth = K;
  p.a = a.const_data_ptr<T>();
  if (a.stride(1) == 1) {
    p.lda = a.stride(0);
  } else if (a.stride(0) == 1) {
    p.a_transposed = true;
    p.lda = a.stride(1);
  } else {
    return false;
  }
  if (b.dim() == 3) {
    if (b.stride(2) != 1) return false;
    p.ldw = b.stride(1);
    p.w_step_rows = b.size(1);
    p.ldw_step = b.stride(0);
  } else if (b.stride(0) == 1) {
    p.w_transposed = true;
    p.ldw = b.stride(1);
  } else if (b.stride(1) == 1) {
    p.ldw = b.stride(0);
  } else {
    return false;
  }
  p.w = b.const_data_ptr<T>();
  if (bias) {
    if (bias->dim() != 1 || bias->size(0) != N || !bias->is_contiguous() ||
        bias->scalar_type() != c.scalar_type()) {
      return false;
    }
    p.bias = bias->const_data_ptr<T>();
  }
  p.c = static_cast<T*>(c.data_ptr());
  p.ldc = c.stride(0);
  p.accumulate = accumulate;
  return cpu::linear(p);
}

// c = a @ b (+ bias) (+ c) in plain loops, for products so small that a call
// into torch's BLAS costs more than the arithmetic (a tiny stack's backward
// is a dozen of them per layer). Any strides; float or double.
template <typename T>
void small_gemm(const Tensor& c, const Tensor* bias, const Tensor& a, const Tensor& b,
                bool accumulate) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  const T* A = static_cast<const T*>(a.data_ptr());
  const T* Bm = static_cast<const T*>(b.data_ptr());
  const T* bias_p = bias ? static_cast<const T*>(bias->data_ptr()) : nullptr;
  T* C = static_cast<T*>(c.data_ptr());
  const int64_t as0 = a.stride(0), as1 = a.stride(1), bs0 = b.stride(0), bs1 = b.stride(1);
  const int64_t cs0 = c.stride(0), cs1 = c.stride(1), biass = bias ? bias->stride(0) : 0;
  // A bfloat16 call's operands in bfloat16, as its other products take them (bf16_pairs.h).
  const bool round = std::is_same_v<T, float> && cpu::bf16_products();
  auto operand = [round](T v) {
    if constexpr (std::is_same_v<T, float>) return round ? cpu::round_to_bf16(v) : v;
    return v;
  };
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      T acc = accumulate ? C[i * cs0 + j * cs1] : (bias_p ? bias_p[j * biass] : T(0));
      for (int64_t k = 0; k < K; ++k) acc += operand(A[i * as0 + k * as1]) * operand(Bm[k * bs0 + j * bs1]);
      C[i * cs0 + j * cs1] = acc;
    }
  }
}

constexpr int64_t kSmallGemmFmas = 2048;

bool own_small(const Tensor& c, const Tensor* bias, const Tensor& a, const Tensor& b,
               bool accumulate) {
  if (a.size(0) * a.size(1) * b.size(1) > kSmallGemmFmas) return false;
  if (bias && bias->dim() != 1) return false;
  switch (c.scalar_type()) {
    case ScalarType::Float: return small_gemm<float>(c, bias, a, b, accumulate), true;
    case ScalarType::Double: return small_gemm<double>(c, bias, a, b, accumulate), true;
    default: return false;
  }
}

// own_linear<T> where linear.h's products run (prefer_linear); the callers
// try own_small first.
bool own_linear(const Tensor& c, const Tensor* bias, const Tensor& a, const Tensor& b,
                bool accumulate) {
  if (!cpu::prefer_linear()) return false;
  switch (c.scalar_type()) {
    case ScalarType::Float: return own_linear<float>(c, bias, a, b, accumulate);
    case ScalarType::Double: return own_linear<double>(c, bias, a, b, accumulate);
    default: return false;
  }
}

// out = a @ b, plus `add` (broadcast to out) where given, by torch's BLAS.
void blas_product(const Tensor& out, const Tensor* add, const Tensor& a, const Tensor& b) {
  if (add) {
    TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_addmm_out(out.get(), add->get(), a.get(), b.get(), 1.0, 1.0));
  } else {
    TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_mm_out(out.get(), a.get(), b.get()));
  }
}

constexpr int64_t kThinCols = 32;

// c = a @ b (+ c) where a is a transposed matrix (a.stride(0) == 1: a weight
// gradient, dA^T x), c has at most kThinCols columns and K is long: an input weight
// gradient at input 28. On Intel, torch's MKL computes that 1.1x-2x faster
// turned around, as c^T = b^T a^T into a scratch (1792-8192 rows of dA, H
// 100-768, in one process; 0.9x at 224 rows, no faster from 64 columns on),
// and c takes the transpose back. (dX = dA W_ih, whose a is not transposed,
// ran 0.6x-0.84x turned around.) On AMD's Zen 3 (AVX2: its products stay with
// BLAS), 1.05x-1.31x up to kAmdRows rows of c (H 64-256, K 1792-8192), 0.92x-1.1x
// at 384-512: taken up to kAmdRows. Elsewhere unmeasured, so not taken.
template <typename T>
void thin_weight_grad(const Tensor& c, const Tensor& a, const Tensor& b, bool accumulate) {
  const int64_t M = c.size(0), n = c.size(1);
  Tensor turned = empty(c, {n, M});
  const Tensor c_t = transposed(c);
  blas_product(turned, accumulate ? &c_t : nullptr, transposed(b), transposed(a));
  cpu::transpose(static_cast<const T*>(turned.data_ptr()), M, n, M, static_cast<T*>(c.data_ptr()), c.stride(0));
}

// False where not taken.
bool thin_weight_grad(const Tensor& c, const Tensor& a, const Tensor& b, bool accumulate) {
  constexpr int64_t kMaxCols = kThinCols, kMinRows = 64, kMinDepth = 1024, kAmdRows = 256;
  const int64_t M = c.size(0), n = c.size(1), K = a.size(1);
  using cpu::simd::Vendor;
  const Vendor vendor = cpu::simd::cpu_vendor();
  const bool amd_avx2 = vendor == Vendor::Amd && cpu::simd::runtime_isa() == cpu::simd::Isa::Avx2;
  if (n > kMaxCols || M < kMinRows || K < kMinDepth || a.stride(0) != 1 || a.stride(1) == 1 ||
      (n > 1 && c.stride(1) != 1) || !(vendor == Vendor::Intel || (amd_avx2 && M <= kAmdRows))) {
    return false;
  }
  switch (c.scalar_type()) {
    case ScalarType::Float: return thin_weight_grad<float>(c, a, b, accumulate), true;
    case ScalarType::Double: return thin_weight_grad<double>(c, a, b, accumulate), true;
    default: return false;
  }
}

// c (+)= a b where a is transposed (a.stride(0) == 1: a weight gradient, dA^T x)
// and b's rows have unit stride, on fastrnn's weight-product tiles
// (weight_product.h) where they beat BLAS. Measured on Intel with AVX-512
// (the product alone against torch.mm, 2 threads, K = 1792-3584): 1.05x-1.2x
// where C is at most kMaxBytes (0.9x-0.96x past it: its tiles no longer stay
// in L2 between chunks) and K at least kMinDepth; at most kThinCols columns
// (dW_ih at input 28), 1.06x-1.14x the turned-around product of
// thin_weight_grad up to kThinRows rows, 0.80x-0.88x past them. Elsewhere not
// measured, so not taken; nor where linear.h's products run (prefer_linear:
// AMD's default, FASTRNN_CPU_LINEAR=1), which then take every product alike.
// FASTRNN_CPU_WEIGHT_PRODUCT=1/0 takes them wherever they run, ahead of
// linear.h's too (so that the two compare on AMD), / nowhere (read per call,
// for the tests and the benchmarks). Never for a bfloat16 call, whose products
// round their operands (bf16_pairs.h). False where not taken.
bool own_weight_product(const Tensor& c, const Tensor& a, const Tensor& b, bool accumulate) {
  constexpr int64_t kMaxBytes = 512 * 1024, kMinDepth = 512, kThinRows = 256;
  if (c.dim() != 2 || b.dim() != 2 || c.stride(1) != 1 || a.stride(0) != 1 || b.stride(1) != 1 ||
      a.scalar_type() != c.scalar_type() || b.scalar_type() != c.scalar_type() || cpu::bf16_products()) {
    return false;
  }
  const int64_t M = c.size(0), N = c.size(1), K = a.size(1);
  if (const char* v = std::getenv("FASTRNN_CPU_WEIGHT_PRODUCT"); v && (v[0] == '0' || v[0] == '1') && !v[1]) {
    if (v[0] == '0') return false;
  } else if (cpu::simd::cpu_vendor() != cpu::simd::Vendor::Intel || cpu::prefer_linear() || K < kMinDepth ||
             (N <= kThinCols && M > kThinRows) || M * N * static_cast<int64_t>(c.element_size()) > kMaxBytes) {
    return false;
  }
  auto run = [&]<typename T>() {
    return cpu::weight_product(cpu::WeightProduct<T>{M, N, K, a.const_data_ptr<T>(), a.stride(1), b.const_data_ptr<T>(),
                                                     b.stride(0), static_cast<T*>(c.data_ptr()), c.stride(0),
                                                     accumulate});
  };
  switch (c.scalar_type()) {
    case ScalarType::Float: return run.template operator()<float>();
    case ScalarType::Double: return run.template operator()<double>();
    default: return false;
  }
}

// out[j] = sum over i of t[i * ld + j], j < cols. Columns go to threads in
// blocks, and each column is summed in row order by one thread in double
// (column_sums.h): results do not depend on the thread count, and float sums
// over many rows keep float's precision.
template <typename T>
void sum_columns(T* out, const T* t, int64_t rows, int64_t cols, int64_t ld) {
  constexpr int64_t kCols = 64;  // a multiple of every ISA's block
  const auto kernel = cpu::column_sums_kernel<T>(cpu::simd::runtime_isa());
  const int64_t blocks = (cols + kCols - 1) / kCols;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(rows * kCols, 1));
  torch::stable::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    kernel(out, t, rows, ld, begin * kCols, std::min(cols, end * kCols));
  });
}

struct CpuBackend {
  static constexpr const char* device_name = "CPU";

  // dst = src (copy_into) by memcpy for contiguous tensors of one dtype and
  // size: a bias gradient's copy, where torch's copy_ is a dispatcher call
  // after the kernels. False: torch's copy_.
  static bool copy(const Tensor& dst, const Tensor& src) {
    if (!dst.is_cpu() || !src.is_cpu() || dst.scalar_type() != src.scalar_type() ||
        dst.dim() != src.dim() || !dst.is_contiguous() || !src.is_contiguous()) {
      return false;
    }
    for (int64_t d = 0; d < dst.dim(); ++d) {
      if (dst.size(d) != src.size(d)) return false;
    }
    std::memmove(dst.data_ptr(), src.const_data_ptr(), static_cast<size_t>(dst.numel()) * dst.element_size());
    return true;
  }

  // out [C] = the column sums of t [N, C] (column_sums: the bias gradients),
  // for float and double t with unit column stride and out of unit stride;
  // false for any other (torch's sum then).
  static bool column_sums(const Tensor& out, const Tensor& t) {
    if (t.dim() != 2 || out.dim() != 1 || out.scalar_type() != t.scalar_type() ||
        out.size(0) != t.size(1) || (t.size(1) > 1 && (t.stride(1) != 1 || out.stride(0) != 1))) {
      return false;
    }
    return float_or_double(t, [&]<typename T>() {
      sum_columns(ptr<T>(out), ptr<const T>(t), t.size(0), t.size(1), t.stride(0));
      return true;
    });
  }

  static bool supports(ScalarType t) {
    // Half too: torch.nn.RNN runs in float16 on the CPU (e.g. under
    // torch.autocast("cpu", dtype=torch.float16)), so fastrnn must as well.
    return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::BFloat16 ||
           t == ScalarType::Half;
  }

  template <typename F>
  static void with_dtype(ScalarType t, F&& f) {
    switch (t) {
      case ScalarType::Float: return f.template operator()<float>();
      case ScalarType::Double: return f.template operator()<double>();
      case ScalarType::BFloat16: return f.template operator()<torch::headeronly::BFloat16>();
      case ScalarType::Half: return f.template operator()<torch::headeronly::Half>();
      default: fail("fastrnn: unsupported dtype on CPU");
    }
  }

  static void gemm(const Tensor& c, const Tensor& a, const Tensor& b, bool accumulate) {
    if (own_small(c, nullptr, a, b, accumulate)) return;
    if (own_weight_product(c, a, b, accumulate)) return;
    if (own_linear(c, nullptr, a, b, accumulate)) return;
    if (thin_weight_grad(c, a, b, accumulate)) return;
    blas_product(c, accumulate ? &c : nullptr, a, b);
  }

  // c = a @ b with b a padded sequence's [T, B, K] steps where they lie (rows
  // t * B + b: a batch_first input's), on fastrnn's tiles where they take
  // it. False: not taken (BLAS, or small_gemm for a product that small, gets
  // b's rows copied).
  static bool gemm_steps(const Tensor& c, const Tensor& a, const Tensor& b) {
    if (!cpu::prefer_linear() || a.size(0) * a.size(1) * b.size(2) <= kSmallGemmFmas) return false;
    switch (c.scalar_type()) {
      case ScalarType::Float: return own_linear<float>(c, nullptr, a, b, false);
      case ScalarType::Double: return own_linear<double>(c, nullptr, a, b, false);
      default: return false;
    }
  }

  static void addmm(const Tensor& c, const Tensor& bias, const Tensor& a, const Tensor& b) {
    if (own_small(c, &bias, a, b, false) || own_linear(c, &bias, a, b, false)) return;
    blas_product(c, &bias, a, b);
  }

  // f(b, j) for a rows x cols step, rows split over threads. Elements are
  // independent (cells.h), which ivdep tells the compiler so that the loop
  // over j vectorises without run-time alias checks between f's buffers.
  template <typename F>
  static void for_each(const Tensor&, int64_t rows, int64_t cols, const F& f) {
    const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1));
    torch::stable::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      const F local = f;  // its pointers in registers, not re-read after every store
      for (int64_t b = begin; b < end; ++b) {
#pragma GCC ivdep
        for (int64_t j = 0; j < cols; ++j) local(b, j);
      }
    });
  }

  // A tensor's data and row stride for the kernels' jobs: null and 0 where it
  // is undefined (an optional buffer).
  template <typename T>
  static T* ptr(const Tensor& t) {
    return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
  }
  static int64_t ld(const Tensor& t) { return t.defined() ? t.stride(0) : 0; }
  // A tensor the kernels read where it lies ([N, W] rows, or a padded
  // layout's [T, B, W] steps): its data, row stride and step stride (0 for
  // rows); nothing set where it is undefined.
  template <typename T>
  static void set_lying(const Tensor& t, const T*& p, int64_t& ld, int64_t& ld_step) {
    if (!t.defined()) return;
    p = ptr<T>(t);
    ld = t.stride(t.dim() - 2);
    ld_step = t.dim() == 3 ? t.stride(0) : 0;
  }
  // The input of a job projected inside (x, as it lies) into its recurrence.
  template <typename T, typename Rec>
  static void set_input(Rec& r, const Tensor& x, const Tensor& w_ih, const Tensor& bias) {
    set_lying<T>(x, r.x, r.ld_x, r.ld_x_step);
    r.input = x.defined() ? x.size(x.dim() - 1) : 0;
    r.w_ih = ptr<T>(w_ih);
    r.bias = ptr<T>(bias);
  }

  // Whether a [B, H] state is all zero (the modules' default h0): its
  // products are then left out, in the fused forwards (recurrence.h, which
  // also check W_hh) and in dW_hh (stack.h). FASTRNN_CPU_SKIP_ZERO_H0=0 keeps
  // them (read per call: the tests compare the bits both ways).
  template <typename T>
  static bool zero_state(const Tensor& h) {
    if (const char* v = std::getenv("FASTRNN_CPU_SKIP_ZERO_H0"); v && v[0] == '0' && !v[1]) return false;
    return h.stride(1) == 1 && cpu::zero_rows(ptr<const T>(h), h.stride(0), h.size(0), h.size(1));
  }
  static bool zero_state(const Tensor& h) {
    return float_or_double(h, [&]<typename T>() { return zero_state<T>(h); });
  }
  // Whether a [rows, cols] tensor holds no infinity and no NaN.
  static bool finite(const Tensor& t) {
    return float_or_double(t, [&]<typename T>() {
      return t.stride(1) == 1 && cpu::finite(ptr<const T>(t), t.stride(0), t.size(0), t.size(1));
    });
  }
  // f<T>() for a float or double tensor, else false.
  template <typename F>
  static bool float_or_double(const Tensor& t, F&& f) {
    switch (t.scalar_type()) {
      case ScalarType::Float: return f.template operator()<float>();
      case ScalarType::Double: return f.template operator()<double>();
      default: return false;
    }
  }

  // The input projection inside the fused forward (stack.h asks): where the
  // kernel takes the job (p: P's or the gates' buffer) and
  // cpu::projection_inside says so.
  static bool projection_inside(const Tensor& x, const Tensor& p, int64_t hidden, int64_t batch) {
    const int64_t I = x.size(x.dim() - 1);
    if (I > 1 && x.stride(x.dim() - 1) != 1) return false;
    bool inside = false;
    with_dtype(p.scalar_type(), [&]<typename T>() {
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
        inside = x.scalar_type() == p.scalar_type() && cpu::projection_inside<T>(I, hidden, batch);
      }
    });
    return inside;
  }
  static bool input_projection_inside(const ForwardJob& j) {
    return projection_inside(j.x, j.out, j.w_hh.size(0), j.layout->batch);
  }

  // Elman: every direction of the layer in one parallel region of the fused
  // recurrence (recurrence.h) where it takes the dtype (float; double with
  // relu), else one GEMM per step.
  static void forward_recurrences(const std::vector<ForwardJob>& jobs, Activation act) {
    bool fused = false;
    with_dtype(jobs[0].out.scalar_type(), [&]<typename T>() {
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
        std::vector<cpu::ForwardRecurrence<T>> rec;
        for (const ForwardJob& j : jobs) {
          rec.push_back({*j.steps, j.w_hh.size(0), ptr<T>(j.out), j.out.stride(0), ptr<T>(j.h0),
                         j.h0.stride(0), ptr<T>(j.w_hh), act});
          set_input<T>(rec.back(), j.x, j.w_ih, j.bias);
          rec.back().h0_zero = zero_state<T>(j.h0);
        }
        fused = cpu::forward_recurrences<T>(rec);
      }
    });
    // input_projection_inside() promised the kernel would take the job.
    FASTRNN_CHECK(fused || !jobs[0].x.defined(), "fastrnn: the CPU recurrence refused its input projection");
    if (!fused) {
      for (const ForwardJob& job : jobs) stepwise::forward<CpuBackend>(job, act);
      return;
    }
    for (const ForwardJob& j : jobs) stepwise::copy_final_rows<CpuBackend>(*j.steps, j.out, j.h_n);
  }

  static void backward_recurrences(const std::vector<BackwardJob>& jobs, Activation act) {
    bool fused = false;
    with_dtype(jobs[0].dA.scalar_type(), [&]<typename T>() {
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
        bool supported = true;
        for (const BackwardJob& j : jobs) supported = supported && cpu::supports<T>(j.w_hh.size(0));
        if (!supported) return;
        std::vector<cpu::BackwardRecurrence<T>> rec;
        for (const BackwardJob& j : jobs) {
          // A given dY is read where it lies, and dh_n added by the kernel.
          const bool given = j.dY.defined();
          if (!given) stepwise::add_final_rows<CpuBackend>(*j.steps, j.dA, j.dh_n);
          rec.push_back({*j.steps, j.w_hh.size(0), ptr<T>(j.dA), j.dA.stride(0), ptr<T>(j.out),
                         j.out.stride(0), ptr<T>(j.grad_hx), j.grad_hx.stride(0), ptr<T>(j.w_hh), act});
          if (given) {
            cpu::BackwardRecurrence<T>& r = rec.back();
            set_lying<T>(j.dY, r.dy, r.ld_dy, r.ld_dy_step);
            r.dh_n = ptr<T>(j.dh_n);
            r.ld_dh_n = ld(j.dh_n);
          }
        }
        fused = cpu::backward_recurrences<T>(rec);
        FASTRNN_CHECK(fused, "fastrnn: the CPU recurrence refused a job it supports");
      }
    });
    if (!fused) {
      for (const BackwardJob& job : jobs) stepwise::backward<CpuBackend>(job, act);
    }
  }

  // A cell job's rows of its gates (and c or hn) per step: empty unless they
  // are a two-step ring (LstmForwardJob::ring).
  template <class Job>
  static std::vector<std::vector<StepRows>> ring_steps(const std::vector<Job>& jobs) {
    std::vector<std::vector<StepRows>> rings(jobs.size());
    for (size_t k = 0; k < jobs.size(); ++k) {
      if (jobs[k].ring) rings[k] = two_step_ring(*jobs[k].steps, jobs[k].layout->batch);
    }
    return rings;
  }

  // LSTM and GRU: every direction of the layer in one parallel region of the
  // fused recurrences (cell_recurrence.h) where they take the dtype (float,
  // double) and there is no projection, else one GEMM per step and the
  // cell's pointwise pass (stepwise.h).
  static bool input_projection_inside(const LstmForwardJob& j) {
    return !j.w_hr.defined() && projection_inside(j.x, j.gates, j.c.size(1), j.layout->batch);
  }

  static void forward_recurrences(const std::vector<LstmForwardJob>& jobs) {
    bool fused = false;
    const std::vector<std::vector<StepRows>> rings = ring_steps(jobs);
    with_dtype(jobs[0].gates.scalar_type(), [&]<typename T>() {
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
        if (jobs[0].w_hr.defined()) return;
        std::vector<cpu::LstmForwardRecurrence<T>> rec;
        for (size_t k = 0; k < jobs.size(); ++k) {
          const LstmForwardJob& j = jobs[k];
          rec.push_back({*j.steps, j.c.size(1), ptr<T>(j.gates), j.gates.stride(0), ptr<T>(j.c),
                         j.c.stride(0), ptr<T>(j.out), j.out.stride(0), ptr<T>(j.h0), j.h0.stride(0),
                         ptr<T>(j.c0), j.c0.stride(0), ptr<T>(j.w_hh)});
          set_input<T>(rec.back(), j.x, j.w_ih, j.bias);
          rec.back().state_steps = rings[k];
          rec.back().h0_zero = zero_state<T>(j.h0);
        }
        fused = cpu::forward_recurrences<T>(std::span<const cpu::LstmForwardRecurrence<T>>(rec));
      }
    });
    // input_projection_inside() promised the kernel would take the job (a ring's too).
    FASTRNN_CHECK(fused || !jobs[0].x.defined(), "fastrnn: the CPU LSTM recurrence refused its input projection");
    if (!fused) {
      for (const LstmForwardJob& job : jobs) stepwise::forward<CpuBackend>(job);
      return;
    }
    for (size_t k = 0; k < jobs.size(); ++k) {
      const LstmForwardJob& j = jobs[k];
      stepwise::copy_final_rows<CpuBackend>(*j.steps, j.out, j.h_n);
      // A sequence's last c stays in the ring: later steps have fewer rows.
      stepwise::copy_final_rows<CpuBackend>(j.ring ? rings[k] : *j.steps, j.c, j.c_n);
    }
  }

  static void backward_recurrences(const std::vector<LstmBackwardJob>& jobs) {
    bool fused = false;
    with_dtype(jobs[0].gates.scalar_type(), [&]<typename T>() {
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
        if (jobs[0].w_hr.defined() || !cpu::cell_supports<T>(jobs[0].c.size(1))) return;
        std::vector<cpu::LstmBackwardRecurrence<T>> rec;
        for (const LstmBackwardJob& j : jobs) {
          stepwise::add_final_rows<CpuBackend>(*j.steps, j.dh, j.dh_n);
          rec.push_back({*j.steps, j.c.size(1), ptr<T>(j.dh), j.dh.stride(0), ptr<T>(j.gates),
                         j.gates.stride(0), ptr<T>(j.c), j.c.stride(0), ptr<T>(j.c0), j.c0.stride(0),
                         ptr<T>(j.dc_n), j.dc_n.stride(0), ptr<T>(j.grad_hx), j.grad_hx.stride(0),
                         ptr<T>(j.grad_cx), j.grad_cx.stride(0), ptr<T>(j.w_hh),
                         ptr<T>(j.saved_gates), ld(j.saved_gates)});
        }
        fused = cpu::backward_recurrences<T>(std::span<const cpu::LstmBackwardRecurrence<T>>(rec));
        FASTRNN_CHECK(fused, "fastrnn: the CPU LSTM recurrence refused a job it supports");
      }
    });
    if (!fused) {
      for (const LstmBackwardJob& job : jobs) stepwise::backward<CpuBackend>(job);
    }
  }

  static bool input_projection_inside(const GruForwardJob& j) {
    return projection_inside(j.x, j.gates, j.hn.size(1), j.layout->batch);
  }

  static void forward_recurrences(const std::vector<GruForwardJob>& jobs) {
    bool fused = false;
    const std::vector<std::vector<StepRows>> rings = ring_steps(jobs);
    with_dtype(jobs[0].gates.scalar_type(), [&]<typename T>() {
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
        std::vector<cpu::GruForwardRecurrence<T>> rec;
        std::vector<Tensor> b_hh;  // contiguous copies where needed, alive until the kernel is done
        for (size_t k = 0; k < jobs.size(); ++k) {
          const GruForwardJob& j = jobs[k];
          b_hh.push_back(j.b_hh.defined() ? as_contiguous(j.b_hh) : Tensor());
          rec.push_back({*j.steps, j.hn.size(1), ptr<T>(j.gates), j.gates.stride(0), ptr<T>(j.hn),
                         j.hn.stride(0), ptr<T>(j.out), j.out.stride(0), ptr<T>(j.h0), j.h0.stride(0),
                         ptr<T>(j.w_hh), ptr<T>(b_hh.back())});
          set_input<T>(rec.back(), j.x, j.w_ih, j.bias);
          rec.back().state_steps = rings[k];
          rec.back().h0_zero = zero_state<T>(j.h0);
        }
        fused = cpu::forward_recurrences<T>(std::span<const cpu::GruForwardRecurrence<T>>(rec));
      }
    });
    // input_projection_inside() promised the kernel would take the job (a ring's too).
    FASTRNN_CHECK(fused || !jobs[0].x.defined(), "fastrnn: the CPU GRU recurrence refused its input projection");
    if (!fused) {
      for (const GruForwardJob& job : jobs) stepwise::forward<CpuBackend>(job);
      return;
    }
    for (const GruForwardJob& j : jobs) stepwise::copy_final_rows<CpuBackend>(*j.steps, j.out, j.h_n);
  }

  static void backward_recurrences(const std::vector<GruBackwardJob>& jobs) {
    bool fused = false;
    with_dtype(jobs[0].gates.scalar_type(), [&]<typename T>() {
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
        if (!cpu::cell_supports<T>(jobs[0].hn.size(1))) return;
        std::vector<cpu::GruBackwardRecurrence<T>> rec;
        for (const GruBackwardJob& j : jobs) {
          stepwise::add_final_rows<CpuBackend>(*j.steps, j.dh, j.dh_n);
          rec.push_back({*j.steps, j.hn.size(1), ptr<T>(j.dh), j.dh.stride(0), ptr<T>(j.gates),
                         j.gates.stride(0), ptr<T>(j.hn), j.hn.stride(0), ptr<T>(j.out), j.out.stride(0),
                         ptr<T>(j.h0), j.h0.stride(0), ptr<T>(j.grad_hx), j.grad_hx.stride(0),
                         ptr<T>(j.w_hh), ptr<T>(j.saved_gates), ld(j.saved_gates),
                         ptr<T>(j.saved_hn), ld(j.saved_hn)});
        }
        fused = cpu::backward_recurrences<T>(std::span<const cpu::GruBackwardRecurrence<T>>(rec));
        FASTRNN_CHECK(fused, "fastrnn: the CPU GRU recurrence refused a job it supports");
      }
    });
    if (!fused) {
      for (const GruBackwardJob& job : jobs) stepwise::backward<CpuBackend>(job);
    }
  }
};

}  // namespace

// The position of a backward op's reserve among its arguments (ops.h's schema).
constexpr int reserve_arg(std::string_view schema) {
  const size_t at = schema.find("Tensor reserve,");
  int commas = 0;
  for (size_t i = 0; i < at; ++i) commas += schema[i] == ',';
  return commas;
}
static_assert(reserve_arg(kGruBackwardSchema) == 10);

using RnnBackwardOp = cpu::InFloat<&rnn_backward<CpuBackend>, reserve_arg(kRnnBackwardSchema)>;
using LstmBackwardOp = cpu::InFloat<&lstm_backward<CpuBackend>, reserve_arg(kLstmBackwardSchema)>;
using GruBackwardOp = cpu::InFloat<&gru_backward<CpuBackend>, reserve_arg(kGruBackwardSchema)>;

// bfloat16 and float16 calls run in float32 (cpu/in_float.h).
STABLE_TORCH_LIBRARY_IMPL(fastrnn, CPU, m) {
  m.impl("rnn", TORCH_BOX(&cpu::InFloat<&rnn_forward<CpuBackend>>::call));
  m.impl("rnn_backward", TORCH_BOX(&RnnBackwardOp::call));
  m.impl("lstm", TORCH_BOX(&cpu::InFloat<&lstm_forward<CpuBackend>>::call));
  m.impl("lstm_backward", TORCH_BOX(&LstmBackwardOp::call));
  m.impl("gru", TORCH_BOX(&cpu::InFloat<&gru_forward<CpuBackend>>::call));
  m.impl("gru_backward", TORCH_BOX(&GruBackwardOp::call));
}

}  // namespace fastrnn
