"""``fastssl-convert --verify``: reread a converted dataset against its manifest."""

from __future__ import annotations

import os
from pathlib import Path

from fastssl.convert.errors import VerifyError
from pipelines.formats import MANIFEST, DatasetFormatError, iter_samples, load_manifest, sha256_file


def verify(dst: str | os.PathLike) -> list[str]:
    """Reread every shard, index and .beton of the converted dataset in ``dst`` against its manifest.

    Checks each file's size and sha256, each shard's sample count and labels (by decoding the tar), each
    DALI index's count, the per-split totals and the count of each split's source names. Returns the names of
    the files checked; raises VerifyError naming the first bad file.
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
    for split, entry in manifest.get("names", {}).items():
        path = dst / entry["name"]
        check_file(path, entry)
        if entry.get("count") != manifest["splits"].get(split, {}).get("count"):
            raise VerifyError(f"{path}: {entry.get('count')} names, the {split} shards hold "
                              f"{manifest['splits'].get(split, {}).get('count')} samples")
        checked.append(path.name)
    for split, entry in manifest.get("ffcv", {}).get("files", {}).items():
        path = dst / entry["name"]
        check_file(path, entry)
        if entry.get("count") != manifest["splits"].get(split, {}).get("count"):
            raise VerifyError(f"{path}: {entry.get('count')} samples, the {split} shards hold "
                              f"{manifest['splits'].get(split, {}).get('count')}")  # fmt: skip
        checked.append(path.name)
    return checked
