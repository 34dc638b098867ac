// fastrnn: blocks of host memory kept between op calls.
//
// Why: a training step frees and re-allocates the same megabytes on every
// call, and glibc hands freed memory at the top of its heap back to the
// kernel (and maps each block past its mmap threshold afresh), so the next
// call faults the pages in again: about 1 us per 4 KB page. For a small stack
// that was 10-20% of its forward+backward, or more: a 2-layer, hidden-128
// stack's module step faulted 2.8 MB a call (its output and reserve) and
// spent 0.5-1.5 ms of system time on a 6 ms step.
//
// Two keepers of the same kind of cache:
// - cache(): the thread's own, for an op call's temporaries (scratch.h);
// - returned(): the process's, for the CPU tensors an op returns (output,
//   reserve, gradients), whose storage may be freed on any thread, so it
//   takes a lock (uncontended: tens of nanoseconds a block).
#pragma once

#include <algorithm>
#include <cstddef>
#include <mutex>
#include <new>
#include <vector>

namespace fastrnn::blocks {

// What one keeper holds between calls; a block given back past it is freed.
constexpr size_t kKeepBytes = size_t(64) << 20;
constexpr std::align_val_t kAlign{64};

struct Block {
  void* data = nullptr;
  size_t bytes = 0;
};

class Cache {
 public:
  ~Cache() {
    for (const Block& b : free_) ::operator delete(b.data, kAlign);
  }

  // A block of at least `bytes`: the smallest kept one that fits without
  // wasting more than half of it, else a new one.
  Block take(size_t bytes) {
    bytes = std::max<size_t>(bytes, 64);
    auto best = free_.end();
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->bytes >= bytes && it->bytes / 2 <= bytes && (best == free_.end() || it->bytes < best->bytes)) {
        best = it;
      }
    }
    if (best == free_.end()) return {::operator new(bytes, kAlign), bytes};
    const Block b = *best;
    kept_ -= b.bytes;
    *best = free_.back();
    free_.pop_back();
    return b;
  }

  void give(const Block& b) {
    if (kept_ + b.bytes > kKeepBytes) {
      ::operator delete(b.data, kAlign);
      return;
    }
    kept_ += b.bytes;
    free_.push_back(b);
  }

 private:
  std::vector<Block> free_;
  size_t kept_ = 0;
};

inline Cache& cache() {
  thread_local Cache c;
  return c;
}

class LockedCache {
 public:
  Block take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    return cache_.take(bytes);
  }
  void give(const Block& b) {
    std::lock_guard<std::mutex> lock(mutex_);
    cache_.give(b);
  }

 private:
  std::mutex mutex_;
  Cache cache_;
};

// Never destroyed: a returned tensor may be freed after static destructors ran.
inline LockedCache& returned() {
  static LockedCache* c = new LockedCache;
  return *c;
}

}  // namespace fastrnn::blocks
