"""On-disk dataset format shared by fastssl-convert and every loader backend.

A converted dataset is a folder:

    manifest.json            classes, per-split counts, shards with sha256, source, settings, skipped files
    train-00000.tar ...      webdataset shards: per sample ``{key}.jpg`` (JPEG bytes),
                             ``{key}.cls`` (ASCII label) and ``{key}.lbl`` (int32 little-endian label,
                             so DALI reads the label without Python)
    train-00000.idx ...      DALI webdataset index of each shard (same text format as DALI's wds2idx)
    val-00000.tar ...
    train.beton, val.beton   optional (``--formats wds,ffcv``): each split as one FFCV file, samples in
                             shard order; written by ``pipelines.ffcv_loader.write_betons``, listed
                             in the manifest's ``"ffcv"`` section
    train.names.json.gz ...  each split's source names in stored order (the file's path under SRC, or
                             ``train/123`` for Fashion-MNIST's 124th train image), gzip-compressed JSON,
                             listed in the manifest's ``"names"`` section: selecting images by file name
                             (the ImageNet 1 % / 10 % label lists) needs them. A sidecar, not a manifest
                             field: ImageNet's 1.28 M names would make every loader's manifest read slow

Only this module knows the layout; loaders and the converter call it.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import struct
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

FORMAT_NAME = "fastssl-wds"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


class DatasetFormatError(ValueError):
    """A converted dataset is missing, incomplete or corrupt; the message says which file and what to do."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.tar"


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; restore at once
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a temp file beside ``path`` for writing; on a clean exit fsync it and rename it to ``path``.

    On an exception (or a kill) no file appears under ``path`` and any previous one stays intact.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions, like open() does
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder, fsync, then rename."""
    with atomic_writer(path) as f:
        f.write(data)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK


def _ustar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header of a regular file: mode 0644, uid/gid 0, mtime 0 (deterministic shards)."""
    raw = name.encode("utf-8")
    if len(raw) > 100 or size >= 8**11:
        # Long names need USTAR's prefix field and huge sizes another encoding: let tarfile do those.
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uname, info.gname = size, 0, 0o644, "", ""
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    header = b"".join((
        raw.ljust(100, b"\0"),
        b"0000644\0",          # mode
        b"0000000\0" * 2,      # uid, gid
        b"%011o\0" % size,
        b"00000000000\0",      # mtime
        b" " * 8,              # checksum field counts as spaces while summing
        b"0",                  # regular file
        bytes(100),            # link name
        b"ustar\x0000",        # POSIX magic + version
        bytes(64),             # user and group names
        bytes(16 + 155 + 12),  # device major/minor (unused for files, as tarfile leaves them), prefix, pad
    ))  # fmt: skip
    return header[:148] + b"%06o\0" % sum(header) + header[155:]


@dataclass
class ShardInfo:
    name: str
    count: int
    sha256: str
    bytes: int


class ShardWriter:
    """Writes one webdataset shard to a temp name; ``close()`` fsyncs, writes its DALI index and renames.

    A killed writer leaves only a hidden ``.*.tmp`` file, never a file under the final name.
    """

    def __init__(self, folder: str | os.PathLike, split: str, index: int):
        self.folder = Path(folder)
        self.name = shard_name(split, index)
        self.final = self.folder / self.name
        self.tmp = self.folder / f".{self.name}.tmp"
        self._f = open(self.tmp, "wb")
        self._offset = 0  # tracked here: BufferedWriter.tell() costs a syscall per member
        self._index_lines: list[str] = []
        self.count = 0

    def _add(self, name: str, data: bytes) -> tuple[int, int]:
        # Members are written by hand (same bytes as tarfile's USTAR output): tarfile.addfile costs
        # ~60 us per member, which made the tar writer the bottleneck of converting small images.
        header = _ustar_header(name, len(data))
        self._f.write(header)
        self._f.write(data)
        self._f.write(bytes(-len(data) % _TAR_BLOCK))
        data_offset = self._offset + len(header)
        self._offset = data_offset + len(data) + (-len(data) % _TAR_BLOCK)
        return data_offset, len(data)

    def write(self, key: str, jpeg: bytes, label: int) -> None:
        # A webdataset key ends at the first dot of the file name, and the index is space-separated:
        # such a key would give an index that disagrees with DALI's wds2idx.
        if "." in key.rpartition("/")[2] or any(c.isspace() for c in key) or not key:
            raise ValueError(f"sample key {key!r}: must be non-empty, without '.' or whitespace")
        parts = []
        for ext, data in (("jpg", jpeg), ("cls", str(int(label)).encode()), ("lbl", struct.pack("<i", int(label)))):
            off, size = self._add(f"{key}.{ext}", data)
            parts.append(f"{ext} {off} {size} {key}.{ext}")
        self._index_lines.append(" ".join(parts))
        self.count += 1

    def close(self) -> ShardInfo:
        # End of archive: two zero blocks, then zeros up to a whole 20-block record (as tarfile does).
        end = self._offset + 2 * _TAR_BLOCK
        self._f.write(bytes(2 * _TAR_BLOCK + (-end % _TAR_RECORD)))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        idx = f"v1.2 {len(self._index_lines)}\n" + "".join(line + "\n" for line in self._index_lines)
        atomic_write_bytes(self.final.with_suffix(".idx"), idx.encode())
        os.replace(self.tmp, self.final)
        return ShardInfo(self.name, self.count, sha256_file(self.final), self.final.stat().st_size)

    def abort(self) -> None:
        try:
            self._f.close()
        finally:
            if self.tmp.exists():
                self.tmp.unlink()


