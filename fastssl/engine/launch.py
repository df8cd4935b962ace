"""How this process was launched, and so the command that continues its run (``resume=auto``): the
``fastssl-submit`` command of a job it submitted (its script exports it as ``FASTSSL_RESUBMIT``), ``sbatch`` of
another SLURM job's script, the ``torchrun`` command of a torchrun worker, or the plain ``python`` command.
Error messages end with it, so that what to run next is one copy away."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence

RESUBMIT_VAR = "FASTSSL_RESUBMIT"


def resume_command(extra_overrides: Sequence[str] = (), environ: Mapping[str, str] = os.environ,
                   argv: Sequence[str] | None = None, job_script: str | None = None) -> str:
    """The command that resumes this run, with ``extra_overrides`` (``key=value``, which win over earlier ones)
    appended. ``job_script``: the batch script of a SLURM job not submitted by fastssl-submit (default: asked of
    ``scontrol``)."""
    extra = [shlex.quote(o) for o in extra_overrides]
    resubmit = environ.get(RESUBMIT_VAR)
    if resubmit:
        return " ".join([resubmit, *extra])
    argv = list(sys.argv if argv is None else argv)
    jid = environ.get("SLURM_JOB_ID")
    if jid and "SLURM_STEP_NUM_TASKS" in environ and "TORCHELASTIC_RUN_ID" not in environ:
        if job_script is None:
            from fastssl.engine.slurm_job import job_record

            job_script = (job_record(jid) or {}).get("Command")
        if job_script and not extra:
            return f"sbatch {shlex.quote(job_script)}"
        return f"{'sbatch ' + shlex.quote(job_script) if job_script else 'your job script'} with its training " \
               f"command ending in {' '.join(extra)}"
    if "TORCHELASTIC_RUN_ID" in environ:
        local = int(environ.get("LOCAL_WORLD_SIZE", "1"))
        nodes = max(1, int(environ.get("WORLD_SIZE", "1")) // max(local, 1))
        prefix = ["torchrun", f"--nproc_per_node={local}"]
        if nodes > 1:
            prefix += [f"--nnodes={nodes}", "<your rendezvous options>"]
        return " ".join([*prefix, *map(shlex.quote, argv), *extra])
    return " ".join([shlex.quote(sys.executable), *map(shlex.quote, argv), *extra])
