"""Shared fixtures: tiny converted datasets written with pipelines.formats (the converter's format)."""

from __future__ import annotations

import importlib.util
import io
import os
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import Batch, ViewSpec
from pipelines.formats import ShardWriter, iter_samples, load_manifest, shard_paths, write_manifest, write_names

# Triton decides at kernel definition (first import of a kernel module) whether it interprets; without a
# GPU every test process must interpret, whichever test module happens to import fastssl first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torch 2.14.1's oneDNN crashes (a segfault, a corrupted heap or a hang) in the channels-last convolution backward
# at the tiny batches of these tests on an x86 CPU without AVX-512 (an AMD EPYC Zen 3: eager and compiled alike; NCHW
# and oneDNN's pre-AVX2 kernels do not; see the session-12 note on issue 26). There the suite runs oneDNN's SSE4.1
# kernels: set before the first convolution builds a oneDNN primitive; a value already in the environment wins.
if torch.backends.cpu.get_cpu_capability() == "AVX2":
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "SSE41")


def pytest_report_header(config):
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"oneDNN ISA capped at {isa} (ONEDNN_MAX_CPU_ISA; tests/conftest.py)" if isa else None


# fastssl's per-user cache (the memory-format choices, inductor's compiled code) in a folder of this test session
# (inherited by the processes tests start), not the user's ~/.cache.
if "FASTSSL_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["FASTSSL_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastssl-test-cache-")


