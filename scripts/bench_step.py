"""The model's own compute per training step: memory format x eager/compiled, per method, on this device.

Each cell: a method built from its recipe (``<method>_resnet18_fmnist`` unless ``--config``), synthetic views of the
recipe's sizes and per-rank batch, the recipe's precision; forward + backward + an SGD step, ``--warmup`` steps, then
the median of ``--repeats`` timed steps. Cells run one after another in this process, so compare ratios within one
run. Rows: channels-last and NCHW, eager and (``--compile``) ``torch.compile``; the first compile's seconds are
printed too. ``--per-view-loop`` adds the per-view methods' old form (one forward per view) beside the batched
forward with per-view BatchNorm.

    python scripts/bench_step.py --method byol,simclr,swav,mocov3 --threads 1 --batch 64 --compile yes --json s.json
    python scripts/bench_step.py --config byol_resnet50_imagenet --batch 128 --compile yes --device cuda

The last line is ``best=<layout>/<mode>`` for the first method (what ``train.channels_last=auto`` and the
``train.compile`` default should pick on this device).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastssl.config import build_spec, load_config  # noqa: E402
from fastssl.engine import compiled  # noqa: E402
from fastssl.engine.layout import cpu_model  # noqa: E402
from fastssl.engine.trainer import _AMP_DTYPES, build_model  # noqa: E402
from fastssl.methods.base import SSLMethod  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_cell(cfg, device: torch.device, batch: int, channels_last: bool, compile_step: bool, warmup: int,
               repeats: int, compile_mode: str = "default") -> dict:
    """Median seconds of one forward + backward + SGD step, and the first call's seconds."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    method = build_model(cfg).to(device).to(memory_format=fmt)
    method.on_train_start(100, 1000)
    method.on_epoch_start(0)
    opt = torch.optim.SGD(method.parameters(), lr=1e-3, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    views = [torch.randn(batch, 3, v.size, v.size, generator=gen).to(device).contiguous(memory_format=fmt)
             for v in build_spec(cfg).views]
    model = method
    if compile_step:
        compiled.prepare(device)
        # not ``... or method``: a compiled module's truth value calls len(), which an nn.Module without one
        # raises on (TypeError)
        fast = compiled.compile_model(method, compile_mode, device)
        model = method if fast is None else fast
    amp = _AMP_DTYPES[cfg.train.precision]
    times = []
    for _ in range(warmup + repeats):
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss, _ = model(views)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        method.on_step_end(0, 1000)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"ms": 1000 * statistics.median(times[warmup:]), "first_s": times[0],
            "windows_ms": [round(1000 * t, 1) for t in times[warmup:]]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="byol", help="methods, comma-separated")
    ap.add_argument("--config", default=None, help="recipe (default <method>_resnet18_fmnist); one method only")
    ap.add_argument("--batch", type=int, default=None, help="per-rank batch per view (default: the recipe's)")
    ap.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", choices=("no", "yes"), default="no",
                    help="yes: also the compiled step (a minute or more per cell on a CPU)")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode of the compiled cells")
    ap.add_argument("--per-view-loop", action="store_true",
                    help="also one forward per view (the per-view methods' plain form) in the faster layout")
    ap.add_argument("--json", type=Path)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    rows = []
    for method in methods:
        cfg = load_config(args.config or f"{method}_resnet18_fmnist", list(args.overrides))
        batch = args.batch or cfg.train.batch_size
        cells = [(cl, comp) for comp in ([False, True] if args.compile == "yes" else [False]) for cl in (True, False)]
        for cl, comp in cells:
            r = bench_cell(cfg, device, batch, cl, comp, args.warmup, args.repeats, args.compile_mode)
            rows.append({"method": method, "layout": "channels_last" if cl else "nchw",
                         "mode": "compiled" if comp else "eager", **r})
            print(f"{method:<8} {rows[-1]['layout']:<14} {rows[-1]['mode']:<9} {r['ms']:9.1f} ms/step  "
                  f"(first call {r['first_s']:.1f} s) {r['windows_ms']}", flush=True)
        if args.per_view_loop:
            mine = [r for r in rows if r["method"] == method and r["mode"] == "eager"]
            best = min(mine, key=lambda r: r["ms"])
            saved = SSLMethod.forward_per_view
            SSLMethod.forward_per_view = lambda self, net, views: [net(v) for v in views]
            try:
                r = bench_cell(cfg, device, batch, best["layout"] == "channels_last", False, args.warmup, args.repeats)
            finally:
                SSLMethod.forward_per_view = saved
            rows.append({"method": method, "layout": best["layout"], "mode": "eager, a forward per view", **r})
            print(f"{method:<8} {best['layout']:<14} one forward per view: {r['ms']:9.1f} ms/step "
                  f"(batched forward with per-view BN: {best['ms']:.1f} ms, x{r['ms'] / best['ms']:.2f})", flush=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_model()} ({os.cpu_count()} cores)"
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"), "device": where,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "load": os.getloadavg(), "rows": rows,
              "command": " ".join(["python", "scripts/bench_step.py", *(argv if argv is not None else sys.argv[1:])])}
    print(f"device {where}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), load {os.getloadavg()}")
    first = [r for r in rows if r["method"] == methods[0] and r["mode"] in ("eager", "compiled")]
    base = next(r for r in first if r["layout"] == "channels_last" and r["mode"] == "eager")
    for r in first:
        print(f"{methods[0]} {r['layout']}/{r['mode']}: x{base['ms'] / r['ms']:.2f} vs channels_last/eager")
    best = min(first, key=lambda r: r["ms"])
    report["best"] = f"{best['layout']}/{best['mode']}"
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(f"best={report['best']}")
    return report


if __name__ == "__main__":
    main()
