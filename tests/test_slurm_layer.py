"""The SLURM layer without SLURM daemons: ranks from SLURM's variables, the stop decisions (requeue, already
requeued, cancelled, cap), the resume command, fastssl-submit's options and script, and SIGUSR1 stopping a run
like SIGTERM. The real scheduler is in test_slurm.py."""

from __future__ import annotations

import os
import random
import shlex
import signal
import sys
from datetime import datetime
from pathlib import Path

import pytest
from test_resume import STEPS_PER_EPOCH, _logs, _popen, _rows, _train_cmd, _wait_for_step

from fastssl.engine import launch, slurm_job
from fastssl.engine.checkpoint import load_checkpoint


# ------------------------------------------------------------------------------------------ ranks
def test_task_counts_and_first_host_read_slurms_compressed_forms():
    assert slurm_job.expand_counts("8(x4)") == [8, 8, 8, 8]
    assert slurm_job.expand_counts("2(x2),1") == [2, 2, 1]
    assert slurm_job.expand_counts("3") == [3]
    with pytest.raises(ValueError, match="8x4"):
        slurm_job.expand_counts("8x4")
    assert slurm_job.first_host("gpu[007-010,3],cpu1") == "gpu007"  # zero padding kept (SwAV's parser lost it)
    assert slurm_job.first_host("node12") == "node12"
    assert slurm_job.first_host("a[1-2]b[3-4]") == "a1b3"
    assert slurm_job.first_host("x[10-11]") == "x10"


_STEP = {"SLURM_JOB_ID": "4321", "SLURM_PROCID": "13", "SLURM_STEP_NUM_TASKS": "32", "SLURM_LOCALID": "5",
         "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "8(x4)", "SLURM_STEP_NODELIST": "gpu[010-013]",
         "SLURM_JOB_NODELIST": "gpu[010-013]"}


def test_rank_env_from_an_srun_task_and_only_there():
    env = slurm_job.rank_env(_STEP)
    assert env == {"RANK": "13", "WORLD_SIZE": "32", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8",
                   "MASTER_ADDR": "gpu010", "MASTER_PORT": str(slurm_job.rendezvous_port(_STEP))}
    requeued = slurm_job.rendezvous_port({**_STEP, "SLURM_RESTART_COUNT": "1"})
    assert 20000 <= requeued < 40000 and requeued != int(env["MASTER_PORT"])  # the old run's sockets are not met
    assert slurm_job.rank_env({**_STEP, "MASTER_ADDR": "h", "MASTER_PORT": "1234"})["MASTER_PORT"] == "1234"
    assert slurm_job.rank_env({**_STEP, "RANK": "0"}) == {}  # torchrun's variables win
    batch_shell = {k: v for k, v in _STEP.items() if not k.startswith("SLURM_STEP")}
    assert slurm_job.rank_env(batch_shell) == {}  # the batch script is one process, whatever SLURM_NTASKS says


# ------------------------------------------------------------------------------------------ stop decisions
def _record(state="RUNNING", restarts=0, reason="None"):
    return lambda jid: {"JobState": state, "Restarts": str(restarts), "Reason": reason}


_JOB = {"SLURM_JOB_ID": "77"}
USR1, TERM, INT = int(signal.SIGUSR1), int(signal.SIGTERM), int(signal.SIGINT)


@pytest.mark.parametrize("signum, env, record, requeue, status, said", [
    (USR1, _JOB, _record(), True, 0, "requeued itself (requeue 1 of at most 3)"),
    (TERM, _JOB, _record(), True, 0, "requeued itself"),  # a preemption's grace period: still RUNNING
    (TERM, {**_JOB, "SLURM_RESTART_COUNT": "1"}, _record("COMPLETING", 2), False, 0, "SLURM requeues job 77 itself"),
    (TERM, _JOB, _record("COMPLETING", 0), False, 128 + TERM, "cancelled"),  # scancel
    (TERM, _JOB, _record("TIMEOUT", 0, "TimeLimit"), True, 0, "requeued itself"),  # the limit, without a warning
    (USR1, {**_JOB, "SLURM_RESTART_COUNT": "3"}, _record(), False, 128 + USR1, "slurm.max_requeues=3"),
    (USR1, _JOB, lambda jid: None, False, 128 + USR1, "scontrol cannot show the job"),
    (INT, _JOB, _record(), False, 128 + INT, ""),  # Ctrl-C in an interactive srun: no requeue
    (USR1, {}, _record(), False, 128 + USR1, ""),  # not a SLURM job: as before
])
def test_stop_outcome_decides_the_requeue(signum, env, record, requeue, status, said):
    outcome = slurm_job.stop_outcome(signum, 3, "RESUBMIT", environ=env, record=record)
    assert (outcome.requeue, outcome.status) == (requeue, status), outcome
    assert said in outcome.note
    if not requeue and status:
        assert "RESUBMIT" in outcome.note or not said  # says how to go on


