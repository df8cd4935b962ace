"""SSL methods, one file each. ``METHODS`` maps a config name to "module:Class"; a method's module is
imported only when it is used, so one broken or heavy method file never stops the others."""

from __future__ import annotations

import importlib

from torch import nn

from fastssl.methods.base import SSLMethod

METHODS: dict[str, str] = {
    "byol": "fastssl.methods.byol:BYOL",
    "simclr": "fastssl.methods.simclr:SimCLR",
    "mocov2": "fastssl.methods.mocov2:MoCoV2",
    "mocov3": "fastssl.methods.mocov3:MoCoV3",
    "swav": "fastssl.methods.swav:SwAV",
    "dino": "fastssl.methods.dino:DINO",
    "barlow": "fastssl.methods.barlow:BarlowTwins",
    "vicreg": "fastssl.methods.vicreg:VICReg",
}


def method_class(name: str) -> type[SSLMethod]:
    """The class registered as ``name``."""
    if name not in METHODS:
        raise ValueError(f"method.name={name!r}: unknown; choose one of {sorted(METHODS)}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_method(name: str, backbone: nn.Module, feat_dim: int, **kwargs) -> SSLMethod:
    """The method ``name`` around ``backbone`` (whose output width is ``feat_dim``)."""
    return method_class(name)(backbone, feat_dim, **kwargs)


__all__ = ["METHODS", "SSLMethod", "build_method", "method_class"]
