"""A trained backbone out of a checkpoint, to files and back.

An export folder (``fastssl-export CKPT OUT``) holds:

* ``backbone.safetensors``: the backbone's parameters and buffers (every backbone), with the description
  below as the safetensors metadata entry ``fastssl`` (JSON);
* ``backbone.pth`` (ResNets only): the same tensors as a plain torch state_dict under torchvision's names;
* ``export.json``: the description: backbone name, width, stem, feature width, the image size and
  normalization the run trained with, the source checkpoint and step, and how to load the ``.pth``.

The ResNet state holds no ``fc``: SSL trains no classifier (our ResNet's fc is an Identity). So
``torchvision.models.resnetXX()`` with ``model.fc = nn.Identity()`` loads ``backbone.pth`` with
``strict=True``, which then covers every parameter and buffer of the trunk (conv1, bn1, layer1-4 with the
BatchNorm running statistics and ``num_batches_tracked``); a stock model loaded with ``strict=False``
reports exactly ``fc.weight`` and ``fc.bias`` missing and nothing unexpected. That holds at width 64 with
the standard stem; the small-image stem also needs ``model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)``
and ``model.maxpool = nn.Identity()``, and other widths have no torchvision constructor.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch
from torch import nn

from fastssl.engine.checkpoint import load_checkpoint
from fastssl.models import build_backbone
from pipelines.formats import atomic_write_bytes
from pipelines.spec import MultiCropSpec

EXPORT_FORMAT = "fastssl-backbone"
EXPORT_VERSION = 1
SAFETENSORS_NAME, PTH_NAME, META_NAME = "backbone.safetensors", "backbone.pth", "export.json"
# The momentum / EMA copy of the backbone, by method (BYOL target, MoCo key/momentum, DINO teacher).
MOMENTUM_PREFIXES = ("target_backbone.", "teacher_backbone.", "key_backbone.", "momentum_backbone.")


class ExportError(ValueError):
    """A checkpoint or export that cannot be read or exported; the message names the file and what to do."""


def is_resnet(name: str) -> bool:
    return name.startswith("resnet")


def checkpoint_backbone(path: str | os.PathLike, branch: str = "online") -> tuple[dict[str, torch.Tensor], dict]:
    """The backbone of a training checkpoint: (state_dict with contiguous tensors, description).

    branch: ``online`` (the trained backbone) or ``momentum`` (the method's EMA copy: BYOL's target, MoCo's
    key encoder, DINO's teacher).
    """
    try:
        ckpt = load_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
        raise ExportError(str(e)) from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) and isinstance(ckpt.get("config"), dict)):
        raise ExportError(f"{path}: not a fastssl training checkpoint (it needs 'model' and 'config' entries; "
                          "pass checkpoints/last.pt of a run folder)")
    weights, config = ckpt["model"], ckpt["config"]
    if branch == "online":
        prefix = "backbone."
    elif branch == "momentum":
        found = [p for p in MOMENTUM_PREFIXES if any(k.startswith(p) for k in weights)]
        if not found:
            raise ExportError(f"{path}: method {config.get('method', {}).get('name')!r} keeps no momentum copy of "
                              "the backbone; use --branch online")
        prefix = found[0]
    else:
        raise ExportError(f"branch={branch!r}: choose online or momentum")
    state = {k[len(prefix):]: v.detach().contiguous() for k, v in weights.items() if k.startswith(prefix)}
    if not state:
        raise ExportError(f"{path}: no '{prefix}*' weights in the checkpoint's model")
    model, data = config.get("model", {}), config.get("data", {})
    name = model.get("backbone")
    if not isinstance(name, str):
        raise ExportError(f"{path}: the checkpoint's config names no model.backbone")
    spec = MultiCropSpec.preset("eval", global_size=int(data.get("global_size", 224)),
                                mean=tuple(data["mean"]) if data.get("mean") else None,
                                std=tuple(data["std"]) if data.get("std") else None)
    meta = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION,
        "backbone": name, "width": int(model.get("width", 64)), "small_images": bool(model.get("small_images")),
        "image_size": spec.views[0].size, "mean": list(spec.mean), "std": list(spec.std),
        "precision": config.get("train", {}).get("precision", "fp32"),
        "method": config.get("method", {}).get("name"), "branch": branch,
        "step": int(ckpt.get("step", 0)), "epoch": int(ckpt.get("epoch", 0)), "source": str(path),
    }
    module = build_from_meta(meta, f"{path}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{path}: the '{prefix}*' weights do not fit model.backbone={name} "
                          f"(width {meta['width']}): {str(e).splitlines()[0]}") from None
    meta["feat_dim"] = int(module.feat_dim)
    meta["torchvision"] = name if is_resnet(name) and meta["width"] == 64 else None
    return state, meta


def build_from_meta(meta: dict, where: str = "") -> nn.Module:
    """An untrained backbone of the described architecture."""
    try:
        return build_backbone(meta["backbone"], int(meta.get("width", 64)), bool(meta.get("small_images")))
    except (KeyError, ValueError) as e:
        raise ExportError(f"{where}: cannot build the backbone it describes ({e})") from None


def load_note(meta: dict) -> str:
    name = meta["backbone"]
    if not is_resnet(name):
        return f"{name} has no torchvision twin: load backbone.safetensors into fastssl.models.build_backbone"
    if meta["width"] != 64:
        return (f"width {meta['width']}: torchvision's constructor has no stem width; the keys are torchvision's, "
                f"load into fastssl.models.build_backbone({name!r}, width={meta['width']}, "
                f"small_images={meta['small_images']})")
    steps = [f"m = torchvision.models.{name}()", "m.fc = torch.nn.Identity()"]
    if meta["small_images"]:
        steps += ["m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)", "m.maxpool = torch.nn.Identity()"]
    steps.append("m.load_state_dict(torch.load('backbone.pth'), strict=True)")
    return "; ".join(steps)


def write_export(state: dict[str, torch.Tensor], meta: dict, out_dir: str | os.PathLike,
                 formats: tuple[str, ...] = ("safetensors", "pth")) -> list[Path]:
    """Write the export folder (see the module docstring); returns the files written."""
    from safetensors.torch import save as safetensors_bytes

    unknown = set(formats) - {"safetensors", "pth"}
    if unknown or not formats:
        raise ExportError(f"formats {sorted(unknown) or '(none)'}: choose from safetensors, pth")
    if "pth" in formats and not is_resnet(meta["backbone"]):
        raise ExportError(f"model.backbone={meta['backbone']}: a torchvision-compatible .pth exists only for the "
                          "ResNets; export this backbone as safetensors only (--formats safetensors)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder; OUT is the export folder to create")
    out.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "files": [], "load": load_note(meta)}
    written = []
    if "safetensors" in formats:
        meta["files"].append(SAFETENSORS_NAME)
    if "pth" in formats:
        meta["files"].append(PTH_NAME)
    if "safetensors" in formats:
        blob = safetensors_bytes(state, metadata={"fastssl": json.dumps(meta)})
        atomic_write_bytes(out / SAFETENSORS_NAME, blob)
        written.append(out / SAFETENSORS_NAME)
    if "pth" in formats:
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(out / PTH_NAME, buf.getvalue())
        written.append(out / PTH_NAME)
    atomic_write_bytes(out / META_NAME, (json.dumps(meta, indent=2) + "\n").encode())
    written.append(out / META_NAME)
    return written


def read_backbone(path: str | os.PathLike, branch: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, description) from a training checkpoint, an export folder, its ``backbone.safetensors``, or
    its ``backbone.pth`` (described by the ``export.json`` beside it). branch: a checkpoint's ``online``
    (default) or ``momentum`` backbone; for an export, None or the branch it holds."""
    path = Path(path)
    if path.is_dir():
        if (path / SAFETENSORS_NAME).is_file():
            return read_backbone(path / SAFETENSORS_NAME, branch)
        if (path / PTH_NAME).is_file():
            return read_backbone(path / PTH_NAME, branch)
        raise ExportError(f"{path}: a folder without {SAFETENSORS_NAME} or {PTH_NAME}; pass a checkpoint file or "
                          "a folder written by fastssl-export")
    if not path.is_file():
        raise ExportError(f"{path}: no such checkpoint or export")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta_json = (f.metadata() or {}).get("fastssl")
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # truncated or not safetensors
            raise ExportError(f"{path}: cannot be read as safetensors ({type(e).__name__}: {e})") from None
        if meta_json is None:
            raise ExportError(f"{path}: no fastssl description in its metadata; it was not written by fastssl-export")
        return state, _export_of_branch(path, json.loads(meta_json), branch)
    if path.suffix == ".pth" and (path.parent / META_NAME).is_file():
        meta = json.loads((path.parent / META_NAME).read_text())
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ExportError(f"{path}: cannot be read as a state_dict ({type(e).__name__}: {e})") from None
        return state, _export_of_branch(path, meta, branch)
    return checkpoint_backbone(path, branch or "online")


def _export_of_branch(path: Path, meta: dict, branch: str | None) -> dict:
    """An export holds one branch: asking it for the other one is an error, not a silent substitution."""
    exported = meta.get("branch", "online")
    if branch is not None and branch != exported:
        raise ExportError(f"{path}: an export of the {exported} branch; --branch {branch} needs the training "
                          f"checkpoint (or an export made with fastssl-export --branch {branch})")
    return meta


def load_backbone(path: str | os.PathLike, branch: str | None = None) -> tuple[nn.Module, dict]:
    """The trained backbone module (CPU, eval mode) and its description, from anything :func:`read_backbone` reads."""
    state, meta = read_backbone(path, branch)
    if meta.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path}: not a fastssl backbone export (format {meta.get('format')!r})")
    module = build_from_meta(meta, str(path))
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{path}: its weights do not fit {meta['backbone']}: {str(e).splitlines()[0]}") from None
    return module.eval(), meta


__all__ = ["ExportError", "build_from_meta", "checkpoint_backbone", "load_backbone", "load_note", "read_backbone",
           "write_export"]