def test_resume_command_in_each_launch_context():
    argv = ["/x/fastssl/train.py", "--config", "byol_resnet18_fmnist", "out_dir=runs/a b"]
    assert launch.resume_command(["data.num_workers=1"], environ={}, argv=argv) == \
        f"{sys.executable} /x/fastssl/train.py --config byol_resnet18_fmnist 'out_dir=runs/a b' data.num_workers=1"
    torchrun = {"TORCHELASTIC_RUN_ID": "x", "LOCAL_WORLD_SIZE": "8", "WORLD_SIZE": "16"}
    assert launch.resume_command([], environ=torchrun, argv=argv).startswith(
        "torchrun --nproc_per_node=8 --nnodes=2 <your rendezvous options> /x/fastssl/train.py")
    assert launch.resume_command(["k=v"], environ={"FASTSSL_RESUBMIT": "cd /r && fastssl-submit --name a"}) == \
        "cd /r && fastssl-submit --name a k=v"
    assert launch.resume_command([], environ=_STEP, argv=argv, job_script="/r/job.sh") == "sbatch /r/job.sh"


# ------------------------------------------------------------------------------------------ fastssl-submit
def _spec(*argv: str):
    from fastssl.slurm import _parser, spec_from_args

    return spec_from_args(_parser().parse_intermixed_args(list(argv)), now=datetime(2026, 12, 7, 9, 30, 0))


def test_submit_script_runs_one_rank_per_gpu_with_the_time_limit_signal_and_requeue(tmp_path, monkeypatch):
    from fastssl.slurm import build_script

    monkeypatch.chdir(tmp_path)
    spec = _spec("--config", "byol_resnet50_imagenet", "--nodes", "4", "--time", "2-00:00", "--partition", "gpu",
                 "--account", "acc", "--constraint", "a100", "--qos", "high", "--sbatch=--exclusive",
                 "--setup", "module load cuda", "data.path=/shared/imagenet", "--cpus-per-task", "12")
    assert spec.name == "byol_resnet50_imagenet-20261207-093000" and spec.out_dir == tmp_path / "runs" / spec.name
    script = build_script(spec)
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=12", "#SBATCH --time=2-00:00", "#SBATCH --partition=gpu",
                 "#SBATCH --account=acc", "#SBATCH --constraint=a100", "#SBATCH --qos=high",
                 "#SBATCH --signal=USR1@180", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 f"#SBATCH --output={spec.out_dir}/slurm-%j.out", f"#SBATCH --chdir={tmp_path}",
                 "#SBATCH --exclusive", "module load cuda"):
        assert line in script.splitlines(), line
    launch_line = next(x for x in script.splitlines() if x.startswith("srun "))
    assert launch_line == (f"srun --kill-on-bad-exit=1 --cpus-per-task=12 {sys.executable} -m fastssl.train --config "
                           f"byol_resnet50_imagenet out_dir={spec.out_dir} data.path=/shared/imagenet")
    # The resubmit command names the run: submitting it again continues the same folder.
    assert f"--name {spec.name}" in spec.resubmit and f"out_dir={spec.out_dir}" in spec.resubmit
    again = shlex.split(spec.resubmit.split(" && ", 1)[1])
    assert _spec(*again[again.index("--config"):]).out_dir == spec.out_dir


