"""SSL methods, one file each; ``METHODS`` maps a config name to its class."""

from __future__ import annotations

from torch import nn

from fastssl.methods.base import SSLMethod
from fastssl.methods.byol import BYOL

METHODS: dict[str, type[SSLMethod]] = {"byol": BYOL}


def build_method(name: str, backbone: nn.Module, feat_dim: int, **kwargs) -> SSLMethod:
    """The method ``name`` around ``backbone`` (whose output width is ``feat_dim``)."""
    if name not in METHODS:
        raise ValueError(f"method.name={name!r}: unknown; choose one of {sorted(METHODS)}")
    return METHODS[name](backbone, feat_dim, **kwargs)


__all__ = ["METHODS", "SSLMethod", "BYOL", "build_method"]
