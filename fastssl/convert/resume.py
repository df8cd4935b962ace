"""Resuming: the hidden progress journal of an unfinished conversion, and the fingerprint that says whether
a rerun converts the same thing (and so may keep the shards finished before a kill)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from fastssl.convert.find import Source
from pipelines.formats import atomic_write_bytes, sha256_file

# Progress journal of an unfinished conversion (hidden; removed once manifest.json is written): the
# shards finished so far with their sha256, so a rerun after a kill keeps them instead of re-encoding.
JOURNAL = ".fastssl-convert-progress.json"


@dataclass
class Journal:
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
    def open(cls, dst: Path, fingerprint: str) -> Journal:
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


def source_fingerprint(source: Source, settings: dict) -> str:
    """sha256 of what decides the output: settings, source, and every split's sample list in order."""
    h = hashlib.sha256(json.dumps({"settings": settings, "source": source.info}, sort_keys=True).encode())
    for plan in source.splits:
        h.update(json.dumps([plan.name, plan.names, plan.labels]).encode())
    return h.hexdigest()
