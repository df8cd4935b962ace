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
from fastssl.convert.image import Result, encode_files, encode_gray_arrays
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
class SplitPlan:
    """One split to convert: per-sample names and labels in output order, and how to encode them."""

    name: str
    names: list[str]  # relative path (ImageFolder) or "train/123" (Fashion-MNIST): reports and order
    labels: list[int]
    encode: Callable[[Any], list[Result]]  # picklable; takes one payload chunk
    payload: Callable[[int, int], Any]  # (start, stop) -> the chunk of work for those samples
    chunk: int  # samples per task sent to a worker


@dataclass
class Source:
    kind: str
    classes: list[str]
    splits: list[SplitPlan]
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


def _within(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or inside it (both real, absolute paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _link_text(path: str) -> str:
    """What the symlink ``path`` says (its target as written), for reports; never raises."""
    try:
        return os.readlink(path)
    except OSError as e:  # vanished, or not a link after all
        return f"? ({e.strerror or e})"


@dataclass
class _Tree:
    """Where the dataset's folders really are, to judge where a symlink inside a class folder leads."""

    src: Path
    roots: list[str]  # real paths of SRC and its split folders
    classes: dict[str, str] = field(default_factory=dict)  # real path of a class folder -> "train/cat"

    def refusal(self, real: str, own: str) -> str | None:
        """Why a symlink leading to ``real``, inside the class folder whose real path is ``own``, is not followed;
        None when it is: inside its own class folder (a loop is caught by the visited set) or outside the dataset
        (storage elsewhere that holds this class's images)."""
        if _within(real, own):
            return None
        for folder, name in self.classes.items():
            if folder != own and _within(real, folder):
                return f"leads into the class folder {name}/, whose images are converted there"
        if any(_within(folder, real) for folder in [*self.classes, *self.roots]):
            return "leads to a folder above the class folders"
        return None

    def rel(self, path: str) -> str:
        return Path(path).relative_to(self.src).as_posix()


def _walk_images(top: str, own: str, tree: _Tree, seen: dict[tuple[int, int], str], problems: list[tuple[str, str]],
                 ignored: list[int]) -> Iterator[tuple[str, tuple[int, int] | None, bool]]:
    """``(relative posix path, file key, reached through a link)`` of the image files under ``top``; the file
    key is ``(st_dev, st_ino)`` of the real file, None when unknown (a dangling or looping link: reported when read).

    Symlinks are followed unless ``tree`` refuses them (into another class folder, or above the class folders:
    reported, not followed). Each real directory is entered once (``seen``: key -> relative path, shared by
    the whole scan), so a symlink loop ends (and is reported) instead of recursing until the path is too long;
    linked folders are entered after the plain tree, so a folder reached both ways keeps its plain path.
    Unlistable folders are reported, never fatal. ``problems`` receives ``(relative path, reason)``;
    ``ignored[0]`` counts the other files.
    """

    def walk(folder: str, via_link: bool) -> Iterator[tuple[str, tuple[int, int] | None, bool]]:
        try:
            st = os.stat(folder)
            key = (st.st_dev, st.st_ino)
            if key in seen:
                first = seen[key]
                if _within(os.path.realpath(os.path.dirname(folder)), os.path.realpath(folder)):
                    reason = "symlink loop: folder already visited, not entered again"
                else:
                    reason = f"the same folder as {first}/, already converted: not entered again"
                problems.append((tree.rel(folder) + "/", reason))
                return
            seen[key] = tree.rel(folder)
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            problems.append((tree.rel(folder) + "/", f"cannot list folder: {e.strerror or e}"))
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
            is_link = entry.is_symlink()
            is_image = os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
            if is_link and (is_dir or is_image):
                why = tree.refusal(os.path.realpath(entry.path), own)
                if why is not None:
                    problems.append((tree.rel(entry.path) + ("/" if is_dir else ""),
                                     f"symlink to {_link_text(entry.path)}: {why}; not followed"))
                    continue
            if is_dir and is_link:
                linked.append(entry.path)
            elif is_dir:
                subdirs.append(entry.path)
            elif is_image:
                # readdir's inode costs no system call; only a link needs a stat to find its file.
                if is_link:
                    try:
                        target = os.stat(entry.path)
                        file_key = (target.st_dev, target.st_ino)
                    except OSError:
                        file_key = None  # unreadable or looping: reported when read
                else:
                    file_key = (st.st_dev, entry.inode())
                yield tree.rel(entry.path), file_key, via_link or is_link
            else:
                ignored[0] += 1
        for sub in subdirs:
            yield from walk(sub, via_link)

    def walk_all() -> Iterator[tuple[str, tuple[int, int] | None, bool]]:
        yield from walk(top, False)
        while linked:
            yield from walk(linked.pop(0), True)

    linked: list[str] = []
    return walk_all()


def _scan_imagefolder(src: Path) -> tuple[dict[str, list[tuple[str, str]]], str, int, list[dict]]:
    """Find image files per split: ``{split: [(relative posix path, class name)]}``, layout, ignored count,
    and the problems found while scanning (``{"split", "path", "reason"}``: empty class folders, symlink
    loops, unlistable folders, symlinks not followed, second paths to a file already found).

    Each real file (device and inode) is converted once, under the class folder that holds it: a symlink
    that leads into another class folder, or above the class folders, is reported and not followed; a file
    reached twice (a link to a file of its own class, two links to one file elsewhere) is kept at its
    plain path (else its first path) and its other paths are reported."""
    if (src / "train").is_dir():
        layout = "train/val"
        roots = {"train": src / "train"}
        if (src / "val").is_dir():
            roots["val"] = src / "val"
    else:
        layout = "flat"
        roots = {"train": src}
    problems: list[dict] = []
    ignored = 0
    tree = _Tree(src, [os.path.realpath(src), *(os.path.realpath(r) for r in roots.values())])
    class_dirs: dict[str, list[tuple[str, str, str]]] = {}  # split -> [(class name, path, real path)]
    for split, root in roots.items():
        try:
            entries = sorted(os.scandir(root), key=lambda e: e.name)
        except OSError as e:
            raise ConvertError(f"{root}: cannot list ({e.strerror or e})") from e
        class_dirs[split] = []
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
            class_dirs[split].append((entry.name, entry.path, os.path.realpath(entry.path)))
    # A class folder that is a link to another class folder, or to SRC or a split folder, holds no class of its
    # own. Plain folders claim their real path first, so a link never displaces the folder it points to.
    plain_first = sorted(((split, path, real) for split, dirs in class_dirs.items() for _, path, real in dirs),
                         key=lambda c: os.path.islink(c[1]))
    for split, path, real in plain_first:
        why = None
        if real in tree.classes:
            why = f"the same folder as the class folder {tree.classes[real]}/"
        elif any(_within(r, real) for r in tree.roots):
            why = "leads to a folder above the class folders"
        if why is None:
            tree.classes[real] = tree.rel(path)
        else:
            problems.append({"split": split, "path": tree.rel(path) + "/",
                             "reason": f"symlink to {_link_text(path)}: {why}; class left out"})
    candidates: list[tuple[str, str, str, tuple[int, int] | None, bool]] = []
    seen: dict[tuple[int, int], str] = {}
    for split, dirs in class_dirs.items():
        for name, path, real in dirs:
            if tree.classes.get(real) != tree.rel(path):
                continue  # refused above
            found_here: list[tuple[str, str, str, tuple[int, int] | None, bool]] = []
            folder_problems: list[tuple[str, str]] = []
            counter = [0]
            for rel, file_key, via_link in _walk_images(path, real, tree, seen, folder_problems, counter):
                found_here.append((split, rel, name, file_key, via_link))
            ignored += counter[0]
            problems += [{"split": split, "path": p, "reason": reason} for p, reason in folder_problems]
            if not found_here:
                problems.append({"split": split, "path": tree.rel(path) + "/",
                                 "reason": "empty class folder: no image files; class left out"})
            candidates += found_here
    # Each real file once: at its first path not reached through a link, else at its first path.
    holder: dict[tuple[int, int], str] = {}
    for via_links in (False, True):
        for _, rel, _, file_key, via_link in candidates:
            if file_key is not None and via_link == via_links:
                holder.setdefault(file_key, rel)
    found: dict[str, list[tuple[str, str]]] = {split: [] for split in roots}
    for split, rel, name, file_key, _ in candidates:
        if file_key is None or holder[file_key] == rel:
            found[split].append((rel, name))
        else:
            problems.append({"split": split, "path": rel,
                             "reason": f"the same file as {holder[file_key]}, converted there once"})
    return found, layout, ignored, problems


def plan_imagefolder(
    src: Path, max_side: int, quality: int, seed: int, limits: dict[str, int | None], max_pixels: int
) -> Source:
    """Scan the ImageFolder tree ``src`` and plan its splits: class-mixed order, ``limits`` applied, files
    encoded by :func:`encode_files`. Raises ConvertError when SRC is missing or holds no train images."""
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
            SplitPlan(
                name=split,
                names=names,
                labels=labels,
                encode=partial(encode_files, max_side=max_side, quality=quality, max_pixels=max_pixels),
                payload=lambda a, b, paths=paths: paths[a:b],
                chunk=16,
            )
        )
    info = {"kind": "imagefolder", "path": str(src.resolve()), "layout": layout, "ignored_files": ignored}
    if notes:
        info["notes"] = notes
    return Source("imagefolder", classes, plans, info, problems)


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


def plan_fashion_mnist(quality: int, seed: int, limits: dict[str, int | None]) -> Source:
    """Plan Fashion-MNIST's train and val (test) splits from the Debian package's IDX files (else a torchvision
    download): class-mixed order, ``limits`` applied, each 28x28 image encoded as a grayscale JPEG."""
    data, info = _load_fashion_mnist()
    plans = []
    for split, (images, labels_arr) in data.items():
        names = [f"{split}/{i}" for i in range(len(labels_arr))]
        labels = labels_arr.tolist()
        order = np.asarray(_apply_order(names, labels, seed, limits.get(split)), dtype=np.int64)
        images = images[order]  # a copy in output order, so chunks are contiguous slices
        plans.append(
            SplitPlan(
                name=split,
                names=[names[i] for i in order],
                labels=[labels[i] for i in order],
                encode=partial(encode_gray_arrays, quality=quality),
                payload=lambda a, b, images=images: images[a:b],
                chunk=2000,
            )
        )
    return Source(FASHION_MNIST, list(FASHION_MNIST_CLASSES), plans, {"kind": FASHION_MNIST, **info})


def parse_limits(limit: int | dict[str, int] | None) -> dict[str, int | None]:
    """``--limit`` (N for every split, or ``{"train": N, "val": M}``) as ``{split: N}``; ConvertError if invalid."""
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
