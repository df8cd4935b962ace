"""fastssl under a real SLURM (slurmctld + slurmd + munged on this host, tests/slurm_cluster.py): jobs submitted
with fastssl-submit's script and sbatch, ranks started by srun, requeued by ``scontrol requeue`` and by the time
limit's ``--signal=USR1``, and resumed to the same final state as an uninterrupted run.

The jobs train ``stalling_byol`` (test_resume.py, which is their entry point): in a job's first run it waits in
step FASTSSL_TEST_STALL_AT until a stop signal has come, so a job is always mid-run when it is requeued, whenever
the scheduler's signal comes (SLURM checks time limits every 30 s).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import LocalSlurm, ensure_installed
from test_resume import STEPS_PER_EPOCH_2_RANKS, TEST_METHODS, _assert_same_training_state, _env, _overrides, _rows

from fastssl.engine.checkpoint import load_checkpoint
from fastssl.engine.slurm_job import first_host
from fastssl.methods import METHODS

pytestmark = pytest.mark.slow
ENTRY = Path(__file__).resolve().parent / "test_resume.py"  # registers stalling_byol, then trains
TOTAL_STEPS = 3 * STEPS_PER_EPOCH_2_RANKS  # 2 ranks, global batch 16, 3 epochs of the 96-image tiny set


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = ensure_installed()
    if reason is not None:
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except Exception:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


@pytest.fixture
def stalling_method(monkeypatch):
    for name, target in TEST_METHODS.items():
        monkeypatch.setitem(METHODS, name, target)


def _submit(slurm: LocalSlurm, monkeypatch, name: str, data: Path, out: Path, *, tasks: int = 2, time_limit: str,
            signal_seconds: int = 180, stall_at: int = 0, extra: dict | None = None) -> str:
    """fastssl-submit's own script (one CPU task per rank), submitted with sbatch; returns the job id."""
    from fastssl.slurm import _parser, build_script, spec_from_args, submit

    overrides = _overrides(data, out, **{"method.name": "stalling_byol", **(extra or {})})
    argv = ["--config", "byol_resnet18_fmnist", "--name", name, "--gpus-per-node", "0", "--tasks-per-node",
            str(tasks), "--cpus-per-task", "1", "--time", time_limit, "--signal-seconds", str(signal_seconds),
            "--entry", str(ENTRY), *overrides]
    for key, value in {**_env(), "SLURM_CONF": str(slurm.conf), "FASTSSL_TEST_STALL_AT": str(stall_at)}.items():
        monkeypatch.setenv(key, value)  # sbatch hands the submitting environment to the job
    spec = spec_from_args(_parser().parse_intermixed_args(argv))
    return submit(spec, build_script(spec))


def _log(out: Path, job: str) -> str:
    path = out / f"slurm-{job}.out"
    return path.read_text() if path.is_file() else ""


def test_first_host_agrees_with_scontrol_show_hostnames(slurm):
    for nodelist in ("gpu[007-010,3],cpu1", "node12", "a[1-2]b[3-4]", "x[10-11],y2"):
        listed = slurm.scontrol("show", "hostnames", nodelist).split()
        assert first_host(nodelist) == listed[0], (nodelist, listed)


def test_dry_run_for_4_nodes_x_8_gpus_passes_sbatch_test_only(slurm, tmp_path, monkeypatch, capsys):
    from fastssl.slurm import main

    monkeypatch.chdir(tmp_path)
    assert main(["--config", "byol_resnet50_imagenet", "--nodes", "4", "--gpus-per-node", "8", "--time", "24:00:00",
                 "--partition", "gpu", "--name", "byol-r50", "data.path=/shared/imagenet", "--dry-run"]) == 0
    script = tmp_path / "dry.sbatch"
    script.write_text(capsys.readouterr().out)
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
    ok = subprocess.run(["sbatch", "--test-only", str(script)], env=slurm.env, capture_output=True, text=True)
    assert ok.returncode == 0 and "using 256 processors on nodes paper-gpu[1-4]" in ok.stderr, ok.stderr
    # --test-only does check: one GPU more per node than the nodes have is refused
    script.write_text(script.read_text().replace("--gpus-per-node=8", "--gpus-per-node=9"))
    refused = subprocess.run(["sbatch", "--test-only", str(script)], env=slurm.env, capture_output=True, text=True)
    assert refused.returncode != 0 and "Requested node configuration is not available" in refused.stderr


