"""fastssl-preview: a PNG grid of every view of N images, as the loader yields them.

    fastssl-preview DATASET OUT.png [--spec byol] [--backend torch|dali|ffcv|auto] [--n 8]
                                    [--global-size 224] [--local-size 96] [--split train] [--seed 0]

Rows are images, columns are the spec's views in order (global views first), denormalized back to
pixels; a local view is centred on a black cell of the global size so its scale shows. The PNG is
written atomically (a temp file beside OUT, then a rename).
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from pipelines import PRESETS, Batch, MultiCropSpec, build_loader
from pipelines.formats import atomic_write_bytes

GAP = 4  # pixels between cells


def grid_image(batch: Batch, spec: MultiCropSpec, n: int, gap: int = GAP) -> np.ndarray:
    """The first ``n`` images of ``batch`` as an (H, W, 3) uint8 grid: rows = images, columns = views.

    Cells are the largest view's size; smaller views are centred in them. H = n * cell + (n - 1) * gap,
    W = V * cell + (V - 1) * gap.
    """
    cell = max(v.size for v in spec.views)
    n_views = len(spec.views)
    grid = np.full((n * cell + (n - 1) * gap, n_views * cell + (n_views - 1) * gap, 3), 255, dtype=np.uint8)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    for c, view in enumerate(batch.views):
        pixels = (view[:n].float().cpu() * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
        pixels = pixels.permute(0, 2, 3, 1).numpy()  # (n, S, S, 3)
        s = pixels.shape[1]
        pad = (cell - s) // 2
        for r in range(n):
            y, x = r * (cell + gap), c * (cell + gap)
            grid[y : y + cell, x : x + cell] = 0
            grid[y + pad : y + pad + s, x + pad : x + pad + s] = pixels[r]
    return grid


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastssl-preview",
        description="Write a PNG grid of every view of N images as a loader backend yields them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("dataset", help="a dataset folder written by fastssl-convert")
    p.add_argument("out", help="the PNG to write")
    p.add_argument("--spec", default="byol", choices=sorted(PRESETS), help="augmentation preset")
    p.add_argument("--backend", default="torch", choices=["torch", "dali", "ffcv", "auto"])
    p.add_argument("--n", type=int, default=8, help="images (rows)")
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--n-local", type=int, default=None, help="local views of multi-crop presets")
    p.add_argument("--split", default="train")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1:
        print("fastssl-preview: --n must be >= 1", file=sys.stderr)
        return 2
    try:
        spec = MultiCropSpec.preset(args.spec, global_size=args.global_size, local_size=args.local_size,
                                    n_local=args.n_local)
        # augment=True: show the training views even for the val split.
        # cache="none": a few images are shown, the RAM cache would decode the whole split first
        loader = build_loader(args.dataset, spec, args.n, split=args.split, seed=args.seed, backend=args.backend,
                              augment=True, num_workers=0 if args.backend == "torch" else None,
                              drop_last=False, cache="none")
        batch = next(iter(loader))
    except (ValueError, ImportError, OSError) as e:
        print(f"fastssl-preview: {e}", file=sys.stderr)
        return 1
    n = min(args.n, batch.labels.numel())
    buf = io.BytesIO()
    Image.fromarray(grid_image(batch, loader.spec, n)).save(buf, format="PNG")
    atomic_write_bytes(args.out, buf.getvalue())
    print(f"wrote {args.out}: {n} images x {len(loader.spec.views)} views ({args.spec}, {args.backend})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
