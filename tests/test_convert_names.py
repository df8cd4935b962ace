"""fastssl-convert keeps each image's source name (the names sidecar), and --add-names recovers the names of a
dataset converted before it did, without re-encoding."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastssl.convert import convert
from fastssl.convert.cli import main
from pipelines.formats import (
    MANIFEST,
    DatasetFormatError,
    iter_samples,
    load_manifest,
    load_names,
    shard_paths,
    split_labels,
    write_manifest,
)

COLOURS = ("blue", "green", "red")  # sorted: label == index


def _tree(root: Path, per_class: int = 5) -> None:
    """Class folders whose images' dominant channel tells their class, under train/ and val/."""
    for split, n in (("train", per_class), ("val", 2)):
        for label, colour in enumerate(COLOURS):
            for i in range(n):
                rng = np.random.default_rng(100 * label + i + (1000 if split == "val" else 0))
                img = rng.integers(0, 60, size=(20, 24, 3), dtype=np.uint8)
                img[..., 2 - label] += 180
                path = root / split / colour / f"{colour}_{i:03d}.{'png' if i % 2 else 'jpg'}"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(path)


def _dominant(jpeg: bytes) -> int:
    import io

    rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float64).mean(axis=(0, 1))
    return 2 - int(np.argmax(rgb))


def test_each_stored_image_keeps_its_source_name_and_skipped_files_have_none(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "out"
    _tree(src)
    (src / "train" / "green" / "broken.jpg").write_bytes(os.urandom(500))  # skipped: its name must not shift others
    manifest = convert(src, dst, shard_size=4, workers=0, progress=False)
    assert [s["path"] for s in manifest["skipped"]] == ["train/green/broken.jpg"]
    for split in ("train", "val"):
        names = load_names(dst, split)
        samples = [s for p in shard_paths(dst, split) for s in iter_samples(p)]
        assert len(names) == len(samples) == manifest["splits"][split]["count"]
        assert sorted(names) == sorted(p.relative_to(src).as_posix() for p in (src / split).rglob("*.*")
                                       if p.name != "broken.jpg")  # paths under SRC
        for name, (_, jpeg, label) in zip(names, samples, strict=True):
            # the name's class folder, the stored label and the pixels agree, sample by sample
            assert COLOURS.index(name.split("/")[1]) == label == _dominant(jpeg)
    assert split_labels(dst, "train").tolist() == [label for p in shard_paths(dst, "train")
                                                     for _, _, label in iter_samples(p)]


def test_a_dataset_without_names_says_how_to_add_them_and_add_names_does_it_without_reencoding(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "out"
    _tree(src, per_class=7)
    (src / "train" / "red" / "empty.jpg").write_bytes(b"")  # skipped at conversion
    convert(src, dst, shard_size=5, workers=0, progress=False)
    expected = {split: load_names(dst, split) for split in ("train", "val")}
    # As converted before names were kept: no sidecar, no "names" in the manifest.
    manifest = load_manifest(dst)
    for entry in manifest.pop("names").values():
        (dst / entry["name"]).unlink()
    write_manifest(dst, {k: v for k, v in manifest.items() if k not in ("format", "version")})
    shards = {p.name: (p.stat().st_ino, p.read_bytes()) for p in dst.glob("*.tar")}

    with pytest.raises(DatasetFormatError, match=rf"without the images' source names.*fastssl-convert {src} {dst} "
                                                  r"--add-names"):
        load_names(dst, "train")
    assert main([str(src), str(dst), "--add-names"]) == 0
    assert "no image was re-encoded" in capsys.readouterr().out
    assert {split: load_names(dst, split) for split in ("train", "val")} == expected
    assert {p.name: (p.stat().st_ino, p.read_bytes()) for p in dst.glob("*.tar")} == shards  # untouched
    assert main(["--verify", str(dst)]) == 0
    assert main([str(src), str(dst), "--add-names"]) == 0  # a second time: nothing to do


def test_add_names_refuses_a_source_that_changed_since_the_conversion(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "out"
    _tree(src)
    convert(src, dst, workers=0, progress=False)
    manifest = json.loads((dst / MANIFEST).read_text())
    manifest.pop("names")
    (dst / MANIFEST).write_text(json.dumps(manifest))
    (src / "train" / "blue" / "blue_000.jpg").unlink()  # one image fewer: the order no longer lines up
    assert main([str(src), str(dst), "--add-names"]) == 2
    err = capsys.readouterr().err
    assert "gives 14 images where" in err and "holds 15" in err
    assert "names" not in load_manifest(dst)

    # Same count, other content: a file moved to another class folder is caught by its label.
    _tree(src)
    (src / "train" / "blue" / "blue_001.png").rename(src / "train" / "green" / "moved.png")
    (src / "train" / "green" / "green_001.png").rename(src / "train" / "blue" / "moved.png")
    assert main([str(src), str(dst), "--add-names"]) == 2
    assert "stores an image of class" in capsys.readouterr().err and "names" not in load_manifest(dst)