def test_requeued_and_timed_out_jobs_resume_to_the_uninterrupted_runs_state(slurm, tiny_gray_dataset, tmp_path,
                                                                         monkeypatch, stalling_method):
    """Job B reaches its 1-minute time limit with --signal=USR1@30, stops in step 3 and requeues itself; job A is
    requeued from outside (``scontrol requeue``: SIGTERM, and SLURM requeues it) while it runs step 3. Both finish
    by themselves once released (a requeued job waits ~2 min for its EligibleTime), and their final checkpoints
    equal a 2-rank torchrun run's, tensor for tensor, RNG states included; metrics.jsonl holds each step once.

    Timing on 2 shared cores: B starts alone (its start-up, ~10-20 s, usually ends before SLURM's signal, 25-60 s
    after the start: SLURM checks time limits every 30 s; if not, B stops after its first step); A starts once B
    has run 2 steps. B's second run gets a
    10-minute limit before it is released: its start-up alone would otherwise meet the next USR1 (then SIGUSR1's
    default action kills a process that has not reached the trainer yet)."""
    data = tiny_gray_dataset
    reference_out = tmp_path / "reference"
    ref_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ENTRY),
               "--config", "byol_resnet18_fmnist", *_overrides(data, reference_out, **{"method.name": "stalling_byol"})]
    reference_env = _env()  # before _submit puts the stall into this process's environment
    a_out, b_out = tmp_path / "requeued", tmp_path / "timelimit"
    b = _submit(slurm, monkeypatch, "timelimit", data, b_out, time_limit="1", signal_seconds=30, stall_at=3)
    a = reference = None
    deadline = time.monotonic() + 420
    states: dict[str, dict] = {}
    while time.monotonic() < deadline:
        if a is None and [r for r in _rows(b_out) if r.get("step") == 2]:  # B waits in step 3 for its signal
            a = _submit(slurm, monkeypatch, "requeued", data, a_out, time_limit="10:00", stall_at=3)
        if a is not None and reference is None and [r for r in _rows(a_out) if r.get("step") == 2]:
            slurm.scontrol("requeue", a)  # A runs step 3 (it waits there)
            # The uninterrupted 2-rank run, started now that the jobs' start-ups are over
            reference = subprocess.Popen(ref_cmd, cwd=tmp_path, env=reference_env, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True)
        for job in (j for j in (a, b) if j is not None):
            rec = slurm.job(job)
            if job == b and rec["JobState"] == "PENDING" and rec["Restarts"] != "0" and rec["TimeLimit"] != "00:10:00":
                slurm.scontrol("update", f"JobId={b}", "TimeLimit=10")
            slurm.release_if_requeued(job)
            states[job] = slurm.job(job)
        if len(states) == 2 and all(s["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
                                    for s in states.values()):
            break
        time.sleep(0.5)
    assert reference is not None, (_log(b_out, b)[-3000:], a and _log(a_out, a)[-3000:], slurm.logs())
    reference_log = reference.communicate(timeout=300)[0]
    assert reference.returncode == 0, reference_log[-3000:]
    for job, out in ((a, a_out), (b, b_out)):
        assert states[job]["JobState"] == "COMPLETED" and states[job]["ExitCode"] == "0:0", \
            (states[job], _log(out, job)[-4000:], slurm.logs())
        assert states[job]["Restarts"] == "1", states[job]
    a_log, b_log = _log(a_out, a), _log(b_out, b)
    assert f"stopped by SIGTERM after step 3; checkpoint {a_out / 'checkpoints' / 'step-000003.pt'}. SLURM " \
           f"requeues job {a} itself" in a_log, a_log[-4000:]
    # B waits in step 3 for the signal; on a loaded machine the signal may come while B is still being set up:
    # then it stops after its first step (the handlers are in place from the start of fit).
    b_stop = int(b_log.split("stopped by SIGUSR1 after step ")[1].split(";")[0]) if "SIGUSR1 after" in b_log else -1
    assert b_stop in (1, 3) and f"checkpoint {b_out / 'checkpoints' / f'step-{b_stop:06d}.pt'}. SLURM job {b} " \
           f"requeued itself (requeue 1 of at most 50)" in b_log, b_log[-4000:]
    for log, stop in ((a_log, 3), (b_log, b_stop)):
        assert "resumed from" in log and f"at step {stop} " in log and "Traceback" not in log, log[-4000:]
    expected = load_checkpoint(reference_out / "checkpoints" / "last.pt")
    assert expected["step"] == TOTAL_STEPS and expected["world_size"] == 2
    for out in (a_out, b_out):
        _assert_same_training_state(expected, load_checkpoint(out / "checkpoints" / "last.pt"))
        assert [r["step"] for r in _rows(out) if "loss" in r] == list(range(1, TOTAL_STEPS + 1))  # none lost or twice
        assert len(list((out / "tb").iterdir())) == 2  # one TensorBoard run folder, an event file per job run


def test_a_diverged_job_ends_failed_with_the_reason_and_is_not_requeued(slurm, tiny_gray_dataset, tmp_path,
                                                                      monkeypatch, stalling_method, capsys):
    """Submitted through fastssl-submit's command line, as a user would (one CPU task)."""
    from fastssl.slurm import main

    out = tmp_path / "diverged"
    for key, value in {**_env(), "SLURM_CONF": str(slurm.conf)}.items():
        monkeypatch.setenv(key, value)
    assert main(["--config", "byol_resnet18_fmnist", "--name", "diverged", "--gpus-per-node", "0", "--cpus-per-task",
                 "1", "--time", "5:00", "--entry", str(ENTRY), *_overrides(tiny_gray_dataset, out, **{
                     "method.name": "stalling_byol", "method.nan_at": "'2,3,4,5'", "train.max_bad_steps": 2})]) == 0
    printed = capsys.readouterr().out
    job = printed.split("submitted SLURM job ")[1].split(":")[0]
    assert f"tail -f {out}/slurm-{job}.out" in printed and f"scancel {job}" in printed, printed
    assert "--name diverged" in printed.splitlines()[-1] and (out / "job.sbatch").is_file()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        state = slurm.job(job)
        if state["JobState"] not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING"):
            break
        time.sleep(0.5)
    log = _log(out, job)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "1:0" and state["Restarts"] == "0", (state, log)
    assert "not finite for 2 steps in a row (train.max_bad_steps=2)" in log, log
    assert f"SLURM job {job} ends failed and is not requeued" in log and "Traceback" not in log, log