@pytest.mark.parametrize("argv, message", [
    (["--time", "5:00", "--signal-seconds", "400"], "not longer than --signal-seconds 400"),
    (["--time", "soon"], "--time soon: not a SLURM time"),
    (["--tasks-per-node", "4"], "one rank per GPU"),
    (["--name", "a/b"], "--name 'a/b'"),
    (["--sbatch", "exclusive"], "--sbatch 'exclusive': give an sbatch option"),
    (["--nodes", "3", "train.batch_size=4000"], "train.batch_size=4000 is the global batch and must be divisible by "
                                                "the world size 24"),
    (["optim.momentum=2"], "optim.momentum=2"),
])
def test_submit_refuses_what_cannot_work_in_one_line(argv, message, capsys):
    from fastssl.slurm import main

    with pytest.raises(SystemExit) as exc:
        main(["--config", "byol_resnet50_imagenet", "--dry-run", *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_time_limits_in_every_slurm_form():
    from fastssl.slurm import time_limit_seconds

    assert [time_limit_seconds(t) for t in ("90", "5:30", "2:00:00", "1-0", "1-2:30", "1-0:0:1")] == \
        [5400, 330, 7200, 86400, 86400 + 9000, 86401]


# ------------------------------------------------------------------------------------------ SIGUSR1
def test_sigusr1_stops_at_a_step_with_a_checkpoint_like_sigterm(tiny_gray_dataset, tmp_path):
    """SLURM's time-limit warning (--signal=USR1@N) used to kill the run outright (SIGUSR1's default action)."""
    out, log = tmp_path / "run", tmp_path / "usr1"
    proc = _popen(_train_cmd(tiny_gray_dataset, out, **{"train.checkpoint_every": 4}), log)
    try:
        _wait_for_step(proc, out, random.Random().randint(2, 3 * STEPS_PER_EPOCH - 6), log)
        os.kill(proc.pid, signal.SIGUSR1)
        assert proc.wait(120) == 128 + signal.SIGUSR1, _logs(log)[1][-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    err = _logs(log)[1]
    assert "Traceback" not in err and "stopped by SIGUSR1 after step" in err, err
    stopped_at = int(err.split("stopped by SIGUSR1 after step ")[1].split(";")[0])
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == stopped_at
    assert max(r["step"] for r in _rows(out) if "loss" in r) == stopped_at
    assert Path(out / "checkpoints" / f"step-{stopped_at:06d}.pt").is_file()


_SIGNAL_DURING_SETUP = """
import os, signal, sys
from fastssl.engine.trainer import Trainer

build = Trainer._setup


def setup_then_signal(self):  # the signal lands while the run is still being built (a long RAM-cache fill...)
    build(self)
    os.kill(os.getpid(), signal.SIGTERM)


Trainer._setup = setup_then_signal
from fastssl.train import main

sys.exit(main(sys.argv[1:]))
"""


def test_a_stop_signal_during_the_setup_stops_after_the_first_step(tiny_gray_dataset, tmp_path):
    """The handlers used to be installed only when the loop began: a signal during the setup (SLURM's warning can
    come then, for a job started close to its limit) killed the process with the default action."""
    import subprocess

    from test_resume import _env, _overrides

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_DURING_SETUP, "--config", "byol_resnet18_fmnist",
                           *_overrides(tiny_gray_dataset, out)], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert "stopped by SIGTERM after step 1;" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 1


def test_requeue_reads_the_job_and_reports_a_refused_requeue(tmp_path, monkeypatch):
    """A stand-in scontrol: ``show job`` prints a record, ``requeue`` fails as on a job submitted --no-requeue."""
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\nif [ "$1" = show ]; then echo "JobId=77 JobName=x JobState=RUNNING Reason=None '
                    'Restarts=2 TimeLimit=01:00:00"; exit 0; fi\n'
                    'echo "scontrol: error: Requested operation is presently disabled for job 77" >&2; exit 1\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    env = {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "2"}
    assert slurm_job.job_record("77")["Restarts"] == "2"
    outcome = slurm_job.stop_outcome(USR1, 50, "RESUBMIT", environ=env)
    assert outcome.requeue and "requeue 3 of at most 50" in outcome.note
    failed = slurm_job.requeue(outcome, USR1, "RESUBMIT", environ=env)
    assert not failed.requeue and failed.status == 128 + USR1
    assert "could not requeue itself (scontrol requeue: scontrol: error: Requested operation is presently disabled " \
           "for job 77); to go on: RESUBMIT" in failed.note
