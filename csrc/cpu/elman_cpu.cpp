// fastrnn CPU kernels: the shared driver (elman_driver.h) with the fused
// recurrence (recurrence.h) for float and double, and BLAS GEMMs through
// torch's CPU shims for everything else.
#include "../elman_driver.h"
#include "linear.h"
#include "recurrence.h"

#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cpu.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

namespace fastrnn {
namespace {

// Below this many elements a pointwise step stays on one thread (torch's own
// grain size for pointwise kernels).
constexpr int64_t kGrain = 32768;

template <typename scalar_t>
void activation_backward_kernel(scalar_t* grad, const scalar_t* out,
                                int64_t n, bool relu) {
  torch::stable::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    if (relu) {
      // As torch's threshold_backward: zero where the output is <= 0. A
      // select, not a branch: the sign pattern is random, and a conditional
      // store neither vectorises nor predicts (it cost 3x the whole step).
      for (int64_t i = begin; i < end; ++i) {
        grad[i] = out[i] <= scalar_t(0) ? scalar_t(0) : grad[i];
      }
    } else {
      // As torch's tanh_backward: g * (1 - y * y), in float for bfloat16/half.
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      for (int64_t i = begin; i < end; ++i) {
        const acc_t y = static_cast<acc_t>(out[i]);
        grad[i] = static_cast<scalar_t>(static_cast<acc_t>(grad[i]) * (acc_t(1) - y * y));
      }
    }
  });
}

// tanh for float in [-9, 9] (beyond, tanh rounds to +-1) as a 13/6 rational
// function: within a few ulp of std::tanh, and plain arithmetic, so the loop
// vectorises. torch's own tanh_ took as long as the step's GEMM at hidden
// 128-256. NaN stays NaN (every comparison with it is false).
inline float tanh_rational(float v) {
  const float x = v < -9.f ? -9.f : (v > 9.f ? 9.f : v);
  const float x2 = x * x;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 - 8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return x * p / q;
}

template <typename scalar_t>
void activation_kernel(scalar_t* h, int64_t n, bool relu) {
  torch::stable::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    if (relu) {
      for (int64_t i = begin; i < end; ++i) h[i] = h[i] < scalar_t(0) ? scalar_t(0) : h[i];
    } else {
      for (int64_t i = begin; i < end; ++i) {
        h[i] = static_cast<scalar_t>(tanh_rational(static_cast<float>(h[i])));
      }
    }
  });
}

struct CpuBackend {
  static constexpr const char* device_name = "CPU";

  static bool supports(ScalarType t) {
    // Half too: torch.nn.RNN runs in float16 on the CPU (e.g. under
    // torch.autocast("cpu", dtype=torch.float16)), so fastrnn must as well.
    return t == ScalarType::Float || t == ScalarType::Double ||
           t == ScalarType::BFloat16 || t == ScalarType::Half;
  }

  static void addmm(Tensor& out, const Tensor& self, const Tensor& a,
                    const Tensor& b) {
    if (self.dim() == 1 && own_linear(out, &self, a, b)) return;
    // out += a b, out = self (dW_hh's second block of rows)
    if (self.dim() == 2 && self.data_ptr() == out.data_ptr() && self.stride(0) == out.stride(0) &&
        self.stride(1) == out.stride(1) && own_linear(out, nullptr, a, b, true)) {
      return;
    }
    TORCH_ERROR_CODE_CHECK(
        aoti_torch_cpu_addmm_out(out.get(), self.get(), a.get(), b.get(), 1.0, 1.0));
  }

