"""Benchmark the loader backends on an ImageFolder of JPEGs with a full SSL recipe, against a PIL baseline.

    python scripts/bench_loader.py --images DIR --recipe {byol,swav} [--backends torch,dali,ffcv,pil,decode]
        [--batches 8] [--batch-size 64] [--warmup 4] [--repeats 3] [--json OUT] [--plot OUT.png]
        [--device auto|cpu|cuda] [--workers N] [--threads T] [--work DIR] [--profile] [--torch-decode host|device]

DIR is converted once with fastssl-convert (not timed; JPEGs kept byte for byte; ``--formats wds,ffcv``
when ffcv is requested and the converter knows that option) into ``--work`` (default: a folder under the
system temp dir keyed by DIR's listing, reused by later runs). Then, for each backend, images/s of the
whole recipe: every view cropped, the photometric stage applied, the batch on the training device
(CUDA synchronized before the clock is read).

Backends: ``torch``, ``dali``, ``ffcv`` (pipelines.build_loader, their default workers); ``pil``, the
baseline SwAV, DINO and solo-learn use today: torchvision ImageFolder + a torchvision/PIL transform per
crop (RandomResizedCrop, RandomHorizontalFlip, ColorJitter applied with p, RandomGrayscale, Gaussian blur
(PIL ImageFilter, as DINO and solo-learn do), solarization, ToTensor, Normalize) in a DataLoader with one
worker process per core; ``decode``, the ceiling: the same files decoded by PIL in one worker per core,
nothing else. A backend that is not installed is reported as skipped with its install hint.

Timing: rounds (``--repeats``); in each round every backend in turn is built fresh, runs ``--warmup``
batches (worker start-up, prefetch), then ``--batches`` timed batches, and is shut down before the next
one starts, so backends never run at the same time and all see the same background load. A backend's
figure is the median of its rounds. The load average is recorded before and after each measurement.
With many workers, make the timed batches span several batches per worker (a worker builds a whole batch):
otherwise the round measures the pipeline filling up.

Each of our backends also reports the training thread's share: the CPU time (``time.thread_time``, so a
wait for data does not count) the thread iterating the loader spends inside it per batch, with the photometric
stage apart (on a GPU that stage is kernel launches; on a CPU it is the same work whatever the backend). It is
what a loader takes from the thread that also has to launch the model's kernels; measure it with DALI in CPU
mode (``--device cpu``) to see DALI's Python-side feed on a machine without a GPU.

``--profile`` adds where the time goes, on one thread: per image, the JPEG decode, the crop boxes, the
crop + resize of every view, and each photometric op at the recipe's firing rates (measured by running
the shared stage with only that op's decisions left on), plus the best backend's throughput with the
photometric stage off (decode + crop + normalize only) in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import hashlib
import inspect
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipelines  # noqa: E402
from pipelines import MultiCropSpec, ViewSpec, build_loader  # noqa: E402
from pipelines.native import cpu_model  # noqa: E402
from pipelines.photometric import JITTER_OPS, apply_photometric, sample_photometric_params  # noqa: E402

OURS = ("torch", "dali", "ffcv")
EXTRA = ("pil", "decode")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".JPG", ".JPEG")


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- conversion (not timed) ---------------------------------------------------------------------------
def _listing_key(images: Path, formats: tuple[str, ...]) -> str:
    h = hashlib.sha256(str(images.resolve()).encode())
    for root, dirs, files in sorted(os.walk(images)):
        dirs.sort()
        for f in sorted(files):
            st = os.stat(os.path.join(root, f))
            h.update(f"{os.path.relpath(os.path.join(root, f), images)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update(",".join(formats).encode())
    return h.hexdigest()[:16]


def _max_side(images: Path) -> int:
    """The longest image side in DIR (headers only)."""
    from PIL import Image

    longest = 1
    for f in _list_images(images):
        with Image.open(f) as img:
            longest = max(longest, *img.size)
    return longest


def convert_once(images: Path, work: Path | None, want_ffcv: bool) -> tuple[Path, list[str]]:
    """Convert DIR into the shard format (and .beton when ffcv is wanted and supported); reuse a previous
    conversion of the same listing. Returns the dataset folder and notes."""
    from fastssl import convert as conv

    notes = []
    kwargs = {}
    formats: tuple[str, ...] = ("wds",)
    if want_ffcv:
        accepts = inspect.signature(conv.convert).parameters
        if "formats" in accepts:
            formats = ("wds", "ffcv")
            kwargs["formats"] = formats
            if "ffcv_max_side" in accepts:
                # FFCV's copy at the originals' size, as the other backends read them. Not larger: FFCV
                # reserves space per sample by its maximum resolution (16384 made a 6 GB file of 512 images).
                kwargs["ffcv_max_side"] = _max_side(images)
        else:
            notes.append("fastssl-convert has no --formats option yet: converted to webdataset shards only")
    key = _listing_key(images, formats)
    dst = (work or Path(tempfile.gettempdir()) / "fastssl-bench-loader") / key
    if (dst / "manifest.json").is_file():
        notes.append(f"reused the conversion in {dst}")
        return dst, notes
    dst.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # max_side above any real image: every JPEG is stored byte for byte, so all backends read the same bytes.
    conv.convert(images, dst, max_side=1 << 16, workers=pipelines.usable_cpus(), overwrite=True, progress=True,
                 **kwargs)
    notes.append(f"converted {images} -> {dst} in {time.perf_counter() - t0:.1f} s (formats {','.join(formats)})")
    return dst, notes


# ---- the baselines ------------------------------------------------------------------------------------
class _PilBlur:
    """Gaussian blur with sigma uniform in a range, through PIL's ImageFilter (DINO's / solo-learn's way)."""

    def __init__(self, sigma: tuple[float, float]):
        self.sigma = sigma

    def __call__(self, img):
        from PIL import ImageFilter

        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def torchvision_view_transform(view: ViewSpec, mean, std):
    """One crop's transform as the reference SSL codebases write it with torchvision on PIL images."""
    from torchvision import transforms as T

    steps = [
        T.RandomResizedCrop(view.size, scale=view.scale, ratio=view.ratio,
                            interpolation=T.InterpolationMode.BILINEAR),
        T.RandomHorizontalFlip(view.flip_p),
    ]
    if view.jitter_p > 0:
        steps.append(T.RandomApply([T.ColorJitter(view.brightness, view.contrast, view.saturation, view.hue)],
                                   p=view.jitter_p))
    if view.gray_p > 0:
        steps.append(T.RandomGrayscale(view.gray_p))
    if view.blur_p > 0:
        steps.append(T.RandomApply([_PilBlur(view.blur_sigma)], p=view.blur_p))
    if view.solarize_p > 0:
        steps.append(T.RandomSolarize(128, p=view.solarize_p))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps)


