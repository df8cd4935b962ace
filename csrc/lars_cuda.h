// Shared by lars_cuda.cpp (host side: checks, tables, launch arguments) and lars_cuda.cu (the kernel).
// Plain types only: the .cu then needs no torch header, which keeps the nvcc part of the build short.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastssl_lars {

constexpr int64_t kChunk = 1 << 14;  // elements per chunk: one block's share of a tensor

struct TensorMeta {
  float* w;
  const float* g;
  float* buf;
  int64_t numel;
  int32_t group;
  int32_t first_chunk;
  int32_t n_chunks;
  int32_t vec4;  // w, g and buf are 16-byte aligned: the kernel moves float4s
};

struct GroupMeta {
  float lr, momentum, weight_decay, eta;
  int32_t nesterov, exclude, pad0, pad1;
};

struct ChunkMeta {
  int32_t tensor;
  int32_t index;  // chunk index within its tensor
};

// One LARS step over the tables in device memory (copied there by the caller, in stream order):
// `tensors` (n_tensors), `groups`, `chunks` (n_chunks), scratch `partials` (n_chunks x float2).
cudaError_t launch_lars(const TensorMeta* tensors, const GroupMeta* groups, const ChunkMeta* chunks, int n_chunks,
                        float* partials, int device, cudaStream_t stream);

}  // namespace fastssl_lars
