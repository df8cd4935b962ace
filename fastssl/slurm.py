"""fastssl-submit (also ``python -m fastssl.slurm``): submit a training run to a SLURM cluster in one command.

    fastssl-submit --config byol_resnet50_imagenet --gpus-per-node 8 --time 24:00:00 --partition gpu \\
        data.path=/shared/imagenet                                        # 1 node x 8 GPUs
    fastssl-submit --config byol_resnet50_imagenet --nodes 4 --gpus-per-node 8 --time 24:00:00 \\
        --partition gpu --account myproj data.path=/shared/imagenet      # 4 nodes x 8 GPUs
    fastssl-submit ... --dry-run                                          # print the sbatch script only

The run gets a stable name (``--name``, default ``<recipe>-<date>-<time>``) and its folder (``--runs-dir/NAME``,
or ``out_dir=``); the script is written there as ``job.sbatch`` and the job's log is ``slurm-<job id>.out``
beside it. ``srun`` starts one task per GPU and each task is a rank (fastssl/engine/slurm_job.py reads SLURM's
variables). SLURM sends SIGUSR1 ``--signal-seconds`` before the time limit: every rank finishes the same step, the
checkpoint is written, the job requeues itself (at most ``slurm.max_requeues`` times) and the requeued job resumes
in the same folder (``resume=auto``), TensorBoard and W&B runs included. On preemption (SIGTERM) it is the same.
Submitting again with the same ``--name`` continues the run.

Why plain sbatch rather than submitit: the job is a script a person can read, edit and resubmit (``sbatch
RUN/job.sbatch``), ``--dry-run`` prints exactly what SLURM gets, and nothing is pickled, so a requeued job runs
whatever fastssl is installed then. submitit's own checkpoint-and-requeue handler would also stand beside the
trainer's signal handling, which must stop every rank at the same step (an all-reduced flag) before anything is
saved; SLURM's ``--signal`` and one ``scontrol requeue`` are all that the requeue needs.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

DEFAULT_SIGNAL_SECONDS = 180


class SubmitError(ValueError):
    """A submit option that cannot work; the message names it."""


@dataclass
class JobSpec:
    """What one submission asks of SLURM and of the trainer."""

    config: str
    overrides: list[str]
    name: str
    out_dir: Path
    workdir: Path
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int = 8
    cpus_per_task: int | None = 8
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    constraint: str | None = None
    qos: str | None = None
    mem: str | None = None
    signal_seconds: int = DEFAULT_SIGNAL_SECONDS
    sbatch_lines: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    python: str = sys.executable
    entry: str = "fastssl.train"  # a module, or a .py script that registers its own methods, then trains
    resubmit: str = ""

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def time_limit_seconds(text: str) -> int:
    """SLURM's time formats -> seconds: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", text.strip())
    if m is None:
        raise SubmitError(f"--time {text}: not a SLURM time (MM, HH:MM:SS, D-HH:MM, ...)")
    parts = [int(x) for x in m.group(2).split(":")]
    if m.group(1) is not None:  # D-HH[:MM[:SS]]
        h, mi, sec = (parts + [0, 0])[:3]
        return int(m.group(1)) * 86400 + h * 3600 + mi * 60 + sec
    if len(parts) == 3:
        return parts[0] * 3600 + parts[1] * 60 + parts[2]
    return parts[0] * 60 + (parts[1] if len(parts) == 2 else 0)  # MM[:SS]


def _sbatch_line(text: str) -> str:
    text = text.strip()
    if text.startswith("#SBATCH"):
        return text
    if not text.startswith("-"):
        raise SubmitError(f"--sbatch {text!r}: give an sbatch option, e.g. --sbatch=--exclusive or "
                          f"--sbatch='--mail-type=END'")
    return f"#SBATCH {text}"


def _launch(spec: JobSpec) -> list[str]:
    entry = ["-m", spec.entry] if not spec.entry.endswith(".py") else [str(Path(spec.entry).resolve())]
    srun = ["srun", "--kill-on-bad-exit=1"]
    if spec.cpus_per_task:  # srun no longer takes it from the allocation (SLURM 22.05+): say it again
        srun.append(f"--cpus-per-task={spec.cpus_per_task}")
    return [*srun, spec.python, *entry, "--config", spec.config, f"out_dir={spec.out_dir}", *spec.overrides]


