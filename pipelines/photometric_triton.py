"""The photometric stage's pointwise chain fused into one Triton kernel (CUDA; CPU under TRITON_INTERPRET=1).

One view of a batch: uint8 or float crops in, normalized float32 channels-last out. Per pixel, in one
read and one write: the colour-jitter ops in each image's order (brightness, contrast, saturation, hue
with each image's factors; identity where jitter does not fire), grayscale, solarize and the
normalization. Two things are not pointwise:

* contrast blends with the image's mean luma *at its place in the image's order*: a first kernel computes that
  mean per image (one program per image, a fixed summation order: deterministic), applying the ops that
  precede contrast on the fly;
* Gaussian blur sits between grayscale and solarize: images that blur leave the kernel at that point
  (un-normalized, [0, 1]) and the torch path finishes them (blur, solarize, normalize), the same ops
  ``apply_photometric`` runs, so both paths share one definition of blur.

The maths is the torch path's (``pipelines.photometric``) op for op, in fp32; results agree to float
rounding (the tests compare them under the interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_W_R, _W_G, _W_B = 0.2989, 0.587, 0.114  # pipelines.photometric.GRAY_WEIGHTS


@triton.jit
def _luma(r, g, b):
    return r * 0.2989 + g * 0.587 + b * 0.114


@triton.jit
def _hue(r, g, b, shift):
    maxc = tl.maximum(tl.maximum(r, g), b)
    minc = tl.minimum(tl.minimum(r, g), b)
    chroma = maxc - minc
    num = tl.where(maxc == r, g - b, tl.where(maxc == g, (b - r) + 2.0 * chroma, (r - g) + 4.0 * chroma))
    h = num / tl.maximum(chroma, 1e-12) + 6.0 * shift
    h = h - 6.0 * tl.floor(h / 6.0)
    r2 = tl.minimum(tl.maximum(tl.abs(h - 3.0) - 1.0, 0.0), 1.0) * chroma + minc
    g2 = tl.minimum(tl.maximum(2.0 - tl.abs(h - 2.0), 0.0), 1.0) * chroma + minc
    b2 = tl.minimum(tl.maximum(2.0 - tl.abs(h - 4.0), 0.0), 1.0) * chroma + minc
    return r2, g2, b2


@triton.jit
def _clamp01(x):
    return tl.minimum(tl.maximum(x, 0.0), 1.0)


@triton.jit
def _jitter(r, g, b, img, order_ptr, n_ops, fac_ptr, mean_ptr, has_hue):
    """The first ``n_ops`` ops of image ``img``'s jitter order (row ``img`` of the (B, 4) orders) on its pixels."""
    for i in range(n_ops):
        op = tl.load(order_ptr + img * 4 + i)
        f = tl.load(fac_ptr + img * 4 + op)
        if op == 0:  # brightness
            r, g, b = _clamp01(r * f), _clamp01(g * f), _clamp01(b * f)
        elif op == 1:  # contrast: blend with the image's mean luma
            m = tl.load(mean_ptr + img) * (1.0 - f)
            r, g, b = _clamp01(r * f + m), _clamp01(g * f + m), _clamp01(b * f + m)
        elif op == 2:  # saturation: blend with the pixel's luma
            y = _luma(r, g, b) * (1.0 - f)
            r, g, b = _clamp01(r * f + y), _clamp01(g * f + y), _clamp01(b * f + y)
        else:  # hue (f is the shift in turns; 0 where jitter does not fire)
            if has_hue:
                if f != 0.0:
                    r, g, b = _hue(r, g, b, f)
    return r, g, b


