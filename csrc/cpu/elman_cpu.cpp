// fastrnn CPU kernels: the shared driver (elman_driver.h) with BLAS GEMMs
// through torch's CPU shims and a fused activation-derivative loop.
#include "../elman_driver.h"

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
    TORCH_ERROR_CODE_CHECK(
        aoti_torch_cpu_addmm_out(out.get(), self.get(), a.get(), b.get(), 1.0, 1.0));
  }

  static void mm(Tensor& out, const Tensor& a, const Tensor& b) {
    TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_mm_out(out.get(), a.get(), b.get()));
  }

  // On the CPU the per-step GEMMs are the fused path: BLAS runs each step at
  // near its peak, and the driver adds no allocation or copy between them.
  static bool fused_forward(const SequenceLayout&, bool, bool, Tensor&, const Tensor&,
                            const Tensor&) {
    return false;
  }
  static bool fused_backward(const SequenceLayout&, bool, bool, Tensor&, const Tensor&,
                             Tensor&, const Tensor&) {
    return false;
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
