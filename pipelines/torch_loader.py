"""The torchvision/PIL fallback backend: the geometric stage on CPU, the photometric stage on the device.

Two modes, both drawing crops from torchvision's ``RandomResizedCrop`` distribution:

* workers (``cache="none"``): DataLoader worker processes read each sample's JPEG by offset from its
  shard, decode it ONCE with PIL, and for every view crop + resize (PIL bilinear, antialiased) +
  flip, writing uint8 (S, S, C) crops into the batch; batches travel as (B, S, S, C), which viewed
  as (B, C, S, S) is already channels-last (C = 1 for an all-gray batch, else 3), and the main
  process runs the photometric stage on the device.
* device decoding (``decode="device"``, with ``cache="none"``): workers only read each JPEG's bytes and
  its header (for the image size, so the crop boxes are drawn there, exactly as above); the main process
  decodes the batch in one ``decode_jpeg`` call on the training device (nvJPEG on CUDA; TorchCodec's, else
  torchvision's: ``DeviceJpegDecoder``),
  crops + resizes every view with ``torchvision.ops.roi_align`` (bilinear; ``sampling_ratio=-1`` averages
  ceil(crop / view) samples per output pixel, so shrinking crops are antialiased), flips, and runs the
  photometric stage, in a background thread on its own CUDA stream, one batch ahead of the training step.
  This is the path for a GPU machine without DALI: the CPU cost per image drops to a read.
* RAM cache (``cache="ram"``): for small datasets whose images share one size (MNIST/CIFAR-like) the
  rank's images are decoded once at construction into a uint8 (N, C, H, W) tensor on the device
  (C = 1 for grayscale data); each batch's crops are one ``grid_sample`` (bilinear) per view over
  per-sample affine grids (flip folded into the affine): no workers and no per-image Python.
  ``cache="auto"`` picks it when the rank's decoded images fit in ``RAM_CACHE_BUDGET`` bytes and
  all share one size.

Bilinear ``grid_sample`` does not antialias: when a crop is more than ~2x larger than the view it
aliases where PIL would average. The RAM cache targets tiny images, where crops are mostly enlarged.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import random
import re
import struct
import tarfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipelines import (
    STREAM_CROP,
    STREAM_WORKERS,
    Batch,
    Loader,
    cpus_per_local_rank,
    derive_seed,
    prefetch,
    replacements,
    resolve_device,
    undecodable,
)
from pipelines.formats import DatasetFormatError, iter_samples, load_manifest, shard_counts, shard_paths
from pipelines.progress import progress_bar
from pipelines.spec import MultiCropSpec

RAM_CACHE_BUDGET = 2 << 30  # bytes of decoded uint8 pixels per rank that cache="auto" keeps in memory
RRC_TRIES = 10  # torchvision's RandomResizedCrop attempts before its center-crop fallback


# ---- the crop sampler, shared by every backend ------------------------------------------------------
def _rrc_fallback(h: int, w: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's fallback: the largest centered crop whose aspect ratio is clamped into ``ratio``."""
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _is_center_square(scale: tuple[float, float], ratio: tuple[float, float]) -> bool:
    return tuple(scale) == (1.0, 1.0) and tuple(ratio) == (1.0, 1.0)


def sample_rrc(
    h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> tuple[int, int, int, int]:
    """One random-resized-crop box ``(top, left, height, width)`` in an h x w image.

    torchvision ``RandomResizedCrop.get_params`` semantics: area fraction uniform in ``scale``,
    aspect ratio (w/h) log-uniform in ``ratio``, rounded sides; up to 10 tries for a box that fits,
    placed uniformly; else the centered fallback crop. ``rng`` is anything with ``.random()`` giving
    a float in [0, 1): ``random.Random`` (fastest per call) or a ``numpy.random.Generator``.

    One deliberate difference: scale == ratio == (1, 1), the eval view, is always the largest
    centered square; torchvision may instead place a square one pixel shorter than the short side
    at a random offset when rounding lets it fit (e.g. 90x89), making "eval" random.
    """
    if _is_center_square(scale, ratio):
        return _rrc_fallback(h, w, ratio)
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(RRC_TRIES):
        target = area * (scale[0] + (scale[1] - scale[0]) * rng.random())
        aspect = math.exp(log_lo + (log_hi - log_lo) * rng.random())
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.random() * (h - ch + 1)), int(rng.random() * (w - cw + 1)), ch, cw
    return _rrc_fallback(h, w, ratio)


