"""A full disk at a checkpoint: a warning a checkpoint interval ahead, then one line (path, bytes needed, bytes
free, the last good checkpoint) and exit status 4; the earlier checkpoints are whole and resume once there is
room. Today's code ended in a torch serialization traceback. The disk is a small tmpfs (root only)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from test_resume import STEPS_PER_EPOCH, STEPS_PER_EPOCH_2_RANKS, _fit, _overrides, _rows, _run, _train_cmd

from fastssl.engine.checkpoint import CheckpointDir, load_checkpoint


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs at tmp_path/disk; ``resize(bytes)`` changes its size. Skipped where mounting is not allowed."""
    where = tmp_path / "disk"
    where.mkdir()

    def mount(*options: str) -> subprocess.CompletedProcess:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(where)],
                              capture_output=True, text=True)

    if os.geteuid() != 0 or mount("size=1m").returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")

    def resize(size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True, capture_output=True)

    yield where, resize
    subprocess.run(["umount", str(where)], capture_output=True)


@pytest.fixture
def keep_signal_handlers():
    """train.main ignores late signals on its way out after a run-ending error (as the process exits); this test
    calls it in the pytest process, which must keep its own handlers (Ctrl-C)."""
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_a_checkpoint_that_does_not_fit_ends_in_one_line_and_the_last_good_one_resumes(
        tiny_gray_dataset, tmp_path, small_disk, capsys, keep_signal_handlers):
    from fastssl.train import main

    disk, resize = small_disk
    # 5 steps, all in the first epoch (no epoch-end save between), a checkpoint after each
    extra = {"train.checkpoint_every": 1, "train.keep_checkpoints": 3, "train.max_steps": min(5, STEPS_PER_EPOCH)}
    _fit(tiny_gray_dataset, tmp_path / "probe", **{**extra, "train.max_steps": 1})  # what one checkpoint takes
    size = (tmp_path / "probe" / "checkpoints" / "step-000001.pt").stat().st_size
    # Room for two checkpoints and the small files (config, metrics, TensorBoard), not for a third.
    resize(2 * size + size // 2)
    capsys.readouterr()
    out = disk / "run"
    args = ["--config", "byol_resnet18_fmnist", *_overrides(tiny_gray_dataset, out, **extra)]
    with pytest.raises(SystemExit) as exc:
        main(args)
    captured = capsys.readouterr()
    folder = out / "checkpoints"
    assert exc.value.code == 4, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    m = re.fullmatch(rf"fastssl/train\.py: error: the disk is full: checkpoint {re.escape(str(folder))}/step-000003"
                     rf"\.pt needs (\d+) bytes, (\d+) bytes are free on its file system; the last good checkpoint is "
                     rf"{re.escape(str(folder))}/step-000002\.pt; free (\d+) bytes or more .*resume=auto continues "
                     rf"from it", lines[0])
    assert m is not None, lines[0]
    needed, free = int(m.group(1)), int(m.group(2))
    assert abs(needed - size) < 4096 and free < needed and int(m.group(3)) == needed - free
    # Warned a checkpoint ahead: after step 2 the disk had less room than one checkpoint.
    assert f"warning: {folder}: " in captured.out and "the next checkpoint will not fit" in captured.out
    # Nothing lost: steps 1 and 2 whole, no temp file, the metrics of the steps that ran.
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "step-000001.pt", "step-000002.pt"]
    assert load_checkpoint(folder / "last.pt")["step"] == 2
    assert max(r["step"] for r in _rows(out) if "loss" in r) == 3
    # Room again: the same command resumes from the last good checkpoint and finishes.
    resize(8 * size)
    assert main(args) == 0
    captured = capsys.readouterr()
    assert f"resumed from {folder / 'step-000002.pt'} at step 2" in captured.out
    assert load_checkpoint(folder / "last.pt")["step"] == 5
    assert [r["step"] for r in _rows(out) if "loss" in r] == list(range(1, 6))


def test_the_space_warning_needs_a_known_size_and_little_room(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    ckpts = CheckpointDir(tmp_path / "checkpoints")
    assert ckpts.space_warning() is None  # nothing written yet: no size to go by
    ckpts.save({"step": 1, "model": {}, "blob": b"x" * 10000}, 1)
    size = ckpts.path_for(1).stat().st_size
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 0, size + 1))
    assert ckpts.space_warning() is None
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 0, size - 1))
    assert f"{size - 1} bytes free, and a checkpoint takes {size} bytes" in ckpts.space_warning()


def test_the_disk_full_error_travels_to_the_other_ranks_whole(tmp_path):
    """Rank 0 broadcasts it (pickled) so that every rank stops on the same error."""
    import pickle

    from fastssl.engine.checkpoint import CheckpointDiskFull

    error = CheckpointDiskFull(tmp_path / "step-000009.pt", 1000, 10, tmp_path / "step-000008.pt")
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error) and again.needed == 1000 and "free 990 bytes or more" in str(error)
    quota = CheckpointDiskFull(tmp_path / "step-000009.pt", 1000, 5000, None)
    assert "no earlier checkpoint exists; free space (the write failed though the space looks enough" in str(quota)


def test_two_ranks_stop_together_when_rank_0_cannot_write_the_checkpoint(tiny_gray_dataset, tmp_path, small_disk):
    """Rank 0 writes; rank 1 used to wait for it in a barrier. Both now learn the outcome and exit 4."""
    disk, resize = small_disk
    extra = {"train.checkpoint_every": 1, "train.keep_checkpoints": 3, "train.max_steps": STEPS_PER_EPOCH_2_RANKS}
    # One process's checkpoint: a 2-rank one holds one more rank's RNG states (~10 KB), well inside the margin
    _fit(tiny_gray_dataset, tmp_path / "probe", **{**extra, "train.max_steps": 1})
    size = (tmp_path / "probe" / "checkpoints" / "step-000001.pt").stat().st_size
    resize(2 * size + size // 2)
    out = disk / "run"
    ddp = _run(_train_cmd(tiny_gray_dataset, out, nproc=2, **extra), tmp_path / "ddp", timeout=240)
    assert ddp.stderr.count("exitcode  : 4") == 2, ddp.stderr[-3000:]
    assert ddp.stderr.count("error: the disk is full: checkpoint") == 1, ddp.stderr[-3000:]
    assert "fastssl/engine" not in ddp.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt", "step-000001.pt", "step-000002.pt"]
