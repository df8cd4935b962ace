"""The torch backend and the Loader contract: shapes, sharding, order, resume, crop distribution."""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_epoch_reads_every_sample, assert_same_batches, plain_view
from PIL import Image
from scipy import stats
from torchvision.transforms import RandomResizedCrop

from pipelines import Batch, MultiCropSpec, build_loader
from pipelines.formats import iter_samples, load_manifest, shard_paths
from pipelines.spec import eval_view
from pipelines.torch_loader import (
    TorchLoader,
    _index_from_idx,
    _index_from_tar,
    crop_grid,
    crop_theta,
    sample_rrc,
    sample_rrc_batch,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _split_samples(path, split) -> list[tuple[bytes, int]]:
    manifest = load_manifest(path)
    return [(jpeg, label) for shard in shard_paths(path, split, manifest) for _, jpeg, label in iter_samples(shard)]


def _collect(loader) -> list[Batch]:
    return list(loader)


# ---- the crop sampler ----------------------------------------------------------------------------
def _torchvision_boxes(h, w, scale, ratio, n, seed=0) -> np.ndarray:
    torch.manual_seed(seed)
    img = torch.empty(1, h, w)
    return np.array([RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)])


def _box_stats(boxes: np.ndarray, h: int, w: int) -> dict[str, np.ndarray]:
    top, left, ch, cw = (boxes[:, i].astype(float) for i in range(4))
    return {"area": ch * cw / (h * w), "log_aspect": np.log(cw / ch), "top": top, "left": left}


@pytest.mark.parametrize(
    "h, w, scale, ratio",
    [(60, 100, (0.08, 1.0), (3 / 4, 4 / 3)),  # typical: a few tries fail near full area
     (20, 100, (0.5, 1.0), (3 / 4, 4 / 3)),  # panorama: the fallback fires often
     (28, 28, (0.05, 0.14), (3 / 4, 4 / 3))],  # tiny image, local-crop scale
)
def test_rrc_sampler_matches_torchvision_distribution(h, w, scale, ratio):
    n = 3000
    ref = _box_stats(_torchvision_boxes(h, w, scale, ratio, n), h, w)
    rng = random.Random(1)
    ours = _box_stats(np.array([sample_rrc(h, w, scale, ratio, rng) for _ in range(n)]), h, w)
    batched = _box_stats(sample_rrc_batch(n, h, w, scale, ratio, torch.Generator().manual_seed(2)).numpy(), h, w)
    for key in ref:
        assert stats.ks_2samp(ref[key], ours[key]).pvalue > 0.01, ("sample_rrc", key)
        assert stats.ks_2samp(ref[key], batched[key]).pvalue > 0.01, ("sample_rrc_batch", key)


def test_rrc_area_fraction_lies_in_the_scale_range():
    h = w = 500  # large enough that rounding the sides moves the area by < 1%
    scale = (0.2, 0.6)
    boxes = np.array([sample_rrc(h, w, scale, (3 / 4, 4 / 3), random.Random(i)) for i in range(2000)])
    boxes = np.concatenate([boxes, sample_rrc_batch(2000, h, w, scale, (3 / 4, 4 / 3)).numpy()])
    top, left, ch, cw = boxes.T
    area = ch * cw / (h * w)
    assert area.min() >= scale[0] * 0.99 and area.max() <= scale[1] * 1.01
    assert (top >= 0).all() and (left >= 0).all() and (top + ch <= h).all() and (left + cw <= w).all()


def test_rrc_with_unit_scale_and_ratio_is_the_centered_square():
    rng = random.Random(0)
    assert sample_rrc(60, 100, (1.0, 1.0), (1.0, 1.0), rng) == (0, 20, 60, 60)
    assert sample_rrc(90, 40, (1.0, 1.0), (1.0, 1.0), rng) == (25, 0, 40, 40)
    assert sample_rrc(50, 50, (1.0, 1.0), (1.0, 1.0), rng) == (0, 0, 50, 50)
    assert sample_rrc_batch(3, 60, 100, (1.0, 1.0), (1.0, 1.0)).tolist() == [[0, 20, 60, 60]] * 3


