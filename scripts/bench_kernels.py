"""Benchmark the loss kernels at SSL sizes: eager twin vs torch.compile(twin) vs the fused Triton kernel.

    python scripts/bench_kernels.py [--json OUT] [--device auto|cuda|cpu] [--reps 20] [--no-compile] [--threads T]

Each differentiable op is timed forward + backward (Sinkhorn, a no-grad target, forward only). Time is
the median over ``--reps`` calls after warm-up (CUDA events on a GPU, perf_counter on CPU); peak memory
is what the call allocates above what was live before it (CUDA allocator statistics on a GPU, the
profiler's allocation trace on CPU). On CPU the sizes are reduced and the Triton column is skipped:
the fused kernels need CUDA (their CPU path is Triton's interpreter, a correctness tool).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastssl import kernels  # noqa: E402
from fastssl.kernels import reference  # noqa: E402
from pipelines.native import cpu_model  # noqa: E402


@dataclass
class Case:
    op: str
    size: str
    make: Callable[[torch.device, torch.dtype], tuple]  # -> (inputs needing grad, other args)
    twin: Callable
    fused: Callable
    backward: bool = True
    bytes: int = 0  # > 0: the bytes one call must move at least (reported as GB/s and % of peak bandwidth)


def _randn(*shape, device, dtype, grad=True):
    return torch.randn(*shape, device=device).to(dtype).requires_grad_(grad)


def _cases(gpu: bool) -> list[Case]:
    # GPU: the sizes of issue 4's performance bars (MoCo v2: N=4096, K=65,536, D=256; SwAV: B=4096, K=3000).
    # CPU: reduced so the whole run stays in minutes on a laptop-class machine.
    n_byol, n_v3, (n_v2, k_v2, d_v2), n_simclr, (b_swav, k_swav) = (
        (4096, 4096, (4096, 65536, 256), 4096, (4096, 3000)) if gpu
        else (1024, 512, (128, 16384, 128), 512, (256, 3000)))
    big = 262144  # normalized_mse at a size where HBM, not launch latency, bounds it: 128 MiB per input in bf16
    bandwidth = [
        # BYOL's case: p (predictor output) needs a gradient, z (target projection) does not. Forward reads p, z;
        # backward reads p, z and writes dp: 5 x N x D elements.
        Case("normalized_mse (bandwidth)", f"N={big} D=256, dz not needed",
             lambda dev, dt: ((_randn(big, 256, device=dev, dtype=dt),), (_randn(big, 256, device=dev, dtype=dt,
                                                                                 grad=False),)),
             lambda p, z: reference.normalized_mse(p, z).mean(), lambda p, z: kernels.normalized_mse(p, z).mean(),
             bytes=5 * big * 256 * 2),
    ] if gpu else []
    return bandwidth + [
        Case("normalized_mse", f"N={n_byol} D=256",
             lambda dev, dt: ((_randn(n_byol, 256, device=dev, dtype=dt), _randn(n_byol, 256, device=dev, dtype=dt)),
                              ()),
             lambda p, z: reference.normalized_mse(p, z).mean(), lambda p, z: kernels.normalized_mse(p, z).mean()),
        Case("info_nce (MoCo v3)", f"N={n_v3} D=256",
             lambda dev, dt: ((_randn(n_v3, 256, device=dev, dtype=dt), _randn(n_v3, 256, device=dev, dtype=dt)), ()),
             lambda q, k: reference.info_nce(q, k, 0.2), lambda q, k: kernels.info_nce(q, k, 0.2)),
        Case("info_nce (MoCo v2 queue)", f"N={n_v2} K={k_v2} D={d_v2}",
             lambda dev, dt: ((_randn(n_v2, d_v2, device=dev, dtype=dt), _randn(n_v2, d_v2, device=dev, dtype=dt)),
                              (F.normalize(torch.randn(k_v2, d_v2, device=dev), dim=1).to(dt),)),
             lambda q, k, queue: reference.info_nce(q, k, 0.2, queue=queue),
             lambda q, k, queue: kernels.info_nce(q, k, 0.2, queue=queue)),
        Case("nt_xent (SimCLR)", f"N={n_simclr} (2N rows) D=128",
             lambda dev, dt: ((_randn(n_simclr, 128, device=dev, dtype=dt),
                               _randn(n_simclr, 128, device=dev, dtype=dt)), ()),
             lambda a, b: reference.nt_xent(a, b, 0.1), lambda a, b: kernels.nt_xent(a, b, 0.1)),
        Case("sinkhorn (SwAV)", f"B={b_swav} K={k_swav} 3 iters",
             lambda dev, dt: ((), (F.normalize(torch.randn(b_swav, k_swav, device=dev), dim=1).to(dt),)),
             lambda s: reference.sinkhorn(s), lambda s: kernels.sinkhorn(s), backward=False),
    ]


def _call(fn, grads, args, backward):
    for t in grads:
        t.grad = None
    out = fn(*grads, *args)
    if backward:
        out.backward()
    return out


def _time(fn, grads, args, backward, device, reps) -> float:
    for _ in range(3):
        _call(fn, grads, args, backward)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _call(fn, grads, args, backward)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            _call(fn, grads, args, backward)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_mib(fn, grads, args, backward, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _call(fn, grads, args, backward)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _call(fn, grads, args, backward)
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2**20


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--reps", type=int, default=None, help="timed calls per case (default 20 on GPU, 5 on CPU)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile(twin) column")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    reps = args.reps or (20 if gpu else 5)
    notes = []
    if not gpu:
        notes.append("no CUDA: Triton kernels need a GPU (their CPU path is the interpreter, for tests only); "
                     "sizes reduced; fp32; peak memory from the CPU profiler's allocation trace")
    results = []
    for case in _cases(gpu):
        torch.manual_seed(0)
        grads, extra = case.make(device, dtype)
        impls = {"eager": case.twin}
        if not args.no_compile:
            impls["compile"] = torch.compile(case.twin, dynamic=False)
        if gpu:
            impls["triton"] = case.fused
        for impl, fn in impls.items():
            os.environ["FASTSSL_KERNELS"] = "triton" if impl == "triton" else "reference"
            t0 = time.perf_counter()
            _call(fn, grads, extra, case.backward)  # first call: compilation, not timed
            first_s = time.perf_counter() - t0
            row = dict(op=case.op, size=case.size, impl=impl, dtype=str(dtype).replace("torch.", ""),
                       median_ms=round(_time(fn, grads, extra, case.backward, device, reps), 4),
                       peak_mib=round(_peak_mib(fn, grads, extra, case.backward, device), 2),
                       first_call_s=round(first_s, 2), backward=case.backward)
            eager_ms = next((r["median_ms"] for r in results if r["op"] == case.op and r["impl"] == "eager"), None)
            row["x_vs_eager"] = round(eager_ms / row["median_ms"], 2) if eager_ms else None
            if case.bytes:
                row["gb_s"] = round(case.bytes / (row["median_ms"] / 1e3) / 1e9, 1)
                peak = _peak_bandwidth_gbs(device)
                row["pct_peak_bandwidth"] = round(100 * row["gb_s"] / peak, 1) if peak else None
            results.append(row)
            extra_txt = f"  {row['gb_s']:.0f} GB/s ({row['pct_peak_bandwidth']}% of peak)" if case.bytes else ""
            print(f"{row['op']:<26} {row['size']:<26} {impl:<8} {row['median_ms']:>10.3f} ms "
                  f"{row['peak_mib']:>10.2f} MiB  x{row['x_vs_eager']}{extra_txt}", flush=True)
        os.environ.pop("FASTSSL_KERNELS", None)
    name = torch.cuda.get_device_name() if gpu else cpu_model()
    command = " ".join(["python", "scripts/bench_kernels.py", *(argv if argv is not None else sys.argv[1:])])
    report = dict(date=datetime.date.today().isoformat(), device=name, cpu_count=os.cpu_count(),
                  threads=torch.get_num_threads(),
                  torch=torch.__version__, triton=_triton_version(), reps=reps, notes=notes, results=results,
                  command=command)
    print()
    print(_table(results))
    for note in notes:
        print(f"note: {note}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def _peak_bandwidth_gbs(device: torch.device) -> float | None:
    """Theoretical DRAM bandwidth of a CUDA device (2 transfers per clock x bus width), or None."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None


def _table(results: list[dict]) -> str:
    lines = ["| op | size | impl | median ms | x vs eager | peak MiB | GB/s (% peak) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in results:
        bw = f"{r['gb_s']:.0f} ({r['pct_peak_bandwidth']}%)" if r.get("gb_s") else ""
        lines.append(f"| {r['op']} | {r['size']} | {r['impl']} | {r['median_ms']:.3f} | {r['x_vs_eager'] or ''} | "
                     f"{r['peak_mib']:.1f} | {bw} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
