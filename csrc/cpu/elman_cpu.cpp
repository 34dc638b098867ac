// fastrnn CPU kernels: the stack driver (stack.h) with BLAS GEMMs through
// torch's CPU shims and vectorisable activation loops.
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

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// f(row pointer, row length) over the rows of a 2-D view with unit column stride.
template <typename scalar_t, typename F>
void for_rows(const Tensor& t, F&& f) {
  const int64_t rows = t.size(0), cols = t.size(1), ld = t.stride(0);
  scalar_t* base = static_cast<scalar_t*>(t.data_ptr());
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(cols, 1));
  torch::stable::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) f(base + r * ld, cols, r);
  });
}

template <typename scalar_t, Activation A>
void activation_kernel(const Tensor& h) {
  using acc_t = acc_type<scalar_t>;
  for_rows<scalar_t>(h, [](scalar_t* row, int64_t n, int64_t) {
    for (int64_t i = 0; i < n; ++i) {
      row[i] = static_cast<scalar_t>(activate<A>(static_cast<acc_t>(row[i])));
    }
  });
}

template <typename scalar_t, Activation A>
void activation_backward_kernel(const Tensor& grad, const Tensor& out) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* y = static_cast<const scalar_t*>(out.data_ptr());
  const int64_t ld_y = out.stride(0);
  for_rows<scalar_t>(grad, [&](scalar_t* g, int64_t n, int64_t r) {
    const scalar_t* yr = y + r * ld_y;
    for (int64_t i = 0; i < n; ++i) {
      g[i] = static_cast<scalar_t>(
          activation_grad<A>(static_cast<acc_t>(g[i]), static_cast<acc_t>(yr[i])));
    }
  });
}

// f.template operator()<scalar_t>() for the tensor's dtype.
template <typename F>
void with_dtype(ScalarType t, F&& f) {
  switch (t) {
    case ScalarType::Float: return f.template operator()<float>();
    case ScalarType::Double: return f.template operator()<double>();
    case ScalarType::BFloat16: return f.template operator()<torch::headeronly::BFloat16>();
    case ScalarType::Half: return f.template operator()<torch::headeronly::Half>();
    default: fail("fastrnn: unsupported dtype on CPU");
  }
}

struct CpuBackend {
  static constexpr const char* device_name = "CPU";

  static bool supports(ScalarType t) {
    // Half too: torch.nn.RNN runs in float16 on the CPU (e.g. under
    // torch.autocast("cpu", dtype=torch.float16)), so fastrnn must as well.
    return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::BFloat16 ||
           t == ScalarType::Half;
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

  static void activation(const Tensor& h, Activation act) {
    with_dtype(h.scalar_type(), [&]<typename scalar_t>() {
      with_activation(act, [&](auto a) { activation_kernel<scalar_t, decltype(a)::value>(h); });
    });
  }

  static void activation_backward(const Tensor& grad, const Tensor& out, Activation act) {
    with_dtype(grad.scalar_type(), [&]<typename scalar_t>() {
      with_activation(act, [&](auto a) {
        activation_backward_kernel<scalar_t, decltype(a)::value>(grad, out);
      });
    });
  }

  static void forward_recurrences(const std::vector<ForwardJob>& jobs, Activation act) {
    for (const ForwardJob& job : jobs) stepwise::forward<CpuBackend>(job, act);
  }

  static void backward_recurrences(const std::vector<BackwardJob>& jobs, Activation act) {
    for (const BackwardJob& job : jobs) stepwise::backward<CpuBackend>(job, act);
  }
};

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fastrnn, CPU, m) {
  m.impl("rnn", TORCH_BOX(&rnn_forward<CpuBackend>));
  m.impl("rnn_backward", TORCH_BOX(&rnn_backward<CpuBackend>));
}

}  // namespace fastrnn
