"""The DALI backend: decode each JPEG once (on the GPU's hardware decoder when there is one), then cut
every view out of the one decoded image; the photometric stage is the shared one on the device.

How the Loader contract is kept. DALI's own webdataset reader shuffles through a buffer seeded per
pipeline, so its order is neither a pure function of (seed, epoch) nor resumable at batch b without
re-reading the epoch. Instead the base class's plan drives DALI: for each batch the Python side reads
the planned samples' JPEG bytes from the shards by the byte offsets in the ``.idx`` index beside each
tar (one ``pread`` each) and feeds them through ``fn.external_source``, together with each view's crop
box. Boxes and flips come from ``pipelines.torch_loader.sample_rrc`` seeded by (seed, epoch, sample
id), the very draws of the torch backend, so both backends crop the same boxes, and order, crops and
resume are pure functions of the plan. Only the JPEG header is parsed in Python (for the image size
the box needs); DALI decodes (``fn.decoders.image``, "mixed" = nvJPEG on CUDA, "cpu" otherwise with
``device_id=None``) and resizes each box with ``fn.resize(roi_start, roi_end)`` (a reversed x range
is the flip), antialiased linear, uint8 out: one decoder op feeding 1 + V resize ops.

The feed runs in a thread of ours, a few batches ahead, and hands DALI whole ``TensorListCPU`` batches,
so the thread that iterates the loader (the training thread) does not spend the feed's ~18 ms of Python per
256-image SwAV batch. On CUDA the pipeline's outputs are bound to the consumer's stream (no host wait) and
copied on it; on a CPU they are shared with torch through DLPack, not copied.

``dali_photometric=True`` runs colour jitter / grayscale / blur / solarize / normalize in DALI instead
(for the benchmark). Its random decisions are the shared stage's (``sample_photometric_params`` with
the same generator keys), but DALI's ``color_twist`` applies brightness, contrast, saturation and hue
in one fixed order (torchvision draws a random order), grayscale is folded in as saturation 0, and the
blur runs on every image (sigma ~0, an identity, where it does not fire); close, not bit-equal.
"""

from __future__ import annotations

import io
import os
import random
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines import (
    STREAM_CROP,
    STREAM_PHOTO,
    Batch,
    Loader,
    cpus_per_local_rank,
    derive_seed,
    prefetch,
    replacements,
)
from pipelines.formats import DatasetFormatError, load_manifest, shard_counts, shard_paths
from pipelines.photometric import JITTER_OPS, blur_kernel_size, sample_photometric_params
from pipelines.spec import MultiCropSpec, ViewSpec
from pipelines.torch_loader import _INDEX_COLUMNS, describe_error, index_shard, sample_rrc

_NO_BLUR_SIGMA = 1e-3  # a Gaussian this narrow is a delta at any pixel spacing: the identity


def default_num_threads() -> int:
    """DALI CPU threads per rank: this rank's share of the cores, at most 8."""
    return max(1, min(8, cpus_per_local_rank()))


def jpeg_size(jpeg: bytes) -> tuple[int, int]:
    """(height, width) from a JPEG header, without decoding."""
    with Image.open(io.BytesIO(jpeg)) as img:
        return img.height, img.width


def crop_rois(h: int, w: int, views: tuple[ViewSpec, ...], rng: random.Random) -> list[tuple[list, list]]:
    """Per view, ``fn.resize`` ROI ``([top, x0], [bottom, x1])`` in pixels; x0 > x1 when flipped.

    Draws exactly what the torch backend draws for one sample: per view a ``sample_rrc`` box, then
    the flip coin, from one ``random.Random`` seeded by (seed, epoch, sample id, STREAM_CROP).
    """
    out = []
    for view in views:
        top, left, ch, cw = sample_rrc(h, w, view.scale, view.ratio, rng)
        flip = rng.random() < view.flip_p
        x0, x1 = (left + cw, left) if flip else (left, left + cw)
        out.append(([float(top), float(x0)], [float(top + ch), float(x1)]))
    return out


def _dali_photometric(fn, types, crop, view: ViewSpec, params, mean, std):
    """DALI twin of the shared photometric stage for one view (see the module docstring)."""
    b, c, s, h, gray, sigma, sol = params
    x = fn.color_twist(crop, brightness=b, contrast=c, saturation=s * (1.0 - gray), hue=h)
    kernel = blur_kernel_size(view.size)
    x = fn.gaussian_blur(x, sigma=sigma, window_size=kernel)
    x = fn.cast(x, dtype=types.FLOAT)
    x = x + sol * fn.cast(x >= 128.0, dtype=types.FLOAT) * (255.0 - 2.0 * x)  # solarize where it fires
    return fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="HWC",
                                    mean=[255.0 * m for m in mean], std=[255.0 * v for v in std])


