// Runs the CUDA kernels of `adaptive_norm.cuh` on the host, for the tests: the blocks one
// after another, each block's threads as host threads. `__syncthreads` is a barrier among them,
// and a warp's shuffle an exchange through memory between two barriers (the kernels call
// their reductions from every thread of a block, so every thread reaches each barrier). Slow:
// for small shapes, at the launch geometry the GPU gets.

#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace emulated {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};
thread_local Dim3 threadIdx, blockIdx;
Dim3 blockDim, gridDim;  // one launch at a time; set before its threads start

class Barrier {
 public:
  explicit Barrier(unsigned count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const unsigned generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      released_.notify_all();
      return;
    }
    released_.wait(lock, [&] { return generation != generation_; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable released_;
  const unsigned count_;
  unsigned arrived_ = 0, generation_ = 0;
};

struct Block {
  explicit Block(unsigned threads) : barrier(threads), exchange(threads) {}
  Barrier barrier;
  std::vector<float> exchange;
};
thread_local Block *block = nullptr;

inline void __syncthreads() { block->barrier.wait(); }

inline float warp_xor(float v, int mask) {
  block->exchange[threadIdx.x] = v;
  block->barrier.wait();
  const float other = block->exchange[threadIdx.x ^ static_cast<unsigned>(mask)];
  block->barrier.wait();
  return other;
}

#define KERNEL void
#define __device__
#define __forceinline__ inline
#define __shared__ static
#include "adaptive_norm.cuh"
#undef __shared__

// Held by a launch: one at a time, since the kernels' shared memory is a `static` of each and
// the grid's dimensions are shared by all threads.
std::mutex one_launch;

// Runs `kernel` on `grid` blocks of `threads` threads.
template <typename Kernel>
void launch(unsigned grid, unsigned threads, const Kernel &kernel) {
  std::lock_guard<std::mutex> lock(one_launch);
  blockDim = {threads, 1, 1};
  gridDim = {grid, 1, 1};
  for (unsigned b = 0; b < grid; ++b) {
    Block state(threads);
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, b, t] {
        blockIdx = {b, 1, 1};
        threadIdx = {t, 1, 1};
        block = &state;
        kernel();
      });
    }
    for (std::thread &thread : pool) {
      thread.join();
    }
  }
}

}  // namespace emulated

// The argument at `args[i]`, as a kernel launch passes it (a pointer to each).
template <typename T>
T arg(void **args, int i) {
  return *static_cast<T *>(args[i]);
}

extern "C" {

// Launches kernel `which` (0: the forward, 1: the backward) over `grid` blocks of `threads`
// threads on the host, with `args` as `cuLaunchKernel` takes them; null, or the error
// (`malloc`ed).
char *lookahead_emulate_kernel(int which, unsigned grid, unsigned threads, void **args) {
  using emulated::launch;
  using F = const float *;
  try {
    if (which == 0) {
      launch(grid, threads, [&] {
        emulated::lookahead_adaptive_norm_forward(
            arg<F>(args, 0), arg<F>(args, 1), arg<F>(args, 2), arg<F>(args, 3),
            arg<float *>(args, 4), arg<float *>(args, 5), arg<float *>(args, 6),
            arg<int>(args, 7), arg<float>(args, 8));
      });
    } else {
      launch(grid, threads, [&] {
        emulated::lookahead_adaptive_norm_backward(
            arg<F>(args, 0), arg<F>(args, 1), arg<F>(args, 2), arg<F>(args, 3), arg<F>(args, 4),
            arg<F>(args, 5), arg<F>(args, 6), arg<float *>(args, 7), arg<float *>(args, 8),
            arg<float *>(args, 9), arg<int>(args, 10), arg<int>(args, 11));
      });
    }
    return nullptr;
  } catch (const std::exception &e) {
    return strdup(e.what());
  }
}
}
