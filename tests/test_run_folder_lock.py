"""A run owns its folder: a second live run on it is refused in one line naming the holder; a requeued SLURM job
waits a bounded time for the old job to let go; the OS drops the hold when the process dies (SIGKILL included,
even while forked children live on). Today's code "resumed" beside the live run and both wrote checkpoints."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from test_resume import STEPS_PER_EPOCH, _logs, _popen, _rows, _train_cmd, _wait_for_step

from fastssl.engine.checkpoint import CheckpointDir, load_checkpoint
from fastssl.engine.run_folder import LOCK_NAME, RunFolderBusy, RunFolderLock

TOTAL = 3 * STEPS_PER_EPOCH
_STALL = {"FASTSSL_TEST_STALL_AT": "3"}  # the first run waits in step 3 until a stop signal (test_resume.py)


def test_a_second_run_is_refused_a_requeue_waits_and_the_live_run_is_unharmed(tiny_gray_dataset, tmp_path):
    out = tmp_path / "run"
    extra = {"method.name": "stalling_byol", "train.checkpoint_every": 2}
    cmd = _train_cmd(tiny_gray_dataset, out, **extra)
    requeued = {"SLURM_JOB_ID": "123", "SLURM_RESTART_COUNT": "1"}  # as a requeued SLURM job sees its environment
    live = _popen(cmd, tmp_path / "live", **_STALL)
    others: dict = {}
    try:
        _wait_for_step(live, out, 2, tmp_path / "live")  # the live run waits in step 3, holding the folder
        # At once (their start-ups overlap): a second run (a user who submits twice), the same on two ranks, a
        # requeued job that waits 2 s for the hold, and one that may wait 120 s.
        others = {
            "second": _popen(cmd, tmp_path / "second"),
            "ddp": _popen(_train_cmd(tiny_gray_dataset, out, nproc=2, **extra), tmp_path / "ddp"),
            "gave_up": _popen([*cmd, "slurm.lock_wait_s=2"], tmp_path / "gave_up", **requeued),
            "waiting": _popen([*cmd, "slurm.lock_wait_s=120"], tmp_path / "waiting", **requeued),
        }
        for name in ("second", "ddp", "gave_up"):
            others[name].wait(180)
        second_err = _logs(tmp_path / "second")[1].strip().splitlines()
        assert others["second"].returncode == 3 and len(second_err) == 1, second_err
        assert second_err[0].startswith(f"fastssl/train.py: error: {out} is in use by another live run: host "
                                        f"{socket.gethostname()}, pid {live.pid}, since "), second_err
        # Two ranks: rank 0 is refused, and rank 1 learns it (no hang); each exits 3, one line between them.
        ddp_err = _logs(tmp_path / "ddp")[1]
        assert others["ddp"].returncode != 0 and ddp_err.count("exitcode  : 3") == 2, ddp_err[-3000:]
        assert ddp_err.count(f"{out} is in use by another live run") == 1 and "fastssl/engine" not in ddp_err
        # The requeue gives up after its wait, the same way.
        gave_up = _logs(tmp_path / "gave_up")
        assert others["gave_up"].returncode == 3 and f"pid {live.pid}" in gave_up[1] and "(waited 2 s)" in gave_up[1]
        assert "waiting up to 2 s for that run to end" in gave_up[0]
        assert [s for s, _ in CheckpointDir(out / "checkpoints").step_files()] == [2]  # nobody else wrote
        assert max(r["step"] for r in _rows(out) if "loss" in r) == 2
        # The patient requeue starts once the live run has saved and exited.
        deadline = time.monotonic() + 120
        while "waiting up to 120 s" not in _logs(tmp_path / "waiting")[0] and time.monotonic() < deadline:
            assert others["waiting"].poll() is None, _logs(tmp_path / "waiting")
            time.sleep(0.1)
        live.send_signal(signal.SIGTERM)
        assert live.wait(120) == 128 + signal.SIGTERM  # the live run finished its step and saved, unharmed
        assert "stopped by SIGTERM after step 3" in _logs(tmp_path / "live")[1]
        assert others["waiting"].wait(240) == 0, _logs(tmp_path / "waiting")[1][-3000:]
    finally:
        for proc in (live, *others.values()):
            if proc.poll() is None:
                proc.kill()
    stdout = _logs(tmp_path / "waiting")[0]
    assert f"resumed from {out / 'checkpoints' / 'step-000003.pt'} at step 3" in stdout, stdout
    assert [r["step"] for r in _rows(out) if "loss" in r] == list(range(1, TOTAL + 1))
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == TOTAL


_FORK_AND_DIE = """
import os, signal, sys, time
from fastssl.engine.run_folder import RunFolderLock
RunFolderLock(sys.argv[1]).acquire()
child = os.fork()
if child == 0:  # a forked child (a DataLoader worker) outlives its parent
    os.close(1), os.close(2)  # not holding the test's pipes
    time.sleep(30)
    os._exit(0)
print(child, flush=True)
time.sleep(0.2)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_hold_goes_with_the_process_even_when_a_forked_child_lives_on(tmp_path):
    """An flock would stay with the forked child (the DataLoader's workers) after a SIGKILL of the run."""
    folder = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", _FORK_AND_DIE, str(folder)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    child = int(proc.stdout)
    facts = json.loads((folder / LOCK_NAME).read_text())
    assert facts["host"] == socket.gethostname() and facts["pid"] > 0 and "since" in facts
    lock = RunFolderLock(folder)
    try:
        os.kill(child, 0)  # the child still lives...
        lock.acquire()  # ...and yet the dead process's hold is gone
        os.kill(child, signal.SIGKILL)
        with pytest.raises(RunFolderBusy, match="this process already runs in this folder"):
            RunFolderLock(folder).acquire()  # record locks alone would grant it twice in one process
    finally:
        lock.release()
    assert json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_refused_run_leaves_no_folder_it_created(tmp_path):
    folder = tmp_path / "new"
    lock = RunFolderLock(folder)
    lock.acquire()
    lock.release()
    assert not folder.exists()  # nothing but the lock was written: a run refused early leaves nothing behind
    (tmp_path / "kept").mkdir()
    kept = RunFolderLock(tmp_path / "kept")
    kept.acquire()
    kept.release()
    assert (tmp_path / "kept").is_dir()  # not created by the lock: left alone
