"""The FFCV backend: one JPEG decode per image feeds every view; the photometric stage is the shared one.

Files. ``fastssl-convert --formats wds,ffcv`` writes ``<split>.beton`` beside the shards (``write_betons``):
FFCV's own format (``DatasetWriter``), fields ``image`` (``RGBImageField``, JPEG, longer side at most
``--ffcv-max-side``, quality ``--ffcv-quality``; gray images stored as RGB) and ``label`` (``IntField``),
sample i of the beton being sample i of the split in shard order, the global sample id of the Loader
base class. The manifest lists each beton (``formats.beton_path`` checks it before a loader opens it).

How the Loader contract is kept. FFCV's own ``Loader`` hands its operations nothing but the beton
indices of a batch, so a crop cannot be a function of (seed, epoch, sample) there (its own random
operations draw from numba's unseeded RNG); feeding it each epoch's planned ``indices`` in sequential
order would fix the order but not the crops, and would build and compile a new FFCV ``Loader`` per epoch
(which also resets torch's thread count each time). So this backend reads samples by index itself,
with FFCV's machinery below the ``Loader``: its ``Reader`` (header, per-sample
metadata, allocation table), a read-only memory map of the file (what FFCV's ``OSCacheManager`` reads
through; each image's byte range is looked up once at construction, not per sample), its turbojpeg
``imdecode`` and its OpenCV ``resize_crop``. The order is the base class's plan (``batch_positions``), so
rank sharding and mid-epoch resume are exactly the other backends'.

Decode once. FFCV 1.0.2 decodes the JPEG again for every extra pipeline reading the same field;
``MultiCropDecoder`` is one operation in the style of FFCV's ``RandomResizedCropRGBImageDecoder``: it
declares its output memory once per batch (one buffer holding a uint8 (B, S, S, 3) block per view, plus a
decode scratch buffer per thread), and a numba-compiled function fills it: per image one ``imdecode``
into the scratch buffer, then per view a random box cut and resized straight into that view's block,
flipped in place. ``decode_count`` counts the ``imdecode`` calls.

Resize filter. A box up to 2x larger than its view on both sides (most crops of the SwAV and BYOL recipes
on ImageNet-sized images) goes through ``_bilinear_crop``: 2 x 2 taps at pixel centres, in fixed point, the
OpenCV / ``F.interpolate`` INTER_LINEAR mapping; at a ratio of at most 2 every source row and column
still weighs in, so there is little to alias. Larger ratios and enlargements use FFCV's ``resize_crop``
(OpenCV INTER_AREA, whose cost grows with the source box: 1.1 ms for a 400 x 300 box to 224 px, against
0.3 ms for the bilinear one, one core).

Crops. The boxes follow ``pipelines.torch_loader.sample_rrc`` step by step (area uniform in the view's
``scale``, log-uniform aspect in ``ratio``, 10 tries, the same centered fallback, the eval view's center
square), then one flip coin against ``flip_p``. The uniforms come from a SplitMix64 stream seeded with
``derive_seed(seed, epoch, sample id, STREAM_CROP)``, the key the other backends seed their crop
generators with; the stream itself differs (numba cannot run Python's Mersenne Twister), so boxes have
the reference distribution but are not the torch backend's boxes (a test checks the compiled sampler
against ``sample_rrc`` fed the same stream, box for box). Nothing depends on the number of decode
threads or on prefetching.

Speed. The compiled function runs without the GIL: each batch is split into ``num_workers`` contiguous
chunks decoded by a thread pool, and a producer thread keeps ``prefetch`` batches ahead of training. On
CUDA the crops are written into pinned memory and copied to the device with ``non_blocking=True``.

Importing ffcv calls ``torch.set_num_threads(1)`` (``ffcv.pipeline.compiler`` does it at import); this
module restores torch's thread count.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import struct
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from numba import njit
from PIL import Image

from pipelines import STREAM_CROP, Batch, Loader, cpus_per_local_rank, derive_seed, prefetch, replacements
from pipelines.formats import (
    DatasetFormatError,
    beton_name,
    beton_path,
    load_manifest,
    sha256_file,
    shard_counts,
    shard_paths,
)
from pipelines.progress import progress_bar
from pipelines.spec import MultiCropSpec, ViewSpec
from pipelines.torch_loader import index_shard


def _import_ffcv():
    threads = torch.get_num_threads()
    try:
        from ffcv.fields import IntField, RGBImageField
        from ffcv.libffcv import imdecode, resize_crop
        from ffcv.reader import Reader
        from ffcv.writer import MIN_PAGE_SIZE, DatasetWriter
    finally:
        torch.set_num_threads(threads)  # undo ffcv's import-time torch.set_num_threads(1)
    return IntField, RGBImageField, imdecode, resize_crop, Reader, MIN_PAGE_SIZE, DatasetWriter


IntField, RGBImageField, _imdecode_py, _resize_crop_py, Reader, MIN_PAGE_SIZE, DatasetWriter = _import_ffcv()

IMAGE_FIELD, LABEL_FIELD = "image", "label"
DEFAULT_MAX_SIDE = 512
DEFAULT_QUALITY = 90
_JPG_MODE = 0  # RGBImageField's storage modes: 0 JPEG, 1 raw pixels
_PARAMS = 6  # per view: scale lo, scale hi, ratio lo, ratio hi, flip_p, center square (eval view)
_BOX = 5  # per view and sample: top, left, height, width, flipped


# ---- the crop sampler: sample_rrc's steps on a SplitMix64 stream, compiled ---------------------------
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S11, _S27, _S30, _S31 = np.uint64(11), np.uint64(27), np.uint64(30), np.uint64(31)
_TO_UNIT = 2.0**-53
RRC_TRIES = 10


@njit(nogil=True)
def _mix64(x):
    """``pipelines._splitmix64`` on a uint64 (wrapping arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ (x >> _S30)) * _MIX1
    x = (x ^ (x >> _S27)) * _MIX2
    return x ^ (x >> _S31)


