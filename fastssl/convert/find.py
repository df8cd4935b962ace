"""Finding the images: the ImageFolder scan or the Fashion-MNIST files, and the plan of each split
(which samples, with which labels, in which order, encoded how)."""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from fastssl.convert.errors import ConvertError
from fastssl.convert.image import _encode_files, _encode_gray_arrays, _Result
from pipelines.formats import SPLITS

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})  # compared lower-cased

FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_FASHION_MNIST_FILES = {"train": "train", "val": "t10k"}  # our split -> file prefix of the IDX files


@dataclass
class _SplitPlan:
    """One split to convert: per-sample names and labels in output order, and how to encode them."""

    name: str
    names: list[str]  # relative path (ImageFolder) or "train/123" (Fashion-MNIST): reports and order
    labels: list[int]
    encode: Callable[[Any], list[_Result]]  # picklable; takes one payload chunk
    payload: Callable[[int, int], Any]  # (start, stop) -> the chunk of work for those samples
    chunk: int  # samples per task sent to a worker


@dataclass
class _Source:
    kind: str
    classes: list[str]
    splits: list[_SplitPlan]
    info: dict = field(default_factory=dict)
    problems: list[dict] = field(default_factory=list)  # found while scanning: reported like skipped files


def mixed_order(labels: Sequence[int], names: Sequence[str], seed: int) -> list[int]:
    """A seeded permutation of ``range(len(labels))`` that spreads every class evenly through the list.

    Loaders hand whole shards to ranks, so each shard must hold every class in about the dataset's
    proportions: a plain shuffle does that only on average, sorted paths not at all. Each class is
    shuffled (by a hash of seed and name) and its members are placed at evenly spaced fractional
    positions (rank + jitter) / class_size; merging all classes by that position interleaves them.
    Hashing, not a library RNG, so the order is the same on every platform and library version.
    """
    by_class: dict[int, list[tuple[bytes, int]]] = {}
    for i, (label, name) in enumerate(zip(labels, names, strict=True)):
        digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
        by_class.setdefault(label, []).append((digest, i))
    keyed: list[tuple[float, str, int]] = []
    for members in by_class.values():
        members.sort()
        n = len(members)
        for rank, (digest, i) in enumerate(members):
            jitter = int.from_bytes(digest[8:16], "little") / 2**64
            keyed.append(((rank + jitter) / n, names[i], i))
    keyed.sort()
    return [i for _, _, i in keyed]


def _apply_order(names: list[str], labels: list[int], seed: int, limit: int | None) -> list[int]:
    order = mixed_order(labels, names, seed)
    if limit is not None:
        order = order[:limit]  # after mixing, so a subset still holds every class
    return order


def _walk_images(top: str, src: Path, problems: list[tuple[str, str]], ignored: list[int]) -> Iterator[str]:
    """Relative posix paths of the image files under ``top``, sorted, following symlinks.

    Directory symlinks are followed but each real directory is entered once, so a symlink loop ends
    (and is reported) instead of recursing until the path is too long. Unlistable folders are
    reported, never fatal. ``problems`` receives ``(relative path, reason)``; ``ignored[0]`` counts the
    other files.
    """
    seen: set[tuple[int, int]] = set()

    def rel(path: str) -> str:
        return Path(path).relative_to(src).as_posix()

    def walk(folder: str) -> Iterator[str]:
        try:
            st = os.stat(folder)
            key = (st.st_dev, st.st_ino)
            if key in seen:
                problems.append((rel(folder) + "/", "symlink loop: folder already visited, not entered again"))
                return
            seen.add(key)
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            problems.append((rel(folder) + "/", f"cannot list folder: {e.strerror or e}"))
            return
        subdirs = []
        for entry in entries:
            # Hidden entries are editor/OS droppings (.DS_Store, macOS "._x.jpg" forks), not data.
            if entry.name.startswith("."):
                ignored[0] += 1
                continue
            try:
                is_dir = entry.is_dir()  # follows symlinks; False for a dangling or looping link
            except OSError:
                is_dir = False
            if is_dir:
                subdirs.append(entry.path)
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                yield rel(entry.path)  # unreadable or looping files are reported when read
            else:
                ignored[0] += 1
        for sub in subdirs:
            yield from walk(sub)

    # Files first, then sub-folders: the order os.walk gave before, so outputs stay the same.
    return walk(top)