def test_crop_grid_equals_affine_grid():
    boxes = sample_rrc_batch(16, 30, 40, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    flips = torch.arange(16) % 2 == 0
    theta = crop_theta(boxes, flips, 30, 40)
    ref = F.affine_grid(theta, [16, 1, 12, 12], align_corners=False)
    torch.testing.assert_close(crop_grid(theta, 12), ref, atol=1e-6, rtol=0)


def test_shard_index_from_dali_idx_equals_tar_headers(tiny_dataset):
    for path in shard_paths(tiny_dataset, "train"):
        from_idx = _index_from_idx(path.with_suffix(".idx"))
        assert from_idx is not None and from_idx == _index_from_tar(path)


# ---- batches follow the Loader contract ------------------------------------------------------------
# The torch backend's three ways: decode in workers, RAM cache, decode on the device.
MODES = {"none": {"cache": "none"}, "ram": {"cache": "ram"}, "device": {"cache": "none", "decode": "device"}}


@pytest.mark.parametrize("cache", list(MODES))
def test_byol_and_swav_views_follow_the_contract(tiny_gray_dataset, cache):
    for spec, sizes in ((MultiCropSpec.preset("byol", global_size=32), [32, 32]),
                        (MultiCropSpec.preset("swav", global_size=32, local_size=16, n_local=3), [32, 32, 16, 16, 16])):
        loader = build_loader(tiny_gray_dataset, spec, 16, num_workers=0, **MODES[cache])
        assert loader.mode == ("ram" if cache == "ram" else "workers")
        assert len(loader) == 96 // 16
        batch = next(iter(loader))
        assert isinstance(batch, Batch) and len(batch.views) == spec.n_views
        for view, size in zip(batch.views, sizes, strict=True):
            assert view.shape == (16, 3, size, size) and view.dtype == torch.float32
            assert view.is_contiguous(memory_format=torch.channels_last)
            assert view.device == torch.device("cpu") and torch.isfinite(view).all()
        assert batch.labels.dtype == torch.int64 and batch.labels.shape == (16,)


def test_rgb_dataset_of_varied_sizes_loads_through_workers(tiny_dataset):
    loader = build_loader(tiny_dataset, MultiCropSpec.preset("dino", global_size=48, local_size=24, n_local=2), 8,
                          num_workers=0)
    assert loader.mode == "workers"  # images differ in size: no RAM cache
    batches = _collect(loader)
    assert len(batches) == 8 and [v.shape[-1] for v in batches[0].views] == [48, 48, 24, 24]


def test_eval_views_are_the_normalized_centered_square(tiny_dataset):
    size = 40
    loader = build_loader(tiny_dataset, "eval", 8, split="val", num_workers=0)
    assert (loader.shuffle, loader.drop_last) == (False, False) and loader.spec.views[0].size == 224
    loader = build_loader(tiny_dataset, MultiCropSpec.preset("eval", global_size=size), 12, split="val",
                          num_workers=0)
    assert len(loader) == math.ceil(32 / 12)
    batches = _collect(loader)
    assert [b.labels.numel() for b in batches] == [12, 12, 8]
    views = torch.cat([b.views[0] for b in batches])
    refs = []
    for jpeg, _ in _split_samples(tiny_dataset, "val"):
        img = Image.open(io.BytesIO(jpeg)).convert("RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        pixels = np.asarray(img.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side)))
        refs.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1))
    expected = (torch.stack(refs).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(
        1, 3, 1, 1)
    torch.testing.assert_close(views, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(views.mean(dim=(0, 2, 3)), expected.mean(dim=(0, 2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(views.std(dim=(0, 2, 3)), expected.std(dim=(0, 2, 3)), atol=1e-5, rtol=0)


def test_ram_cache_eval_at_native_size_is_exactly_the_pixels(tiny_gray_dataset):
    loader = build_loader(tiny_gray_dataset, MultiCropSpec.preset("eval", global_size=28), 32, split="val",
                          num_workers=0, cache="ram")
    assert loader.mode == "ram"
    views = next(iter(loader)).views[0]
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(io.BytesIO(j))).copy())
                          for j, _ in _split_samples(tiny_gray_dataset, "val")])
    expected = (pixels[:, None].float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(
        1, 3, 1, 1)
    torch.testing.assert_close(views, expected, atol=1e-5, rtol=0)


def test_non_train_split_drops_augmentation_by_default(tiny_gray_dataset):
    loader = build_loader(tiny_gray_dataset, MultiCropSpec.preset("byol", global_size=24), 8, split="val",
                          num_workers=0)
    assert loader.spec.is_deterministic and loader.spec.n_views == 1 and loader.spec.views[0].size == 24
    assert not loader.shuffle and not loader.drop_last
    kept = build_loader(tiny_gray_dataset, MultiCropSpec.preset("byol", global_size=24), 8, split="val",
                        num_workers=0, augment=True)
    assert kept.spec.n_views == 2 and kept.shuffle and kept.drop_last


# ---- sharding -------------------------------------------------------------------------------------
def _rank_loaders(path, world_size, **kw):
    return [build_loader(path, MultiCropSpec.preset("byol", global_size=16), 4, rank=r, world_size=world_size,
                         num_workers=0, **kw) for r in range(world_size)]


@pytest.mark.parametrize(
    "fixture, world_size, split, per_rank",
    [("tiny_dataset", 2, "train", 32),  # 4 equal shards: 2 each
     ("tiny_dataset", 2, "val", 16),
     ("tiny_gray_dataset", 2, "train", 48),  # shards of 40, 30, 26: each rank 48 (was 30: 36 dropped)
     ("tiny_gray_dataset", 4, "train", 24)],  # fewer shards than ranks
)
def test_ranks_read_disjoint_samples_and_yield_equal_batches(request, fixture, world_size, split, per_rank):
    path = request.getfixturevalue(fixture)
    loaders = _rank_loaders(path, world_size, split=split)
    assert {ld.samples_per_epoch for ld in loaders} == {per_rank}
    assert len({len(ld) for ld in loaders}) == 1
    labels = [label for _, label in _split_samples(path, split)]
    for epoch in (0, 1):
        ids = [ld.epoch_sample_ids(epoch) for ld in loaders]
        flat = np.concatenate(ids)
        assert len(flat) == len(set(flat.tolist())) == per_rank * world_size  # disjoint
        assert sorted(flat.tolist()) == list(range(len(labels)))  # and covering
        for ld, rank_ids in zip(loaders, ids, strict=True):
            ld.set_epoch(epoch)
            got = torch.cat([b.labels for b in ld]).numpy()
            n = len(got)
            assert n == len(ld) * 4 or not ld.drop_last
            assert got.tolist() == [labels[i] for i in rank_ids[:n]]  # the batches carry those samples


@pytest.mark.parametrize("world_size, batch", [(2, 5), (4, 3)])
@pytest.mark.parametrize("mode", ["ram", "none", "device"])
def test_an_epoch_reads_every_sample_when_shards_do_not_divide_by_the_world_size(tiny_gray_dataset, mode, world_size,
                                                                                 batch):
    """3 shards of 40, 30 and 26 samples: on 2 ranks the old whole-shard assignment read 30 + 30 of 96 an epoch."""
    spec = MultiCropSpec.preset("byol", global_size=16)
    labels = [label for _, label in _split_samples(tiny_gray_dataset, "train")]

    def make(rank):
        return build_loader(tiny_gray_dataset, spec, batch, rank=rank, world_size=world_size, num_workers=0, seed=5,
                            **MODES[mode], progress=False)

    assert_epoch_reads_every_sample(make, 96, world_size, batch, labels)


def test_rank_outputs_are_disjoint_and_cover_the_split(tiny_dataset):
    """Fingerprint every image by its deterministic eval view: 2 ranks together see each exactly once."""
    spec = MultiCropSpec.preset("eval", global_size=16)

    def prints(**kw):
        ld = build_loader(tiny_dataset, spec, 4, split="val", num_workers=0, **kw)
        return [v.numpy().tobytes() for b in ld for v in b.views[0]]

    whole = prints()
    parts = [prints(rank=r, world_size=2) for r in range(2)]
    assert len(set(whole)) == 32
    assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == sorted(whole)


# ---- order and resume -------------------------------------------------------------------------------
def _byol_loader(path, **kw):
    kw.setdefault("num_workers", 0)
    kw.update(MODES[kw.pop("cache", "auto")] if kw.get("cache") in MODES else {})
    return build_loader(path, MultiCropSpec.preset("byol", global_size=16), 8, **kw)


@pytest.mark.parametrize("cache", list(MODES))
def test_order_and_augmentation_are_a_pure_function_of_seed_and_epoch(tiny_gray_dataset, cache):
    a, b = _byol_loader(tiny_gray_dataset, seed=3, cache=cache), _byol_loader(tiny_gray_dataset, seed=3, cache=cache)
    a.set_epoch(1)
    b.set_epoch(1)
    first = _collect(a)
    assert_same_batches(first, _collect(b))
    a.set_epoch(2)
    assert not np.array_equal(a.epoch_sample_ids(1), a.epoch_sample_ids(2))
    assert not torch.equal(_collect(a)[0].views[0], first[0].views[0])
    other = _byol_loader(tiny_gray_dataset, seed=4, cache=cache)
    other.set_epoch(1)
    assert not np.array_equal(other.epoch_sample_ids(1), a.epoch_sample_ids(1))


@pytest.mark.parametrize("cache", ["none", "device"])
def test_worker_processes_give_the_same_batches_as_in_process(tiny_gray_dataset, cache):
    inproc = _collect(_byol_loader(tiny_gray_dataset, cache=cache, num_workers=0))
    workers = _collect(_byol_loader(tiny_gray_dataset, cache=cache, num_workers=2))
    assert_same_batches(inproc, workers)


@pytest.mark.parametrize("cache", list(MODES))
def test_resume_skips_exactly_the_consumed_batches(tiny_gray_dataset, cache):
    full = _byol_loader(tiny_gray_dataset, seed=1, cache=cache)
    full.set_epoch(2)
    expected = _collect(full)

    interrupted = _byol_loader(tiny_gray_dataset, seed=1, cache=cache)
    interrupted.set_epoch(2)
    it = iter(interrupted)
    consumed = [next(it) for _ in range(3)]
    state = interrupted.state_dict()
    assert state == {"epoch": 2, "batch": 3}
    assert_same_batches(consumed, expected[:3])

    resumed = _byol_loader(tiny_gray_dataset, seed=1, cache=cache)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a trainer's per-epoch call must not undo the resume
    assert resumed.state_dict() == state
    assert_same_batches(_collect(resumed), expected[3:])
    assert resumed.state_dict() == {"epoch": 3, "batch": 0}


def test_epoch_bookkeeping(tiny_gray_dataset):
    loader = _byol_loader(tiny_gray_dataset, cache="ram")
    assert loader.state_dict() == {"epoch": 0, "batch": 0}
    first = _collect(loader)
    assert loader.state_dict() == {"epoch": 1, "batch": 0} and loader.epoch == 1  # advances by itself
    loader.set_epoch(0)
    assert_same_batches(_collect(loader), first)
    it = iter(loader)
    next(it)
    assert loader.state_dict() == {"epoch": 1, "batch": 1}
    loader.set_epoch(1)  # no resume pending: back to the epoch's start
    assert loader.state_dict() == {"epoch": 1, "batch": 0}
    loader.load_state_dict({"epoch": 4, "batch": len(loader)})  # saved after an epoch's last batch
    assert loader.state_dict() == {"epoch": 5, "batch": 0}
    with pytest.raises(ValueError, match="batch"):
        loader.load_state_dict({"epoch": 0, "batch": len(loader) + 1})


# ---- the two crop paths draw from one distribution -------------------------------------------------
def _ramp_crop_stats(path, cache, epochs=48) -> dict[str, np.ndarray]:
    """Per crop: centre x and y (the red / green ramps' mean), width (red span), and flip."""
    spec = MultiCropSpec((plain_view(16, scale=(0.08, 1.0)), plain_view(8, scale=(0.05, 0.4))),
                         mean=(0, 0, 0), std=(1, 1, 1))
    loader = build_loader(path, spec, 8, num_workers=0, cache=cache, seed=5)
    out: dict[str, list] = {k: [] for k in ("cx", "cy", "span", "flip")}
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            for v in batch.views:
                red, green = v[:, 0], v[:, 1]
                edge = red[:, :, -1].mean(1) - red[:, :, 0].mean(1)
                out["cx"].append(red.mean((1, 2)))
                out["cy"].append(green.mean((1, 2)))
                out["span"].append(edge.abs())
                out["flip"].append(edge < 0)
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def test_ram_cache_and_workers_crop_from_the_same_distribution(ramp_dataset):
    ram, workers = _ramp_crop_stats(ramp_dataset, "ram"), _ramp_crop_stats(ramp_dataset, "none")
    assert len(ram["cx"]) == len(workers["cx"]) == 48 * 8 * 2
    for key in ("cx", "cy", "span"):
        assert stats.ks_2samp(ram[key], workers[key]).pvalue > 0.01, key
    for s in (ram, workers):
        n = len(s["flip"])
        assert abs(s["flip"].mean() - 0.5) < 5 * (0.25 / n) ** 0.5  # flip rate 1/2


def test_cache_choice(tiny_dataset, tiny_gray_dataset):
    assert build_loader(tiny_gray_dataset, "byol", 8, num_workers=0).mode == "ram"
    assert build_loader(tiny_gray_dataset, "byol", 8, num_workers=0, cache="none").mode == "workers"
    assert build_loader(tiny_dataset, "byol", 8, num_workers=0).mode == "workers"
    small = TorchLoader(tiny_gray_dataset, MultiCropSpec.preset("byol"), 8, num_workers=0, cache_budget=1000)
    assert small.mode == "workers"
    with pytest.raises(ValueError, match="size"):
        build_loader(tiny_dataset, "byol", 8, num_workers=0, cache="ram")
    with pytest.raises(ValueError, match="cache"):
        build_loader(tiny_dataset, "byol", 8, num_workers=0, cache="disk")


def test_backend_choice_and_errors(tiny_gray_dataset):
    assert isinstance(build_loader(tiny_gray_dataset, "byol", 8, backend="auto", num_workers=0), TorchLoader)
    with pytest.raises(ValueError, match="backend"):
        build_loader(tiny_gray_dataset, "byol", 8, backend="jax")
    for name in ("dali", "ffcv"):
        try:
            loader = build_loader(tiny_gray_dataset, "byol", 8, backend=name)
        except ImportError as e:
            assert name in str(e)  # says which package or module is missing
        except ValueError as e:  # installed, but this dataset was converted without its format
            assert "--formats" in str(e) and name in str(e).lower()
        else:
            assert loader is not None  # that backend exists in this checkout


def test_impossible_batch_size_is_refused(tiny_gray_dataset):
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(tiny_gray_dataset, "byol", 64, world_size=2, num_workers=0)
    with pytest.raises(ValueError, match="rank"):
        build_loader(tiny_gray_dataset, "byol", 8, rank=2, world_size=2, num_workers=0)
    with pytest.raises(ValueError, match="spec"):
        build_loader(tiny_gray_dataset, 3, 8)


def test_eval_view_helper_is_deterministic():
    assert eval_view(32).is_deterministic


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cache", list(MODES))
def test_cuda_batches_match_cpu_batches(tiny_gray_dataset, cache):
    cpu = _collect(_byol_loader(tiny_gray_dataset, cache=cache, seed=2))
    gpu = _collect(_byol_loader(tiny_gray_dataset, cache=cache, seed=2, device="cuda"))
    assert len(cpu) == len(gpu)
    for c, g in zip(cpu, gpu, strict=True):
        assert g.labels.device.type == "cuda" and torch.equal(c.labels, g.labels.cpu())
        for vc, vg in zip(c.views, g.views, strict=True):
            assert vg.device.type == "cuda" and vg.is_contiguous(memory_format=torch.channels_last)
            if cache == "device":  # nvJPEG's IDCT may differ from libjpeg-turbo's by a level here and there
                assert (vg.cpu() - vc).abs().mean() < 0.01
            else:
                torch.testing.assert_close(vg.cpu(), vc, atol=1e-3, rtol=0)


@pytest.mark.parametrize("cache", list(MODES))
def test_gray_and_colour_images_mix_in_one_batch(mixed_mode_dataset, cache):
    spec = MultiCropSpec.preset("eval", global_size=32, mean=(0, 0, 0), std=(1, 1, 1))
    loader = build_loader(mixed_mode_dataset, spec, 8, split="train", num_workers=0, **MODES[cache])
    assert loader.mode == ("ram" if cache == "ram" else "workers")
    views = next(iter(loader)).views[0]
    for i, (jpeg, _) in enumerate(_split_samples(mixed_mode_dataset, "train")):
        pixels = torch.from_numpy(np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).copy())
        torch.testing.assert_close(views[i], pixels.permute(2, 0, 1).float() / 255, atol=1e-6, rtol=0)


# ---- decode="device" -----------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["byol", "swav"])
def test_device_decode_crops_the_same_boxes_as_host_decode(tiny_dataset, preset):
    """Same seed: the same samples, boxes, flips and photometric draws; only the resize filter differs (PIL's
    antialiased bilinear vs roi_align's averaged bilinear samples), by well under a pixel level on average.
    A wrong box, flip or channel order would differ by a large fraction of the range."""
    local = {"local_size": 24, "n_local": 2} if preset == "swav" else {}
    spec = MultiCropSpec.preset(preset, global_size=48, **local)
    host = _collect(build_loader(tiny_dataset, spec, 8, num_workers=0, cache="none", seed=5))
    dev = _collect(build_loader(tiny_dataset, spec, 8, num_workers=0, decode="device", seed=5))
    assert len(host) == len(dev) == 8
    for h, d in zip(host, dev, strict=True):
        assert torch.equal(h.labels, d.labels)
        for vh, vd in zip(h.views, d.views, strict=True):
            assert vd.shape == vh.shape and vd.is_contiguous(memory_format=torch.channels_last)
            assert (vh - vd).abs().mean() < 0.02, (vh - vd).abs().mean()


def test_device_decode_refuses_the_ram_cache_and_other_backends(tiny_gray_dataset):
    with pytest.raises(ValueError, match="cache='none'"):
        build_loader(tiny_gray_dataset, "byol", 8, cache="ram", decode="device")
    with pytest.raises(ValueError, match="decode must be"):
        build_loader(tiny_gray_dataset, "byol", 8, cache="none", decode="gpu")
    assert build_loader(tiny_gray_dataset, "byol", 8, num_workers=0, decode="device").mode == "workers"


def test_device_decode_names_the_shard_of_an_unreadable_jpeg(tmp_path):
    from conftest import write_dataset

    from pipelines.formats import DatasetFormatError

    good = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 200, 30)).save(good, "JPEG")
    path = write_dataset(tmp_path / "bad", ["a"], {"train": [[(good.getvalue(), 0)] * 7 + [(b"not a jpeg", 0)]]})
    with pytest.raises(DatasetFormatError, match=r"train-00000\.tar.*sample 7.*fastssl-convert"):
        _collect(build_loader(path, MultiCropSpec.preset("byol", global_size=16), 8, num_workers=0,
                              decode="device", shuffle=False))


