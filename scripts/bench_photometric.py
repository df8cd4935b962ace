"""Benchmark the shared photometric stage alone: the torch path vs the fused kernel (Triton on a GPU, C++ on CPU).

Input: uint8 crops already on the device (what every backend hands the stage), one batch per view of the
recipe (byol: 2 x 224; swav: 2 x 224 + 6 x 96). Output: normalized float32 channels-last views. Reports
images/s (an image = all its views), median of repeats after warm-up, CUDA events on a GPU, and the
ratio fused / torch from the same run. On CPU, with the 1-minute load average before and after each path
(the machine may be shared); torch's intra-op thread count is the CPU's unless OMP_NUM_THREADS says otherwise.
``--order both`` also times each path with one jitter order for the whole batch (the stage's behaviour before
each image drew its own, kept here only as the baseline of what the per-image order costs).

    python scripts/bench_photometric.py --recipe swav --batch 256 --json out.json
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.photometric import apply_photometric, sample_photometric_params  # noqa: E402
from pipelines.spec import MultiCropSpec  # noqa: E402


def _time_ms(fn, device: torch.device, reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="swav", choices=["byol", "swav", "simclr", "dino"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--order", default="image", choices=["image", "both"],
                    help="image: each image's own jitter order (the stage's); both: also one order per batch")
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = torch.device("cuda" if gpu else "cpu")
    spec = MultiCropSpec.preset(args.recipe)
    g = torch.Generator().manual_seed(0)
    crops = [torch.randint(0, 256, (args.batch, 3, v.size, v.size), dtype=torch.uint8, generator=g).to(device)
             for v in spec.views]

    def run(mode: str, order: str):
        def fn():
            os.environ["FASTSSL_PHOTOMETRIC"] = mode
            gen = torch.Generator().manual_seed(1)
            for x, view in zip(crops, spec.views, strict=True):
                params = sample_photometric_params(view, args.batch, gen)
                if order == "batch":
                    params["order"] = params["order"][:1].expand(args.batch, 4)
                apply_photometric(x, view, spec.mean, spec.std, params=params)
        return fn

    modes = ["torch", "triton"] if gpu else ["torch", "cpp"]
    orders = ["image", "batch"] if args.order == "both" else ["image"]
    results = []
    for mode in modes:
        for order in orders:
            load_before = os.getloadavg()[0]
            ts = _time_ms(run(mode, order), device, args.reps, args.warmup)
            med = statistics.median(ts)
            results.append({"path": mode, "order": order, "median_ms": med, "img_s": args.batch / (med / 1e3),
                            "times_ms": ts, "load_1min": (load_before, os.getloadavg()[0])})
    os.environ.pop("FASTSSL_PHOTOMETRIC", None)
    base = results[0]["img_s"]
    views = " + ".join(f"{n} x {s}" for s, n in _count_sizes(spec))
    print(f"photometric stage, recipe {args.recipe} ({views}), batch {args.batch}, device "
          f"{torch.cuda.get_device_name() if gpu else 'cpu'}")
    for r in results:
        r["x_vs_torch"] = r["img_s"] / base
        same_path = [q for q in results if q["path"] == r["path"]]
        r["x_vs_image_order"] = r["img_s"] / same_path[0]["img_s"]
        load = "" if gpu else "  load {:.1f} -> {:.1f}".format(*r["load_1min"])
        vs_order = f"  x{r['x_vs_image_order']:.2f} vs its per-image order" if r["order"] == "batch" else ""
        print(f"  {r['path']:<7} {r['order'] + ' order':<12} {r['median_ms']:9.2f} ms/batch {r['img_s']:10.0f} img/s"
              f"  x{r['x_vs_torch']:.2f}{vs_order}{load}")
    report = {"date": datetime.date.today().isoformat(), "recipe": args.recipe, "batch": args.batch,
              "device": torch.cuda.get_device_name() if gpu else "cpu", "torch": torch.__version__,
              "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(), "results": results,
              "command": " ".join(["python", "scripts/bench_photometric.py", *(argv or sys.argv[1:])])}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


def _count_sizes(spec: MultiCropSpec) -> list[tuple[int, int]]:
    sizes: dict[int, int] = {}
    for v in spec.views:
        sizes[v.size] = sizes.get(v.size, 0) + 1
    return list(sizes.items())


if __name__ == "__main__":
    main()
