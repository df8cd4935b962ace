"""fastssl-convert: turn an ImageFolder tree or Fashion-MNIST into the shard format of ``pipelines.formats``.

    fastssl-convert SRC DST [--max-side 512] [--quality 95] [--shard-size 10000] [--workers N]
                            [--seed 0] [--limit N | --limit train=N,val=M] [--overwrite] [--no-progress]
                            [--formats wds,ffcv [--ffcv-max-side 512] [--ffcv-quality 90]]
                            [--max-pixels N] [--verify]
    fastssl-convert --verify DST

SRC is an ImageFolder tree (one folder per class; optional ``train/`` and ``val/`` sub-splits) or the
name ``fashion-mnist``. Every sample becomes a JPEG: a JPEG that already fits ``--max-side`` is stored
byte for byte, anything else is decoded, made RGB (or kept grayscale), shrunk so its longer side is
``--max-side`` and encoded at ``--quality`` (CMYK, palette and alpha images become RGB on white,
16-bit images keep their high byte, EXIF orientation is applied). Files that cannot be used are skipped
and listed with a reason in the summary and in ``manifest.json`` (``"skipped"``); they never stop the
run: truncated or corrupt data, empty files, non-images with an image extension, files declaring more
than ``--max-pixels`` pixels (decompression bombs, rejected before decoding), unreadable files. Empty
class folders, symlink loops (each real folder is entered once) and unlistable folders are listed there too.

A kill leaves no partial file under a final name: a shard is written to a hidden temp name and renamed
when complete, and ``manifest.json`` comes last. A hidden progress journal records each finished shard's
sha256; rerunning the same command keeps the finished shards that still verify and converts the rest,
with the same bytes as an uninterrupted run. ``--verify`` rereads every shard, index and .beton against
the manifest (sizes, sha256, sample counts) and exits 1 naming the first bad file; a write failure
(disk full, I/O error) also exits 1 naming the file; user errors exit 2.

The output is a pure function of the input and the settings (same bytes on every run, whatever
``--workers``), so a converted dataset can be checked by its manifest's sha256 sums.

``--formats wds,ffcv`` also writes each split as one FFCV file, ``<split>.beton`` (for
``data.backend=ffcv``), from the shards just written: same samples in the same order, re-encoded as
JPEG with the longer side at most ``--ffcv-max-side`` at ``--ffcv-quality``. Each is written to a
hidden temp name and renamed when complete. FFCV's writer places images on pages in the order its
worker processes finish them, so with ``--workers`` > 1 a .beton's bytes (not its images) can differ
between runs; the manifest records each file's size and sha256.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import signal
import struct
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipelines.formats import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    DatasetFormatError,
    ShardWriter,
    atomic_write_bytes,
    beton_name,
    iter_samples,
    load_manifest,
    sha256_file,
    write_manifest,
)

PROG = "fastssl-convert"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})  # compared lower-cased
DEFAULT_MAX_SIDE = 512
DEFAULT_QUALITY = 95
# Decompression-bomb guard: a file declaring more pixels is skipped before any decode. Pillow's own
# error threshold (2 x Image.MAX_IMAGE_PIXELS), which also applies to larger caps.
DEFAULT_MAX_PIXELS = 178_956_970
DEFAULT_SHARD_SIZE = 10_000  # Fashion-MNIST: 6 train shards + 1 val shard, enough to spread over ranks
FORMATS = ("wds", "ffcv")  # wds: the shards every backend's manifest points at; ffcv: plus <split>.beton
DEFAULT_FFCV_MAX_SIDE = 512
DEFAULT_FFCV_QUALITY = 90
FFCV_MAX_SIDE_LIMIT = 65535  # FFCV stores image sides as uint16
FFCV_INSTALL = "pip install -e '.[ffcv]' (with the apt packages pkg-config libturbojpeg0-dev libopencv-dev)"

FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_FASHION_MNIST_FILES = {"train": "train", "val": "t10k"}  # our split -> file prefix of the IDX files

# Progress journal of an unfinished conversion (hidden; removed once manifest.json is written): the
# shards finished so far with their sha256, so a rerun after a kill keeps them instead of re-encoding.
JOURNAL = ".fastssl-convert-progress.json"

# Files this tool writes into DST; anything else there is left alone.
_SPLIT_ALTERNATIVES = "|".join(SPLITS)
_OUTPUT_FILE = re.compile(rf"(?:{_SPLIT_ALTERNATIVES})(?:-\d{{5}}\.(?:tar|idx)|\.beton)")
_OUTPUT_TEMP = re.compile(
    rf"\.(?:(?:{_SPLIT_ALTERNATIVES})(?:-\d{{5}}\.(?:tar|idx)|\.beton)|{re.escape(JOURNAL)})\..*tmp"
)

# EXIF orientation -> the transpose that makes the pixels upright (tag 0x0112).
_EXIF_ORIENTATION = 0x0112
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})

# What a worker says about one sample: how it was stored, or (jpeg=None) why it was skipped.
KEPT, REENCODED, RESIZED = "kept", "reencoded", "resized"
_Result = tuple[bytes | None, str]


class ConvertError(Exception):
    """A user error (bad SRC, DST already converted, bad option): main() prints it without a traceback."""

    exit_code = 2


class OutputError(ConvertError):
    """Writing DST failed (disk full, I/O error): the message names the file; exit status 1."""

    exit_code = 1


class VerifyError(ConvertError):
    """``--verify`` found a file that disagrees with the manifest; the message names it; exit status 1."""

    exit_code = 1


# --------------------------------------------------------------------------------------------------
# Per-sample work, run in worker processes (module-level functions so they pickle by name).


def encode_image_bytes(data: bytes, max_side: int, quality: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> _Result:
    """Turn the bytes of one image file into the JPEG to store.

    Returns ``(jpeg, how)`` with ``how`` in {"kept", "reencoded", "resized"}, or ``(None, reason)`` when
    the bytes are not a decodable image or declare more than ``max_pixels`` pixels. Never raises for bad input.
    """
    if not data:
        return None, "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():
            # Sizes between Pillow's warning and error thresholds are checked against max_pixels below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        return None, f"too many pixels (possible decompression bomb): {e}"
    except UnidentifiedImageError:
        # PIL's message names the BytesIO object by address; keep reasons deterministic.
        return None, "not an image (no image format recognised)"
    except Exception as e:  # any decoder failure means "skip this file"
        return None, f"cannot read image header: {type(e).__name__}: {e}"
    width, height = im.size
    if width * height > max_pixels:
        im.close()
        return None, (
            f"too many pixels (possible decompression bomb): {width} x {height} = {width * height:,d} "
            f"> --max-pixels {max_pixels:,d}"
        )
    try:
        with im, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return _encode_opened(im, data, max_side, quality)
    except Exception as e:  # idem: never let one bad file stop the run
        return None, f"cannot decode: {type(e).__name__}: {e}"


def _encode_opened(im: Image.Image, data: bytes, max_side: int, quality: int) -> _Result:
    width, height = im.size
    orientation = im.getexif().get(_EXIF_ORIENTATION, 1) if im.format in ("JPEG", "WEBP", "PNG") else 1
    fits = max(width, height) <= max_side
    if im.format == "JPEG" and fits and im.mode in ("RGB", "L") and orientation in (0, 1):
        im.load()  # a full decode: truncated or corrupt files must be caught here, not in a loader
        return data, KEPT

    target = _fit(width, height, max_side)
    if not fits and im.format == "JPEG":
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale while staying >= 2x the target: much faster for
        # big photos, and the Lanczos pass below still sees enough pixels for a sharp result.
        im.draft(None, (2 * target[0], 2 * target[1]))
    im.load()
    im = _to_rgb_or_gray(im)
    if im.size != target:
        im = im.resize(target, Image.Resampling.LANCZOS)
    if orientation in _UPRIGHT:
        # Loaders disagree on whether to honour EXIF orientation; storing upright pixels without the
        # tag makes every backend see the same image.
        im = im.transpose(_UPRIGHT[orientation])
    return _jpeg(im, quality), (REENCODED if fits else RESIZED)


def _fit(width: int, height: int, max_side: int) -> tuple[int, int]:
    """Size with the longer side at most ``max_side``, aspect ratio kept (each side >= 1)."""
    if max(width, height) <= max_side:
        return width, height
    if width >= height:
        return max_side, max(1, round(height * max_side / width))
    return max(1, round(width * max_side / height)), max_side


def _to_rgb_or_gray(im: Image.Image) -> Image.Image:
    """Mode RGB, or L for single-channel images; transparency is flattened onto white."""
    if im.mode in ("RGB", "L"):
        return im
    if im.mode.startswith("I;16"):
        # 16-bit grayscale (e.g. PNG): keep the high byte; convert("L") would clip everything above 255.
        return Image.fromarray((np.asarray(im, dtype=np.uint16) >> 8).astype(np.uint8), "L")
    gray = im.mode in _GRAY_MODES
    has_alpha = im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (im.mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        out = Image.new("L" if gray else "RGB", im.size, "white")
        out.paste(rgba.convert(out.mode), mask=rgba.getchannel("A"))
        return out
    return im.convert("L" if gray else "RGB")


def _jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    # Explicit 4:2:0 and no optimize pass: the bytes then depend only on libjpeg, not on Pillow defaults.
    im.save(buf, "JPEG", quality=quality, subsampling="4:2:0" if im.mode == "RGB" else 0, optimize=False)
    return buf.getvalue()


def _read_source(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _encode_files(
    paths: Sequence[str], max_side: int, quality: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[_Result]:
    out: list[_Result] = []
    for path in paths:
        try:
            data = _read_source(path)
        except OSError as e:  # permission denied, symlink loop, vanished, I/O error: skip, named
            out.append((None, f"cannot read file: {e.strerror or e}"))
            continue
        out.append(encode_image_bytes(data, max_side, quality, max_pixels))
    return out


def _encode_gray_arrays(images: np.ndarray, quality: int) -> list[_Result]:
    """(N, H, W) uint8 -> one grayscale JPEG per image."""
    return [(_jpeg(Image.fromarray(a, "L"), quality), REENCODED) for a in images]


# --------------------------------------------------------------------------------------------------
# Planning: what goes into each split, in which order.


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


# --------------------------------------------------------------------------------------------------
# Running the plan.


def _ordered_results(
    plan: _SplitPlan, pool: ProcessPoolExecutor | None, workers: int, start: int = 0
) -> Iterator[_Result]:
    """Results of the samples ``start:`` of ``plan`` in plan order; at most a few chunks in flight (bounded memory)."""
    n = len(plan.names)
    starts = range(start, n, plan.chunk)
    if pool is None:
        for a in starts:
            yield from plan.encode(plan.payload(a, min(a + plan.chunk, n)))
        return
    pending: deque[Future] = deque()
    window = 4 * workers
    for a in starts:
        pending.append(pool.submit(plan.encode, plan.payload(a, min(a + plan.chunk, n))))
        if len(pending) >= window:
            yield from pending.popleft().result()
    while pending:
        yield from pending.popleft().result()


@dataclass
class _Journal:
    """The progress file of one conversion: after each finished shard, every split's finished shards.

    Each entry: ``{"shard": ShardInfo fields, "stop": plan position after its last sample, "skipped": files
    skipped since the previous shard, "class_counts": [...], "stored": {...}}``. A rerun with the same
    fingerprint (source listing + settings) keeps the entries whose files still verify and resumes after them.
    """

    path: Path
    fingerprint: str
    splits: dict[str, list[dict]]
    resumed: int = 0  # shards kept from an interrupted run

    @classmethod
    def open(cls, dst: Path, fingerprint: str) -> _Journal:
        path = dst / JOURNAL
        splits: dict[str, list[dict]] = {}
        try:
            data = json.loads(path.read_text())
            if data.get("fingerprint") == fingerprint:
                splits = data["splits"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # none, unreadable or from other settings: start afresh
        return cls(path, fingerprint, splits)

    def resumable(self, dst: Path, split: str) -> list[dict]:
        """The leading entries of ``split`` whose shard and index still match their sha256 and size."""
        kept = []
        for entry in self.splits.get(split, []):
            shard = entry["shard"]
            tar = dst / shard["name"]
            try:
                ok = (tar.stat().st_size == shard["bytes"] and tar.with_suffix(".idx").is_file()
                      and sha256_file(tar) == shard["sha256"])  # fmt: skip
            except OSError:
                ok = False
            if not ok:
                break  # later shards were numbered after this one: redo from here
            kept.append(entry)
        self.splits[split] = kept
        self.resumed += len(kept)
        return kept

    def record(self, split: str, entry: dict) -> None:
        self.splits.setdefault(split, []).append(entry)
        state = {"fingerprint": self.fingerprint, "splits": self.splits}
        atomic_write_bytes(self.path, json.dumps(state, sort_keys=True).encode())

    def remove(self) -> None:
        if self.path.exists():
            self.path.unlink()


def _convert_split(
    plan: _SplitPlan,
    dst: Path,
    *,
    first_key: int,
    num_classes: int,
    shard_size: int,
    pool: ProcessPoolExecutor | None,
    workers: int,
    progress: bool,
    journal: _Journal,
) -> tuple[dict, list[dict]]:
    from tqdm import tqdm

    done = journal.resumable(dst, plan.name)
    shards: list[dict] = [dict(e["shard"]) for e in done]
    skipped: list[dict] = [item for e in done for item in e["skipped"]]
    class_counts = [sum(e["class_counts"][c] for e in done) for c in range(num_classes)]
    stats = {how: sum(e["stored"][how] for e in done) for how in (KEPT, REENCODED, RESIZED)}
    start = done[-1]["stop"] if done else 0
    key = first_key + sum(s["count"] for s in shards)
    # What the open shard holds, for its journal entry.
    open_skipped: list[dict] = []
    open_counts = [0] * num_classes
    open_stats = dict.fromkeys(stats, 0)
    writer: ShardWriter | None = None
    bar = tqdm(total=len(plan.names), initial=start, desc=plan.name, unit="img", file=sys.stderr,
               disable=not progress, leave=True)  # fmt: skip

    def close_shard(stop: int) -> None:
        nonlocal writer, open_skipped, open_counts, open_stats
        info = vars(writer.close())
        writer = None
        shards.append(info)
        journal.record(plan.name, {"shard": info, "stop": stop, "skipped": open_skipped,
                                   "class_counts": open_counts, "stored": open_stats})  # fmt: skip
        open_skipped, open_counts, open_stats = [], [0] * num_classes, dict.fromkeys(stats, 0)

    try:
        results = _ordered_results(plan, pool, workers, start)
        todo = zip(plan.names[start:], plan.labels[start:], results, strict=True)
        for position, (name, label, (jpeg, how)) in enumerate(todo, start + 1):
            bar.update(1)
            if jpeg is None:
                item = {"split": plan.name, "path": name, "reason": how}
                skipped.append(item)
                open_skipped.append(item)
                continue
            if writer is None:
                writer = ShardWriter(dst, plan.name, len(shards))
            writer.write(f"{key:08d}", jpeg, label)
            key += 1
            class_counts[label] += 1
            open_counts[label] += 1
            stats[how] += 1
            open_stats[how] += 1
            if writer.count >= shard_size:
                close_shard(position)
        if writer is not None:
            close_shard(len(plan.names))
    except BaseException as e:
        target = writer.final if writer is not None else dst / JOURNAL
        if writer is not None:
            with contextlib.suppress(OSError):
                writer.abort()
        if isinstance(e, OSError):
            raise _output_error(e, target) from e
        raise
    finally:
        bar.close()
    count = sum(s["count"] for s in shards)
    return {"count": count, "shards": shards, "class_counts": class_counts, "stored": stats}, skipped


def _output_error(e: OSError, path: Path) -> OutputError:
    """A write failure as a one-line error naming the file (the OS often names none, e.g. for ENOSPC)."""
    name = e.filename if e.filename else path
    return OutputError(f"{name}: cannot write: {e.strerror or e}")


def _prepare_dst(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise ConvertError(f"{dst}: exists and is not a directory")
    manifest = dst / MANIFEST
    if manifest.exists():
        if not overwrite:
            raise ConvertError(f"{dst} already holds a converted dataset ({manifest}); pass --overwrite to replace it")
        # Drop the old manifest first: if this run dies half-way, no manifest points at a mix of
        # old and new shards, and loaders refuse the folder instead of reading it.
        manifest.unlink()
        (dst / JOURNAL).unlink(missing_ok=True)  # a finished dataset has none; never resume into one
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _output_error(e, dst) from e


def _remove_stale_outputs(dst: Path, keep: set[str]) -> None:
    """Delete shards/indexes of an earlier run that this run did not rewrite, and dead temp files."""
    for entry in os.scandir(dst):
        name = entry.name
        stale = _OUTPUT_FILE.fullmatch(name) and name not in keep
        if stale or _OUTPUT_TEMP.fullmatch(name):
            os.unlink(entry.path)


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


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group: let only the parent handle it (abort the open shard,
    # print one line) instead of every worker printing a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    names = formats.split(",") if isinstance(formats, str) else list(formats)
    names = [n.strip().lower() for n in names if n.strip()]
    for n in names:
        if n not in FORMATS:
            raise ConvertError(f"--formats: unknown format {n!r} (formats: {', '.join(FORMATS)})")
    if "wds" not in names:
        raise ConvertError(
            f"--formats must include wds (the shards and manifest every backend reads), got {','.join(names) or '()'}"
        )
    return tuple(f for f in FORMATS if f in names)


def _import_ffcv_writer():
    """``pipelines.ffcv_loader.write_betons``, or a ConvertError saying how to install FFCV."""
    try:
        from pipelines.ffcv_loader import write_betons
    except (ImportError, OSError) as e:  # OSError: ffcv's C library without libturbojpeg / OpenCV
        raise ConvertError(f"--formats ffcv needs FFCV ({type(e).__name__}: {e}); {FFCV_INSTALL}") from e
    return write_betons


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    max_side: int = DEFAULT_MAX_SIDE,
    quality: int = DEFAULT_QUALITY,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int | None = None,
    overwrite: bool = False,
    seed: int = 0,
    limit: int | dict[str, int] | None = None,
    progress: bool = True,
    formats: str | Sequence[str] = ("wds",),
    ffcv_max_side: int = DEFAULT_FFCV_MAX_SIDE,
    ffcv_quality: int = DEFAULT_FFCV_QUALITY,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict:
    """Convert ``src`` (ImageFolder path or ``"fashion-mnist"``) into shards + ``manifest.json`` in ``dst``.

    ``limit`` caps the samples per split (an int for every split, or ``{"train": 500, "val": 200}``),
    taken after class mixing so a subset still holds every class. ``workers`` <= 1 encodes in this
    process. ``formats`` ("wds" or "wds,ffcv"): with ffcv also ``<split>.beton`` per split (see the
    module docstring), its images' longer side at most ``ffcv_max_side``, JPEG quality ``ffcv_quality``.
    ``max_pixels``: files declaring more pixels are skipped unread (decompression bombs).
    A run that was killed resumes: shards finished before the kill that still match their sha256 are
    kept, the rest is converted, and the result is byte-identical to an uninterrupted run.
    Returns the manifest as written. Raises ConvertError for user errors (nothing is
    written to ``dst`` in that case, except on a failure after conversion started) and OutputError
    (a ConvertError) naming the file when writing fails.
    """
    if max_side < 1:
        raise ConvertError(f"--max-side must be >= 1, got {max_side}")
    if not 1 <= quality <= 100:
        raise ConvertError(f"--quality must be in 1..100, got {quality}")
    if shard_size < 1:
        raise ConvertError(f"--shard-size must be >= 1, got {shard_size}")
    if max_pixels < 1:
        raise ConvertError(f"--max-pixels must be >= 1, got {max_pixels}")
    formats = _parse_formats(formats)
    if not 1 <= ffcv_max_side <= FFCV_MAX_SIDE_LIMIT:
        raise ConvertError(f"--ffcv-max-side must be in 1..{FFCV_MAX_SIDE_LIMIT}, got {ffcv_max_side}")
    if not 1 <= ffcv_quality <= 100:
        raise ConvertError(f"--ffcv-quality must be in 1..100, got {ffcv_quality}")
    write_betons = _import_ffcv_writer() if "ffcv" in formats else None
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise ConvertError(f"--workers must be >= 0, got {workers}")
    limits = _parse_limits(limit)
    dst = Path(dst)

    # Plan (and so validate SRC) before touching DST: a typo in SRC must not delete an old manifest.
    if os.fspath(src) == FASHION_MNIST:
        source = _plan_fashion_mnist(quality, seed, limits)
    else:
        source = _plan_imagefolder(Path(src), max_side, quality, seed, limits, max_pixels)
    _prepare_dst(dst, overwrite)
    settings = {
        "max_side": max_side,
        "quality": quality,
        "shard_size": shard_size,
        "seed": seed,
        "limit": {k: v for k, v in limits.items() if v is not None} or None,
        "formats": list(formats),
        "max_pixels": max_pixels,
    }
    journal = _Journal.open(dst, _fingerprint(source, settings))
    try:
        return _convert_planned(source, src, dst, journal, settings, workers, progress, write_betons,
                                ffcv_max_side, ffcv_quality)  # fmt: skip
    except OSError as e:
        raise _output_error(e, dst) from e


def _fingerprint(source: _Source, settings: dict) -> str:
    """sha256 of what decides the output: settings, source, and every split's sample list in order."""
    h = hashlib.sha256(json.dumps({"settings": settings, "source": source.info}, sort_keys=True).encode())
    for plan in source.splits:
        h.update(json.dumps([plan.name, plan.names, plan.labels]).encode())
    return h.hexdigest()


