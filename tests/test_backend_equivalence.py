"""Every installed backend draws the augmentation the spec describes, and the same one.

Parametrized from ``pipelines._BACKENDS``, so a backend registered there (ffcv) is checked as soon as
it is importable. The torch backend runs in both of its modes (worker decode, RAM cache).

Geometry is read off a ramp image (red = x, green = y, blue constant): a view's red slope across
columns gives the crop's width and its sign the flip, the green slope the height; a grayscale view has
three equal channels. Over several epochs of a small dataset of copies of that image, the crop-area
fraction and aspect ratio must lie in the spec's ranges and be distributed like the reference sampler's
(``pipelines.torch_loader.sample_rrc``; two-sample Kolmogorov-Smirnov), and the flip and grayscale
rates must be the spec's.
"""

from __future__ import annotations

import inspect
import io
import math
import os
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pipelines
from pipelines import MultiCropSpec, ViewSpec, build_loader
from pipelines.torch_loader import sample_rrc

W, H = 160, 120  # the ramp image: landscape 4:3, so aspect ratio errors show
COPIES, BATCH = 64, 32
GLOBAL, LOCAL = 32, 16  # view sizes of the presets in these tests
EPOCHS = 6
KS_C = 1.95  # two-sample KS critical coefficient at alpha = 0.001
# The loaders' device: FASTSSL_TEST_DEVICE=cuda runs the suite on a GPU (scripts/gpu_check.py does), where DALI
# decodes with nvJPEG and the photometric stage runs on the device.
DEVICE = torch.device(os.environ.get("FASTSSL_TEST_DEVICE", "cpu"))


def _unavailable(name: str) -> str | None:
    try:
        pipelines._resolve_backend(name, torch.device("cpu"))
    except (ImportError, ValueError) as e:
        return str(e)
    return None


def _backend_params() -> list:
    """(backend, build_loader options) for every registered backend; torch in both of its modes."""
    params = []
    for name in pipelines._BACKENDS:
        variants = ([("torch-workers", {"cache": "none", "num_workers": 0}), ("torch-ram", {"cache": "ram"}),
                     ("torch-device-decode", {"cache": "none", "decode": "device", "num_workers": 0})]
                    if name == "torch" else [(name, {"num_workers": 1})])
        why = _unavailable(name)
        for ident, options in variants:
            marks = [pytest.mark.skip(reason=why)] if why else []
            params.append(pytest.param(name, options, id=ident, marks=marks))
    return params


BACKENDS = _backend_params()


def _jpeg(pix: np.ndarray, quality: int = 98) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pix).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _convert(tmp: Path, jpeg: bytes, copies: int, side: int) -> Path:
    """An ImageFolder of ``copies`` files converted with fastssl-convert, JPEG bytes kept as they are (and
    to every format the registered backends read, when the converter offers a choice)."""
    from fastssl.convert import convert

    src = tmp / "src" / "ramp"
    src.mkdir(parents=True)
    for i in range(copies):
        (src / f"{i:04d}.jpg").write_bytes(jpeg)
    kwargs = {}
    accepts = inspect.signature(convert).parameters
    if "formats" in accepts and "ffcv" in pipelines._BACKENDS and not _unavailable("ffcv"):
        kwargs["formats"] = ("wds", "ffcv")
        # FFCV stores its own re-encoded copy: keep its size (``side``, the image's longer side; not more, FFCV
        # reserves room per sample by it) and most of its quality.
        kwargs.update({k: v for k, v in (("ffcv_max_side", side), ("ffcv_quality", 98)) if k in accepts})
    dst = tmp / "converted"
    convert(src.parent, dst, max_side=4096, workers=0, progress=False, **kwargs)
    return dst


@pytest.fixture(scope="module")
def ramp(tmp_path_factory) -> Path:
    yy, xx = np.mgrid[0:H, 0:W]
    pix = np.stack([255 * (xx + 0.5) / W, 255 * (yy + 0.5) / H, np.full((H, W), 128.0)], -1)
    return _convert(tmp_path_factory.mktemp("ramp"), _jpeg(np.rint(pix).astype(np.uint8)), COPIES, W)


def _geometric(spec: MultiCropSpec) -> MultiCropSpec:
    """The spec with colour jitter, blur and solarize off (they would hide the ramps); grayscale kept."""
    views = tuple(replace(v, jitter_p=0.0, blur_p=0.0, solarize_p=0.0) for v in spec.views)
    return MultiCropSpec(views, spec.mean, spec.std, name=spec.name)


def _loader(path: Path, name: str, options: dict, spec: MultiCropSpec, seed: int = 3, batch_size: int = BATCH):
    return build_loader(path, spec, batch_size, backend=name, seed=seed, device=DEVICE, **options)