  static void mm(Tensor& out, const Tensor& a, const Tensor& b) {
    if (own_linear(out, nullptr, a, b)) return;
    TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_mm_out(out.get(), a.get(), b.get()));
  }

  // out = a b (+ bias) (+ out) through cpu::linear where it beats BLAS
  // (linear.h): out contiguous [M, N] not overlapping a or b, a and b each
  // row- or column-major, bias [N] contiguous; anything else goes to BLAS.
  static bool own_linear(Tensor& out, const Tensor* bias, const Tensor& a, const Tensor& b,
                         bool accumulate = false) {
    if (!cpu::prefer_linear()) return false;
    switch (out.scalar_type()) {
      case ScalarType::Float: return own_linear_typed<float>(out, bias, a, b, accumulate);
      case ScalarType::Double: return own_linear_typed<double>(out, bias, a, b, accumulate);
      default: return false;
    }
  }
  template <typename T>
  static bool own_linear_typed(Tensor& out, const Tensor* bias, const Tensor& a, const Tensor& b,
                               bool accumulate) {
    if (out.dim() != 2 || a.dim() != 2 || b.dim() != 2 || !out.is_contiguous()) return false;
    const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
    if (M < 2 || K < 2 || N < 2 || b.size(0) != K) return false;
    if (a.scalar_type() != out.scalar_type() || b.scalar_type() != out.scalar_type()) return false;
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
    p.accumulate = accumulate;
    if (b.stride(0) == 1) {
      p.w_transposed = true;
      p.ldw = b.stride(1);
    } else if (b.stride(1) == 1) {
      p.ldw = b.stride(0);
    } else {
      return false;
    }
    p.w = b.const_data_ptr<T>();
    if (bias) {
      if (bias->size(0) != N || !bias->is_contiguous() ||
          bias->scalar_type() != out.scalar_type()) {
        return false;
      }
      p.bias = bias->const_data_ptr<T>();
    }
    p.c = out.mutable_data_ptr<T>();
    p.ldc = N;
    return cpu::linear(p);
  }

  // The whole recurrence in one parallel region (recurrence.h) where
  // cpu::supports() takes it (float; double with relu); otherwise, and for
  // bfloat16 and half, one BLAS call per step.
  static bool fused_forward(const SequenceLayout& L, bool reverse, bool relu, Tensor& out,
                            const Tensor& hx, const Tensor& w_hh) {
    switch (out.scalar_type()) {
      case ScalarType::Float: return forward_kernel<float>(L, reverse, relu, out, hx, w_hh);
      case ScalarType::Double: return forward_kernel<double>(L, reverse, relu, out, hx, w_hh);
      default: return false;
    }
  }
  static bool fused_backward(const SequenceLayout& L, bool reverse, bool relu, Tensor& dA,
                             const Tensor& out, Tensor& grad_hx, const Tensor& w_hh) {
    switch (dA.scalar_type()) {
      case ScalarType::Float:
        return backward_kernel<float>(L, reverse, relu, dA, out, grad_hx, w_hh);
      case ScalarType::Double:
        return backward_kernel<double>(L, reverse, relu, dA, out, grad_hx, w_hh);
      default: return false;
    }
  }

  // out, hx, w_hh, dA, grad_hx: contiguous (the driver makes them so).
  template <typename T>
  static bool forward_kernel(const SequenceLayout& L, bool reverse, bool relu, Tensor& out,
                             const Tensor& hx, const Tensor& w_hh) {
    const int64_t H = w_hh.size(0);
    if (!cpu::supports<T>(H, relu ? Activation::Relu : Activation::Tanh)) return false;
    const std::vector<StepRows> steps = steps_in_order(L, reverse);
    const cpu::ForwardRecurrence<T> job{steps, H, out.mutable_data_ptr<T>(), H,
                                        hx.const_data_ptr<T>(), H, w_hh.const_data_ptr<T>(),
                                        relu ? Activation::Relu : Activation::Tanh};
    return cpu::forward_recurrences<T>({&job, 1});
  }
  template <typename T>
  static bool backward_kernel(const SequenceLayout& L, bool reverse, bool relu, Tensor& dA,
                              const Tensor& out, Tensor& grad_hx, const Tensor& w_hh) {
    const int64_t H = w_hh.size(0);
    if (!cpu::supports<T>(H, relu ? Activation::Relu : Activation::Tanh)) return false;
    const std::vector<StepRows> steps = steps_in_order(L, reverse);
    const cpu::BackwardRecurrence<T> job{steps, H, dA.mutable_data_ptr<T>(), H,
                                         out.const_data_ptr<T>(), H,
                                         grad_hx.mutable_data_ptr<T>(), H,
                                         w_hh.const_data_ptr<T>(),
                                         relu ? Activation::Relu : Activation::Tanh};
    return cpu::backward_recurrences<T>({&job, 1});
  }

  // h = act(h) in place, h contiguous.
  static void activation(Tensor& h, bool relu) {
    const int64_t n = h.numel();
    switch (h.scalar_type()) {
      case ScalarType::Float:
        return activation_kernel(h.mutable_data_ptr<float>(), n, relu);
      case ScalarType::BFloat16:
        return activation_kernel(h.mutable_data_ptr<torch::headeronly::BFloat16>(), n, relu);
      case ScalarType::Half:
        return activation_kernel(h.mutable_data_ptr<torch::headeronly::Half>(), n, relu);
      default:  // double: torch's own, at full precision
        return detail::call_inplace(relu ? "aten::relu_" : "aten::tanh_", h);
    }
  }

  static void activation_backward(Tensor& grad, const Tensor& out, bool relu) {
    const int64_t n = grad.numel();
    switch (grad.scalar_type()) {
      case ScalarType::Float:
        return activation_backward_kernel(grad.mutable_data_ptr<float>(),
                                          out.const_data_ptr<float>(), n, relu);
      case ScalarType::Double:
        return activation_backward_kernel(grad.mutable_data_ptr<double>(),
                                          out.const_data_ptr<double>(), n, relu);
      case ScalarType::BFloat16:
        return activation_backward_kernel(
            grad.mutable_data_ptr<torch::headeronly::BFloat16>(),
            out.const_data_ptr<torch::headeronly::BFloat16>(), n, relu);
      case ScalarType::Half:
        return activation_backward_kernel(
            grad.mutable_data_ptr<torch::headeronly::Half>(),
            out.const_data_ptr<torch::headeronly::Half>(), n, relu);
      default:
        FASTRNN_CHECK(false, "fastrnn: unsupported dtype on CPU");
    }
  }
};

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fastrnn, CPU, m) {
  m.impl("elman_forward", TORCH_BOX(&elman_forward<CpuBackend>));
  m.impl("elman_backward", TORCH_BOX(&elman_backward<CpuBackend>));
}

}  // namespace fastrnn
