"""The shared photometric stage: batched colour jitter, grayscale, blur, solarize, normalize.

Every backend hands this stage uint8 crops ``(B, 3, S, S)`` on the training device; it applies one
view's photometric augmentation to the whole batch at once with torch ops (no per-image Python),
so every backend yields the same augmentation distribution and it runs wherever the batch lives.
Where they apply, fused kernels run the same maths in one pass per image instead of the ~30 passes of the
torch ops: Triton on CUDA (``pipelines.photometric_triton``), C++ on CPU (``csrc/photometric_cpu.cpp``);
the torch ops stay as their reference twin (``FASTSSL_PHOTOMETRIC``, see ``photometric_path``).

Distributions follow torchvision (``ColorJitter``, ``RandomGrayscale``, ``GaussianBlur``,
``RandomSolarize``) per image:

* colour jitter fires with ``jitter_p``; factors are uniform in ``[max(0, 1 - x), 1 + x]`` for
  brightness/contrast/saturation and the hue shift uniform in ``[-hue, hue]``. The order of the four
  ops is drawn per image, uniform over the 24 permutations, as torchvision does. (Earlier versions drew
  one order per batch: each image's marginal was still torchvision's, but every image of a
  step shared it, a batch-level signal that a method comparing across steps (MoCo v2's queue) can
  read; BENCHMARKS.md, issue 26, has what it did to MoCo v2.)
* grayscale (ITU-R 601 luma, as torchvision) fires with ``gray_p``.
* Gaussian blur fires with ``blur_p``; sigma uniform in ``blur_sigma``; kernel ~10% of the view
  size, made odd (BYOL: 23 px at 224), reflect padding, separable per-image kernels (grouped conv).
* solarize fires with ``solarize_p``: ``x >= 0.5 -> 1 - x`` on the [0, 1] scale.

Random parameters are drawn on the CPU (a handful of numbers per image) and copied to the device in
one transfer: the same generator state gives the same augmentation on every device, and deciding
which images need the costly ops (hue, blur) never waits for the device.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch
import torch.nn.functional as F

from pipelines.spec import ViewSpec

# torchvision's op indices for ColorJitter's order: 0 brightness, 1 contrast, 2 saturation, 3 hue.
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
# ITU-R 601-2 luma, the weights torchvision's rgb_to_grayscale uses.
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)

Params = dict  # str -> (B,) CPU tensor, plus "order": (B, 4) CPU int64 tensor


def blur_kernel_size(size: int) -> int:
    """Gaussian kernel side for a view of ``size`` px: 10% of it, odd, at least 3 (224 -> 23)."""
    k = max(3, int(0.1 * size))
    return k if k % 2 else k + 1


def sample_photometric_params(view: ViewSpec, batch: int, generator: torch.Generator | None = None) -> Params:
    """Draw one view's per-image photometric decisions on the CPU.

    Returns a dict of CPU tensors, each (batch,): ``jitter``, ``gray``, ``blur``, ``solarize``
    (bool: whether the op fires), ``brightness``, ``contrast``, ``saturation`` (float32 factors),
    ``hue`` (float32 shift, fraction of a turn), ``sigma`` (float32 blur sigma); and ``order``
    (int64 (batch, 4): each image's permutation of the 4 jitter op indices, see ``JITTER_OPS``).
    Factors are drawn for every image; they only act where their op fires. ``generator`` must be a
    CPU generator (or None: the global one).
    """
    u = torch.rand(batch, 9, generator=generator)
    # argsort of 4 i.i.d. uniforms: a uniform random permutation per image (ties have probability ~0).
    order = torch.rand(batch, 4, generator=generator).argsort(dim=1)

    def factor(col: int, strength: float) -> torch.Tensor:
        lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
        return lo + (hi - lo) * u[:, col]

    s_lo, s_hi = view.blur_sigma
    return {
        "jitter": u[:, 0] < view.jitter_p,
        "brightness": factor(1, view.brightness),
        "contrast": factor(2, view.contrast),
        "saturation": factor(3, view.saturation),
        "hue": view.hue * (2.0 * u[:, 4] - 1.0),
        "order": order,
        "gray": u[:, 5] < view.gray_p,
        "blur": u[:, 6] < view.blur_p,
        "sigma": s_lo + (s_hi - s_lo) * u[:, 7],
        "solarize": u[:, 8] < view.solarize_p,
    }


def jitter_order(params: Params, batch: int) -> torch.Tensor:
    """``params["order"]`` as an int64 (batch, 4) CPU tensor, one permutation of 0..3 per image.

    Also accepts one order for the whole batch (a list or a (4,) tensor, e.g. forced in a test), which
    it repeats per image. A row that is not a permutation of 0..3 is an error naming it.
    """
    order = torch.as_tensor(params["order"], dtype=torch.int64).cpu()
    if order.shape == (4,):
        order = order.expand(batch, 4)
    if order.shape != (batch, 4):
        raise ValueError(f'params["order"] must be ({batch}, 4) (or one order of 4), got {tuple(order.shape)}')
    bad = (order.sort(dim=1).values != torch.arange(4)).any(dim=1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f'params["order"] row {i} is {order[i].tolist()}, not a permutation of 0..3')
    return order.contiguous()


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float -> (B, 1, H, W) luma; a (B, 1, H, W) gray image is its own luma up to the
    weights' sum (0.9999), which we keep so both paths match torchvision."""
    if x.shape[1] == 1:
        return x * sum(GRAY_WEIGHTS)
    r, g, b = x.unbind(1)
    return (r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]).unsqueeze(1)