def build_script(spec: JobSpec, written: datetime | None = None) -> str:
    """The sbatch script of ``spec`` (what ``--dry-run`` prints and ``sbatch`` gets)."""
    written = written or datetime.now()
    gpus = f" x {spec.gpus_per_node} GPU(s)" if spec.gpus_per_node else f" x {spec.tasks_per_node} CPU task(s)"
    lines = [
        "#!/bin/bash",
        f"# fastssl-submit, {written.isoformat(timespec='seconds')}: run {spec.name} ({spec.config}), {spec.nodes} "
        f"node(s){gpus}.",
        "# One task per GPU; each task is a rank (fastssl reads SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID).",
        f"# SIGUSR1 {spec.signal_seconds} s before the time limit, or SIGTERM on preemption: every rank finishes the "
        "same step,",
        "# the checkpoint is written, and the job requeues itself; the requeued job resumes in the same folder.",
        f"#SBATCH --job-name={spec.name}",
        f"#SBATCH --nodes={spec.nodes}",
        f"#SBATCH --ntasks-per-node={spec.tasks_per_node}",
    ]
    if spec.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={spec.gpus_per_node}")
    if spec.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={spec.cpus_per_task}")
    for key in ("time", "partition", "account", "constraint", "qos", "mem"):
        value = getattr(spec, key)
        if value:
            lines.append(f"#SBATCH --{key}={value}")
    lines += [
        f"#SBATCH --signal=USR1@{spec.signal_seconds}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={spec.out_dir}/slurm-%j.out",
        f"#SBATCH --chdir={spec.workdir}",
        *(_sbatch_line(x) for x in spec.sbatch_lines),
        "",
        *spec.setup,
        f"export FASTSSL_RESUBMIT={shlex.quote(spec.resubmit)}",
        'echo "fastssl-submit: job ${SLURM_JOB_ID} (requeued ${SLURM_RESTART_COUNT:-0} times so far) on '
        '${SLURM_JOB_NODELIST}, $(date -Iseconds)"',
        "# SLURM signals this shell too when it requeues or cancels the job; the ranks (srun's tasks) handle it.",
        "trap 'echo \"fastssl-submit: the batch shell got SIGTERM; the ranks finish their step and save\"' TERM",
        shlex.join(_launch(spec)),
        "status=$?",
        'echo "fastssl-submit: srun exited with status ${status}, $(date -Iseconds)"',
        "exit ${status}",
        "",
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastssl-submit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="recipe name in fastssl/configs or a YAML path")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the training config")
    p.add_argument("--name", help="the run's stable name: job name and folder (default: <recipe>-<date>-<time>); "
                                  "submit again with the same name to continue the run")
    p.add_argument("--runs-dir", default="runs", help="where run folders go (default: runs); out_dir= overrides it")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node, one rank each (0: a CPU job)")
    p.add_argument("--tasks-per-node", type=int, help="ranks per node (default: --gpus-per-node, or 1 without GPUs)")
    p.add_argument("--cpus-per-task", type=int, default=8, help="CPU cores per rank, for its loader (default 8; 0: "
                                                                "the partition's default)")
    p.add_argument("--time", help="time limit, e.g. 24:00:00 or 2-00:00:00 (default: the partition's)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--constraint")
    p.add_argument("--qos")
    p.add_argument("--mem", help="memory per node, e.g. 0 (all of it) or 480G (default: the partition's)")
    p.add_argument("--signal-seconds", type=int, default=DEFAULT_SIGNAL_SECONDS,
                   help=f"SIGUSR1 this many seconds before the time limit: time to finish a step and write a "
                        f"checkpoint (default {DEFAULT_SIGNAL_SECONDS})")
    p.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="an extra sbatch option, repeatable: --sbatch=--exclusive --sbatch='--mail-type=END'")
    p.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="a shell line run before the training, repeatable: --setup 'module load cuda' "
                        "--setup 'source ~/venv/bin/activate'")
    p.add_argument("--python", default=sys.executable, help="the Python on the nodes (default: this one)")
    p.add_argument("--entry", default="fastssl.train",
                   help="the training entry point: a module (default fastssl.train) or a .py script")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit and write nothing")
    return p


def _resubmit_command(args: argparse.Namespace, spec: JobSpec) -> str:
    """The command that submits this run again (same name and folder, same resources): the job's messages quote
    it, and fastssl-submit prints it."""
    exe = ["fastssl-submit"] if shutil.which("fastssl-submit") else [args.python, "-m", "fastssl.slurm"]
    argv = [*exe, "--config", spec.config, "--name", spec.name, "--nodes", str(spec.nodes),
            "--gpus-per-node", str(spec.gpus_per_node), "--tasks-per-node", str(spec.tasks_per_node),
            "--cpus-per-task", str(spec.cpus_per_task or 0), "--signal-seconds", str(spec.signal_seconds)]
    for key in ("time", "partition", "account", "constraint", "qos", "mem"):
        if getattr(spec, key):
            argv += [f"--{key}", getattr(spec, key)]
    for line in spec.sbatch_lines:
        argv.append(f"--sbatch={line}")
    for line in spec.setup:
        argv += ["--setup", line]
    argv += ["--python", spec.python]
    if spec.entry != "fastssl.train":
        argv += ["--entry", spec.entry]
    argv += [f"out_dir={spec.out_dir}", *spec.overrides]
    return f"cd {shlex.quote(str(spec.workdir))} && {shlex.join(argv)}"