def _convert_planned(source, src, dst, journal, settings, workers, progress, write_betons, ffcv_max_side,
                     ffcv_quality) -> dict:  # fmt: skip

    splits: dict[str, dict] = {}
    skipped: list[dict] = []
    first_key = 0
    pool = ProcessPoolExecutor(workers, initializer=_ignore_sigint) if workers > 1 else None
    try:
        if pool is not None:
            # Start the workers now, before tqdm starts its monitor thread: with the fork start method
            # a child forked from a parent that has threads can deadlock on a lock held by one of them.
            pool.submit(int).result()
        for plan in source.splits:
            split_manifest, split_skipped = _convert_split(
                plan,
                dst,
                first_key=first_key,
                num_classes=len(source.classes),
                shard_size=settings["shard_size"],
                pool=pool,
                workers=workers,
                progress=progress,
                journal=journal,
            )
            skipped += split_skipped
            first_key += split_manifest["count"]  # keys stay unique across splits
            if split_manifest["count"]:
                splits[plan.name] = split_manifest
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    if "train" not in splits:
        raise ConvertError(
            f"{src}: none of the {len(source.splits[0].names)} train images could be decoded "
            f"(first reason: {skipped[0]['reason'] if skipped else 'none'})"
        )
    written = {shard["name"] for s in splits.values() for shard in s["shards"]}
    written |= {str(Path(name).with_suffix(".idx")) for name in written}
    ffcv = None
    if write_betons is not None:
        if progress:
            print(f"{PROG}: writing {', '.join(beton_name(s) for s in splits)}", file=sys.stderr)
        ffcv = write_betons(dst, {"splits": splits}, max_side=ffcv_max_side, quality=ffcv_quality,
                            workers=max(1, workers), progress=progress)
        written |= {f["name"] for f in ffcv["files"].values()}
    _remove_stale_outputs(dst, written)
    manifest = {
        "classes": source.classes,
        "splits": splits,
        "source": source.info,
        "settings": settings,
        "skipped": source.problems + skipped,
    }
    if ffcv is not None:
        manifest["ffcv"] = ffcv
    write_manifest(dst, manifest)  # last and atomic: its presence means the dataset is complete
    journal.remove()
    out = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **manifest}
    if journal.resumed:
        out["resumed_shards"] = journal.resumed  # for the summary; not in manifest.json (same bytes as a clean run)
    return out


