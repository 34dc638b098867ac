// fastrnn CUDA kernels: the shared driver (elman_driver.h) with cuBLAS GEMMs
// through torch's CUDA shims (one per step, on the current stream) and a
// fused activation-derivative kernel. This is the general path that works
// for every hidden size; the persistent on-chip recurrence (issue "CUDA
// kernels") plugs in here.
#include "../elman_driver.h"

#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cuda.h>
#include <torch/csrc/stable/accelerator.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace fastrnn {
namespace {

template <typename T>
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v) { return static_cast<T>(v); }
template <>
__device__ __forceinline__ __half from_float(float v) { return __float2half(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16(v); }

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
      const float y = to_float(out[i]);
      const float g = to_float(grad[i]);
      grad[i] = from_float<T>(relu ? (y <= 0.f ? 0.f : g) : g * (1.f - y * y));
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
