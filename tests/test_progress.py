"""Progress in a log (issue 14, "Readable logs"): plain lines, never tqdm's carriage-return frames, when the
output is not a terminal; a live bar when it is."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipelines import progress
from pipelines.progress import LogProgress, progress_bar

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if line]


def test_a_fast_bar_in_a_log_prints_one_line_per_tenth_and_a_last_line(monkeypatch):
    monkeypatch.delenv(progress.INTERVAL_ENV, raising=False)
    out, clock = io.StringIO(), FakeClock()
    bar = LogProgress(total=100_000, desc="train", unit="img", file=out, clock=clock)
    for i in range(100_000):
        clock.now = 1000.0 + (i + 1) * 0.0002  # 20 s in all: a tenth every 2 s
        bar.update(1)
    bar.set_postfix(loss="0.5000")
    bar.close()
    lines = _lines(out.getvalue())
    assert "\r" not in out.getvalue()
    assert len(lines) == 10  # 10%, 20%, ..., 90%, then the last line (100% waits for close)
    assert lines[0].startswith("train: 10,000/100,000 img (10%), 00:02 elapsed, ETA 00:18, 5,000 img/s")
    assert lines[-1] == "train: 100,000/100,000 img (100%), done in 00:20, 5,000 img/s, loss=0.5000"


def test_a_bar_that_ends_within_a_second_prints_only_its_last_line():
    out, clock = io.StringIO(), FakeClock()
    with LogProgress(total=50, desc="val", unit="img", file=out, clock=clock) as bar:
        for _ in range(50):
            clock.now += 0.01
            bar.update(1)
    assert _lines(out.getvalue()) == ["val: 50/50 img (100%), done in 00:00, 100 img/s"]


def test_a_slow_bar_in_a_log_prints_a_line_per_interval():
    out, clock = io.StringIO(), FakeClock()
    bar = LogProgress(total=1000, desc="byol", unit="step", file=out, clock=clock, interval=60)
    for _ in range(20):  # 20 steps of 30 s: no tenth crossed, a line each minute
        clock.now += 30
        bar.update(1)
    lines = _lines(out.getvalue())
    assert len(lines) == 10 and all("byol: " in line and "elapsed" in line for line in lines)
    assert lines[0].startswith("byol: 2/1,000 step (0%), 01:00 elapsed, ETA 8:19:00, 0.0333 step/s")


def test_a_bar_of_hours_prints_ever_fewer_lines_as_it_goes():
    """The demo on a crowded machine (7 hours) or a week-long run: the gap grows to 10 intervals, no more."""
    out, clock = io.StringIO(), FakeClock()
    bar = LogProgress(total=10**9, desc="byol", unit="step", file=out, clock=clock, interval=60)
    times = []
    for _ in range(7 * 360):  # 7 hours, a step every 10 s, no tenth crossed
        clock.now += 10
        before = out.getvalue().count("\n")
        bar.update(1)
        if out.getvalue().count("\n") > before:
            times.append(clock.now - 1000.0)
    assert 80 <= len(times) <= 100
    gaps = np.diff([0.0, *times])
    assert gaps[:20].max() == 60  # the first 20 minutes: a line a minute
    assert gaps.max() == 600  # later at most 10 minutes apart
    for _ in range(7 * 24 * 360):  # a week
        clock.now += 10
        bar.update(1)
    assert out.getvalue().count("\n") < 7 * 24 * 6 + 100


def test_unpause_keeps_an_evaluation_out_of_the_rate_and_a_resumed_bar_counts_only_new_work():
    out, clock = io.StringIO(), FakeClock()
    bar = LogProgress(total=200, initial=100, desc="byol", unit="step", file=out, clock=clock)
    for _ in range(50):
        clock.now += 1
        bar.update(1)
    clock.now += 500  # a kNN evaluation between epochs
    bar.unpause()
    for _ in range(50):
        clock.now += 1
        bar.update(1)
    bar.close()
    lines = _lines(out.getvalue())
    assert lines[0].startswith("byol: 120/200 step (60%)")  # the tenths done before the resume are not announced
    assert lines[-1] == "byol: 200/200 step (100%), done in 01:40, 1 step/s"


def test_iterating_a_log_bar_counts_each_item_and_ends_with_one_line():
    out = io.StringIO()
    assert list(progress_bar(range(5), desc="linear", unit="epoch", file=out)) == [0, 1, 2, 3, 4]
    assert _lines(out.getvalue())[-1].startswith("linear: 5/5 epoch (100%), done in")
    out = io.StringIO()
    bar = progress_bar(total=10, desc="byol", unit="step", file=out)
    bar.update(3)
    bar.close()  # stopped by a signal
    (line,) = _lines(out.getvalue())
    assert line.startswith("byol: 3/10 step (30%), ended after 00:00")


def test_a_terminal_gets_a_live_bar_and_the_environment_can_force_either(monkeypatch):
    monkeypatch.delenv(progress.MODE_ENV, raising=False)
    assert isinstance(progress_bar(total=3, file=Terminal()), tqdm)
    assert isinstance(progress_bar(total=3, file=io.StringIO()), LogProgress)
    monkeypatch.setenv(progress.MODE_ENV, "log")
    assert isinstance(progress_bar(total=3, file=Terminal()), LogProgress)
    monkeypatch.setenv(progress.MODE_ENV, "bar")
    assert isinstance(progress_bar(total=3, file=io.StringIO()), tqdm)
    # disabled stays silent in both modes
    out = io.StringIO()
    monkeypatch.setenv(progress.MODE_ENV, "log")
    bar = progress_bar(total=3, file=out, disable=True)
    bar.update(3)
    bar.close()
    assert out.getvalue() == ""


# ---- whole programs with their output redirected to a file ---------------------------------------------


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (progress.MODE_ENV, progress.INTERVAL_ENV)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return env


def test_demo_with_its_output_in_a_file_writes_plain_progress_lines(tiny_gray_dataset, tmp_path):
    """`make demo > demo.log 2>&1` in small: the trainer's bar and the RAM-cache fills become a few plain lines."""
    steps = 60
    argv = [f"data.path={tiny_gray_dataset}", f"out_dir={tmp_path / 'demo'}", f"train.max_steps={steps}",
            "train.epochs=12", "model.width=4", "method.proj_hidden=32", "method.proj_dim=16", "method.pred_hidden=32",
            "train.batch_size=16", "data.num_workers=0", "train.threads=1", "eval.batch_size=64",
            "train.log_every=5"]
    log = tmp_path / "demo.log"
    with open(log, "wb") as f:
        proc = subprocess.run([sys.executable, "-m", "fastssl.demo", *argv], stdout=f, stderr=subprocess.STDOUT,
                              env=_env(), cwd=tmp_path, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "\r" not in text  # tqdm draws every frame after a carriage return
    lines = text.splitlines()
    assert len(lines) <= 40, text
    assert any(line.startswith(f"byol: {steps}/{steps} step (100%), done in") and "loss=" in line for line in lines)
    assert any(line.startswith(f"decoding {tiny_gray_dataset.name}/train into RAM: 96/96 img (100%)")
               for line in lines), text
    assert "after BYOL, 60 steps" in text


def test_fastssl_convert_piped_writes_plain_progress_lines(tmp_path):
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for i in range(40):
        (src / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(src / f"c{i % 2}" / f"{i}.png")
    proc = subprocess.run([sys.executable, "-m", "fastssl.convert", str(src), str(tmp_path / "out"), "--workers", "0"],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr
    assert len(_lines(proc.stderr)) == 1, proc.stderr  # 40 images: done within a second, one line
    assert proc.stderr.startswith("train: 40/40 img (100%), done in")