# ---- measuring a view --------------------------------------------------------------------------------
def _measure(views: torch.Tensor, spec: MultiCropSpec) -> dict[str, np.ndarray]:
    """Per crop of one view's batch (B, 3, S, S) normalized: box width / height in source pixels, flip,
    grayscale, and the blue channel's median on the [0, 1] scale."""
    mean = torch.tensor(spec.mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float64).view(1, 3, 1, 1)
    pix = views.cpu().double() * std + mean  # back to [0, 1]
    s = pix.shape[-1]
    r, g, b = pix[:, 0], pix[:, 1], pix[:, 2]
    gray = torch.maximum((r - g).abs().amax((1, 2)), (g - b).abs().amax((1, 2))) < 1e-3
    # Least-squares slope of the column (row) means over the interior, away from the image-border clamp.
    edge = max(1, s // 8)
    t = torch.arange(s, dtype=torch.float64)[edge : s - edge]
    t = t - t.mean()
    slope_x = (r.mean(1)[:, edge : s - edge] * t).sum(1) / (t**2).sum()  # red per output column
    slope_y = (g.mean(2)[:, edge : s - edge] * t).sum(1) / (t**2).sum()
    return {
        "w": (slope_x.abs() * s * W).numpy(),  # red rises by 1 / W per source column
        "h": (slope_y.abs() * s * H).numpy(),
        "flip": (slope_x < 0).numpy(),
        "gray": gray.numpy(),
        "blue": b.flatten(1).median(1).values.numpy(),
    }


def _collect(path: Path, name: str, options: dict, spec: MultiCropSpec, epochs: int) -> list[dict[str, np.ndarray]]:
    """Measurements per view index of ``spec``, pooled over ``epochs`` epochs."""
    loader = _loader(path, name, options, spec)
    per_view: list[list[dict]] = [[] for _ in spec.views]
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            for i, v in enumerate(batch.views):
                per_view[i].append(_measure(v, spec))
    return [{k: np.concatenate([m[k] for m in ms]) for k in ms[0]} for ms in per_view]


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, grid, side="right") / len(a)
                        - np.searchsorted(b, grid, side="right") / len(b)).max())


def ks_critical(n: int, m: int, c: float = KS_C) -> float:
    """Asymptotic critical value of the two-sample KS statistic (c = 1.95 for alpha = 0.001)."""
    return c * math.sqrt((n + m) / (n * m))


def _reference(view: ViewSpec, n: int = 4000) -> dict[str, np.ndarray]:
    rng = random.Random(11)
    boxes = np.array([sample_rrc(H, W, view.scale, view.ratio, rng) for _ in range(n)], dtype=float)
    return {"area": boxes[:, 2] * boxes[:, 3] / (H * W), "log_aspect": np.log(boxes[:, 3] / boxes[:, 2])}


def _rate_ok(hits: np.ndarray, p: float) -> bool:
    n = len(hits)
    return abs(float(hits.mean()) - p) <= 4.5 * math.sqrt(max(p * (1 - p), 1 / n) / n)


# ---- the tests -------------------------------------------------------------------------------------------
def test_ks_helpers_separate_equal_from_shifted_samples():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0, 1, 2000), rng.uniform(0, 1, 3000)
    assert ks_statistic(a, b) < ks_critical(2000, 3000)
    assert ks_statistic(a, b + 0.1) > ks_critical(2000, 3000)
    assert ks_statistic(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0


@pytest.mark.parametrize("preset", ["byol", "swav"])
@pytest.mark.parametrize("name, options", BACKENDS)
def test_crop_flip_and_gray_follow_the_spec(ramp, name, options, preset):
    spec = _geometric(MultiCropSpec.preset(preset, global_size=GLOBAL, local_size=LOCAL))
    measured = _collect(ramp, name, options, spec, EPOCHS)
    # Views with the same spec (swav's 2 globals, its 6 locals) are pooled: one distribution each.
    groups: dict[ViewSpec, list[int]] = {}
    for i, v in enumerate(spec.views):
        groups.setdefault(v, []).append(i)
    for view, idx in groups.items():
        m = {k: np.concatenate([measured[i][k] for i in idx]) for k in measured[0]}
        assert len(m["gray"]) == len(idx) * EPOCHS * COPIES
        assert _rate_ok(m["gray"], view.gray_p), (view.size, m["gray"].mean())
        colour = ~m["gray"]
        assert _rate_ok(m["flip"][colour], view.flip_p), (view.size, m["flip"][colour].mean())
        # Normalization is the spec's: the constant blue channel comes back as 128 / 255.
        assert np.abs(m["blue"][colour] - 128 / 255).max() < 4 / 255
        area = m["w"][colour] * m["h"][colour] / (W * H)
        log_aspect = np.log(m["w"][colour] / m["h"][colour])
        lo, hi = view.scale
        # Sides are whole pixels (a few % on these small boxes) and the slopes carry JPEG noise.
        assert area.min() > 0.88 * lo and area.max() < 1.08 * hi, (view.size, area.min(), area.max())
        r_lo, r_hi = (math.log(r) for r in view.ratio)
        assert log_aspect.min() > r_lo - 0.12 and log_aspect.max() < r_hi + 0.12
        ref = _reference(view)
        for key, got in (("area", area), ("log_aspect", log_aspect)):
            d = ks_statistic(got, ref[key])
            assert d < ks_critical(len(got), len(ref[key])), (view.size, key, d)


@pytest.mark.parametrize("preset", ["byol", "swav"])
@pytest.mark.parametrize("name, options", BACKENDS)
def test_full_recipe_views_have_the_contract_layout(ramp, name, options, preset):
    spec = MultiCropSpec.preset(preset, global_size=GLOBAL, local_size=LOCAL)
    loader = _loader(ramp, name, options, spec)
    batches = list(loader)
    assert len(batches) == len(loader) == COPIES // BATCH
    mean = torch.tensor(spec.mean, device=DEVICE).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=DEVICE).view(1, 3, 1, 1)
    for batch in batches:
        assert batch.labels.dtype == torch.int64 and batch.labels.shape == (BATCH,)
        assert [tuple(v.shape) for v in batch.views] == [(BATCH, 3, v.size, v.size) for v in spec.views]
        for v in batch.views:
            assert v.dtype == torch.float32 and v.device.type == DEVICE.type
            assert v.is_contiguous(memory_format=torch.channels_last)
            pix = v * std + mean  # every photometric op keeps pixels in [0, 1]
            assert torch.isfinite(v).all() and pix.min() > -1e-4 and pix.max() < 1 + 1e-4


