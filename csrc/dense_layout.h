// Layout check shared by the CPU and CUDA LARS bindings.
#pragma once

#include <ATen/core/Tensor.h>

namespace fastssl {

// Same storage order with no gaps for all three: all contiguous, or all channels-last contiguous
// (sizes are compared separately). Strides alone would reject equal layouts that differ only on size-1 dims.
inline bool same_dense_layout(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  for (auto f : {at::MemoryFormat::Contiguous, at::MemoryFormat::ChannelsLast, at::MemoryFormat::ChannelsLast3d}) {
    const bool rank_ok = f == at::MemoryFormat::Contiguous || (f == at::MemoryFormat::ChannelsLast && a.dim() == 4) ||
                         (f == at::MemoryFormat::ChannelsLast3d && a.dim() == 5);
    if (!rank_ok) continue;
    if (a.is_contiguous(f) && b.is_contiguous(f) && c.is_contiguous(f)) return true;
  }
  return false;
}

}  // namespace fastssl