def verify(dst: str | os.PathLike) -> list[str]:
    """Reread every shard, index and .beton of the converted dataset in ``dst`` against its manifest.

    Checks each file's size and sha256, each shard's sample count and labels (by decoding the tar), each
    DALI index's count and the per-split totals. Returns the names of the files checked; raises
    VerifyError naming the first bad file.
    """
    dst = Path(dst)
    try:
        manifest = load_manifest(dst)
    except DatasetFormatError as e:
        raise VerifyError(str(e)) from e
    num_classes = len(manifest["classes"])
    checked = []

    def check_file(path: Path, entry: dict) -> None:
        if not path.is_file():
            raise VerifyError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise VerifyError(f"{path}: {size} bytes, the manifest says {entry['bytes']}")
        if sha256_file(path) != entry["sha256"]:
            raise VerifyError(f"{path}: sha256 differs from the manifest's")

    for split, s in manifest["splits"].items():
        total = 0
        for shard in s["shards"]:
            path = dst / shard["name"]
            check_file(path, shard)
            try:
                labels = [label for _, _, label in iter_samples(path)]
            except Exception as e:  # tarfile.ReadError, DatasetFormatError, ...
                raise VerifyError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
            if len(labels) != shard["count"]:
                raise VerifyError(f"{path}: {len(labels)} samples, the manifest says {shard['count']}")
            if any(not 0 <= label < num_classes for label in labels):
                raise VerifyError(f"{path}: label outside 0..{num_classes - 1}")
            idx = path.with_suffix(".idx")
            try:
                header = idx.read_text().split("\n", 1)[0]
            except OSError as e:
                raise VerifyError(f"{idx}: unreadable ({e.strerror or e})") from e
            if header != f"v1.2 {shard['count']}":
                raise VerifyError(f"{idx}: header {header!r}, expected 'v1.2 {shard['count']}'")
            checked += [path.name, idx.name]
            total += len(labels)
        if total != s["count"]:
            raise VerifyError(f"{dst / MANIFEST}: {split}: shards hold {total} samples, count says {s['count']}")
    for split, entry in manifest.get("ffcv", {}).get("files", {}).items():
        path = dst / entry["name"]
        check_file(path, entry)
        if entry.get("count") != manifest["splits"].get(split, {}).get("count"):
            raise VerifyError(f"{path}: {entry.get('count')} samples, the {split} shards hold "
                              f"{manifest['splits'].get(split, {}).get('count')}")  # fmt: skip
        checked.append(path.name)
    return checked


