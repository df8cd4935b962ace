"""Labelled subsets of fine-tuning: the shipped canonical ImageNet lists select exactly their images in an
ImageNet-style folder converted by fastssl-convert, absent names fail with the names, and elsewhere the
class-balanced subset is deterministic, balanced and written so that it can be given back."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_dataset
from PIL import Image

from fastssl.convert import convert
from fastssl.eval.subsets import (
    CANONICAL,
    SubsetError,
    balanced_subset,
    canonical_names,
    choose_subset,
    imagenet_classes,
    match_names,
    write_subset_list,
)
from pipelines.formats import DatasetFormatError, load_names, split_labels


def _jpeg(colour=(120, 30, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, "JPEG")
    return buf.getvalue()


def test_the_shipped_lists_are_the_canonical_ones_read_offline():
    for label, (_, count, _) in CANONICAL.items():
        names = canonical_names(label)
        assert len(names) == len(set(names)) == count  # the sha256 of the decompressed list is checked on reading
        assert all(re.fullmatch(r"n\d{8}_\d+\.JPEG", n) for n in names)
    assert len(imagenet_classes()) == 1000
    assert {n.split("_")[0] for n in canonical_names("10%")} == set(imagenet_classes())
    shared = Path("/work/shared/data/imagenet_subsets/1percent.txt")  # the source copy, where this machine has it
    if shared.is_file():
        assert list(canonical_names("1%")) == shared.read_text().split()


@pytest.fixture(scope="module")
def imagenet_style(tmp_path_factory) -> tuple[Path, Path]:
    """An ImageNet-style folder train/<wnid>/<wnid>_<n>.JPEG holding every image of the canonical 1 % list plus one
    unlisted image per class (and a val split), converted by fastssl-convert. Returns (SRC, converted)."""
    root = tmp_path_factory.mktemp("imagenet_style")
    jpeg = _jpeg()
    for n in canonical_names("1%"):
        wnid = n.split("_")[0]
        (root / "src" / "train" / wnid).mkdir(parents=True, exist_ok=True)
        (root / "src" / "train" / wnid / n).write_bytes(jpeg)
    for wnid in imagenet_classes():
        (root / "src" / "train" / wnid / f"{wnid}_999999999.JPEG").write_bytes(jpeg)  # in no list
        (root / "src" / "val" / wnid).mkdir(parents=True)
        (root / "src" / "val" / wnid / f"ILSVRC2012_val_{wnid}.JPEG").write_bytes(jpeg)
    convert(root / "src", root / "data", workers=2, progress=False)
    return root / "src", root / "data"


def test_the_network_guard_sees_a_fetch(no_network):
    import urllib.request

    with pytest.raises(OSError):
        urllib.request.urlopen("https://raw.githubusercontent.com/google-research/simclr/master/imagenet_subsets/"
                               "1percent.txt", timeout=1)
    assert no_network  # the attempt was recorded (the fixture would fail this test at teardown: cleared here)
    no_network.clear()


def test_an_imagenet_style_folder_selects_exactly_the_canonical_1pct_images(imagenet_style, no_network):
    _, data = imagenet_style
    subset = choose_subset(data, "1%")
    assert subset.kind == "imagenet-1%"
    listed = set(canonical_names("1%"))
    assert len(subset.ids) == len(listed) == 12811
    assert {name.rsplit("/", 1)[-1] for name in subset.names} == listed  # exactly the listed, no unlisted one
    names, labels = load_names(data, "train"), split_labels(data, "train")
    assert [names[i] for i in subset.ids] == subset.names
    classes = sorted(imagenet_classes())
    for i in subset.ids[:200]:
        assert names[i].split("/")[1] == classes[labels[i]]  # its folder's class: the label the loader yields
    assert subset.total == 12811 + 1000


def test_a_canonical_list_naming_absent_images_fails_with_their_names(imagenet_style, tmp_path):
    src, _ = imagenet_style
    gone = sorted(canonical_names("1%"))[:3]
    copy = tmp_path / "src"
    shutil.copytree(src, copy)
    for n in gone:
        (copy / "train" / n.split("_")[0] / n).unlink()
    convert(copy, tmp_path / "data", workers=2, progress=False)
    with pytest.raises(SubsetError, match=r"3 of the 12811 listed images are not in the dataset: ") as err:
        choose_subset(tmp_path / "data", "1%")
    assert all(n in str(err.value) for n in gone)


def test_a_name_list_file_selects_its_images_by_file_name_or_path(imagenet_style, tmp_path):
    _, data = imagenet_style
    names = load_names(data, "train")
    wanted = [names[5].rsplit("/", 1)[-1], names[17], names[40].rsplit("/", 1)[-1]]
    listing = tmp_path / "mine.txt"
    listing.write_text("# my three images\n\n" + "\n".join(wanted) + f"\n{wanted[0]}\n")  # a repeat counts once
    subset = choose_subset(data, str(listing))
    assert subset.kind == "file" and subset.ids.tolist() == [5, 17, 40]
    listing.write_text("\n".join(wanted + ["n01440764_0.JPEG", "train/n01440764/nope.JPEG"]))
    with pytest.raises(SubsetError, match=r"2 of the 5 listed images are not in the dataset: n01440764_0.JPEG, "
                                          r"train/n01440764/nope.JPEG"):
        choose_subset(data, str(listing))


def test_a_file_name_shared_by_two_images_must_be_listed_with_its_folder():
    names = ["train/a/x.jpg", "train/b/x.jpg", "train/b/y.jpg"]
    assert match_names(["train/b/x.jpg", "y.jpg"], names, "here").tolist() == [1, 2]
    with pytest.raises(SubsetError, match=r"the file name x.jpg belongs to several images; list it with its folder "
                                          r"\(e.g. train/a/x.jpg\)"):
        match_names(["x.jpg"], names, "here")


def test_the_balanced_subset_is_even_per_class_and_a_function_of_the_names_only():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=6000)
    names = [f"train/{i}" for i in range(6000)]
    ids, notes = balanced_subset(names, labels, 10, 0.01, seed=0)
    assert len(ids) == 60 and np.bincount(labels[ids], minlength=10).tolist() == [6] * 10 and not notes
    # The same images whatever the stored order (another conversion seed), other images with another seed.
    perm = rng.permutation(6000)
    ids_perm, _ = balanced_subset([names[i] for i in perm], labels[perm], 10, 0.01, seed=0)
    assert sorted(names[perm[i]] for i in ids_perm) == sorted(names[i] for i in ids)
    assert set(balanced_subset(names, labels, 10, 0.01, seed=1)[0].tolist()) != set(ids.tolist())
    # 65 images over 10 classes: 6 each and one more for 5 of them; a class short of images is noted.
    ids, _ = balanced_subset(names, labels, 10, 65 / 6000)
    assert sorted(np.bincount(labels[ids], minlength=10).tolist()) == [6] * 5 + [7] * 5
    few = np.where(labels == 3, 3, labels)
    few[np.flatnonzero(few == 3)[2:]] = 4  # class 3 keeps 2 images
    ids, notes = balanced_subset(names, few, 10, 0.01)
    assert np.bincount(few[ids], minlength=10)[3] == 2 and notes == [
        "class 3: 2 images, fewer than the 6 a balanced subset wants"]


def test_a_balanced_subset_is_written_and_selects_the_same_images_again(tiny_gray_dataset, tmp_path):
    names = {"train": [f"train/{i}" for i in range(96)], "val": [f"val/{i}" for i in range(32)]}
    data = tmp_path / "gray"
    shutil.copytree(tiny_gray_dataset, data)
    from pipelines.formats import load_manifest, write_manifest, write_names

    manifest = load_manifest(data)
    manifest["names"] = {split: write_names(data, split, n) for split, n in names.items()}
    write_manifest(data, {k: v for k, v in manifest.items() if k not in ("format", "version")})
    subset = choose_subset(data, "10%", seed=3)
    assert subset.kind == "balanced" and len(subset.ids) == 10 and subset.per_class == [1] * 10
    listing = write_subset_list(tmp_path / "out" / "subset.txt", subset, data)
    text = listing.read_text()
    assert text.startswith("# fastssl labelled subset: 10 of the 96 train images") and "seed 3" in text
    again = choose_subset(data, str(listing))
    assert again.ids.tolist() == subset.ids.tolist() and again.names == subset.names


def test_a_dataset_converted_without_names_says_how_to_add_them(tmp_path):
    jpeg = _jpeg()
    data = write_dataset(tmp_path / "old", ["a", "b"], {"train": [[(jpeg, 0), (jpeg, 1)]]})
    with pytest.raises(DatasetFormatError, match=r"without the images' source names.*--add-names"):
        choose_subset(data, "1%")
    with pytest.raises(SubsetError, match=r"--labels 3x: neither a percentage"):
        choose_subset(data, "3x")
