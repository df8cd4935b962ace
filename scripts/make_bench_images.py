"""Write a realistic JPEG benchmark set as an ImageFolder tree: DIR/<class>/<name>.jpg.

    python scripts/make_bench_images.py --out DIR --n N [--classes C] [--quality 90] [--seed S]
                                        [--noise 2.0] [--no-progress]

Every image is cut from one of the colour photos bundled with scikit-image (astronaut, chelsea, coffee,
rocket, the Hubble deep field, immunohistochemistry, retina, the two motorcycle stereo frames): a random
crop of 35-100 % of the photo's area, rescaled to an ImageNet-like size (long side 450-520 px, aspect
about 4:3 with +-12 %, landscape three times in four, portrait otherwise), flipped with probability 1/2,
plus mild Gaussian noise (``--noise`` grey levels) so the files carry sensor-like texture: upscaled
crops of small photos are otherwise smoother than real photos and would decode faster than ImageNet.
Images are encoded at ``--quality`` with 4:2:0 chroma subsampling (ImageNet's typical settings).

The set is a pure function of (n, classes, quality, seed, noise): image i is drawn from its own
generator seeded by (seed, i), so a larger --n only appends. Each file is written to a temp name and
renamed, so an interrupted run leaves no truncated JPEG; rerunning completes (and rewrites) the set.
Image i goes to class i % classes.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.formats import atomic_write_bytes  # noqa: E402

LONG_SIDE = (450, 520)  # ImageNet's train images are mostly 500 px on the long side
ASPECT = 4 / 3
ASPECT_JITTER = 0.12  # +- relative
PORTRAIT_P = 0.25
AREA = (0.35, 1.0)  # fraction of the source photo a cut covers


def source_photos() -> dict[str, np.ndarray]:
    """The colour photos shipped inside scikit-image (no download): name -> (H, W, 3) uint8."""
    try:
        from skimage import data
    except ImportError:
        raise SystemExit("make_bench_images: needs scikit-image: pip install 'fastssl[dev]'") from None
    photos = {name: getattr(data, name)() for name in
              ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")}
    left, right, _ = data.stereo_motorcycle()
    photos["motorcycle_left"], photos["motorcycle_right"] = left, right
    return {k: np.ascontiguousarray(v[..., :3]) for k, v in photos.items()}


def target_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height) of one benchmark image."""
    long_side = int(rng.integers(LONG_SIDE[0], LONG_SIDE[1] + 1))
    aspect = ASPECT * (1.0 + ASPECT_JITTER * (2.0 * rng.random() - 1.0))
    short_side = int(round(long_side / aspect))
    return (short_side, long_side) if rng.random() < PORTRAIT_P else (long_side, short_side)


def make_image(photos: list[np.ndarray], rng: np.random.Generator, noise: float) -> Image.Image:
    """One RGB image: a random cut of a random photo at a random ImageNet-like size."""
    photo = photos[int(rng.integers(len(photos)))]
    ph, pw = photo.shape[:2]
    w, h = target_size(rng)
    # Crop with the target's aspect ratio covering AREA of the photo (clipped to fit), placed uniformly.
    area = ph * pw * rng.uniform(*AREA)
    cw = min(pw, int(round(np.sqrt(area * w / h))))
    ch = min(ph, int(round(cw * h / w)))
    cw = min(cw, int(round(ch * w / h)))
    top, left = int(rng.integers(ph - ch + 1)), int(rng.integers(pw - cw + 1))
    img = Image.fromarray(photo).resize((w, h), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if noise > 0:
        pix = np.asarray(img, dtype=np.float32) + rng.normal(0.0, noise, size=(h, w, 3)).astype(np.float32)
        img = Image.fromarray(np.clip(np.rint(pix), 0, 255).astype(np.uint8))
    return img


def encode(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, subsampling="4:2:0", optimize=False)
    return buf.getvalue()


def write_set(out: Path, n: int, classes: int = 10, quality: int = 90, seed: int = 0, noise: float = 2.0,
              progress: bool = True) -> dict:
    """Write the set; returns a summary dict (count, bytes, mean size, mean bytes per pixel)."""
    if n < 1 or classes < 1:
        raise ValueError(f"--n and --classes must be >= 1, got n={n}, classes={classes}")
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality must be in 1..100, got {quality}")
    photos = list(source_photos().values())
    dirs = [out / f"class_{c:03d}" for c in range(classes)]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    bar = None
    if progress:
        from pipelines.progress import progress_bar

        bar = progress_bar(total=n, unit="img", desc="make_bench_images")
    total_bytes = total_pixels = 0
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        img = make_image(photos, rng, noise)
        jpeg = encode(img, quality)
        atomic_write_bytes(dirs[i % classes] / f"img_{i:07d}.jpg", jpeg)
        total_bytes += len(jpeg)
        total_pixels += img.width * img.height
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return {"images": n, "classes": classes, "bytes": total_bytes, "mean_kib": total_bytes / n / 1024,
            "mean_pixels": total_pixels / n, "bytes_per_pixel": total_bytes / total_pixels}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="ImageFolder root to write (created if missing)")
    ap.add_argument("--n", type=int, required=True, help="number of images")
    ap.add_argument("--classes", type=int, default=10, help="class folders; image i goes to class i %% C")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, default=2.0, help="std of the added Gaussian noise, grey levels")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        s = write_set(args.out, args.n, args.classes, args.quality, args.seed, args.noise, not args.no_progress)
    except ValueError as e:
        print(f"make_bench_images: error: {e}", file=sys.stderr)
        return 2
    print(f"make_bench_images: wrote {s['images']} JPEGs in {s['classes']} classes to {args.out} "
          f"({s['bytes'] / 2**20:.1f} MiB, mean {s['mean_kib']:.1f} KiB, {s['mean_pixels'] / 1e3:.0f} kpx, "
          f"{s['bytes_per_pixel']:.2f} B/px) in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