@njit(nogil=True)
def _uniform(state):
    """Next float64 in [0, 1) of the stream at ``state`` and the advanced state."""
    return np.float64(_mix64(state) >> _S11) * _TO_UNIT, state + _GOLDEN


@njit(nogil=True)
def _fallback_box(h, w, ratio_lo, ratio_hi):
    in_ratio = w / h
    if in_ratio < ratio_lo:
        cw, ch = w, int(np.rint(w / ratio_lo))
    elif in_ratio > ratio_hi:
        ch, cw = h, int(np.rint(h * ratio_hi))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


@njit(nogil=True)
def _crop_box(h, w, p, state):
    """One ``sample_rrc`` box (top, left, height, width) for view parameters ``p``; returns it and the state."""
    if p[5] != 0.0:  # the eval view: always the centered square
        top, left, ch, cw = _fallback_box(h, w, p[2], p[3])
        return top, left, ch, cw, state
    area = h * w
    log_lo, log_hi = math.log(p[2]), math.log(p[3])
    for _ in range(RRC_TRIES):
        u, state = _uniform(state)
        target = area * (p[0] + (p[1] - p[0]) * u)
        u, state = _uniform(state)
        aspect = math.exp(log_lo + (log_hi - log_lo) * u)
        cw = int(np.rint(math.sqrt(target * aspect)))  # rint: half to even, like Python's round
        ch = int(np.rint(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            u, state = _uniform(state)
            top = int(u * (h - ch + 1))
            u, state = _uniform(state)
            left = int(u * (w - cw + 1))
            return top, left, ch, cw, state
    top, left, ch, cw = _fallback_box(h, w, p[2], p[3])
    return top, left, ch, cw, state


@njit(nogil=True)
def _sample_views(h, w, params, key, boxes):
    """Every view's box and flip for one image of h x w, from the stream seeded by ``key``, into ``boxes`` (V, 5)."""
    state = key
    for v in range(params.shape[0]):
        top, left, ch, cw, state = _crop_box(h, w, params[v], state)
        u, state = _uniform(state)
        boxes[v, 0], boxes[v, 1], boxes[v, 2], boxes[v, 3] = top, left, ch, cw
        boxes[v, 4] = 1 if u < params[v, 4] else 0


@njit(nogil=True)
def crop_boxes(keys, heights, widths, params):
    """Boxes the decoder cuts: keys uint64 (n,), heights/widths int64 (n,), params float64 (V, 6) (see
    ``view_params``) -> int64 (n, V, 5) of (top, left, height, width, flipped)."""
    out = np.empty((keys.shape[0], params.shape[0], _BOX), dtype=np.int64)
    for i in range(keys.shape[0]):
        _sample_views(heights[i], widths[i], params, keys[i], out[i])
    return out


def view_params(views: Sequence[ViewSpec]) -> np.ndarray:
    """float64 (V, 6): scale lo/hi, ratio lo/hi, flip_p, and 1.0 for the deterministic center square."""
    return np.array(
        [(*v.scale, *v.ratio, v.flip_p, float(v.scale == (1.0, 1.0) and v.ratio == (1.0, 1.0))) for v in views],
        dtype=np.float64,
    ).reshape(-1, _PARAMS)


# ---- the decode-once operation ---------------------------------------------------------------------
_imdecode = njit(nogil=True)(_imdecode_py)
_resize_crop = njit(nogil=True)(_resize_crop_py)


@njit(nogil=True)
def _flip_columns(img):
    s = img.shape[1]
    for r in range(img.shape[0]):
        for c in range(s // 2):
            for k in range(img.shape[2]):
                t = img[r, c, k]
                img[r, c, k] = img[r, s - 1 - c, k]
                img[r, s - 1 - c, k] = t


@njit(nogil=True)
def _bilinear_crop(img, top, bottom, left, right, dst):
    """Rows top..bottom-1, columns left..right-1 of img (H, W, C) resized into dst (S, S, C), bilinear with
    pixel centres aligned (src = (dst + 0.5) * box / S - 0.5, clamped to the box), 8-bit fixed-point
    weights, rounded: within 1 level of ``cv2.resize(..., INTER_LINEAR)`` of the box.

    Separable: each source row the output needs is interpolated along x once into an int32 row (kept while
    consecutive output rows share it), then two such rows are blended along y."""
    ch, cw = bottom - top, right - left
    s_h, s_w, c = dst.shape[0], dst.shape[1], dst.shape[2]
    n = s_w * c
    xa = np.empty(n, np.int64)
    xb = np.empty(n, np.int64)
    wb = np.empty(n, np.int32)
    for ox in range(s_w):
        sx = max((ox + 0.5) * cw / s_w - 0.5, 0.0)
        a = min(int(sx), cw - 1)
        w1 = int((sx - a) * 256.0 + 0.5)
        for k in range(c):
            xa[ox * c + k] = (left + a) * c + k
            xb[ox * c + k] = (left + min(a + 1, cw - 1)) * c + k
            wb[ox * c + k] = w1
    flat = img.reshape(img.shape[0], img.shape[1] * c)
    out = dst.reshape(s_h, n)
    r0 = np.empty(n, np.int32)
    r1 = np.empty(n, np.int32)
    have0, have1 = -1, -1
    for oy in range(s_h):
        sy = max((oy + 0.5) * ch / s_h - 0.5, 0.0)
        b = min(int(sy), ch - 1)
        y0, y1 = top + b, top + min(b + 1, ch - 1)
        wy = np.int32(int((sy - b) * 256.0 + 0.5))
        if y0 != have0:
            if y0 == have1:
                r0[:] = r1
            else:
                src = flat[y0]
                for j in range(n):
                    r0[j] = np.int32(src[xa[j]]) * (256 - wb[j]) + np.int32(src[xb[j]]) * wb[j]
            have0 = y0
        if y1 != have1:
            src = flat[y1]
            for j in range(n):
                r1[j] = np.int32(src[xa[j]]) * (256 - wb[j]) + np.int32(src[xb[j]]) * wb[j]
            have1 = y1
        row = out[oy]
        for j in range(n):
            row[j] = (r0[j] * (256 - wy) + r1[j] * wy + 32768) >> 16


@njit(nogil=True)
def _resize_box(img, top, bottom, left, right, dst):
    """The filter by the ratio of box to view (see the module docstring)."""
    ch, cw = bottom - top, right - left
    s_h, s_w = dst.shape[0], dst.shape[1]
    shrinks = ch > s_h or cw > s_w
    if shrinks and ch <= 2 * s_h and cw <= 2 * s_w:
        _bilinear_crop(img, top, bottom, left, right, dst)
    else:
        _resize_crop(img, top, bottom, left, right, dst)


@njit(nogil=True)
def _cut_views(img, params, key, out, layout, i, boxes):
    """Every view of one decoded image (H, W, 3) into slot i of its block of ``out``: box, resize, flip."""
    _sample_views(img.shape[0], img.shape[1], params, key, boxes)
    for v in range(layout.shape[0]):
        offset, s = layout[v, 0], layout[v, 1]
        dst = out[offset + i * s * s * 3 : offset + (i + 1) * s * s * 3].reshape(s, s, 3)
        top, left, ch, cw = boxes[v, 0], boxes[v, 1], boxes[v, 2], boxes[v, 3]
        _resize_box(img, top, top + ch, left, left + cw, dst)
        if boxes[v, 4]:
            _flip_columns(dst)


@njit(nogil=True)
def _decode_crops(lo, hi, rows, keys, modes, heights, widths, starts, sizes, data, params, out, layout,
                  scratch, boxes, decodes, status):
    """Fill batch slots lo..hi-1: slot i is the image at metadata row ``rows[i]``, crops seeded by ``keys[i]``.

    out: uint8, every view's (B, S, S, 3) block one after the other; layout: int64 (V, 2) of (offset of the
    view's block in ``out``, S). One buffer rather than a tuple of arrays: one compiled signature for
    every spec. scratch: uint8, at least 3 * max height * max width; boxes (B, V, 5)
    int32; decodes (B,) int32 counts ``imdecode`` calls per slot; status (B,) int32, nonzero where the
    JPEG did not decode.
    """
    for i in range(lo, hi):
        r = rows[i]
        h, w = heights[r], widths[r]
        blob = data[starts[r] : starts[r] + sizes[r]]
        if modes[r] == _JPG_MODE:
            img = scratch[: h * w * 3]
            status[i] = _imdecode(blob, img, h, w, h, w, 0, 0, 1, 1, False, False)  # the one decode
            decodes[i] += 1
            _cut_views(img.reshape(h, w, 3), params, keys[i], out, layout, i, boxes[i])
        else:  # raw pixels
            _cut_views(blob.reshape(h, w, 3), params, keys[i], out, layout, i, boxes[i])


class MultiCropDecoder:
    """Decode once, crop every view: FFCV-operation style (memory declared once, compiled fill per batch).

    views: the spec's views; max_height / max_width: the largest image of the file (sizes the scratch).
    """

    def __init__(self, views: Sequence[ViewSpec], max_height: int, max_width: int):
        self.views = tuple(views)
        self.params = view_params(self.views)
        self.scratch_bytes = 3 * int(max_height) * int(max_width)

    def declare_memory(self, batch: int) -> tuple[int, np.ndarray]:
        """Output memory of a batch: total uint8 bytes, and int64 (V, 2) of (offset, S) of each view's
        (B, S, S, 3) block in it."""
        sizes = np.array([v.size for v in self.views], dtype=np.int64)
        blocks = batch * sizes * sizes * 3
        offsets = np.concatenate([[0], np.cumsum(blocks)[:-1]]).astype(np.int64)
        return int(blocks.sum()), np.stack([offsets, sizes], axis=1)

    def new_scratch(self) -> np.ndarray:
        """One decode buffer; each thread that calls ``fill`` concurrently needs its own."""
        return np.empty(self.scratch_bytes, dtype=np.uint8)

    def fill(self, lo: int, hi: int, rows: np.ndarray, keys: np.ndarray, meta: tuple, out: np.ndarray,
             layout: np.ndarray, scratch: np.ndarray, boxes: np.ndarray, decodes: np.ndarray,
             status: np.ndarray) -> None:
        """Decode slots [lo, hi) of a batch (see ``_decode_crops``); releases the GIL while it runs."""
        _decode_crops(lo, hi, rows, keys, *meta, self.params, out, layout, scratch, boxes, decodes, status)


# ---- writing the .beton ----------------------------------------------------------------------------
class _SplitSamples:
    """One split's samples in shard order, indexable for FFCV's DatasetWriter: i -> (RGB uint8 (H, W, 3), label).

    Reads each JPEG by its offset in the shard (index from ``index_shard``); picklable, files opened per process.

    A sample that does not read or decode must not raise here: DatasetWriter runs ``__getitem__`` in worker
    processes and waits forever for a chunk whose worker died. It is recorded instead, one line per sample
    appended to ``errors_path`` (O_APPEND: whole lines from any process), and a 1 x 1 black image stands in so
    that the writer finishes; ``write_beton`` then throws the file away and raises, naming the samples.
    """

    def __init__(self, shard_files: Sequence[str | os.PathLike], errors_path: str | os.PathLike):
        self.shard_files = [str(p) for p in shard_files]
        tables = [index_shard(p) for p in self.shard_files]
        self.shard_of = np.concatenate([np.full(len(t), s, dtype=np.int64) for s, t in enumerate(tables)])
        self.index = np.concatenate(tables) if tables else np.empty((0, 5), dtype=np.int64)
        self.errors_path = str(errors_path)
        self._fds: dict[int, int] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.index)

    def where(self, i: int) -> str:
        """The sample's shard and id in the split (the loaders' way of naming a sample)."""
        return f"{self.shard_files[int(self.shard_of[i])]}: sample {i}"

    def _read(self, i: int) -> tuple[np.ndarray, int]:
        if self._pid != os.getpid():  # descriptors do not survive into DatasetWriter's worker processes
            self._fds, self._pid = {}, os.getpid()
        shard = int(self.shard_of[i])
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.shard_files[shard], os.O_RDONLY)
        jpg_off, jpg_size, lbl_off, lbl_size, ascii_label = (int(v) for v in self.index[i])
        raw = os.pread(fd, lbl_size, lbl_off)
        label = int(raw.decode()) if ascii_label else struct.unpack("<i", raw)[0]
        with Image.open(io.BytesIO(os.pread(fd, jpg_size, jpg_off))) as img:
            return np.asarray(img.convert("RGB")), label

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        try:
            return self._read(i)
        except Exception as e:  # PIL and struct raise many types on damaged bytes: all are the same data error
            line = f"{self.where(i)}\t{type(e).__name__}: {e}".replace("\n", " ") + "\n"
            fd = os.open(self.errors_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)
            return np.zeros((1, 1, 3), dtype=np.uint8), 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}, "_pid": -1}


