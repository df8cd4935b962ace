"""Data pipelines: a converted dataset -> multi-crop batches on the training device.

``build_loader(path, spec, batch_size, ...)`` returns a :class:`Loader` yielding :class:`Batch`.
Backends (torch here; dali and ffcv in their own modules, imported only when chosen) differ only in
how they decode and crop; the :class:`Loader` base holds what every backend must share: which
samples each rank reads, their order per epoch, the resume position, and the photometric stage.

This package never imports fastssl: data knows no model.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from pipelines.formats import DatasetFormatError
from pipelines.photometric import apply_photometric
from pipelines.spec import PRESETS, MultiCropSpec, ViewSpec

__all__ = ["PRESETS", "Batch", "Loader", "MultiCropSpec", "ViewSpec", "build_loader", "derive_seed", "replacements",
           "resolve_device"]


class Batch(NamedTuple):
    """One step's data. views[i]: float32 (B, 3, S_i, S_i), normalized, in the loader's memory_format (channels-last
    by default), on the device, in spec order; labels: int64 (B,) on the device."""

    views: list[torch.Tensor]
    labels: torch.Tensor


# Independent random streams derived from the same (seed, epoch, ...) keys. STREAM_WORKERS seeds a torch
# DataLoader's own generator: without one, each new DataLoader iterator draws its workers' base seed from the
# global torch RNG, which a resumed run (a new iterator mid-epoch) would then leave in another state.
STREAM_ORDER, STREAM_CROP, STREAM_PHOTO, STREAM_WORKERS = 1, 2, 3, 4


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def usable_cpus() -> int:
    """The cores this process may run on: its affinity mask where the OS keeps one, else the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpus_per_local_rank() -> int:
    """This rank's share of :func:`usable_cpus`: divided among torchrun's ranks on this host (LOCAL_WORLD_SIZE);
    0 when there are more ranks than cores."""
    return usable_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` with its index made explicit: a bare "cuda" becomes the current CUDA device (``cuda:N``, N the
    index ``torch.cuda.set_device`` chose: the local rank under torchrun), or ``cuda:0`` where CUDA is not
    initialised here (a forced device string on a CPU machine).

    Every device that enters pipelines goes through this once: ``torch.device("cuda", 0) != torch.device("cuda")``,
    so a comparison with an output's device, or DALI's ``device_id``, would otherwise go wrong on a bare "cuda"
    (or pick GPU 0 on a second rank).
    """
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return dev


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (seed, epoch, rank, ...); nearby keys give unrelated streams.

    A splitmix64 chain: about a microsecond, cheap enough to seed every sample's crops.
    """
    h = 0
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return h >> 1


class Loader:
    """Base of every backend: the rank's samples, the epoch order, the resume position.

    Sharding: the split's samples, shard by shard, are cut into ``world_size`` contiguous ranges of
    ``total // world_size`` or one more samples; rank r reads range r. Every sample belongs to exactly one
    rank whatever the shard count and sizes (3 shards on 2 ranks: each rank reads one and a half shards),
    and a rank reads whole shards but for at most two at the ends of its range. Each rank then takes the
    same number of samples per epoch, ``total // world_size`` (when shuffling a random subset of its own,
    so a rank with one sample more leaves out a different one each epoch), so every rank yields
    ``len(self)`` batches and DDP never waits on a rank that ran out; with ``drop_last`` a rank leaves
    out at most one batch's worth of its samples per epoch.

    Order: a pure function of (seed, epoch, rank): a permutation of the rank's samples when
    ``shuffle``, stored order otherwise. Backends make their random crops and photometric
    decisions pure functions of the same keys (never of the number of decode workers), so a
    resumed epoch repeats the same batches.

    Position: ``state_dict()`` is ``{"epoch": e, "batch": b}``, b the batches of epoch e consumed
    (the batch being yielded counts as consumed). ``load_state_dict`` makes the next iteration
    start at batch b of epoch e; ``set_epoch(e)`` starts epoch e at batch 0 except right after a
    resume into e. A completed iteration moves on to the next epoch by itself.

    Subset: ``subset`` (global sample ids of the split) restricts the loader to those samples, as if the split
    held only them (the 1 % / 10 % labelled subsets of semi-supervised fine-tuning); ranks cut the sorted ids
    into contiguous ranges the same way.

    Bad samples: a sample whose bytes do not decode (damaged after conversion) raises a
    ``DatasetFormatError`` naming its file and sample id; with ``skip_bad_samples`` it is instead replaced
    in its batch by the next good sample of that batch (cyclically), so the batch keeps its shape and what
    a batch holds stays a pure function of the data, the seed and the epoch (a resumed run replaces alike).
    ``bad_samples`` maps the global id of each bad sample met so far to a message naming its file; an
    entry appears when the batch holding the sample is yielded, not earlier, whatever the backend's
    read-ahead. Every backend checks each sample at the point it decodes it: whole-image decoding with PIL
    (torch workers, RAM cache), the header when the boxes are drawn and a failed batch decode retried image
    by image (torch decode="device"), the header before the bytes go to DALI, and the decoder's status per
    image (FFCV).

    Layout: views come in ``memory_format`` (channels-last unless set otherwise, e.g. to
    ``torch.contiguous_format`` for a model that runs NCHW faster).

    Subclasses implement ``_iter_epoch(epoch, start)`` yielding batches ``start, start + 1, ...``.
    """

    def __init__(
        self,
        counts: Sequence[int],
        spec: MultiCropSpec,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        skip_bad_samples: bool = False,
        subset: Sequence[int] | np.ndarray | None = None,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size (per rank) must be a positive int, got {batch_size!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank!r}")
        self.spec, self.batch_size = spec, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, int(seed)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.device = resolve_device(device)
        self.counts = [int(c) for c in counts]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        ids = np.arange(int(self.offsets[-1]), dtype=np.int64) if subset is None else self._subset(subset)
        total = len(ids)

        # Contiguous ranges, not whole shards per rank: with a shard count that world_size does not divide (or
        # shards of unequal sizes) whole shards leave the ranks unequal, and equal batch counts then meant
        # dropping the surplus of the larger ranks every epoch.
        lo, hi = rank * total // world_size, (rank + 1) * total // world_size
        self.shard_mode = "ranges"
        self.sample_ids = ids[lo:hi]
        holders = np.unique(np.searchsorted(self.offsets, self.sample_ids, side="right") - 1)
        self.shards = [int(s) for s in holders]
        per_rank = total // world_size  # the smallest range
        self.samples_per_epoch = per_rank
        n_batches = per_rank // batch_size if self.drop_last else math.ceil(per_rank / batch_size)
        if n_batches == 0:
            raise ValueError(
                f"batch_size {batch_size} per rank leaves no batch: each of the {world_size} rank(s) "
                f"gets {per_rank} samples per epoch (split of {total}); lower batch_size or world_size"
            )
        self._n_batches = n_batches
        self.skip_bad_samples = bool(skip_bad_samples)
        # The views' layout: the model's (the trainer sets it once it has chosen; channels-last suits GPUs' tensor
        # cores, while some CPUs' kernels run NCHW faster: fastssl.engine.layout measures).
        self.memory_format = torch.channels_last
        self.bad_samples: dict[int, str] = {}  # global sample id -> where it is and why it is bad
        self._batch_bad: dict[int, list[tuple[int, str]]] = {}  # batch of the running epoch -> its bad samples
        self._pos = (0, 0)  # (epoch, next batch) of the live stream
        self._resume_pending = False

    def _subset(self, subset: Sequence[int] | np.ndarray) -> np.ndarray:
        """The split's samples to read: sorted unique int64 ids, each in [0, split size)."""
        ids = np.unique(np.asarray(subset, dtype=np.int64))
        size = int(self.offsets[-1])
        if len(ids) and (ids[0] < 0 or ids[-1] >= size):
            bad = int(ids[0] if ids[0] < 0 else ids[-1])
            raise ValueError(f"subset: sample id {bad} outside the split's {size} samples")
        return ids

    # ---- plan -------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch, identical on every rank."""
        return self._n_batches

    def epoch_positions(self, epoch: int) -> np.ndarray:
        """Indices into ``self.sample_ids`` this rank reads in ``epoch``, in order: (samples_per_epoch,) int64."""
        n = len(self.sample_ids)
        if self.shuffle:
            rng = np.random.default_rng(derive_seed(self.seed, epoch, self.rank, STREAM_ORDER))
            return rng.permutation(n)[: self.samples_per_epoch]
        return np.arange(self.samples_per_epoch, dtype=np.int64)

    def epoch_sample_ids(self, epoch: int) -> np.ndarray:
        """Global sample ids (position in the split, shard by shard) this rank reads in ``epoch``, in order."""
        return self.sample_ids[self.epoch_positions(epoch)]

    def batch_positions(self, epoch: int) -> list[np.ndarray]:
        """``epoch_positions`` cut into this epoch's batches (the last one partial unless drop_last)."""
        pos = self.epoch_positions(epoch)[: self._n_batches * self.batch_size]
        return [pos[i : i + self.batch_size] for i in range(0, len(pos), self.batch_size)]

    # ---- position ---------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._pos[0]

    def set_epoch(self, epoch: int) -> None:
        """Next iteration runs ``epoch`` from batch 0 (or from the resumed batch after load_state_dict)."""
        if not (self._resume_pending and self._pos[0] == epoch):
            self._pos = (int(epoch), 0)
            self._resume_pending = False

    def state_dict(self) -> dict:
        epoch, batch = self._pos
        if batch >= len(self):
            epoch, batch = epoch + 1, 0
        return {"epoch": epoch, "batch": batch}

    def load_state_dict(self, state: dict) -> None:
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if not 0 <= batch <= len(self):
            raise ValueError(f"state batch {batch} outside this loader's epoch of {len(self)} batches")
        self._pos = (epoch, batch)
        self._resume_pending = True

    def __iter__(self) -> Iterator[Batch]:
        epoch, start = self._pos
        if start >= len(self):
            epoch, start = epoch + 1, 0
        self._resume_pending = False
        self._batch_bad = {}
        b = start
        for batch in self._iter_epoch(epoch, start):
            for sample_id, message in self._batch_bad.pop(b, ()):
                self.bad_samples.setdefault(sample_id, message)
            b += 1
            self._pos = (epoch, b)  # before yielding: the batch in the caller's hands counts as consumed
            # Handed over with no reference left here while suspended: the batch (~0.5 GB of views for 256 SwAV
            # images) is freed when the caller drops it, not when the next one is asked for.
            handed = [batch]
            del batch
            yield handed.pop()
        self._pos = (epoch + 1, 0)

    def _iter_epoch(self, epoch: int, start: int) -> Iterator[Batch]:
        raise NotImplementedError

    # ---- bad samples ------------------------------------------------------------------------------
    def bad_sample(self, batch: int, sample_id: int, where: str, reason: str) -> None:
        """A backend met a sample that does not decode in ``batch`` of the running epoch (any thread).

        Raises ``DatasetFormatError`` naming ``where`` (its file and sample) unless ``skip_bad_samples``; else
        records it, for ``bad_samples`` once that batch is yielded. The backend then replaces the sample
        (``replacements``)."""
        if not self.skip_bad_samples:
            raise undecodable(where, reason)
        self._batch_bad.setdefault(batch, []).append((int(sample_id), f"{where} does not decode ({reason})"))


    # ---- shared photometric stage -----------------------------------------------------------
    def photometric(self, crops: Sequence[torch.Tensor], epoch: int, batch: int) -> list[torch.Tensor]:
        """Apply each view's photometric stage to its crops on the device, seeded by (seed, epoch, rank, batch).

        crops[i]: (B, 3 or 1, S, S) uint8, or float in [0, 1] that may be overwritten.
        Returns float32 (B, 3, S, S) normalized views in ``self.memory_format``.
        """
        views = []
        for i, (view, x) in enumerate(zip(self.spec.views, crops, strict=True)):
            gen = torch.Generator().manual_seed(derive_seed(self.seed, epoch, self.rank, batch, i, STREAM_PHOTO))
            views.append(apply_photometric(x, view, self.spec.mean, self.spec.std, gen, inplace=True,
                                           memory_format=self.memory_format))
        return views


def undecodable(where: str, reason: str) -> DatasetFormatError:
    """The error for a sample whose bytes do not decode, ``where`` naming its file and sample (every backend's)."""
    return DatasetFormatError(f"{where} does not decode ({reason}); the file was damaged after conversion: rerun "
                              "fastssl-convert (training skips such samples up to data.max_bad_samples)")


def replacements(bad: np.ndarray, what: str = "a batch") -> np.ndarray:
    """For a batch with bad slots ``bad`` (bool (B,)): int64 (B,), slot i's own index when it is good, else the
    next good slot after it (cyclically): the sample that stands in for it. A batch of bad samples only is an
    error (``what`` names the batch)."""
    good = np.flatnonzero(~np.asarray(bad, dtype=bool))
    if len(good) == 0:
        raise DatasetFormatError(f"{what}: every one of its {len(bad)} samples fails to decode; the data is "
                                 "damaged: rerun fastssl-convert")
    nxt = np.searchsorted(good, np.arange(len(bad)))
    return good[np.where(nxt == len(good), 0, nxt)]


# ---- background producer shared by the backends -------------------------------------------------
_DONE = object()


def prefetch(items: Iterator, device: torch.device, depth: int = 2) -> Iterator:
    """Run the iterator ``items`` in a background thread, ``depth`` items ahead of the consumer.

    On CUDA the thread works on its own stream: the consumer's stream waits for an item's work (an event) and
    its tensors are recorded on the consumer's stream, so the caching allocator does not reuse their memory
    early. An exception in the thread is raised in the consumer; closing the consumer early stops the thread.
    """
    cuda = device.type == "cuda"
    stream = torch.cuda.Stream(device) if cuda else None
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                for item in items:
                    event = None
                    if cuda:
                        event = torch.cuda.Event()
                        event.record(stream)
                    if not put((item, event)):
                        break
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            put((e, _DONE))
            return
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()
        put((_DONE, None))

    thread = threading.Thread(target=work, name="fastssl-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            got = list(q.get())  # [item, event]
            if got[1] is _DONE:
                raise got[0]
            if got[0] is _DONE:
                return
            if cuda:
                _hand_to_stream(got[0], got[1], torch.cuda.current_stream(device))
            yield got.pop(0)  # no reference kept while suspended: the consumer's drop frees the item
    finally:
        stop.set()
        thread.join()


def _hand_to_stream(item, event, stream) -> None:
    """The consumer's ``stream`` waits for ``event`` (the item's work), and the item's tensors are recorded on it."""
    stream.wait_event(event)
    for t in _tensors(item):
        t.record_stream(stream)


def _tensors(item) -> Iterator[torch.Tensor]:
    if isinstance(item, torch.Tensor):
        yield item
    elif isinstance(item, (list, tuple)):
        for x in item:
            yield from _tensors(x)


# name -> (module, class, package it needs, how to install it). Each backend class takes
# (path, spec, batch_size, *, split, rank, world_size, device, seed, shuffle, drop_last, num_workers,
# **options) and subclasses Loader.
_BACKENDS = {
    "torch": ("pipelines.torch_loader", "TorchLoader", None, None),
    "dali": ("pipelines.dali_loader", "DaliLoader", "nvidia.dali",
             "pip install 'fastssl[dali-cu13]' (CUDA 13) or 'fastssl[dali-cu12]' (CUDA 12)"),
    "ffcv": ("pipelines.ffcv_loader", "FfcvLoader", "ffcv",
             "pip install -e '.[ffcv]' (its C library needs the apt packages pkg-config libturbojpeg0-dev "
             "libopencv-dev), and convert the dataset with `fastssl-convert --formats wds,ffcv`"),
}


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        # Best available: DALI decodes on the GPU; without CUDA the torch backend is the fast path.
        # Never ffcv: it reads .beton files that only an explicit `--formats wds,ffcv` writes, and on
        # small same-size images (Fashion-MNIST, CIFAR) the torch backend's RAM cache beats it.
        if device.type == "cuda" and _importable("nvidia.dali") and _importable("pipelines.dali_loader"):
            return "dali"
        return "torch"
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {sorted(_BACKENDS) + ['auto']}, got {backend!r}")
    module, _, package, install = _BACKENDS[backend]
    if package is not None and not _importable(package):
        raise ImportError(f"backend {backend!r} needs the {package!r} package: {install}")
    if not _importable(module):
        raise ImportError(f"backend {backend!r}: module {module} is not in this checkout")
    return backend


def build_loader(
    path: str | os.PathLike,
    spec: MultiCropSpec | str,
    batch_size: int,
    *,
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    seed: int = 0,
    backend: str = "auto",
    num_workers: int | None = None,
    drop_last: bool | None = None,
    shuffle: bool | None = None,
    cache: str = "auto",
    decode: str = "host",
    augment: bool | None = None,
    progress: bool = True,
    skip_bad_samples: bool = False,
    subset: Sequence[int] | np.ndarray | None = None,
) -> Loader:
    """A loader over ``split`` of the converted dataset at ``path`` for this rank.

    spec: a MultiCropSpec or a preset name (``PRESETS``; 224/96 px). batch_size: per rank.
    augment: default True for the train split; False replaces the spec by its deterministic eval
      view (largest centered square resized to the first view's size), same normalization.
    shuffle / drop_last: default True when training with augmentation, False otherwise.
    backend: "torch", "dali", "ffcv" or "auto" (dali on CUDA when installed, else torch).
    num_workers: decode processes (backend-specific default). cache: torch backend only,
      "auto" | "ram" | "none" (see pipelines.torch_loader). decode: torch backend only, "host" (PIL in the
      workers) or "device" (the workers read bytes; the batch is decoded on the device: nvJPEG on CUDA).
    progress: a progress bar for slow set-up work (the torch backend's RAM-cache fill); pass False on
      every rank but one, and for quiet runs.
    skip_bad_samples: replace a sample that does not decode by the next one of its batch and record it in
      ``loader.bad_samples`` (training) instead of raising ``DatasetFormatError`` (see ``Loader``).
    subset: read only these samples of the split (global sample ids: the position in the split, shard by
      shard), e.g. a labelled subset; None reads the whole split.
    The loader yields ``Batch``; see ``Loader`` for sharding, order and resume.
    """
    if isinstance(spec, str):
        spec = MultiCropSpec.preset(spec)
    if not isinstance(spec, MultiCropSpec):
        raise ValueError(f"spec must be a MultiCropSpec or a preset name, got {type(spec).__name__}")
    augment = (split == "train") if augment is None else bool(augment)
    if not augment and not spec.is_deterministic:
        spec = spec.eval_spec()
    training = augment and not spec.is_deterministic
    shuffle = training if shuffle is None else shuffle
    drop_last = training if drop_last is None else drop_last
    device = resolve_device(device)
    name = _resolve_backend(backend, device)
    module, cls_name, _, _ = _BACKENDS[name]
    cls = getattr(importlib.import_module(module), cls_name)
    options = {"cache": "none" if decode == "device" and cache == "auto" else cache, "decode": decode,
               "progress": progress} if name == "torch" else {}
    if name != "torch" and cache not in ("auto", "none"):
        raise ValueError(f"cache={cache!r} is a torch-backend option; backend {name!r} has its own caching")
    if name != "torch" and decode != "host":
        raise ValueError(f"decode={decode!r} is a torch-backend option; backend {name!r} decodes its own way "
                         "(dali: nvJPEG on the GPU)")
    return cls(path, spec, batch_size, split=split, rank=rank, world_size=world_size, device=device, seed=seed,
               shuffle=shuffle, drop_last=drop_last, num_workers=num_workers, skip_bad_samples=skip_bad_samples,
               subset=subset, **options)
