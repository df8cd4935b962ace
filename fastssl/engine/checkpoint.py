"""Checkpoints: written atomically, verified when read, loaded with ``weights_only=True``.

A checkpoint is a plain dict of tensors and Python scalars/containers only, so loading a downloaded
file never executes pickled code.

A run's ``checkpoints/`` folder (:class:`CheckpointDir`)::

    step-000120.pt  step-000180.pt  step-000240.pt    the newest ``train.keep_checkpoints`` saves
    last.pt                                           a hard link to the newest (a copy where links fail)

Every file is written to a temp file in the same folder, fsynced, renamed over its name, and the folder
is fsynced, so a crash or a kill at any moment leaves each name holding a complete file. ``last.pt`` is a
second name of the newest step file (no extra disk space, and it stays a whole checkpoint when that step
file is pruned). ``torch.load`` does not check the CRC-32 that the zip format records for each member
(a flipped byte inside a tensor loads silently), so :func:`load_checkpoint` checks them first; a
truncated or corrupt file is refused with an error naming it, and ``resume=auto`` moves on to the next
newest (:meth:`CheckpointDir.newest_valid`).

A checkpoint that does not fit on its disk raises :class:`CheckpointDiskFull` (path, bytes needed, bytes free,
the last good checkpoint), and the temp file goes; once a checkpoint's size is known, a save that leaves less
room than one more checkpoint warns, a whole checkpoint interval before the disk runs out.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from pipelines import progress
from pipelines.formats import atomic_writer

STEP_FILE = re.compile(r"^step-(\d+)\.pt$")
LAST = "last.pt"


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the folder's entries (a rename, a new link) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` (temp file in the same folder, fsync, rename, fsync the folder); a crash
    mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as f:
        torch.save(state, f)
    fsync_dir(path.parent)


def load_checkpoint(path: str | os.PathLike, map_location="cpu", verify: bool = True) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (no pickled code is executed).

    verify: first check every zip member's CRC-32 (one extra read of the file); a truncated or corrupt
    file raises ValueError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        if verify:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            if bad is not None:
                raise ValueError(f"member {bad} fails its CRC-32 check")
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, corrupt or not ours
        raise ValueError(f"{path}: cannot be read as a fastssl checkpoint ({type(e).__name__}: {e})") from e


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class CheckpointDiskFull(RuntimeError):
    """A checkpoint did not fit on its disk; the message says how much it needs, what is free, and which
    checkpoint to resume from (nothing was lost: the temp file is gone, the earlier checkpoints are whole)."""

    exit_status = 4  # of fastssl/train.py

    def __init__(self, path: Path, needed: int, free: int, last_good: Path | None):
        self.path, self.needed, self.free, self.last_good = path, needed, free, last_good
        room = f"free {needed - free} bytes or more" if needed > free else \
            "free space (the write failed though the space looks enough: a quota, or no inodes left?)"
        resume = (f"the last good checkpoint is {last_good}; {room} (or move out_dir, or lower "
                  f"train.keep_checkpoints), then run the same command again: resume=auto continues from it"
                  ) if last_good is not None else f"no earlier checkpoint exists; {room} and start again"
        super().__init__(f"the disk is full: checkpoint {path} needs {needed} bytes, {free} bytes are free on its "
                         f"file system; {resume}")

    def __reduce__(self):  # raised again on the other ranks (broadcast)
        return type(self), (self.path, self.needed, self.free, self.last_good)


def _is_disk_full(error: BaseException) -> bool:
    """ENOSPC / EDQUOT anywhere in the chain: torch.save turns the file's OSError into a RuntimeError of its own
    ("unexpected pos ...") with the OSError as its context."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            return True
        error = error.__cause__ or error.__context__
    return False