@triton.jit
def _load_rgb(x_ptr, img, pix, mask, width, s_b, s_c, s_h, s_w, IS_UINT8: tl.constexpr):
    off = img.to(tl.int64) * s_b + (pix // width) * s_h + (pix % width) * s_w
    r = tl.load(x_ptr + off, mask=mask, other=0).to(tl.float32)
    g = tl.load(x_ptr + off + s_c, mask=mask, other=0).to(tl.float32)
    b = tl.load(x_ptr + off + 2 * s_c, mask=mask, other=0).to(tl.float32)
    if IS_UINT8:
        r, g, b = r * (1.0 / 255.0), g * (1.0 / 255.0), b * (1.0 / 255.0)
    return r, g, b


@triton.jit
def _mean_kernel(x_ptr, mean_ptr, order_ptr, cpos_ptr, fac_ptr, n_pix, width, s_b, s_c, s_h, s_w, has_hue,
                 IS_UINT8: tl.constexpr, BLOCK: tl.constexpr):
    """Mean luma of each image after the jitter ops that precede contrast in its order (one program per image)."""
    img = tl.program_id(0)
    n_before = tl.load(cpos_ptr + img)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for p0 in range(0, n_pix, BLOCK):
        pix = p0 + tl.arange(0, BLOCK)
        mask = pix < n_pix
        r, g, b = _load_rgb(x_ptr, img, pix, mask, width, s_b, s_c, s_h, s_w, IS_UINT8)
        r, g, b = _jitter(r, g, b, img, order_ptr, n_before, fac_ptr, mean_ptr, has_hue)
        acc += tl.where(mask, _luma(r, g, b), 0.0)
    tl.store(mean_ptr + img, tl.sum(acc, axis=0) / n_pix)


@triton.jit
def _chain_kernel(x_ptr, out_ptr, order_ptr, fac_ptr, mean_ptr, flag_ptr, norm_ptr, n_pix, width,
                  s_b, s_c, s_h, s_w, has_hue, IS_UINT8: tl.constexpr, BLOCK: tl.constexpr):
    """Jitter -> grayscale -> (stop here if the image blurs) -> solarize -> normalize, channels-last out."""
    img = tl.program_id(0)
    pix = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = pix < n_pix
    r, g, b = _load_rgb(x_ptr, img, pix, mask, width, s_b, s_c, s_h, s_w, IS_UINT8)
    r, g, b = _jitter(r, g, b, img, order_ptr, 4, fac_ptr, mean_ptr, has_hue)
    flags = tl.load(flag_ptr + img)  # bit 0 gray, bit 1 blur, bit 2 solarize
    if (flags & 1) != 0:
        y = _luma(r, g, b)
        r, g, b = y, y, y
    out = out_ptr + img.to(tl.int64) * n_pix * 3 + pix * 3
    if (flags & 2) != 0:  # blurs: the torch path takes over from here
        tl.store(out, r, mask=mask)
        tl.store(out + 1, g, mask=mask)
        tl.store(out + 2, b, mask=mask)
    else:
        if (flags & 4) != 0:
            r = tl.where(r >= 0.5, 1.0 - r, r)
            g = tl.where(g >= 0.5, 1.0 - g, g)
            b = tl.where(b >= 0.5, 1.0 - b, b)
        tl.store(out, r * tl.load(norm_ptr + 0) + tl.load(norm_ptr + 3), mask=mask)
        tl.store(out + 1, g * tl.load(norm_ptr + 1) + tl.load(norm_ptr + 4), mask=mask)
        tl.store(out + 2, b * tl.load(norm_ptr + 2) + tl.load(norm_ptr + 5), mask=mask)


# Triton chose interpreted or compiled when the kernels above were decorated (TRITON_INTERPRET at import).
INTERPRETED = not isinstance(_chain_kernel, triton.runtime.JITFunction)
BLOCK = 1024


def fused_chain(x: torch.Tensor, order: torch.Tensor, factors: torch.Tensor, flags: torch.Tensor,
                scale: torch.Tensor, bias: torch.Tensor, has_hue: bool, has_contrast: bool = True) -> torch.Tensor:
    """Run the fused chain. x: (B, 3, H, W) uint8 or float32, any strides; order: (B, 4) CPU int64, each image's
    permutation of the jitter ops (``pipelines.photometric.jitter_order``); factors: (B, 4) effective
    brightness/contrast/saturation/hue (identity where jitter does not fire); flags: (B,) int32 bits
    gray=1, blur=2, solarize=4; scale, bias: (3,) normalization: all on x's device. has_hue / has_contrast:
    whether some image's hue shift is non-zero / contrast factor is not 1 (else those ops are skipped).

    Returns float32 (B, 3, H, W) channels-last: normalized, except images flagged blur, which hold their
    [0, 1] values after jitter and grayscale.
    """
    n_b, _, height, width = x.shape
    n_pix = height * width
    dev = x.device
    is_uint8 = x.dtype == torch.uint8
    if not is_uint8 and x.dtype != torch.float32:
        x = x.float()
    out = torch.empty((n_b, 3, height, width), device=dev, dtype=torch.float32, memory_format=torch.channels_last)
    if n_b == 0:
        return out
    # Each image's order and the position of contrast in it, in one host-to-device copy.
    cpos = (order == 1).int().argmax(dim=1, keepdim=True)
    order_cpos = torch.cat([order.int(), cpos.int()], dim=1).to(dev, non_blocking=True)
    order_t, cpos_t = order_cpos[:, :4].contiguous(), order_cpos[:, 4].contiguous()
    norm = torch.cat([scale.reshape(3), bias.reshape(3)]).to(dev, torch.float32)
    means = torch.zeros(n_b, device=dev, dtype=torch.float32)
    strides = x.stride()
    if has_contrast:  # contrast's mean luma, after the ops that come before it in each image's order
        _mean_kernel[(n_b,)](x, means, order_t, cpos_t, factors, n_pix, width, *strides, has_hue,
                             IS_UINT8=is_uint8, BLOCK=BLOCK)
    _chain_kernel[(n_b, triton.cdiv(n_pix, BLOCK))](x, out, order_t, factors, means, flags, norm, n_pix, width,
                                                   *strides, has_hue, IS_UINT8=is_uint8, BLOCK=BLOCK)
    return out