# --------------------------------------------------------------------------------------------------
# Command line.


def format_summary(manifest: dict, dst: str | os.PathLike, seconds: float, max_skipped: int = 50) -> str:
    """Human summary of a conversion: counts per split, what was re-encoded, skipped files, speed."""
    lines = [f"{PROG}: wrote {dst} ({len(manifest['classes'])} classes)"]
    if manifest.get("resumed_shards"):
        lines.append(f"  resumed: kept {manifest['resumed_shards']} finished shard(s) of an interrupted run")
    total = 0
    for split, s in manifest["splits"].items():
        total += s["count"]
        stored = s.get("stored", {})
        lines.append(
            f"  {split:5s} {s['count']:>9,d} images in {len(s['shards'])} shard(s)"
            f"  (original JPEG kept {stored.get(KEPT, 0):,d}, re-encoded {stored.get(REENCODED, 0):,d},"
            f" resized {stored.get(RESIZED, 0):,d})"
        )
    skipped = manifest.get("skipped", [])
    if skipped:
        lines.append(f"  skipped {len(skipped)} path(s) (not decodable, unreadable, empty folder, loop):")
        for item in skipped[:max_skipped]:
            lines.append(f"    {item['path']}: {item['reason']}")
        if len(skipped) > max_skipped:
            lines.append(f"    ... and {len(skipped) - max_skipped} more (see {MANIFEST})")
    else:
        lines.append("  skipped 0 files")
    ffcv = manifest.get("ffcv")
    if ffcv:
        files = ", ".join(f"{f['name']} ({f['bytes'] / 2**20:,.1f} MiB)" for f in ffcv["files"].values())
        lines.append(f"  ffcv  {files}; longer side <= {ffcv['max_side']}, JPEG quality {ffcv['quality']}")
    for note in manifest.get("source", {}).get("notes", []):
        lines.append(f"  note: {note}")
    rate = total / seconds if seconds > 0 else float("inf")
    lines.append(f"  {total:,d} images in {seconds:.1f} s ({rate:,.0f} images/s)")
    return "\n".join(lines)


