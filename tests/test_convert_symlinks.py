"""fastssl-convert and symlinks in an ImageFolder (issue 17, point 1): each real image file is converted once,
under the class whose folder holds it; a link into another class folder, or above the class folders, is
reported and not followed; links to storage outside the dataset keep working."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from fastssl.convert import convert
from pipelines.formats import iter_samples, load_manifest, shard_paths


def _images(folder: Path, prefix: str, n: int, seed: int) -> dict[bytes, str]:
    """``n`` distinct small JPEGs (stored byte for byte by the converter) in ``folder``; {bytes: file name}."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        path = folder / f"{prefix}{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(path, "JPEG", quality=90)
        out[path.read_bytes()] = path.name
    return out


def _convert(src: Path, dst: Path) -> dict:
    convert(src, dst, workers=0, progress=False)
    return load_manifest(dst)


def _stored(dst: Path, split: str = "train") -> list[tuple[bytes, str]]:
    """(JPEG bytes, class name) of every stored sample of ``split``."""
    manifest = load_manifest(dst)
    return [(jpeg, manifest["classes"][label]) for path in shard_paths(dst, split, manifest)
            for _, jpeg, label in iter_samples(path)]


def _skipped(manifest: dict) -> dict[str, str]:
    return {item["path"]: item["reason"] for item in manifest["skipped"]}


def _assert_once_each(dst: Path, expected: dict[bytes, str], split: str = "train") -> None:
    stored = _stored(dst, split)
    assert len(stored) == len(expected), f"{len(stored)} samples stored for {len(expected)} real files"
    assert dict(stored) == expected  # every real file, under the class whose folder holds it


def test_a_link_to_the_dataset_root_inside_a_class_folder_is_reported_and_not_followed(tmp_path):
    """The issue's case: cat/ holds ``all -> ..``; today dog's and owl's images are written again as cats."""
    src = tmp_path / "src"
    expected = {}
    for k, cls in enumerate(("cat", "dog", "owl")):
        expected |= dict.fromkeys(_images(src / cls, cls, 8, k), cls)
    os.symlink("..", src / "cat" / "all")
    manifest = _convert(src, tmp_path / "out")
    _assert_once_each(tmp_path / "out", expected)
    assert manifest["splits"]["train"]["class_counts"] == [8, 8, 8]
    reason = _skipped(manifest)["cat/all/"]
    assert reason.startswith("symlink to ..: ") and "above the class folders" in reason and "not followed" in reason


def test_links_into_another_class_folder_are_reported_and_not_followed(tmp_path):
    src = tmp_path / "src"
    expected = dict.fromkeys(_images(src / "cat", "c", 4, 0), "cat")
    expected |= dict.fromkeys(_images(src / "dog", "d", 4, 1), "dog")
    expected |= dict.fromkeys(_images(src / "dog" / "puppies", "p", 2, 2), "dog")
    os.symlink("../dog", src / "cat" / "borrowed")  # a folder link into another class
    os.symlink("../dog/d0.jpg", src / "cat" / "stolen.jpg")  # a file link into another class
    expected |= dict.fromkeys(_images(src / "owl", "o", 3, 3), "owl")
    os.symlink("../dog/puppies", src / "owl" / "deep")  # into a sub-folder of another class
    manifest = _convert(src, tmp_path / "out")
    _assert_once_each(tmp_path / "out", expected)
    skipped = _skipped(manifest)
    assert set(skipped) == {"cat/borrowed/", "cat/stolen.jpg", "owl/deep/"}
    assert all("leads into the class folder dog/" in r and r.endswith("not followed") for r in skipped.values())
    assert skipped["cat/stolen.jpg"].startswith("symlink to ../dog/d0.jpg: ")


def test_links_to_storage_outside_the_dataset_keep_their_class(tmp_path):
    """Cluster layouts: a class folder that is itself a link to storage elsewhere, a linked sub-folder and a
    linked file, all outside SRC: their images belong to the class that links them."""
    store, src = tmp_path / "store", tmp_path / "src"
    expected = dict.fromkeys(_images(store / "cats", "c", 4, 0), "cat")
    expected |= dict.fromkeys(_images(src / "dog", "d", 3, 1), "dog")
    expected |= dict.fromkeys(_images(store / "more_dogs", "m", 2, 2), "dog")
    expected |= dict.fromkeys(_images(store / "single", "s", 1, 3), "dog")
    os.symlink(store / "cats", src / "cat")
    os.symlink(store / "more_dogs", src / "dog" / "more")
    os.symlink(store / "single" / "s0.jpg", src / "dog" / "one.jpg")
    manifest = _convert(src, tmp_path / "out")
    _assert_once_each(tmp_path / "out", expected)
    assert manifest["classes"] == ["cat", "dog"] and manifest["skipped"] == []


def test_a_file_reached_twice_is_converted_once_at_its_plain_path(tmp_path):
    src, store = tmp_path / "src", tmp_path / "store"
    expected = dict.fromkeys(_images(src / "cat", "c", 3, 0), "cat")
    expected |= dict.fromkeys(_images(src / "cat" / "zz_real", "z", 2, 1), "cat")
    expected |= dict.fromkeys(_images(src / "dog", "d", 2, 2), "dog")
    expected |= dict.fromkeys(_images(store / "shared", "s", 2, 3), "cat")
    os.symlink("c0.jpg", src / "cat" / "a_dup.jpg")  # sorted before its target
    os.symlink("zz_real", src / "cat" / "aa_view")  # a second path to a folder of the same class
    os.symlink(store / "shared", src / "cat" / "ext")
    os.symlink(store / "shared", src / "dog" / "ext")  # two classes link one folder: converted once, first class
    manifest = _convert(src, tmp_path / "out")
    _assert_once_each(tmp_path / "out", expected)
    assert _skipped(manifest) == {
        "cat/a_dup.jpg": "the same file as cat/c0.jpg, converted there once",
        "cat/aa_view/": "the same folder as cat/zz_real/, already converted: not entered again",
        "dog/ext/": "the same folder as cat/ext/, already converted: not entered again",
    }


def test_a_class_folder_that_links_to_another_class_or_to_the_root_is_left_out(tmp_path):
    src = tmp_path / "src"
    expected = dict.fromkeys(_images(src / "cat", "c", 3, 0), "cat")
    expected |= dict.fromkeys(_images(src / "dog", "d", 3, 1), "dog")
    os.symlink("cat", src / "kitty")
    os.symlink(".", src / "everything")
    manifest = _convert(src, tmp_path / "out")
    _assert_once_each(tmp_path / "out", expected)
    assert manifest["classes"] == ["cat", "dog"]
    assert _skipped(manifest) == {
        "everything/": "symlink to .: leads to a folder above the class folders; class left out",
        "kitty/": "symlink to cat: the same folder as the class folder cat/; class left out",
    }


def test_a_val_image_linked_to_a_train_image_stays_in_train_only(tmp_path):
    src = tmp_path / "src"
    train = dict.fromkeys(_images(src / "train" / "cat", "c", 3, 0), "cat")
    train |= dict.fromkeys(_images(src / "train" / "dog", "d", 3, 1), "dog")
    val = dict.fromkeys(_images(src / "val" / "cat", "v", 2, 2), "cat")
    val |= dict.fromkeys(_images(src / "val" / "dog", "w", 2, 3), "dog")
    os.symlink("../../train/cat/c1.jpg", src / "val" / "cat" / "leak.jpg")
    manifest = _convert(src, tmp_path / "out")
    _assert_once_each(tmp_path / "out", train, "train")
    _assert_once_each(tmp_path / "out", val, "val")
    assert _skipped(manifest) == {"val/cat/leak.jpg": "symlink to ../../train/cat/c1.jpg: leads into the class folder "
                                                      "train/cat/, whose images are converted there; not followed"}
