"""The FFCV backend (CPU): .beton writing in fastssl-convert, the Loader contract, decode-once, the crop sampler."""

from __future__ import annotations

import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import RAMP_SIZE, assert_epoch_reads_every_sample, assert_same_batches, dataset_labels, plain_view
from PIL import Image

pytest.importorskip("ffcv")

from fastssl.config import load_config  # noqa: E402
from fastssl.convert import convert, main  # noqa: E402
from fastssl.engine.checkpoint import load_checkpoint  # noqa: E402
from fastssl.engine.trainer import Trainer  # noqa: E402
from pipelines import STREAM_CROP, MultiCropSpec, ViewSpec, _splitmix64, build_loader, derive_seed  # noqa: E402
from pipelines.ffcv_loader import FfcvLoader, _mix64, crop_boxes, view_params, write_betons  # noqa: E402
from pipelines.formats import (  # noqa: E402
    MANIFEST,
    DatasetFormatError,
    load_manifest,
    sha256_file,
    write_manifest,
)
from pipelines.spec import eval_view  # noqa: E402
from pipelines.torch_loader import _rrc_fallback, sample_rrc  # noqa: E402


def _with_betons(src: Path, dst: Path) -> Path:
    """A copy of the converted dataset ``src`` plus its .beton files, as `--formats wds,ffcv` would write them."""
    shutil.copytree(src, dst)
    manifest = load_manifest(dst)
    manifest["ffcv"] = write_betons(dst, manifest, workers=1)
    write_manifest(dst, manifest)
    return dst


@pytest.fixture(scope="module")
def ffcv_tiny(tiny_dataset, tmp_path_factory) -> Path:
    return _with_betons(tiny_dataset, tmp_path_factory.mktemp("ffcv") / "tiny")


@pytest.fixture(scope="module")
def ffcv_gray(tiny_gray_dataset, tmp_path_factory) -> Path:
    return _with_betons(tiny_gray_dataset, tmp_path_factory.mktemp("ffcv") / "gray")


@pytest.fixture(scope="module")
def ffcv_ramp(ramp_dataset, tmp_path_factory) -> Path:
    return _with_betons(ramp_dataset, tmp_path_factory.mktemp("ffcv") / "ramp")


def _ffcv(path, spec, batch_size=8, **kw) -> FfcvLoader:
    kw.setdefault("num_workers", 2)
    loader = build_loader(path, spec, batch_size, backend="ffcv", **kw)
    assert isinstance(loader, FfcvLoader)
    return loader


def _byol(path, **kw) -> FfcvLoader:
    return _ffcv(path, MultiCropSpec.preset("byol", global_size=16), **kw)


# ---- the contract's Batch --------------------------------------------------------------------------
@pytest.mark.parametrize("preset, sizes", [("byol", [32, 32]), ("swav", [32, 32] + [16] * 6)])
def test_yields_the_contract_batch(ffcv_tiny, preset, sizes):
    loader = _ffcv(ffcv_tiny, MultiCropSpec.preset(preset, global_size=32, local_size=16), seed=2)
    loader.set_epoch(1)
    batches = list(loader)
    assert len(batches) == len(loader) == 64 // 8
    labels = dataset_labels(ffcv_tiny)
    got = torch.cat([b.labels for b in batches])
    assert got.dtype == torch.int64 and got.tolist() == [labels[i] for i in loader.epoch_sample_ids(1)]
    for batch in batches:
        assert [tuple(v.shape) for v in batch.views] == [(8, 3, s, s) for s in sizes]
        for v in batch.views:
            assert v.dtype == torch.float32 and v.device.type == "cpu"
            assert v.is_contiguous(memory_format=torch.channels_last) and torch.isfinite(v).all()