def _scan_imagefolder(src: Path) -> tuple[dict[str, list[tuple[str, str]]], str, int, list[dict]]:
    """Find image files per split: ``{split: [(relative posix path, class name)]}``, layout, ignored count,
    and the problems found while scanning (``{"split", "path", "reason"}``: empty class folders,
    symlink loops, unlistable folders)."""
    if (src / "train").is_dir():
        layout = "train/val"
        roots = {"train": src / "train"}
        if (src / "val").is_dir():
            roots["val"] = src / "val"
    else:
        layout = "flat"
        roots = {"train": src}
    found: dict[str, list[tuple[str, str]]] = {}
    problems: list[dict] = []
    ignored = 0
    for split, root in roots.items():
        files: list[tuple[str, str]] = []
        try:
            entries = sorted(os.scandir(root), key=lambda e: e.name)
        except OSError as e:
            raise ConvertError(f"{root}: cannot list ({e.strerror or e})") from e
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                is_dir = entry.is_dir()
            except OSError:  # a symlink loop at the top: not a class folder
                is_dir = False
            if not is_dir:
                ignored += 1  # files beside the class folders have no class
                continue
            found_here: list[tuple[str, str]] = []
            folder_problems: list[tuple[str, str]] = []
            counter = [0]
            for rel in _walk_images(entry.path, src, folder_problems, counter):
                found_here.append((rel, entry.name))
            ignored += counter[0]
            problems += [{"split": split, "path": path, "reason": reason} for path, reason in folder_problems]
            if not found_here:
                problems.append({"split": split, "path": Path(entry.path).relative_to(src).as_posix() + "/",
                                 "reason": "empty class folder: no image files; class left out"})
            files += found_here
        found[split] = files
    return found, layout, ignored, problems