def _unit_views(n: int) -> MultiCropSpec:
    """n tiny views, no photometric op: cropping costs next to nothing, decoding is the work."""
    view = ViewSpec(8, scale=(0.02, 0.05), jitter_p=0, gray_p=0, blur_p=0, solarize_p=0)
    return MultiCropSpec((view,) * n)


@pytest.fixture(scope="module")
def big_jpegs(tmp_path_factory) -> Path:
    """16 copies of a 1200x900 noisy photo: a decode costs ~8 ms, far more than an 8 px crop."""
    from skimage import data

    rng = np.random.default_rng(0)
    photo = Image.fromarray(data.astronaut()).resize((1200, 900), Image.BILINEAR)
    pix = np.clip(np.asarray(photo, dtype=np.float32) + rng.normal(0, 12, (900, 1200, 3)), 0, 255)
    return _convert(tmp_path_factory.mktemp("big"), _jpeg(pix.astype(np.uint8), quality=92), 16, 1200)


def _epoch_seconds(loader, epochs: int = 3) -> float:
    """Fastest epoch after the first (worker start-up, pipeline build and caches excluded as far as possible)."""
    best = math.inf
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        t0 = time.perf_counter()
        for _ in loader:
            pass
        if epoch:
            best = min(best, time.perf_counter() - t0)
    return best


@pytest.mark.parametrize("name, options", [p for p in BACKENDS if p.id != "torch-ram"])
def test_each_image_is_decoded_once_whatever_the_number_of_views(big_jpegs, name, options):
    """Nine views of an image cost about what one does: the JPEG is decoded once, not once per view."""
    one = _epoch_seconds(_loader(big_jpegs, name, options, _unit_views(1), batch_size=8))
    nine = _epoch_seconds(_loader(big_jpegs, name, options, _unit_views(9), batch_size=8))
    # Decoding per view would take ~9x; cropping eight more 8 px views adds a few percent.
    assert nine < 2.5 * one, (name, one, nine)


def test_dali_pipeline_holds_one_decoder_for_all_views(ramp):
    pytest.importorskip("nvidia.dali")
    spec = MultiCropSpec.preset("swav", global_size=GLOBAL, local_size=LOCAL)
    graph = _loader(ramp, "dali", {"num_workers": 1}, spec).build_pipeline(iter([])).serialize()
    assert graph.count(b"decoders__Image") == 1


# ---- end to end ------------------------------------------------------------------------------------------
def test_training_runs_on_the_dali_backend(tiny_gray_dataset, tmp_path):
    pytest.importorskip("nvidia.dali")
    from fastssl.config import load_config
    from fastssl.engine.checkpoint import load_checkpoint
    from fastssl.engine.trainer import Trainer

    out = tmp_path / "run"
    overrides = {
        "data.path": tiny_gray_dataset, "data.backend": "dali", "data.num_workers": 1, "model.width": 4,
        "method.proj_hidden": 32, "method.proj_dim": 16, "method.pred_hidden": 32, "train.batch_size": 16,
        "train.epochs": 1, "train.max_steps": 3, "train.log_every": 1, "train.progress": False,
        "train.threads": 1, "eval.knn": "false", "out_dir": out,
    }
    cfg = load_config("byol_resnet18_fmnist", [f"{k}={v}" for k, v in overrides.items()])
    results = Trainer(cfg).fit()
    assert results["steps"] == 3 and math.isfinite(results["final_loss"])
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["loader"] == {"epoch": 0, "batch": 3}
