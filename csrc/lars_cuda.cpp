// Host side of the multi-tensor CUDA LARS step and its Python binding: checks the tensors, builds the
// tensor / group / chunk tables, copies them to the device in one asynchronous pinned transfer and launches
// the kernel (lars_cuda.cu) on the current stream. Narrow includes keep the g++ part of the build short.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "dense_layout.h"
#include "lars_cuda.h"

using fastssl_lars::ChunkMeta;
using fastssl_lars::GroupMeta;
using fastssl_lars::kChunk;
using fastssl_lars::TensorMeta;

namespace {

size_t align8(size_t n) { return (n + 7) / 8 * 8; }

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

}  // namespace

void lars_step_cuda(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                    const std::vector<at::Tensor>& bufs, const std::vector<int64_t>& group_index,
                    const std::vector<double>& lr, const std::vector<double>& momentum,
                    const std::vector<double>& weight_decay, const std::vector<double>& eta,
                    const std::vector<bool>& nesterov, const std::vector<bool>& exclude) {
  const size_t n_tensors = params.size();
  const size_t n_groups = lr.size();
  TORCH_CHECK(grads.size() == n_tensors && bufs.size() == n_tensors && group_index.size() == n_tensors,
              "lars_step_cuda: params, grads, bufs and group_index must have the same length");
  TORCH_CHECK(momentum.size() == n_groups && weight_decay.size() == n_groups && eta.size() == n_groups &&
                  nesterov.size() == n_groups && exclude.size() == n_groups,
              "lars_step_cuda: one value per group for every hyper-parameter");
  if (n_tensors == 0) return;
  const at::Device device = params[0].device();
  const c10::cuda::CUDAGuard guard(device);

  std::vector<TensorMeta> tmeta(n_tensors);
  std::vector<ChunkMeta> cmeta;
  for (size_t i = 0; i < n_tensors; ++i) {
    const auto& p = params[i];
    for (const auto* t : {&p, &grads[i], &bufs[i]}) {
      TORCH_CHECK(t->device() == device && t->scalar_type() == at::kFloat,
                  "lars_step_cuda: fp32 tensors on one CUDA device only");
      TORCH_CHECK(t->sizes() == p.sizes(),
                  "lars_step_cuda: param, grad and buffer must share one shape");
    }
    TORCH_CHECK(fastssl::same_dense_layout(p, grads[i], bufs[i]),
                "lars_step_cuda: param, grad and buffer must be dense with one layout");
    TORCH_CHECK(group_index[i] >= 0 && static_cast<size_t>(group_index[i]) < n_groups, "lars_step_cuda: bad group");
    const int64_t n = p.numel();
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    tmeta[i] = {p.data_ptr<float>(), grads[i].data_ptr<float>(), bufs[i].data_ptr<float>(), n,
                static_cast<int32_t>(group_index[i]), static_cast<int32_t>(cmeta.size()),
                static_cast<int32_t>(chunks), aligned16(p) && aligned16(grads[i]) && aligned16(bufs[i]) ? 1 : 0};
    for (int64_t k = 0; k < chunks; ++k) cmeta.push_back({static_cast<int32_t>(i), static_cast<int32_t>(k)});
  }
  std::vector<GroupMeta> gmeta(n_groups);
  for (size_t j = 0; j < n_groups; ++j) {
    gmeta[j] = {static_cast<float>(lr[j]), static_cast<float>(momentum[j]), static_cast<float>(weight_decay[j]),
                static_cast<float>(eta[j]), nesterov[j] ? 1 : 0, exclude[j] ? 1 : 0, 0, 0};
  }
  const int n_chunks = static_cast<int>(cmeta.size());
  if (n_chunks == 0) return;

  // One pinned staging buffer -> one async copy (the caching host allocator keeps it alive until done).
  const size_t t_bytes = align8(sizeof(TensorMeta) * n_tensors);
  const size_t g_bytes = align8(sizeof(GroupMeta) * n_groups);
  const size_t c_bytes = align8(sizeof(ChunkMeta) * cmeta.size());
  auto host = at::empty({static_cast<int64_t>(t_bytes + g_bytes + c_bytes)},
                        at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  auto* h = static_cast<uint8_t*>(host.data_ptr());
  std::memcpy(h, tmeta.data(), sizeof(TensorMeta) * n_tensors);
  std::memcpy(h + t_bytes, gmeta.data(), sizeof(GroupMeta) * n_groups);
  std::memcpy(h + t_bytes + g_bytes, cmeta.data(), sizeof(ChunkMeta) * cmeta.size());
  auto meta = host.to(device, at::kByte, /*non_blocking=*/true, /*copy=*/false);
  auto partials = at::empty({2 * static_cast<int64_t>(n_chunks)}, params[0].options());

  auto* d = static_cast<uint8_t*>(meta.data_ptr());
  const auto* tensors = reinterpret_cast<const TensorMeta*>(d);
  const auto* groups = reinterpret_cast<const GroupMeta*>(d + t_bytes);
  const auto* chunk_table = reinterpret_cast<const ChunkMeta*>(d + t_bytes + g_bytes);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  C10_CUDA_CHECK(fastssl_lars::launch_lars(tensors, groups, chunk_table, n_chunks, partials.data_ptr<float>(),
                                           device.index(), stream));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lars_step", &lars_step_cuda,
        "One LARS step over all groups in one launch: lists of fp32 CUDA tensors, group index per tensor, "
        "one lr/momentum/weight_decay/eta/nesterov/exclude per group");
}