def load_script(name: str, module_name: str | None = None):
    """scripts/<name>.py imported as a module (scripts/ is no package), registered in sys.modules under
    ``module_name`` (default: ``name``) so that its dataclasses and pickling resolve."""
    module_name = module_name or name
    spec = importlib.util.spec_from_file_location(module_name, Path(__file__).resolve().parents[1] / "scripts"
                                                  / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def _jpeg(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_dataset(folder: Path, classes: list[str], splits: dict[str, list[list[tuple[bytes, int]]]],
                  names: dict[str, list[str]] | None = None) -> Path:
    """Write ``splits[name]`` = list of shards, each a list of (jpeg, label), plus the manifest. ``names``: each
    split's source names in stored order (the sidecar fastssl-convert writes); None: a dataset without names,
    as converted before fastssl-convert kept them."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest_splits = {}
    for split, shards in splits.items():
        infos, n = [], 0
        for index, samples in enumerate(shards):
            writer = ShardWriter(folder, split, index)
            for jpeg, label in samples:
                writer.write(f"{split}_{n:06d}", jpeg, label)
                n += 1
            infos.append(asdict(writer.close()))
        manifest_splits[split] = {"count": n, "shards": infos}
    manifest = {"classes": classes, "splits": manifest_splits}
    if names is not None:
        manifest["names"] = {split: write_names(folder, split, split_names) for split, split_names in names.items()}
    write_manifest(folder, manifest)
    return folder


def _chunks(items: list, sizes: list[int]) -> list[list]:
    out, i = [], 0
    for s in sizes:
        out.append(items[i : i + s])
        i += s
    assert i == len(items)
    return out


def _photo_and_synthetic_images(n: int, rng: np.random.Generator) -> list[tuple[Image.Image, int]]:
    """Varied sizes 60-120 px: crops of skimage photos (class 0), colour gradients (1), noisy blobs (2)."""
    from skimage import data

    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    out = []
    for i in range(n):
        label = i % 3
        h, w = (int(v) for v in rng.integers(60, 121, size=2))
        if label == 0:
            photo = photos[i % len(photos)]
            y, x = (int(rng.integers(0, photo.shape[k] - 200)) for k in (0, 1))
            img = Image.fromarray(photo[y : y + 200, x : x + 200]).resize((w, h), Image.BILINEAR)
        elif label == 1:
            yy, xx = np.mgrid[0:h, 0:w]
            c0, c1 = rng.integers(0, 256, size=(2, 3))
            t = ((xx / w + yy / h) / 2)[..., None]
            img = Image.fromarray((c0 * (1 - t) + c1 * t).astype(np.uint8))
        else:
            base = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
            img = Image.fromarray(base).resize((w, h), Image.BICUBIC)
        out.append((img, label))
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """3 classes, RGB images of varied sizes; train 64 in 4 shards of 16, val 32 in 2 shards."""
    rng = np.random.default_rng(0)
    samples = [(_jpeg(img), label) for img, label in _photo_and_synthetic_images(96, rng)]
    return write_dataset(
        tmp_path_factory.mktemp("tiny"), ["photo", "gradient", "blobs"],
        {"train": _chunks(samples[:64], [16] * 4), "val": _chunks(samples[64:], [16, 16])},
    )


def _gray_blobs(n: int, seed: int) -> list[tuple[bytes, int]]:
    """28x28 grayscale JPEGs of a noisy blob whose size tells its class (10 classes, label i % 10)."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        label = i % 10
        yy, xx = np.mgrid[0:28, 0:28]
        cy, cx = rng.uniform(8, 20, size=2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (2 + label) ** 2))
        pix = np.clip(255 * blob + rng.normal(0, 12, size=(28, 28)), 0, 255).astype(np.uint8)
        samples.append((_jpeg(Image.fromarray(pix, mode="L")), label))
    return samples


@pytest.fixture(scope="session")
def tiny_gray_dataset(tmp_path_factory) -> Path:
    """Fashion-MNIST-like: 28x28 grayscale JPEGs, 10 classes; train 96 in unequal shards (40, 30, 26), val 32."""
    samples = _gray_blobs(128, seed=1)
    return write_dataset(
        tmp_path_factory.mktemp("tinygray"), [f"c{k}" for k in range(10)],
        {"train": _chunks(samples[:96], [40, 30, 26]), "val": [samples[96:]]},
    )


@pytest.fixture(scope="session")
def tiny_gray_named(tmp_path_factory) -> Path:
    """Like tiny_gray_dataset, larger (train 200 in shards of 120 and 80, val 40) and with each image's source
    name (``train/<class>/<i>.png``, as fastssl-convert keeps them): what the evaluations select subsets from."""
    samples = _gray_blobs(240, seed=2)
    names = {split: [f"{split}/c{label}/{i}.png" for i, (_, label) in enumerate(part)]
             for split, part in (("train", samples[:200]), ("val", samples[200:]))}
    return write_dataset(
        tmp_path_factory.mktemp("tinygraynamed"), [f"c{k}" for k in range(10)],
        {"train": _chunks(samples[:200], [120, 80]), "val": [samples[200:]]}, names=names,
    )


RAMP_SIZE = 48


@pytest.fixture(scope="session")
def ramp_dataset(tmp_path_factory) -> Path:
    """8 identical 48x48 RGB images whose red channel is the x coordinate and green the y coordinate,
    so a crop's statistics reveal its box and flip; 2 shards."""
    s = RAMP_SIZE
    yy, xx = np.mgrid[0:s, 0:s]
    pix = np.stack([255 * (xx + 0.5) / s, 255 * (yy + 0.5) / s, np.full((s, s), 128.0)], -1).astype(np.uint8)
    jpeg = _jpeg(Image.fromarray(pix), quality=98)
    return write_dataset(tmp_path_factory.mktemp("ramp"), ["ramp"], {"train": [[(jpeg, 0)] * 4] * 2})


@pytest.fixture(scope="session")
def mixed_mode_dataset(tmp_path_factory) -> Path:
    """8 images of 32x32, gray first then alternating gray / RGB, so caches and batches must widen."""
    rng = np.random.default_rng(2)
    samples = []
    for i in range(8):
        pix = rng.integers(0, 256, size=(4, 4, 3)).astype(np.uint8)
        img = Image.fromarray(pix).resize((32, 32), Image.BICUBIC)
        samples.append((_jpeg(img.convert("L") if i % 2 == 0 else img), i % 2))
    return write_dataset(tmp_path_factory.mktemp("mixed"), ["gray", "rgb"], {"train": [samples]})


# ---- helpers shared by the loader tests (torch, dali, ffcv) -------------------------------------------
def dataset_labels(path, split: str = "train") -> list[int]:
    """The labels of a converted split in stored order."""
    manifest = load_manifest(path)
    return [label for shard in shard_paths(path, split, manifest) for _, _, label in iter_samples(shard)]


def plain_view(size: int, **kw) -> ViewSpec:
    """Geometry only: no photometric op can fire."""
    return ViewSpec(size, jitter_p=0, gray_p=0, blur_p=0, solarize_p=0, **kw)


def assert_same_batches(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.labels, y.labels)
        for vx, vy in zip(x.views, y.views, strict=True):
            assert torch.equal(vx, vy)


def assert_epoch_reads_every_sample(make_loader, total: int, world_size: int, batch: int, labels: list[int]) -> None:
    """Shared by every backend's test: one epoch of ``world_size`` ranks (``make_loader(rank)``) reads every one of
    the ``total`` samples at most once, each rank at most one batch short of its share, equal batch counts, the
    same plan when built again; the batches carry the planned samples."""
    loaders = [make_loader(r) for r in range(world_size)]
    assert len({len(ld) for ld in loaders}) == 1
    for epoch in (0, 3):
        read = []
        for r, ld in enumerate(loaders):
            ids = ld.epoch_sample_ids(epoch)[: len(ld) * batch]
            assert np.array_equal(ids, make_loader(r).epoch_sample_ids(epoch)[: len(ld) * batch])  # deterministic
            own = len(ld.sample_ids)
            assert own - batch <= len(ids) <= own  # at most one batch short of its share
            ld.set_epoch(epoch)
            got = torch.cat([b.labels for b in ld]).tolist()
            assert got == [labels[i] for i in ids]
            read.append(ids)
        flat = np.concatenate(read)
        assert len(set(flat.tolist())) == len(flat)  # once each
        assert set(np.concatenate([ld.sample_ids for ld in loaders]).tolist()) == set(range(total))  # all owned
        assert len(flat) >= total - world_size * batch
        counts = [len(ld.sample_ids) for ld in loaders]
        assert max(counts) - min(counts) <= 1  # balanced


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to open a network connection fails, and the test fails at teardown if one was made (even
    when the code under test caught the error): the evaluations must run offline."""
    import socket

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] if args and isinstance(args[0], socket.socket) else args)
        raise OSError("network access refused by the test's no_network fixture")

    for owner, name in ((socket.socket, "connect"), (socket.socket, "connect_ex"), (socket, "getaddrinfo"),
                        (socket, "create_connection")):
        monkeypatch.setattr(owner, name, refuse)
    yield attempts
    assert not attempts, f"the code tried to reach the network: {attempts}"