def test_device_decode_names_the_sample_whose_jpeg_body_is_corrupt(tmp_path):
    """A truncated JPEG passes the workers' header check and fails in the batched device decode: the batch
    is decoded image by image to name the sample, not reported as an anonymous decoder error."""
    from conftest import write_dataset

    from pipelines.formats import DatasetFormatError

    rng = np.random.default_rng(0)
    good = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(good, "JPEG")
    jpeg = good.getvalue()
    samples = [(jpeg, 0)] * 5 + [(jpeg[: len(jpeg) // 3], 0)] + [(jpeg, 0)] * 2
    path = write_dataset(tmp_path / "bad", ["a"], {"train": [samples]})
    with pytest.raises(DatasetFormatError, match=r"train-00000\.tar: sample 5 does not decode \(torch.*rerun"):
        _collect(build_loader(path, MultiCropSpec.preset("byol", global_size=16), 8, num_workers=0,
                              decode="device", shuffle=False))


def _jpeg_tensor(seed: int, h: int = 37, w: int = 52) -> torch.Tensor:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def test_jpeg_decoders_agree_with_pil_and_auto_prefers_torchcodec():
    pytest.importorskip("torchcodec")
    from pipelines.torch_loader import JPEG_DECODERS, DeviceJpegDecoder

    assert DeviceJpegDecoder("cpu").name == "torchcodec"
    jpegs = [_jpeg_tensor(s, 37 + s, 52 - s) for s in range(3)]
    pil = [torch.from_numpy(np.array(Image.open(io.BytesIO(j.numpy().tobytes())))).permute(2, 0, 1)
           for j in jpegs]
    for name in JPEG_DECODERS:
        decoder = DeviceJpegDecoder("cpu", prefer=name)
        assert decoder.name == name
        out = decoder(jpegs)
        assert [tuple(o.shape) for o in out] == [tuple(p.shape) for p in pil]
        for o, p in zip(out, pil, strict=True):  # libjpeg-turbo everywhere: at most a rounding level apart
            assert o.dtype == torch.uint8 and (o.int() - p.int()).abs().max() <= 1


def test_jpeg_decoder_falls_back_when_torchcodec_cannot_decode_on_the_device(monkeypatch):
    """A TorchCodec built for another CUDA (or none) fails the probe: "auto" then takes torchvision's; naming one that
    cannot work, or an unknown one, is an error that says what to do."""
    from pipelines.torch_loader import DeviceJpegDecoder

    real_load = DeviceJpegDecoder._load

    def load(self, name):
        if name == "torchcodec":
            def broken(jpegs):
                raise RuntimeError("torchcodec was built without CUDA support")
            return broken
        return real_load(self, name)

    monkeypatch.setattr(DeviceJpegDecoder, "_load", load)
    decoder = DeviceJpegDecoder("cpu")
    assert decoder.name == "torchvision"
    assert tuple(decoder([_jpeg_tensor(1)])[0].shape) == (3, 37, 52)
    monkeypatch.setenv("FASTSSL_JPEG_DECODER", "torchcodec")
    with pytest.raises(RuntimeError, match="no JPEG decoder works on cpu.*without CUDA.*data.decode=host"):
        DeviceJpegDecoder("cpu")
    monkeypatch.setenv("FASTSSL_JPEG_DECODER", "nvjpeg")
    with pytest.raises(ValueError, match="FASTSSL_JPEG_DECODER.*'nvjpeg'"):
        DeviceJpegDecoder("cpu")


def test_prefetch_keeps_order_raises_the_threads_error_and_stops_when_closed():
    import threading

    from pipelines import prefetch

    cpu = torch.device("cpu")
    assert list(prefetch(iter(range(10)), cpu)) == list(range(10))

    def failing():
        yield 1
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for x in prefetch(failing(), cpu):
            got.append(x)
    assert got == [1]

    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    it = prefetch(endless(), cpu, depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()  # the consumer stops early (a resume, train.max_steps): the thread ends and closes its source
    assert closed.wait(5)
    assert not any(t.name == "fastssl-prefetch" for t in threading.enumerate())


def test_padding_repeats_each_images_last_row_and_column():
    from pipelines.torch_loader import _pad_replicate

    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in ((5, 7), (9, 4), (2, 2))]
    batch = _pad_replicate(images)
    assert batch.shape == (3, 3, 9, 7) and batch.dtype == torch.float32
    for img, padded in zip(images, batch, strict=True):
        h, w = img.shape[1:]
        expected = F.pad(img[None].float(), (0, 7 - w, 0, 9 - h), mode="replicate")[0]
        assert torch.equal(padded, expected)


def test_training_runs_with_device_decoding(tiny_dataset, tmp_path):
    import math

    from fastssl.config import load_config
    from fastssl.engine.checkpoint import load_checkpoint
    from fastssl.engine.trainer import Trainer

    out = tmp_path / "run"
    overrides = {
        "data.path": tiny_dataset, "data.decode": "device", "data.cache": "none", "data.num_workers": 1,
        "model.width": 4, "method.proj_hidden": 32, "method.proj_dim": 16, "method.pred_hidden": 32,
        "train.batch_size": 16, "train.epochs": 1, "train.max_steps": 3, "train.log_every": 1,
        "train.progress": False, "train.threads": 1, "eval.knn": "false", "out_dir": out,
    }
    trainer = Trainer(load_config("byol_resnet18_fmnist", [f"{k}={v}" for k, v in overrides.items()]))
    results = trainer.fit()
    assert trainer.loader.decode == "device"
    assert results["steps"] == 3 and math.isfinite(results["final_loss"])
    assert load_checkpoint(out / "checkpoints" / "last.pt")["loader"] == {"epoch": 0, "batch": 3}


# ---- GPU paths checked without a GPU: device strings and stream order -----------------------------------------
class _ImageOnCuda:
    """What a decoder returns on cuda:N, for a machine without CUDA: the probe reads only shape and device."""

    def __init__(self, device: torch.device | None = None):
        self.shape, self.device = (3, 8, 16), device or torch.device("cuda", 0)


def test_a_bare_cuda_device_string_resolves_to_an_index_the_decoders_probe_accepts(monkeypatch):
    """decode_jpeg(device="cuda") returns tensors on cuda:0; compared with a bare torch.device("cuda") that is a
    different device, and both decoders were refused ("no JPEG decoder works on cuda")."""
    from pipelines import resolve_device
    from pipelines.torch_loader import DeviceJpegDecoder

    monkeypatch.setattr(DeviceJpegDecoder, "_load", lambda self, name: lambda jpegs: [_ImageOnCuda() for _ in jpegs])
    decoder = DeviceJpegDecoder("cuda")
    assert decoder.name == "torchcodec" and decoder.device == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("cuda:3") == torch.device("cuda", 3)
    # A second rank on the node: torchrun's set_device(local_rank) made GPU 1 current; a bare "cuda" means it.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)


def test_the_device_decoder_waits_for_its_stream_before_every_decode(monkeypatch):
    """The decode's output blocks may be ones the previous batch's queued crops still read: the host waits for the
    current (prefetch) stream before each decode call, the batch one and the one-by-one retry."""
    from pipelines.torch_loader import DeviceJpegDecoder

    events = []

    class Stream:
        def synchronize(self):
            events.append("sync")

    def decode(jpegs, device):
        events.append(f"decode {len(jpegs)}")
        return [_ImageOnCuda(device) for _ in jpegs]

    monkeypatch.setattr(DeviceJpegDecoder, "_load", lambda self, name: lambda jpegs: decode(jpegs, self.device))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    decoder = DeviceJpegDecoder("cuda:0")
    events.clear()
    decoder([_jpeg_tensor(0), _jpeg_tensor(1)])
    assert events == ["sync", "decode 2"]
    events.clear()
    decoder.decode_each([_jpeg_tensor(0), _jpeg_tensor(1)])
    assert events[0] == "sync" and events.count("decode 1") == 2
    events.clear()
    DeviceJpegDecoder("cpu")([_jpeg_tensor(0)])  # CPU: nothing to wait for
    assert events == ["decode 1", "decode 1"]  # the probe, the call