class _MultiCrop:
    def __init__(self, spec: MultiCropSpec):
        self.transforms = [torchvision_view_transform(v, spec.mean, spec.std) for v in spec.views]

    def __call__(self, img):
        return [t(img) for t in self.transforms]


class _DecodeOnly:
    """Dataset over the files: decode each to RGB, return only its size (no pixels cross processes)."""

    def __init__(self, files: list[str]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.files[i]) as img:
            rgb = img.convert("RGB")
        return torch.tensor(rgb.size)


def _list_images(images: Path) -> list[str]:
    return sorted(str(p) for p in images.rglob("*") if p.suffix in IMAGE_EXTENSIONS)


def _baseline_stream(name: str, images: Path, spec: MultiCropSpec, batch_size: int, device: torch.device,
                     workers: int, seed: int):
    """Endless batches of the ``pil`` or ``decode`` baseline; returns (generator, details)."""
    from torch.utils.data import DataLoader

    if name == "pil":
        from torchvision.datasets import ImageFolder

        dataset = ImageFolder(str(images), transform=_MultiCrop(spec))
    else:
        dataset = _DecodeOnly(_list_images(images))
    g = torch.Generator().manual_seed(seed)
    dl = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                    pin_memory=device.type == "cuda", persistent_workers=workers > 0, generator=g)

    def stream():
        while True:
            for batch in dl:
                if name == "pil":
                    views, labels = batch
                    yield [v.to(device, non_blocking=True) for v in views], labels.to(device, non_blocking=True)
                else:
                    yield batch

    return stream(), {"num_workers": workers}, dl


