"""``train.deterministic=true``: the same run gives the same weights, on a CPU and on CUDA.

What it takes on CUDA, op by op (the kernels a training step of ours runs):

- cuBLAS (every matmul, linear layer): with ``torch.use_deterministic_algorithms(True)`` PyTorch refuses the
  first matmul unless ``CUBLAS_WORKSPACE_CONFIG`` is ``:4096:8`` or ``:16:8`` (cuBLAS picks a reduction split per
  workspace otherwise). :func:`enable` sets ``:4096:8`` when it is unset, before the model's first matmul: PyTorch
  reads it when it creates the cuBLAS workspace, and again at each check. Another value is refused.
- cuDNN convolutions: deterministic algorithms only, and no benchmark-driven choice (``cudnn.benchmark`` off).
- ResNet's global pool, ``AdaptiveAvgPool2d((1, 1))``: PyTorch computes a 1 x 1 adaptive pool as a mean over
  H, W (plus a restride for channels-last input), so its backward is the mean's (an expand), never
  ``adaptive_avg_pool2d_backward`` (which has no deterministic CUDA kernel and would throw).
- ViT's learned position table, resized bicubically for the views whose grid differs from the table's
  (multi-crop local views): ``upsample_bicubic2d_backward`` has no deterministic CUDA kernel and throws. The ViT
  resizes it with the same bicubic weights as matrices instead while the mode is on (``models.vit``).
- Attention (``scaled_dot_product_attention``), ``index_add``/``scatter_add``/``index_select`` backward,
  ``cumsum``: PyTorch switches to deterministic implementations by itself (slower).
- fastssl's fused kernels: the InfoNCE/NT-Xent backward is two atomic-free kernels, the photometric stage sums in a
  fixed order per image; the split-K merge is a plain logsumexp / sum.

Not covered: NCCL's all-reduce may pick another algorithm on another node count or topology; decoding (nvJPEG's
hardware and software paths) is outside torch. ``tests/test_determinism.py`` runs a ResNet and a multi-crop ViT
step on CPU and checks that none of the aten ops it records is one that throws on CUDA.
"""

from __future__ import annotations

import os

import torch

from fastssl.config import ConfigError

CUBLAS_VARIABLE = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_DETERMINISTIC = (":4096:8", ":16:8")

# aten ops with no deterministic CUDA kernel: under the mode they raise on CUDA (torch.use_deterministic_algorithms'
# documentation, PyTorch 2.14). Matched against the names a TorchDispatchMode records (``op.overloadpacket``).
THROWING_ON_CUDA = frozenset({
    "avg_pool3d_backward", "adaptive_avg_pool2d_backward", "_adaptive_avg_pool2d_backward",
    "adaptive_avg_pool3d_backward", "_adaptive_avg_pool3d_backward", "adaptive_max_pool2d_backward",
    "fractional_max_pool2d_backward", "fractional_max_pool3d_backward", "max_unpool2d", "max_unpool3d",
    "upsample_linear1d_backward", "upsample_bilinear2d_backward", "upsample_bicubic2d_backward",
    "upsample_trilinear3d_backward", "_upsample_bilinear2d_aa_backward", "_upsample_bicubic2d_aa_backward",
    "reflection_pad1d_backward", "reflection_pad2d_backward", "reflection_pad3d_backward", "nll_loss2d_forward",
    "_ctc_loss_backward", "_embedding_bag_dense_backward", "put_", "histc", "bincount", "median",
    "grid_sampler_2d_backward", "grid_sampler_3d_backward",
})  # (bincount only with weights, median only with indices: listed whole, the stricter reading)


def enable(device: torch.device) -> None:
    """Deterministic algorithms from here on (``train.deterministic=true``); on CUDA, cuBLAS and cuDNN made so
    first. Raises ``ConfigError`` (one line) when ``CUBLAS_WORKSPACE_CONFIG`` holds a value cuBLAS is not
    deterministic with."""
    if device.type == "cuda":
        value = os.environ.setdefault(CUBLAS_VARIABLE, CUBLAS_DETERMINISTIC[0])
        if value not in CUBLAS_DETERMINISTIC:
            raise ConfigError(f"train.deterministic=true: {CUBLAS_VARIABLE}={value!r} makes cuBLAS nondeterministic; "
                              f"unset it or set {' or '.join(CUBLAS_DETERMINISTIC)}")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)
