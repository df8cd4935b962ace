"""The SLURM layer inside a job: ranks from SLURM's variables, and what a stop does to the job.

How a job runs (``fastssl-submit`` writes it so; a hand-written ``sbatch`` script can do the same): ``srun``
starts one task per GPU (``--ntasks-per-node`` = GPUs per node), and each task is one rank. When torchrun's
``RANK`` is absent, :func:`rank_env` derives torchrun's variables from SLURM's: ``RANK`` = ``SLURM_PROCID``,
``WORLD_SIZE`` = ``SLURM_STEP_NUM_TASKS``, ``LOCAL_RANK`` = ``SLURM_LOCALID``, ``LOCAL_WORLD_SIZE`` from
``SLURM_STEP_TASKS_PER_NODE``, ``MASTER_ADDR`` = the first host of the step's node list, ``MASTER_PORT`` from the
job id. Why not torchrun once per node: SLURM signals every process of a step, and torchrun neither handles nor
forwards SIGUSR1 (the time-limit warning's usual signal): it would die of it and orphan its workers. With srun
each rank gets the signal itself, and ``srun --kill-on-bad-exit`` stops every rank when one dies.

After a stop (the trainer's all-reduced stop flag: every rank finished the same step and the checkpoint is
written), :func:`stop_outcome` decides on rank 0 from the signal and the job's record in ``scontrol``:

* SIGUSR1 (``--signal=USR1@N``: the time limit is N s away), or SIGTERM while the job still runs (a
  preemption's grace period): requeue the job (``scontrol requeue``), at most ``slurm.max_requeues`` times, and
  exit 0; the requeued job resumes with ``resume=auto``, same folder, same logger runs.
* SIGTERM after SLURM itself requeued the job (``scontrol requeue`` by someone, preemption in REQUEUE mode: its
  ``Restarts`` count is already past this run's ``SLURM_RESTART_COUNT``): nothing to do, exit 0.
* SIGTERM at the time limit itself (no ``--signal``, or it came too late; Reason=TimeLimit): requeue, as above.
* SIGTERM of a cancelled job (``scancel``: the job is no longer RUNNING): no requeue; exit 128 + signal.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def job_id(environ: Mapping[str, str] = os.environ) -> str | None:
    return environ.get("SLURM_JOB_ID") or None


def restart_count(environ: Mapping[str, str] = os.environ) -> int:
    """How many times this job was requeued before this run (0 for its first run)."""
    return int(environ.get("SLURM_RESTART_COUNT") or 0)


def is_requeue(environ: Mapping[str, str] = os.environ) -> bool:
    return job_id(environ) is not None and restart_count(environ) > 0


# --------------------------------------------------------------------------------------------- ranks
def expand_counts(spec: str) -> list[int]:
    """SLURM's compressed per-node counts: ``"8(x4)"`` -> [8, 8, 8, 8]; ``"2(x2),1"`` -> [2, 2, 1]."""
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise ValueError(f"cannot read SLURM task counts {spec!r} (expected e.g. 8(x4) or 2(x2),1)")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def _split_top(text: str) -> list[str]:
    """Split at the commas outside brackets: ``"a[1-2,4],b"`` -> ["a[1-2,4]", "b"]."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in (p.strip() for p in parts) if p]


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list, as ``scontrol show hostnames`` lists it first: ``"gpu[007-010,3]"``
    -> ``gpu007`` (zero padding kept), ``"a[1-2]b[3-4]"`` -> ``a1b3``."""
    entries = _split_top(nodelist)
    if not entries:
        raise ValueError("empty SLURM node list")
    # The first number (or range start) of each bracket; the width of a zero-padded range is kept.
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0].strip(), entries[0])


def rendezvous_port(environ: Mapping[str, str] = os.environ) -> int:
    """A port per job run, 20000-39999: jobs sharing a node get different ones, and a requeued run does not meet
    its previous run's sockets."""
    jid = int(environ.get("SLURM_JOB_ID") or 0)
    return 20000 + (jid * 7 + restart_count(environ) * 1009) % 20000


def rank_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """torchrun's variables for a task that ``srun`` started (one rank per task), from SLURM's; empty when
    torchrun's ``RANK`` is set already, or outside an srun step (a batch script itself is one process)."""
    if "RANK" in environ or "SLURM_STEP_NUM_TASKS" not in environ or "SLURM_PROCID" not in environ:
        return {}
    world = int(environ["SLURM_STEP_NUM_TASKS"])
    node = int(environ.get("SLURM_NODEID", "0"))
    per_node = expand_counts(environ.get("SLURM_STEP_TASKS_PER_NODE", str(world)))
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "localhost"
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(per_node[node] if node < len(per_node) else per_node[-1]),
        "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(nodelist),
        "MASTER_PORT": environ.get("MASTER_PORT") or str(rendezvous_port(environ)),
    }