def _loader_stream(name: str, data: Path, spec: MultiCropSpec, batch_size: int, device: torch.device,
                   workers: int | None, seed: int, torch_decode: str = "host"):
    options = {"decode": torch_decode} if name == "torch" else {}
    loader = build_loader(data, spec, batch_size, backend=name, device=device, seed=seed, num_workers=workers,
                          **options)

    def stream():
        epoch = 0
        while True:
            loader.set_epoch(epoch)
            yield from loader
            epoch += 1

    details = {k: getattr(loader, k) for k in ("mode", "decode", "num_workers", "num_threads") if hasattr(loader, k)}
    return stream(), details, loader


def availability(name: str) -> str | None:
    """None when the backend can run here, else why not and how to install it."""
    if name in EXTRA:
        return None
    if name not in pipelines._BACKENDS:
        return f"backend {name!r} is not registered in pipelines._BACKENDS in this checkout"
    try:
        pipelines._resolve_backend(name, torch.device("cpu"))
    except (ImportError, ValueError) as e:
        return str(e)
    return None


# ---- timing ---------------------------------------------------------------------------------------------
class _PhotometricClock:
    """Wraps a loader's ``photometric`` (instance attribute over the method) to add up the CPU time it takes on
    the thread that iterates the loader: the part of that thread's time that on a GPU is kernel launches.
    Calls from other threads (the torch backend's device-decode prefetch thread) are not counted."""

    def __init__(self, loader):
        self.seconds, self.thread = 0.0, threading.get_ident()
        inner = loader.photometric

        def timed(*args, **kwargs):
            if threading.get_ident() != self.thread:
                return inner(*args, **kwargs)
            t0 = time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - t0

        loader.photometric = timed


def measure(make, batch_size: int, warmup: int, batches: int, device: torch.device) -> tuple[float, dict]:
    """Build a stream with ``make()``, drop ``warmup`` batches, time ``batches``; images/s and details.

    Also the training thread's share: per timed batch, the CPU time (``time.thread_time``: blocking waits for
    data do not count) the iterating thread spent inside the loader, and within it the photometric stage's
    (ours only). Details gain ``thread``: ``thread_ms`` (the loader's own work on that thread, photometric stage
    excluded: the feed, the hand-off, the copies), ``photometric_ms`` and ``next_wall_ms`` (the wall time of one
    ``next``, waits included), medians over the timed batches.
    """
    stream, details, owner = make()
    clock = _PhotometricClock(owner) if hasattr(owner, "photometric") else None
    thread_s, photo_s, wall_s = [], [], []
    try:
        for _ in range(warmup):
            next(stream)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(batches):
            c0, p0, w0 = time.thread_time(), clock.seconds if clock else 0.0, time.perf_counter()
            batch = next(stream)
            c1, w1 = time.thread_time(), time.perf_counter()
            # Freed after the clocks are read: releasing the consumer's batch (~480 MB of float32 views of a
            # 256-image SwAV batch: munmap on a CPU, a pool operation on a GPU) is not the loader's work.
            del batch
            photo = (clock.seconds - p0) if clock else 0.0
            thread_s.append(c1 - c0 - photo)
            photo_s.append(photo)
            wall_s.append(w1 - w0)
        _sync(device)
        dt = time.perf_counter() - t0
    finally:
        stream.close()
        del stream, owner
        gc.collect()
    details = {**details, "thread": {
        "thread_ms": round(statistics.median(thread_s) * 1e3, 2),
        "photometric_ms": round(statistics.median(photo_s) * 1e3, 2) if clock else None,
        "next_wall_ms": round(statistics.median(wall_s) * 1e3, 2)}}
    return batches * batch_size / dt, details