def _page_size(max_side: int) -> int:
    """FFCV page size: a power of two holding one image's JPEG with room to spare (>= FFCV's 2 MiB minimum)."""
    worst = 2 * 3 * max_side * max_side  # a JPEG of noise at quality 100 stays below twice the raw size
    return max(MIN_PAGE_SIZE, 1 << (worst - 1).bit_length())


@contextlib.contextmanager
def _writer_progress(show: bool, desc: str) -> Iterator[None]:
    """FFCV's DatasetWriter always draws a tqdm bar: it gets ours instead (plain lines in a log), disabled
    without ``show``."""
    import ffcv.writer

    bar = ffcv.writer.tqdm
    ffcv.writer.tqdm = functools.partial(progress_bar, desc=desc, unit="img", disable=not show)
    try:
        yield
    finally:
        ffcv.writer.tqdm = bar


def write_beton(path: str | os.PathLike, shard_files: Sequence[str | os.PathLike], *,
                max_side: int = DEFAULT_MAX_SIDE, quality: int = DEFAULT_QUALITY, workers: int = 1,
                progress: bool = False) -> dict:
    """Write the samples of ``shard_files`` (in order) as the FFCV file ``path``, atomically.

    FFCV writes into a hidden temp file beside ``path``, which is fsynced and renamed only when complete:
    an interrupted write leaves no file under ``path`` (and a kill leaves only ``.<name>.*.tmp``).
    Returns ``{"name", "count", "bytes", "sha256"}`` for the manifest.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    errors = path.parent / f".{path.name}.{os.getpid()}.errors"
    samples = _SplitSamples(shard_files, errors)
    fields = {IMAGE_FIELD: RGBImageField(write_mode="jpg", max_resolution=max_side, jpeg_quality=quality),
              LABEL_FIELD: IntField()}
    writer = None
    try:
        with contextlib.suppress(FileNotFoundError):
            errors.unlink()
        writer = DatasetWriter(str(tmp), fields, page_size=_page_size(max_side), num_workers=max(1, workers))
        with _writer_progress(progress, path.name):
            writer.from_indexed_dataset(samples, chunksize=64)
        if errors.exists():
            bad = sorted(errors.read_text().splitlines())
            listed = "; ".join(line.replace("\t", " does not decode: ") for line in bad[:5])
            raise DatasetFormatError(
                f"{path}: not written: {len(bad)} sample(s) of the shards do not decode ({listed}"
                f"{'; ...' if len(bad) > 5 else ''}); the shards were damaged after conversion: rerun "
                "fastssl-convert --overwrite from the source images")
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        with contextlib.suppress(FileNotFoundError):
            errors.unlink()
        shared = getattr(writer, "metadata_sm", None)  # FFCV frees its shared metadata only on success
        if hasattr(shared, "unlink"):
            with contextlib.suppress(OSError):
                shared.close()
                shared.unlink()
        raise
    return {"name": path.name, "count": len(samples), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_betons(folder: str | os.PathLike, manifest: dict, *, max_side: int = DEFAULT_MAX_SIDE,
                 quality: int = DEFAULT_QUALITY, workers: int = 1, progress: bool = False) -> dict:
    """Write ``<split>.beton`` for every split of the converted dataset in ``folder`` (from its shards).

    Returns the manifest's ``"ffcv"`` section: ``{"max_side", "quality", "files": {split: write_beton(...)}}``.
    """
    folder = Path(folder)
    files = {}
    for split in manifest["splits"]:
        files[split] = write_beton(folder / beton_name(split), shard_paths(folder, split, manifest),
                                   max_side=max_side, quality=quality, workers=workers, progress=progress)
    return {"max_side": int(max_side), "quality": int(quality), "files": files}


# ---- the loader ------------------------------------------------------------------------------------
def default_num_threads() -> int:
    """Decode threads per rank: this rank's share of the cores, at most 8."""
    return max(1, min(8, cpus_per_local_rank()))




