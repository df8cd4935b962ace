// Multi-tensor LARS on CUDA: one kernel launch per step for every parameter of every group.
//
// The parameters are cut into chunks of kChunk elements. The kernel runs as a persistent cooperative
// grid: phase 1 writes each chunk's partial sums of squares (w and g), a grid-wide barrier, phase 2
// reduces the partials of a chunk's tensor (fixed order: deterministic), forms the trust ratio and
// updates the chunk. No host sync, no per-tensor launch; the hyper-parameters of each group and the
// tensor/chunk tables travel in one pinned buffer copied asynchronously. Where cooperative launch is
// unavailable the same kernel runs as two launches (phase 0, then phase 1).
// No torch header here (host code is in lars_cuda.cpp): nvcc compiles this file in seconds.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include "lars_cuda.h"

namespace cg = cooperative_groups;

namespace fastssl_lars {
namespace {

constexpr int kBlock = 512;

// Sum of (a, b) over the block; the result is valid in thread 0. Reuses `shared` (2 x 32 floats).
__device__ float2 block_sum(float a, float b, float* shared) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  for (int off = 16; off > 0; off /= 2) {
    a += __shfl_down_sync(0xffffffffu, a, off);
    b += __shfl_down_sync(0xffffffffu, b, off);
  }
  __syncthreads();  // `shared` may still be read from the previous call
  if (lane == 0) {
    shared[warp] = a;
    shared[32 + warp] = b;
  }
  __syncthreads();
  float2 out = make_float2(0.f, 0.f);
  if (warp == 0) {
    a = lane < kBlock / 32 ? shared[lane] : 0.f;
    b = lane < kBlock / 32 ? shared[32 + lane] : 0.f;
    for (int off = 16; off > 0; off /= 2) {
      a += __shfl_down_sync(0xffffffffu, a, off);
      b += __shfl_down_sync(0xffffffffu, b, off);
    }
    out = make_float2(a, b);
  }
  return out;
}

__device__ void norm_chunk(const TensorMeta* tensors, const GroupMeta* groups, const ChunkMeta* chunks, int c,
                           float2* partials, float* shared) {
  const ChunkMeta ch = chunks[c];
  const TensorMeta t = tensors[ch.tensor];
  if (groups[t.group].exclude) return;  // uniform over the block: no barrier is skipped by only some threads
  const int64_t begin = static_cast<int64_t>(ch.index) * kChunk;
  const int64_t end = min(t.numel, begin + kChunk);
  float sw = 0.f, sg = 0.f;
  int64_t tail = begin;
  if (t.vec4) {  // 16-byte loads: begin is a multiple of kChunk (so of 4) and the base pointers are aligned
    const int64_t end4 = begin + (end - begin) / 4 * 4;
    const auto* w4 = reinterpret_cast<const float4*>(t.w);
    const auto* g4 = reinterpret_cast<const float4*>(t.g);
#pragma unroll 2
    for (int64_t i = begin / 4 + threadIdx.x; i < end4 / 4; i += kBlock) {
      const float4 w = w4[i];
      const float4 g = __ldg(g4 + i);
      sw += w.x * w.x + w.y * w.y + w.z * w.z + w.w * w.w;
      sg += g.x * g.x + g.y * g.y + g.z * g.z + g.w * g.w;
    }
    tail = end4;
  }
  for (int64_t i = tail + threadIdx.x; i < end; i += kBlock) {
    const float w = t.w[i];
    const float g = t.g[i];
    sw += w * w;
    sg += g * g;
  }
  const float2 s = block_sum(sw, sg, shared);
  if (threadIdx.x == 0) partials[c] = s;
}

// One element: momentum buffer updated in place, the new weight returned. Rounded like torch's ops in the
// reference loop: add(a, b, alpha) is fma(b, alpha, a); mul then add.
__device__ __forceinline__ float lars_update(float w, float g, float* buf, float trust, float wd, float m,
                                             float neg_lr, bool nesterov, bool exclude) {
  const float d = exclude ? g : __fmul_rn(__fmaf_rn(w, wd, g), trust);
  const float b = __fadd_rn(__fmul_rn(*buf, m), d);
  *buf = b;
  return __fmaf_rn(nesterov ? __fmaf_rn(b, m, d) : b, neg_lr, w);
}

__device__ void update_chunk(const TensorMeta* tensors, const GroupMeta* groups, const ChunkMeta* chunks, int c,
                             const float2* partials, float* shared) {
  const ChunkMeta ch = chunks[c];
  const TensorMeta t = tensors[ch.tensor];
  const GroupMeta gm = groups[t.group];
  __syncthreads();  // shared[0] may still be read from the previous chunk
  if (threadIdx.x < 32) {
    float trust = 1.f;
    if (!gm.exclude) {
      // Warp 0 reduces this tensor's partials, lane-strided then shuffled: the same order in every block.
      float sw = 0.f, sg = 0.f;
      for (int k = threadIdx.x; k < t.n_chunks; k += 32) {
        const float2 p = __ldcg(partials + t.first_chunk + k);  // from L2: written by other blocks
        sw += p.x;
        sg += p.y;
      }
      for (int off = 16; off > 0; off /= 2) {
        sw += __shfl_down_sync(0xffffffffu, sw, off);
        sg += __shfl_down_sync(0xffffffffu, sg, off);
      }
      const float wn = sqrtf(sw);
      const float gn = sqrtf(sg);
      if (wn > 0.f && gn > 0.f) trust = gm.eta * wn / (gn + gm.weight_decay * wn);
    }
    if (threadIdx.x == 0) shared[0] = trust;
  }
  __syncthreads();
  const float trust = shared[0];
  const float wd = gm.exclude ? 0.f : gm.weight_decay;
  const float m = gm.momentum;
  const float neg_lr = -gm.lr;
  const int64_t begin = static_cast<int64_t>(ch.index) * kChunk;
  const int64_t end = min(t.numel, begin + kChunk);
  const bool nesterov = gm.nesterov != 0;
  const bool exclude = gm.exclude != 0;
  int64_t tail = begin;
  if (t.vec4) {
    const int64_t end4 = begin + (end - begin) / 4 * 4;
    auto* w4 = reinterpret_cast<float4*>(t.w);
    const auto* g4 = reinterpret_cast<const float4*>(t.g);
    auto* b4 = reinterpret_cast<float4*>(t.buf);
#pragma unroll 2
    for (int64_t i = begin / 4 + threadIdx.x; i < end4 / 4; i += kBlock) {
      float4 w = w4[i];
      const float4 g = __ldg(g4 + i);
      float4 b = b4[i];
      w.x = lars_update(w.x, g.x, &b.x, trust, wd, m, neg_lr, nesterov, exclude);
      w.y = lars_update(w.y, g.y, &b.y, trust, wd, m, neg_lr, nesterov, exclude);
      w.z = lars_update(w.z, g.z, &b.z, trust, wd, m, neg_lr, nesterov, exclude);
      w.w = lars_update(w.w, g.w, &b.w, trust, wd, m, neg_lr, nesterov, exclude);
      b4[i] = b;
      w4[i] = w;
    }
    tail = end4;
  }
  for (int64_t i = tail + threadIdx.x; i < end; i += kBlock) {
    t.w[i] = lars_update(t.w[i], t.g[i], t.buf + i, trust, wd, m, neg_lr, nesterov, exclude);
  }
}

// phase < 0: both phases with a grid barrier (cooperative launch only); 0 or 1: that phase alone.
__global__ void __launch_bounds__(kBlock) lars_kernel(const TensorMeta* tensors, const GroupMeta* groups,
                                                      const ChunkMeta* chunks, int n_chunks, float2* partials,
                                                      int phase) {
  __shared__ float shared[64];
  if (phase <= 0) {
    for (int c = blockIdx.x; c < n_chunks; c += gridDim.x) norm_chunk(tensors, groups, chunks, c, partials, shared);
  }
  if (phase < 0) cg::this_grid().sync();
  if (phase != 0) {
    for (int c = blockIdx.x; c < n_chunks; c += gridDim.x) update_chunk(tensors, groups, chunks, c, partials, shared);
  }
}

// Blocks that fit on the device at once (the persistent grid), or 0 without cooperative launch.
cudaError_t cooperative_blocks(int device, int* blocks) {
  int supported = 0, per_sm = 0, sms = 0;
  cudaError_t err = cudaDeviceGetAttribute(&supported, cudaDevAttrCooperativeLaunch, device);
  if (err == cudaSuccess && supported) {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, lars_kernel, kBlock, 0);
  }
  if (err == cudaSuccess && supported) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  *blocks = supported ? per_sm * sms : 0;
  return err;
}

}  // namespace

