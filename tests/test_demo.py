"""The README's first command (`make demo` -> fastssl.demo): convert if needed, train BYOL, kNN before/after."""

from __future__ import annotations

import pytest

from fastssl import demo


def test_demo_trains_and_reports_knn_before_and_after(tiny_gray_dataset, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = [f"data.path={tiny_gray_dataset}", f"out_dir={out}", "train.max_steps=2", "model.width=4",
            "method.proj_hidden=32", "method.proj_dim=16", "method.pred_hidden=32", "train.batch_size=16",
            "data.num_workers=0", "train.progress=false", "train.threads=1", "eval.batch_size=64"]
    assert demo.main(argv) == 0
    text = capsys.readouterr().out
    assert f"Using the converted dataset in {tiny_gray_dataset}" in text
    assert "Training byol_resnet18_fmnist: 7 epochs (at most 2 steps), batch 16" in text
    # the bank and queries are the dataset's own counts (96 train, 32 val), not Fashion-MNIST's
    assert f"{tiny_gray_dataset.name} weighted kNN top-1 (k=20, T=0.07; bank: 96 train, queries: 32 test images)" \
        in text
    assert "at random init" in text and "after BYOL, 2 steps" in text
    assert (out / "knn.json").is_file()


def test_plan_ranks_gives_each_cpu_core_a_rank_while_batchnorm_keeps_64_images_per_view():
    assert demo.plan_ranks(128, cores=2, cuda=False) == (2, 1)
    assert demo.plan_ranks(128, cores=1, cuda=False) == (1, 0)
    assert demo.plan_ranks(128, cores=16, cuda=False) == (2, 8)  # 128 // 64 ranks at most, the cores as threads
    assert demo.plan_ranks(256, cores=3, cuda=False) == (2, 1)  # 3 ranks would not divide the batch
    assert demo.plan_ranks(512, cores=6, cuda=False) == (4, 1)
    assert demo.plan_ranks(128, cores=64, cuda=True) == (1, 0)  # a GPU trains in one process


def test_demo_trains_data_parallel_in_two_processes(tiny_gray_dataset, tmp_path):
    """The CPU path `make demo` takes on a 2-core machine: two single-thread ranks, a kNN before and after."""
    import os
    import subprocess
    import sys

    out = tmp_path / "demo"
    argv = ["--ranks", "2", f"data.path={tiny_gray_dataset}", f"out_dir={out}", "train.max_steps=3", "model.width=4",
            "method.proj_hidden=32", "method.proj_dim=16", "method.pred_hidden=32", "train.batch_size=16",
            "data.num_workers=0", "train.progress=false", "eval.batch_size=64"]
    repo = str(demo.Path(demo.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "fastssl.demo", *argv], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "batch 16, 2 processes x 1 thread(s)" in proc.stdout
    assert "after BYOL, 3 steps" in proc.stdout
    assert '"weight_digests"' not in proc.stdout  # the ranks' results line is the demo's to summarize, not print
    assert "Traceback" not in proc.stderr, proc.stderr
    cfg = (out / "config.yaml").read_text()
    assert "threads: 1" in cfg
    rows = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"step": 3' in line]
    assert rows, "the run did not reach step 3"


def test_demo_reports_a_bad_rank_count():
    assert demo.main(["--ranks", "0"]) == 2
    assert demo.main(["--ranks"]) == 2


def test_demo_without_the_init_evaluation_reports_the_trained_knn_only(tiny_gray_dataset, tmp_path, capsys):
    argv = ["--ranks", "1", f"data.path={tiny_gray_dataset}", f"out_dir={tmp_path / 'demo'}", "train.max_steps=1",
            "model.width=4", "method.proj_hidden=32", "method.proj_dim=16", "method.pred_hidden=32",
            "train.batch_size=16", "data.num_workers=0", "train.progress=false", "eval.batch_size=64",
            "eval.knn_init=false"]
    assert demo.main(argv) == 0
    text = capsys.readouterr().out
    assert "at random init" not in text and "after BYOL, 1 steps" in text and "points)" not in text


@pytest.mark.parametrize("ranks, signame", [(2, "SIGINT"), (1, "SIGINT"), (1, "SIGTERM")])
def test_demo_stopped_by_a_signal_checkpoints_every_rank_once(tiny_gray_dataset, tmp_path, ranks, signame):
    """SIGINT to the demo (what Ctrl-C sends it: the ranks have their own process group) reaches each rank once:
    they finish the step, save a checkpoint and exit 128 + the signal (a second one would stop them without a
    checkpoint). The one-process path (a GPU, one core, --ranks 1) used to end SIGTERM with a traceback."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "demo"
    argv = ["--ranks", str(ranks), f"data.path={tiny_gray_dataset}", f"out_dir={out}", "train.max_steps=100000",
            "train.epochs=100000", "model.width=4", "method.proj_hidden=32", "method.proj_dim=16",
            "method.pred_hidden=32", "train.batch_size=16", "data.num_workers=0", "eval.batch_size=64",
            "train.log_every=5"]
    repo = str(demo.Path(demo.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "fastssl.demo", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path, start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
        time.sleep(0.2)
    signum = getattr(signal, signame)
    if signame == "SIGINT":
        os.killpg(proc.pid, signum)  # a terminal's Ctrl-C: the whole foreground process group
    else:
        proc.send_signal(signum)  # a scheduler's stop: the demo process
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, text
    assert f"stopped by {signame} after step" in text and "Traceback" not in text, text
    assert "signal again to stop at once" in text and "without a checkpoint)\n" in text
    assert any(p.name.startswith("step-") for p in (out / "checkpoints").iterdir())