def _blend_(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 1] as torchvision's _blend does; in place on x."""
    return x.mul_(factor).add_(other * (1.0 - factor)).clamp_(0.0, 1.0)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` (B, 1, 1) turns, keeping HSV saturation and value.

    x: (B, 3, H, W) float32 contiguous in [0, 1] -> new (B, 3, H, W) tensor. Works on the hexcone
    directly, never building an HSV tensor: hue h in sextants [0, 6) from the max channel, shifted,
    then each channel = min + chroma * ramp(h) with the piecewise-linear ramps
    R: clamp(|h - 3| - 1), G: clamp(2 - |h - 2|), B: clamp(2 - |h - 4|) (clamped to [0, 1]).
    """
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    # Same tie order as torchvision: red wins, then green, then blue.
    num = torch.where(maxc == r, g - b, torch.where(maxc == g, (b - r).add_(chroma, alpha=2.0),
                                                      (r - g).add_(chroma, alpha=4.0)))
    # A gray pixel has num == 0, so any positive floor for chroma keeps its hue at 0.
    hue = num.div_(chroma.clamp_min(1e-12)).add_(6.0 * shift).remainder_(6.0)
    out = torch.empty_like(x)
    torch.sub(hue, 3.0, out=out[:, 0]).abs_().sub_(1.0)
    torch.sub(hue, 2.0, out=out[:, 1]).abs_().neg_().add_(2.0)
    torch.sub(hue, 4.0, out=out[:, 2]).abs_().neg_().add_(2.0)
    return out.clamp_(0.0, 1.0).mul_(chroma.unsqueeze(1)).add_(minc.unsqueeze(1))


# Up to this kernel size the blur is k multiply-adds of shifted slices per axis; beyond it one grouped
# convolution (on CPU the grouped conv's per-group overhead dominates small kernels).
_SHIFTED_BLUR_MAX_KERNEL = 7


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Per-image separable Gaussian blur with reflect padding: x (M, C, H, W) float, sigma (M,) -> new (M, C, H, W)."""
    m, c, h, w = x.shape
    t = torch.arange(kernel, device=x.device, dtype=x.dtype) - (kernel - 1) / 2
    weights = torch.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
    weights = weights / weights.sum(1, keepdim=True)  # (M, k)
    pad = kernel // 2
    mode = "reflect" if pad < min(h, w) else "replicate"  # reflect needs pad < side
    padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
    if kernel <= _SHIFTED_BLUR_MAX_KERNEL:
        wk = weights.view(m, 1, 1, 1, kernel)
        rows = torch.zeros(m, c, h + 2 * pad, w, device=x.device, dtype=x.dtype)
        for i in range(kernel):
            rows.addcmul_(padded[..., i : i + w], wk[..., i])
        out = torch.zeros(m, c, h, w, device=x.device, dtype=x.dtype)
        for i in range(kernel):
            out.addcmul_(rows[:, :, i : i + h, :], wk[..., i])
        return out
    # One grouped conv per axis over all M*C planes, each plane with its own image's kernel.
    planes = padded.reshape(1, m * c, h + 2 * pad, w + 2 * pad)
    per_plane = weights.repeat_interleave(c, dim=0)  # (M*C, k)
    planes = F.conv2d(planes, per_plane.view(m * c, 1, kernel, 1), groups=m * c)
    planes = F.conv2d(planes, per_plane.view(m * c, 1, 1, kernel), groups=m * c)
    return planes.view(m, c, h, w)


def _on_subset(x: torch.Tensor, mask: torch.Tensor, fn) -> torch.Tensor:
    """Apply ``fn`` to the images where the CPU bool ``mask`` (B,) holds; in place on x.

    The mask lives on the CPU, so choosing the subset costs no device sync, and the costly ops
    (hue, blur) run only on the images that need them.
    """
    n = int(mask.sum())
    if n == 0:
        return x
    if n == mask.numel():
        return fn(x, slice(None))
    idx = mask.nonzero().squeeze(1).to(x.device, non_blocking=True)
    x.index_copy_(0, idx, fn(x.index_select(0, idx), idx))
    return x


def apply_photometric(
    x: torch.Tensor,
    view: ViewSpec,
    mean: tuple[float, float, float] | torch.Tensor,
    std: tuple[float, float, float] | torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    params: Params | None = None,
    return_params: bool = False,
    inplace: bool = False,
    memory_format: torch.memory_format = torch.channels_last,
):
    """One view's photometric augmentation + normalization for a whole batch.

    x: (B, 3, S, S) uint8 (0..255) or float (0..1), any device, any memory format; or (B, 1, S, S)
      for grayscale images, where saturation, hue and grayscale are identities: they are skipped
      and the channel is broadcast to 3 by the normalization (same result up to 1e-4, as the luma weights
      sum to 0.9999; a third of the work).
    mean, std: per-channel normalization on the [0, 1] scale.
    generator: CPU generator for the per-image decisions (None: torch's global CPU generator).
    params: decisions to use instead of sampling (see ``sample_photometric_params``), e.g. forced
      factors in tests. return_params: also return the decisions used.
    inplace: a float32 ``x`` may be overwritten (saves a copy; uint8 input is never modified).
    memory_format: the layout of the result, the model's (``torch.channels_last`` or ``torch.contiguous_format``).
    Returns float32 (B, 3, S, S) normalized, in ``memory_format``, on x's device;
    ``(out, params)`` when ``return_params``.
    """
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"x must be (B, 3, H, W) or (B, 1, H, W), got {tuple(x.shape)}")
    colour = x.shape[1] == 3
    batch, device = x.shape[0], x.device
    if params is None:
        params = sample_photometric_params(view, batch, generator)
    path = photometric_path(x) if colour else "torch"
    std_t = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    scale = (1.0 / std_t).to(device, non_blocking=True)
    bias = (-torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) / std_t).to(device, non_blocking=True)
    if path != "torch":  # the fused kernels read x as it is (uint8 or float, any strides)
        out = (_apply_fused if path == "triton" else _apply_cpp)(x, params, scale, bias)
        # The fused kernels write channels-last; NCHW costs one copy of the view (~0.1 ms for 128 x 3 x 32 x 32).
        out = out.contiguous(memory_format=memory_format)
        return (out, params) if return_params else out
    # Work in plain NCHW: per-channel planes are then contiguous, which the colour ops and the subset
    # gathers need to run at memory speed; the normalization writes channels-last at the end.
    if x.dtype == torch.uint8:
        x = x.to(torch.float32, memory_format=torch.contiguous_format).mul_(1.0 / 255.0)
    elif not (inplace and x.dtype == torch.float32 and x.is_contiguous()):
        x = x.to(torch.float32, memory_format=torch.contiguous_format, copy=True)

    jitter = params["jitter"].bool()
    # Effective factors: identity where jitter does not fire, so b/c/s run on the whole batch
    # without masking (a factor of 1 is an exact no-op) and hue runs on its subset only.
    ident = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0}
    eff = {k: torch.where(jitter, params[k].float(), torch.tensor(ident[k])) for k in JITTER_OPS}
    active = {k: bool((eff[k] != ident[k]).any()) for k in JITTER_OPS}
    if not colour:  # on gray pixels saturation and hue change nothing
        active["saturation"] = active["hue"] = False
    if any(active.values()):
        # One host-to-device copy for all per-image factors.
        packed = torch.stack([eff[k] for k in JITTER_OPS], 1).to(device, non_blocking=True)
        dev = {k: packed[:, i].view(batch, 1, 1, 1) for i, k in enumerate(JITTER_OPS)}
        shift = dev["hue"].view(batch, 1, 1)
        order = jitter_order(params, batch)
        # Each image runs its own order: at each of the 4 positions, every op runs on the images that have it
        # there (and move away from identity), a subset chosen on the CPU.
        for pos in range(4):
            for op, name in enumerate(JITTER_OPS):
                if not active[name]:
                    continue
                mask = (order[:, pos] == op) & (eff[name] != ident[name])
                if name == "brightness":
                    x = _on_subset(x, mask, lambda xs, i, f=dev[name]: xs.mul_(f[i]).clamp_(0.0, 1.0))
                elif name == "contrast":
                    x = _on_subset(x, mask, lambda xs, i, f=dev[name]: _blend_(
                        xs, _gray(xs).mean(dim=(1, 2, 3), keepdim=True), f[i]))
                elif name == "saturation":
                    x = _on_subset(x, mask, lambda xs, i, f=dev[name]: _blend_(xs, _gray(xs), f[i]))
                else:
                    x = _on_subset(x, mask, lambda xs, i: _shift_hue(xs, shift[i]))

    if colour:
        x = _on_subset(x, params["gray"].bool(), lambda xs, i: _gray(xs).expand_as(xs).contiguous())

    blur = params["blur"].bool()
    if blur.any():
        kernel = blur_kernel_size(x.shape[-1])
        sigma = params["sigma"].float().to(device, non_blocking=True)
        x = _on_subset(x, blur, lambda xs, i: _gaussian_blur(xs, sigma[i], kernel))

    x = _on_subset(x, params["solarize"].bool(), lambda xs, i: torch.where(xs >= 0.5, 1.0 - xs, xs))

    # Normalize as x * (1 / std) - mean / std in one pass that writes the result's layout; a gray (B, 1)
    # batch broadcasts to 3 channels here.
    out = torch.empty((batch, 3, *x.shape[2:]), device=device, memory_format=memory_format)
    x = torch.addcmul(bias, x, scale, out=out)
    return (x, params) if return_params else x


_MODES = ("auto", "torch", "triton", "cpp")


def photometric_path(x: torch.Tensor) -> str:
    """Which implementation ``apply_photometric`` runs on a (B, 3, H, W) ``x``: "triton" | "cpp" | "torch".

    ``FASTSSL_PHOTOMETRIC`` = auto (default: the fused Triton chain for CUDA tensors when Triton is installed,
    the fused C++ kernel for CPU tensors when it builds (the first use compiles it, cached afterwards; a failed
    build warns once and uses the torch path), the torch path otherwise) | torch (always the torch path, the
    reference twin) | triton (always; CPU tensors need TRITON_INTERPRET=1 set before the kernel module is
    first imported) | cpp (always the C++ kernel; CPU tensors only, a failed build is an error).
    (B, 1, H, W) gray input always takes the torch path.
    """
    mode = os.environ.get("FASTSSL_PHOTOMETRIC", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"FASTSSL_PHOTOMETRIC must be one of {', '.join(_MODES)}, got {mode!r}")
    if mode == "torch":
        return "torch"
    if mode == "triton":
        if not _have_triton():
            raise RuntimeError("FASTSSL_PHOTOMETRIC=triton but triton is not installed")
        return "triton"
    if mode == "cpp":
        if x.device.type != "cpu":
            raise ValueError(f"FASTSSL_PHOTOMETRIC=cpp runs on CPU tensors only, got a {x.device.type} tensor")
        return "cpp"
    if x.is_cuda:
        return "triton" if _have_triton() else "torch"
    return "cpp" if x.device.type == "cpu" and _have_cpp() else "torch"


def use_fused(x: torch.Tensor) -> bool:
    """Whether ``apply_photometric`` runs the fused Triton chain on ``x`` (see ``photometric_path``)."""
    return photometric_path(x) == "triton"


_cpp_warned = False


def _have_cpp() -> bool:
    """Whether the C++ kernel is built (building it on the first call); warns once when it cannot be."""
    global _cpp_warned
    from pipelines import native  # lazy: importing pipelines does not need the builder

    try:
        native.load_photometric_cpu()
        return True
    except Exception as exc:  # noqa: BLE001 - compiler errors arrive as several exception types
        if not _cpp_warned:
            _cpp_warned = True
            warnings.warn(f"photometric: the C++ CPU kernel is unavailable ({type(exc).__name__}: {exc}); "
                          "using the torch path", RuntimeWarning, stacklevel=3)
        return False


def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def _apply_fused(x: torch.Tensor, params: Params, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The fused chain (pipelines.photometric_triton), then blur + solarize + normalize for the images that blur."""
    from pipelines import photometric_triton

    if not x.is_cuda and not photometric_triton.INTERPRETED:
        raise RuntimeError("pipelines.photometric_triton was imported before TRITON_INTERPRET=1 was set, so its "
                           "kernel is compiled for CUDA and cannot take CPU tensors")
    batch, device = x.shape[0], x.device
    jitter = params["jitter"].bool()
    ident = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0}
    factors = torch.stack([torch.where(jitter, params[k].float(), torch.tensor(ident[k])) for k in JITTER_OPS], 1)
    blur, solarize = params["blur"].bool(), params["solarize"].bool()
    flags = params["gray"].bool().int() + 2 * blur.int() + 4 * solarize.int()
    packed = torch.cat([factors.reshape(-1), flags.float()]).to(device, non_blocking=True)
    out = photometric_triton.fused_chain(
        x, jitter_order(params, batch), packed[: 4 * batch].view(batch, 4), packed[4 * batch:].to(torch.int32),
        scale.reshape(3), bias.reshape(3), has_hue=bool((factors[:, 3] != 0).any()),
        has_contrast=bool((factors[:, 1] != 1).any()))
    if blur.any():
        kernel = blur_kernel_size(x.shape[-1])
        sigma = params["sigma"].float().to(device, non_blocking=True)
        idx_cpu = blur.nonzero().squeeze(1)
        idx = idx_cpu.to(device, non_blocking=True)
        sub = _gaussian_blur(out.index_select(0, idx).contiguous(), sigma[idx], kernel)
        sub = _on_subset(sub, solarize[idx_cpu], lambda xs, i: torch.where(xs >= 0.5, 1.0 - xs, xs))
        sub = torch.addcmul(bias, sub, scale)
        out.index_copy_(0, idx, sub.contiguous(memory_format=torch.channels_last))
    return out


def _apply_cpp(x: torch.Tensor, params: Params, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The whole stage in one C++ call (csrc/photometric_cpu.cpp) on CPU tensors: x (B, 3, H, W) uint8 or float,
    any strides -> float32 (B, 3, H, W) normalized, channels-last. Same decisions and maths as the torch path."""
    from pipelines import native

    module = native.load_photometric_cpu()
    if x.dtype not in (torch.uint8, torch.float32):
        x = x.float()
    jitter = params["jitter"].bool()
    ident = torch.tensor([1.0, 1.0, 1.0, 0.0])
    factors = torch.where(jitter[:, None], torch.stack([params[k].float() for k in JITTER_OPS], 1), ident)
    # Each image's order; the kernel skips an op where the image's factor is the identity, as the torch path does.
    order = jitter_order(params, x.shape[0])
    flags = params["gray"].bool().int() + 2 * params["blur"].bool().int() + 4 * params["solarize"].bool().int()
    return module.photometric(x, factors.contiguous(), order, flags.to(torch.int32),
                              params["sigma"].float().contiguous(), blur_kernel_size(x.shape[-1]),
                              scale.reshape(3).float().contiguous(), bias.reshape(3).float().contiguous())