def spec_from_args(args: argparse.Namespace, now: datetime | None = None) -> JobSpec:
    """Check the options and the training config (at the job's world size), and resolve names and paths.
    Raises SubmitError or fastssl.config.ConfigError, each naming the option or key."""
    from fastssl.config import load_config, recipe_path, validate

    if args.nodes < 1:
        raise SubmitError(f"--nodes {args.nodes}: must be >= 1")
    if args.gpus_per_node < 0 or (args.tasks_per_node is not None and args.tasks_per_node < 1):
        raise SubmitError("--gpus-per-node must be >= 0 and --tasks-per-node >= 1")
    tasks = args.tasks_per_node or args.gpus_per_node or 1
    if args.gpus_per_node and tasks != args.gpus_per_node:
        raise SubmitError(f"--tasks-per-node {tasks} with --gpus-per-node {args.gpus_per_node}: one rank per GPU, "
                          f"so leave --tasks-per-node out")
    if args.signal_seconds < 1:
        raise SubmitError(f"--signal-seconds {args.signal_seconds}: must be >= 1")
    if args.time is not None and time_limit_seconds(args.time) <= args.signal_seconds:
        raise SubmitError(f"--time {args.time} is not longer than --signal-seconds {args.signal_seconds}: the job "
                          f"would be told to stop before it starts; lower --signal-seconds")
    overrides = [o for o in args.overrides if not o.startswith("out_dir=")]
    out_dirs = [o.split("=", 1)[1] for o in args.overrides if o.startswith("out_dir=")]
    config = args.config
    recipe = recipe_path(config)  # an unknown recipe stops here
    if recipe.parent != Path(__file__).parent / "configs" or Path(config).suffix in (".yaml", ".yml"):
        config = str(recipe.resolve())  # a YAML file: the job may start in another folder
    now = now or datetime.now()
    name = args.name or (Path(out_dirs[-1]).name if out_dirs else f"{recipe.stem}-{now:%Y%m%d-%H%M%S}")
    if not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
        raise SubmitError(f"--name {name!r}: use letters, digits and . _ + - only (it names a folder and the job)")
    out_dir = Path(out_dirs[-1] if out_dirs else Path(args.runs_dir) / name).resolve()
    cfg = load_config(config, [*overrides, f"out_dir={out_dir}"])
    spec = JobSpec(config=config, overrides=overrides, name=name, out_dir=out_dir, workdir=Path.cwd(),
                   nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=tasks,
                   cpus_per_task=args.cpus_per_task or None, time=args.time, partition=args.partition,
                   account=args.account, constraint=args.constraint, qos=args.qos, mem=args.mem,
                   signal_seconds=args.signal_seconds, sbatch_lines=list(args.sbatch), setup=list(args.setup),
                   python=args.python, entry=args.entry)
    for line in spec.sbatch_lines:
        _sbatch_line(line)
    validate(cfg, spec.world_size)  # the global batch divides over the job's ranks, queues too
    spec.resubmit = _resubmit_command(args, spec)
    return spec


def submit(spec: JobSpec, script: str) -> str:
    """Write ``RUN/job.sbatch`` and submit it; returns the job id. Raises SubmitError with sbatch's message."""
    from pipelines.formats import atomic_write_bytes

    spec.out_dir.mkdir(parents=True, exist_ok=True)  # SLURM does not create the log's folder
    path = spec.out_dir / "job.sbatch"
    atomic_write_bytes(path, script.encode())
    try:
        out = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SubmitError("sbatch is not on PATH: run fastssl-submit on a SLURM login node (or see the script "
                          f"{path}, which --dry-run prints)") from None
    if out.returncode != 0:
        message = " ".join((out.stderr or out.stdout).split())
        raise SubmitError(f"sbatch refused {path}: {message}")
    return out.stdout.strip().split(";")[0]


def main(argv: list[str] | None = None) -> int:
    from fastssl.config import ConfigError

    parser = _parser()
    args = parser.parse_intermixed_args(argv)
    try:
        spec = spec_from_args(args)
    except (SubmitError, ConfigError) as e:
        parser.exit(2, f"fastssl-submit: error: {e}\n")
    script = build_script(spec)
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    try:
        job = submit(spec, script)
    except SubmitError as e:
        parser.exit(1, f"fastssl-submit: error: {e}\n")
    log = spec.out_dir / f"slurm-{job}.out"
    print(f"submitted SLURM job {job}: run {spec.name}, {spec.nodes} node(s) x {spec.tasks_per_node} rank(s), "
          f"folder {spec.out_dir}\n"
          f"  log:      tail -f {log}\n"
          f"  watch:    squeue -j {job}   (after it ends: sacct -j {job})\n"
          f"  cancel:   scancel {job}   (every rank finishes its step and saves first; not requeued)\n"
          f"  continue: {spec.resubmit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
