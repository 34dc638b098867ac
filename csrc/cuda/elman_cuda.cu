// fastrnn CUDA kernels: the stack driver (stack.h) with cuBLAS GEMMs through
// torch's CUDA shims, on the current stream. The recurrences run in the
// persistent kernels of persistent.cuh where they fit, else with one GEMM and
// one pointwise kernel per step (stepwise.h).
#include "../stack.h"
#include "../stepwise.h"
#include "persistent.cuh"

#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cuda.h>
#include <torch/csrc/stable/accelerator.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

namespace fastrnn {
namespace {

// Pointwise passes over a [rows, H] view with row stride ld:
//   h = act(h)                   (activation_kernel)
//   grad *= act'(out)            (activation_backward_kernel, out with its own row stride)
template <typename T, Activation A>
__global__ void activation_kernel(T* __restrict__ h, int64_t ld, int64_t rows, int64_t cols) {
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < rows * cols;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    T& v = h[(i / cols) * ld + i % cols];
    v = store<T>(activate<A>(load<acc_t>(v)));
  }
}

template <typename T, Activation A>
__global__ void activation_backward_kernel(T* __restrict__ grad, int64_t ld_grad,
                                           const T* __restrict__ out, int64_t ld_out,
                                           int64_t rows, int64_t cols) {
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < rows * cols;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    T& g = grad[r * ld_grad + c];
    g = store<T>(activation_grad<A>(load<acc_t>(g), load<acc_t>(out[r * ld_out + c])));
  }
}

cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  TORCH_ERROR_CODE_CHECK(
      aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  FASTRNN_CHECK(err == cudaSuccess, "fastrnn: ", what, " failed: ",
                  cudaGetErrorString(err));
}

int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&value, attr, device);
  FASTRNN_CHECK(err == cudaSuccess, "fastrnn: cudaDeviceGetAttribute failed: ",
                cudaGetErrorString(err));
  return value;
}

// The persistent kernels are not yet verified on a GPU: opt in with
// FASTRNN_CUDA_PERSISTENT=1 until the CUDA test suite has passed with them.
bool persistent_enabled() {
  const char* flag = std::getenv("FASTRNN_CUDA_PERSISTENT");
  return flag != nullptr && std::strcmp(flag, "1") == 0;
}

// How a persistent launch tiles the batch: rows per CTA (at most
// kThreads * kMaxPerThread outputs per step, and few enough rows that the
// tiles spread over every SM) and the shared memory that takes.
struct PersistentPlan {
  int tile = 0;
  int blocks = 0;
  size_t smem = 0;
};

template <typename acc_t>
bool plan_persistent(const SequenceLayout& L, int64_t H, int buffers, int device,
                     PersistentPlan& plan) {
  using namespace persistent;
  if (H <= 0 || L.batch == 0 || H > kThreads * kMaxPerThread) return false;
  const int64_t max_smem = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  const int64_t sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  int64_t tile = std::min<int64_t>(kThreads * kMaxPerThread / H, (L.batch + sms - 1) / sms);
  tile = std::max<int64_t>(tile, 1);
  auto bytes = [&](int64_t rows) { return (H * H + buffers * rows * H) * int64_t(sizeof(acc_t)); };
  while (tile > 1 && bytes(tile) > max_smem) --tile;
  if (bytes(tile) > max_smem) return false;  // W_hh does not fit on chip: step with GEMMs
  plan.tile = static_cast<int>(tile);
  plan.blocks = static_cast<int>((L.batch + tile - 1) / tile);
  plan.smem = static_cast<size_t>(bytes(tile));
  return true;
}

// batch_sizes then offsets, [2, T] int64 on the device (none when padded).
std::optional<Tensor> device_layout(const SequenceLayout& L, const Tensor& like) {
  if (!L.packed) return std::nullopt;
  Tensor host = torch::stable::empty({2, L.steps}, ScalarType::Long, std::nullopt,
                                     torch::stable::Device(torch::headeronly::DeviceType::CPU));
  int64_t* p = host.mutable_data_ptr<int64_t>();
  std::copy(L.batch_sizes.begin(), L.batch_sizes.end(), p);
  std::copy(L.offsets.begin(), L.offsets.end(), p + L.steps);
  return torch::stable::to(host, like.device());
}

