"""Labelled subsets for semi-supervised fine-tuning: which train images keep their label.

``--labels`` of fastssl-finetune takes:

* ``1%`` / ``10%`` on ImageNet-1k (a dataset whose 1000 classes are the WordNet ids of the canonical lists): the
  canonical lists of SimCLR, which BYOL, SwAV, Barlow Twins and VICReg fine-tune on too. They ship inside the
  package, xz-compressed (``imagenet_subsets/``, with their source and license), and are read offline: SwAV's and
  Barlow Twins' scripts download them at run time, which fails on an offline cluster.
* ``P%`` on any other dataset: a deterministic class-balanced subset, ``round(P/100 x N)`` images spread evenly over
  the classes (Fashion-MNIST 1 %: 600 images, 60 per class), each class's members ranked by a hash of
  (seed, source name), so the subset depends on the names only, not on the conversion's order or the machine.
  Its file list is written next to the result, in the canonical lists' format, so the split can be cited and
  given back as ``--labels FILE``. (solo-learn draws a random split instead, which no one else can reproduce.)
* ``FILE``: one source name per line (blank lines and ``#`` comments ignored). A line names an image by its
  source name (``train/n01440764/n01440764_10026.JPEG``) or by its file name alone (``n01440764_10026.JPEG``).

Selecting by name needs each image's source name after conversion (the names sidecar of
``pipelines.formats``); a name that matches no image is an error naming the first missing files.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

from pipelines.formats import atomic_write_bytes, load_manifest, load_names, split_labels

SUBSET_DIR = Path(__file__).parent / "imagenet_subsets"
# label -> (shipped file, images, sha256 of the decompressed list): a damaged package file is refused, not used
CANONICAL = {
    "1%": ("1percent.txt.xz", 12811, "71e82a48ba78252683ae334c4d019ebd5c6e855b9599c1389fbe83eb9549cf17"),
    "10%": ("10percent.txt.xz", 128116, "6d09de11e7bdaf5b1f3b1f249b6183695f97310cdd20f0c03e7235b6b9392091"),
}
_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)%$")
_SHOWN = 5  # missing names an error lists


class SubsetError(ValueError):
    """A labelled subset that cannot be selected; the message names the names or the file."""


@dataclass
class Subset:
    """The train images that keep their label: ``ids`` (sorted int64 sample ids of the train split), their
    source ``names`` in the same order, how they were chosen (``kind``: ``imagenet-1%`` / ``imagenet-10%``,
    ``balanced`` or ``file``) and ``per_class`` counts."""

    ids: np.ndarray
    names: list[str]
    kind: str
    label: str  # what --labels said
    per_class: list[int]
    total: int  # images in the train split
    seed: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return len(self.ids) / max(1, self.total)


@cache
def canonical_names(label: str) -> tuple[str, ...]:
    """The canonical ImageNet list ``1%`` or ``10%``: its file names in the list's order (read from the package)."""
    if label not in CANONICAL:
        raise SubsetError(f"no canonical ImageNet list {label!r}; there are {', '.join(CANONICAL)}")
    name, count, digest = CANONICAL[label]
    path = SUBSET_DIR / name
    try:
        raw = lzma.decompress(path.read_bytes())
    except (OSError, lzma.LZMAError) as e:
        raise SubsetError(f"{path}: the shipped ImageNet {label} list cannot be read ({e}); reinstall fastssl") \
            from None
    if hashlib.sha256(raw).hexdigest() != digest:
        raise SubsetError(f"{path}: the shipped ImageNet {label} list is damaged (sha256 differs); reinstall fastssl")
    names = tuple(raw.decode().split())
    assert len(names) == count, (path, len(names))
    return names


@cache
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 WordNet ids of ImageNet-1k, sorted (the class prefixes of the canonical lists)."""
    return tuple(sorted({n.split("_", 1)[0] for n in canonical_names("1%")}))


def is_imagenet(classes: list[str]) -> bool:
    """A dataset whose classes are exactly ImageNet-1k's WordNet ids (as a converted ImageNet train folder has)."""
    return tuple(sorted(classes)) == imagenet_classes()


