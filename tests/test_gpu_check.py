"""scripts/gpu_check.py on CPU: its plan (dry run, commands the scripts accept) and its step runner (caps,
process groups killed, errors recorded, the next step run, the budget, results rewritten after each step)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


gc = load_script("gpu_check")
PY = sys.executable


# ---- the plan ---------------------------------------------------------------------------------------------
def test_plan_prints_every_command_and_the_budget_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / "results"
    assert gc.main(["--out", str(out), "--plan", "--budget-min", "7"]) == 0
    text = capsys.readouterr().out
    assert "budget 7.0 min (420 s)" in text
    steps = gc.plan(out.resolve())
    for step in steps:
        assert shlex.join(step.cmd) in text, step.name
        assert f"{step.name:<15} cap {step.cap_s:>4.0f} s" in text
    assert "FASTSSL_TEST_DEVICE=cuda" in text  # the equivalence suite runs its loaders on the GPU
    assert not out.exists()


def test_steps_come_in_order_of_value_each_capped_within_a_15_minute_window(tmp_path):
    """DALI's loader, SwAV end to end on each loader, decode=device, compiled against eager, the gpu tests, the
    kernel benches; what they need first. Within the default budget (a 15-minute window less the machine's start
    and the install) the first three fit whole; the budget cuts or skips what comes last."""
    steps = gc.plan(tmp_path)
    assert [s.name for s in steps] == ["machine", "images", "convert", "loader", "train", "train_decode",
                                       "decode_profile", "train_compiled", "step_layout", "gpu_tests", "equivalence",
                                       "kernels", "optim", "photometric"]
    first_three = [s.cap_s for s in steps[: [s.name for s in steps].index("decode_profile") + 1]]
    assert all(0 < s.cap_s <= 240 for s in steps) and gc.DEFAULT_BUDGET_MIN <= 12
    assert sum(first_three) <= gc.DEFAULT_BUDGET_MIN * 60 < sum(s.cap_s for s in steps)


def test_steps_option_selects_and_rejects_unknown_names(tmp_path, capsys):
    assert gc.main(["--out", str(tmp_path), "--plan", "--steps", "loader,kernels"]) == 0
    text = capsys.readouterr().out
    assert "2 steps" in text and "bench_loader.py" in text and "bench_kernels.py" in text
    assert "(needs images)" not in text  # the chosen step reuses an earlier run's images
    with pytest.raises(SystemExit):
        gc.main(["--out", str(tmp_path), "--plan", "--steps", "loader,nope"])
    assert "unknown nope" in capsys.readouterr().err


def _declared_options(source: str) -> set[str]:
    return set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", source))


def test_every_step_command_uses_options_its_script_declares(tmp_path):
    steps = gc.plan(tmp_path)
    checked = 0
    for step in steps:
        scripts = [a for a in step.cmd if a.endswith(".py")]
        if not scripts:
            continue
        declared = _declared_options(Path(scripts[0]).read_text())
        used = {a for a in step.cmd[step.cmd.index(scripts[0]) + 1:] if a.startswith("--")}
        assert used <= declared, (step.name, used - declared)
        checked += 1
    assert checked >= 7
    convert = next(s for s in steps if s.name == "convert")
    help_text = subprocess.run([PY, "-m", "fastssl.convert", "--help"], capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout
    for option in (a for a in convert.cmd if a.startswith("--")):
        assert option in help_text, option


def test_the_loader_step_measures_dalis_swav_recipe_on_the_gpu(tmp_path):
    loader = next(s for s in gc.plan(tmp_path) if s.name == "loader")
    cmd = loader.cmd
    value = lambda flag: cmd[cmd.index(flag) + 1]  # noqa: E731
    assert value("--recipe") == "swav" and value("--device") == "cuda" and value("--backends") == "dali"
    assert value("--batch-size") == "256"


def test_the_training_steps_overrides_are_a_valid_swav_resnet50_config(tmp_path):
    from fastssl.config import load_config

    decode = {"train": "host", "train_decode": "device", "train_compiled": "host"}
    compiled = {"train": False, "train_decode": False, "train_compiled": True}
    for step in (s for s in gc.plan(tmp_path) if s.name.startswith("train")):
        overrides = [a for a in step.cmd if "=" in a and not a.startswith("-")]
        backends = step.cmd[step.cmd.index("--backend") + 1].split(",")
        for backend in backends:
            cfg = load_config("swav_resnet50_imagenet", [*overrides, f"data.backend={backend}"])
            assert cfg.model.backbone == "resnet50" and cfg.train.precision == "bf16" and cfg.train.channels_last
            assert (cfg.data.n_local, cfg.data.global_size, cfg.data.local_size) == (6, 224, 96)
            assert cfg.data.decode == decode[step.name] and cfg.train.compile is compiled[step.name]
    assert next(s for s in gc.plan(tmp_path) if s.name == "train").cmd.count("--backend") == 1
    assert "dali,ffcv,torch" in next(s for s in gc.plan(tmp_path) if s.name == "train").cmd
    assert "--skip-reference" not in next(s for s in gc.plan(tmp_path) if s.name == "train").cmd


# ---- the dry run ------------------------------------------------------------------------------------------
def test_the_dry_run_keeps_every_script_option_and_override_and_swaps_only_gpu_values_and_sizes(tmp_path):
    from fastssl.config import load_config

    for step, dry in zip(gc.plan(tmp_path), gc.dry_steps(tmp_path), strict=True):
        flags = lambda cmd: [a for a in cmd if a.startswith("--")]  # noqa: E731
        keys = lambda cmd: [a.split("=")[0] for a in cmd if "=" in a and not a.startswith("-")]  # noqa: E731
        assert dry.name == step.name and dry.needs == step.needs and dry.cmd[:2] == step.cmd[:2]
        positional = [i for i, a in enumerate(dry.cmd) if "=" in a and not a.startswith("-")]
        if positional:  # argparse takes the key=value overrides last: no option may follow them
            assert not flags(dry.cmd[positional[0]:]), (step.name, dry.cmd)
        assert set(flags(step.cmd)) <= set(flags(dry.cmd)) and set(keys(step.cmd)) <= set(keys(dry.cmd))
        assert "cuda" not in dry.cmd and "FASTSSL_TEST_DEVICE" not in dry.env, step.name
        scripts = [a for a in dry.cmd if a.endswith(".py")]
        if scripts:
            declared = _declared_options(Path(scripts[0]).read_text())
            assert set(flags(dry.cmd[dry.cmd.index(scripts[0]) + 1:])) <= declared, step.name
        if step.name.startswith("train"):
            overrides = [a for a in dry.cmd if "=" in a and not a.startswith("-")]
            cfg = load_config("swav_resnet50_imagenet", overrides)
            assert cfg.model.backbone == "resnet50" and cfg.train.batch_size == 16 and cfg.data.global_size == 32
            assert cfg.train.compile == load_config("swav_resnet50_imagenet", [
                a for a in step.cmd if "=" in a and not a.startswith("-")]).train.compile


@pytest.mark.slow
def test_the_dry_run_runs_the_steps_cpu_part_here(tmp_path, capsys):
    """Bench images, their conversion and the DALI loader bench, on this CPU: the commands the GPU runs."""
    pytest.importorskip("nvidia.dali")
    assert gc.main(["--out", str(tmp_path), "--dry-run", "--steps", "images,convert,loader"]) == 0
    results = json.loads((tmp_path / "dry-run" / gc.RESULTS_JSON).read_text())
    assert [s["status"] for s in results["steps"]] == ["ok", "ok", "ok"]
    loader = results["steps"][2]["figures"]["dali"]
    assert "img/s" in loader and "training thread" in loader


# ---- the runner -------------------------------------------------------------------------------------------
def _py(code: str, *args: str) -> list[str]:
    return [PY, "-c", code, *args]


def _gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def test_runner_kills_a_step_past_its_cap_records_errors_and_runs_the_next(tmp_path):
    out = tmp_path / "out"
    pidfile = tmp_path / "child.pid"
    results_file = out / gc.RESULTS_JSON
    sleeper = ("import subprocess, sys, time\n"
               "child = subprocess.Popen(['sleep', '60'])\n"
               "open(sys.argv[1], 'w').write(str(child.pid))\n"
               "print('started', flush=True); time.sleep(60)")
    checker = ("import json, sys\n"  # runs third: the first two records are already on disk
               "r = json.load(open(sys.argv[1]))\n"
               "assert [s['status'] for s in r['steps']] == ['timeout', 'failed', 'pending', 'pending'], r\n"
               "assert '| slow | timeout |' in open(sys.argv[2]).read()\n")
    steps = [
        gc.Step("slow", "sleeps past its cap", _py(sleeper, str(pidfile)), cap_s=1.5),
        gc.Step("broken", "fails", _py("import sys; print('boom: the error', file=sys.stderr); sys.exit(3)"), 30),
        gc.Step("check", "reads the results so far", _py(checker, str(results_file), str(out / gc.RESULTS_MD)), 30),
        gc.Step("after_broken", "needs the failed step", _py("print(1)"), 30, needs=("broken",)),
    ]
    t0 = time.monotonic()
    results = gc.run_steps(steps, out, budget_s=120)
    assert time.monotonic() - t0 < 20
    slow, broken, check, after = results["steps"]
    assert slow["status"] == "timeout" and 1.4 < slow["seconds"] < 10
    assert "ran past its cap of 2 s" in slow["error"] and "started" in slow["error"]
    assert _gone(int(pidfile.read_text())), "the step's own child survived the kill of its process group"
    assert broken["status"] == "failed" and broken["rc"] == 3 and "boom: the error" in broken["error"]
    assert check["status"] == "ok", check.get("error")
    assert after["status"] == "skipped" and "needs broken" in after["reason"]
    on_disk = json.loads(results_file.read_text())
    assert [s["status"] for s in on_disk["steps"]] == ["timeout", "failed", "ok", "skipped"]
    assert (out / "logs" / "broken.log").read_text().endswith("\nboom: the error\n")  # the command, then its output
    md = (out / gc.RESULTS_MD).read_text()
    assert "| broken | failed |" in md and "boom: the error" in md and "| after_broken | skipped |" in md


def test_runner_cuts_caps_to_the_budget_and_skips_steps_once_it_is_spent(tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "MIN_STEP_S", 1.0)
    steps = [gc.Step("long", "sleeps", _py("import time; time.sleep(30)"), cap_s=60),
             gc.Step("next", "never starts", _py("print(1)"), cap_s=60)]
    t0 = time.monotonic()
    results = gc.run_steps(steps, tmp_path, budget_s=2.0)
    assert time.monotonic() - t0 < 12
    long, nxt = results["steps"]
    assert long["status"] == "timeout" and long["cap_s"] <= 2.0
    assert nxt["status"] == "skipped" and "budget spent" in nxt["reason"]


def test_figures_come_from_each_benchmark_json(tmp_path):
    loader_json = tmp_path / "loader.json"
    loader_json.write_text(json.dumps({"results": [{"backend": "dali", "status": "ok", "img_s": 5123.4},
                                                   {"backend": "ffcv", "status": "error"}]}))
    step = gc.Step("loader", "", ["x"], 1, figures_from=str(loader_json))
    assert gc.collect_figures(step, tmp_path / "none.log") == {"dali": "5123 img/s", "ffcv": "error"}
    train_json = tmp_path / "train.json"
    train_json.write_text(json.dumps({"runs": [{"backend": "dali", "results": [
        {"name": "fastssl", "img_s": 2001.0, "data_wait_pct": 1.25},
        {"name": "reference", "img_s": 400.0, "data_wait_pct": 60.0}]}]}))
    step = gc.Step("train", "", ["x"], 1, figures_from=str(train_json))
    assert gc.collect_figures(step, tmp_path / "none.log") == {
        "dali": "2001 img/s, data-wait 1.2 %", "reference": "400 img/s, data-wait 60.0 %"}
    log = tmp_path / "pytest.log"
    log.write_text("....\n===== 12 passed, 3 skipped, 1 failed in 9.1s =====\n")
    step = gc.Step("gpu_tests", "", [PY, "-m", "pytest"], 1)
    assert gc.collect_figures(step, log) == {"passed": 12, "skipped": 3, "failed": 1}


def test_bench_loader_passes_torch_decode_to_the_torch_backend(tiny_dataset, tmp_path, monkeypatch):
    """The loader step's ``--torch-decode device`` reaches the torch loader (timing left out: only the wiring)."""
    from PIL import Image

    bench = gc_script("bench_loader")
    built = []

    def stream(*args, **kwargs):
        made = real_stream(*args, **kwargs)
        built.append(made[1])
        return made

    real_stream = bench._loader_stream
    monkeypatch.setattr(bench, "_loader_stream", stream)
    monkeypatch.setattr(bench, "convert_once", lambda images, work, want_ffcv: (tiny_dataset, []))
    monkeypatch.setattr(bench, "measure", lambda make, *args: (1.0, make()[1]))
    (tmp_path / "images" / "c0").mkdir(parents=True)
    Image.new("RGB", (64, 48)).save(tmp_path / "images" / "c0" / "0.jpg")
    common = ["--images", str(tmp_path / "images"), "--recipe", "swav", "--backends", "torch", "--device", "cpu",
              "--batches", "1", "--warmup", "0", "--repeats", "1", "--workers", "0"]
    device = bench.main([*common, "--torch-decode", "device"])["results"][0]
    host = bench.main(common)["results"][0]
    assert device["status"] == host["status"] == "ok", (device, host)
    assert [d["decode"] for d in built] == ["device", "host"]
    assert device["details"]["decode"] == "device" and device["details"]["mode"] == "workers"


def gc_script(name: str):
    return load_script(name, f"_{name}")


def test_bench_loader_reports_the_training_threads_cpu_time_apart_from_waits_and_photometric():
    """``measure``: per batch, the CPU time the iterating thread spends in the loader, the photometric stage's
    share apart (only calls on that thread), and a wait for data (a sleep here) in the wall time only."""
    import threading
    import time

    bench = gc_script("bench_loader")

    def spin(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    class Loader:
        def photometric(self, crops, epoch, b):
            spin(0.02)
            return crops

    loader = Loader()

    def stream():
        while True:
            time.sleep(0.05)  # waiting for a batch: not the thread's work
            spin(0.01)  # the loader's own work on the thread
            side = threading.Thread(target=loader.photometric, args=([], 0, 0))  # another thread's call: not counted
            side.start()
            side.join()
            yield loader.photometric([], 0, 0)

    _, details = bench.measure(lambda: (stream(), {}, loader), 1, 1, 3, bench.torch.device("cpu"))
    t = details["thread"]
    assert 8 <= t["thread_ms"] < 18 and 18 <= t["photometric_ms"] < 30 and t["next_wall_ms"] >= 50 + 8 + 18
