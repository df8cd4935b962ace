"""Where the time of decode='device' goes, per batch: decode_jpeg on the device (each installed decoder:
TorchCodec, torchvision) in 1 or K threads, and the whole loader alone (no training) with each. Prints ms per
batch (median of repeats, synchronized)."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import build_loader, resolve_device  # noqa: E402
from pipelines.formats import iter_samples, shard_paths  # noqa: E402
from pipelines.spec import MultiCropSpec  # noqa: E402
from pipelines.torch_loader import JPEG_DECODERS, DeviceJpegDecoder  # noqa: E402


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
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 3) - 2))
    ap.add_argument("--batches", type=int, default=12)
    args = ap.parse_args()
    dev = resolve_device(args.device)
    jpegs = [torch.frombuffer(bytearray(j), dtype=torch.uint8)
             for p in shard_paths(Path(args.data), "train") for _, j, _ in iter_samples(p)][: args.batch]
    print(f"{len(jpegs)} JPEGs, {sum(len(j) for j in jpegs) / len(jpegs) / 1e3:.0f} kB each, device {dev}")
    decoders = []
    for name in JPEG_DECODERS:
        try:
            decoder = DeviceJpegDecoder(dev, prefer=name)
        except RuntimeError as e:
            print(f"{name}: unavailable ({e})")
            continue
        decoders.append(name)
        one = timed(lambda decoder=decoder: decoder(jpegs), dev)
        print(f"{name} decode_jpeg, one call of {len(jpegs)}: {one:.1f} ms ({len(jpegs) / one * 1e3:.0f} img/s)")
        for k in (2, 4):
            chunks = [jpegs[i::k] for i in range(k)]
            with ThreadPoolExecutor(k) as pool:
                ms = timed(lambda pool=pool, chunks=chunks, decoder=decoder: list(pool.map(decoder, chunks)), dev)
            print(f"{name} decode_jpeg, {k} threads: {ms:.1f} ms ({len(jpegs) / ms * 1e3:.0f} img/s)")
    for name in decoders:
        os.environ["FASTSSL_JPEG_DECODER"] = name
        loader_alone(args, dev, name)


def loader_alone(args, dev: torch.device, name: str) -> None:
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
    print(f"loader alone ({name}, {args.workers} workers, prefetch thread): {ms:.1f} ms/batch "
          f"({args.batch / ms * 1e3:.0f} img/s)")


if __name__ == "__main__":
    main()
