"""fastssl-convert: ImageFolder and Fashion-MNIST into shards that pipelines.formats reads back."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastssl.convert import FASHION_MNIST_CLASSES, ConvertError, convert, main, read_idx
from fastssl.convert import find as convert_mod
from pipelines.formats import MANIFEST, iter_samples, load_manifest, shard_counts, shard_paths

REPO = Path(__file__).resolve().parents[1]
COLORS = ("blue", "green", "red")  # sorted, so label == index in this tuple == dominant RGB channel - 2..0
CHANNEL = {"red": 0, "green": 1, "blue": 2}


# --------------------------------------------------------------------------------------------------
# Helpers


def _photo(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()


def _save(array: np.ndarray, path: Path, fmt: str | None = None, **kwargs) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, fmt, **kwargs)
    return path.read_bytes()


def _colour_image(colour: str, seed: int, size=(40, 30)) -> np.ndarray:
    """A noisy image whose dominant channel tells its class, so labels can be checked after decoding."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, size=(size[1], size[0], 3), dtype=np.uint8)
    img[..., CHANNEL[colour]] += 180
    return img


def _colour_folder(root: Path, per_class: int, start_seed: int = 0) -> None:
    for ci, colour in enumerate(COLORS):
        for i in range(per_class):
            # Mix formats so both the keep-JPEG and the re-encode paths feed the shards.
            ext = (".jpg", ".png", ".JPEG")[i % 3]
            img = _colour_image(colour, start_seed + 100 * ci + i)
            _save(img, root / colour / f"img_{i:03d}{ext}", "PNG" if ext == ".png" else "JPEG", quality=92)


def _decode(jpeg: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(jpeg))
    assert im.format == "JPEG"
    im.load()
    return im


def _colour_label(jpeg: bytes) -> int:
    means = np.asarray(_decode(jpeg).convert("RGB"), dtype=np.float64).mean(axis=(0, 1))
    return COLORS.index(("red", "green", "blue")[int(np.argmax(means))])


def _read_split(dst: Path, split: str) -> list[tuple[str, str, bytes, int]]:
    """(shard name, key, jpeg, label) for every sample of ``split``, in stored order."""
    manifest = load_manifest(dst)
    return [(p.name, key, jpeg, label) for p in shard_paths(dst, split, manifest) for key, jpeg, label in
            iter_samples(p)]  # fmt: skip


def _only_sample(dst: Path) -> tuple[bytes, int]:
    samples = _read_split(dst, "train")
    assert len(samples) == 1
    return samples[0][2], samples[0][3]


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "fastssl.convert", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------------------------------
# ImageFolder


