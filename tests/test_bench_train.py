"""scripts/bench_train.py end to end on tiny data: one method, and a method x loader matrix."""

from __future__ import annotations

import json
import math
from pathlib import Path

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def _bench_train():
    return load_script("bench_train", "_bench_train_under_test")


def _tiny(data: Path) -> list[str]:
    return [f"data.path={data}", "data.num_workers=0", "model.width=4", "method.proj_hidden=32",
            "method.proj_dim=16", "train.batch_size=16", "train.threads=1"]


def test_matrix_runs_the_reference_once_per_method_and_reports_every_pair(tiny_gray_dataset, tmp_path, capsys):
    out_json, out_png = tmp_path / "m.json", tmp_path / "m.png"
    report = _bench_train().main(["--method", "byol,simclr", "--backend", "torch,dali", "--window", "1",
                                  "--repeats", "1", "--workers", "0", "--json", str(out_json), "--plot",
                                  str(out_png), *_tiny(tiny_gray_dataset)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert sum(line.startswith("reference loop:") for line in lines) == 2  # once per method, not per loader
    assert sum(line.startswith("fastssl trainer:") for line in lines) == 4
    saved = json.loads(out_json.read_text())
    assert [(r["method"], r["backend"]) for r in saved["runs"]] == [
        ("byol", "torch"), ("byol", "dali"), ("simclr", "torch"), ("simclr", "dali")]
    for run in saved["runs"]:
        ours, ref = run["results"]
        assert ours["name"] == "fastssl" and ref["name"] == "reference"
        assert ours["img_s"] > 0 and ref["img_s"] > 0 and 0 <= ours["data_wait_pct"] <= 100
        assert f"data.backend={run['backend']}" in run["overrides"]
        assert math.isclose(run["speedup"], ours["img_s"] / ref["img_s"])
    # the same reference figure for both loaders of a method
    assert saved["runs"][0]["results"][1] == saved["runs"][1]["results"][1]
    speedups = [r["speedup"] for r in saved["runs"]]
    geo = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
    assert lines[-1] == f"speedup={geo:.2f}" and math.isclose(report["speedup"], geo)
    assert out_png.stat().st_size > 1000


def test_single_pair_prints_its_own_speedup_last(tiny_gray_dataset, tmp_path, capsys):
    report = _bench_train().main(["--method", "byol", "--window", "1", "--repeats", "1", "--workers", "0",
                                  *_tiny(tiny_gray_dataset)])
    lines = capsys.readouterr().out.strip().splitlines()
    (run,) = report["runs"]
    assert run["backend"] == "recipe" and lines[-1] == f"speedup={run['speedup']:.2f}"
    assert math.isclose(run["speedup"], run["results"][0]["img_s"] / run["results"][1]["img_s"])


def test_bench_step_times_both_layouts_and_the_per_view_loop(tmp_path, capsys):
    out_json = tmp_path / "step.json"
    report = load_script("bench_step", "_bench_step_under_test").main([
        "--method", "byol", "--batch", "8", "--threads", "1", "--warmup", "1", "--repeats", "2", "--per-view-loop",
        "--json", str(out_json), "model.width=4", "method.proj_hidden=32", "method.proj_dim=16",
        "method.pred_hidden=32"])
    rows = report["rows"]
    assert [(r["layout"], r["mode"]) for r in rows][:2] == [("channels_last", "eager"), ("nchw", "eager")]
    assert rows[2]["mode"] == "eager, a forward per view" and all(r["ms"] > 0 for r in rows)
    assert report["best"] in {f"{r['layout']}/{r['mode']}" for r in rows[:2]}
    assert json.loads(out_json.read_text())["best"] == report["best"]
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"best={report['best']}"


def test_bench_step_times_the_compiled_cells(tmp_path, monkeypatch):
    """``--compile yes`` adds the compiled cells (gpu_check's step_layout runs them on CUDA); the compiled module used
    to be picked with ``compile_model(...) or method``, whose truth value raised TypeError (no len())."""
    monkeypatch.setenv("FASTSSL_COMPILE_BACKEND", "aot_eager")  # dynamo without inductor's code generation: fast
    report = load_script("bench_step", "_bench_step_compiled").main([
        "--method", "byol", "--batch", "8", "--threads", "1", "--warmup", "1", "--repeats", "1", "--compile", "yes",
        "model.width=4", "method.proj_hidden=32", "method.proj_dim=16", "method.pred_hidden=32"])
    modes = [(r["layout"], r["mode"]) for r in report["rows"]]
    assert ("channels_last", "compiled") in modes and ("nchw", "compiled") in modes
    assert all(r["ms"] > 0 for r in report["rows"])


def test_summary_skips_the_event_rows_of_metrics():
    """A skipped step writes an event row (no img/s) into metrics.jsonl: the window figures leave it out (it made
    the summary raise KeyError: 'img_s', found by gpu_check's dry run)."""
    rows = [{"step": 1, "img_s": 10.0, "data_wait_pct": 5.0},
            {"step": 1, "event": "nonfinite_grad", "bad_steps_in_row": 1},
            {"step": 2, "img_s": 20.0, "data_wait_pct": 1.0}, {"step": 3, "img_s": 30.0, "data_wait_pct": 3.0}]
    assert _bench_train()._summary(rows, 1) == {"img_s": 25.0, "data_wait_pct": 2.0, "windows": [20.0, 30.0]}