# ---- profile ---------------------------------------------------------------------------------------------
def _median_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _only(params: dict, keep: str) -> dict:
    """``params`` with every decision off except ``keep`` (a jitter op keeps the jitter coin and its factor)."""
    out = dict(params)
    n = len(params["jitter"])
    off = torch.zeros(n, dtype=torch.bool)
    for k in ("gray", "blur", "solarize"):
        if k != keep:
            out[k] = off
    if keep in JITTER_OPS:
        for k in JITTER_OPS:
            if k != keep:
                out[k] = torch.full((n,), 0.0 if k == "hue" else 1.0)
    else:
        out["jitter"] = off
    return out


def _photometric_op_times(x: torch.Tensor, view: ViewSpec, spec: MultiCropSpec, params: dict,
                          device: torch.device, reps: int) -> dict[str, float]:
    """Seconds for the batch ``x``: each op's extra time over the stage with every op off, the uint8 ->
    float conversion, the normalization (the rest of the all-off stage), and the stage with all decisions."""

    def run(p):
        apply_photometric(x, view, spec.mean, spec.std, params=p)
        _sync(device)

    def to_float():
        x.to(torch.float32, memory_format=torch.contiguous_format).mul_(1.0 / 255.0)
        _sync(device)

    base = _median_time(lambda: run(_only(params, "none")), reps)
    out = {"to_float": _median_time(to_float, reps)}
    out["normalize"] = max(base - out["to_float"], 0.0)
    for op in ("brightness", "contrast", "saturation", "hue", "gray", "blur", "solarize"):
        out[op] = max(_median_time(lambda op=op: run(_only(params, op)), reps) - base, 0.0)
    out["all"] = _median_time(lambda: run(params), reps)
    return out


def profile_stages(data: Path, spec: MultiCropSpec, batch_size: int, device: torch.device, reps: int = 5) -> dict:
    """Per-image milliseconds of each stage on one thread (see the module docstring)."""
    from PIL import Image

    from pipelines.formats import iter_samples, shard_paths
    from pipelines.torch_loader import _decode, sample_rrc

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        jpegs = []
        for shard in shard_paths(data, "train"):
            for _, jpeg, _ in iter_samples(shard):
                jpegs.append(jpeg)
                if len(jpegs) == batch_size:
                    break
            if len(jpegs) == batch_size:
                break
        n = len(jpegs)
        out: dict[str, float] = {}
        out["decode"] = _median_time(lambda: [_decode(j) for j in jpegs], reps) / n
        imgs = [_decode(j) for j in jpegs]
        rng = random.Random(0)
        out["crop_boxes"] = _median_time(
            lambda: [sample_rrc(im.height, im.width, v.scale, v.ratio, rng) for im in imgs for v in spec.views], reps
        ) / n
        boxes = [[sample_rrc(im.height, im.width, v.scale, v.ratio, rng) for v in spec.views] for im in imgs]

        def crops_of(view_index: int) -> list[np.ndarray]:
            v = spec.views[view_index]
            res = []
            for im, bx in zip(imgs, boxes, strict=True):
                top, left, ch, cw = bx[view_index]
                box = (left, top, left + cw, top + ch)
                res.append(np.asarray(im.resize((v.size, v.size), Image.BILINEAR, box=box)))
            return res

        for size, idx in spec.groups:
            t = _median_time(lambda idx=idx: [crops_of(i) for i in idx], reps)
            out[f"crop_resize.{size}px x{len(idx)}"] = t / n
        # Photometric: one representative batch per distinct view (identical views share the cost).
        ops = ("to_float", "brightness", "contrast", "saturation", "hue", "gray", "blur", "solarize", "normalize")
        per_op = dict.fromkeys(ops, 0.0)
        full = 0.0
        kinds: dict[ViewSpec, int] = {}
        for v in spec.views:
            kinds[v] = kinds.get(v, 0) + 1
        for view, count in kinds.items():
            x = torch.from_numpy(np.stack(crops_of(spec.views.index(view)))).permute(0, 3, 1, 2).to(device)
            params = sample_photometric_params(view, n, torch.Generator().manual_seed(1))
            times = _photometric_op_times(x, view, spec, params, device, reps)
            for k in ops:
                per_op[k] += count * times[k] / n
            full += count * times["all"] / n
        out.update({f"photometric.{k}": v for k, v in per_op.items()})
        out["photometric.total_measured"] = full
    finally:
        torch.set_num_threads(threads)
    return {k: round(v * 1e3, 4) for k, v in out.items()}  # ms per image


