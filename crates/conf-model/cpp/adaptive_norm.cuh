// The AdaptiveLayer `x̂ · (1 + c·w_s + b_s) + c·w_h + b_h` (x̂ each row of x normalised) as one
// CUDA kernel each way, for libtorch's CUDA devices: NVRTC compiles this text at run time
// (`cuda_kernels.cpp`). The same text compiles as C++ on the host under `cuda_emulation.cpp`,
// which runs each block's threads as host threads, so that the tests check it on a CPU.
//
// f32 throughout. Each thread owns the columns `threadIdx.x + k · blockDim.x` of a row, at
// most PER_THREAD of them (width ≤ PER_THREAD · blockDim.x); blockDim.x is a multiple of 32.

#ifdef __CUDACC_RTC__
#define KERNEL extern "C" __global__ void
__device__ __forceinline__ float warp_xor(float v, int mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask);
}
#endif

#define PER_THREAD 8

// The sums of each of `v` over the block, in every thread. `shared` holds 32 · N floats and
// is free again when this returns.
template <int N>
__device__ __forceinline__ void block_sums(float (&v)[N], float *shared) {
  for (int mask = 16; mask > 0; mask >>= 1) {
    for (int i = 0; i < N; ++i) {
      v[i] += warp_xor(v[i], mask);
    }
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) {
    for (int i = 0; i < N; ++i) {
      shared[32 * i + warp] = v[i];
    }
  }
  __syncthreads();
  // Every warp adds up the warps' sums, so every thread has the totals without another wait.
  for (int i = 0; i < N; ++i) {
    v[i] = lane < warps ? shared[32 * i + lane] : 0.0f;
  }
  for (int mask = 16; mask > 0; mask >>= 1) {
    for (int i = 0; i < N; ++i) {
      v[i] += warp_xor(v[i], mask);
    }
  }
  __syncthreads();
}

// One block per row: `out`, and the row's mean and 1 / std (what the backward reads besides
// x). Reads x once and writes the output once; the modulation `[scale | shift]` is never
// stored.
KERNEL lookahead_adaptive_norm_forward(const float *__restrict__ x, const float *__restrict__ c,
                                       const float *__restrict__ w, const float *__restrict__ b,
                                       float *__restrict__ out, float *__restrict__ mean,
                                       float *__restrict__ inv_std, int width, float eps) {
  __shared__ float shared[96];
  const long long row = blockIdx.x;
  const float *xr = x + row * width;
  float v[PER_THREAD];
  float sum[1] = {0.0f};
#pragma unroll
  for (int k = 0; k < PER_THREAD; ++k) {
    const int j = threadIdx.x + k * blockDim.x;
    v[k] = j < width ? xr[j] : 0.0f;
    sum[0] += v[k];
  }
  block_sums(sum, shared);
  const float mu = sum[0] / width;
  // The variance from the deviations (two passes over registers), as flex's rows do.
  float squares[1] = {0.0f};
#pragma unroll
  for (int k = 0; k < PER_THREAD; ++k) {
    const int j = threadIdx.x + k * blockDim.x;
    const float d = v[k] - mu;
    squares[0] += j < width ? d * d : 0.0f;
  }
  block_sums(squares, shared);
  const float inv = 1.0f / sqrtf(squares[0] / width + eps);
  const float cr = c[row];
  float *o = out + row * width;
#pragma unroll
  for (int k = 0; k < PER_THREAD; ++k) {
    const int j = threadIdx.x + k * blockDim.x;
    if (j < width) {
      const float xhat = (v[k] - mu) * inv;
      o[j] = xhat * (1.0f + cr * w[j] + b[j]) + cr * w[width + j] + b[width + j];
    }
  }
  if (threadIdx.x == 0) {
    mean[row] = mu;
    inv_std[row] = inv;
  }
}

// The gradients from the output's `grad`, x and each row's mean and 1 / std: `dx` and `dc`
// (either may be null: not wanted), and each block's sums over its rows (`row ≡ blockIdx.x`
// modulo gridDim.x) of the parameters' gradients, `partials[blockIdx.x] = [dw_s | dw_h | db_s |
// db_h]` (4 · width), for the caller to add up in order. Reads grad and x once, writes dx once.
KERNEL lookahead_adaptive_norm_backward(const float *__restrict__ grad,
                                        const float *__restrict__ x,
                                        const float *__restrict__ mean,
                                        const float *__restrict__ inv_std,
                                        const float *__restrict__ c, const float *__restrict__ w,
                                        const float *__restrict__ b, float *__restrict__ dx,
                                        float *__restrict__ dc, float *__restrict__ partials,
                                        int rows, int width) {
  __shared__ float shared[96];
  float dw_s[PER_THREAD], dw_h[PER_THREAD], db_s[PER_THREAD], db_h[PER_THREAD];
#pragma unroll
  for (int k = 0; k < PER_THREAD; ++k) {
    dw_s[k] = dw_h[k] = db_s[k] = db_h[k] = 0.0f;
  }
  for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
    const float mu = mean[row], inv = inv_std[row], cr = c[row];
    const float *gr = grad + row * width;
    const float *xr = x + row * width;
    // ĝ = g · (1 + scale), the normalisation's incoming gradient, and x̂.
    float ghat[PER_THREAD], xhat[PER_THREAD];
    // Σĝ, Σĝ·x̂, and c's gradient Σ g·(x̂·w_s + w_h).
    float sums[3] = {0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) {
      const int j = threadIdx.x + k * blockDim.x;
      ghat[k] = xhat[k] = 0.0f;
      if (j < width) {
        const float g = gr[j];
        const float xh = (xr[j] - mu) * inv;
        const float gh = g * (1.0f + cr * w[j] + b[j]);
        ghat[k] = gh;
        xhat[k] = xh;
        sums[0] += gh;
        sums[1] += gh * xh;
        sums[2] += g * (xh * w[j] + w[width + j]);
        dw_s[k] += cr * g * xh;
        dw_h[k] += cr * g;
        db_s[k] += g * xh;
        db_h[k] += g;
      }
    }
    block_sums(sums, shared);
    if (dx != nullptr) {
      const float mean_g = sums[0] / width, mean_gx = sums[1] / width;
      float *d = dx + row * width;
#pragma unroll
      for (int k = 0; k < PER_THREAD; ++k) {
        const int j = threadIdx.x + k * blockDim.x;
        if (j < width) {
          d[j] = inv * (ghat[k] - mean_g - xhat[k] * mean_gx);
        }
      }
    }
    if (dc != nullptr && threadIdx.x == 0) {
      dc[row] = sums[2];
    }
  }
  float *p = partials + (long long)blockIdx.x * 4 * width;
#pragma unroll
  for (int k = 0; k < PER_THREAD; ++k) {
    const int j = threadIdx.x + k * blockDim.x;
    if (j < width) {
      p[j] = dw_s[k];
      p[width + j] = dw_h[k];
      p[2 * width + j] = db_s[k];
      p[3 * width + j] = db_h[k];
    }
  }
}
