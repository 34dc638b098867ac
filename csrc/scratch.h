// fastrnn: an op call's CPU temporaries (packed weights, the contiguous
// copies of a batch_first input and of the output's gradient, the gradient
// passed down between layers), in blocks the thread keeps between calls
// (host_blocks.h says why). Each thread's next call takes them again,
// already mapped.
//
// Only temporaries live here, never a tensor an op returns. CUDA tensors go
// to torch's caching allocator, which already does this.
#pragma once

#include "host_blocks.h"
#include "tensor_util.h"

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <new>
#include <vector>

namespace fastrnn::scratch {

using blocks::Block;
using blocks::cache;

// n elements of T, 64-byte aligned, uninitialised, for the scope.
template <typename T>
struct Buffer {
  T* data;
  explicit Buffer(int64_t n) : block_(cache().take(std::max<int64_t>(n, 1) * sizeof(T))) {
    data = static_cast<T*>(block_.data);
  }
  ~Buffer() { cache().give(block_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

 private:
  Block block_;
};

// Tensors for one op call's temporaries: views of cached blocks (CPU) or
// torch's own (elsewhere). The blocks go back when this is destroyed, so no
// tensor made here may outlive it or leave the op.
class Tensors {
 public:
  Tensors() = default;
  Tensors(const Tensors&) = delete;
  Tensors& operator=(const Tensors&) = delete;
  ~Tensors() {
    for (const Block& b : blocks_) cache().give(b);
  }

  // Uninitialised, contiguous, like's dtype and device.
  Tensor empty(const Tensor& like, std::vector<int64_t> shape) {
    if (!like.is_cpu()) return torch::stable::new_empty(like, shape);
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    std::vector<int64_t> strides(shape.size());
    int64_t stride = 1;
    for (size_t i = shape.size(); i-- > 0;) {
      strides[i] = stride;
      stride *= shape[i];
    }
    blocks_.push_back(cache().take(static_cast<size_t>(n) * like.element_size()));
    return torch::stable::from_blob(blocks_.back().data, shape, strides, like.device(),
                                    like.scalar_type());
  }

  // A contiguous copy of t.
  Tensor copy(const Tensor& t) {
    std::vector<int64_t> shape(t.dim());
    for (int64_t d = 0; d < t.dim(); ++d) shape[d] = t.size(d);
    Tensor c = empty(t, shape);
    if (!fill_broadcast(c, t) && !copy_rows(c, t)) torch::stable::copy_(c, t);
    return c;
  }

  // t itself when contiguous, else a contiguous copy.
  Tensor contiguous(const Tensor& t) { return t.is_contiguous() ? t : copy(t); }

 private:
  // dst = src for a CPU src that is one element broadcast (every stride 0:
  // the modules' zero initial state, torch.zeros(()).expand(...)), without
  // the dispatcher. False: not taken.
  static bool fill_broadcast(const Tensor& dst, const Tensor& src) {
    if (!src.is_cpu() || src.numel() == 0) return false;
    for (int64_t d = 0; d < src.dim(); ++d) {
      if (src.stride(d) != 0 && src.size(d) != 1) return false;
    }
    const size_t elem = src.element_size(), bytes = static_cast<size_t>(src.numel()) * elem;
    const char* value = static_cast<const char*>(src.const_data_ptr());
    char* to = static_cast<char*>(dst.data_ptr());
    if (std::all_of(value, value + elem, [](char b) { return b == 0; })) {
      std::memset(to, 0, bytes);
      return true;
    }
    std::memcpy(to, value, elem);
    for (size_t done = elem; done < bytes;) {  // doubling copies of what is filled
      const size_t n = std::min(done, bytes - done);
      std::memcpy(to + done, to, n);
      done += n;
    }
    return true;
  }

  // dst = src for a CPU src of at most 3 dims with unit stride in the last
  // (a batch_first input or its output's gradient, seen time-major): whole
  // rows by memcpy, rows split over threads. torch's copy_ runs these
  // transposed layouts at a fraction of the memory's bandwidth. False: not
  // taken.
  static bool copy_rows(const Tensor& dst, const Tensor& src) {
    const int64_t dims = src.dim();
    if (!src.is_cpu() || dims < 1 || dims > 3 || src.stride(dims - 1) != 1) return false;
    const int64_t outer = dims == 3 ? src.size(0) : 1, inner = dims >= 2 ? src.size(dims - 2) : 1;
    const int64_t so = dims == 3 ? src.stride(0) : 0, si = dims >= 2 ? src.stride(dims - 2) : 0;
    const size_t elem = src.element_size(), row = static_cast<size_t>(src.size(dims - 1)) * elem;
    const char* from = static_cast<const char*>(src.const_data_ptr());
    char* to = static_cast<char*>(dst.data_ptr());
    const int64_t rows = outer * inner;
    // At least 64 KB per task: below that a thread costs more than it copies.
    const int64_t grain = std::max<int64_t>(1, (int64_t(64) << 10) / std::max<int64_t>(row, 1));
    torch::stable::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t o = r / inner, i = r % inner;
        std::memcpy(to + r * row, from + (o * so + i * si) * static_cast<int64_t>(elem), row);
      }
    });
    return true;
  }

  std::vector<Block> blocks_;
};

}  // namespace fastrnn::scratch