def parse_labels(text: str) -> tuple[str, float | Path]:
    """``--labels``: ``("fraction", f)`` for ``P%`` (0 < P <= 100) or ``("file", path)``."""
    m = _PERCENT.match(text.strip())
    if m:
        percent = float(m.group(1))
        if not 0 < percent <= 100:
            raise SubsetError(f"--labels {text}: a percentage must lie in (0, 100]")
        return "fraction", percent / 100
    path = Path(text)
    if not path.is_file():
        raise SubsetError(f"--labels {text}: neither a percentage (1%, 10%) nor a file of image names")
    return "file", path


def read_name_list(path: str | os.PathLike) -> list[str]:
    """The names a list file holds, in order (blank lines and ``#`` comments skipped, repeats dropped)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SubsetError(f"--labels {path}: cannot be read ({e})") from None
    names = list(dict.fromkeys(s for line in lines if (s := line.strip()) and not s.startswith("#")))
    if not names:
        raise SubsetError(f"--labels {path}: no image names in it (one name per line)")
    return names


def match_names(listed: list[str], names: list[str], where: str) -> np.ndarray:
    """The sample ids of the ``listed`` names among a split's source ``names``: sorted int64 (len(listed),).

    A listed name matches a stored one equal to it, or, when it holds no ``/``, the one whose file name (last
    path part) it is. Raises SubsetError naming the first names that match no image, or a file name that several
    images share (``where`` names the dataset in the message)."""
    full = {n: i for i, n in enumerate(names)}
    base: dict[str, int] = {}
    shared: set[str] = set()
    for i, n in enumerate(names):
        b = n.rsplit("/", 1)[-1]
        if b in base:
            shared.add(b)
        base[b] = i
    ids, missing, ambiguous = [], [], []
    for name in listed:
        if name in full:
            ids.append(full[name])
        elif "/" in name or name not in base:
            missing.append(name)
        elif name in shared:
            ambiguous.append(name)
        else:
            ids.append(base[name])
    if missing:
        shown = ", ".join(missing[:_SHOWN]) + (f" (and {len(missing) - _SHOWN} more)" if len(missing) > _SHOWN else "")
        raise SubsetError(f"{where}: {len(missing)} of the {len(listed)} listed images are not in the dataset: "
                          f"{shown}")
    if ambiguous:
        raise SubsetError(f"{where}: the file name {ambiguous[0]} belongs to several images; list it with its folder "
                          f"(e.g. {next(n for n in names if n.endswith('/' + ambiguous[0]))})")
    return np.asarray(sorted(ids), dtype=np.int64)


def balanced_subset(names: list[str], labels: np.ndarray, num_classes: int, fraction: float,
                    seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """A class-balanced ``fraction`` of a split: sorted int64 sample ids, and notes (classes short of images).

    ``round(fraction x N)`` images, ``// num_classes`` per class, the remainder one each to the classes first in
    a hash order of (seed, class); within a class the members with the smallest sha256(seed, source name)."""
    labels = np.asarray(labels)
    total = round(fraction * len(names))
    if total < 1:
        raise SubsetError(f"{fraction:.4%} of {len(names)} images is no image; choose a larger fraction")
    want = np.full(num_classes, total // num_classes)
    extra = sorted(range(num_classes), key=lambda c: hashlib.sha256(f"{seed}\0class {c}".encode()).digest())
    want[extra[: total - int(want.sum())]] += 1
    chosen, notes = [], []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        ranked = sorted(members.tolist(), key=lambda i: hashlib.sha256(f"{seed}\0{names[i]}".encode()).digest())
        take = ranked[: int(want[c])]
        if len(take) < want[c]:
            notes.append(f"class {c}: {len(take)} images, fewer than the {int(want[c])} a balanced subset wants")
        chosen += take
    return np.asarray(sorted(chosen), dtype=np.int64), notes


def choose_subset(data: str | os.PathLike, labels: str, seed: int = 0) -> Subset:
    """The labelled subset of ``data``'s train split that ``--labels`` (``labels``) names; see the module docstring.
    Raises SubsetError (a name matches no image, an empty list) or DatasetFormatError (no names in the dataset:
    the message says how to add them)."""
    manifest = load_manifest(data)
    classes = list(manifest["classes"])
    kind, value = parse_labels(labels)
    names = load_names(data, "train", manifest)
    stored = split_labels(data, "train", manifest)
    notes: list[str] = []
    used_seed: int | None = None
    if kind == "fraction" and labels.strip() in CANONICAL and is_imagenet(classes):
        listed, kind = list(canonical_names(labels.strip())), f"imagenet-{labels.strip()}"
        ids = match_names(listed, names, f"{data} (the canonical ImageNet {labels.strip()} list)")
        _check_imagenet_classes(ids, names, stored, classes, f"{data}")
    elif kind == "fraction":
        ids, notes = balanced_subset(names, stored, len(classes), float(value), seed)
        kind, used_seed = "balanced", seed
    else:
        ids = match_names(read_name_list(value), names, f"--labels {value}")
        if is_imagenet(classes):
            _check_imagenet_classes(ids, names, stored, classes, f"--labels {value}")
    per_class = np.bincount(stored[ids], minlength=len(classes)).tolist()
    empty = [classes[c] for c, n in enumerate(per_class) if n == 0]
    if empty:
        notes.append(f"{len(empty)} class(es) without a labelled image: {', '.join(empty[:_SHOWN])}"
                     + (" ..." if len(empty) > _SHOWN else ""))
    return Subset(ids, [names[i] for i in ids], kind, labels.strip(), per_class, len(names), used_seed, notes)


def _check_imagenet_classes(ids: np.ndarray, names: list[str], labels: np.ndarray, classes: list[str],
                            where: str) -> None:
    """An ImageNet file name starts with its class's WordNet id: an image stored under another class is refused."""
    for i in ids.tolist():
        wnid = names[i].rsplit("/", 1)[-1].split("_", 1)[0]
        if wnid in classes and classes[int(labels[i])] != wnid:
            raise SubsetError(f"{where}: {names[i]} is stored with class {classes[int(labels[i])]}, but its name says "
                              f"{wnid}; the dataset's labels do not follow ImageNet's")


