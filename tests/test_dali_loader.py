"""The DALI backend (CPU-only pipelines, device_id=None): the Loader contract, decode-once, crop distribution."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch
from conftest import RAMP_SIZE, assert_epoch_reads_every_sample, assert_same_batches, dataset_labels, plain_view
from scipy import stats

from pipelines import MultiCropSpec, ViewSpec, build_loader
from pipelines.dali_loader import DaliLoader
from pipelines.torch_loader import sample_rrc

pytest.importorskip("nvidia.dali")


def _dali(path, spec, batch_size=8, **kw) -> DaliLoader:
    kw.setdefault("num_workers", 1)
    loader = build_loader(path, spec, batch_size, backend="dali", **kw)
    assert isinstance(loader, DaliLoader)
    return loader


# ---- the contract's Batch --------------------------------------------------------------------------
@pytest.mark.parametrize("preset, sizes", [("byol", [32, 32]), ("swav", [32, 32] + [16] * 6)])
def test_yields_the_contract_batch(tiny_dataset, preset, sizes):
    loader = _dali(tiny_dataset, MultiCropSpec.preset(preset, global_size=32, local_size=16), seed=2)
    loader.set_epoch(1)
    batches = list(loader)
    assert len(batches) == len(loader) == 64 // 8
    labels = dataset_labels(tiny_dataset)
    got = torch.cat([b.labels for b in batches])
    assert got.dtype == torch.int64 and got.tolist() == [labels[i] for i in loader.epoch_sample_ids(1)]
    for batch in batches:
        assert [tuple(v.shape) for v in batch.views] == [(8, 3, s, s) for s in sizes]
        for v in batch.views:
            assert v.dtype == torch.float32 and v.is_contiguous(memory_format=torch.channels_last)
            assert torch.isfinite(v).all()


def test_crops_are_the_torch_backends_crops_normalized(tiny_dataset):
    """Same boxes and flips as the torch backend (one sampler, same seeds); only the resampling differs."""
    spec = MultiCropSpec((plain_view(32), plain_view(16, scale=(0.05, 0.4))), mean=(0.5, 0.4, 0.3),
                         std=(0.2, 0.25, 0.3))
    dali = list(_dali(tiny_dataset, spec, seed=7))
    ref = list(build_loader(tiny_dataset, spec, 8, backend="torch", num_workers=0, cache="none", seed=7))
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    for d, r in zip(dali, ref, strict=True):
        assert torch.equal(d.labels, r.labels)
        for vd, vr in zip(d.views, r.views, strict=True):
            diff = ((vd - vr) * std).abs()  # back on the [0, 1] pixel scale
            assert diff.mean() < 0.03, diff.mean()
        # per-channel statistics agree: the normalization is the spec's
        torch.testing.assert_close(d.views[0].mean((0, 2, 3)), r.views[0].mean((0, 2, 3)), atol=0.05, rtol=0)


def _op_count(graph: bytes, schema: bytes) -> int:
    """Operators of type ``schema`` in a serialized pipeline (instance names like ``__Resize_3`` excluded)."""
    return len(re.findall(rb"(?<![_A-Za-z])" + schema + rb"(?![_A-Za-z0-9])", graph))


def test_each_image_is_decoded_once_whatever_the_number_of_views(tiny_dataset):
    for n_local in (0, 6):
        spec = MultiCropSpec.preset("swav", global_size=32, local_size=16, n_local=n_local)
        pipe = _dali(tiny_dataset, spec).build_pipeline(iter([]))
        graph = pipe.serialize()
        assert _op_count(graph, rb"decoders__Image") == 1
        assert _op_count(graph, rb"Resize") == 2 + n_local  # every view is cut from that one decoded image


# ---- crop distribution, measured on the ramp image ------------------------------------------------
def _ramp_boxes(path, view: ViewSpec, epochs: int) -> dict[str, np.ndarray]:
    """Per crop: width and height in source pixels (from the red / green ramps' slopes) and the flip."""
    spec = MultiCropSpec((view,), mean=(0, 0, 0), std=(1, 1, 1))
    loader = _dali(path, spec, seed=5)
    s = view.size
    cols = torch.arange(s, dtype=torch.float64) - (s - 1) / 2
    out: dict[str, list] = {"w": [], "h": [], "flip": []}
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            v = batch.views[0].double()
            red, green = v[:, 0].mean(1), v[:, 1].mean(2)  # (B, S): red along x, green along y
            slope_x = (red * cols).sum(1) / (cols**2).sum()  # per output pixel, on the [0, 1] scale
            slope_y = (green * cols).sum(1) / (cols**2).sum()
            out["w"].append(slope_x.abs() * s * RAMP_SIZE)  # red = (x + 0.5) / RAMP_SIZE
            out["h"].append(slope_y.abs() * s * RAMP_SIZE)
            out["flip"].append(slope_x < 0)
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def test_crop_area_and_aspect_follow_sample_rrc(ramp_dataset):
    view = plain_view(24, scale=(0.2, 0.9))
    got = _ramp_boxes(ramp_dataset, view, epochs=40)
    assert len(got["w"]) == 40 * 8
    area = got["w"] * got["h"] / RAMP_SIZE**2
    assert area.min() > 0.2 * 0.8 and area.max() < 0.9 * 1.15  # rounding on a 48 px image + JPEG noise
    rng = random.Random(0)
    ref = np.array([sample_rrc(RAMP_SIZE, RAMP_SIZE, view.scale, view.ratio, rng) for _ in range(4000)], float)
    ref_area = ref[:, 2] * ref[:, 3] / RAMP_SIZE**2
    assert stats.ks_2samp(area, ref_area).pvalue > 0.01
    assert stats.ks_2samp(np.log(got["w"] / got["h"]), np.log(ref[:, 3] / ref[:, 2])).pvalue > 0.01


def test_flip_rate_is_the_specs(ramp_dataset):
    for flip_p in (0.5, 0.0):
        flips = _ramp_boxes(ramp_dataset, plain_view(16, scale=(0.3, 1.0), flip_p=flip_p), epochs=30)["flip"]
        n = len(flips)
        assert abs(flips.mean() - flip_p) < 5 * (0.25 / n) ** 0.5


# ---- order, resume, ranks -------------------------------------------------------------------------
def _byol(path, **kw) -> DaliLoader:
    return _dali(path, MultiCropSpec.preset("byol", global_size=16), **kw)


def test_order_and_augmentation_are_a_pure_function_of_seed_and_epoch(tiny_gray_dataset):
    a, b = _byol(tiny_gray_dataset, seed=3), _byol(tiny_gray_dataset, seed=3, num_workers=2)
    a.set_epoch(1)
    b.set_epoch(1)
    first = list(a)
    assert_same_batches(first, list(b))  # the number of DALI threads changes nothing
    a.set_epoch(2)
    assert not torch.equal(list(a)[0].views[0], first[0].views[0])
    other = _byol(tiny_gray_dataset, seed=4)
    assert not np.array_equal(other.epoch_sample_ids(1), a.epoch_sample_ids(1))


def test_resume_skips_exactly_the_consumed_batches(tiny_gray_dataset):
    full = _byol(tiny_gray_dataset, seed=1)
    full.set_epoch(2)
    expected = list(full)

    interrupted = _byol(tiny_gray_dataset, seed=1)
    interrupted.set_epoch(2)
    it = iter(interrupted)
    consumed = [next(it) for _ in range(3)]
    state = interrupted.state_dict()
    assert state == {"epoch": 2, "batch": 3}
    assert_same_batches(consumed, expected[:3])

    resumed = _byol(tiny_gray_dataset, seed=1)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    assert_same_batches(list(resumed), expected[3:])
    assert resumed.state_dict() == {"epoch": 3, "batch": 0}


def test_two_ranks_read_disjoint_samples_and_yield_equal_batches(tiny_gray_dataset):
    loaders = [_byol(tiny_gray_dataset, rank=r, world_size=2, batch_size=4) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1])
    labels = dataset_labels(tiny_gray_dataset)
    ids = [ld.epoch_sample_ids(0) for ld in loaders]
    assert not set(ids[0].tolist()) & set(ids[1].tolist())
    for ld, rank_ids in zip(loaders, ids, strict=True):
        got = torch.cat([b.labels for b in ld]).tolist()
        assert got == [labels[i] for i in rank_ids[: len(got)]] and len(got) == len(ld) * 4


