// fastrnn CPU: a spinning barrier for the threads of one parallel region.
//
// The recurrence meets once per time step; a step is a few microseconds of
// work, so waiting must not go through the OS. Arrivals carry a weight: a
// thread that holds several of the barrier's slots (a parallel_for chunk
// spanning them) arrives once for all of them, so the barrier counts slots,
// not threads, and never waits for a thread that does not exist.
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>

namespace fastrnn::cpu {

inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class alignas(64) SpinBarrier {
 public:
  explicit SpinBarrier(int64_t slots = 1) : slots_(slots) {}
  void reset(int64_t slots) {
    slots_ = slots;
    arrived_.store(0, std::memory_order_relaxed);
  }

  // Counts `weight` slots as arrived and returns a ticket for wait(). Split
  // from wait() so that a thread holding slots of several barriers arrives at
  // all of them before it waits at any (no order between barriers is needed).
  int64_t arrive(int64_t weight) {
    // Read before arriving: the generation cannot move on without us.
    const int64_t gen = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(weight, std::memory_order_acq_rel) + weight == slots_) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.store(gen + 1, std::memory_order_release);
    }
    return gen;
  }

  void wait(int64_t ticket) const {
    // Spin with a pause; after some 10-50 us also yield, so that a waiter on
    // an oversubscribed machine gives its core to the thread it waits for.
    for (int64_t spins = 0; generation_.load(std::memory_order_acquire) == ticket; ++spins) {
      if (spins < (1 << 11)) {
        spin_pause();
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  int64_t slots_;
  std::atomic<int64_t> arrived_{0};
  alignas(64) std::atomic<int64_t> generation_{0};
};

}  // namespace fastrnn::cpu