def write_manifest(folder: str | os.PathLike, manifest: dict) -> None:
    manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **manifest}
    atomic_write_bytes(Path(folder) / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())


def load_manifest(folder: str | os.PathLike) -> dict:
    """Read and sanity-check ``manifest.json`` of a converted dataset."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        where = "" if folder.is_absolute() else f" (relative to the current directory {Path.cwd()})"
        raise DatasetFormatError(f"{folder}: no such dataset folder{where}; create it with "
                                 f"`fastssl-convert SRC {folder}`")
    if not path.is_file():
        raise DatasetFormatError(
            f"{path}: missing; {folder} is not a converted dataset (run `fastssl-convert SRC {folder}`)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{path}: not valid JSON ({e}); rerun fastssl-convert") from e
    if manifest.get("format") != FORMAT_NAME:
        raise DatasetFormatError(f"{path}: format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    for key in ("classes", "splits"):
        if key not in manifest:
            raise DatasetFormatError(f"{path}: key {key!r} missing; rerun fastssl-convert")
    return manifest


def shard_paths(folder: str | os.PathLike, split: str, manifest: dict | None = None) -> list[Path]:
    """Paths of the shards of ``split``, in order; every listed shard must exist."""
    folder = Path(folder)
    manifest = manifest if manifest is not None else load_manifest(folder)
    if split not in manifest["splits"]:
        raise DatasetFormatError(
            f"{folder / MANIFEST}: no split {split!r} (has {sorted(manifest['splits'])})"
        )
    paths = []
    for shard in manifest["splits"][split]["shards"]:
        p = folder / shard["name"]
        if not p.is_file():
            raise DatasetFormatError(f"{p}: listed in the manifest but missing; rerun fastssl-convert")
        paths.append(p)
    return paths


def beton_name(split: str) -> str:
    return f"{split}.beton"


def beton_path(folder: str | os.PathLike, split: str, manifest: dict | None = None) -> Path:
    """Path of the FFCV file of ``split``: listed in the manifest's ``"ffcv"`` section, present, of the listed size."""
    folder = Path(folder)
    manifest = manifest if manifest is not None else load_manifest(folder)
    entry = manifest.get("ffcv", {}).get("files", {}).get(split)
    if entry is None:
        raise DatasetFormatError(
            f"{folder}: no FFCV file for split {split!r}; convert with "
            f"`fastssl-convert SRC {folder} --formats wds,ffcv --overwrite`"
        )
    p = folder / entry["name"]
    if not p.is_file():
        raise DatasetFormatError(f"{p}: listed in the manifest but missing; rerun fastssl-convert --formats wds,ffcv")
    if p.stat().st_size != entry["bytes"]:
        raise DatasetFormatError(
            f"{p}: {p.stat().st_size} bytes, the manifest says {entry['bytes']}; "
            "rerun fastssl-convert --formats wds,ffcv"
        )
    return p


def shard_counts(manifest: dict, split: str) -> list[int]:
    return [int(s["count"]) for s in manifest["splits"][split]["shards"]]


