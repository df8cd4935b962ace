"""End-to-end training throughput: fastssl's trainer vs a plain PyTorch reference of the same method, one run.

fastssl: the real Trainer (the recipe's loader backend, batched photometric stage, backbone once per
resolution, fused loss kernels through the dispatch, fused LARS, foreach EMA), timed from its own
metrics.jsonl windows (images/s and data-wait % per window of ``--window`` steps).

reference: how SSL code is commonly written: a torchvision + PIL DataLoader (per-crop transforms in
worker processes), the backbone run once per crop, the eager loss twins (FASTSSL_KERNELS=reference),
per-parameter LARS with a Python branch on the norms (``.item()`` semantics) and a per-parameter EMA loop.
Same method object, architecture, recipe, batch size, precision and images.

Both run warm-up steps first; the figure is the median over ``--repeats`` windows. The last printed line
is ``speedup=<fastssl img/s / reference img/s>``.

    python scripts/bench_train.py --method byol --backend torch --json bench_train.json --plot bench_train.png

Comma-separated ``--method`` and ``--backend`` run the matrix: per method, the reference once and fastssl with
each loader; a table row per pair, and the last line is the geometric mean of the pairs' speedups.

    python scripts/bench_train.py --method byol,simclr,swav --backend torch,dali,ffcv data.path=DIR
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import io
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastssl.config import load_config  # noqa: E402
from fastssl.engine.trainer import build_model, build_spec, run  # noqa: E402
from fastssl.optim.ema import ema_update_loop_  # noqa: E402
from fastssl.optim.schedules import scaled_lr  # noqa: E402
from pipelines.formats import iter_samples, shard_paths  # noqa: E402


def _script(name: str):
    """A sibling benchmark script as a module (its reference pieces: the PIL transforms, the .item() LARS)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------- fastssl
def bench_fastssl(cfg_name: str, overrides: list[str], steps: int, window: int) -> dict:
    """Train ``steps`` steps with the real Trainer; per-window rows from its metrics.jsonl."""
    with tempfile.TemporaryDirectory(prefix="fastssl-bench-") as out:
        cfg = load_config(cfg_name, [*overrides, f"out_dir={out}", "resume=none", f"train.max_steps={steps}",
                                     f"train.log_every={window}", "eval.knn=false", "train.progress=false"])
        t0 = time.perf_counter()
        run(cfg)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {"rows": rows, "wall_s": wall, "batch": cfg.train.batch_size}


# -------------------------------------------------------------------------------------------- reference
class _Samples(torch.utils.data.Dataset):
    """The converted dataset's encoded images, decoded with PIL per item, every view's transform applied."""

    def __init__(self, data: Path, transforms: list):
        self.items = [(blob, label) for shard in shard_paths(data, "train") for _, blob, label in iter_samples(shard)]
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        blob, label = self.items[i]
        with Image.open(io.BytesIO(blob)) as img:
            rgb = img.convert("RGB")
        return [t(rgb) for t in self.transforms], label


@contextlib.contextmanager
def _reference_mode():
    """Eager loss twins, and the backbone once per crop instead of once per resolution."""
    from fastssl.methods import base

    # The class __dict__ holds the staticmethod object itself; getattr would unwrap it into a plain function,
    # which restored would then bind as a method.
    saved_env, saved_fbr = os.environ.get("FASTSSL_KERNELS"), base.SSLMethod.__dict__["forward_by_resolution"]
    os.environ["FASTSSL_KERNELS"] = "reference"
    base.SSLMethod.forward_by_resolution = staticmethod(lambda net, views: [net(v) for v in views])
    try:
        yield
    finally:
        base.SSLMethod.forward_by_resolution = saved_fbr
        if saved_env is None:
            os.environ.pop("FASTSSL_KERNELS", None)
        else:
            os.environ["FASTSSL_KERNELS"] = saved_env


def bench_reference(cfg_name: str, overrides: list[str], steps: int, window: int, workers: int) -> dict:
    cfg = load_config(cfg_name, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = build_spec(cfg)
    loader_mod, optim_mod = _script("bench_loader"), _script("bench_optim")
    transforms = [loader_mod.torchvision_view_transform(v, spec.mean, spec.std) for v in spec.views]
    dataset = _Samples(Path(cfg.data.path), transforms)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=workers > 0)
    torch.manual_seed(cfg.train.seed)
    method = build_model(cfg).to(device)
    o = cfg.optim
    lr = scaled_lr(o.base_lr, cfg.train.batch_size)
    optimizer = optim_mod.ItemLoopLARS(method.param_groups(o.weight_decay), lr=lr, momentum=o.momentum,
                                       weight_decay=o.weight_decay, eta=o.eta)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.precision == "fp16")
    # Per-parameter EMA wherever a method module uses the foreach one.
    saved = [(m, m.ema_update_) for name, m in list(sys.modules.items())
             if name.startswith("fastssl.methods.") and hasattr(m, "ema_update_")]
    for m, _ in saved:
        m.ema_update_ = ema_update_loop_
    rows, step = [], 0
    t_prev = time.perf_counter()
    window_time = window_wait = 0.0
    try:
        with _reference_mode():
            method.on_train_start(len(loader), steps)
            while step < steps:
                for views, _ in loader:
                    t_data = time.perf_counter()
                    views = [v.to(device, non_blocking=True) for v in views]
                    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                        loss, _ = method(views)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    method.on_step_end(step, steps)
                    step += 1
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    t_end = time.perf_counter()
                    window_time += t_end - t_prev
                    window_wait += t_data - t_prev
                    t_prev = t_end
                    if step % window == 0:
                        rows.append({"step": step, "img_s": window * cfg.train.batch_size / window_time,
                                     "data_wait_pct": 100 * window_wait / window_time, "loss": float(loss.detach())})
                        window_time = window_wait = 0.0
                    if step >= steps:
                        break
    finally:
        for m, f in saved:
            m.ema_update_ = f
    return {"rows": rows, "batch": cfg.train.batch_size}


