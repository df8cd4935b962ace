"""Writing shards and .beton files: the encoded samples of a split, in plan order, into shards written
atomically (each finished shard recorded in the journal), and the FFCV files made from them."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

from fastssl.convert.errors import ConvertError, output_error
from fastssl.convert.find import SplitPlan
from fastssl.convert.image import KEPT, REENCODED, RESIZED, Result
from fastssl.convert.resume import JOURNAL, Journal
from pipelines.formats import MANIFEST, NAMES_SUFFIX, SPLITS, ShardWriter
from pipelines.progress import progress_bar

DEFAULT_SHARD_SIZE = 10_000  # Fashion-MNIST: 6 train shards + 1 val shard, enough to spread over ranks
FORMATS = ("wds", "ffcv")  # wds: the shards every backend's manifest points at; ffcv: plus <split>.beton
DEFAULT_FFCV_MAX_SIDE = 512
DEFAULT_FFCV_QUALITY = 90
FFCV_MAX_SIDE_LIMIT = 65535  # FFCV stores image sides as uint16
FFCV_INSTALL = "pip install -e '.[ffcv]' (with the apt packages pkg-config libturbojpeg0-dev libopencv-dev)"

# Files this tool writes into DST; anything else there is left alone.
_SPLIT_ALTERNATIVES = "|".join(SPLITS)
_OUTPUTS = rf"(?:{_SPLIT_ALTERNATIVES})(?:-\d{{5}}\.(?:tar|idx)|\.beton|{re.escape(NAMES_SUFFIX)})"
_OUTPUT_FILE = re.compile(_OUTPUTS)
_OUTPUT_TEMP = re.compile(rf"\.(?:{_OUTPUTS}|{re.escape(JOURNAL)})\..*tmp")


def _ordered_results(
    plan: SplitPlan, pool: ProcessPoolExecutor | None, workers: int, start: int = 0
) -> Iterator[Result]:
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


def convert_split(
    plan: SplitPlan,
    dst: Path,
    *,
    first_key: int,
    num_classes: int,
    shard_size: int,
    pool: ProcessPoolExecutor | None,
    workers: int,
    progress: bool,
    journal: Journal,
) -> tuple[dict, list[dict]]:
    """Encode the samples of ``plan`` (in ``pool``, or here without one) into shards of ``shard_size`` in ``dst``,
    keys numbered from ``first_key``, each finished shard recorded in ``journal``; a resumed split keeps the
    journal's shards that still verify and starts after them. Returns the split's manifest entry
    (count, shards, class_counts, stored) and its skipped samples; a write failure raises OutputError."""
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
    bar = progress_bar(total=len(plan.names), initial=start, desc=plan.name, unit="img", file=sys.stderr,
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
            raise output_error(e, target) from e
        raise
    finally:
        bar.close()
    count = sum(s["count"] for s in shards)
    return {"count": count, "shards": shards, "class_counts": class_counts, "stored": stats}, skipped


def prepare_dst(dst: Path, overwrite: bool) -> None:
    """Create ``dst``; an earlier dataset there is refused, or with ``overwrite`` loses its manifest first."""
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
        raise output_error(e, dst) from e


def remove_stale_outputs(dst: Path, keep: set[str]) -> None:
    """Delete shards/indexes of an earlier run that this run did not rewrite, and dead temp files."""
    for entry in os.scandir(dst):
        name = entry.name
        stale = _OUTPUT_FILE.fullmatch(name) and name not in keep
        if stale or _OUTPUT_TEMP.fullmatch(name):
            os.unlink(entry.path)


def ignore_sigint() -> None:
    """Worker initializer: Ctrl-C reaches the whole process group; only the parent handles it (abort the open
    shard, print one line) instead of every worker printing a KeyboardInterrupt traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    """``--formats`` ("wds" or "wds,ffcv", or a sequence) as a tuple in FORMATS order; ConvertError if invalid."""
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


def import_ffcv_writer():
    """``pipelines.ffcv_loader.write_betons``, or a ConvertError saying how to install FFCV."""
    try:
        from pipelines.ffcv_loader import write_betons
    except (ImportError, OSError) as e:  # OSError: ffcv's C library without libturbojpeg / OpenCV
        raise ConvertError(f"--formats ffcv needs FFCV ({type(e).__name__}: {e}); {FFCV_INSTALL}") from e
    return write_betons