def test_corrupt_and_truncated_files_are_skipped_named_and_the_rest_is_readable(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "out"
    _colour_folder(src, per_class=6)
    (src / "green" / "broken.jpg").write_bytes(os.urandom(2000))
    whole = _save(_photo("chelsea"), tmp_path / "chelsea.jpg", "JPEG", quality=90)
    (src / "red" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (src / "blue" / "notes.txt").write_text("not an image extension: ignored, not reported")

    rc = main([str(src), str(dst), "--workers", "2", "--shard-size", "5", "--no-progress"])
    assert rc == 0
    report = capsys.readouterr().out
    assert "green/broken.jpg" in report and "red/truncated.jpg" in report
    assert "notes.txt" not in report

    manifest = load_manifest(dst)
    skipped = {item["path"]: item["reason"] for item in manifest["skipped"]}
    assert set(skipped) == {"green/broken.jpg", "red/truncated.jpg"}
    assert all(reason for reason in skipped.values())
    assert "truncated" in skipped["red/truncated.jpg"]
    assert manifest["classes"] == list(COLORS)

    samples = _read_split(dst, "train")
    assert len(samples) == manifest["splits"]["train"]["count"] == 18
    assert [_colour_label(jpeg) for _, _, jpeg, _ in samples] == [label for *_, label in samples]
    assert manifest["splits"]["train"]["class_counts"] == [6, 6, 6]
    assert shard_counts(manifest, "train") == [5, 5, 5, 3]
    assert len({key for _, key, _, _ in samples}) == 18

    # The training loader reads the result: every sample once per epoch, with the contract's views.
    import pipelines

    loader = pipelines.build_loader(dst, pipelines.MultiCropSpec.preset("byol", global_size=24), 6, num_workers=0)
    labels = []
    for batch in loader:
        assert [tuple(v.shape) for v in batch.views] == [(6, 3, 24, 24), (6, 3, 24, 24)]
        labels += batch.labels.tolist()
    assert sorted(labels) == sorted(label for *_, label in samples)


def test_jpeg_within_max_side_is_stored_byte_identical(tmp_path):
    src = tmp_path / "src"
    rgb = _save(_photo("chelsea"), src / "cat" / "chelsea.jpg", "JPEG", quality=90)  # 451 x 300
    gray = _save(_photo("camera"), src / "man" / "camera.jpg", "JPEG", quality=90)  # 512 x 512, L
    manifest = convert(src, tmp_path / "out", max_side=512, workers=0, progress=False)
    stored = {label: jpeg for *_, jpeg, label in _read_split(tmp_path / "out", "train")}
    assert stored == {0: rgb, 1: gray}
    assert manifest["splits"]["train"]["stored"] == {"kept": 2, "reencoded": 0, "resized": 0}


def test_oversize_images_are_resized_so_the_longer_side_is_max_side(tmp_path):
    src = tmp_path / "src"
    photos = {"astronaut": ".jpg", "coffee": ".jpg", "rocket": ".png"}  # 512x512, 600x400, 640x427
    for name, ext in photos.items():
        _save(_photo(name), src / name / f"{name}{ext}", quality=95)
    manifest = convert(src, tmp_path / "out", max_side=200, workers=0, progress=False)
    assert manifest["splits"]["train"]["stored"]["resized"] == 3
    got = {manifest["classes"][label]: _decode(jpeg) for *_, jpeg, label in _read_split(tmp_path / "out", "train")}
    expected_sizes = {"astronaut": (200, 200), "coffee": (200, 133), "rocket": (200, 133)}
    assert {name: im.size for name, im in got.items()} == expected_sizes
    for name, im in got.items():
        # Same picture, not merely the same size: close to a plain Lanczos resize of the original.
        reference = Image.fromarray(_photo(name)).resize(im.size, Image.Resampling.LANCZOS)
        error = np.abs(np.asarray(im, dtype=np.int16) - np.asarray(reference, dtype=np.int16)).mean()
        assert error < 6, (name, error)


def test_png_webp_bmp_and_odd_modes_are_reencoded_as_jpeg(tmp_path):
    src = tmp_path / "src"
    chelsea = _photo("chelsea")
    _save(chelsea, src / "a_png" / "x.png")
    _save(chelsea, src / "b_webp" / "x.webp", lossless=True)
    _save(chelsea, src / "c_bmp" / "x.bmp")
    _save(_photo("camera"), src / "d_gray_png" / "x.png")
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0] = 255  # red where opaque
    rgba[:32, :, 3] = 255  # top half opaque, bottom half fully transparent
    _save(rgba, src / "e_rgba" / "x.png")
    png_named_jpg = _save(chelsea, src / "f_png_named_jpg" / "x.jpg", "PNG")
    sixteen_bit = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16  # spans 0..65520
    _save(sixteen_bit, src / "g_gray16" / "x.png")

    manifest = convert(src, tmp_path / "out", max_side=1024, workers=0, progress=False)
    assert manifest["skipped"] == []
    assert manifest["splits"]["train"]["stored"]["reencoded"] == 7
    got = {manifest["classes"][label]: jpeg for *_, jpeg, label in _read_split(tmp_path / "out", "train")}
    images = {name: _decode(jpeg) for name, jpeg in got.items()}
    assert got["f_png_named_jpg"] != png_named_jpg
    for name in ("a_png", "b_webp", "c_bmp", "f_png_named_jpg"):
        assert images[name].mode == "RGB" and images[name].size == (451, 300)
        assert np.abs(np.asarray(images[name], np.int16) - chelsea).mean() < 4, name
    assert images["d_gray_png"].mode == "L"
    rgba_out = np.asarray(images["e_rgba"])
    assert rgba_out[:28, :, 0].min() > 230 and rgba_out[:28, :, 1:].max() < 30  # opaque: red
    assert rgba_out[36:].min() > 230  # transparent: flattened onto white
    gray16 = np.asarray(images["g_gray16"], np.int16)
    assert images["g_gray16"].mode == "L" and abs(gray16.mean() - (sixteen_bit >> 8).mean()) < 3


def test_exif_orientation_is_applied_so_every_decoder_sees_an_upright_image(tmp_path):
    src = tmp_path / "src"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: viewers rotate it 90 degrees clockwise
    _save(_photo("chelsea"), src / "cat" / "x.jpg", "JPEG", quality=95, exif=exif.tobytes())
    convert(src, tmp_path / "out", workers=0, progress=False)
    jpeg, _ = _only_sample(tmp_path / "out")
    im = _decode(jpeg)
    assert im.size == (300, 451)
    assert im.getexif().get(0x0112) is None
    upright = np.rot90(_photo("chelsea"), k=-1)
    assert np.abs(np.asarray(im, np.int16) - upright).mean() < 4


def test_train_val_layout_gives_two_splits_with_shared_labels_and_unique_keys(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    _colour_folder(src / "train", per_class=4)
    _colour_folder(src / "val", per_class=2, start_seed=1000)
    _save(_colour_image("red", 7), src / "test" / "red" / "x.jpg")  # not a split we read
    manifest = convert(src, dst, workers=2, progress=False)

    assert manifest["source"]["layout"] == "train/val"
    assert manifest["classes"] == list(COLORS)
    assert {s: manifest["splits"][s]["count"] for s in manifest["splits"]} == {"train": 12, "val": 6}
    train, val = _read_split(dst, "train"), _read_split(dst, "val")
    assert {shard for shard, *_ in train} == {"train-00000.tar"}
    assert {shard for shard, *_ in val} == {"val-00000.tar"}
    for samples in (train, val):
        assert [_colour_label(jpeg) for _, _, jpeg, _ in samples] == [label for *_, label in samples]
    keys = [key for _, key, _, _ in train + val]
    assert len(set(keys)) == len(keys) == 18


def test_every_shard_holds_every_class(tmp_path):
    src = tmp_path / "src"
    _colour_folder(src, per_class=12)
    manifest = convert(src, tmp_path / "out", shard_size=6, workers=0, progress=False)
    assert shard_counts(manifest, "train") == [6] * 6
    per_shard: dict[str, list[int]] = {}
    for shard, _, _, label in _read_split(tmp_path / "out", "train"):
        per_shard.setdefault(shard, []).append(label)
    # Sorted paths would give one class per shard; the class-mixing order spreads them evenly.
    assert all(sorted(labels) == [0, 0, 1, 1, 2, 2] for labels in per_shard.values()), per_shard


def test_limit_takes_a_subset_that_holds_every_class(tmp_path):
    src = tmp_path / "src"
    _colour_folder(src, per_class=10)
    manifest = convert(src, tmp_path / "out", limit=6, workers=0, progress=False)
    assert manifest["splits"]["train"]["count"] == 6
    assert manifest["splits"]["train"]["class_counts"] == [2, 2, 2]  # the first 6 sorted paths: all blue


def test_same_input_gives_byte_identical_output_whatever_the_worker_count(tmp_path):
    src = tmp_path / "src"
    _colour_folder(src, per_class=9)
    _save(_photo("coffee"), src / "red" / "big.jpg", quality=95)  # resized path too
    convert(src, tmp_path / "a", shard_size=7, workers=0, progress=False)
    convert(src, tmp_path / "b", shard_size=7, workers=2, progress=False)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 1 + 2 * 4 + 1  # manifest + 4 shards with their indexes + the names
    assert a == b


def test_seed_changes_the_order_but_not_the_content(tmp_path):
    src = tmp_path / "src"
    _colour_folder(src, per_class=5)
    convert(src, tmp_path / "s0", workers=0, progress=False)
    convert(src, tmp_path / "s1", workers=0, progress=False, seed=1)
    s0 = [(jpeg, label) for *_, jpeg, label in _read_split(tmp_path / "s0", "train")]
    s1 = [(jpeg, label) for *_, jpeg, label in _read_split(tmp_path / "s1", "train")]
    assert s0 != s1
    assert sorted(s0) == sorted(s1)


def test_manifest_checksums_sizes_and_dali_index_match_the_shards(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    _colour_folder(src, per_class=4)
    manifest = convert(src, dst, shard_size=5, workers=0, progress=False)
    shards = manifest["splits"]["train"]["shards"]
    assert [s["name"] for s in shards] == ["train-00000.tar", "train-00001.tar", "train-00002.tar"]
    for shard in shards:
        path = dst / shard["name"]
        data = path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        assert len(data) == shard["bytes"]
        # The DALI index: "v1.2 N", then per sample "ext offset size name" triples at the member data.
        header, *lines = path.with_suffix(".idx").read_text().splitlines()
        assert header == f"v1.2 {shard['count']}" and len(lines) == shard["count"]
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for line in lines:
            fields = line.split()
            for ext, offset, size, name in zip(*[iter(fields)] * 4, strict=True):
                assert name.endswith("." + ext)
                assert data[int(offset) : int(offset) + int(size)] == members[name]
        # Plain USTAR, byte for byte what the tarfile module writes for the same members.
        rebuilt = io.BytesIO()
        with tarfile.open(fileobj=rebuilt, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, content in members.items():
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode, info.uname, info.gname = len(content), 0, 0o644, "", ""
                tar.addfile(info, io.BytesIO(content))
        assert rebuilt.getvalue() == data


def test_overwrite_replaces_the_dataset_and_removes_stale_shards(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    _colour_folder(src, per_class=3)
    convert(src, dst, shard_size=2, workers=0, progress=False)
    assert len(list(dst.glob("train-*.tar"))) == 5
    (dst / ".train-00009.tar.tmp").write_bytes(b"left by a killed run")
    (dst / "val.names.json.gz").write_bytes(b"of an earlier dataset with a val split")
    with pytest.raises(ConvertError, match="--overwrite"):
        convert(src, dst, workers=0, progress=False)
    manifest = convert(src, dst, shard_size=100, workers=0, progress=False, overwrite=True)
    assert shard_counts(manifest, "train") == [9]
    assert sorted(p.name for p in dst.iterdir()) == [MANIFEST, "train-00000.idx", "train-00000.tar",
                                                     "train.names.json.gz"]


# --------------------------------------------------------------------------------------------------
# Command line (subprocess: exit codes and messages as a user sees them)


def test_cli_refuses_to_overwrite_an_existing_dataset(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    _colour_folder(src, per_class=2)
    convert(src, dst, workers=0, progress=False)
    before = _files(dst)
    proc = _run_cli(str(src), str(dst), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("fastssl-convert: error:")
    assert str(dst) in proc.stderr and "--overwrite" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _files(dst) == before

    proc = _run_cli(str(src), str(dst), "--overwrite", "--no-progress", "--max-side", "16", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "6 images" in proc.stdout
    assert load_manifest(dst)["settings"]["max_side"] == 16


def test_cli_missing_src_is_a_clear_error_and_writes_nothing(tmp_path):
    missing = tmp_path / "no_such_folder"
    proc = _run_cli(str(missing), str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("fastssl-convert: error:") and str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_imagefolder_without_images_is_a_clear_error(tmp_path):
    src = tmp_path / "src"
    (src / "cat").mkdir(parents=True)
    (src / "cat" / "readme.txt").write_text("no images here")
    proc = _run_cli(str(src), str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("fastssl-convert: error:")
    assert str(src) in proc.stderr and "no images" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_option_values_are_errors_not_tracebacks(tmp_path, capsys):
    src = tmp_path / "src"
    _colour_folder(src, per_class=1)
    assert main([str(src), str(tmp_path / "out"), "--quality", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastssl-convert: error:") and "--quality" in err
    with pytest.raises(SystemExit) as exc:  # argparse's own usage error, same prefix and status
        main([str(src), str(tmp_path / "out"), "--limit", "train:5"])
    assert exc.value.code == 2
    assert "fastssl-convert: error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST

fashion_mnist_installed = pytest.mark.skipif(
    not (convert_mod.FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)


def _nearest_source_labels(decoded: np.ndarray, images: np.ndarray, labels: np.ndarray) -> tuple:
    """Label of, and mean absolute difference to, the nearest source image of each decoded sample."""
    src = images.reshape(len(images), -1).astype(np.float32)
    src_sq = (src * src).sum(axis=1)
    rows = decoded.reshape(len(decoded), -1).astype(np.float32)
    nearest = np.concatenate(
        [np.argmin(src_sq[None] - 2 * rows[i : i + 100] @ src.T, axis=1) for i in range(0, len(rows), 100)]
    )  # blocks of 100 rows: one matrix product each, not one pass over the source per row
    return labels[nearest].astype(np.int64), np.abs(src[nearest] - rows).mean(axis=1)


@fashion_mnist_installed
def test_fashion_mnist_subset_has_the_right_counts_classes_pixels_and_labels(tmp_path, capsys):
    dst = tmp_path / "fm"
    rc = main(["fashion-mnist", str(dst), "--limit", "train=500,val=200", "--shard-size", "100",
               "--workers", "2", "--no-progress"])  # fmt: skip
    assert rc == 0
    assert "500 images" in capsys.readouterr().out
    manifest = load_manifest(dst)
    assert manifest["classes"] == list(FASHION_MNIST_CLASSES) and len(manifest["classes"]) == 10
    assert manifest["source"]["kind"] == "fashion-mnist"
    assert shard_counts(manifest, "train") == [100] * 5
    assert shard_counts(manifest, "val") == [100] * 2

    for split, prefix in (("train", "train"), ("val", "t10k")):
        samples = _read_split(dst, split)
        assert len(samples) == manifest["splits"][split]["count"]
        decoded = []
        for _, _, jpeg, _ in samples:
            im = _decode(jpeg)
            assert im.mode == "L" and im.size == (28, 28)
            decoded.append(np.asarray(im))
        labels = np.array([label for *_, label in samples])
        for shard in {s for s, *_ in samples}:
            assert {label for s, *_, label in samples if s == shard} == set(range(10)), (split, shard)
        # Each stored image is (up to JPEG error) an image of the right source split, with its label.
        source = convert_mod.FASHION_MNIST_DIR
        images = read_idx(source / f"{prefix}-images-idx3-ubyte.gz")
        source_labels = read_idx(source / f"{prefix}-labels-idx1-ubyte.gz")
        nearest_labels, errors = _nearest_source_labels(np.stack(decoded), images, source_labels)
        assert errors.max() < 4, errors.max()
        assert (nearest_labels == labels).all()


def test_fashion_mnist_unavailable_tells_how_to_install_it(tmp_path, monkeypatch, capsys):
    import types

    class OfflineFashionMNIST:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    # Fake torchvision so the test neither needs the network nor pays for importing torch.
    fake_datasets = types.ModuleType("torchvision.datasets")
    fake_datasets.FashionMNIST = OfflineFashionMNIST
    fake_tv = types.ModuleType("torchvision")
    fake_tv.datasets = fake_datasets
    monkeypatch.setitem(sys.modules, "torchvision", fake_tv)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", fake_datasets)
    monkeypatch.setattr(convert_mod, "FASHION_MNIST_DIR", tmp_path / "not_installed")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    assert main(["fashion-mnist", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastssl-convert: error:")
    assert "apt-get install dataset-fashion-mnist" in err and "Error downloading" in err
    assert not (tmp_path / "out").exists()
