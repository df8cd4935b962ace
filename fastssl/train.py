"""Training entry point.

    torchrun --nproc_per_node=N fastssl/train.py --config byol_resnet18_fmnist train.batch_size=512 ...
    python fastssl/train.py --config byol_resnet18_fmnist          # one process

Checkpoints go to OUT_DIR/checkpoints (step-XXXXXX.pt, last.pt) every train.checkpoint_every steps, at each
epoch end, at the end, and on SIGTERM / SIGINT (the step in flight finishes, then the run saves and exits with
status 128 + the signal's number; a second signal exits at once). SIGUSR1 does the same; inside a SLURM job
(SLURM's warning before the time limit, or SIGTERM on preemption) the job then requeues itself and exits 0 (see
fastssl/engine/slurm_job.py). Running the same command again resumes from the newest valid checkpoint
(resume=auto); a resume whose config changes what is trained is refused unless resume_allow_changes names the keys.

Exit status (each error is one line on stderr, without a traceback):
  0  done (or stopped, and the SLURM job requeued)
  1  the loss stayed non-finite for train.max_bad_steps steps in a row (a SLURM job is not requeued)
  2  a config value out of range, a dataset the run cannot use, or a refused resume: found before any work starts
  3  the run folder is held by another live run
  4  the disk is full: a checkpoint (or a log) did not fit; the last good checkpoint resumes
  5  a data-loader worker died (the out-of-memory killer's usual victim); the last checkpoint resumes
  128 + N  stopped by signal N after a checkpoint

``eval.after=[knn,linear,finetune]`` then runs fastssl-eval on the finished run in the same ranks: kNN,
paper-protocol linear evaluation and 1 % / 10 % fine-tuning (the recipe's eval settings), each beside random
init, into OUT_DIR/eval/report.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (torchrun fastssl/train.py): put the repository root first, not fastssl/ itself.
    _here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0]) == _here:
        sys.path[0] = os.path.dirname(_here)


EXIT_DIVERGED, EXIT_CONFIG, EXIT_LOADER_WORKER = 1, 2, 5  # 3: RunFolderBusy, 4: CheckpointDiskFull (exit_status)


def run_reporting(cfg, prog: str) -> tuple[int, dict | None]:
    """``run(cfg)`` with the user-facing ends of a run: (exit status, results or None). An error or a stop is
    printed as one line on stderr without a traceback (a data error or a dead loader worker on every rank where
    it happened: each names what it found; the others on rank 0 only); the statuses are in the module docstring."""
    import errno

    from fastssl.config import ConfigError
    from fastssl.engine import launch, slurm_job
    from fastssl.engine.checkpoint import CheckpointDir, CheckpointDiskFull
    from fastssl.engine.loader_faults import describe_worker_death, find_worker_death
    from fastssl.engine.run_folder import RunFolderBusy
    from fastssl.engine.trainer import TrainingDiverged, TrainingInterrupted, run
    from pipelines.formats import DatasetFormatError

    def rank() -> int:  # read when needed: under srun the rank is known once run() has read SLURM's variables
        return int(os.environ.get("RANK", "0"))

    def say(message: str, everywhere: bool = False) -> None:
        if rank() == 0 or everywhere:
            print(f"{prog}: {message}", file=sys.stderr, flush=True)

    def newest_checkpoint():
        files = CheckpointDir(os.path.join(cfg.out_dir, "checkpoints")).step_files()
        return files[0][1] if files else None

    try:
        return 0, run(cfg)
    except DatasetFormatError as e:  # a rank's shard may be the broken one: every rank says what it found
        say(f"error: {e}", everywhere=True)
        return EXIT_CONFIG, None
    except ConfigError as e:  # the start-of-run checks (data, resume), alike on every rank: nothing trained yet
        say(f"error: {e}")
        return EXIT_CONFIG, None
    except TrainingInterrupted as e:  # SIGTERM / SIGINT: checkpoint written, every rank stopped at the same step
        if e.signals is not None:  # prints the resume hint on rank 0, unless a late signal already did
            e.signals.report()
            e.signals.ignore_late_signals()
        else:
            say(str(e))
        return e.exit_code, None
    except TrainingDiverged as e:
        say(f"error: {e}{slurm_job.diverged_note()}")
        return EXIT_DIVERGED, None
    except (RunFolderBusy, CheckpointDiskFull) as e:  # every rank at once: rank 0's line, printed once
        signals = getattr(e, "signals", None)
        if signals is not None:
            signals.report()
            signals.ignore_late_signals()
        else:
            say(f"error: {e}")
        return e.exit_status, None
    except OSError as e:  # a full disk elsewhere than at a checkpoint (metrics, TensorBoard, config.yaml)
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        last = newest_checkpoint()
        say(f"error: the disk is full: writing {e.filename or cfg.out_dir} failed ({e.strerror}); "
            + (f"the last good checkpoint is {last}; free space, then run the same command again: resume=auto "
               f"continues from it" if last else "no checkpoint was written yet; free space and start again"))
        return CheckpointDiskFull.exit_status, None
    except RuntimeError as e:  # a data-loader worker that died (the DataLoader's error, or its SIGCHLD handler's)
        death = find_worker_death(e)
        if death is None:
            raise
        workers = cfg.data.num_workers
        fewer = f"data.num_workers={max((workers or 2) // 2, 0)}"
        say("error: " + describe_worker_death(death, rank=rank(), num_workers=workers, cache=cfg.data.cache,
                                              checkpoint=newest_checkpoint(), resume=launch.resume_command([fewer])),
            everywhere=True)
        return EXIT_LOADER_WORKER, None


def evaluate_after(cfg, prog: str) -> tuple[int, dict | None]:
    """``eval.after=[knn,linear,finetune]``: fastssl-eval on the run just trained, in the same ranks (the run's
    data, loader backend and eval settings). (exit status, report: rank 0's, {} elsewhere): 2 when an evaluation
    cannot run (the message says why; the trained run is complete), 128 + N when signal N stopped it (rerun
    ``fastssl-eval OUT_DIR`` to resume it)."""
    from fastssl.config import ConfigError
    from fastssl.eval.report import evaluate_run
    from fastssl.eval.subsets import SubsetError
    from fastssl.eval.supervised import StopRequested
    from fastssl.eval.weights import ExportError
    from pipelines.formats import DatasetFormatError

    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        return 0, evaluate_run(cfg.out_dir, protocols=list(cfg.eval.after), data=cfg.data.path,
                               backend=cfg.data.backend, num_workers=cfg.data.num_workers,
                               progress=cfg.train.progress)
    except StopRequested as e:
        if main_rank:
            print(f"{prog}: eval.after: {e.args[0]} (or `fastssl-eval {cfg.out_dir}`)", file=sys.stderr)
        return e.exit_code, None
    except (ConfigError, ExportError, SubsetError, DatasetFormatError, ValueError, OSError) as e:
        print(f"{prog}: eval.after: error: {e} (the training run is complete; fix this, then run "
              f"`fastssl-eval {cfg.out_dir}`)", file=sys.stderr)
        return 2, None


def main(argv: list[str] | None = None) -> int:
    from fastssl.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="fastssl/train.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe name in fastssl/configs or a YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.batch_size=256")
    parser.add_argument("--no-results", action="store_true",
                        help="do not print the results as a JSON line at the end (OUT_DIR/knn.json keeps the kNN)")
    args = parser.parse_intermixed_args(argv)  # overrides may stand before or after --config
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        parser.exit(2, f"fastssl/train.py: error: {e}\n")
    status, results = run_reporting(cfg, parser.prog)
    if status:
        parser.exit(status)
    if cfg.eval.after and results is not None:  # (None: stopped, and the SLURM job requeued: no evaluation yet)
        status, report = evaluate_after(cfg, parser.prog)
        if status:
            parser.exit(status)
        if report:
            results["eval_report"] = str(Path(cfg.out_dir) / "eval" / "report.json")
    if int(os.environ.get("RANK", "0")) == 0 and not args.no_results and results is not None:
        print(json.dumps(results))  # (None: stopped, and the SLURM job requeued)
    return 0


if __name__ == "__main__":
    sys.exit(main())
