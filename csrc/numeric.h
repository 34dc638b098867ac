// fastrnn: storage and accumulation types, for CPU loops and CUDA kernels alike.
//
// Every kernel reads its storage type T (float, double, and the half types)
// into an accumulation type acc_t (double for double, float otherwise), does
// its arithmetic there, and stores back: load<acc_t>(v), store<T>(x). The CUDA
// half types need their intrinsics (torch's build flags switch off their
// implicit conversions); torch's CPU Half and BFloat16 convert implicitly.
#pragma once

#include <type_traits>

// Always inlined, on the host too: the CPU kernels call these on vectors
// from functions compiled for AVX2 or AVX-512 (target attributes), and a copy
// GCC chose to keep out of line is compiled for the baseline ISA (tanh on 16
// floats one lane at a time, without FMA): slower, and in the last bit other
// than the inlined copies, so that results depended on which call sites GCC
// inlined (e.g. on the tile height, and so on the thread count).
#define FASTRNN_HOST_INLINE inline __attribute__((always_inline))
#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define FASTRNN_HD __host__ __device__ __forceinline__
#else
#define FASTRNN_HD FASTRNN_HOST_INLINE
#endif

namespace fastrnn {

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename acc_t, typename T>
FASTRNN_HD acc_t load(T v) {
#if defined(__CUDACC__)
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(v);
  } else {
    return static_cast<acc_t>(v);
  }
#else
  return static_cast<acc_t>(v);
#endif
}

template <typename T, typename acc_t>
FASTRNN_HD T store(acc_t v) {
#if defined(__CUDACC__)
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half(static_cast<float>(v));
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16(static_cast<float>(v));
  } else {
    return static_cast<T>(v);
  }
#else
  return static_cast<T>(v);
#endif
}

}  // namespace fastrnn
