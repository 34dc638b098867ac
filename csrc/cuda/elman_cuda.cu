// fastrnn CUDA kernels: the shared driver (elman_driver.h) with cuBLAS GEMMs
// through torch's CUDA shims (one per step, on the current stream) and a
// fused activation-derivative kernel. This is the general path that works
// for every hidden size; the persistent on-chip recurrence (issue "CUDA
// kernels") plugs in here.
#include "../elman_driver.h"
#include "elman_persistent.cuh"

#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cuda.h>
#include <torch/csrc/stable/accelerator.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

namespace fastrnn {
namespace {

// grad [n] *= act'(out [n]); the derivative is read from the saved output.
template <typename T>
__global__ void activation_backward_kernel(T* __restrict__ grad,
                                           const T* __restrict__ out,
                                           int64_t n, bool relu) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       i < n; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if constexpr (std::is_same_v<T, double>) {
      const double y = out[i];
      grad[i] = relu ? (y <= 0.0 ? 0.0 : grad[i]) : grad[i] * (1.0 - y * y);
    } else {
      const float y = load<float>(out[i]);
      const float g = load<float>(grad[i]);
      grad[i] = store<T>(relu ? (y <= 0.f ? 0.f : g) : g * (1.f - y * y));
    }
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

template <typename T, typename acc_t>
bool launch_forward(const SequenceLayout& L, bool reverse, bool relu, Tensor& out,
                    const Tensor& hx, const Tensor& w_hh) {
  const int64_t H = w_hh.size(0);
  PersistentPlan plan;
  if (!plan_persistent<acc_t>(L, H, 1, out.get_device_index(), plan)) return false;
  const std::optional<Tensor> layout = device_layout(L, out);
  const int64_t* bs = layout ? static_cast<const int64_t*>(layout->data_ptr()) : nullptr;
  auto kernel = persistent::forward_kernel<T, acc_t>;
  prepare(kernel, plan.smem);
  kernel<<<plan.blocks, persistent::kThreads, plan.smem, current_stream(out)>>>(
      static_cast<T*>(out.data_ptr()), static_cast<const T*>(hx.data_ptr()),
      static_cast<const T*>(w_hh.data_ptr()), bs, bs ? bs + L.steps : nullptr, L.steps, L.batch,
      static_cast<int>(H), plan.tile, relu, reverse);
  check_launch("persistent forward_kernel");
  return true;
}

template <typename T, typename acc_t>
bool launch_backward(const SequenceLayout& L, bool reverse, bool relu, Tensor& dA,
                     const Tensor& out, Tensor& grad_hx, const Tensor& w_hh) {
  const int64_t H = w_hh.size(0);
  PersistentPlan plan;
  if (!plan_persistent<acc_t>(L, H, 2, out.get_device_index(), plan)) return false;
  const std::optional<Tensor> layout = device_layout(L, out);
  const int64_t* bs = layout ? static_cast<const int64_t*>(layout->data_ptr()) : nullptr;
  auto kernel = persistent::backward_kernel<T, acc_t>;
  prepare(kernel, plan.smem);
  kernel<<<plan.blocks, persistent::kThreads, plan.smem, current_stream(out)>>>(
      static_cast<T*>(dA.data_ptr()), static_cast<const T*>(out.data_ptr()),
      static_cast<T*>(grad_hx.data_ptr()), static_cast<const T*>(w_hh.data_ptr()), bs,
      bs ? bs + L.steps : nullptr, L.steps, L.batch, static_cast<int>(H), plan.tile, relu, reverse);
  check_launch("persistent backward_kernel");
  return true;
}

struct CudaBackend {
  static constexpr const char* device_name = "CUDA";

  static bool supports(ScalarType t) {
    return t == ScalarType::Float || t == ScalarType::Double ||
           t == ScalarType::Half || t == ScalarType::BFloat16;
  }

  static void addmm(Tensor& out, const Tensor& self, const Tensor& a,
                    const Tensor& b) {
    TORCH_ERROR_CODE_CHECK(
        aoti_torch_cuda_addmm_out(out.get(), self.get(), a.get(), b.get(), 1.0, 1.0));
  }

  static void mm(Tensor& out, const Tensor& a, const Tensor& b) {
    TORCH_ERROR_CODE_CHECK(aoti_torch_cuda_mm_out(out.get(), a.get(), b.get()));
  }