def write_subset_list(path: str | os.PathLike, subset: Subset, data: str | os.PathLike) -> Path:
    """The subset's names, one per line after a ``#`` header saying what it is, written atomically; fastssl-finetune
    ``--labels`` reads it back (the same images)."""
    how = {"balanced": f"class-balanced, seed {subset.seed}", "file": "as listed"}.get(
        subset.kind, "the canonical ImageNet list (google-research/simclr imagenet_subsets)")
    header = [f"# fastssl labelled subset: {len(subset.ids)} of the {subset.total} train images of {data} "
              f"({subset.label}, {how})",
              f"# per class: {' '.join(str(n) for n in subset.per_class)}",
              "# one source name per line; `fastssl-finetune --labels THIS_FILE` selects these images again"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, ("\n".join(header + subset.names) + "\n").encode())
    return path


def describe(subset: Subset) -> str:
    """One line: how many images, of how many, per class."""
    counts = sorted(set(subset.per_class))
    spread = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return (f"{len(subset.ids):,d} labelled images ({subset.label}: {subset.kind}, {100 * subset.fraction:.3g} % of "
            f"{subset.total:,d}, {spread} per class)")


__all__ = ["CANONICAL", "Subset", "SubsetError", "balanced_subset", "canonical_names", "choose_subset", "describe",
           "imagenet_classes", "is_imagenet", "match_names", "parse_labels", "read_name_list", "write_subset_list"]
