"""Augmentation specs: the single source of truth every loader backend follows.

A :class:`ViewSpec` describes one view (crop) of an image: the geometric stage (random resized crop
to ``size``, horizontal flip), done by the backend, and the photometric stage (colour jitter,
grayscale, Gaussian blur, solarize), done on the training device by ``pipelines.photometric``.
A :class:`MultiCropSpec` is the tuple of views every image yields plus the normalization.
Presets follow the papers; ``MultiCropSpec.preset(name, ...)`` builds them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check_range(name: str, value, low: float, high: float, *, strict_low: bool = False) -> tuple:
    """Validate a (lo, hi) pair inside [low, high] (or (low, high] when strict_low)."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from None
    bad_low = lo <= low if strict_low else lo < low
    if bad_low or hi > high or lo > hi or not (math.isfinite(lo) and math.isfinite(hi)):
        lo_br = "(" if strict_low else "["
        raise ValueError(f"{name} must satisfy {lo_br}{low}, {high}] with low <= high, got {value!r}")
    return (lo, hi)


def _check_prob(name: str, value) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} is a probability and must lie in [0, 1], got {value!r}")
    return value


@dataclass(frozen=True)
class ViewSpec:
    """One view of an image.

    Geometric (backend): random-resized-crop with area fraction uniform in ``scale`` and aspect
    ratio log-uniform in ``ratio`` (torchvision ``RandomResizedCrop`` semantics), resized to
    ``size`` x ``size``, flipped horizontally with probability ``flip_p``.
    Photometric (device): with probability ``jitter_p`` torchvision-style colour jitter of strength
    ``brightness``/``contrast``/``saturation``/``hue``; grayscale with ``gray_p``; Gaussian blur
    with ``blur_p`` and sigma uniform in ``blur_sigma``; solarize with ``solarize_p``.
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0

    def __post_init__(self) -> None:
        # Frozen dataclass: normalise types through object.__setattr__ so lists from YAML become tuples.
        set_ = lambda k, v: object.__setattr__(self, k, v)
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size must be a positive int (pixels), got {self.size!r}")
        set_("scale", _check_range("scale", self.scale, 0.0, 1.0, strict_low=True))
        set_("ratio", _check_range("ratio", self.ratio, 0.0, math.inf, strict_low=True))
        set_("blur_sigma", _check_range("blur_sigma", self.blur_sigma, 0.0, math.inf, strict_low=True))
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            set_(name, _check_prob(name, getattr(self, name)))
        for name in ("brightness", "contrast", "saturation"):
            value = float(getattr(self, name))
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
            set_(name, value)
        hue = float(self.hue)
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must lie in [0, 0.5] (a fraction of the colour wheel), got {self.hue!r}")
        set_("hue", hue)

    @property
    def is_deterministic(self) -> bool:
        """True for a view without randomness: full-area square crop (resize + center crop), nothing else."""
        return (
            self.scale == (1.0, 1.0)
            and self.ratio == (1.0, 1.0)
            and self.flip_p == 0.0
            and not self.has_photometric
        )

    @property
    def has_photometric(self) -> bool:
        """True when any photometric operation other than normalization can fire."""
        jitter = self.jitter_p > 0 and (self.brightness or self.contrast or self.saturation or self.hue)
        return bool(jitter or self.gray_p > 0 or self.blur_p > 0 or self.solarize_p > 0)


def eval_view(size: int) -> ViewSpec:
    """The deterministic view: the largest centered square, resized to ``size``; no other change."""
    return ViewSpec(
        size, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
        brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0,
    )


@dataclass(frozen=True)
class MultiCropSpec:
    """The views every image yields, in order (global views first by convention), and normalization.

    ``mean``/``std`` are per RGB channel on the [0, 1] scale.
    """

    views: tuple[ViewSpec, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        views = self.views
        if isinstance(views, ViewSpec):
            views = (views,)
        views = tuple(views) if views is not None else ()
        if not views:
            raise ValueError("views must hold at least one ViewSpec")
        for i, v in enumerate(views):
            if not isinstance(v, ViewSpec):
                raise ValueError(f"views[{i}] must be a ViewSpec, got {type(v).__name__}")
        object.__setattr__(self, "views", views)
        for name in ("mean", "std"):
            value = getattr(self, name)
            try:
                value = tuple(float(x) for x in value)
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be 3 numbers (R, G, B), got {value!r}") from None
            if len(value) != 3 or not all(math.isfinite(x) for x in value):
                raise ValueError(f"{name} must be 3 finite numbers (R, G, B), got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be > 0 per channel, got {self.std!r}")

    @property
    def n_views(self) -> int:
        return len(self.views)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Distinct view resolutions in order of first appearance (globals first)."""
        return tuple(dict.fromkeys(v.size for v in self.views))

    @property
    def groups(self) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """``(size, view indices)`` per distinct resolution: what a multi-crop model concatenates."""
        return tuple((s, tuple(i for i, v in enumerate(self.views) if v.size == s)) for s in self.sizes)

    @property
    def n_global(self) -> int:
        """Views at the first (largest by convention) resolution."""
        return len(self.groups[0][1])

    @property
    def n_local(self) -> int:
        return self.n_views - self.n_global

    @property
    def is_deterministic(self) -> bool:
        """True when every view is the deterministic eval view (no augmentation at all)."""
        return all(v.is_deterministic for v in self.views)

    def eval_spec(self, size: int | None = None) -> MultiCropSpec:
        """One deterministic view at ``size`` (default: the first view's size), same normalization."""
        return MultiCropSpec((eval_view(size or self.views[0].size),), self.mean, self.std, name="eval")

    @classmethod
    def preset(
        cls,
        name: str,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
    ) -> MultiCropSpec:
        """The named paper recipe (see ``PRESETS``) at the given resolutions.

        ``n_local`` overrides the number of local views of multi-crop presets (swav: 6, dino: 8);
        the two-view presets (byol, simclr, mocov3) and eval accept only ``None`` or 0.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset name {name!r}; choose one of {sorted(PRESETS)}")
        if n_local is not None and (isinstance(n_local, bool) or not isinstance(n_local, int) or n_local < 0):
            raise ValueError(f"n_local must be an int >= 0, got {n_local!r}")
        views = PRESETS[name](global_size, local_size, n_local)
        return cls(views, mean if mean is not None else IMAGENET_MEAN, std if std is not None else IMAGENET_STD,
                   name=name)


def _no_locals(name: str, n_local: int | None) -> None:
    if n_local:
        raise ValueError(f"n_local: preset {name!r} has no local views (got n_local={n_local})")


def _byol(global_size: int, local_size: int, n_local: int | None) -> tuple[ViewSpec, ...]:
    # BYOL (Grill et al. 2020, table 6): asymmetric blur 1.0 / 0.1 and solarize 0.0 / 0.2.
    _no_locals("byol", n_local)
    common = dict(scale=(0.08, 1.0), jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
                  gray_p=0.2)
    return (ViewSpec(global_size, blur_p=1.0, solarize_p=0.0, **common),
            ViewSpec(global_size, blur_p=0.1, solarize_p=0.2, **common))


def _mocov3(global_size: int, local_size: int, n_local: int | None) -> tuple[ViewSpec, ...]:
    # MoCo v3 (Chen et al. 2021) uses BYOL's asymmetric pair with crop-min 0.08.
    _no_locals("mocov3", n_local)
    return _byol(global_size, local_size, None)


def _simclr(global_size: int, local_size: int, n_local: int | None) -> tuple[ViewSpec, ...]:
    # SimCLR (Chen et al. 2020): colour distortion strength 1 -> jitter (0.8, 0.8, 0.8, 0.2) p 0.8,
    # grayscale 0.2, blur p 0.5 on ImageNet; both views identical in distribution.
    _no_locals("simclr", n_local)
    view = ViewSpec(global_size, scale=(0.08, 1.0), jitter_p=0.8, brightness=0.8, contrast=0.8,
                    saturation=0.8, hue=0.2, gray_p=0.2, blur_p=0.5)
    return (view, view)


def _swav(global_size: int, local_size: int, n_local: int | None) -> tuple[ViewSpec, ...]:
    # SwAV (Caron et al. 2020) multi-crop: 2 global crops scale (0.14, 1) + V local crops (0.05, 0.14).
    # Its reference code (src/multicropdataset.py) applies the same colour distortion (strength 1)
    # and a p=0.5 Gaussian blur to every crop, local ones included; so do we.
    n_local = 6 if n_local is None else n_local
    colour = dict(jitter_p=0.8, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, gray_p=0.2, blur_p=0.5)
    glob = ViewSpec(global_size, scale=(0.14, 1.0), **colour)
    loc = ViewSpec(local_size, scale=(0.05, 0.14), **colour)
    return (glob, glob) + (loc,) * n_local


def _dino(global_size: int, local_size: int, n_local: int | None) -> tuple[ViewSpec, ...]:
    # DINO (Caron et al. 2021, reference main_dino.py defaults): globals scale (0.4, 1) with BYOL's
    # asymmetric blur 1.0 / 0.1 and solarize 0 / 0.2; 8 locals scale (0.05, 0.4) with blur 0.5.
    n_local = 8 if n_local is None else n_local
    colour = dict(jitter_p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, gray_p=0.2)
    g1 = ViewSpec(global_size, scale=(0.4, 1.0), blur_p=1.0, solarize_p=0.0, **colour)
    g2 = ViewSpec(global_size, scale=(0.4, 1.0), blur_p=0.1, solarize_p=0.2, **colour)
    loc = ViewSpec(local_size, scale=(0.05, 0.4), blur_p=0.5, **colour)
    return (g1, g2) + (loc,) * n_local


def _eval(global_size: int, local_size: int, n_local: int | None) -> tuple[ViewSpec, ...]:
    _no_locals("eval", n_local)
    return (eval_view(global_size),)


# Name -> views builder (global_size, local_size, n_local) -> views. A plain dict: add a recipe here.
PRESETS: dict[str, Callable[[int, int, int | None], tuple[ViewSpec, ...]]] = {
    "byol": _byol,
    "simclr": _simclr,
    "mocov3": _mocov3,
    "swav": _swav,
    "dino": _dino,
    "eval": _eval,
}

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MultiCropSpec", "PRESETS", "ViewSpec", "eval_view"]