def test_eval_split_keeps_the_partial_last_batch(tiny_dataset):
    loader = _dali(tiny_dataset, MultiCropSpec.preset("eval", global_size=24), 12, split="val")
    assert [b.labels.numel() for b in loader] == [12, 12, 8]


# ---- the photometric stage inside DALI ------------------------------------------------------------
def test_dali_photometric_yields_normalized_views(tiny_dataset):
    spec = MultiCropSpec.preset("byol", global_size=32)
    loader = _dali(tiny_dataset, spec, seed=1)
    inside = DaliLoader(tiny_dataset, spec, 8, num_workers=1, seed=1, dali_photometric=True)
    a, b = next(iter(loader)), next(iter(inside))
    assert torch.equal(a.labels, b.labels)
    for va, vb in zip(a.views, b.views, strict=True):
        assert vb.shape == va.shape and vb.dtype == torch.float32
        assert vb.is_contiguous(memory_format=torch.channels_last) and torch.isfinite(vb).all()
        assert abs(vb.mean() - va.mean()) < 0.5 and 0.3 < vb.std() < 2.0  # same normalization scale

    plain = MultiCropSpec((plain_view(24),), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    shared = next(iter(_dali(tiny_dataset, plain, seed=1))).views[0]
    dali = next(iter(DaliLoader(tiny_dataset, plain, 8, num_workers=1, seed=1, dali_photometric=True))).views[0]
    torch.testing.assert_close(dali, shared, atol=0.03, rtol=0)  # no op fires: only the normalization


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_match_cpu_batches(tiny_dataset):
    """nvJPEG ("mixed") decode + GPU resize give the CPU pipeline's batches up to decoder rounding."""
    spec = MultiCropSpec.preset("swav", global_size=32, local_size=16)
    cpu = list(_dali(tiny_dataset, spec, seed=2))
    gpu = list(_dali(tiny_dataset, spec, seed=2, device="cuda"))
    assert len(cpu) == len(gpu)
    for c, g in zip(cpu, gpu, strict=True):
        assert g.labels.device.type == "cuda" and torch.equal(c.labels, g.labels.cpu())
        for vc, vg in zip(c.views, g.views, strict=True):
            assert vg.device.type == "cuda" and vg.is_contiguous(memory_format=torch.channels_last)
            assert (vg.cpu() - vc).abs().mean() < 0.1


def test_cpu_outputs_of_a_gpu_pipeline_never_go_through_feed_ndarray(tiny_dataset, monkeypatch):
    """In a GPU pipeline the labels stay a CPU TensorList; feed_ndarray would memcpy them by the host into
    device memory (CPU and GPU lists both have ``as_cpu``, so only the list's type may decide). Checked here
    without a GPU: the loader believes it is on cuda, and the host-to-device copy is recorded, not run."""
    from nvidia.dali.backend import TensorListCPU
    from nvidia.dali.plugin import pytorch as dali_torch

    def refuse(*args, **kwargs):
        raise AssertionError("feed_ndarray called on a CPU TensorList")

    moved = []

    def to(self, device, **kwargs):
        moved.append(torch.device(device))
        return self

    monkeypatch.setattr(dali_torch, "feed_ndarray", refuse)
    loader = _dali(tiny_dataset, MultiCropSpec.preset("byol", global_size=16))
    labels = np.arange(6, dtype=np.int32).reshape(6, 1)
    loader.device = torch.device("cuda", 0)
    monkeypatch.setattr(torch.Tensor, "to", to)
    out = loader._to_torch(TensorListCPU(labels))
    monkeypatch.undo()
    assert moved == [torch.device("cuda", 0)] and torch.equal(out, torch.from_numpy(labels))


@pytest.mark.parametrize("world_size, batch", [(2, 5), (4, 3)])
def test_an_epoch_reads_every_sample_when_shards_do_not_divide_by_the_world_size(tiny_gray_dataset, world_size, batch):
    """3 shards of 40, 30 and 26 samples: on 2 ranks the old whole-shard assignment read 30 + 30 of 96 an epoch."""
    spec = MultiCropSpec.preset("byol", global_size=16)
    assert_epoch_reads_every_sample(lambda r: _dali(tiny_gray_dataset, spec, batch, rank=r, world_size=world_size,
                                                    seed=5), 96, world_size, batch, dataset_labels(tiny_gray_dataset))


# ---- GPU paths checked without a GPU ------------------------------------------------------------------------
def test_a_bare_cuda_device_builds_the_pipeline_on_the_ranks_own_gpu(tiny_dataset, monkeypatch):
    """Under torchrun rank 1 of a node has set_device(1): a bare "cuda" is GPU 1, and DALI's device_id must say 1
    (it said 0: ``(device.index or 0)``, so every rank's DALI ran on GPU 0)."""
    import nvidia.dali

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    loader = DaliLoader(tiny_dataset, MultiCropSpec.preset("byol", global_size=16), 8, device="cuda", num_workers=1)
    assert loader.device == torch.device("cuda", 1) and loader.decoder_device == "mixed"
    seen = {}

    class Built(Exception):
        pass

    def pipeline_def(**kwargs):
        seen.update(kwargs)
        raise Built

    monkeypatch.setattr(nvidia.dali, "pipeline_def", pipeline_def)
    with pytest.raises(Built):
        loader.build_pipeline(iter([]))
    assert seen["device_id"] == 1


def test_a_pipeline_that_fails_to_build_raises_its_own_error(tiny_dataset, monkeypatch):
    """A GPU-only build failure (nvJPEG init, a DALI/driver mismatch, a wrong device_id) surfaces as itself; the
    handler read the batch being run before the pipeline existed and raised an AttributeError instead."""
    loader = _dali(tiny_dataset, MultiCropSpec.preset("byol", global_size=16))

    def broken(source):
        raise RuntimeError("nvJPEG initialization failed (NVJPEG_STATUS_ARCH_MISMATCH)")

    monkeypatch.setattr(loader, "build_pipeline", broken)
    with pytest.raises(RuntimeError, match="NVJPEG_STATUS_ARCH_MISMATCH"):
        next(iter(loader))


class _FakePipe:
    """A built pipeline's stand-in: records how ``run`` is called, returns one byol batch of CPU outputs."""

    def __init__(self, n: int, error: Exception | None = None):
        from nvidia.dali.backend import TensorListCPU

        self.calls, self.error = [], error
        crops = np.zeros((n, 16, 16, 3), dtype=np.uint8)
        self.outs = (TensorListCPU(np.zeros((n, 1), dtype=np.int32)), TensorListCPU(crops), TensorListCPU(crops))

    def run(self, *args):
        self.calls.append(args)
        if self.error is not None:
            raise self.error
        return self.outs


def test_a_run_failure_with_decodable_data_raises_the_pipelines_error(tiny_dataset, monkeypatch):
    loader = _dali(tiny_dataset, MultiCropSpec.preset("byol", global_size=16))
    monkeypatch.setattr(loader, "build_pipeline", lambda source: _FakePipe(8, RuntimeError("CUDA driver too old")))
    with pytest.raises(RuntimeError, match="CUDA driver too old"):
        next(iter(loader))


def test_on_cuda_the_pipeline_runs_on_the_consumers_stream(tiny_dataset, monkeypatch):
    """``pipe.run()`` without a stream makes the host wait for DALI's GPU work on the training thread; given the
    consumer's stream, the outputs are bound to it and copied on it. Checked without a GPU: a stream stand-in."""
    loader = _dali(tiny_dataset, MultiCropSpec.preset("byol", global_size=16))
    stream, copied_on = object(), []
    pipe = _FakePipe(8)
    real = loader._to_torch
    monkeypatch.setattr(loader, "build_pipeline", lambda source: pipe)
    monkeypatch.setattr(loader, "_consumer_stream", lambda: stream)
    monkeypatch.setattr(loader, "_to_torch", lambda out, s=None: copied_on.append(s) or real(out))
    batch = next(iter(loader))
    assert pipe.calls == [(stream,)] and copied_on == [stream] * 3
    assert [tuple(v.shape) for v in batch.views] == [(8, 3, 16, 16)] * 2


def test_the_feed_runs_off_the_thread_that_iterates_the_loader(tiny_dataset, monkeypatch):
    """DALI's external source calls its source inside ``pipe.run()``: the reads, header parses and crop boxes of
    every batch ran on the training thread. They run in the loader's feed thread; the batches stay the same."""
    import threading

    spec = MultiCropSpec.preset("swav", global_size=32, local_size=16)
    reference = list(_dali(tiny_dataset, spec, seed=3))
    loader = _dali(tiny_dataset, spec, seed=3)
    threads = []
    real = loader._feed
    monkeypatch.setattr(loader, "_feed", lambda *a: threads.append(threading.get_ident()) or real(*a))
    batches = list(loader)
    assert len(threads) == len(batches) and threading.get_ident() not in threads
    assert_same_batches(batches, reference)