class FfcvLoader(Loader):
    """FFCV backend; see the module docstring. Arguments as ``pipelines.build_loader``, plus
    ``num_workers`` = decode threads and ``prefetch`` (batches decoded ahead; 0: decode on demand).

    ``decode_count`` counts the JPEG decodes so far (one per image, whatever the number of views);
    ``last_boxes`` holds the last batch's boxes, int32 (B, V, 5) of (top, left, height, width, flipped)
    in the pixels of the stored image.
    """

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
        prefetch: int = 2,
        skip_bad_samples: bool = False,
        subset: Sequence[int] | np.ndarray | None = None,
    ):
        self.path = Path(path)
        manifest = load_manifest(self.path)
        self.beton = beton_path(self.path, split, manifest)
        super().__init__(shard_counts(manifest, split), spec, batch_size, rank=rank, world_size=world_size,
                         device=device, seed=seed, shuffle=shuffle, drop_last=drop_last,
                         skip_bad_samples=skip_bad_samples, subset=subset)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device}")
        self.split = split
        self.num_threads = default_num_threads() if num_workers is None else max(1, int(num_workers))
        self.prefetch = max(0, int(prefetch))
        self._open()
        self.decoder = MultiCropDecoder(spec.views, int(self._heights.max()), int(self._widths.max()))
        self.decode_count = 0
        self.last_boxes: np.ndarray | None = None
        self._pool: ThreadPoolExecutor | None = None

    def _open(self) -> None:
        """This rank's rows of the beton: image metadata, byte ranges and labels, indexed by position."""
        reader = Reader(str(self.beton))
        total = int(self.offsets[-1])
        fields_ok = (reader.field_names[:2] == [IMAGE_FIELD, LABEL_FIELD]
                     and isinstance(reader.handlers[IMAGE_FIELD], RGBImageField)
                     and isinstance(reader.handlers[LABEL_FIELD], IntField))
        if int(reader.num_samples) != total or not fields_ok:
            raise DatasetFormatError(
                f"{self.beton}: {reader.num_samples} samples with fields {reader.field_names}, expected {total} "
                f"with fields {[IMAGE_FIELD, LABEL_FIELD]}; rerun fastssl-convert --formats wds,ffcv --overwrite"
            )
        image = reader.metadata["f0"][self.sample_ids]
        self._labels = np.ascontiguousarray(reader.metadata["f1"][self.sample_ids], dtype=np.int64)
        self._modes = np.ascontiguousarray(image["mode"], dtype=np.uint8)
        self._heights = np.ascontiguousarray(image["height"], dtype=np.int64)
        self._widths = np.ascontiguousarray(image["width"], dtype=np.int64)
        self._starts = np.ascontiguousarray(image["data_ptr"], dtype=np.uint64)
        # Each image is one allocation of the file: its size is the allocation's, found once here.
        table = reader.alloc_table
        order = np.argsort(table["ptr"], kind="stable")
        ptrs, sizes = table["ptr"][order], table["size"][order]
        where = np.minimum(np.searchsorted(ptrs, self._starts), max(len(ptrs) - 1, 0))
        if len(ptrs) == 0 or not np.array_equal(ptrs[where], self._starts):
            raise DatasetFormatError(f"{self.beton}: allocation table does not match the images; rerun fastssl-convert")
        self._sizes = np.ascontiguousarray(sizes[where], dtype=np.uint64)
        self._data = np.memmap(self.beton, dtype=np.uint8, mode="r")

    def _meta(self) -> tuple:
        return self._modes, self._heights, self._widths, self._starts, self._sizes, self._data

    # ---- one batch ---------------------------------------------------------------------------
    def _chunks(self, n: int) -> list[tuple[int, int]]:
        k = max(1, min(self.num_threads, n))
        bounds = np.linspace(0, n, k + 1).astype(int)
        return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]

    def _load(self, positions: np.ndarray, epoch: int, scratch: list[np.ndarray]):
        """Decode one batch: per view uint8 (B, S, S, 3) tensors (pinned on CUDA), labels int64 (B,), boxes, decodes."""
        n = len(positions)
        rows = np.ascontiguousarray(positions, dtype=np.int64)
        keys = np.fromiter((derive_seed(self.seed, epoch, int(s), STREAM_CROP) for s in self.sample_ids[rows]),
                           dtype=np.uint64, count=n)
        pin = self.device.type == "cuda"
        total, layout = self.decoder.declare_memory(n)
        memory = torch.empty(total, dtype=torch.uint8, pin_memory=pin)  # one (pinned) allocation per batch
        crops = [memory[o : o + n * s * s * 3].view(n, s, s, 3) for o, s in layout.tolist()]
        out = memory.numpy()
        boxes = np.empty((n, len(layout), _BOX), dtype=np.int32)
        decodes = np.zeros(n, dtype=np.int32)
        status = np.zeros(n, dtype=np.int32)
        meta = self._meta()
        chunks = self._chunks(n)
        work = [(lo, hi, rows, keys, meta, out, layout, scratch[j], boxes, decodes, status)
                for j, (lo, hi) in enumerate(chunks)]
        if len(work) == 1:
            self.decoder.fill(*work[0])
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.num_threads, thread_name_prefix="ffcv-decode")
            for f in [self._pool.submit(self.decoder.fill, *args) for args in work]:
                f.result()
        labels = torch.from_numpy(self._labels[rows])
        broken = []
        if status.any():  # turbojpeg refused these: each slot takes the crops and label of the next good one
            bad = status != 0
            broken = [(int(self.sample_ids[rows[i]]), f"{self.beton}: sample {int(self.sample_ids[rows[i]])}",
                       f"turbojpeg status {int(status[i])}") for i in np.flatnonzero(bad)]
            if not self.skip_bad_samples:
                self.bad_sample(-1, *broken[0])  # raises, naming it
            stand_in = torch.from_numpy(replacements(bad, f"{broken[0][1]} and the rest of its batch"))
            for c in crops:
                c.copy_(c[stand_in])
            labels, boxes = labels[stand_in], boxes[stand_in.numpy()]
        if pin:
            labels = labels.pin_memory()
        return crops, labels, boxes, int(decodes.sum()), broken

    def _batches(self, batches: list[np.ndarray], epoch: int) -> Iterator[tuple]:
        """``_load`` of each batch in order; with ``prefetch`` a producer thread runs that many batches ahead."""
        scratch = [self.decoder.new_scratch() for _ in range(max(1, min(self.num_threads, self.batch_size)))]
        if not self.prefetch:
            for pos in batches:
                yield self._load(pos, epoch, scratch)
            return
        yield from prefetch((self._load(pos, epoch, scratch) for pos in batches), torch.device("cpu"),
                            depth=self.prefetch)

    def _iter_epoch(self, epoch: int, start: int) -> Iterator[Batch]:
        batches = self.batch_positions(epoch)[start:]
        for b, (crops, labels, boxes, decodes, broken) in enumerate(self._batches(batches, epoch), start=start):
            for sample_id, where, reason in broken:
                self.bad_sample(b, sample_id, where, reason)
            self.decode_count += decodes
            self.last_boxes = boxes
            # (B, S, S, 3) -> (B, 3, S, S) channels-last view, no copy
            crops = [c.to(self.device, non_blocking=True).permute(0, 3, 1, 2) for c in crops]
            yield Batch(self.photometric(crops, epoch, b), labels.to(self.device, non_blocking=True))

    def __del__(self):
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)