def iter_samples(tar_path: str | os.PathLike) -> Iterator[tuple[str, bytes, int]]:
    """Yield ``(key, jpeg_bytes, label)`` for each sample of one shard, in stored order."""
    key = None
    jpeg: bytes | None = None
    label: int | None = None
    with tarfile.open(tar_path, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            stem, _, ext = member.name.rpartition(".")
            if stem != key:
                if key is not None:
                    yield _complete(tar_path, key, jpeg, label)
                key, jpeg, label = stem, None, None
            data = tar.extractfile(member).read()
            if ext == "jpg":
                jpeg = data
            elif ext == "lbl":
                label = struct.unpack("<i", data)[0]
            elif ext == "cls" and label is None:
                label = int(data.decode())
        if key is not None:
            yield _complete(tar_path, key, jpeg, label)


NAMES_SUFFIX = ".names.json.gz"


def names_file(split: str) -> str:
    return f"{split}{NAMES_SUFFIX}"


def write_names(folder: str | os.PathLike, split: str, names: list[str]) -> dict:
    """Write ``split``'s source names (stored order) beside its shards, atomically; same names, same bytes.

    Returns the manifest's ``"names"`` entry of the split: ``{"name", "count", "bytes", "sha256"}``."""
    blob = gzip.compress(json.dumps({"split": split, "names": list(names)}).encode(), mtime=0)
    name = names_file(split)
    atomic_write_bytes(Path(folder) / name, blob)
    return {"name": name, "count": len(names), "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}


def add_names_hint(folder: str | os.PathLike, manifest: dict) -> str:
    """How to add the source names to a dataset converted without them, without re-encoding an image."""
    source = manifest.get("source", {})
    src = "fashion-mnist" if source.get("kind") == "fashion-mnist" else source.get("path", "SRC")
    return (f"add them without re-encoding: `fastssl-convert {src} {folder} --add-names` (SRC: the folder or "
            "name it was converted from, unchanged since)")


def load_names(folder: str | os.PathLike, split: str, manifest: dict | None = None) -> list[str]:
    """The source name of every sample of ``split``, in stored order (index = sample id).

    Raises DatasetFormatError when the dataset was converted before names were kept (the message says how to
    add them), or when the names file is missing or does not match the manifest."""
    folder = Path(folder)
    manifest = manifest if manifest is not None else load_manifest(folder)
    if split not in manifest["splits"]:
        raise DatasetFormatError(f"{folder / MANIFEST}: no split {split!r} (has {sorted(manifest['splits'])})")
    entry = manifest.get("names", {}).get(split)
    if entry is None:
        raise DatasetFormatError(f"{folder}: converted without the images' source names (by a fastssl-convert from "
                                 f"before it kept them); {add_names_hint(folder, manifest)}")
    path = folder / entry["name"]
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise DatasetFormatError(f"{path}: listed in the manifest but unreadable ({e.strerror or e}); "
                                 f"{add_names_hint(folder, manifest)}") from None
    if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
        raise DatasetFormatError(f"{path}: sha256 differs from the manifest's; {add_names_hint(folder, manifest)}")
    names = json.loads(gzip.decompress(blob))["names"]
    count = int(manifest["splits"][split]["count"])
    if len(names) != count:
        raise DatasetFormatError(f"{path}: {len(names)} names for the {count} samples of {split}; "
                                 f"{add_names_hint(folder, manifest)}")
    return names


def split_labels(folder: str | os.PathLike, split: str, manifest: dict | None = None):
    """The labels of ``split`` in stored order: int64 (N,), read through each shard's index (one small read per
    sample, no image bytes)."""
    import numpy as np

    from pipelines.torch_loader import index_shard  # its index parser; imported here: that module imports this one

    folder = Path(folder)
    manifest = manifest if manifest is not None else load_manifest(folder)
    out = []
    for path in shard_paths(folder, split, manifest):
        table = index_shard(path)
        with open(path, "rb") as f:
            for offset, size, ascii_label in table[:, 2:5].tolist():
                f.seek(offset)
                data = f.read(size)
                out.append(int(data.decode()) if ascii_label else struct.unpack("<i", data)[0])
    return np.asarray(out, dtype=np.int64)


def _complete(tar_path, key, jpeg, label) -> tuple[str, bytes, int]:
    if jpeg is None or label is None:
        raise DatasetFormatError(f"{tar_path}: sample {key!r} lacks its .jpg or label; rerun fastssl-convert")
    return key, jpeg, label
