"""Backbones and heads. Models know no method and no training loop."""

from fastssl.models.backbones import build_backbone
from fastssl.models.heads import MLP

__all__ = ["build_backbone", "MLP"]
