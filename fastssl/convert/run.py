"""The whole conversion, stage after stage: check the options, find the images and plan the splits, prepare
DST, resume or start the journal, write every split's shards (and .beton files), then the manifest."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from fastssl.convert.errors import ConvertError, OutputError, output_error
from fastssl.convert.find import FASHION_MNIST, SplitPlan, parse_limits, plan_fashion_mnist, plan_imagefolder
from fastssl.convert.image import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, DEFAULT_QUALITY
from fastssl.convert.report import PROG
from fastssl.convert.resume import Journal, source_fingerprint
from fastssl.convert.write import (
    DEFAULT_FFCV_MAX_SIDE,
    DEFAULT_FFCV_QUALITY,
    DEFAULT_SHARD_SIZE,
    FFCV_MAX_SIDE_LIMIT,
    convert_split,
    ignore_sigint,
    import_ffcv_writer,
    parse_formats,
    prepare_dst,
    remove_stale_outputs,
)
from pipelines.formats import (
    FORMAT_NAME,
    FORMAT_VERSION,
    DatasetFormatError,
    beton_name,
    write_manifest,
    write_names,
)


def default_workers() -> int:
    """Encoding processes when ``--workers`` is not given: the cores, at most 4."""
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
    formats = parse_formats(formats)
    if not 1 <= ffcv_max_side <= FFCV_MAX_SIDE_LIMIT:
        raise ConvertError(f"--ffcv-max-side must be in 1..{FFCV_MAX_SIDE_LIMIT}, got {ffcv_max_side}")
    if not 1 <= ffcv_quality <= 100:
        raise ConvertError(f"--ffcv-quality must be in 1..100, got {ffcv_quality}")
    write_betons = import_ffcv_writer() if "ffcv" in formats else None
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise ConvertError(f"--workers must be >= 0, got {workers}")
    limits = parse_limits(limit)
    dst = Path(dst)

    # Plan (and so validate SRC) before touching DST: a typo in SRC must not delete an old manifest.
    if os.fspath(src) == FASHION_MNIST:
        source = plan_fashion_mnist(quality, seed, limits)
    else:
        source = plan_imagefolder(Path(src), max_side, quality, seed, limits, max_pixels)
    prepare_dst(dst, overwrite)
    settings = {
        "max_side": max_side,
        "quality": quality,
        "shard_size": shard_size,
        "seed": seed,
        "limit": {k: v for k, v in limits.items() if v is not None} or None,
        "formats": list(formats),
        "max_pixels": max_pixels,
    }
    journal = Journal.open(dst, source_fingerprint(source, settings))
    try:
        return _convert_planned(source, src, dst, journal, settings, workers, progress, write_betons,
                                ffcv_max_side, ffcv_quality)  # fmt: skip
    except OSError as e:
        raise output_error(e, dst) from e


def stored_positions(plan: SplitPlan, skipped: list[dict]) -> list[int]:
    """Positions in ``plan`` of the samples the shards hold, in stored order: the plan less the files skipped
    (``skipped``: the split's ``{"path": name, ...}`` entries)."""
    gone = {item["path"] for item in skipped}
    return [i for i, name in enumerate(plan.names) if name not in gone]


def stored_names(plan: SplitPlan, skipped: list[dict], count: int) -> list[str]:
    """The source names of ``plan``'s stored samples, in stored order; ``count`` samples were stored."""
    names = [plan.names[i] for i in stored_positions(plan, skipped)]
    if len(names) != count:  # the shards hold the plan's samples in order, less the skipped ones
        raise ConvertError(f"{plan.name}: {count} samples stored but {len(names)} names planned; rerun with "
                           "--overwrite")
    return names


def _convert_planned(source, src, dst, journal, settings, workers, progress, write_betons, ffcv_max_side,
                     ffcv_quality) -> dict:  # fmt: skip

    splits: dict[str, dict] = {}
    names: dict[str, list[str]] = {}  # split -> source name of each stored sample
    skipped: list[dict] = []
    first_key = 0
    pool = ProcessPoolExecutor(workers, initializer=ignore_sigint) if workers > 1 else None
    try:
        if pool is not None:
            # Start the workers now, before a live tqdm bar starts its monitor thread: with the fork start method
            # a child forked from a parent that has threads can deadlock on a lock held by one of them.
            pool.submit(int).result()
        for plan in source.splits:
            split_manifest, split_skipped = convert_split(
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
                names[plan.name] = stored_names(plan, split_skipped, split_manifest["count"])
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
    names_entries = {split: write_names(dst, split, split_names) for split, split_names in names.items()}
    written |= {entry["name"] for entry in names_entries.values()}
    ffcv = None
    if write_betons is not None:
        if progress:
            print(f"{PROG}: writing {', '.join(beton_name(s) for s in splits)}", file=sys.stderr)
        try:
            ffcv = write_betons(dst, {"splits": splits}, max_side=ffcv_max_side, quality=ffcv_quality,
                                workers=max(1, workers), progress=progress)
        except DatasetFormatError as e:  # a shard (of an earlier, resumed run) damaged on disk since
            raise OutputError(str(e)) from e
        written |= {f["name"] for f in ffcv["files"].values()}
    remove_stale_outputs(dst, written)
    manifest = {
        "classes": source.classes,
        "splits": splits,
        "source": source.info,
        "settings": settings,
        "skipped": source.problems + skipped,
        "names": names_entries,
    }
    if ffcv is not None:
        manifest["ffcv"] = ffcv
    write_manifest(dst, manifest)  # last and atomic: its presence means the dataset is complete
    journal.remove()
    out = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **manifest}
    if journal.resumed:
        out["resumed_shards"] = journal.resumed  # for the summary; not in manifest.json (same bytes as a clean run)
    return out
