"""A data-loader worker killed (the out-of-memory killer's usual victim): one line naming the worker, the signal,
the likely cause and the command that resumes, exit status 5; that command resumes from the last checkpoint.
Today's code ended in a 30-line traceback ("DataLoader worker (pid N) is killed by signal: Killed")."""

from __future__ import annotations

import os
import shlex
import signal
import time
from pathlib import Path

from test_resume import STEPS_PER_EPOCH, _logs, _popen, _rows, _run, _train_cmd, _wait_for_step

from fastssl.engine.checkpoint import load_checkpoint
from fastssl.engine.loader_faults import WorkerDeath, describe_worker_death, find_worker_death


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def test_a_killed_worker_ends_the_run_in_one_line_with_the_resume_command(tiny_gray_dataset, tmp_path):
    out, log = tmp_path / "run", tmp_path / "run_log"
    cmd = _train_cmd(tiny_gray_dataset, out, **{"method.name": "stalling_byol", "data.cache": "none",
                                                 "data.num_workers": 2, "train.checkpoint_every": 2})
    proc = _popen(cmd, log, FASTSSL_TEST_STALL_AT="3")  # waits in step 3, its workers alive
    try:
        _wait_for_step(proc, out, 2, log)
        last, checkpoint = out / "checkpoints" / "last.pt", out / "checkpoints" / "step-000002.pt"
        deadline = time.monotonic() + 30
        while not (last.is_file() and last.samefile(checkpoint)) or len(_children(proc.pid)) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, _logs(log)
            time.sleep(0.1)
        time.sleep(0.5)  # step 2's checkpoint is written: the run is on to step 3, where it waits
        worker = _children(proc.pid)[0]
        os.kill(worker, signal.SIGKILL)  # as the OOM killer does
        assert proc.wait(120) == 5, _logs(log)[1][-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    err = _logs(log)[1].strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    line = err[0]
    assert line.startswith(f"fastssl/train.py: error: rank 0: data-loader worker (pid {worker}) was killed by "
                           f"SIGKILL, most likely by the out-of-memory killer"), line
    assert "data.num_workers=2, data.cache=none" in line and "GiB memory available now" in line, line
    prefix = f". To resume from {checkpoint}: "
    assert prefix in line and line.endswith(" data.num_workers=1"), line
    # The command it names (fewer workers) resumes from step 2 and finishes.
    resume = shlex.split(line.split(prefix, 1)[1])
    resumed = _run(resume, tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoint} at step 2" in resumed.stdout
    assert "data.num_workers: 2 -> 1 (accepted" in resumed.stdout
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 3 * STEPS_PER_EPOCH
    assert [r["step"] for r in _rows(out) if "loss" in r] == list(range(1, 3 * STEPS_PER_EPOCH + 1))


def test_the_dead_worker_is_found_in_the_error_chain_and_described():
    cause = RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. ")
    try:
        try:
            raise cause
        except RuntimeError as e:
            raise RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly") from e
    except RuntimeError as e:
        outer = e
    assert find_worker_death(outer) == WorkerDeath("4242", signum=int(signal.SIGKILL))
    assert find_worker_death(RuntimeError("DataLoader worker (pid(s) 7, 8) exited unexpectedly")) == \
        WorkerDeath("7, 8")
    assert find_worker_death(RuntimeError("DataLoader worker (pid 9) is killed by signal: Bus error. ")).signum == \
        signal.SIGBUS
    assert find_worker_death(RuntimeError("CUDA out of memory")) is None
    bus = describe_worker_death(WorkerDeath("9", signum=int(signal.SIGBUS)), rank=3, num_workers=8, cache="none",
                                checkpoint=None, resume="CMD")
    assert bus == ("rank 3: data-loader worker (pid 9) was killed by SIGBUS, most likely because /dev/shm, where the "
                   "workers hand over their batches, is full (data.num_workers=8); fewer workers need less. No "
                   "checkpoint yet; to start again: CMD")
