// fastrnn: the few tensor operations the drivers need, on torch's stable ABI.
// Views are made with _reinterpret_tensor (no dispatcher round trip: a small
// stack runs dozens of them per call); everything else goes through torch's
// dispatcher, so results match torch's own kernels.
#pragma once

#include "host_blocks.h"
#include "ops.h"

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/c/shim.h>
#include <torch/headeronly/version.h>

#include <algorithm>
#include <array>
#include <optional>
#include <string>

namespace fastrnn {

// A view of t's storage with the given sizes and strides, starting `offset`
// elements after t's first element.
inline Tensor reinterpret(const Tensor& t, std::initializer_list<int64_t> sizes,
                          std::initializer_list<int64_t> strides, int64_t offset = 0) {
  AtenTensorHandle out = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch__reinterpret_tensor(
      t.get(), static_cast<int64_t>(sizes.size()), sizes.begin(), strides.begin(),
      offset, &out));  // the offset is added to t's own
  return Tensor(out);
}

// rows x cols with row stride ld (unit column stride), `offset` elements in.
inline Tensor view2d(const Tensor& t, int64_t rows, int64_t cols, int64_t ld, int64_t offset = 0) {
  return reinterpret(t, {rows, cols}, {ld, 1}, offset);
}

// t's rows as an [N, W] view with one row stride, where they have one: packed
// [N, W] rows, or the time-major rows (t, b) of a padded [T, B, W]. False
// where they do not (then `rows` is untouched).
inline bool as_rows(const Tensor& t, int64_t N, int64_t W, Tensor& rows) {
  if (W > 1 && t.stride(t.dim() - 1) != 1) return false;
  int64_t ld = 0;
  if (t.dim() == 2) {
    ld = t.stride(0);
  } else if (t.dim() == 3 && t.size(1) == 1) {
    ld = t.stride(0);
  } else if (t.dim() == 3 && (t.size(0) == 1 || t.stride(0) == t.size(1) * t.stride(1))) {
    ld = t.stride(1);
  } else {
    return false;
  }
  rows = view2d(t, N, W, ld);
  return true;
}

// A padded layout's [T, B, W] t, as it lies, where its columns have unit
// stride (e.g. a batch_first tensor's transposed view, whose rows have no one
// stride): step t's rows are at t * stride(0) + b * stride(1).
inline bool as_steps(const Tensor& t, int64_t W, Tensor& steps) {
  if (t.dim() != 3 || (W > 1 && t.stride(2) != 1)) return false;
  steps = t;
  return true;
}

// dst = src (same dtype and shape), by the backend's own copy where it has
// one (Backend::copy: on a GPU one pointwise launch, where torch's copy_ costs
// several times its host time), else by torch's.
template <class Backend>
void copy_into(const Tensor& dst, const Tensor& src) {
  if constexpr (requires { Backend::copy(dst, src); }) {
    if (Backend::copy(dst, src)) return;
  }
  Tensor out = dst;
  torch::stable::copy_(out, src);
}

// The transpose of a 2-D view.
inline Tensor transposed(const Tensor& t) {
  return reinterpret(t, {t.size(1), t.size(0)}, {t.stride(1), t.stride(0)});
}

// t itself when already contiguous (no dispatcher call), else a contiguous copy.
inline Tensor as_contiguous(const Tensor& t) {
  return t.is_contiguous() ? t : torch::stable::contiguous(t);
}

#if TORCH_FEATURE_VERSION < TORCH_VERSION_2_11_0 && defined(__GNUC__)
// torch >= 2.11's from_blob with a deleter (torch/csrc/stable/c/shim.h), which
// the stable ABI targeted here does not declare: weak, so null under a torch
// without it.
extern "C" __attribute__((weak)) AOTITorchError torch_from_blob(
    void* data, int64_t ndim, const int64_t* sizes_ptr, const int64_t* strides_ptr,
    int64_t storage_offset, int32_t dtype, int32_t device_type, int32_t device_index,
    AtenTensorHandle* ret, int32_t layout, const uint8_t* opaque_metadata,
    int64_t opaque_metadata_size, void (*deleter)(void* data, void* ctx), void* deleter_ctx);