def geometric_only(spec: MultiCropSpec) -> MultiCropSpec:
    """The spec with every photometric op off (crop, flip and normalization kept)."""
    views = tuple(replace(v, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0) for v in spec.views)
    return MultiCropSpec(views, spec.mean, spec.std, name=f"{spec.name}-geometric")


# ---- report ----------------------------------------------------------------------------------------------
def _machine(device: torch.device) -> dict:
    info = {"cpu": cpu_model(), "cores": pipelines.usable_cpus(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    for mod, key in (("nvidia.dali", "dali"), ("ffcv", "ffcv"), ("torchvision", "torchvision"), ("PIL", "pillow")):
        with contextlib.suppress(Exception):
            info[key] = __import__(mod, fromlist=["__version__"]).__version__
    return info


def table(results: list[dict]) -> str:
    """Markdown: img/s, rounds, ratio, and the training thread's CPU ms per batch inside the loader (photometric
    stage apart; see ``measure``)."""
    lines = ["| backend | img/s (median) | runs | x vs pil | training thread ms/batch (+ photometric) | note |",
             "|---|---:|---|---:|---:|---|"]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['backend']} | - | - | - | - | {r['status']}: {r.get('reason', '')} |")
            continue
        ratio = f"{r['ratio_vs_pil']:.2f}" if r.get("ratio_vs_pil") is not None else "-"
        runs = ", ".join(f"{x:.0f}" for x in r["img_s_runs"])
        thread = f"{r['thread_ms']:.2f}" if r.get("thread_ms") is not None else "-"
        if r.get("photometric_ms") is not None:
            thread += f" (+ {r['photometric_ms']:.1f})"
        lines.append(f"| {r['backend']} | {r['img_s']:.1f} | {runs} | {ratio} | {thread} | {r.get('note', '')} |")
    return "\n".join(lines)


def _ours(name: str) -> bool:
    """A bar of ours ("ffcv", "byol ffcv", "fastssl") rather than a baseline ("pil", "byol reference")."""
    return name.split()[-1] in (*OURS, "fastssl")


def plot(results: list[dict], path: Path, title: str) -> None:
    ok = [r for r in results if r["status"] == "ok"]
    names = [r["backend"] for r in ok]
    values = [r["img_s"] for r in ok]
    labels = [f"{r['img_s']:.0f} img/s" + (f"  ({r['ratio_vs_pil']:.1f}x pil)" if r.get("ratio_vs_pil") else "")
              for r in ok]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_pil(names, values, labels, path, title)
        return
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(ok) + 1.5))
    bars = ax.barh(names[::-1], values[::-1], color=["#4C72B0" if _ours(n) else "#999999" for n in names[::-1]])
    for bar, label in zip(bars, labels[::-1], strict=True):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + label, va="center", fontsize=9)
    ax.set_xlabel("images / s (higher is better)")
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, max(values, default=1) * 1.45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_pil(names, values, labels, path: Path, title: str) -> None:
    from PIL import Image, ImageDraw

    w, row = 800, 34
    img = Image.new("RGB", (w, 50 + row * len(names)), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), title, fill="black")
    top = max(values, default=1)
    for i, (n, v, label) in enumerate(zip(names, values, labels, strict=True)):
        y = 40 + i * row
        d.text((10, y + 8), n, fill="black")
        length = int((w - 330) * v / top)
        d.rectangle([90, y, 90 + length, y + row - 8], fill=(76, 114, 176) if _ours(n) else (150, 150, 150))
        d.text((95 + length, y + 8), label, fill="black")
    img.save(path)