cudaError_t launch_lars(const TensorMeta* tensors, const GroupMeta* groups, const ChunkMeta* chunks, int n_chunks,
                        float* partials, int device, cudaStream_t stream) {
  static thread_local int resident[64] = {};  // per device: cooperative grid size + 1 (0: not asked yet)
  if (device < 0 || device >= 64) return cudaErrorInvalidDevice;
  if (resident[device] == 0) {
    int blocks = 0;
    const cudaError_t err = cooperative_blocks(device, &blocks);
    if (err != cudaSuccess) return err;
    resident[device] = blocks + 1;
  }
  const int blocks = resident[device] - 1;
  auto* partial2 = reinterpret_cast<float2*>(partials);
  if (blocks > 0) {
    int phase = -1;
    void* args[] = {&tensors, &groups, &chunks, &n_chunks, &partial2, &phase};
    const dim3 grid(blocks < n_chunks ? blocks : n_chunks);
    return cudaLaunchCooperativeKernel(reinterpret_cast<void*>(lars_kernel), grid, dim3(kBlock), args, 0, stream);
  }
  lars_kernel<<<n_chunks, kBlock, 0, stream>>>(tensors, groups, chunks, n_chunks, partial2, 0);
  lars_kernel<<<n_chunks, kBlock, 0, stream>>>(tensors, groups, chunks, n_chunks, partial2, 1);
  return cudaGetLastError();
}

}  // namespace fastssl_lars