def _limit_arg(text: str) -> int | dict[str, int]:
    try:
        if "=" not in text:
            return int(text)
        out = {}
        for part in text.split(","):
            split, _, n = part.partition("=")
            out[split.strip()] = int(n)
        return out
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or train=N,val=M, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Convert an ImageFolder tree or Fashion-MNIST into fastssl webdataset shards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "src",
        metavar="SRC",
        help=f"ImageFolder tree (class folders, optionally under train/ and val/) or the name {FASHION_MNIST!r} "
        f"(the IDX files of the Debian package dataset-fashion-mnist in {FASHION_MNIST_DIR})",
    )
    # "%(default).0s" prints nothing: it keeps ArgumentDefaultsHelpFormatter from appending "(default: None)"
    p.add_argument("dst", metavar="DST", nargs="?",
                   help="output folder for manifest.json and the shards (required; with --verify, the converted "
                   "folder to check)%(default).0s")
    p.add_argument(
        "--max-side",
        type=int,
        default=DEFAULT_MAX_SIDE,
        metavar="PX",
        help="an image whose longer side exceeds this is shrunk to it (Lanczos)",
    )
    p.add_argument(
        "--quality", type=int, default=DEFAULT_QUALITY, metavar="Q", help="JPEG quality of re-encoded images"
    )
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, metavar="N", help="samples per shard")
    p.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        metavar="N",
        help="encoding processes (0 or 1: encode in this process)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the class-mixing order of the samples")
    p.add_argument(
        "--limit",
        type=_limit_arg,
        default=None,
        metavar="N|train=N,val=M",
        help="at most this many samples per split (quick tests and demos)",
    )
    p.add_argument(
        "--formats",
        default="wds",
        metavar="wds[,ffcv]",
        help="what to write: wds (webdataset shards, always) and ffcv (also <split>.beton for data.backend=ffcv)",
    )
    p.add_argument(
        "--ffcv-max-side",
        type=int,
        default=DEFAULT_FFCV_MAX_SIDE,
        metavar="PX",
        help="with --formats ...,ffcv: longer side of the images in the .beton files (larger ones are shrunk)",
    )
    p.add_argument(
        "--ffcv-quality", type=int, default=DEFAULT_FFCV_QUALITY, metavar="Q", help="JPEG quality in the .beton files"
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="skip files declaring more pixels than this, unread (decompression bombs)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing converted dataset in DST")
    p.add_argument(
        "--verify",
        action="store_true",
        help="`--verify DST`: reread every shard and .beton and check counts and sha256 against the manifest "
        "(exit 1 naming the bad file); with SRC DST: convert, then verify",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fastssl-convert``; returns the exit status (2 for user errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dst is None and not args.verify:
        parser.error("the following arguments are required: DST")
    t0 = time.perf_counter()
    if args.dst is None:  # --verify DST
        try:
            checked = verify(args.src)
        except ConvertError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return e.exit_code
        print(f"{PROG}: verified {args.src}: {len(checked)} files match the manifest")
        return 0
    try:
        manifest = convert(
            args.src,
            args.dst,
            max_side=args.max_side,
            quality=args.quality,
            shard_size=args.shard_size,
            workers=args.workers,
            overwrite=args.overwrite,
            seed=args.seed,
            limit=args.limit,
            progress=not args.no_progress,
            formats=args.formats,
            ffcv_max_side=args.ffcv_max_side,
            ffcv_quality=args.ffcv_quality,
            max_pixels=args.max_pixels,
        )
        seconds = time.perf_counter() - t0
        if args.verify:
            verify(args.dst)
    except ConvertError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; {args.dst} has no manifest.json and is incomplete "
              "(rerun the same command to resume)", file=sys.stderr)  # fmt: skip
        return 130
    print(format_summary(manifest, args.dst, seconds))
    if args.verify:
        print(f"{PROG}: verified {args.dst}")
    return 0


if __name__ == "__main__":
    # Run the importable module, not this __main__ copy, so worker processes find the functions
    # they are sent by their real name (fastssl.convert._encode_files).
    from fastssl.convert import main as _main

    sys.exit(_main())