template <typename Kernel>
void prepare(Kernel kernel, size_t smem) {
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  FASTRNN_CHECK(err == cudaSuccess, "fastrnn: cudaFuncSetAttribute failed: ", cudaGetErrorString(err));
}

// f.template operator()<T, acc_t>() for the dtype.
template <typename F>
void with_dtype(ScalarType t, F&& f) {
  switch (t) {
    case ScalarType::Float: return f.template operator()<float, float>();
    case ScalarType::Double: return f.template operator()<double, double>();
    case ScalarType::Half: return f.template operator()<__half, float>();
    case ScalarType::BFloat16: return f.template operator()<__nv_bfloat16, float>();
    default: fail("fastrnn: unsupported dtype on CUDA");
  }
}

template <typename T>
T* ptr(const Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

template <typename T, typename acc_t, Activation A>
bool launch_forward(const SequenceLayout& L, const ForwardJob& job, bool reverse) {
  const int64_t H = job.w_hh.size(0);
  PersistentPlan plan;
  if (!plan_persistent<acc_t>(L, H, 1, job.out.get_device_index(), plan)) return false;
  const std::optional<Tensor> layout = device_layout(L, job.out);
  const int64_t* bs = layout ? static_cast<const int64_t*>(layout->data_ptr()) : nullptr;
  auto kernel = persistent::forward_kernel<T, acc_t, A>;
  prepare(kernel, plan.smem);
  kernel<<<plan.blocks, persistent::kThreads, plan.smem, current_stream(job.out)>>>(
      ptr<T>(job.out), job.out.stride(0), ptr<T>(job.h0), job.h0.stride(0), ptr<T>(job.w_hh), bs,
      bs ? bs + L.steps : nullptr, L.steps, L.batch, static_cast<int>(H), plan.tile, reverse);
  check_launch("persistent forward_kernel");
  stepwise::copy_final_rows(job);
  return true;
}

template <typename T, typename acc_t, Activation A>
bool launch_backward(const SequenceLayout& L, const BackwardJob& job, bool reverse) {
  const int64_t H = job.w_hh.size(0);
  PersistentPlan plan;
  if (!plan_persistent<acc_t>(L, H, 2, job.out.get_device_index(), plan)) return false;
  stepwise::add_final_rows(job);
  const std::optional<Tensor> layout = device_layout(L, job.out);
  const int64_t* bs = layout ? static_cast<const int64_t*>(layout->data_ptr()) : nullptr;
  auto kernel = persistent::backward_kernel<T, acc_t, A>;
  prepare(kernel, plan.smem);
  kernel<<<plan.blocks, persistent::kThreads, plan.smem, current_stream(job.out)>>>(
      ptr<T>(job.dA), job.dA.stride(0), ptr<T>(job.out), job.out.stride(0), ptr<T>(job.grad_hx),
      job.grad_hx.stride(0), ptr<T>(job.w_hh), bs, bs ? bs + L.steps : nullptr, L.steps, L.batch,
      static_cast<int>(H), plan.tile, reverse);
  check_launch("persistent backward_kernel");
  return true;
}

// Blocks for a grid-stride pointwise kernel over n elements.
unsigned pointwise_blocks(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + 255) / 256, 65535));
}

struct CudaBackend {
  static constexpr const char* device_name = "CUDA";

  static bool supports(ScalarType t) {
    return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::Half ||
           t == ScalarType::BFloat16;
  }

  static void gemm(const Tensor& c, const Tensor& a, const Tensor& b, bool accumulate) {
    if (accumulate) {
      TORCH_ERROR_CODE_CHECK(aoti_torch_cuda_addmm_out(c.get(), c.get(), a.get(), b.get(), 1.0, 1.0));
    } else {
      TORCH_ERROR_CODE_CHECK(aoti_torch_cuda_mm_out(c.get(), a.get(), b.get()));
    }
  }