def sample_rrc_batch(
    n: int,
    h: int,
    w: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``n`` independent ``sample_rrc`` boxes in an h x w image, all tries drawn at once.

    Returns int64 (n, 4) CPU tensor of (top, left, height, width). Same distribution as
    ``sample_rrc``: each row takes its first fitting try of 10, else the fallback.
    """
    if _is_center_square(scale, ratio):
        return torch.tensor([_rrc_fallback(h, w, ratio)], dtype=torch.int64).expand(n, 4).clone()
    u = torch.rand(n, RRC_TRIES, 2, generator=generator, dtype=torch.float64)
    target = (h * w) * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    cw = torch.round(torch.sqrt(target * aspect))  # round half to even, like Python's round
    ch = torch.round(torch.sqrt(target / aspect))
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first fitting try (argmax takes the first)
    found = fits.any(dim=1)
    cw, ch = cw.gather(1, first).squeeze(1), ch.gather(1, first).squeeze(1)
    place = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top = torch.floor(place[:, 0] * (h - ch + 1))
    left = torch.floor(place[:, 1] * (w - cw + 1))
    f_top, f_left, f_h, f_w = _rrc_fallback(h, w, ratio)
    boxes = torch.stack([
        torch.where(found, top, float(f_top)), torch.where(found, left, float(f_left)),
        torch.where(found, ch, float(f_h)), torch.where(found, cw, float(f_w)),
    ], dim=1)
    return boxes.long()


def crop_theta(boxes: torch.Tensor, flips: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Affine matrices for ``F.affine_grid(align_corners=False)`` that map an output view onto each box.

    boxes: (n, 4) (top, left, height, width) in pixels of an h x w image; flips: (n,) bool.
    Returns float32 (n, 2, 3). Normalized x in [-1, 1] spans pixel edges 0..w, so the box
    [left, left + width] is x_in = (width / w) * x_out + (2 * left + width) / w - 1; a flip negates
    the x scale.
    """
    top, left, ch, cw = boxes.double().unbind(1)
    theta = torch.zeros(len(boxes), 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = torch.where(flips, -cw / w, cw / w)
    theta[:, 0, 2] = (2 * left + cw) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (2 * top + ch) / h - 1
    return theta.float()


def crop_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """``F.affine_grid(theta, (n, C, size, size), align_corners=False)`` for axis-aligned ``theta``
    (no rotation or shear, as ``crop_theta`` makes): (n, 2, 3) -> (n, size, size, 2), built by
    broadcasting one row and one column instead of a (size*size x 3) matmul per image."""
    base = (torch.arange(size, device=theta.device, dtype=theta.dtype) * 2 + 1) / size - 1  # pixel centres
    gx = theta[:, 0, 0, None] * base + theta[:, 0, 2, None]  # (n, size)
    gy = theta[:, 1, 1, None] * base + theta[:, 1, 2, None]
    n = len(theta)
    return torch.stack([gx[:, None, :].expand(n, size, size), gy[:, :, None].expand(n, size, size)], dim=-1)


# ---- shard access ----------------------------------------------------------------------------------
# Per-sample index row: jpeg offset, jpeg size, label offset, label size, label is ASCII (.cls) not int32 (.lbl).
_INDEX_COLUMNS = 5


def _index_from_idx(idx_path: Path) -> list[tuple[int, int, int, int, int]] | None:
    """Rows from the DALI index that ShardWriter writes beside each shard ('v1.2 N', then per sample
    groups of 'ext offset size name'); None when it is missing or unreadable."""
    try:
        lines = idx_path.read_text().splitlines()
    except OSError:
        return None
    if not lines or not lines[0].startswith("v1.2"):
        return None
    rows = []
    for line in lines[1:]:
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) % 4:
            return None
        parts = {tokens[i]: (int(tokens[i + 1]), int(tokens[i + 2])) for i in range(0, len(tokens), 4)}
        if "jpg" not in parts or not ("lbl" in parts or "cls" in parts):
            return None
        label = parts.get("lbl") or parts["cls"]
        rows.append((*parts["jpg"], *label, int("lbl" not in parts)))
    return rows


def _index_from_tar(path: Path) -> list[tuple[int, int, int, int, int]]:
    """Rows from the tar headers (slow: ~50 us a member in Python); used when the index is missing."""
    entries: dict[str, dict] = {}
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if member.isfile():
                stem, _, ext = member.name.rpartition(".")
                entries.setdefault(stem, {})[ext] = (member.offset_data, member.size)
    rows = []
    for stem, parts in entries.items():
        if "jpg" not in parts or not ("lbl" in parts or "cls" in parts):
            raise DatasetFormatError(f"{path}: sample {stem!r} lacks its .jpg or label; rerun fastssl-convert")
        label = parts.get("lbl") or parts["cls"]
        rows.append((*parts["jpg"], *label, int("lbl" not in parts)))
    return rows


def index_shard(path: str | os.PathLike) -> np.ndarray:
    """Byte locations of every sample of one shard, in stored order, so a worker reads any sample
    with a pread: int64 (n, 5) = jpeg offset, jpeg size, label offset, label size, label-is-ASCII.

    Reads the shard's DALI index (milliseconds); falls back to walking the tar headers."""
    path = Path(path)
    rows = _index_from_idx(path.with_suffix(".idx"))
    if rows is None:
        rows = _index_from_tar(path)
    return np.array(rows, dtype=np.int64).reshape(-1, _INDEX_COLUMNS)


def _decode(jpeg: bytes) -> Image.Image:
    """JPEG bytes -> PIL image in mode L (gray) or RGB."""
    img = Image.open(io.BytesIO(jpeg))
    img.load()
    return img if img.mode in ("L", "RGB") else img.convert("RGB")


def describe_error(e: BaseException) -> str:
    """'<type>: <message>' of a decoder's exception, without the address of an in-memory file (PIL names the
    BytesIO it read, which says nothing to a user)."""
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", f"{type(e).__name__}: {e}")


def _try_decode(jpeg: bytes) -> Image.Image | str:
    """``_decode``, or why the bytes do not decode (PIL raises UnidentifiedImageError, OSError, ValueError,
    SyntaxError... on damaged data: any exception is the same data error)."""
    try:
        return _decode(jpeg)
    except Exception as e:  # noqa: BLE001
        return describe_error(e)


class _CropDataset(Dataset):
    """Map-style dataset over the rank's samples. Keys are ``(position, epoch)``; a worker receives a
    whole batch of keys (``__getitems__``) and writes every view's crops straight into (B, S, S, 3)
    uint8 arrays: no per-sample tensors, no collate copy. Crops are seeded by
    (seed, epoch, global sample id), a pure function of those keys."""

    def __init__(self, spec: MultiCropSpec, seed: int, sample_ids: np.ndarray, shard_files: list[str],
                 shard_of: np.ndarray, index: np.ndarray, raw: bool = False, skip_bad: bool = False):
        self.spec, self.seed, self.raw, self.skip_bad = spec, seed, raw, skip_bad
        self.sample_ids, self.shard_files, self.shard_of, self.index = sample_ids, shard_files, shard_of, index
        self._fds: dict[int, int] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.sample_ids)

    def _read(self, pos: int) -> tuple[bytes, int]:
        if self._pid != os.getpid():  # file descriptors are per process: reopen after fork
            self._fds, self._pid = {}, os.getpid()
        shard = int(self.shard_of[pos])
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.shard_files[shard], os.O_RDONLY)
        jpg_off, jpg_size, lbl_off, lbl_size, ascii_label = (int(v) for v in self.index[pos])
        raw = os.pread(fd, lbl_size, lbl_off)
        label = int(raw.decode()) if ascii_label else struct.unpack("<i", raw)[0]
        return os.pread(fd, jpg_size, jpg_off), label

    def _boxes(self, pos: int, epoch: int, h: int, w: int) -> Iterator[tuple[int, int, int, int, bool]]:
        """Each view's crop box (top, left, height, width) and flip for sample ``pos``: a pure function of
        (seed, epoch, sample id), the same in both decode modes."""
        rng = random.Random(derive_seed(self.seed, epoch, int(self.sample_ids[pos]), STREAM_CROP))
        for view in self.spec.views:
            box = sample_rrc(h, w, view.scale, view.ratio, rng)
            yield (*box, rng.random() < view.flip_p)

    def _bad(self, pos: int, reason: str) -> tuple[int, str, str]:
        """A sample that does not decode: raise naming it, or (with ``skip_bad``) describe it for the loader."""
        if not self.skip_bad:
            raise undecodable(self.where(pos), reason)
        return int(self.sample_ids[pos]), self.where(pos), reason

    def _raw_items(self, keys: list[tuple[int, int]]) -> tuple:
        """decode="device": no decoding here. The batch's JPEGs as one uint8 buffer and their int64 (B + 1,)
        offsets; int64 (B, V, 5) boxes + flip (top, left, height, width, flip), from the JPEG header's size;
        labels int64 (B,); the samples' positions int64 (B,) (for error messages); the bad samples (``_bad``),
        each replaced by the next good one of the batch (``pipelines.replacements``)."""
        jpegs, labels = [], np.empty(len(keys), dtype=np.int64)
        boxes = np.zeros((len(keys), len(self.spec.views), 5), dtype=np.int64)
        bad, broken = np.zeros(len(keys), dtype=bool), []
        for i, (pos, epoch) in enumerate(keys):
            jpeg, labels[i] = self._read(pos)
            try:
                w, h = Image.open(io.BytesIO(jpeg)).size  # parses the header only
            except Exception as e:  # noqa: BLE001 - any parse failure is the same data error
                broken.append(self._bad(pos, describe_error(e)))
                bad[i] = True
                jpegs.append(jpeg)
                continue
            boxes[i] = list(self._boxes(pos, epoch, h, w))
            jpegs.append(jpeg)
        if broken:
            stand_in = replacements(bad, f"{self.where(keys[0][0])} and the rest of its batch")
            jpegs = [jpegs[j] for j in stand_in]
            boxes, labels = boxes[stand_in], labels[stand_in]
        offsets = np.zeros(len(jpegs) + 1, dtype=np.int64)
        np.cumsum([len(j) for j in jpegs], out=offsets[1:])
        data = torch.frombuffer(bytearray(b"".join(jpegs)), dtype=torch.uint8)
        positions = torch.tensor([pos for pos, _ in keys], dtype=torch.int64)
        return data, torch.from_numpy(offsets), torch.from_numpy(boxes), torch.from_numpy(labels), positions, broken

    def where(self, pos: int) -> str:
        """'<shard file>: sample <global id>' for error messages."""
        return f"{self.shard_files[int(self.shard_of[pos])]}: sample {int(self.sample_ids[pos])}"

    def __getitems__(self, keys: list[tuple[int, int]]):
        """A batch: per view uint8 (B, S, S, C) crops, C = 1 when every image is gray (the photometric
        stage then does a third of the work) else 3; labels int64 (B,). With ``raw``: ``_raw_items``."""
        if self.raw:
            return self._raw_items(keys)
        views = self.spec.views
        out: list[np.ndarray] = []
        labels = np.empty(len(keys), dtype=np.int64)
        bad, broken = np.zeros(len(keys), dtype=bool), []
        for i, (pos, epoch) in enumerate(keys):
            jpeg, labels[i] = self._read(pos)
            img = _try_decode(jpeg)
            if isinstance(img, str):
                broken.append(self._bad(pos, img))
                bad[i] = True
                continue
            if not out:  # the first image's channels size the batch
                channels = 3 if img.mode == "RGB" else 1
                out = [np.empty((len(keys), v.size, v.size, channels), dtype=np.uint8) for v in views]
            elif img.mode == "RGB" and channels == 1:  # first colour image after gray ones: widen the batch once
                channels = 3
                out = [np.repeat(o, 3, axis=3) for o in out]
            for v, (view, (top, left, ch, cw, flip)) in enumerate(
                    zip(views, self._boxes(pos, epoch, img.height, img.width), strict=True)):
                crop = np.asarray(
                    img.resize((view.size, view.size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
                )
                if crop.ndim == 2:  # gray: resized at one channel, broadcast if the batch has three
                    crop = crop[..., None]
                out[v][i] = crop[:, ::-1] if flip else crop
        if broken:  # each bad slot takes the crops and label of the next good sample of the batch
            stand_in = replacements(bad, f"{self.where(keys[0][0])} and the rest of its batch")
            out, labels = [o[stand_in] for o in out], labels[stand_in]
        return [torch.from_numpy(o) for o in out], torch.from_numpy(labels), broken

    def __getitem__(self, key: tuple[int, int]) -> tuple[list[torch.Tensor], int]:
        """One sample: per-view (S, S, C) uint8 tensors and the label (host decoding)."""
        if self.raw:
            raise TypeError("a raw (decode='device') dataset serves whole batches only (__getitems__)")
        crops, labels, _ = self.__getitems__([key])
        return [c[0] for c in crops], int(labels[0])

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


def _batched(batch):
    """collate_fn: ``__getitems__`` already returns the batch."""
    return batch


class _PlanSampler:
    """Batch sampler yielding the current plan's keys; the loader sets the plan before each epoch, so
    persistent workers serve every epoch."""

    def __init__(self):
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def default_num_workers() -> int:
    """Decode processes per rank: this rank's share of the cores, one left for the main process, at most 8."""
    return max(1, min(8, cpus_per_local_rank() - 1))


class TorchLoader(Loader):
    """torchvision/PIL backend; see the module docstring. Arguments as ``pipelines.build_loader``, plus
    ``decode`` ("host": PIL in the workers; "device": see the module docstring), ``cache_budget`` (bytes for
    cache="auto") and ``progress`` (a progress bar while filling the RAM cache)."""

    def __init__(
        self,
        path: str | os.PathLike,
        spec: MultiCropSpec,
        batch_size: int,
        *,
        split: str = "train",
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        num_workers: int | None = None,
        cache: str = "auto",
        decode: str = "host",
        cache_budget: int = RAM_CACHE_BUDGET,
        progress: bool = True,
        skip_bad_samples: bool = False,
        subset: Sequence[int] | np.ndarray | None = None,
    ):
        if cache not in ("auto", "ram", "none"):
            raise ValueError(f"cache must be 'auto', 'ram' or 'none', got {cache!r}")
        if decode not in ("host", "device"):
            raise ValueError(f"decode must be 'host' or 'device', got {decode!r}")
        if decode == "device" and cache == "ram":
            raise ValueError("decode='device' decodes every batch on the device; it excludes cache='ram' "
                             "(the RAM cache decodes once up front): use cache='none'")
        self.decode = decode
        self.jpeg_decoder: DeviceJpegDecoder | None = None  # decode="device": chosen at the first batch
        self.path = Path(path)
        manifest = load_manifest(self.path)
        self.shard_files = [str(p) for p in shard_paths(self.path, split, manifest)]
        super().__init__(shard_counts(manifest, split), spec, batch_size, rank=rank, world_size=world_size,
                         device=device, seed=seed, shuffle=shuffle, drop_last=drop_last,
                         skip_bad_samples=skip_bad_samples, subset=subset)
        self.split = split
        self.num_workers = default_num_workers() if num_workers is None else int(num_workers)
        self.mode = "workers"
        if cache != "none" and decode == "host":
            why_not = self._fill_cache(cache_budget if cache == "auto" else None, progress)
            if why_not is None:
                self.mode = "ram"
            elif cache == "ram":
                raise ValueError(f"cache='ram' impossible for {self.path} ({split}): {why_not}; use cache='none'")
        if self.mode == "workers":
            self._setup_workers()

    # ---- RAM cache ---------------------------------------------------------------------------
    def _rank_samples(self) -> Iterator[tuple[int, bytes, int]]:
        """(position in sample_ids, jpeg, label) for this rank's samples, reading its shards in order."""
        wanted = np.full(int(self.offsets[-1]), -1, dtype=np.int64)
        wanted[self.sample_ids] = np.arange(len(self.sample_ids))
        for s in self.shards:
            j = -1
            for j, (_, jpeg, label) in enumerate(iter_samples(self.shard_files[s])):
                if j >= self.counts[s]:
                    break
                pos = wanted[self.offsets[s] + j]
                if pos >= 0:
                    yield int(pos), jpeg, label
            if j + 1 != self.counts[s]:  # a damaged tar header ends tarfile's walk early, silently
                raise DatasetFormatError(f"{self.shard_files[s]}: {j + 1} samples readable, the manifest lists "
                                         f"{self.counts[s]}; the shard is damaged: rerun fastssl-convert")

    def _fill_cache(self, budget: int | None, progress: bool) -> str | None:
        """Decode the rank's images into ``self.images`` (N, C, H, W) uint8 on the device; or return why not.

        With a budget, the first image's size bounds the memory needed before anything else is read,
        and a second size stops the scan, so a large or mixed dataset costs only a peek.
        """
        n = len(self.sample_ids)
        samples = self._rank_samples()
        self._bad_pos = np.zeros(n, dtype=bool)  # samples that do not decode: replaced in their batches
        self._bad_why: dict[int, str] = {}
        skipped = []  # bad samples before the first good one, which sizes the cache
        for first_pos, first_jpeg, first_label in samples:
            first = _try_decode(first_jpeg)
            if not isinstance(first, str):
                break
            self._ram_bad(first_pos, first)  # raises unless skipping
            skipped.append((first_pos, first, first_label))
        else:
            raise DatasetFormatError(f"{self.path} ({self.split}): none of this rank's {n} samples decodes; the "
                                     "data is damaged: rerun fastssl-convert")
        h, w = first.height, first.width
        channels = 1 if first.mode == "L" else 3
        if budget is not None and n * h * w * channels > budget:
            return f"{n} decoded images of {w}x{h}x{channels} exceed the {budget} byte budget"
        pixels = np.empty((n, h, w, channels), dtype=np.uint8)
        labels = np.empty(n, dtype=np.int64)

        bar = progress_bar(total=n, desc=f"decoding {self.path.name}/{self.split} into RAM", unit="img",
                           disable=not progress or self.rank != 0, leave=False)
        items = [(pos, label) for pos, _, label in skipped] + [(first_pos, first_label)]
        decoded = [why for _, why, _ in skipped] + [first]
        # PIL decodes outside the GIL: a thread pool decodes each chunk on all cores.
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            while True:
                for (pos, label), img in zip(items, decoded, strict=True):
                    if isinstance(img, str):  # raises unless skipping; batches replace it (_ram_batch)
                        self._ram_bad(pos, img)
                        pixels[pos] = 0
                        labels[pos] = label
                        continue
                    if (img.width, img.height) != (w, h):
                        bar.close()
                        return f"images differ in size ({w}x{h} and {img.width}x{img.height})"
                    arr = np.asarray(img)
                    if arr.ndim == 2:
                        arr = arr[..., None]  # broadcasts into a 3-channel cache if there is one
                    elif channels == 1:  # a colour image after gray ones: widen the cache once
                        pixels, channels = np.repeat(pixels, 3, axis=3), 3
                    pixels[pos] = arr
                    labels[pos] = label
                bar.update(len(items))
                chunk = list(itertools.islice(samples, 512))
                if not chunk:
                    break
                items = [(pos, label) for pos, _, label in chunk]
                decoded = list(pool.map(_try_decode, [jpeg for _, jpeg, _ in chunk]))
        bar.close()
        self.images = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(self.device)  # (N, C, H, W) channels-last
        self.labels = torch.from_numpy(labels).to(self.device)
        return None

    def _where(self, pos: int) -> str:
        """'<shard file>: sample <global id>' of position ``pos`` in sample_ids, for messages."""
        sample = int(self.sample_ids[pos])
        return f"{self.shard_files[int(np.searchsorted(self.offsets, sample, side='right')) - 1]}: sample {sample}"

    def _ram_bad(self, pos: int, reason: str) -> None:
        """A sample the RAM-cache fill could not decode: an error naming it, or (skipping) noted for its batches."""
        if not self.skip_bad_samples:
            raise undecodable(self._where(pos), reason)
        self._bad_pos[pos] = True
        self._bad_why[pos] = reason

    def _ram_batch(self, positions: np.ndarray, epoch: int, b: int) -> Batch:
        bad = self._bad_pos[positions]
        if bad.any():  # each bad sample takes the place of the next good one of the batch
            for pos in positions[bad]:
                self.bad_sample(b, int(self.sample_ids[pos]), self._where(int(pos)), self._bad_why[int(pos)])
            positions = positions[replacements(bad, f"{self._where(int(positions[0]))} and the rest of its batch")]
        idx = torch.from_numpy(positions).to(self.device, non_blocking=True)
        images = self.images.index_select(0, idx).float().contiguous()  # (B, C, H, W) 0..255
        n, _, h, w = images.shape
        gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch, self.rank, b, STREAM_CROP))
        crops = []
        for view in self.spec.views:
            boxes = sample_rrc_batch(n, h, w, view.scale, view.ratio, gen)
            flips = torch.rand(n, generator=gen) < view.flip_p
            theta = crop_theta(boxes, flips, h, w).to(self.device, non_blocking=True)
            grid = crop_grid(theta, view.size)  # == F.affine_grid(theta, ..., align_corners=False)
            crop = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
            crops.append(crop.mul_(1.0 / 255.0))
        return Batch(self.photometric(crops, epoch, b), self.labels.index_select(0, idx))

    # ---- workers -----------------------------------------------------------------------------
    def _setup_workers(self) -> None:
        index = {}
        for s in self.shards:
            index[s] = index_shard(self.shard_files[s])
            if len(index[s]) != self.counts[s]:
                raise DatasetFormatError(
                    f"{self.shard_files[s]}: {len(index[s])} samples, manifest says {self.counts[s]}; "
                    "rerun fastssl-convert"
                )
        shard_of = np.searchsorted(self.offsets, self.sample_ids, side="right") - 1
        table = np.empty((len(self.sample_ids), _INDEX_COLUMNS), dtype=np.int64)
        for s in self.shards:
            mine = shard_of == s
            table[mine] = index[s][self.sample_ids[mine] - self.offsets[s]]
        self.dataset = _CropDataset(self.spec, self.seed, self.sample_ids, self.shard_files, shard_of, table,
                                    raw=self.decode == "device", skip_bad=self.skip_bad_samples)
        self._sampler = _PlanSampler()
        workers = self.num_workers
        self._dl = DataLoader(
            self.dataset, batch_sampler=self._sampler, collate_fn=_batched, num_workers=workers,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            # Its own generator: the global torch RNG (the training run's) is never drawn from by the loader.
            generator=torch.Generator().manual_seed(derive_seed(self.seed, self.rank, STREAM_WORKERS)),
        )

    def _iter_epoch(self, epoch: int, start: int) -> Iterator[Batch]:
        batches = self.batch_positions(epoch)
        if self.mode == "ram":
            for b in range(start, len(batches)):
                yield self._ram_batch(batches[b], epoch, b)
            return
        self._sampler.batches = [[(int(p), epoch) for p in pos] for pos in batches[start:]]
        if self.decode == "device":
            batches = (self._device_batch(*raw, epoch, b) for b, raw in enumerate(self._dl, start=start))
            yield from prefetch(batches, self.device)
            return
        for b, (crops, labels, broken) in enumerate(self._dl, start=start):
            for sample_id, where, reason in broken:  # found (and replaced) by a worker
                self.bad_sample(b, sample_id, where, reason)
            # (B, S, S, C) -> (B, C, S, S) channels-last view, no copy
            crops = [c.to(self.device, non_blocking=True).permute(0, 3, 1, 2) for c in crops]
            yield Batch(self.photometric(crops, epoch, b), labels.to(self.device, non_blocking=True))

    # ---- device decoding ---------------------------------------------------------------------
    def _view_groups(self) -> list[tuple[int, list[int]]]:
        """(size, view indices) for each view size, in spec order: one roi_align per image and size."""
        groups: dict[int, list[int]] = {}
        for i, view in enumerate(self.spec.views):
            groups.setdefault(view.size, []).append(i)
        return list(groups.items())

    def _device_batch(self, data: torch.Tensor, offsets: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                      positions: torch.Tensor, broken: list, epoch: int, b: int) -> Batch:
        """One batch from ``_CropDataset._raw_items``: decode on the device, crop + resize + flip, photometric."""
        from torchvision.ops import roi_align

        dev = self.device
        if self.jpeg_decoder is None:
            self.jpeg_decoder = DeviceJpegDecoder(dev)
        for sample_id, where, reason in broken:  # a header the worker could not parse (already replaced)
            self.bad_sample(b, sample_id, where, reason)
        bounds = offsets.tolist()
        jpegs = [data[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]
        try:
            images = self.jpeg_decoder(jpegs)  # list of uint8 (3, H, W)
        except Exception as e:  # noqa: BLE001 - the decoders raise RuntimeError, ValueError...: find the samples
            images, bad = self.jpeg_decoder.decode_each(jpegs)
            if not bad.any():
                raise
            for i in np.flatnonzero(bad):  # raises unless skipping
                pos = int(positions[i])
                self.bad_sample(b, int(self.sample_ids[pos]), self.dataset.where(pos), f"{self.jpeg_decoder.name}: {e}")
            stand_in = replacements(bad, f"{self.dataset.where(int(positions[0]))} and the rest of its batch")
            images = [images[j] for j in stand_in]
            boxes, labels = boxes[stand_in], labels[stand_in]
        batch = _pad_replicate(images)  # float32 (B, 3, H, W): roi_align needs one tensor
        n, n_views = boxes.shape[:2]
        top, left, ch, cw, flip = boxes.unbind(-1)
        # roi_align(aligned=True) boxes are (image, x1, y1, x2, y2) in pixel-edge coordinates (PIL's box)
        image = torch.arange(n).unsqueeze(1).expand(n, n_views)
        rois = torch.stack([image, left, top, left + cw, top + ch], dim=-1).float().to(dev, non_blocking=True)
        flips = flip.bool().to(dev, non_blocking=True)
        crops: list[torch.Tensor | None] = [None] * n_views
        for size, idx in self._view_groups():
            sel = slice(idx[0], idx[-1] + 1) if idx == list(range(idx[0], idx[-1] + 1)) else idx
            out = roi_align(batch, rois[:, sel].reshape(-1, 5), size, 1.0, -1, True)
            out = out.view(n, len(idx), 3, size, size)
            f = flips[:, sel, None, None, None]
            out = torch.where(f, out.flip(-1), out).mul_(1.0 / 255.0)
            for k, v in enumerate(idx):
                crops[v] = out[:, k]
        return Batch(self.photometric(crops, epoch, b), labels.to(dev, non_blocking=True))


JPEG_DECODERS = ("torchcodec", "torchvision")


class DeviceJpegDecoder:
    """Batched JPEG decoding onto ``device`` (nvJPEG on CUDA), as RGB uint8 (3, H, W) tensors.

    Two implementations of one call: TorchCodec's ``decode_jpeg`` (the successor of torchvision's image
    decoders) and ``torchvision.io.decode_jpeg`` (deprecated since torchvision 0.29, removed in a later
    release). ``prefer`` (default: the FASTSSL_JPEG_DECODER environment variable, else "auto") names one, or
    "auto": the first that is installed and decodes a probe JPEG on ``device`` (a TorchCodec built for another
    CUDA version than the driver's, or without CUDA, fails the probe: then torchvision's decoder serves).
    TorchCodec's CUDA build tries nvJPEG's hardware backend (the A100/H100 JPEG engines) first. ``name`` says
    which one runs.
    """

    def __init__(self, device: str | torch.device, prefer: str | None = None):
        self.device = resolve_device(device)  # the probe's output says cuda:N, never a bare cuda
        prefer = prefer or os.environ.get("FASTSSL_JPEG_DECODER") or "auto"
        if prefer not in ("auto", *JPEG_DECODERS):
            raise ValueError(f"JPEG decoder must be 'auto' or one of {JPEG_DECODERS} (FASTSSL_JPEG_DECODER), "
                             f"got {prefer!r}")
        probe = io.BytesIO()
        Image.new("RGB", (16, 8), (200, 40, 90)).save(probe, "JPEG", quality=95)
        probe = torch.frombuffer(bytearray(probe.getvalue()), dtype=torch.uint8)
        failures = []
        for name in JPEG_DECODERS if prefer == "auto" else (prefer,):
            try:
                fn = self._load(name)
                out = fn([probe])
                if len(out) != 1 or tuple(out[0].shape) != (3, 8, 16) or out[0].device != self.device:
                    raise RuntimeError(f"probe decoded to {[tuple(o.shape) for o in out]} on {out[0].device}")
            except Exception as e:  # noqa: BLE001 - ImportError, RuntimeError (no CUDA build)...
                failures.append(f"{name}: {type(e).__name__}: {e}")
                continue
            self.name, self._fn = name, fn
            return
        raise RuntimeError(f"no JPEG decoder works on {self.device} ({'; '.join(failures)}); install torchcodec "
                           "with CUDA support (see the README's loader section) or use data.decode=host")

    def _load(self, name: str):
        device = self.device
        if name == "torchcodec":
            from torchcodec.decoders import decode_jpeg

            return lambda jpegs: decode_jpeg(list(jpegs), mode="RGB", device=device)
        import warnings

        from torchvision.io import ImageReadMode, decode_jpeg

        # Its deprecation (torchvision >= 0.29, one warning per call) is why TorchCodec comes first.
        warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision",
                                DeprecationWarning)
        return lambda jpegs: decode_jpeg(list(jpegs), mode=ImageReadMode.RGB, device=device)

    def _drain_stream(self) -> None:
        """On CUDA, wait on the host until the work queued on the current stream has run, before a decode.

        The decode's outputs come from the caching allocator, which hands out a block as soon as it is freed on
        this stream, trusting stream order for the kernels still queued to read it (the previous batch's crops,
        in the prefetch thread's stream). nvJPEG's batched hardware decode writes without waiting for that
        order (TorchCodec >= 0.17 host-waits for it inside decode_jpeg, 0.16 does not; torchvision decodes on
        a private stream that never waits on ours), so such a block would be overwritten while queued crops
        still read it. A host wait is the only barrier that holds: a stream-side wait does not gate that write.
        """
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def __call__(self, jpegs: list[torch.Tensor]) -> list[torch.Tensor]:
        self._drain_stream()
        return self._fn(jpegs)

    def decode_each(self, jpegs: list[torch.Tensor]) -> tuple[list[torch.Tensor | None], np.ndarray]:
        """After a batch failed: each JPEG decoded alone; returns the images (None where it failed) and the
        failures, bool (B,)."""
        self._drain_stream()
        images: list[torch.Tensor | None] = []
        bad = np.zeros(len(jpegs), dtype=bool)
        for i, jpeg in enumerate(jpegs):
            try:
                images.append(self._fn([jpeg])[0])
            except Exception:  # noqa: BLE001 - the batch's error is the one reported
                images.append(None)
                bad[i] = True
        return images, bad