def export_rank_env() -> dict[str, str]:
    """Put :func:`rank_env` into ``os.environ`` (where everything else reads a rank: the process group, the
    logging of rank 0, torchrun-aware code). Returns what it set."""
    env = rank_env()
    os.environ.update(env)
    return env


# --------------------------------------------------------------------------------------------- requeue
def job_record(jid: str, timeout: float = 30.0) -> dict[str, str] | None:
    """``scontrol show job -o JID`` as a dict (JobState, Restarts, ...); None when scontrol fails."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True,
                             timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return dict(tok.split("=", 1) for tok in out.stdout.split() if "=" in tok)


@dataclass(frozen=True)
class StopOutcome:
    """What a stop does to the SLURM job: ``requeue`` it (rank 0 runs ``scontrol requeue`` once every rank is
    ready to exit), the ``note`` that ends the stop message, and the exit ``status``."""

    requeue: bool
    note: str
    status: int


def stop_outcome(signum: int, max_requeues: int, resubmit: str, environ: Mapping[str, str] = os.environ,
                 record=job_record) -> StopOutcome:
    """Decide what a stop by ``signum`` does (rank 0; see the module docstring). ``resubmit``: the command that
    continues the run, for the messages; ``record``: ``job_record`` (a stand-in in tests)."""
    jid = job_id(environ)
    plain = StopOutcome(False, "", 128 + signum)
    if jid is None or signum not in REQUEUE_SIGNALS:
        return plain
    done = restart_count(environ)
    info = record(jid)
    if info is None:
        return StopOutcome(False, f"SLURM job {jid}: scontrol cannot show the job, so it is not requeued; to go on: "
                                  f"{resubmit}", 128 + signum)
    restarts = int(info.get("Restarts", done) or 0)
    if restarts > done:
        return StopOutcome(False, f"SLURM requeues job {jid} itself (scontrol requeue or a preemption): its next run "
                                  f"resumes from this checkpoint", 0)
    state = info.get("JobState", "?")
    # The time limit itself (SIGTERM, KillWait seconds before SIGKILL; no --signal, or it came too late): the job
    # is COMPLETING with Reason=TimeLimit, and a finished job may still be requeued.
    at_limit = state == "TIMEOUT" or info.get("Reason") == "TimeLimit"
    if state != "RUNNING" and not at_limit:
        return StopOutcome(False, f"SLURM job {jid} was cancelled (JobState={state}), so it is not requeued; to go "
                                  f"on: {resubmit}", 128 + signum)
    if done >= max_requeues:
        return StopOutcome(False, f"SLURM job {jid} is not requeued: it was requeued {done} times already "
                                  f"(slurm.max_requeues={max_requeues}); to go on: {resubmit}", 128 + signum)
    return StopOutcome(True, f"SLURM job {jid} requeued itself (requeue {done + 1} of at most {max_requeues}): its "
                             f"next run resumes from this checkpoint", 0)


def requeue(outcome: StopOutcome, signum: int, resubmit: str, environ: Mapping[str, str] = os.environ) -> StopOutcome:
    """Run ``scontrol requeue`` for a ``stop_outcome`` that asks for it; a failure becomes the outcome (its note
    quotes scontrol, status 128 + signal)."""
    if not outcome.requeue:
        return outcome
    jid = job_id(environ)
    try:
        out = subprocess.run(["scontrol", "requeue", str(jid)], capture_output=True, text=True, timeout=60)
        error = "" if out.returncode == 0 else (out.stderr.strip() or out.stdout.strip()
                                                or f"exit status {out.returncode}")
    except (OSError, subprocess.TimeoutExpired) as e:
        error = str(e)
    if not error:
        return outcome
    return StopOutcome(False, f"SLURM job {jid} could not requeue itself (scontrol requeue: {error}); to go on: "
                              f"{resubmit}", 128 + signum)


def diverged_note(environ: Mapping[str, str] = os.environ) -> str:
    """Said after a divergence inside a SLURM job: why the job ends failed instead of requeueing."""
    jid = job_id(environ)
    if jid is None:
        return ""
    return (f" SLURM job {jid} ends failed and is not requeued: a run resumed from the newest checkpoint would "
            f"diverge again.")