# ---- main ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--images", type=Path, required=True, help="ImageFolder of JPEGs (make_bench_images.py)")
    ap.add_argument("--recipe", default="swav", choices=sorted(pipelines.PRESETS))
    ap.add_argument("--backends", default="torch,dali,ffcv,pil,decode",
                    help=f"comma-separated, from {','.join(OURS + EXTRA)}")
    ap.add_argument("--batches", type=int, default=8, help="timed batches per round")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=4, help="untimed batches per round (worker start, prefetch)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; each backend's figure is their median")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--workers", type=int, default=None,
                    help="decode workers of our backends (default: each backend's own); pil/decode use one per core")
    ap.add_argument("--work", type=Path, default=None, help="folder for the converted dataset (default: temp dir)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads of the main process (photometric stage on CPU); default torch's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--torch-decode", default="host", choices=["host", "device"],
                    help="the torch backend's data.decode: host (PIL in workers) or device (nvJPEG on CUDA)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--plot", type=Path, help="write a PNG bar chart here")
    ap.add_argument("--profile", action="store_true", help="add the per-stage breakdown (see the docstring)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pipelines.resolve_device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                                      else args.device)
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in names if b not in OURS + EXTRA]
    if unknown:
        ap.error(f"unknown backend(s) {unknown}; choose from {list(OURS + EXTRA)}")
    spec = MultiCropSpec.preset(args.recipe)
    load_start = os.getloadavg()

    results: dict[str, dict] = {}
    runnable = []
    for name in names:
        why = availability(name)
        if why is None:
            runnable.append(name)
            results[name] = {"backend": name, "status": "ok", "img_s_runs": [], "load_runs": []}
        else:
            results[name] = {"backend": name, "status": "skipped", "reason": why}
            print(f"skip {name}: {why}", flush=True)

    data, notes = convert_once(args.images, args.work, want_ffcv="ffcv" in runnable)
    for note in notes:
        print(f"note: {note}", flush=True)
    cores = pipelines.usable_cpus()

    def maker(name, s=spec):
        if name in EXTRA:
            return lambda: _baseline_stream(name, args.images, s, args.batch_size, device, cores, args.seed)
        return lambda: _loader_stream(name, data, s, args.batch_size, device, args.workers, args.seed,
                                      args.torch_decode)

    for rnd in range(args.repeats):
        for name in list(runnable):
            r = results[name]
            before = _load()
            try:
                img_s, details = measure(maker(name), args.batch_size, args.warmup, args.batches, device)
            except Exception as e:  # one broken backend must not hide the others' figures
                r.update(status="error", reason=f"{type(e).__name__}: {e}")
                runnable.remove(name)
                print(f"error {name}: {r['reason']}", flush=True)
                continue
            thread = details.pop("thread", None)
            r["img_s_runs"].append(round(img_s, 1))
            r["load_runs"].append([before, _load()])
            r["details"] = details
            line = f"round {rnd + 1}/{args.repeats} {name:<7} {img_s:8.1f} img/s  (load {before:.2f})"
            if thread is not None:
                r.setdefault("thread_runs", []).append(thread)
                line += f"; training thread {thread['thread_ms']:.2f} ms/batch in the loader"
                if thread["photometric_ms"] is not None:
                    line += f" + {thread['photometric_ms']:.1f} ms photometric"
            print(line, flush=True)

    base = results.get("pil", {})
    base_img_s = statistics.median(base["img_s_runs"]) if base.get("status") == "ok" else None
    out_rows = []
    for name in names:
        r = results[name]
        if r["status"] == "ok":
            r["img_s"] = round(statistics.median(r["img_s_runs"]), 1)
            for key in ("thread_ms", "photometric_ms", "next_wall_ms"):
                values = [t[key] for t in r.get("thread_runs", []) if t[key] is not None]
                r[key] = round(statistics.median(values), 2) if values else None
            r["ratio_vs_pil"] = round(r["img_s"] / base_img_s, 2) if base_img_s else None
            if name == "decode":
                r["note"] = "decode only (ceiling)"
            elif name == "pil":
                r["note"] = f"torchvision + PIL, {cores} workers"
            else:
                r["note"] = ", ".join(f"{k} {v}" for k, v in r.get("details", {}).items())
        out_rows.append(r)

    report = {
        "results": out_rows,
        "recipe": args.recipe,
        "views": [f"{v.size}px scale {v.scale}" for v in spec.views],
        "batch_size": args.batch_size, "batches": args.batches, "warmup": args.warmup, "repeats": args.repeats,
        "images": len(_list_images(args.images)),
        "machine": _machine(device),
        "load_average": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python", "scripts/bench_loader.py", *(argv if argv is not None else sys.argv[1:])]),
        "notes": notes,
    }

    ours = [r for r in out_rows if r["backend"] in OURS and r["status"] == "ok"]
    if args.profile and ours:
        best = max(ours, key=lambda r: r["img_s"])
        print(f"profiling (one thread) the stages of {args.recipe}; best backend {best['backend']}", flush=True)
        prof = {"backend": best["backend"], "ms_per_image_one_thread": profile_stages(data, spec, args.batch_size,
                                                                                      device)}
        geo = geometric_only(spec)
        runs = []
        for _ in range(args.repeats):
            img_s, _ = measure(maker(best["backend"], geo), args.batch_size, args.warmup, args.batches, device)
            runs.append(round(img_s, 1))
        prof["geometric_only_img_s"] = statistics.median(runs)
        prof["geometric_only_runs"] = runs
        prof["full_recipe_img_s"] = best["img_s"]
        report["profile"] = prof
        print(_profile_text(prof), flush=True)

    print()
    print(table(out_rows))
    la = report["load_average"]
    print(f"load average (1, 5, 15 min): start {la['start']}, end {la['end']}; {report['machine']['cores']} cores")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    if args.plot:
        plot(out_rows, args.plot, f"{args.recipe}: {spec.n_views} views ({'+'.join(str(s) for s in spec.sizes)} px), "
             f"batch {args.batch_size}, {report['machine']['cpu']}, {report['machine']['cores']} cores, "
             f"device {device}")
    return report


def _profile_text(prof: dict) -> str:
    ms = prof["ms_per_image_one_thread"]
    stages = {k: v for k, v in ms.items() if k != "photometric.total_measured"}
    total = sum(stages.values())
    lines = ["| stage | ms / image (1 thread) | share |", "|---|---:|---:|"]
    for k, v in sorted(stages.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {k} | {v:.3f} | {100 * v / total:.1f} % |")
    lines.append(f"| sum | {total:.3f} | -> {1e3 / total:.0f} img/s per core |")
    lines.append(f"photometric stage measured whole: {ms['photometric.total_measured']:.3f} ms/image; "
                 f"{prof['backend']} full recipe {prof['full_recipe_img_s']:.0f} img/s, photometric off "
                 f"{prof['geometric_only_img_s']:.0f} img/s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