class DaliLoader(Loader):
    """DALI backend; see the module docstring. Arguments as ``pipelines.build_loader``, plus
    ``num_workers`` = DALI CPU threads, ``dali_photometric`` (run the photometric stage in DALI) and
    ``prefetch`` (batches DALI prepares ahead)."""

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
        dali_photometric: bool = False,
        prefetch: int = 2,
        skip_bad_samples: bool = False,
        subset: Sequence[int] | np.ndarray | None = None,
    ):
        self.path = Path(path)
        manifest = load_manifest(self.path)
        self.shard_files = [str(p) for p in shard_paths(self.path, split, manifest)]
        super().__init__(shard_counts(manifest, split), spec, batch_size, rank=rank, world_size=world_size,
                         device=device, seed=seed, shuffle=shuffle, drop_last=drop_last,
                         skip_bad_samples=skip_bad_samples, subset=subset)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device}")
        self.split = split
        self.num_threads = default_num_threads() if num_workers is None else max(1, int(num_workers))
        self.dali_photometric = bool(dali_photometric)
        self.prefetch = int(prefetch)
        self.decoder_device = "mixed" if self.device.type == "cuda" else "cpu"
        # The GPU DALI runs on: the loader's device, whose index the base class resolved (a bare "cuda" on a
        # second rank is that rank's GPU, not GPU 0); None runs DALI CPU-only.
        self.device_id = self.device.index if self.device.type == "cuda" else None
        self._index_samples()
        self._fds: dict[int, int] = {}
        self._undecodable: dict[int, str] = {}  # positions whose bytes DALI's decoder refused (see _iter_epoch)
        self._running: int | None = None  # the batch the live pipeline is running; None before it is built

    # ---- shard access ------------------------------------------------------------------------
    def _index_samples(self) -> None:
        """Per sample of this rank: its shard and the byte locations of its JPEG and label."""
        index = {}
        for s in self.shards:
            index[s] = index_shard(self.shard_files[s])
            if len(index[s]) != self.counts[s]:
                raise DatasetFormatError(
                    f"{self.shard_files[s]}: {len(index[s])} samples, manifest says {self.counts[s]}; "
                    "rerun fastssl-convert"
                )
        self.shard_of = np.searchsorted(self.offsets, self.sample_ids, side="right") - 1
        self.index = np.empty((len(self.sample_ids), _INDEX_COLUMNS), dtype=np.int64)
        for s in self.shards:
            mine = self.shard_of == s
            self.index[mine] = index[s][self.sample_ids[mine] - self.offsets[s]]

    def _where(self, pos: int) -> str:
        """'<shard file>: sample <global id>' for messages."""
        return f"{self.shard_files[int(self.shard_of[pos])]}: sample {int(self.sample_ids[pos])}"

    def _read(self, pos: int) -> tuple[bytes, int]:
        shard = int(self.shard_of[pos])
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.shard_files[shard], os.O_RDONLY)
        jpg_off, jpg_size, lbl_off, lbl_size, ascii_label = (int(v) for v in self.index[pos])
        raw = os.pread(fd, lbl_size, lbl_off)
        label = int(raw.decode()) if ascii_label else struct.unpack("<i", raw)[0]
        return os.pread(fd, jpg_size, jpg_off), label

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    # ---- what the Python side feeds DALI per batch --------------------------------------------
    def _feed(self, positions: np.ndarray, epoch: int, b: int) -> list:
        """External-source inputs of one batch, each a DALI ``TensorListCPU``: jpegs (a uint8 1-D sample each),
        labels int32 (B, 1), the crop boxes float32 (B, V, 4) (per view roi_start (y, x) then roi_end (y, x), in
        pixels: ``crop_rois``), and with ``dali_photometric`` the 7 photometric parameters float32 (B, V, 7).

        Runs in the feed thread (``_run_pipeline``), batches ahead of DALI. The lists are built here, whole, so
        that what DALI does with them on the training thread is a hand-over: a Python list of per-sample arrays
        costs DALI a conversion per sample there (~4,600 of them per 256-image SwAV batch), and each input a call."""
        from nvidia.dali.backend import TensorListCPU

        views = self.spec.views
        n = len(positions)
        jpegs: list[np.ndarray] = []
        labels = np.empty((n, 1), dtype=np.int32)
        rois = np.empty((n, len(views), 2, 2), dtype=np.float32)  # sample, view, start | end, (y, x)
        bad = np.zeros(n, dtype=bool)
        for i, pos in enumerate(positions):
            pos = int(pos)
            jpeg, labels[i, 0] = self._read(pos)
            jpegs.append(np.frombuffer(jpeg, dtype=np.uint8))
            # The header is parsed here for the crop box; a damaged one is found before DALI sees the bytes.
            why = self._undecodable.get(pos)
            try:
                size = jpeg_size(jpeg)
            except Exception as e:  # noqa: BLE001 - PIL raises UnidentifiedImageError, SyntaxError...
                why = describe_error(e)
            if why is not None:
                self.bad_sample(b, int(self.sample_ids[pos]), self._where(pos), why)  # raises unless skipping
                bad[i] = True
                size = (1, 1)
            rng = random.Random(derive_seed(self.seed, epoch, int(self.sample_ids[pos]), STREAM_CROP))
            for v, (start, end) in enumerate(crop_rois(*size, views, rng)):
                rois[i, v] = start, end
        if bad.any():  # each bad sample's slot takes the bytes, label and boxes of the next good one
            stand_in = replacements(bad, f"{self._where(int(positions[0]))} and the rest of its batch")
            jpegs, labels, rois = [jpegs[j] for j in stand_in], labels[stand_in], rois[stand_in]
        out = [TensorListCPU(jpegs), TensorListCPU(labels), TensorListCPU(rois.reshape(n, len(views), 4))]
        if self.dali_photometric:
            photo = np.empty((n, len(views), 7), dtype=np.float32)
            for i, view in enumerate(views):
                gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch, self.rank, b, i, STREAM_PHOTO))
                p = sample_photometric_params(view, n, gen)
                jit = p["jitter"]
                eff = {k: torch.where(jit, p[k], torch.tensor(0.0 if k == "hue" else 1.0)) for k in JITTER_OPS}
                cols = [eff["brightness"], eff["contrast"], eff["saturation"], eff["hue"] * 360.0,
                        p["gray"].float(), torch.where(p["blur"], p["sigma"], torch.tensor(_NO_BLUR_SIGMA)),
                        p["solarize"].float()]
                photo[:, i] = torch.stack(cols, dim=1).numpy()
            out.append(TensorListCPU(photo))
        return out

    # ---- the pipeline ------------------------------------------------------------------------
    def build_pipeline(self, source):
        """A DALI pipeline over ``source`` (an iterable of ``_feed`` batches). Outputs: labels, then per
        view its crops: uint8 (B, S, S, 3) HWC, or with ``dali_photometric`` float32 normalized HWC."""
        from nvidia.dali import fn, pipeline_def, types

        views, mean, std = self.spec.views, self.spec.mean, self.spec.std
        n_photo = 7 if self.dali_photometric else 0

        # exec_dynamic (DALI 2.4's default, said here because the loader relies on it): outputs bound to the
        # consumer's stream by run(stream), and an output's memory kept while a torch tensor shares it.
        @pipeline_def(batch_size=self.batch_size, num_threads=self.num_threads, device_id=self.device_id,
                      prefetch_queue_depth=self.prefetch, seed=derive_seed(self.seed, self.rank) % (1 << 31),
                      exec_dynamic=True)
        def graph():
            # no_copy: DALI takes the feed's lists as they are (they are not touched again once handed over).
            inputs = fn.external_source(source=source, num_outputs=4 if n_photo else 3, batch=True, no_copy=True)
            jpegs, labels, rois = inputs[:3]
            image = fn.decoders.image(jpegs, device=self.decoder_device, output_type=types.RGB)  # the one decode
            outs = [labels]
            for i, view in enumerate(views):
                # Per sample, row i of its (V, 4) boxes: roi_start (y, x), then roi_end (y, x).
                crop = fn.resize(image, size=[view.size, view.size], roi_start=rois[i, 0:2], roi_end=rois[i, 2:4],
                                 interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.UINT8)
                if n_photo:
                    params = [inputs[3][i, k] for k in range(n_photo)]
                    crop = _dali_photometric(fn, types, crop, view, params, mean, std)
                outs.append(crop)
            return tuple(outs)

        pipe = graph()
        pipe.build()
        return pipe

    def _consumer_stream(self):
        """The CUDA stream of the thread that consumes the batches (the training step's), or None on CPU."""
        return torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

    def _to_torch(self, out, stream=None) -> torch.Tensor:
        """A dense DALI TensorList (CPU or GPU) -> a torch tensor on the loader's device.

        A GPU list is copied by ``feed_ndarray`` into device memory, on ``stream`` (the consumer's: the one DALI's
        outputs are bound to). A CPU list (the labels of a GPU pipeline, everything of a CPU one) is not copied on
        the host: the torch tensor shares its memory through DLPack, which holds the list (DALI's dynamic
        executor, the default, keeps an output's memory for as long as it is referenced), then moves to the
        device. A CPU list must never go through ``feed_ndarray``: it would memcpy by the host into a device
        pointer. Both kinds of list have ``as_cpu``, so the test is on the type."""
        from nvidia.dali.backend import TensorListGPU

        if isinstance(out, TensorListGPU):
            from nvidia.dali.plugin.pytorch import feed_ndarray

            t = out.as_tensor()
            dst = torch.empty(t.shape(), dtype=_torch_dtype(t.dtype), device=self.device)
            feed_ndarray(t, dst, cuda_stream=stream)
            return dst
        return torch.from_dlpack(out.as_tensor()).to(self.device, non_blocking=True)

    def _batch(self, outs, stream, epoch: int, b: int) -> Batch:
        """The Batch of one run's outputs (labels, then each view's uint8 (B, S, S, 3) crops)."""
        labels = self._to_torch(outs[0], stream).reshape(-1).long()
        # (B, S, S, 3) -> (B, 3, S, S) channels-last view, no copy
        crops = [self._to_torch(o, stream).permute(0, 3, 1, 2) for o in outs[1:]]
        views = ([c.contiguous(memory_format=self.memory_format) for c in crops] if self.dali_photometric
                 else self.photometric(crops, epoch, b))
        return Batch(views, labels)

    def _locate_undecodable(self, positions: np.ndarray, error: Exception) -> bool:
        """After DALI failed on a batch: decode its samples with PIL to find those that do not decode; they are
        remembered (``_feed`` replaces them from now on). Returns whether any was found."""
        found = False
        for pos in positions:
            pos = int(pos)
            if pos in self._undecodable:
                continue
            jpeg, _ = self._read(pos)
            why = _full_decode_error(jpeg)
            if why is not None:
                self._undecodable[pos] = f"{why}; DALI's decoder failed on its batch"
                found = True
        return found

    def _iter_epoch(self, epoch: int, start: int) -> Iterator[Batch]:
        plan = self.batch_positions(epoch)
        b = start
        while b < len(plan):
            try:
                yield from self._run_pipeline(plan, epoch, b)
                return
            except DatasetFormatError:
                raise
            except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError with its decoder's message
                failed = self._running
                if failed is None:  # the pipeline did not build (nvJPEG init, driver, device_id): its own error
                    raise
                # The failure surfaces at the batch being run or, prefetched, a few before the one that failed:
                # look in those, then run a fresh pipeline from the batch being run, with the culprits replaced.
                ahead = np.concatenate(plan[failed : failed + self.prefetch + 1])
                if not self._locate_undecodable(ahead, e):
                    raise
                b = failed

    def _run_pipeline(self, plan: list[np.ndarray], epoch: int, start: int) -> Iterator[Batch]:
        """Batches ``start, start + 1, ...`` of the epoch's ``plan`` from a fresh pipeline (the source is this
        epoch's plan from the resume point). ``self._running`` names the batch being run, None until the
        pipeline is built.

        The feed (two preads, a JPEG header parse and every view's crop box per image: ~18 ms of Python per
        256-image SwAV batch) runs in a thread of ours, ``prefetch`` batches ahead: DALI's external source is not
        parallel, so it would call the feed inside ``pipe.run()`` on the training thread. On CUDA the pipeline
        runs on the consumer's stream: ``run(stream)`` returns outputs bound to it without the host waiting for
        them (``run()`` without a stream synchronizes the host), and they are copied on that same stream."""
        self._running = None
        batches = plan[start:]
        feeds = (self._feed(pos, epoch, b) for b, pos in enumerate(batches, start=start))
        source = prefetch(feeds, torch.device("cpu"), depth=max(2, self.prefetch))
        pipe = None
        try:
            pipe = self.build_pipeline(source)
            stream = self._consumer_stream()
            for b in range(start, start + len(batches)):
                self._running = b
                # One expression: no local holds DALI's outputs or the batch while this generator is suspended.
                yield self._batch(pipe.run() if stream is None else pipe.run(stream), stream, epoch, b)
        finally:
            source.close()  # stops the feed thread
            del pipe


def _full_decode_error(jpeg: bytes) -> str | None:
    """Why PIL cannot decode ``jpeg`` completely (truncated or corrupt data included), or None."""
    import warnings

    try:
        with warnings.catch_warnings(), Image.open(io.BytesIO(jpeg)) as img:
            warnings.simplefilter("error")  # PIL only warns about some corrupt data
            img.load()
    except Exception as e:  # noqa: BLE001 - any failure is the same data error
        return describe_error(e)
    return None


def _torch_dtype(dali_dtype) -> torch.dtype:
    from nvidia.dali import types

    return {types.DALIDataType.UINT8: torch.uint8, types.DALIDataType.FLOAT: torch.float32,
            types.DALIDataType.INT32: torch.int32}[dali_dtype]