  static void addmm(const Tensor& c, const Tensor& bias, const Tensor& a, const Tensor& b) {
    TORCH_ERROR_CODE_CHECK(aoti_torch_cuda_addmm_out(c.get(), bias.get(), a.get(), b.get(), 1.0, 1.0));
  }

  static void activation(const Tensor& h, Activation act) {
    const int64_t n = h.numel();
    if (n == 0) return;
    with_dtype(h.scalar_type(), [&]<typename T, typename acc_t>() {
      with_activation(act, [&](auto a) {
        activation_kernel<T, decltype(a)::value><<<pointwise_blocks(n), 256, 0, current_stream(h)>>>(
            ptr<T>(h), h.stride(0), h.size(0), h.size(1));
      });
    });
    check_launch("activation_kernel");
  }

  static void activation_backward(const Tensor& grad, const Tensor& out, Activation act) {
    const int64_t n = grad.numel();
    if (n == 0) return;
    with_dtype(grad.scalar_type(), [&]<typename T, typename acc_t>() {
      with_activation(act, [&](auto a) {
        activation_backward_kernel<T, decltype(a)::value>
            <<<pointwise_blocks(n), 256, 0, current_stream(grad)>>>(
                ptr<T>(grad), grad.stride(0), ptr<T>(out), out.stride(0), grad.size(0),
                grad.size(1));
      });
    });
    check_launch("activation_backward_kernel");
  }

  static void forward_recurrences(const std::vector<ForwardJob>& jobs, Activation act) {
    for (const ForwardJob& job : jobs) {
      bool fused = false;
      if (persistent_enabled()) {
        with_dtype(job.out.scalar_type(), [&]<typename T, typename acc_t>() {
          with_activation(act, [&](auto a) {
            fused = launch_forward<T, acc_t, decltype(a)::value>(*job.layout, job, job.reverse);
          });
        });
      }
      if (!fused) stepwise::forward<CudaBackend>(job, act);
    }
  }

  static void backward_recurrences(const std::vector<BackwardJob>& jobs, Activation act) {
    for (const BackwardJob& job : jobs) {
      bool fused = false;
      if (persistent_enabled()) {
        with_dtype(job.out.scalar_type(), [&]<typename T, typename acc_t>() {
          with_activation(act, [&](auto a) {
            fused = launch_backward<T, acc_t, decltype(a)::value>(*job.layout, job, job.reverse);
          });
        });
      }
      if (!fused) stepwise::backward<CudaBackend>(job, act);
    }
  }
};

// Kernels run on the input's device whatever the current device is.
RnnResult rnn_cuda(Tensor input, Tensor hx, std::vector<Tensor> weights, bool has_biases,
                   int64_t num_layers, double dropout, bool train, bool bidirectional,
                   std::string nonlinearity, std::optional<Tensor> batch_sizes) {
  torch::stable::accelerator::DeviceGuard guard(input.get_device_index());
  return rnn_forward<CudaBackend>(input, hx, std::move(weights), has_biases, num_layers, dropout,
                                  train, bidirectional, std::move(nonlinearity), batch_sizes);
}

RnnBackwardResult rnn_backward_cuda(Tensor input, Tensor hx, std::vector<Tensor> weights,
                                    bool has_biases, int64_t num_layers, double dropout,
                                    bool train, bool bidirectional, std::string nonlinearity,
                                    std::optional<Tensor> batch_sizes, Tensor output,
                                    Tensor reserve, Tensor grad_output, Tensor grad_h_n,
                                    bool need_input_grad, bool need_weight_grad) {
  torch::stable::accelerator::DeviceGuard guard(input.get_device_index());
  return rnn_backward<CudaBackend>(input, hx, std::move(weights), has_biases, num_layers, dropout,
                                   train, bidirectional, std::move(nonlinearity), batch_sizes,
                                   output, reserve, grad_output, grad_h_n, need_input_grad,
                                   need_weight_grad);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fastrnn, CUDA, m) {
  m.impl("rnn", TORCH_BOX(&rnn_cuda));
  m.impl("rnn_backward", TORCH_BOX(&rnn_backward_cuda));
}

}  // namespace fastrnn
