"""Reporting: the summary a conversion prints (counts per split, how samples were stored, skipped paths)."""

from __future__ import annotations

import os

from fastssl.convert.image import KEPT, REENCODED, RESIZED
from pipelines.formats import MANIFEST

PROG = "fastssl-convert"


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
        lines.append(f"  skipped {len(skipped)} path(s) (not decodable, unreadable, empty folder, loop, "
                     "link not followed, second path to a file):")
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