# ------------------------------------------------------------------------------------------------- main
def _summary(rows: list[dict], warmup_windows: int) -> dict:
    rows = [r for r in rows if "img_s" in r]  # metrics.jsonl also holds event rows (a skipped step, bad samples)
    timed = rows[warmup_windows:] or rows[-1:]
    return {"img_s": statistics.median(r["img_s"] for r in timed),
            "data_wait_pct": statistics.median(r["data_wait_pct"] for r in timed),
            "windows": [round(r["img_s"], 1) for r in timed]}


def _split(value: str | None) -> list[str | None]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else [None]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="byol", help="a method, or several comma-separated (a matrix)")
    ap.add_argument("--config", default=None, help="recipe (default: <method>_resnet18_fmnist); one method only")
    ap.add_argument("--backend", default=None,
                    help="data.backend for fastssl (default: the recipe's), or several comma-separated")
    ap.add_argument("--window", type=int, default=10, help="steps per timed window")
    ap.add_argument("--repeats", type=int, default=3, help="timed windows (after one warm-up window)")
    ap.add_argument("--workers", type=int, default=None, help="reference DataLoader workers (default: cores)")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for both runs")
    args = ap.parse_args(argv)
    methods, backends = _split(args.method), _split(args.backend)
    if args.config and len(methods) > 1:
        ap.error("--config names one recipe: give one --method with it")
    steps = args.window * (args.repeats + 1)
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    load_before = os.getloadavg()
    runs = []
    for method in methods:
        cfg_name = args.config or f"{method}_resnet18_fmnist"
        reference = None
        if not args.skip_reference:
            # The reference first: its DataLoader workers are gone before fastssl's loaders start.
            print(f"reference loop: {cfg_name} ({steps} steps, {workers} DataLoader workers)", flush=True)
            ref = bench_reference(cfg_name, list(args.overrides), steps, args.window, workers)
            reference = {"name": "reference", **_summary(ref["rows"], 1)}
        for backend in backends:
            overrides = [*args.overrides, *([f"data.backend={backend}"] if backend else [])]
            print(f"fastssl trainer: {cfg_name} {' '.join(overrides)} ({steps} steps)", flush=True)
            ours = bench_fastssl(cfg_name, overrides, steps, args.window)
            results = [{"name": "fastssl", **_summary(ours["rows"], 1)}, *([reference] if reference else [])]
            run_report = {"method": method, "config": cfg_name, "backend": backend or "recipe",
                          "overrides": overrides, "batch": ours["batch"], "results": results}
            if reference:
                run_report["speedup"] = results[0]["img_s"] / reference["img_s"]
            runs.append(run_report)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    print(f"\n{'method':<9}{'loader':<10}{'loop':<11}{'img/s':>9}{'data-wait %':>13}{'speedup':>9}  windows (img/s)")
    for run_report in runs:
        for r in run_report["results"]:
            speedup = f"{run_report['speedup']:.2f}" if "speedup" in run_report and r["name"] == "fastssl" else ""
            print(f"{run_report['method']:<9}{run_report['backend']:<10}{r['name']:<11}{r['img_s']:>9.1f}"
                  f"{r['data_wait_pct']:>13.1f}{speedup:>9}  {r['windows']}")
    report = {"date": datetime.date.today().isoformat(), "device": device, "torch": torch.__version__,
              "window_steps": args.window, "repeats": args.repeats, "load_before": load_before,
              "load_after": os.getloadavg(), "runs": runs,
              "command": " ".join(["python", "scripts/bench_train.py", *(argv if argv is not None else sys.argv[1:])])}
    speedups = [r["speedup"] for r in runs if "speedup" in r]
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.plot:
        bars, matrix = [], len(runs) > 1
        for method in methods:
            mine = [r for r in runs if r["method"] == method]
            for r in mine:
                bars.append({"backend": f"{method} {r['backend']}" if matrix else "fastssl",
                             "img_s": r["results"][0]["img_s"], "status": "ok", "ratio_vs_pil": None})
            if len(mine[0]["results"]) > 1:  # the method's one reference run
                bars.append({"backend": f"{method} reference" if matrix else "reference",
                             "img_s": mine[0]["results"][1]["img_s"], "status": "ok", "ratio_vs_pil": None})
        title = runs[0]["config"] if len(runs) == 1 else f"{len(methods)} methods x {len(backends)} loaders"
        _script("bench_loader").plot(bars, args.plot, f"{title} end-to-end on {device}")
    print(f"load average before {load_before}, after {report['load_after']}")
    if len(speedups) > 1:
        geo = math.exp(statistics.fmean(math.log(x) for x in speedups))
        print(f"{len(speedups)} method x loader pairs: speedup min {min(speedups):.2f}, max {max(speedups):.2f}, "
              "geometric mean below")
        report["speedup"] = geo
        print(f"speedup={geo:.2f}")
    elif speedups:
        report["speedup"] = speedups[0]
        print(f"speedup={speedups[0]:.2f}")
    return report


if __name__ == "__main__":
    main()
