"""A data-loader worker that died (the out-of-memory killer's usual victim on a shared node), told in one line.

PyTorch's DataLoader reports a dead worker as a ``RuntimeError`` ("DataLoader worker (pid(s) N) exited
unexpectedly"), raised from the loader or from its SIGCHLD handler anywhere in the main thread, with the cause
("DataLoader worker (pid N) is killed by signal: Killed.") chained to it. :func:`find_worker_death` reads the
chain; :func:`describe_worker_death` names the worker, the signal, the likely cause, and the command that
resumes from the last checkpoint with fewer workers.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from pathlib import Path

_KILLED = re.compile(r"DataLoader worker \(pid (\d+)\) is killed by signal: ([^.]+)")
_EXIT_CODE = re.compile(r"DataLoader worker \(pid (\d+)\) exited unexpectedly with exit code (-?\d+)")
_EXITED = re.compile(r"DataLoader worker \(pid\(s\) ([\d, ]+)\) exited unexpectedly")
# strsignal's text ("Killed", "Segmentation fault") -> the signal
_BY_TEXT = {signal.strsignal(s): s for s in signal.Signals if signal.strsignal(s)}


@dataclass(frozen=True)
class WorkerDeath:
    pid: str  # one pid, or several "12, 13" when the loader only knew that they had gone
    signum: int | None = None  # the signal that killed it, when known
    exit_code: int | None = None


def find_worker_death(error: BaseException) -> WorkerDeath | None:
    """The dead worker an exception reports (searching its cause/context chain), or None."""
    found: WorkerDeath | None = None
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error)
        if m := _KILLED.search(text):
            sig = _BY_TEXT.get(m.group(2).strip())
            return WorkerDeath(m.group(1), signum=int(sig) if sig is not None else None)
        if m := _EXIT_CODE.search(text):
            found = found or WorkerDeath(m.group(1), exit_code=int(m.group(2)))
        elif m := _EXITED.search(text):
            found = found or WorkerDeath(m.group(1).strip())
        error = error.__cause__ or error.__context__
    return found


def _memory_now() -> str:
    """``12.1 of 24.0 GiB available`` from /proc/meminfo ('' where there is none)."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        avail, total = (int(info[k].split()[0]) / 2**20 for k in ("MemAvailable", "MemTotal"))
    except (OSError, KeyError, ValueError):
        return ""
    return f"; {avail:.1f} of {total:.1f} GiB memory available now"


def describe_worker_death(death: WorkerDeath, *, rank: int, num_workers: int | None, cache: str,
                          checkpoint: Path | None, resume: str) -> str:
    """One line: which worker of which rank, how it ended, the likely cause, and the resume command (which
    already carries the suggested ``data.num_workers``)."""
    who = f"rank {rank}: data-loader worker (pid {death.pid})"
    workers = f"data.num_workers={num_workers}" if num_workers is not None else "data.num_workers (default)"
    if death.signum == signal.SIGKILL:
        what = (f"{who} was killed by SIGKILL, most likely by the out-of-memory killer (the kernel's, or the job's "
                f"memory limit): each of this rank's loader workers ({workers}, data.cache={cache}) holds its own "
                f"decode buffers and batches in memory{_memory_now()}; fewer workers need less")
    elif death.signum == signal.SIGBUS:
        what = (f"{who} was killed by SIGBUS, most likely because /dev/shm, where the workers hand over their "
                f"batches, is full ({workers}); fewer workers need less")
    elif death.signum == signal.SIGSEGV:
        what = f"{who} crashed (SIGSEGV) inside a decoder ({workers})"
    elif death.signum is not None:
        what = f"{who} was killed by {signal.Signals(death.signum).name} (sent by someone or something on this host)"
    elif death.exit_code is not None:
        what = f"{who} exited unexpectedly with status {death.exit_code}"
    else:
        what = f"{who} exited unexpectedly, without a status (likely killed, often by the out-of-memory killer)"
    then = f"To resume from {checkpoint}" if checkpoint is not None else "No checkpoint yet; to start again"
    return f"{what}. {then}: {resume}"
