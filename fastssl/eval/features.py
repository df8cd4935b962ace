"""Frozen-backbone features of a converted dataset's splits, for the offline kNN and linear evaluations.

Each image goes through the deterministic eval view (largest centred square, resized to the size the run
trained on, the run's normalization): the same view as the trainer's kNN monitor, so ``fastssl-knn`` with
the run's k, T and precision reproduces the run's ``knn.json``.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from fastssl.engine.knn import extract_features
from pipelines import MultiCropSpec, build_loader
from pipelines.formats import load_manifest
from pipelines.progress import progress_bar


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    return torch.device(name)


def dataset_features(backbone: nn.Module, meta: dict, data: str | os.PathLike, *, batch_size: int = 256,
                     device: torch.device | str = "cpu", precision: str = "fp32", num_workers: int | None = None,
                     image_size: int | None = None, max_train: int = 0, normalize: bool = True,
                     progress: bool = True) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """{"train": (N, D) fp32, (N,) int64), "val": ...} on ``device``, and the class names.

    ``max_train`` > 0 keeps only the first ``max_train`` train images (stored order). ``normalize``: L2-normalize
    the features (kNN) or keep them raw (linear).
    """
    manifest = load_manifest(data)
    missing = [s for s in ("train", "val") if not manifest["splits"].get(s, {}).get("count")]
    if missing:
        raise ValueError(f"{data}: no {' or '.join(missing)} images; the evaluation needs both splits (convert a "
                         "tree with train/ and val/ folders)")
    spec = MultiCropSpec.preset("eval", global_size=image_size or meta["image_size"], mean=tuple(meta["mean"]),
                                std=tuple(meta["std"]))
    device = torch.device(device)
    backbone = backbone.to(device)
    out = {}
    for split in ("train", "val"):
        loader = build_loader(data, spec, batch_size, split=split, device=device, backend="torch",
                              num_workers=num_workers, shuffle=False, drop_last=False, augment=False,
                              progress=progress)
        total = manifest["splits"][split]["count"]
        limit = max_train if split == "train" and 0 < max_train < total else 0
        with progress_bar(total=limit or total, unit="img", desc=f"features {split}", disable=not progress,
                          dynamic_ncols=True) as bar:
            feats, labels = extract_features(backbone, _first(loader, limit), precision, normalize=normalize,
                                             progress=bar.update)
        if limit:
            feats, labels = feats[:limit], labels[:limit]
        out[split] = (feats, labels)
    return out, list(manifest["classes"])


def _first(loader, max_images: int):
    """The batches of ``loader`` until ``max_images`` images are out (all when 0)."""
    seen = 0
    for batch in loader:
        yield batch
        seen += batch.labels.shape[0]
        if 0 < max_images <= seen:
            return


def add_input_args(parser) -> None:
    """The arguments every offline evaluation shares: what to evaluate, on which data, how."""
    parser.add_argument("checkpoint", metavar="CKPT_OR_EXPORT",
                        help="a training checkpoint (run/checkpoints/last.pt), a fastssl-export folder, or its "
                             "backbone.safetensors / backbone.pth")
    parser.add_argument("--data", required=True, metavar="DIR", help="a converted dataset with train and val splits")
    parser.add_argument("--branch", choices=("online", "momentum"), default=None,
                        help="for a checkpoint: the trained backbone or the method's momentum copy (BYOL target, "
                             "MoCo key encoder, DINO teacher); default online. An export holds the branch it "
                             "was made from: naming the other one is an error")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward (default 256)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None,
                        help="autocast of the forward; default: the run's train.precision")
    parser.add_argument("--image-size", type=int, default=None, help="default: the run's data.global_size")
    parser.add_argument("--num-workers", type=int, default=None, help="decode processes (default: per core)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU intra-op threads (0: torch's default; on a CPU several single-thread ranks under "
                             "torchrun are often faster than one process with several threads)")
    parser.add_argument("--out", default=None, metavar="JSON",
                        help="result file; default: <folder>/<name>.json beside the input")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def apply_threads(threads: int) -> None:
    """``--threads``: set torch's CPU intra-op threads (0 leaves torch's default)."""
    if threads < 0:
        raise ValueError(f"--threads {threads}: must be >= 0")
    if threads:
        torch.set_num_threads(threads)


def default_out(source: str | os.PathLike, name: str) -> str:
    """``EXPORT_DIR/<name>.json`` for a folder, ``<file stem>.<name>.json`` beside a file."""
    source = os.fspath(source)
    if os.path.isdir(source):
        return os.path.join(source, f"{name}.json")
    stem = os.path.splitext(os.path.basename(source))[0]
    return os.path.join(os.path.dirname(source) or ".", f"{stem}.{name}.json")


def features_from_args(args, **extract) -> tuple[dict, list, dict]:
    """The shared first half of fastssl-knn / fastssl-linear: the backbone named by ``args.checkpoint``
    (and ``args.branch``), then the features of ``args.data``'s splits (``extract``: extra options of
    :func:`dataset_features`). Returns ``(feats, classes, info)`` where ``info`` describes the run for the
    JSON report. Raises ExportError / ValueError / OSError / ImportError with a message for the user."""
    from fastssl.eval.weights import load_backbone

    apply_threads(args.threads)
    backbone, meta = load_backbone(args.checkpoint, args.branch)
    precision = args.precision or meta.get("precision", "fp32")
    feats, classes = dataset_features(
        backbone, meta, args.data, batch_size=args.batch_size, device=pick_device(args.device), precision=precision,
        num_workers=args.num_workers, image_size=args.image_size, progress=not args.no_progress, **extract)
    info = {"precision": precision, "image_size": args.image_size or meta["image_size"],
            "checkpoint": str(args.checkpoint), "branch": meta.get("branch", args.branch or "online"),
            "step": meta.get("step"), "data": str(args.data)}
    return feats, classes, info