def test_eval_views_match_the_torch_backend_normalized(ffcv_tiny):
    """The deterministic center square: same box as the torch backend, so the views agree up to resampling and
    the .beton's second JPEG encoding; RGB order, orientation and the spec's normalization included."""
    spec = MultiCropSpec((eval_view(32),), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    ffcv = list(_ffcv(ffcv_tiny, spec, 12, split="val"))
    ref = list(build_loader(ffcv_tiny, spec, 12, split="val", backend="torch", num_workers=0, cache="none"))
    assert [b.labels.numel() for b in ffcv] == [12, 12, 8]  # eval keeps the partial last batch
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    for f, r in zip(ffcv, ref, strict=True):
        assert torch.equal(f.labels, r.labels)
        diff = ((f.views[0] - r.views[0]) * std).abs()  # back on the [0, 1] pixel scale
        assert diff.mean() < 0.03, diff.mean()
        torch.testing.assert_close(f.views[0].mean((0, 2, 3)), r.views[0].mean((0, 2, 3)), atol=0.05, rtol=0)


# ---- order, ranks, resume --------------------------------------------------------------------------
def test_order_and_labels_are_the_torch_backends(ffcv_tiny):
    spec = MultiCropSpec.preset("byol", global_size=16)
    for rank in (0, 1):
        ffcv = _ffcv(ffcv_tiny, spec, 4, seed=3, rank=rank, world_size=2)
        ref = build_loader(ffcv_tiny, spec, 4, backend="torch", seed=3, rank=rank, world_size=2, num_workers=0,
                           cache="none")
        ffcv.set_epoch(2)
        ref.set_epoch(2)
        assert np.array_equal(ffcv.epoch_sample_ids(2), ref.epoch_sample_ids(2))
        assert [b.labels.tolist() for b in ffcv] == [b.labels.tolist() for b in ref]


def test_ranks_read_disjoint_samples_that_cover_the_split(ffcv_tiny):
    labels = {split: dataset_labels(ffcv_tiny, split) for split in ("train", "val")}
    spec = MultiCropSpec.preset("byol", global_size=16)
    for split, total in (("train", 64), ("val", 32)):  # train: whole shards per rank; val: strided samples
        loaders = [_ffcv(ffcv_tiny, spec, 4, split=split, rank=r, world_size=2, seed=1) for r in range(2)]
        assert len(loaders[0]) == len(loaders[1])
        ids = [ld.epoch_sample_ids(0) for ld in loaders]
        assert not set(ids[0].tolist()) & set(ids[1].tolist())
        assert sorted(ids[0].tolist() + ids[1].tolist()) == list(range(total))
        for ld, rank_ids in zip(loaders, ids, strict=True):
            got = torch.cat([b.labels for b in ld]).tolist()
            assert got == [labels[split][i] for i in rank_ids]


def test_resume_mid_epoch_yields_the_remaining_batches_identically(ffcv_gray):
    full = _byol(ffcv_gray, seed=1)
    full.set_epoch(2)
    expected = list(full)

    interrupted = _byol(ffcv_gray, seed=1)
    interrupted.set_epoch(2)
    it = iter(interrupted)
    consumed = [next(it) for _ in range(3)]
    state = interrupted.state_dict()
    assert state == {"epoch": 2, "batch": 3}
    assert_same_batches(consumed, expected[:3])
    del it  # stops its prefetch thread

    resumed = _byol(ffcv_gray, seed=1)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    assert_same_batches(list(resumed), expected[3:])
    assert resumed.state_dict() == {"epoch": 3, "batch": 0}


def test_batches_do_not_depend_on_threads_or_prefetch_but_on_seed_and_epoch(ffcv_gray):
    a = FfcvLoader(ffcv_gray, MultiCropSpec.preset("byol", global_size=16), 8, seed=3, num_workers=1, prefetch=0)
    b = _byol(ffcv_gray, seed=3, num_workers=2)
    a.set_epoch(1)
    b.set_epoch(1)
    first = list(a)
    assert_same_batches(first, list(b))
    a.set_epoch(2)
    assert not torch.equal(list(a)[0].views[0], first[0].views[0])


def test_missing_beton_is_a_clear_error(tiny_dataset):
    with pytest.raises(DatasetFormatError, match="--formats wds,ffcv"):
        _byol(tiny_dataset)


# ---- decode once -----------------------------------------------------------------------------------
def test_each_image_is_decoded_once_whatever_the_number_of_views(ffcv_tiny):
    for n_local in (0, 6):
        spec = MultiCropSpec.preset("swav", global_size=32, local_size=16, n_local=n_local)
        loader = _ffcv(ffcv_tiny, spec)
        for batch in loader:
            assert len(batch.views) == 2 + n_local
            boxes = loader.last_boxes  # (B, V, 5): every view got its own box
            assert boxes.shape == (8, 2 + n_local, 5)
            assert all(len({tuple(b) for b in sample}) == 2 + n_local for sample in boxes[:, :, :4].tolist())
        assert loader.decode_count == 64  # images in the epoch, not 64 * views


# ---- the crop sampler ------------------------------------------------------------------------------
class _SplitMixStream:
    """Python twin of the compiled uniform stream: ``random()`` as ``random.Random.random`` gives it."""

    def __init__(self, key: int):
        self.state = key

    def random(self) -> float:
        x = _splitmix64(self.state)
        self.state = (self.state + 0x9E3779B97F4A7C15) & ((1 << 64) - 1)
        return (x >> 11) * 2.0**-53


def test_mix64_is_splitmix64():
    rng = random.Random(0)
    for x in [0, 1, (1 << 64) - 1] + [rng.getrandbits(64) for _ in range(100)]:
        assert int(_mix64(np.uint64(x))) == _splitmix64(x)


def test_crop_sampler_is_sample_rrc_on_the_same_uniform_stream():
    """Box for box and flip for flip the compiled sampler is the reference sampler (torchvision's
    RandomResizedCrop steps, fallback included) fed the same uniforms."""
    views = (ViewSpec(24), ViewSpec(16, scale=(0.05, 0.14), flip_p=0.3), eval_view(24),
             ViewSpec(8, scale=(0.9, 1.0), ratio=(0.2, 5.0), flip_p=0.0), ViewSpec(8, scale=(0.9, 1.0), ratio=(1, 1)))
    rng = np.random.default_rng(0)
    n = 3000
    heights = rng.integers(1, 400, n)
    widths = np.where(rng.random(n) < 0.2, rng.integers(1, 20, n), rng.integers(1, 400, n))
    keys = [derive_seed(7, 1, i, STREAM_CROP) for i in range(n)]
    got = crop_boxes(np.array(keys, dtype=np.uint64), heights, widths, view_params(views))
    fallbacks = 0
    for i in range(n):
        stream = _SplitMixStream(keys[i])
        h, w = int(heights[i]), int(widths[i])
        for v, view in enumerate(views):
            box = sample_rrc(h, w, view.scale, view.ratio, stream)
            flip = stream.random() < view.flip_p
            assert tuple(got[i, v]) == (*box, int(flip)), (i, v, h, w)
            fallbacks += v == 3 and box == _rrc_fallback(h, w, view.ratio)
    assert fallbacks > 50  # the fallback path was exercised


def test_crops_are_the_sampled_boxes_resized_and_flipped(ffcv_ramp):
    """On the ramp image (red = x, green = y) each crop's slopes give its box's width and height in source
    pixels and its flip: they match the boxes the loader reports."""
    view = plain_view(24, scale=(0.2, 0.9))
    loader = _ffcv(ffcv_ramp, MultiCropSpec((view,), mean=(0, 0, 0), std=(1, 1, 1)), seed=5)
    s = view.size
    cols = torch.arange(s, dtype=torch.float64) - (s - 1) / 2
    flips = []
    for epoch in range(12):
        loader.set_epoch(epoch)
        for batch in loader:
            v = batch.views[0].double()
            red, green = v[:, 0].mean(1), v[:, 1].mean(2)  # (B, S): red along x, green along y
            width = (red * cols).sum(1) / (cols**2).sum() * s * RAMP_SIZE
            height = (green * cols).sum(1) / (cols**2).sum() * s * RAMP_SIZE
            boxes = torch.from_numpy(loader.last_boxes[:, 0].astype(np.float64))
            torch.testing.assert_close(width.abs(), boxes[:, 3], rtol=0.12, atol=1.0)
            torch.testing.assert_close(height, boxes[:, 2], rtol=0.12, atol=1.0)
            assert ((width < 0) == (boxes[:, 4] == 1)).all()
            flips += boxes[:, 4].tolist()
    assert 0.3 < np.mean(flips) < 0.7 and len(flips) == 12 * 8


def test_bilinear_crop_is_opencv_inter_linear_and_used_up_to_a_2x_shrink():
    import cv2

    from pipelines.ffcv_loader import _bilinear_crop, _resize_box, _resize_crop

    rng = np.random.default_rng(7)
    img = cv2.GaussianBlur(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8), (5, 5), 1.5)
    img[::7] = rng.integers(0, 256, (len(img[::7]), 160, 3))  # some sharp rows too
    for _ in range(40):
        s = int(rng.integers(8, 40))
        ch, cw = int(rng.integers(s // 2, min(120, 3 * s) + 1)), int(rng.integers(s // 2, min(160, 3 * s) + 1))
        top, left = int(rng.integers(0, 121 - ch)), int(rng.integers(0, 161 - cw))
        box = img[top:top + ch, left:left + cw]
        ours = np.empty((s, s, 3), np.uint8)
        _bilinear_crop(img, top, top + ch, left, left + cw, ours)
        opencv = cv2.resize(box, (s, s), interpolation=cv2.INTER_LINEAR)
        assert np.abs(ours.astype(int) - opencv.astype(int)).max() <= 1, (ch, cw, s)
        routed, area = np.empty_like(ours), np.empty_like(ours)
        _resize_box(img, top, top + ch, left, left + cw, routed)
        _resize_crop(img, top, top + ch, left, left + cw, area)
        shrink_up_to_2x = (ch > s or cw > s) and ch <= 2 * s and cw <= 2 * s
        assert np.array_equal(routed, ours if shrink_up_to_2x else area), (ch, cw, s)


# ---- fastssl-convert --formats wds,ffcv ------------------------------------------------------------
_COLOURS = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}


def _colour_folder(root: Path, per_class: int) -> None:
    """ImageFolder of flat-coloured 40x56 JPEGs: class k is colour k."""
    rng = np.random.default_rng(0)
    for name, rgb in _COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pix = np.clip(np.array(rgb) + rng.normal(0, 8, size=(40, 56, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pix).save(root / name / f"{i}.jpg", quality=95)


def test_convert_writes_betons_listed_in_the_manifest_and_overwrite_removes_them(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "out"
    _colour_folder(src / "train", 4)
    _colour_folder(src / "val", 2)
    rc = main([str(src), str(dst), "--formats", "wds,ffcv", "--ffcv-max-side", "32", "--ffcv-quality", "80",
               "--workers", "0", "--no-progress"])
    assert rc == 0
    assert "train.beton" in capsys.readouterr().out
    manifest = load_manifest(dst)
    assert manifest["settings"]["formats"] == ["wds", "ffcv"]
    ffcv = manifest["ffcv"]
    assert (ffcv["max_side"], ffcv["quality"]) == (32, 80)
    assert {s: f["count"] for s, f in ffcv["files"].items()} == {"train": 12, "val": 6}
    for split, f in ffcv["files"].items():
        assert f["name"] == f"{split}.beton" and f["sha256"] == sha256_file(dst / f["name"])
    assert not [p for p in dst.iterdir() if p.name.endswith(".tmp")]

    loader = FfcvLoader(dst, MultiCropSpec((eval_view(16),)), 4, shuffle=False, drop_last=False)
    assert max(loader._heights.max(), loader._widths.max()) == 32  # shrunk to --ffcv-max-side
    batches = list(loader)
    assert torch.cat([b.labels for b in batches]).tolist() == dataset_labels(dst)
    colours = torch.tensor(list(_COLOURS.values()), dtype=torch.float32) / 255
    mean, std = torch.tensor(loader.spec.mean), torch.tensor(loader.spec.std)
    for batch in batches:  # each crop is its class's colour: pixels, labels and order belong together
        rgb = batch.views[0].mean((2, 3)) * std + mean
        assert (torch.cdist(rgb, colours).argmin(1) == batch.labels).all()

    convert(src, dst, workers=0, progress=False, overwrite=True)  # wds only: the old .beton files go
    assert not list(dst.glob("*.beton")) and "ffcv" not in load_manifest(dst)
    with pytest.raises(DatasetFormatError, match="--formats wds,ffcv"):
        FfcvLoader(dst, MultiCropSpec((eval_view(16),)), 4)


@pytest.mark.parametrize("args, option", [
    (["--ffcv-quality", "0"], "--ffcv-quality"), (["--ffcv-quality", "101"], "--ffcv-quality"),
    (["--ffcv-max-side", "0"], "--ffcv-max-side"), (["--ffcv-max-side", "70000"], "--ffcv-max-side"),
    (["--formats", "wds,tfrecord"], "--formats"), (["--formats", "ffcv"], "--formats"),
])  # fmt: skip
def test_bad_ffcv_options_are_errors_naming_the_option(tmp_path, capsys, args, option):
    src = tmp_path / "src"
    _colour_folder(src, 1)
    assert main([str(src), str(tmp_path / "out"), "--formats", "wds,ffcv", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastssl-convert: error:") and option in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_interrupted_beton_write_leaves_no_beton(tmp_path, monkeypatch):
    import ffcv.writer

    finalize = ffcv.writer.DatasetWriter.finalize

    def dies_half_way(self, allocations):
        with open(self.fname, "r+b") as f:  # some of the file is there, then the run dies
            f.write(b"\0" * 64)
        raise KeyboardInterrupt

    src, dst = tmp_path / "src", tmp_path / "out"
    _colour_folder(src, 2)
    monkeypatch.setattr(ffcv.writer.DatasetWriter, "finalize", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        convert(src, dst, workers=0, progress=False, formats="wds,ffcv")
    assert not (dst / "train.beton").exists() and not (dst / MANIFEST).exists()
    assert not [p.name for p in dst.iterdir() if "beton" in p.name]  # no temp file either

    monkeypatch.setattr(ffcv.writer.DatasetWriter, "finalize", finalize)
    convert(src, dst, workers=0, progress=False, formats="wds,ffcv")
    assert sorted(p.name for p in dst.glob("*.beton")) == ["train.beton"]


# ---- training end to end ---------------------------------------------------------------------------
def test_training_runs_on_the_ffcv_backend(ffcv_gray, tmp_path):
    out = tmp_path / "run"
    overrides = {
        "data.path": ffcv_gray, "data.backend": "ffcv", "data.num_workers": 1, "model.width": 4,
        "method.proj_hidden": 32, "method.proj_dim": 16, "method.pred_hidden": 32, "train.batch_size": 16,
        "train.epochs": 1, "train.max_steps": 3, "train.log_every": 1, "train.progress": False,
        "train.threads": 1, "eval.knn": "false", "out_dir": out,
    }
    results = Trainer(load_config("byol_resnet18_fmnist", [f"{k}={v}" for k, v in overrides.items()])).fit()
    assert results["steps"] == 3 and math.isfinite(results["final_loss"])
    assert load_checkpoint(out / "checkpoints" / "last.pt")["loader"] == {"epoch": 0, "batch": 3}


@pytest.mark.parametrize("world_size, batch", [(2, 5), (4, 3)])
def test_an_epoch_reads_every_sample_when_shards_do_not_divide_by_the_world_size(ffcv_gray, world_size, batch):
    """3 shards of 40, 30 and 26 samples: on 2 ranks the old whole-shard assignment read 30 + 30 of 96 an epoch."""
    spec = MultiCropSpec.preset("byol", global_size=16)
    assert_epoch_reads_every_sample(lambda r: _ffcv(ffcv_gray, spec, batch, rank=r, world_size=world_size, seed=5),
                                    96, world_size, batch, dataset_labels(ffcv_gray))
