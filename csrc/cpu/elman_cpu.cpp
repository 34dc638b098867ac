// fastrnn CPU kernels: the stack driver (stack.h) with BLAS GEMMs through
// torch's CPU shims and the cells' pointwise math (cells.h) in vectorisable
// loops.
#include "../stack.h"
#include "../stepwise.h"

#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cpu.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

namespace fastrnn {
namespace {

// Below this many elements a pointwise pass stays on one thread (torch's own
// grain size for pointwise kernels).
constexpr int64_t kGrain = 32768;

struct CpuBackend {
  static constexpr const char* device_name = "CPU";

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
    if (accumulate) {
      TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_addmm_out(c.get(), c.get(), a.get(), b.get(), 1.0, 1.0));
    } else {
      TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_mm_out(c.get(), a.get(), b.get()));
    }
  }

  static void addmm(const Tensor& c, const Tensor& bias, const Tensor& a, const Tensor& b) {
    TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_addmm_out(c.get(), bias.get(), a.get(), b.get(), 1.0, 1.0));
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

  static void forward_recurrences(const std::vector<ForwardJob>& jobs, Activation act) {
    for (const ForwardJob& job : jobs) stepwise::forward<CpuBackend>(job, act);
  }
  static void backward_recurrences(const std::vector<BackwardJob>& jobs, Activation act) {
    for (const BackwardJob& job : jobs) stepwise::backward<CpuBackend>(job, act);
  }
  template <typename Job>
  static void forward_recurrences(const std::vector<Job>& jobs) {
    for (const Job& job : jobs) stepwise::forward<CpuBackend>(job);
  }
  template <typename Job>
  static void backward_recurrences(const std::vector<Job>& jobs) {
    for (const Job& job : jobs) stepwise::backward<CpuBackend>(job);
  }
};

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fastrnn, CPU, m) {
  m.impl("rnn", TORCH_BOX(&rnn_forward<CpuBackend>));
  m.impl("rnn_backward", TORCH_BOX(&rnn_backward<CpuBackend>));
  m.impl("lstm", TORCH_BOX(&lstm_forward<CpuBackend>));
  m.impl("lstm_backward", TORCH_BOX(&lstm_backward<CpuBackend>));
  m.impl("gru", TORCH_BOX(&gru_forward<CpuBackend>));
  m.impl("gru_backward", TORCH_BOX(&gru_backward<CpuBackend>));
}

}  // namespace fastrnn
