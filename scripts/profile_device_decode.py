"""Where the time of decode='device' goes, per batch: decode_jpeg on the device in 1 or K threads, the crop
stage, and the whole loader alone (no training). Prints ms per batch (median of repeats, synchronized)."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import build_loader  # noqa: E402
from pipelines.formats import iter_samples, shard_paths  # noqa: E402
from pipelines.spec import MultiCropSpec  # noqa: E402


def timed(fn, device, repeats=5):
    fn()
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=".benchdata/imgs")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--batches", type=int, default=12)
    args = ap.parse_args()
    from torchvision.io import ImageReadMode, decode_jpeg

    dev = torch.device(args.device)
    jpegs = [torch.frombuffer(bytearray(j), dtype=torch.uint8)
             for p in shard_paths(Path(args.data), "train") for _, j, _ in iter_samples(p)][: args.batch]
    print(f"{len(jpegs)} JPEGs, {sum(len(j) for j in jpegs) / len(jpegs) / 1e3:.0f} kB each, device {dev}")
    one = timed(lambda: decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=dev), dev)
    print(f"decode_jpeg, one call of {len(jpegs)}: {one:.1f} ms ({len(jpegs) / one * 1e3:.0f} img/s)")
    for k in (2, 4, 8):
        chunks = [jpegs[i::k] for i in range(k)]

        def decode(c):
            return decode_jpeg(c, mode=ImageReadMode.RGB, device=dev)

        with ThreadPoolExecutor(k) as pool:
            ms = timed(lambda pool=pool, chunks=chunks: list(pool.map(decode, chunks)), dev)
        print(f"decode_jpeg, {k} threads: {ms:.1f} ms ({len(jpegs) / ms * 1e3:.0f} img/s)")
    spec = MultiCropSpec.preset("swav", global_size=224, local_size=96, n_local=6)
    loader = build_loader(args.data, spec, args.batch, device=dev, num_workers=args.workers, decode="device")
    it = iter(loader)
    next(it)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    n = 0
    for _ in range(min(args.batches, len(loader) - 1)):
        next(it)
        n += 1
    if dev.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t) * 1e3 / n
    print(f"loader alone (decode='device', {args.workers} workers, prefetch thread): {ms:.1f} ms/batch "
          f"({args.batch / ms * 1e3:.0f} img/s)")


if __name__ == "__main__":
    main()