  static bool fused_forward(const SequenceLayout& L, bool reverse, bool relu, Tensor& out,
                            const Tensor& hx, const Tensor& w_hh) {
    if (!persistent_enabled() || L.steps == 0) return false;
    switch (out.scalar_type()) {
      case ScalarType::Float: return launch_forward<float, float>(L, reverse, relu, out, hx, w_hh);
      case ScalarType::Double: return launch_forward<double, double>(L, reverse, relu, out, hx, w_hh);
      case ScalarType::Half: return launch_forward<__half, float>(L, reverse, relu, out, hx, w_hh);
      case ScalarType::BFloat16:
        return launch_forward<__nv_bfloat16, float>(L, reverse, relu, out, hx, w_hh);
      default: return false;
    }
  }

  static bool fused_backward(const SequenceLayout& L, bool reverse, bool relu, Tensor& dA,
                             const Tensor& out, Tensor& grad_hx, const Tensor& w_hh) {
    if (!persistent_enabled() || L.steps == 0) return false;
    switch (out.scalar_type()) {
      case ScalarType::Float:
        return launch_backward<float, float>(L, reverse, relu, dA, out, grad_hx, w_hh);
      case ScalarType::Double:
        return launch_backward<double, double>(L, reverse, relu, dA, out, grad_hx, w_hh);
      case ScalarType::Half:
        return launch_backward<__half, float>(L, reverse, relu, dA, out, grad_hx, w_hh);
      case ScalarType::BFloat16:
        return launch_backward<__nv_bfloat16, float>(L, reverse, relu, dA, out, grad_hx, w_hh);
      default: return false;
    }
  }

  static void activation(Tensor& h, bool relu) {
    detail::call_inplace(relu ? "aten::relu_" : "aten::tanh_", h);  // torch's own kernels
  }

  template <typename T>
  static void launch_activation_backward(Tensor& grad, const Tensor& out, bool relu) {
    const int64_t n = grad.numel();
    if (n == 0) return;
    constexpr int threads = 256;
    const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65535);
    activation_backward_kernel<T><<<blocks, threads, 0, current_stream(grad)>>>(
        static_cast<T*>(grad.data_ptr()), static_cast<const T*>(out.data_ptr()), n, relu);
    check_launch("activation_backward_kernel");
  }

  static void activation_backward(Tensor& grad, const Tensor& out, bool relu) {
    switch (grad.scalar_type()) {
      case ScalarType::Float: return launch_activation_backward<float>(grad, out, relu);
      case ScalarType::Double: return launch_activation_backward<double>(grad, out, relu);
      case ScalarType::Half: return launch_activation_backward<__half>(grad, out, relu);
      case ScalarType::BFloat16: return launch_activation_backward<__nv_bfloat16>(grad, out, relu);
      default: FASTRNN_CHECK(false, "fastrnn: unsupported dtype on CUDA");
    }
  }
};

// Kernels run on the input's device whatever the current device is.
ForwardResult elman_forward_cuda(Tensor input, Tensor hx, Tensor weight_ih,
                                 Tensor weight_hh, std::optional<Tensor> bias_ih,
                                 std::optional<Tensor> bias_hh,
                                 std::optional<Tensor> batch_sizes, bool relu,
                                 bool reverse) {
  torch::stable::accelerator::DeviceGuard guard(input.get_device_index());
  return elman_forward<CudaBackend>(input, hx, weight_ih, weight_hh, bias_ih,
                                    bias_hh, batch_sizes, relu, reverse);
}

BackwardResult elman_backward_cuda(Tensor grad_output, Tensor grad_h_n,
                                   Tensor input, Tensor hx, Tensor weight_ih,
                                   Tensor weight_hh, Tensor output,
                                   std::optional<Tensor> batch_sizes, bool relu,
                                   bool reverse, bool need_input_grad,
                                   bool need_weight_grad, bool need_bias_grad) {
  torch::stable::accelerator::DeviceGuard guard(input.get_device_index());
  return elman_backward<CudaBackend>(grad_output, grad_h_n, input, hx, weight_ih,
                                     weight_hh, output, batch_sizes, relu, reverse,
                                     need_input_grad, need_weight_grad,
                                     need_bias_grad);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fastrnn, CUDA, m) {
  m.impl("elman_forward", TORCH_BOX(&elman_forward_cuda));
  m.impl("elman_backward", TORCH_BOX(&elman_backward_cuda));
}

}  // namespace fastrnn
