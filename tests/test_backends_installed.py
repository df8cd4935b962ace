"""The data backends are installed and work: DALI and FFCV each run one tiny CPU pipeline.

Nothing here is skipped when a backend is missing: a broken install must fail CI, not pass quietly.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.formats import ShardWriter

LABELS = [0, 7, 3, 1000, 42, 123456]  # multi-digit labels: the int32 component, not the ASCII one
HEIGHT, WIDTH = 48, 64


def _photos(n: int, seed: int) -> list[np.ndarray]:
    """``n`` different (HEIGHT, WIDTH, 3) uint8 images: random crops of real photos plus random noise."""
    from skimage import data

    rng = np.random.default_rng(seed)
    sources = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        h, w = src.shape[:2]
        ch, cw = int(rng.integers(h // 2, h + 1)), int(rng.integers(w // 2, w + 1))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        crop = Image.fromarray(src[y : y + ch, x : x + cw]).resize((WIDTH, HEIGHT), Image.BILINEAR)
        noise = rng.normal(0, 8, (HEIGHT, WIDTH, 3))
        out.append(np.clip(np.asarray(crop, dtype=np.float64) + noise, 0, 255).astype(np.uint8))
    return out


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return _photos(len(LABELS), seed=0)


def _wds2idx(tar: Path, idx: Path) -> None:
    """Index ``tar`` with DALI's own ``wds2idx`` tool (installed next to this interpreter)."""
    tool = Path(sys.executable).with_name("wds2idx")
    cmd = [str(tool)] if tool.exists() else [shutil.which("wds2idx") or "wds2idx"]
    subprocess.run([*cmd, str(tar), str(idx)], check=True, capture_output=True)


def test_shard_index_matches_dali_wds2idx(tmp_path, photos):
    writer = ShardWriter(tmp_path, "train", 0)
    for i, (img, label) in enumerate(zip(photos, LABELS, strict=True)):
        writer.write(f"sample{i:06d}", _jpeg(img), label)
    info = writer.close()
    tar = tmp_path / info.name
    _wds2idx(tar, tmp_path / "reference.idx")
    assert tar.with_suffix(".idx").read_text() == (tmp_path / "reference.idx").read_text()
    with tarfile.open(tar) as t:
        assert len(t.getnames()) == 3 * len(LABELS)


def test_shard_writer_rejects_keys_the_index_cannot_represent(tmp_path):
    writer = ShardWriter(tmp_path, "train", 0)
    try:
        for key in ("img.0001", "a b", "dir/x.y"):
            with pytest.raises(ValueError, match="key"):
                writer.write(key, b"\xff\xd8", 1)
    finally:
        writer.abort()


def test_dali_cpu_pipeline_reads_our_webdataset_shard(tmp_path, photos):
    from nvidia.dali import fn, pipeline_def, types

    writer = ShardWriter(tmp_path, "train", 0)
    for i, (img, label) in enumerate(zip(photos, LABELS, strict=True)):
        writer.write(f"sample{i:06d}", _jpeg(img), label)
    info = writer.close()
    tar = tmp_path / info.name

    batch = len(LABELS)

    # device_id=None is DALI's CPU-only mode (types.CPU_ONLY_DEVICE_ID fails without CUDA).
    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, seed=123)
    def crops():
        jpg, lbl = fn.readers.webdataset(
            paths=[str(tar)],
            index_paths=[str(tar.with_suffix(".idx"))],
            ext=["jpg", "lbl"],
            random_shuffle=False,
            name="reader",
        )
        img = fn.decoders.image(jpg, device="cpu", output_type=types.RGB)
        img = fn.random_resized_crop(img, size=(32, 32), random_area=(0.25, 1.0))
        img = fn.flip(img, horizontal=fn.random.coin_flip(probability=0.5))
        label = fn.reinterpret(lbl, dtype=types.INT32)  # 4 little-endian bytes -> one int32
        return img, label

    pipe = crops()
    pipe.build()
    assert pipe.epoch_size("reader") == len(LABELS)
    images, labels = pipe.run()
    images, labels = images.as_array(), labels.as_array()

    assert images.shape == (batch, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int32
    assert labels.reshape(-1).tolist() == LABELS
    for crop in images:
        assert crop.std() > 5  # real image content, not a blank or constant crop


def test_ffcv_cpu_loader_reads_a_beton(tmp_path, photos):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor
    from ffcv.writer import DatasetWriter

    class Photos:
        def __len__(self) -> int:
            return len(LABELS)

        def __getitem__(self, i: int):
            return photos[i], LABELS[i]

    path = tmp_path / "tiny.beton"
    fields = {"image": RGBImageField(write_mode="jpg", jpeg_quality=95), "label": IntField()}
    DatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(Photos())

    batch = 3
    loader = Loader(
        str(path),
        batch_size=batch,
        num_workers=1,
        order=OrderOption.SEQUENTIAL,
        drop_last=False,
        pipelines={
            "image": [SimpleRGBImageDecoder(), ToTensor()],
            "label": [IntDecoder(), ToTensor()],
        },
    )
    assert len(loader) == len(LABELS) // batch
    seen_images, seen_labels = [], []
    for images, labels in loader:
        assert tuple(images.shape) == (batch, HEIGHT, WIDTH, 3)
        assert images.dtype == torch.uint8
        seen_images.append(images.numpy().copy())
        seen_labels += labels.reshape(-1).tolist()
    assert seen_labels == LABELS
    # JPEG is lossy: decoded pixels are close to what was written, not equal.
    decoded = np.concatenate(seen_images).astype(np.float64)
    error = np.abs(decoded - np.stack(photos).astype(np.float64)).mean(axis=(1, 2, 3))
    assert (error < 8).all(), error
