"""Benchmark one LARS step and one EMA update over ResNet-50's parameters (161 tensors, 25.6M values).

    python scripts/bench_optim.py --json bench_optim.json [--repeats 7] [--device cpu|cuda] [--profile]

LARS paths: ``item_loop`` (a per-parameter loop that branches in Python on ``norm != 0``, i.e. one
``.item()`` sync per parameter: the common implementation), ``loop`` (our reference twin, no sync),
``foreach``, ``fused_cpu`` (csrc/lars_cpu.cpp) on CPU, ``cuda`` (csrc/lars_cuda.cu) on CUDA. EMA: loop vs
foreach. Each path: warm-up steps, then the median of ``--repeats`` timed steps, taken round-robin over the
paths so all see the same background load. Bytes moved are counted per path from the tensor streams it
reads and writes (fp32), so achieved GB/s = bytes / median time.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastssl.methods.base import SSLMethod  # noqa: E402
from fastssl.models import build_backbone  # noqa: E402
from fastssl.optim.ema import ema_update_, ema_update_loop_  # noqa: E402
from fastssl.optim.lars import LARS  # noqa: E402
from pipelines import native  # noqa: E402
from pipelines.native import cpu_model  # noqa: E402

LR, MOMENTUM, WD, ETA = 0.1, 0.9, 1.5e-6, 0.001

# fp32 streams per element (reads + writes) of one step, for (adapted, excluded) tensors.
#   loop-style: ||w||, ||g|| (2) + d = g + wd*w (3) + d *= trust (2) + buf *= m (2) + buf += d (3) + w -= lr*buf (3)
#   excluded:   buf *= m (2) + buf += g (3) + w -= lr*buf (3)
#   fused:      read w, g (norms), read w, g, buf, write buf, w (7); the CPU kernel blocks for the cache so the
#               second reads of w, g hit it: 5 from main memory, counted here; excluded: 5
STREAMS = {
    "item_loop": (15, 8), "loop": (15, 8), "foreach": (15, 8), "fused_cpu": (5, 5), "cuda": (7, 5),
    "ema_loop": 5, "ema_foreach": 3,  # t *= tau (2) + t += (1-tau) o (3)  vs  lerp (3)
}


class ItemLoopLARS(torch.optim.Optimizer):
    """The common per-parameter LARS: a Python branch on the norms, so each parameter syncs to the host."""

    def __init__(self, params, lr, momentum, weight_decay, eta):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      lars_exclude=False))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if not group["lars_exclude"]:
                    g = g.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.norm(p), torch.norm(p.grad)
                    if w_norm != 0 and g_norm != 0:  # bool(tensor): a device-to-host sync per parameter
                        g = g.mul(group["eta"] * w_norm / (g_norm + group["weight_decay"] * w_norm))
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_round_robin(fns: dict, device: torch.device, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Times of each function, taken in turns (one step of each per round) so that all of them see the same
    background load on a shared machine."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_time_once(fn, device))
    return times


def kernel_and_host_s(fn, device: torch.device, steps: int = 10) -> tuple[float | None, float]:
    """Per call: the GPU time of the kernels it launches (profiler, summed; None on CPU) and the host time
    of the call itself (launches queued, no sync): a step costs max of the two once the GPU runs behind."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    host = (time.perf_counter() - t0) / steps
    _sync(device)
    if device.type != "cuda":
        return None, host
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        _sync(device)
    total_us = 0.0
    for evt in prof.key_averages():
        total_us += getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0.0)
    return total_us / 1e6 / steps, host


