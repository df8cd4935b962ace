"""Trusting a long run: checkpoints (atomic, pruned, verified), exact resume after SIGKILL, a clean stop on
SIGTERM / SIGINT agreed by every rank, resume on another world size, torchrun restarts, the NaN guard.

Kills and signals are real: subprocesses and os.kill. This file is also a training entry point
(``python tests/test_resume.py --config ...``, under torchrun too) that registers the test methods below,
so a subprocess can train a method that turns its input into NaN or kills its rank at a chosen step.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

if __package__ in (None, "") and __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastssl.config import ConfigError, load_config
from fastssl.engine.checkpoint import CheckpointDir, load_checkpoint
from fastssl.engine.trainer import Trainer, TrainingDiverged
from fastssl.methods import METHODS
from fastssl.methods.byol import BYOL

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()
STEPS_PER_EPOCH = 96 // 16  # tiny_gray_dataset, global batch 16, one rank
STEPS_PER_EPOCH_2_RANKS = 6  # 96 images -> 48 per rank (contiguous ranges across the shards) -> 6 batches of 8


# ------------------------------------------------------------------------------------------ test methods
class FlakyBYOL(BYOL):
    """BYOL with test faults: its input turns NaN at the (1-based) steps ``nan_at`` of this process on rank
    ``nan_rank`` (-1: every rank); rank 1 exits abruptly at the end of step ``die_at`` unless ``die_marker``
    exists (it creates it first, so it dies once)."""

    def __init__(self, backbone, feat_dim, proj_hidden: int = 4096, proj_dim: int = 256, pred_hidden: int = 4096,
                 base_tau: float = 0.996, nan_at: str = "", nan_rank: int = -1, die_at: int = 0,
                 die_marker: str = ""):
        super().__init__(backbone, feat_dim, proj_hidden, proj_dim, pred_hidden, base_tau)
        self.nan_at = {int(s) for s in str(nan_at).split(",") if s.strip()}
        self.nan_rank, self.die_at, self.die_marker = nan_rank, die_at, die_marker
        self.calls = 0

    def forward(self, views):
        self.calls += 1
        rank = int(os.environ.get("RANK", "0"))
        if self.calls in self.nan_at and self.nan_rank in (-1, rank):
            views = [v * float("nan") for v in views]
        return super().forward(views)

    def on_step_end(self, step: int, total_steps: int) -> None:
        super().on_step_end(step, total_steps)
        marker = Path(self.die_marker) if self.die_marker else None
        if step + 1 == self.die_at and os.environ.get("RANK") == "1" and marker and not marker.exists():
            marker.touch()
            os._exit(1)


class StallingBYOL(FlakyBYOL):
    """FlakyBYOL that waits at the start of step FASTSSL_TEST_STALL_AT (1-based, this process's count; an
    environment variable, so the config stays that of an uninterrupted run) until a stop signal has reached the
    process, at most 240 s; not in a requeued SLURM job's later runs (SLURM_RESTART_COUNT set). A run is thus
    surely alive, and mid-step, when a test acts on it (a scheduler's signal, a second run, a killed worker)."""

    def forward(self, views):
        stall_at = int(os.environ.get("FASTSSL_TEST_STALL_AT", "0"))
        if self.calls + 1 == stall_at and not os.environ.get("SLURM_RESTART_COUNT"):  # FlakyBYOL counts calls
            stop = getattr(signal.getsignal(signal.SIGUSR1), "__self__", None)  # the trainer's StopSignals
            deadline = time.monotonic() + 240
            while stop is not None and stop.signum is None and time.monotonic() < deadline:
                time.sleep(0.05)
        return super().forward(views)


TEST_METHODS = {"flaky_byol": f"{__name__}:FlakyBYOL", "stalling_byol": f"{__name__}:StallingBYOL"}


@pytest.fixture
def test_methods(monkeypatch):
    for name, target in TEST_METHODS.items():
        monkeypatch.setitem(METHODS, name, target)


# ------------------------------------------------------------------------------------------ helpers
_METHOD_OVERRIDES = {  # tiny heads: every method's resume is exercised in seconds
    "byol": {"method.proj_hidden": 32, "method.proj_dim": 16, "method.pred_hidden": 32},
    "simclr": {"method.proj_hidden": 32, "method.proj_dim": 16},
    "mocov2": {"method.proj_hidden": 32, "method.proj_dim": 16, "method.queue_size": 256},
    "mocov3": {"method.proj_hidden": 32, "method.proj_dim": 16, "method.pred_hidden": 32},
    "swav": {"method.proj_hidden": 32, "method.proj_dim": 16, "method.n_prototypes": 10, "method.queue_length": 32},
    "dino": {"method.hidden_dim": 32, "method.bottleneck_dim": 16, "method.out_dim": 64, "data.n_local": 2},
    "barlow": {"method.proj_hidden": 32, "method.proj_dim": 32},
    "vicreg": {"method.proj_hidden": 32, "method.proj_dim": 32},
}
_RECIPES = {m: f"{m}_resnet18_fmnist" for m in _METHOD_OVERRIDES}


def _overrides(data: Path, out: Path, method: str = "byol", **extra) -> list[str]:
    base = {
        "data.path": data, "data.num_workers": 0, "model.width": 4, "train.batch_size": 16, "train.epochs": 3,
        "train.log_every": 1, "train.progress": False, "train.threads": 1, "train.deterministic": True,
        "eval.knn": False, "eval.probe": False, "out_dir": out,
    }
    base.update(_METHOD_OVERRIDES[method])
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _fit(data: Path, out: Path, method: str = "byol", **extra) -> dict:
    return Trainer(load_config(_RECIPES[method], _overrides(data, out, method, **extra))).fit()


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


def _train_cmd(data: Path, out: Path, method: str = "byol", nproc: int = 0, torchrun_args=(), **extra) -> list[str]:
    """``fastssl/train.py`` (this file as the entry point when a test method is used), under torchrun when nproc."""
    entry = THIS if extra.get("method.name") in TEST_METHODS else ROOT / "fastssl" / "train.py"
    if extra.get("method.name") in TEST_METHODS:
        # A fixed layout: train.channels_last=auto would time copies of the model, whose forwards these test methods
        # count (a stall or a NaN at the Nth call would then hit the measurement instead of the training step).
        extra.setdefault("train.channels_last", "true")
    args = [str(entry), "--config", _RECIPES[method], *_overrides(data, out, method, **extra)]
    if nproc:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                *torchrun_args, *args]
    return [sys.executable, *args]


