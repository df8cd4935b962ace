"""Backbones (ResNets, ViTs) and heads. Models know no method and no training loop."""

from fastssl.models.backbones import build_backbone
from fastssl.models.heads import MLP, DINOHead, Prototypes
from fastssl.models.vit import VisionTransformer, build_vit

__all__ = ["build_backbone", "build_vit", "DINOHead", "MLP", "Prototypes", "VisionTransformer"]