def peak_bandwidth_gbs(device: torch.device) -> float | None:
    """Theoretical DRAM bandwidth of a CUDA device (2 transfers per clock x bus width), or None."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def machine() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--paths", default="", help="comma-separated subset of LARS paths (default: all for the device)")
    ap.add_argument("--profile", action="store_true", help="print the top ops of one step of loop and fused")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    # torchvision's resnet50 parameter set: our backbone plus the 1000-way classifier (161 tensors, 25.6M).
    model = torch.nn.Sequential(build_backbone("resnet50"), torch.nn.Linear(2048, 1000)).to(device)
    groups = SSLMethod.param_groups(model, WD)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    n_adapted = sum(p.numel() for g in groups if not g["lars_exclude"] for p in g["params"])
    n_excluded = sum(p.numel() for g in groups if g["lars_exclude"] for p in g["params"])
    n_buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    print(f"ResNet-50: {len(params)} tensors, {n_adapted + n_excluded:,} parameters "
          f"({n_adapted:,} adapted, {n_excluded:,} excluded); device {device}; load {os.getloadavg()}")

    build_s = {}
    paths = ["item_loop", "loop", "foreach"] + (["cuda"] if device.type == "cuda" else ["fused_cpu"])
    if args.paths:
        paths = [p for p in args.paths.split(",") if p in paths]
    for impl in ("fused_cpu", "cuda"):
        if impl in paths:
            t0 = time.perf_counter()
            try:
                native.load_lars_cpu() if impl == "fused_cpu" else native.load_lars_cuda()
            except Exception as exc:  # noqa: BLE001 - report and skip the path
                print(f"{impl}: build failed, skipped ({exc})")
                paths.remove(impl)
                continue
            build_s[impl] = time.perf_counter() - t0

    def make(impl: str):
        if impl == "item_loop":
            return ItemLoopLARS(groups, LR, MOMENTUM, WD, ETA)
        return LARS(groups, lr=LR, momentum=MOMENTUM, weight_decay=WD, eta=ETA, impl=impl)

    results: dict = {"machine": machine(), "device": str(device), "tensors": len(params),
                     "params_adapted": n_adapted, "params_excluded": n_excluded, "build_or_load_s": build_s,
                     "load_before": os.getloadavg(), "lars": {}, "ema": {}}
    peak = peak_bandwidth_gbs(device)
    results["peak_bandwidth_gbs"] = peak
    optimizers = {impl: make(impl) for impl in paths}
    times = time_round_robin({impl: opt.step for impl, opt in optimizers.items()}, device, args.warmup, args.repeats)
    for impl, ts in times.items():
        sa, se = STREAMS[impl]
        kernel_s, host_s = kernel_and_host_s(optimizers[impl].step, device)
        results["lars"][impl] = {"median_s": statistics.median(ts), "min_s": min(ts), "times_s": ts,
                                 "kernel_s": kernel_s, "host_s": host_s,
                                 "bytes": 4 * (sa * n_adapted + se * n_excluded)}
    del optimizers

    target = copy.deepcopy(model)
    ema = {"ema_loop": lambda: ema_update_loop_(target, model, 0.996),
           "ema_foreach": lambda: ema_update_(target, model, 0.996)}
    times = time_round_robin(ema, device, args.warmup, args.repeats)
    for name, ts in times.items():
        kernel_s, host_s = kernel_and_host_s(ema[name], device)
        results["ema"][name] = {"median_s": statistics.median(ts), "min_s": min(ts), "times_s": ts,
                                "kernel_s": kernel_s, "host_s": host_s,
                                "bytes": 4 * (STREAMS[name] * (n_adapted + n_excluded) + 2 * n_buffers)}
    results["load_after"] = os.getloadavg()

    gpu = device.type == "cuda"
    for section, base in (("lars", "item_loop"), ("ema", "ema_loop")):
        ref = results[section].get(base)
        head = f"\n{section.upper():<12}{'median ms':>11}{'min ms':>9}{'host ms':>9}{'MB moved':>10}{'GB/s':>9}"
        head += f"{'x vs ' + base:>16}"
        if gpu:
            head += f"{'kernel ms':>11}{'kernel GB/s':>13}"
        if peak:
            head += f"{'% peak (step)':>15}{'% peak (kernel)':>17}"
        print(head)
        for name, r in results[section].items():
            r["gb_per_s"] = r["bytes"] / r["median_s"] / 1e9
            r["speedup_vs_" + base] = ref["median_s"] / r["median_s"] if ref else None
            line = (f"{name:<12}{1e3 * r['median_s']:>11.2f}{1e3 * r['min_s']:>9.2f}{1e3 * r['host_s']:>9.2f}"
                    f"{r['bytes'] / 1e6:>10.0f}{r['gb_per_s']:>9.1f}{r['speedup_vs_' + base] or float('nan'):>16.2f}")
            if gpu:
                r["kernel_gb_per_s"] = r["bytes"] / r["kernel_s"] / 1e9 if r["kernel_s"] else None
                line += f"{1e3 * (r['kernel_s'] or float('nan')):>11.3f}{r['kernel_gb_per_s'] or float('nan'):>13.1f}"
            if peak:
                r["pct_peak_bandwidth"] = 100 * r["gb_per_s"] / peak
                r["pct_peak_bandwidth_kernel"] = 100 * (r["kernel_gb_per_s"] or 0.0) / peak
                line += f"{r['pct_peak_bandwidth']:>15.1f}{r['pct_peak_bandwidth_kernel']:>17.1f}"
            print(line)
    print(f"\nload average before {results['load_before']}, after {results['load_after']}; build/load {build_s}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        for impl in [p for p in ("loop", "foreach", "fused_cpu", "cuda") if p in paths]:
            opt = make(impl)
            opt.step()
            with profile(activities=activities) as prof:
                opt.step()
            print(f"\nprofile of one {impl} step")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))

    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