class _ByteCounter:
    """A file-like sink that only counts: the exact size of ``torch.save(state)`` without a disk."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data) -> int:
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def serialized_size(state: dict) -> int:
    """Bytes ``torch.save(state)`` writes (one serialization into a counter)."""
    counter = _ByteCounter()
    torch.save(state, counter)
    return counter.size


class CheckpointDir:
    """The ``step-XXXXXX.pt`` files of one run, ``last.pt``, and which ones to keep.

    ``keep``: how many step files survive a save (the newest by step number).
    """

    def __init__(self, folder: str | os.PathLike, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep={keep}: must be >= 1")
        self.folder, self.keep = Path(folder), int(keep)
        self._space_warned = False

    @property
    def last(self) -> Path:
        return self.folder / LAST

    def path_for(self, step: int) -> Path:
        return self.folder / f"step-{step:06d}.pt"

    def step_files(self) -> list[tuple[int, Path]]:
        """(step, path) of every step file, newest first."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := STEP_FILE.match(p.name))]
        return sorted(found, reverse=True)

    def save(self, state: dict, step: int) -> Path:
        """Write ``state`` as the checkpoint of ``step``, point ``last.pt`` at it, prune. Returns its path.

        Step files of later steps (a timeline abandoned by resuming from an older checkpoint, or files
        ``newest_valid`` skipped as corrupt) are deleted, so the newest step file is always this one.
        """
        path = self.path_for(step)
        try:
            save_checkpoint(state, path)
        except Exception as e:
            if not _is_disk_full(e):
                raise
            files = [p for s, p in self.step_files() if p != path]
            raise CheckpointDiskFull(path, serialized_size(state), shutil.disk_usage(self.folder).free,
                                     files[0] if files else None) from None
        self._link_last(path)
        files = self.step_files()
        later = [p for s, p in files if s > step]
        for p in later:
            warnings.warn(f"{p}: removed, a checkpoint of a later step than this run's {step}", stacklevel=2)
        for p in later + [p for s, p in files if s <= step][self.keep:]:
            p.unlink(missing_ok=True)
        fsync_dir(self.folder)
        self.warn_if_next_will_not_fit()
        return path

    def space_warning(self) -> str | None:
        """A warning when the free space of the folder's file system is less than the newest checkpoint's size,
        which the next save needs (it writes before it prunes); None when there is room or nothing to measure."""
        files = self.step_files()
        if not files:
            return None
        size = files[0][1].stat().st_size
        free = shutil.disk_usage(self.folder).free
        if free >= size:
            return None
        return (f"warning: {self.folder}: {free} bytes free, and a checkpoint takes {size} bytes (the size of "
                f"{files[0][1].name}): the next checkpoint will not fit. Free space now (or move out_dir, or lower "
                f"train.keep_checkpoints); the run goes on, and if the disk is still full at the next checkpoint it "
                f"stops there, {files[0][1].name} intact")

    def warn_if_next_will_not_fit(self) -> None:
        """Print ``space_warning`` once, and again only after the disk had room in between."""
        message = self.space_warning()
        if message is not None and not self._space_warned:
            progress.write(message)
        self._space_warned = message is not None

    def _link_last(self, path: Path) -> None:
        tmp = self.folder / f".{LAST}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
            os.replace(tmp, self.last)
        except OSError:  # a file system without hard links: a copy, written atomically too
            tmp.unlink(missing_ok=True)
            with open(path, "rb") as src, atomic_writer(self.last) as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        fsync_dir(self.folder)

    def remove_temp_files(self) -> None:
        """Delete temp files a killed writer left behind (``.step-*.pt.*.tmp``, ``.last.pt.*.tmp``)."""
        if self.folder.is_dir():
            for p in self.folder.iterdir():
                if p.name.startswith((".step-", f".{LAST}.")) and p.name.endswith(".tmp"):
                    p.unlink(missing_ok=True)

    def newest_valid(self, required: tuple[str, ...] = ("model", "step")) -> tuple[Path, dict] | None:
        """The newest step file that loads, passes its CRC check and holds the ``required`` keys, with its
        state; ``last.pt`` when no step file does (runs from before step files). Each file skipped is named
        in a warning. None when there is nothing to resume from."""
        candidates = [p for _, p in self.step_files()]
        if not candidates and self.last.is_file():
            candidates = [self.last]
        for path in candidates:
            try:
                state = load_checkpoint(path)
                missing = [k for k in required if k not in state]
                if missing:
                    raise ValueError(f"{path}: not a training checkpoint (no {', '.join(missing)})")
            except ValueError as e:
                warnings.warn(f"resume=auto: skipping {path}, it is truncated or corrupt: {e}", stacklevel=2)
                continue
            return path, state
        return None


def rng_state() -> dict:
    """Every RNG the run draws from: Python, NumPy, torch CPU and CUDA (as tensors and plain values)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
