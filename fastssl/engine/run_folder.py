"""A run owns its folder: ``OUT_DIR/run.lock``, locked by the process that writes the run (rank 0) for as long
as it lives.

A second run on the same folder (a user who submits twice, a requeued job that starts before the old job has
died) is refused with one line naming the holder: host, pid, since when, and its SLURM job. A requeued job
(``SLURM_RESTART_COUNT`` > 0) first waits up to ``slurm.lock_wait_s`` for the old job to let go.

Why a POSIX record lock (``fcntl.lockf``) and not ``flock``: the kernel drops a record lock when its process
dies, SIGKILL included, while an ``flock`` lives on in every forked child that inherited the descriptor, and
the DataLoader's workers are forked children (measured here: a forked child kept an ``flock`` after its
parent's SIGKILL, and not a ``lockf``). Record locks also work across the nodes of an NFS mount. Their one
trap: closing *any* descriptor of the file in the holding process drops the lock, so the holder never opens the
file again (the holder's facts are read only by the process that is refused). A process-wide registry refuses
a second hold of the same folder within one process, which record locks alone would grant.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

LOCK_NAME = "run.lock"
_HELD: dict[str, RunFolderLock] = {}  # realpath of the folder -> the lock this process holds on it
# errno values of a file system that has no locks (Lustre mounted without -o flock, some FUSE): run unlocked
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class RunFolderBusy(RuntimeError):
    """Another live run holds the run folder; the message names it and the ways out."""

    exit_status = 3  # of fastssl/train.py


def _holder_facts() -> dict:
    facts = {"host": socket.gethostname(), "pid": os.getpid(), "since": datetime.now().isoformat(timespec="seconds")}
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        facts["slurm_job"] = job
    return facts


def describe_holder(facts: dict | None) -> str:
    """``host vm, pid 123, since 2026-12-07T13:00:00, SLURM job 45`` from the facts a holder wrote."""
    if not facts:
        return "a process that has not yet written its name"
    parts = [f"host {facts.get('host', '?')}", f"pid {facts.get('pid', '?')}", f"since {facts.get('since', '?')}"]
    if facts.get("slurm_job"):
        parts.append(f"SLURM job {facts['slurm_job']}")
    return ", ".join(parts)


class RunFolderLock:
    """The hold of this process on ``folder`` (``acquire`` / ``release``, or a ``with`` block)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self._created_folder = False
        self.locked = False  # False after acquire only where the file system has no locks

    def read_holder(self) -> dict | None:
        """The facts the holder wrote (None when the file is missing, empty or being written). Never call it in
        the holding process: closing the descriptor it opens would drop the hold."""
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None

    def acquire(self, wait_s: float = 0.0, on_wait: Callable[[str], None] | None = None) -> None:
        """Hold the folder (created if needed). When another process holds it: wait up to ``wait_s`` seconds
        (``on_wait`` gets one line saying so), then raise RunFolderBusy."""
        key = os.path.realpath(self.folder)
        if key in _HELD:
            raise RunFolderBusy(f"{self.folder}: this process already runs in this folder; use another out_dir")
        self._created_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + wait_s
        waited = False
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.locked = True
                break
            except OSError as e:
                if e.errno in _NO_LOCKS:
                    if on_wait is not None:
                        on_wait(f"warning: {self.path}: this file system does not support locks ({e.strerror}); the "
                                f"run folder is not protected against a second run")
                    break
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            holder = describe_holder(self.read_holder())
            if time.monotonic() >= deadline:
                os.close(fd)
                self._remove_if_created()
                waited_note = f" (waited {wait_s:g} s)" if waited else ""
                raise RunFolderBusy(
                    f"{self.folder} is in use by another live run: {holder}{waited_note}. Wait for it to end, stop "
                    f"it (kill -TERM on that host, or scancel its job: it saves a checkpoint first), or give this "
                    f"run another out_dir")
            if not waited and on_wait is not None:
                on_wait(f"{self.folder} is held by {holder}; waiting up to {wait_s:g} s for that run to end")
            waited = True
            time.sleep(min(0.5, max(deadline - time.monotonic(), 0.0)))
        # Written in place, never replaced: the lock belongs to this inode.
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder_facts()) + "\n").encode(), 0)
        self._fd = fd
        _HELD[key] = self

    def release(self) -> None:
        """Let go of the folder (closing the descriptor drops the lock). The lock file stays: removing it would
        let a waiting run lock a file that a third run then no longer sees."""
        if self._fd is None:
            return
        _HELD.pop(os.path.realpath(self.folder), None)
        os.close(self._fd)
        self._fd = None
        self._remove_if_created()

    def _remove_if_created(self) -> None:
        """A run refused before it wrote anything leaves no run folder behind (only when this run created it)."""
        if self._created_folder:
            try:
                if [p.name for p in self.folder.iterdir()] == [LOCK_NAME]:
                    self.path.unlink()
                    self.folder.rmdir()
            except OSError:
                pass

    def __enter__(self) -> RunFolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def hold_run_folder(folder: str | os.PathLike, *, is_main: bool, wait_s: float,
                    agree: Callable[[str | None], str | None], say: Callable[[str], None]) -> RunFolderLock | None:
    """Rank 0 holds ``folder``; every rank learns the outcome through ``agree`` (a broadcast from rank 0) and raises
    the same RunFolderBusy when it is refused. Returns rank 0's lock (None on the other ranks)."""
    lock, refused = None, None
    if is_main:
        lock = RunFolderLock(folder)
        try:
            lock.acquire(wait_s, on_wait=say)
        except RunFolderBusy as e:
            refused, lock = str(e), None
    refused = agree(refused)
    if refused is not None:
        raise RunFolderBusy(refused)
    return lock
