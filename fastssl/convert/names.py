"""``fastssl-convert SRC DST --add-names``: the source names of a dataset converted before fastssl-convert kept
them, recovered from SRC without re-encoding an image.

The conversion's order is a pure function of SRC's listing and the settings recorded in the manifest (seed,
limit), and the manifest lists every file it skipped; so planning SRC again with those settings gives each
stored sample's name. The plan is checked against the dataset before anything is written: the same classes,
the same count per split, and the same label for every sample (read from the shards' indexes), so a SRC that
changed since, or another folder, is refused with the first sample that differs.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastssl.convert.errors import ConvertError
from fastssl.convert.find import FASHION_MNIST, parse_limits, plan_fashion_mnist, plan_imagefolder
from fastssl.convert.image import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, DEFAULT_QUALITY
from fastssl.convert.run import stored_positions
from pipelines.formats import DatasetFormatError, load_manifest, split_labels, write_manifest, write_names


def add_names(src: str | os.PathLike, dst: str | os.PathLike) -> dict:
    """Write the names sidecar of every split of the converted dataset ``dst`` from its source ``src`` (the
    ImageFolder tree or ``"fashion-mnist"`` it was converted from) and list them in its manifest. Returns
    ``{split: number of names}``; a dataset that has its names already is left as it is. Raises ConvertError
    naming what differs when ``src`` does not plan exactly the samples ``dst`` holds."""
    dst = Path(dst)
    try:
        manifest = load_manifest(dst)
    except DatasetFormatError as e:
        raise ConvertError(str(e)) from None
    if set(manifest.get("names", {})) >= set(manifest["splits"]):
        return {split: int(entry["count"]) for split, entry in manifest["names"].items()}
    settings = manifest.get("settings") or {}
    kind = manifest.get("source", {}).get("kind")
    seed, limits = int(settings.get("seed", 0)), parse_limits(settings.get("limit"))
    quality = int(settings.get("quality", DEFAULT_QUALITY))
    if (os.fspath(src) == FASHION_MNIST) != (kind == FASHION_MNIST):
        raise ConvertError(f"{dst} was converted from {manifest.get('source', {}).get('path') or kind}, not from "
                           f"{src}; pass that SRC")
    if os.fspath(src) == FASHION_MNIST:
        source = plan_fashion_mnist(quality, seed, limits)
    else:
        source = plan_imagefolder(Path(src), int(settings.get("max_side", DEFAULT_MAX_SIDE)), quality, seed, limits,
                                  int(settings.get("max_pixels", DEFAULT_MAX_PIXELS)))
    if list(source.classes) != list(manifest["classes"]):
        raise ConvertError(f"{src}: classes {_few(source.classes)}, but {dst} was converted from classes "
                           f"{_few(manifest['classes'])}; pass the SRC it was converted from")
    plans = {plan.name: plan for plan in source.splits}
    found: dict[str, list[str]] = {}
    for split, info in manifest["splits"].items():
        plan = plans.get(split)
        count = int(info["count"])
        if plan is None:
            raise ConvertError(f"{src}: no {split} split, but {dst} holds {count} {split} images")
        positions = stored_positions(plan, [s for s in manifest.get("skipped", []) if s.get("split") == split])
        if len(positions) != count:
            raise ConvertError(f"{src}: its {split} split gives {len(positions)} images where {dst} holds {count}: "
                               "SRC changed since the conversion, or is not the folder converted into DST; "
                               "reconvert with --overwrite")
        stored = split_labels(dst, split, manifest).tolist()
        for sample, (i, label) in enumerate(zip(positions, stored, strict=True)):
            if plan.labels[i] != label:
                raise ConvertError(f"{src}: {split} sample {sample} would be {plan.names[i]} of class "
                                   f"{source.classes[plan.labels[i]]!r}, but {dst} stores an image of class "
                                   f"{manifest['classes'][label]!r} there: SRC changed since the conversion; "
                                   "reconvert with --overwrite")
        found[split] = [plan.names[i] for i in positions]
    manifest["names"] = {split: write_names(dst, split, names) for split, names in found.items()}
    write_manifest(dst, {k: v for k, v in manifest.items() if k not in ("format", "version")})
    return {split: len(names) for split, names in found.items()}


def _few(items: list[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}] ({len(items)})"
