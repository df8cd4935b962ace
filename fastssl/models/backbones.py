"""ResNet backbones: torchvision's layout (so weights export to ``torchvision.models.resnetXX`` with
``strict=True`` at width 64), plus a width multiplier and a small-image stem for 32 px data; and the
ViTs of :mod:`fastssl.models.vit`, by name."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet as tvr

from fastssl.models.vit import VITS, build_vit

_RESNETS = {
    "resnet18": (tvr.BasicBlock, [2, 2, 2, 2]),
    "resnet34": (tvr.BasicBlock, [3, 4, 6, 3]),
    "resnet50": (tvr.Bottleneck, [3, 4, 6, 3]),
    "resnet101": (tvr.Bottleneck, [3, 4, 23, 3]),
}
BACKBONES: tuple[str, ...] = (*_RESNETS, *VITS)  # the names build_backbone knows (config validation lists them)


class ResNet(tvr.ResNet):
    """torchvision ResNet with ``width`` channels in the stem (64 is standard) and an optional small-image
    stem (3x3 stride-1 conv, no max-pool: CIFAR / Fashion-MNIST at 32 px keep their spatial detail).

    ``forward(x: (B, 3, H, W)) -> (B, feat_dim)``: global-average-pooled features, no classifier.
    """

    def __init__(self, block, layers: list[int], width: int = 64, small_images: bool = False):
        super().__init__(block, layers)
        # Rebuild the trunk at the requested width; parameter names stay torchvision's.
        self.inplanes = width
        if small_images:
            self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.feat_dim = width * 8 * block.expansion
        self.fc = nn.Identity()
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def build_backbone(name: str, width: int = 64, small_images: bool = False) -> nn.Module:
    """A backbone by name (``resnet18|34|50|101``, ``vit_tiny|vit_small|vit_base``); ``.feat_dim`` gives its
    output width. ``width`` is the ResNets' stem width (ViTs have fixed sizes and ignore it);
    ``small_images``: the ResNets' 3x3 stem, or 4 px patches for ViT-S/B."""
    if name in VITS:
        return build_vit(name, small_images=small_images)
    if name not in _RESNETS:
        raise ValueError(f"model.backbone={name!r}: unknown; choose one of {sorted(_RESNETS) + sorted(VITS)}")
    if width < 1:
        raise ValueError(f"model.width={width}: must be >= 1")
    block, layers = _RESNETS[name]
    return ResNet(block, layers, width=width, small_images=small_images)