#endif

namespace detail {
// strides[0, dims) of a contiguous tensor of `shape`; returns the elements it spans.
inline int64_t contiguous_strides(int64_t dims, const int64_t* shape, int64_t* strides) {
  int64_t stride = 1;
  for (int64_t d = dims; d-- > 0;) {
    strides[d] = stride;
    stride *= std::max<int64_t>(shape[d], 1);
  }
  return stride;
}

// A CPU tensor of `bytes` in a block of blocks::returned() (host_blocks.h
// says why), which its storage's deleter gives back; nullptr where the
// running torch cannot make one (then torch allocates). Past kKeepBytes torch
// allocates too: a block that big would be freed on its return anyway.
inline AtenTensorHandle empty_kept(int64_t dims, const int64_t* shape, const int64_t* strides,
                                   int32_t dtype, int32_t device_index, size_t bytes) {
  constexpr size_t kMinBytes = size_t(64) << 10;  // smaller blocks stay in glibc's bins
  if (bytes < kMinBytes || bytes > blocks::kKeepBytes) return nullptr;
#if TORCH_FEATURE_VERSION >= TORCH_VERSION_2_11_0 || defined(__GNUC__)
#if TORCH_FEATURE_VERSION < TORCH_VERSION_2_11_0
  if (&torch_from_blob == nullptr) return nullptr;
#endif
  const blocks::Block b = blocks::returned().take(bytes);
  auto give_back = [](void* data, void* ctx) {
    blocks::returned().give({data, reinterpret_cast<size_t>(ctx)});
  };
  AtenTensorHandle out = nullptr;
  const AOTITorchError err = torch_from_blob(
      b.data, dims, shape, strides, 0, dtype, aoti_torch_device_type_cpu(), device_index, &out,
      aoti_torch_layout_strided(), nullptr, 0, give_back, reinterpret_cast<void*>(b.bytes));
  if (err != AOTI_TORCH_SUCCESS) {
    blocks::returned().give(b);
    return nullptr;
  }
  return out;
#else
  return nullptr;
#endif
}
}  // namespace detail

// A new contiguous tensor of like's dtype and device: one dispatcher call
// (new_empty makes two, and a backward makes dozens of these), or on the CPU
// none, in a kept block.
inline Tensor empty(const Tensor& like, std::initializer_list<int64_t> shape) {
  std::array<int64_t, 4> strides{};
  FASTRNN_CHECK(shape.size() <= strides.size(), "fastrnn: empty() of ", shape.size(), " dimensions");
  detail::contiguous_strides(static_cast<int64_t>(shape.size()), shape.begin(), strides.data());
  int32_t dtype = 0, device_type = 0, device_index = 0;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_dtype(like.get(), &dtype));
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_type(like.get(), &device_type));
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_index(like.get(), &device_index));
  const auto dims = static_cast<int64_t>(shape.size());
  if (device_type == aoti_torch_device_type_cpu()) {
    int64_t numel = 1;
    for (int64_t s : shape) numel *= s;
    const size_t bytes = static_cast<size_t>(numel) * like.element_size();
    if (AtenTensorHandle kept = detail::empty_kept(dims, shape.begin(), strides.data(), dtype, device_index, bytes)) {
      return Tensor(kept);
    }
  }
  AtenTensorHandle out = nullptr;
  TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(dims, shape.begin(), strides.data(), dtype,
                                                  device_type, device_index, &out));
  return Tensor(out);
}