def _plan_imagefolder(
    src: Path, max_side: int, quality: int, seed: int, limits: dict[str, int | None], max_pixels: int
) -> _Source:
    if not src.exists():
        raise ConvertError(
            f"{src}: no such file or directory (SRC is an ImageFolder tree or the name {FASHION_MNIST!r})"
        )
    if not src.is_dir():
        raise ConvertError(f"{src}: not a directory (SRC is an ImageFolder tree or the name {FASHION_MNIST!r})")
    found, layout, ignored, problems = _scan_imagefolder(src)
    exts = "/".join(sorted(IMAGE_EXTENSIONS))
    train_root = src / "train" if layout == "train/val" else src
    if not found["train"]:
        raise ConvertError(f"{train_root}: no images found (expected one folder per class holding {exts} files)")
    notes = []
    if "val" in found and not found["val"]:
        notes.append(f"{src / 'val'}: no images found; no val split written")
        del found["val"]
    # Labels index the union of class folders of all splits, so train and val agree on every label.
    classes = sorted({cls for files in found.values() for _, cls in files})
    class_index = {c: i for i, c in enumerate(classes)}
    train_classes = {cls for _, cls in found["train"]}
    extra = [c for c in classes if c not in train_classes]
    if extra:
        notes.append(f"classes only in val (no train images): {', '.join(extra)}")

    plans = []
    for split, files in found.items():
        names = [rel for rel, _ in files]
        labels = [class_index[cls] for _, cls in files]
        order = _apply_order(names, labels, seed, limits.get(split))
        names = [names[i] for i in order]
        labels = [labels[i] for i in order]
        paths = [str(src / rel) for rel in names]
        plans.append(
            _SplitPlan(
                name=split,
                names=names,
                labels=labels,
                encode=partial(_encode_files, max_side=max_side, quality=quality, max_pixels=max_pixels),
                payload=lambda a, b, paths=paths: paths[a:b],
                chunk=16,
            )
        )
    info = {"kind": "imagefolder", "path": str(src.resolve()), "layout": layout, "ignored_files": ignored}
    if notes:
        info["notes"] = notes
    return _Source("imagefolder", classes, plans, info, problems)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file of unsigned bytes (the MNIST format; gzip or plain) into an array of its shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ConvertError(f"{path}: cannot read ({e})") from e
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ConvertError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != int(np.prod(dims)):
        raise ConvertError(f"{path}: holds {len(data) - header} bytes of data, header says {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastssl"


def _load_fashion_mnist() -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict]:
    """``{split: (images (N, 28, 28) uint8, labels (N,) uint8)}`` and where they came from."""
    files = {
        split: (
            FASHION_MNIST_DIR / f"{prefix}-images-idx3-ubyte.gz",
            FASHION_MNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz",
        )
        for split, prefix in _FASHION_MNIST_FILES.items()
    }
    if all(p.is_file() for pair in files.values() for p in pair):
        data = {split: (read_idx(img), read_idx(lbl)) for split, (img, lbl) in files.items()}
        info = {"origin": "debian", "files": sorted(str(p) for pair in files.values() for p in pair)}
    else:
        cache = _cache_dir()
        try:
            from torchvision.datasets import FashionMNIST  # heavy import: only on this fallback path

            data = {}
            for split in _FASHION_MNIST_FILES:
                ds = FashionMNIST(str(cache), train=split == "train", download=True)
                data[split] = (ds.data.numpy(), ds.targets.numpy().astype(np.uint8))
        except Exception as e:  # offline, proxy, no torchvision: one clear message
            raise ConvertError(
                f"Fashion-MNIST not found in {FASHION_MNIST_DIR} and downloading it into {cache} failed "
                f"({type(e).__name__}: {e}); install it with `apt-get install dataset-fashion-mnist`"
            ) from e
        info = {"origin": "torchvision", "files": [str(cache / "FashionMNIST")]}
    for split, (images, labels) in data.items():
        if images.ndim != 3 or len(images) != len(labels) or int(labels.max(initial=0)) >= 10:
            raise ConvertError(
                f"Fashion-MNIST {split}: {images.shape} images vs {labels.shape} labels; files are corrupt"
            )
    return data, info


def _plan_fashion_mnist(quality: int, seed: int, limits: dict[str, int | None]) -> _Source:
    data, info = _load_fashion_mnist()
    plans = []
    for split, (images, labels_arr) in data.items():
        names = [f"{split}/{i}" for i in range(len(labels_arr))]
        labels = labels_arr.tolist()
        order = np.asarray(_apply_order(names, labels, seed, limits.get(split)), dtype=np.int64)
        images = images[order]  # a copy in output order, so chunks are contiguous slices
        plans.append(
            _SplitPlan(
                name=split,
                names=[names[i] for i in order],
                labels=[labels[i] for i in order],
                encode=partial(_encode_gray_arrays, quality=quality),
                payload=lambda a, b, images=images: images[a:b],
                chunk=2000,
            )
        )
    return _Source(FASHION_MNIST, list(FASHION_MNIST_CLASSES), plans, {"kind": FASHION_MNIST, **info})


def _parse_limits(limit: int | dict[str, int] | None) -> dict[str, int | None]:
    if limit is None:
        return {}
    if isinstance(limit, int):
        limits = {split: limit for split in SPLITS}
    else:
        limits = dict(limit)
    for split, n in limits.items():
        if split not in SPLITS:
            raise ConvertError(f"limit: unknown split {split!r} (splits: {', '.join(SPLITS)})")
        if n is not None and n < 1:
            raise ConvertError(f"limit for {split}: must be >= 1, got {n}")
    return limits