def _popen(cmd: list[str], log: Path, **env) -> subprocess.Popen:
    """Start ``cmd`` with stdout/stderr in ``log``.out/.err (files: a full pipe would stall the child)."""
    out, err = open(f"{log}.out", "w"), open(f"{log}.err", "w")
    return subprocess.Popen(cmd, cwd=log.parent, env={**_env(), **env}, stdout=out, stderr=err)


def _logs(log: Path) -> tuple[str, str]:
    return Path(f"{log}.out").read_text(), Path(f"{log}.err").read_text()


def _run(cmd: list[str], log: Path, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    proc = _popen(cmd, log, **env)
    proc.wait(timeout)
    out, err = _logs(log)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]  # complete lines only


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int, log: Path, timeout: float = 240) -> int:
    """Poll metrics.jsonl until a training row of step >= ``step`` appears; returns that step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = _logs(log)[1][-3000:]
            raise AssertionError(f"the run ended (status {proc.returncode}) before step {step}:\n{err}")
        steps = [r["step"] for r in _rows(out) if "loss" in r]
        if steps and max(steps) >= step:
            return max(steps)
        time.sleep(0.005)
    raise AssertionError(f"no step {step} within {timeout} s")


def _results(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def _assert_same_state(a: dict, b: dict, what: str) -> None:
    """Bit-identical tensors (and equal scalars) in two nested state dicts."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), what
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            _assert_same_state(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_state(x, y, f"{what}[{i}]")
    else:
        assert a == b, what


def _assert_same_training_state(a: dict, b: dict) -> None:
    """Every saved tensor and value alike (RNG states, probe, counters included); the configs may differ only
    in out_dir (the two runs' folders)."""
    assert a.keys() == b.keys()
    for key in a.keys() - {"config"}:
        _assert_same_state(a[key], b[key], key)
    _assert_same_state({**a["config"], "out_dir": None}, {**b["config"], "out_dir": None}, "config")


@pytest.fixture(scope="module")
def reference_runs(tiny_gray_dataset, tmp_path_factory):
    """Uninterrupted runs (3 epochs, checkpoint every 4 steps), by method and extra overrides, computed once:
    their final checkpoints."""
    cache: dict[tuple, dict] = {}

    def get(method: str, **extra) -> dict:
        key = (method, *sorted(extra.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"reference_{method}")
            results = _fit(tiny_gray_dataset, out, method, **{"train.checkpoint_every": 4, **extra})
            assert results["steps"] == 3 * STEPS_PER_EPOCH
            cache[key] = load_checkpoint(out / "checkpoints" / "last.pt")
        return cache[key]

    return get


# ------------------------------------------------------------------------------------------ checkpoint files
def test_checkpoints_every_n_steps_keep_the_newest_and_last_is_the_newest(tiny_gray_dataset, tmp_path):
    out = tmp_path / "run"
    _fit(tiny_gray_dataset, out, **{"train.checkpoint_every": 4, "train.keep_checkpoints": 2})
    folder = out / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt", "step-000016.pt", "step-000018.pt"]
    assert (folder / "last.pt").samefile(folder / "step-000018.pt")  # a second name, not a copy
    state = load_checkpoint(folder / "last.pt")
    assert {"model", "optimizer", "scaler", "step", "epoch", "loader", "rng", "config", "world_size",
            "steps_per_epoch", "bad_steps"} <= state.keys()
    assert state["step"] == 18 and state["epoch"] == 3 and state["loader"] == {"epoch": 3, "batch": 0}
    assert len(state["rng"]) == 1 and {"python", "numpy", "torch"} <= state["rng"][0].keys()
    assert state["config"]["train"]["keep_checkpoints"] == 2
    assert "target_backbone.conv1.weight" in state["model"]  # the EMA target network travels in the model


def test_checkpoint_folder_prunes_and_drops_checkpoints_of_later_steps(tmp_path):
    ckpts = CheckpointDir(tmp_path / "checkpoints", keep=2)
    for step in (2, 4, 6):
        ckpts.save({"step": step, "model": {}}, step)
    assert [s for s, _ in ckpts.step_files()] == [6, 4]
    with pytest.warns(UserWarning, match="step-000006.pt"):  # resumed from an older one: 6 is another timeline
        ckpts.save({"step": 5, "model": {}}, 5)
    assert [s for s, _ in ckpts.step_files()] == [5, 4]
    assert load_checkpoint(ckpts.last)["step"] == 5
    (ckpts.folder / ".step-000007.pt.abc.tmp").write_bytes(b"half a checkpoint")
    ckpts.remove_temp_files()
    assert sorted(p.name for p in ckpts.folder.iterdir()) == ["last.pt", "step-000004.pt", "step-000005.pt"]


def _flip_a_byte_inside_a_tensor(path: Path) -> None:
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    header = info.header_offset
    name_len, extra_len = int.from_bytes(raw[header + 26:header + 28], "little"), \
        int.from_bytes(raw[header + 28:header + 30], "little")
    raw[header + 30 + name_len + extra_len + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def test_resume_auto_skips_truncated_and_corrupt_checkpoints_naming_them(tiny_gray_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    _fit(tiny_gray_dataset, out, **{"train.checkpoint_every": 2, "train.max_steps": 6})
    folder = out / "checkpoints"
    newest = folder / "step-000006.pt"
    with open(newest, "r+b") as f:  # truncated, as by a full disk
        f.truncate(newest.stat().st_size // 2)
    _flip_a_byte_inside_a_tensor(folder / "step-000004.pt")  # corrupt: torch.load alone would not notice
    with pytest.raises(ValueError, match="CRC"):
        load_checkpoint(folder / "step-000004.pt")
    with pytest.warns(UserWarning) as record:
        results = _fit(tiny_gray_dataset, out, **{"train.checkpoint_every": 2, "train.max_steps": 8})
    skipped = [str(w.message) for w in record if "skipping" in str(w.message)]
    assert len(skipped) == 2 and "step-000006.pt" in skipped[0] and "step-000004.pt" in skipped[1], skipped
    assert f"resumed from {folder / 'step-000002.pt'} at step 2" in capsys.readouterr().out
    assert results["steps"] == 8
    assert [s for s, _ in CheckpointDir(folder).step_files()] == [8, 6, 4]
    assert all(load_checkpoint(p)["step"] == s for s, p in CheckpointDir(folder).step_files())


# ------------------------------------------------------------------------------------------ exact resume
# The torch loader's DataLoader (data.cache=none) without and with worker processes; the RAM cache (no DataLoader).
_WORKERS = {"data.cache": "none", "data.num_workers": 2}


@pytest.mark.parametrize("method, extra", [("byol", {}), ("byol", _WORKERS), ("swav", {})],
                         ids=["byol-ram", "byol-workers", "swav-ram"])
def test_resume_after_kill_matches_uninterrupted_run(tiny_gray_dataset, tmp_path, reference_runs, method, extra):
    total = 3 * STEPS_PER_EPOCH
    kill_after = random.Random().randint(5, total - 4)  # after the first checkpoint (step 4), before the end
    out, log = tmp_path / "run", tmp_path / "killed"
    cmd = _train_cmd(tiny_gray_dataset, out, method, **{"train.checkpoint_every": 4, **extra})
    proc = _popen(cmd, log)
    try:
        seen = _wait_for_step(proc, out, kill_after, log)
        assert proc.poll() is None, "the run finished before the kill"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    steps_on_disk = [s for s, _ in CheckpointDir(out / "checkpoints").step_files()]
    assert steps_on_disk and max(steps_on_disk) < total, steps_on_disk
    resumed = _run(cmd, tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and _results(resumed.stdout)["steps"] == total
    final = load_checkpoint(out / "checkpoints" / "last.pt")
    # bit-identical, RNG states included, killed after step >= {seen}
    _assert_same_training_state(reference_runs(method, **extra), final)
    # metrics.jsonl: one row per step, though the steps after the checkpoint ran twice
    assert [r["step"] for r in _rows(out) if "loss" in r] == list(range(1, total + 1))
    print(f"{method}: killed after step {seen}, resumed from step {max(steps_on_disk)}")


@pytest.mark.parametrize("method", sorted(_METHOD_OVERRIDES))
def test_every_method_resumed_at_a_random_step_equals_the_uninterrupted_run(tiny_gray_dataset, tmp_path, method):
    """The state a SIGKILL leaves (a checkpoint of step s, nothing after it) resumed by a fresh Trainer: every saved
    tensor equal at the end, the global RNG states included (anything drawing on them after a resume, dropout,
    random masking, Shuffle-BN permutations, must not diverge). The DataLoader without workers makes a new
    iterator at each epoch and at the resume; the online probe is on, its state checkpointed too."""
    total = 2 * STEPS_PER_EPOCH
    extra = {"train.epochs": 2, "train.checkpoint_every": 1, "train.keep_checkpoints": total, "data.cache": "none",
             "eval.probe": True}
    reference = tmp_path / "reference"
    _fit(tiny_gray_dataset, reference, method, **extra)
    step = random.Random().randint(1, total - 1)
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(reference / "checkpoints" / f"step-{step:06d}.pt", out / "checkpoints")
    assert _fit(tiny_gray_dataset, out, method, **extra)["steps"] == total
    _assert_same_training_state(load_checkpoint(reference / "checkpoints" / "last.pt"),
                                load_checkpoint(out / "checkpoints" / "last.pt"))  # resumed from step {step}


@pytest.mark.parametrize("cache, workers", [("none", 0), ("none", 2), ("ram", 0)])
def test_the_torch_loader_never_draws_on_the_global_rng(tiny_gray_dataset, cache, workers):
    """A DataLoader without a generator of its own draws its workers' base seed from the global torch RNG at
    every new iterator: a resumed run (a new iterator mid-epoch) then ended with another global RNG state."""
    import pipelines
    from fastssl.engine.trainer import build_spec

    cfg = load_config("byol_resnet18_fmnist", [f"data.path={tiny_gray_dataset}"])
    loader = pipelines.build_loader(tiny_gray_dataset, build_spec(cfg), 32, backend="torch", cache=cache,
                                    num_workers=workers, progress=False)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for epoch in range(2):
        loader.set_epoch(epoch)
        assert len(list(loader)) == len(loader)
    loader.load_state_dict({"epoch": 2, "batch": 1})  # as a resume does: a new iterator mid-epoch
    next(iter(loader))
    assert torch.equal(torch.get_rng_state(), before)


def test_sigterm_finishes_the_step_saves_and_exits_with_a_resume_hint(tiny_gray_dataset, tmp_path, reference_runs):
    total = 3 * STEPS_PER_EPOCH
    out, log = tmp_path / "run", tmp_path / "terminated"
    cmd = _train_cmd(tiny_gray_dataset, out, **{"train.checkpoint_every": 4})
    proc = _popen(cmd, log)
    try:
        _wait_for_step(proc, out, random.Random().randint(2, total - 6), log)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(120) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    stdout, stderr = _logs(log)
    assert "Traceback" not in stderr and "stopped by SIGTERM after step" in stderr and "resume" in stderr, stderr
    stopped_at = int(stderr.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert max(r["step"] for r in _rows(out) if "loss" in r) == stopped_at  # the step in flight finished, no more
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == stopped_at
    assert (out / "checkpoints" / f"step-{stopped_at:06d}.pt").is_file()
    resumed = _run(cmd, tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {stopped_at} " in resumed.stdout
    _assert_same_training_state(reference_runs("byol"), load_checkpoint(out / "checkpoints" / "last.pt"))


_SIGNAL_SCRIPT = """
import os, signal, sys, time
from fastssl.engine.distributed import StopSignals
stop = StopSignals()
stop.install()
os.kill(os.getpid(), signal.SIGINT)
os.kill(os.getpid(), signal.SIGINT)  # the same signal again at once: a forwarded copy, the same request
time.sleep(0.2)
print("requested", stop.signum, flush=True)
time.sleep(float(sys.argv[1]))
os.kill(os.getpid(), signal.SIGINT)
time.sleep(10)
print("still running", flush=True)
"""


def test_a_second_signal_exits_at_once(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _SIGNAL_SCRIPT, "1.2"], env=_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGINT
    assert proc.stdout.split() == ["requested", str(int(signal.SIGINT))]
    assert "SIGINT: finishing this step, saving a checkpoint" in proc.stderr
    assert "SIGINT again: exiting now, without a checkpoint" in proc.stderr


_FINISHED_SCRIPT = """
import os, signal, sys, time
from fastssl.engine.distributed import StopSignals
stop = StopSignals(announce=False)
stop.install()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.2)
stop.finish("resume hint\\n")
if sys.argv[1] == "report":
    stop.report()
os.kill(os.getpid(), signal.SIGINT)  # torchrun's signal to a rank that is already exiting
time.sleep(10)
print("still running", flush=True)
"""


_FINALIZING_SCRIPT = """
import os, signal, sys, time
from fastssl.engine.distributed import StopSignals


class Late:  # destroyed with __main__, after Python's finalization has put the default signal actions back
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.3)


late = Late()
stop = StopSignals(announce=False)
stop.install()
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.2)
stop.finish("resume hint\\n")
stop.report()
if sys.argv[1] == "ignore":
    stop.ignore_late_signals()
sys.exit(128 + signal.SIGTERM)
"""


@pytest.mark.parametrize("ignore", [False, True])
def test_a_signal_during_the_exit_itself_keeps_the_stops_status(ignore):
    """torchrun signals a rank that is still exiting once a peer has exited. Python's finalization restores the
    default action of every signal with a Python handler, so a signal that late killed the rank (-SIGTERM, a
    flaky DDP test); ignore_late_signals (train.py calls it just before exiting) keeps the stop's status."""
    proc = subprocess.run([sys.executable, "-c", _FINALIZING_SCRIPT, "ignore" if ignore else "-"], env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == (128 + signal.SIGTERM if ignore else -signal.SIGTERM), proc.stderr
    assert proc.stderr.count("resume hint") == 1, proc.stderr


@pytest.mark.parametrize("reported", [False, True])
def test_a_signal_after_the_checkpoint_exits_with_the_first_signals_status_and_one_hint(tmp_path, reported):
    proc = subprocess.run([sys.executable, "-c", _FINISHED_SCRIPT, "report" if reported else "-"], env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr  # the stop's status, not the late signal's
    assert proc.stdout == "" and proc.stderr.count("resume hint") == 1, proc.stderr
    assert "without a checkpoint" not in proc.stderr


# ------------------------------------------------------------------------------------------ world sizes
def test_signal_to_one_rank_stops_both_at_one_step_and_one_rank_resumes(tiny_gray_dataset, tmp_path):
    """SIGTERM to rank 1 only: both ranks stop after the same step and rank 0 writes its checkpoint; one process
    then resumes it (another world size) and finishes."""
    out, log = tmp_path / "run", tmp_path / "ddp"
    pids = tmp_path / "pids"
    pids.mkdir()
    cmd = _train_cmd(tiny_gray_dataset, out, nproc=2, **{"method.name": "flaky_byol"})
    proc = _popen(cmd, log, FASTSSL_TEST_PID_DIR=str(pids))
    try:
        _wait_for_step(proc, out, 2, log)
        os.kill(int((pids / "rank1").read_text()), signal.SIGTERM)
        proc.wait(180)
    finally:
        if proc.poll() is None:
            proc.kill()
    stdout, stderr = _logs(log)
    # Both ranks stopped cleanly (status 143, no traceback of ours; torchrun reports the non-zero status with its own).
    assert stderr.count("exitcode  : 143") == 2 and "fastssl/engine" not in stderr, stderr[-3000:]
    assert stderr.count("stopped by SIGTERM after step") == 1, stderr[-3000:]  # rank 0 says it, for the job
    stopped_at = int(stderr.split("stopped by SIGTERM after step ")[1].split(";")[0])
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["step"] == stopped_at and state["world_size"] == 2 and len(state["rng"]) == 2
    assert max(r["step"] for r in _rows(out) if "loss" in r) == stopped_at
    # One process takes over: same epoch and fraction of it, step counted in its own steps per epoch.
    resumed = _run(_train_cmd(tiny_gray_dataset, out, **{"method.name": "flaky_byol"}), tmp_path / "one")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    epoch, batch = divmod(stopped_at, STEPS_PER_EPOCH_2_RANKS)
    remapped = epoch * STEPS_PER_EPOCH + batch * STEPS_PER_EPOCH // STEPS_PER_EPOCH_2_RANKS
    assert f"at step {remapped} " in resumed.stdout
    assert _results(resumed.stdout)["steps"] == 3 * STEPS_PER_EPOCH


def test_moco_queue_survives_resume_on_one_rank(tiny_gray_dataset, tmp_path):
    out = tmp_path / "run"
    ddp = _run(_train_cmd(tiny_gray_dataset, out, "mocov2", nproc=2, **{"train.max_steps": 2, "train.epochs": 2}),
               tmp_path / "ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    saved = load_checkpoint(out / "checkpoints" / "last.pt")
    assert saved["step"] == 2 and saved["world_size"] == 2
    assert int(saved["model"]["queue_ptr"]) == 2 * 16  # the whole global batch, all ranks' keys
    results = _fit(tiny_gray_dataset, out, "mocov2", **{"train.epochs": 2})
    # Step 2 of 6 per epoch on 2 ranks is step 2 of 6 on one: 10 more steps of 16 keys.
    assert results["steps"] == 2 * STEPS_PER_EPOCH
    final = load_checkpoint(out / "checkpoints" / "last.pt")["model"]
    assert int(final["queue_ptr"]) == 32 + (2 * STEPS_PER_EPOCH - 2 * STEPS_PER_EPOCH // STEPS_PER_EPOCH_2_RANKS) * 16
    assert torch.equal(final["queue"][:32], saved["model"]["queue"][:32])  # the 2-rank keys, untouched
    assert not torch.equal(final["queue"][32:160], saved["model"]["queue"][32:160])


def test_torchrun_restarts_a_dead_rank_from_the_last_checkpoint(tiny_gray_dataset, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "rank1-died"
    total = 3 * STEPS_PER_EPOCH_2_RANKS
    cmd = _train_cmd(tiny_gray_dataset, out, nproc=2, torchrun_args=["--max-restarts=1"],
                     **{"method.name": "flaky_byol", "method.die_at": 5, "method.die_marker": marker,
                        "train.checkpoint_every": 2})
    proc = _run(cmd, tmp_path / "elastic", timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert marker.is_file()  # rank 1 did die, once
    assert f"resumed from {out / 'checkpoints' / 'step-000004.pt'} at step 4" in proc.stdout
    results = _results(proc.stdout)
    assert results["steps"] == total and results["weight_digests"][0] == results["weight_digests"][1]


# ------------------------------------------------------------------------------------------ NaN guard
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_nonfinite_loss_skips_the_whole_update_and_is_logged(tiny_gray_dataset, tmp_path, test_methods, precision):
    out = tmp_path / "run"
    results = _fit(tiny_gray_dataset, out, **{
        "method.name": "flaky_byol", "method.nan_at": "'3,4'", "train.precision": precision,
        "train.checkpoint_every": 1, "train.keep_checkpoints": 10, "train.max_steps": 8})
    assert results["steps"] == 8 and results["bad_steps"] == 2
    events = [r for r in _rows(out) if r.get("event") == "nonfinite_loss"]
    assert [(r["step"], r["bad_steps_in_row"], r["bad_steps_total"]) for r in events] == [(3, 1, 1), (4, 2, 2)]
    ckpt = {s: load_checkpoint(p) for s, p in CheckpointDir(out / "checkpoints").step_files()}
    # Steps 3 and 4 changed nothing: weights, EMA target, BatchNorm statistics, optimizer, GradScaler.
    _assert_same_state(ckpt[2]["model"], ckpt[4]["model"], "model")
    _assert_same_state(ckpt[2]["optimizer"]["state"], ckpt[4]["optimizer"]["state"], "optimizer")  # not the lr
    _assert_same_state(ckpt[2]["scaler"], ckpt[4]["scaler"], "scaler")
    # Then training goes on (fp16: once the GradScaler, which also skips steps 5 and 6 here, found its scale;
    # its own skips lower the scale and are not counted as bad steps).
    assert not torch.equal(ckpt[4]["model"]["backbone.conv1.weight"], ckpt[8]["model"]["backbone.conv1.weight"])
    assert all(torch.isfinite(t).all() for t in ckpt[8]["model"].values() if t.is_floating_point())
    assert ckpt[8]["bad_steps"] == {"in_row": 0, "total": 2}


def test_too_many_bad_steps_in_a_row_stop_the_run(tiny_gray_dataset, tmp_path, test_methods):
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"not finite for 3 steps in a row \(train.max_bad_steps=3\)"):
        _fit(tiny_gray_dataset, out, **{"method.name": "flaky_byol", "method.nan_at": "'2,3,4,5,6'",
                                        "train.max_bad_steps": 3})
    assert [r["step"] for r in _rows(out) if r.get("event") == "nonfinite_loss"] == [2, 3, 4]


def test_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(tiny_gray_dataset, tmp_path):
    out = tmp_path / "run"
    proc = _run(_train_cmd(tiny_gray_dataset, out, nproc=2, **{
        "method.name": "flaky_byol", "method.nan_at": 2, "method.nan_rank": 1, "train.max_steps": 4}),
        tmp_path / "ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = _results(proc.stdout)
    assert results["steps"] == 4 and results["bad_steps"] == 1
    assert results["weight_digests"][0] == results["weight_digests"][1]  # rank 0 skipped it too
    assert [r["step"] for r in _rows(out) if r.get("event") == "nonfinite_loss"] == [2]
    model = load_checkpoint(out / "checkpoints" / "last.pt")["model"]
    assert all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point())


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("override, key", [
    ("train.keep_checkpoints=0", "train.keep_checkpoints"),
    ("train.max_bad_steps=0", "train.max_bad_steps"),
    ("train.checkpoint_every=-1", "train.checkpoint_every"),
    ("resume=/no/such/checkpoint.pt", "resume"),
])
def test_checkpoint_settings_are_validated_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config("byol_resnet18_fmnist", [override])


# ------------------------------------------------------------------------------------------ changed config
def test_config_changes_at_resume_are_sorted_into_accepted_and_refused():
    from omegaconf import OmegaConf

    from fastssl.config import resume_changes

    saved = OmegaConf.to_container(load_config("byol_resnet18_fmnist"))
    del saved["resume_allow_changes"]  # a checkpoint from before the key existed: its default, not a change
    cfg = load_config("byol_resnet18_fmnist", [
        "method.base_tau=0.5", "train.batch_size=64", "data.aug.blur_p=0.5", "optim.base_lr=0.1",
        "train.log_every=5", "train.epochs=8", "eval.knn_k=5", "data.num_workers=3", "out_dir=elsewhere",
        "resume_allow_changes=[optim]"])
    changes = {c.key: c for c in resume_changes(saved, cfg)}
    assert {k for k, c in changes.items() if not c.accepted} == {"method.base_tau", "train.batch_size", "data.aug"}
    assert {k for k, c in changes.items() if c.accepted} == {
        "optim.base_lr", "train.log_every", "train.epochs", "eval.knn_k", "data.num_workers", "out_dir",
        "resume_allow_changes"}
    tau = saved["method"]["base_tau"]  # the recipe's
    assert str(changes["method.base_tau"]) == f"method.base_tau: {tau} -> 0.5 (changes what is trained)"
    assert "allowed by resume_allow_changes" in str(changes["optim.base_lr"])
    assert "schedules now end at epoch 8" in str(changes["train.epochs"])
    shorter = resume_changes(saved, load_config("byol_resnet18_fmnist", ["train.epochs=2"]))
    assert [(c.key, c.accepted) for c in shorter] == [("train.epochs", False)]  # train.max_steps stops early instead
    other = {c.key: c for c in resume_changes(saved, load_config("simclr_resnet18_fmnist"))}
    assert {"method.name", "method.pred_hidden", "method.temperature"} <= other.keys()  # keys on one side only
    assert str(other["method.pred_hidden"]) == "method.pred_hidden: 2048 -> (absent) (changes what is trained)"
    assert not any(c.accepted for k, c in other.items() if k.startswith("method."))


def test_resume_with_a_changed_config_lists_every_difference_and_refuses_what_changes_training(
        tiny_gray_dataset, tmp_path, capsys):
    from fastssl.train import main

    out = tmp_path / "run"
    _fit(tiny_gray_dataset, out, **{"train.max_steps": 2})
    capsys.readouterr()
    config_yaml = (out / "config.yaml").read_text()
    args = ["--config", "byol_resnet18_fmnist", *_overrides(tiny_gray_dataset, out, **{"train.max_steps": 4})]
    # What is trained changes: refused before anything is built or written, every difference listed.
    with pytest.raises(SystemExit) as exc:
        main([*args, "method.base_tau=0.5", "train.batch_size=8", "train.log_every=2"])
    captured = capsys.readouterr()
    assert exc.value.code == 2 and "Traceback" not in captured.err
    err = captured.err
    assert "step-000002.pt: this config changes what the checkpoint's run trains" in err, err
    tau = load_config("byol_resnet18_fmnist").method.base_tau  # the recipe's
    assert f"  method.base_tau: {tau} -> 0.5 (changes what is trained)" in err
    assert "  train.batch_size: 16 -> 8 (changes what is trained)" in err
    assert "resume_allow_changes=[method.base_tau,train.batch_size]" in err and "resume=none" in err
    assert "train.log_every" not in err  # not in the refusal: it would have been accepted
    assert (out / "config.yaml").read_text() == config_yaml
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == 2
    # What is trained stays: accepted, a line each.
    results = _fit(tiny_gray_dataset, out, **{"train.max_steps": 4, "train.log_every": 2, "train.epochs": 4})
    stdout = capsys.readouterr().out
    assert results["steps"] == 4
    assert "resume: config changed since the checkpoint: train.log_every: 1 -> 2 (accepted: does not change what " \
           "is trained)" in stdout
    assert "train.max_steps: 2 -> 4 (accepted" in stdout
    assert "train.epochs: 3 -> 4 (accepted: a longer run; the learning-rate and momentum schedules now end at " \
           "epoch 4)" in stdout
    assert "resumed from" in stdout
    # An explicit override lets a change through, said as such; the checkpoints then carry the new value.
    results = _fit(tiny_gray_dataset, out, **{"train.max_steps": 5, "train.log_every": 2, "train.epochs": 4,
                                              "method.base_tau": 0.5, "resume_allow_changes": "[method.base_tau]"})
    assert results["steps"] == 5
    assert f"method.base_tau: {tau} -> 0.5 (allowed by resume_allow_changes)" in capsys.readouterr().out
    assert load_checkpoint(out / "checkpoints" / "last.pt")["config"]["method"]["base_tau"] == 0.5


if __name__ == "__main__":
    # A training entry point that knows the test methods (torchrun runs this file on every rank).
    METHODS.update(TEST_METHODS)
    if os.environ.get("FASTSSL_TEST_PID_DIR"):
        Path(os.environ["FASTSSL_TEST_PID_DIR"], f"rank{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))
    from fastssl.train import main

    sys.exit(main())


def test_trim_metrics_drops_rows_after_the_checkpoint_and_a_torn_line(tmp_path):
    from fastssl.engine.trainer import trim_metrics

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 9)] + [{"step": 4, "epoch": 1, "knn_top1": 50.0}]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_text(text + '{"step": 9, "lo')  # killed in the middle of a row
    assert trim_metrics(path, 5) == 4  # steps 6, 7, 8 and the torn line
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5, 4]
    assert trim_metrics(path, 5) == 0 and trim_metrics(tmp_path / "absent.jsonl", 5) == 0


def test_the_long_wait_for_rank_0_is_configurable_and_checked(monkeypatch):
    """Ranks wait for rank 0's own work (kNN evaluation, checkpoint writes) in a gloo group with this timeout,
    not in an NCCL barrier that its watchdog aborts after 10 minutes."""
    import datetime

    from fastssl.engine import distributed

    monkeypatch.delenv("FASTSSL_MAIN_WAIT_HOURS", raising=False)
    assert distributed.main_wait_timeout() == datetime.timedelta(hours=6)
    monkeypatch.setenv("FASTSSL_MAIN_WAIT_HOURS", "0.5")
    assert distributed.main_wait_timeout() == datetime.timedelta(minutes=30)
    for bad in ("soon", "0", "-1"):
        monkeypatch.setenv("FASTSSL_MAIN_WAIT_HOURS", bad)
        with pytest.raises(ValueError, match="FASTSSL_MAIN_WAIT_HOURS"):
            distributed.main_wait_timeout()