// t's values in a new contiguous CPU tensor of the floating dtype `to`
// (float32, bfloat16 or float16), in a kept block (empty()): a fresh
// allocation of a weight's or an output's megabytes faulted its pages in on
// every call (a bfloat16 LSTM's inference spent 6% of its time there).
// Null where t is not a contiguous CPU tensor of at most 4 dimensions, or no
// block is kept for its size.
inline std::optional<Tensor> to_kept(const Tensor& t, ScalarType to) {
  const int64_t dims = t.dim();
  if (!t.is_cpu() || !t.is_contiguous() || dims > 4) return std::nullopt;
  const int32_t dtype = to == ScalarType::Float      ? aoti_torch_dtype_float32()
                        : to == ScalarType::BFloat16 ? aoti_torch_dtype_bfloat16()
                        : to == ScalarType::Half     ? aoti_torch_dtype_float16()
                                                     : -1;
  if (dtype < 0) return std::nullopt;
  std::array<int64_t, 4> shape{}, strides{};
  for (int64_t d = 0; d < dims; ++d) shape[d] = t.size(d);
  detail::contiguous_strides(dims, shape.data(), strides.data());
  int32_t device_index = 0;
  TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_index(t.get(), &device_index));
  const size_t bytes = static_cast<size_t>(t.numel()) * (to == ScalarType::Float ? 4 : 2);
  AtenTensorHandle kept = detail::empty_kept(dims, shape.data(), strides.data(), dtype, device_index, bytes);
  if (!kept) return std::nullopt;
  Tensor out(kept);
  torch::stable::copy_(out, t);
  return out;
}

namespace detail {
template <size_t N>
void call(const char* op, const char* overload, std::array<StableIValue, N>& stack) {
  TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(op, overload, stack.data(), TORCH_ABI_VERSION));
}
}  // namespace detail

// self op= other, in place (op: "aten::mul_", ...); returns nothing.
inline void inplace_binary(const char* op, const Tensor& self, const Tensor& other) {
  std::array<StableIValue, 2> stack{torch::stable::detail::from(self),
                                    torch::stable::detail::from(other)};
  detail::call(op, "Tensor", stack);
  (void)torch::stable::detail::to<Tensor>(stack[0]);  // frees the returned handle
}

// a * b, a new tensor.
inline Tensor multiply(const Tensor& a, const Tensor& b) {
  std::array<StableIValue, 2> stack{torch::stable::detail::from(a),
                                    torch::stable::detail::from(b)};
  detail::call("aten::mul", "Tensor", stack);
  return torch::stable::detail::to<Tensor>(stack[0]);
}

// t = bernoulli(keep) / keep in place, from the default generator of t's
// device: torch's own dropout noise (aten/src/ATen/native/Dropout.cpp).
inline void fill_dropout_mask(Tensor& t, double keep) {
  std::array<StableIValue, 3> stack{torch::stable::detail::from(t),
                                    torch::stable::detail::from(keep),
                                    torch::stable::detail::from(std::nullopt)};
  detail::call("aten::bernoulli_", "float", stack);
  (void)torch::stable::detail::to<Tensor>(stack[0]);
  // A CPU scalar: no device allocation, and the value is baked into a CUDA graph capture.
  const Tensor divisor = torch::stable::full({}, keep, t.scalar_type(), std::nullopt,
                                             torch::stable::Device(torch::headeronly::DeviceType::CPU));
  inplace_binary("aten::div_", t, divisor);
}

// Column sums of a 2-D view, [cols].
inline Tensor column_sum(const Tensor& t) {
  const std::vector<int64_t> dim{0};
  return torch::stable::sum(t, torch::headeronly::IntHeaderOnlyArrayRef(dim));
}

// The column sums of t [N, C]: written into `into` ([C], unit stride) where
// given, else returned as a new tensor; by the backend's own reduction where it
// has one (Backend::column_sums: on a GPU one or two launches, where torch's
// sum and a copy cost several times their host time), else by torch's sum.
template <class Backend>
Tensor column_sums(const Tensor& t, std::optional<Tensor> into = std::nullopt) {
  if constexpr (requires { Backend::column_sums(t, t); }) {
    const Tensor out = into ? *into : empty(t, {t.size(1)});
    if (Backend::column_sums(out, t)) return out;
  }
  if (!into) return column_sum(t);
  copy_into<Backend>(*into, column_sum(t));
  return *into;
}

inline std::string shape_str(const Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + "]";
}

}  // namespace fastrnn