def _pad_replicate(images: list[torch.Tensor]) -> torch.Tensor:
    """uint8 (3, h_i, w_i) images -> float32 (B, 3, H, W), H and W the largest, each image's last row and
    column repeated into its padding: a bilinear sample between an image's last pixel and its border reads
    that pixel, as at the true border (zeros there would darken crops touching the bottom or right edge).
    One gather over the concatenated pixels instead of a copy per image."""
    dev = images[0].device
    hs = [int(img.shape[1]) for img in images]
    ws = [int(img.shape[2]) for img in images]
    starts = np.zeros(len(images), dtype=np.int64)
    np.cumsum([h * w for h, w in zip(hs[:-1], ws[:-1], strict=True)], out=starts[1:])
    meta = torch.from_numpy(np.stack([hs, ws, starts], axis=1).astype(np.int64)).to(dev, non_blocking=True)
    flat = torch.cat([img.reshape(3, -1) for img in images], dim=1)  # (3, sum of h * w)
    rows = torch.minimum(torch.arange(max(hs), device=dev)[None, :], meta[:, 0:1] - 1)  # (B, H)
    cols = torch.minimum(torch.arange(max(ws), device=dev)[None, :], meta[:, 1:2] - 1)  # (B, W)
    index = meta[:, 2, None, None] + rows[:, :, None] * meta[:, 1, None, None] + cols[:, None, :]  # (B, H, W)
    out = torch.empty((len(images), 3, max(hs), max(ws)), dtype=torch.float32, device=dev)
    return out.copy_(flat[:, index].transpose(0, 1))
