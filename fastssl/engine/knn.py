"""Weighted k-nearest-neighbour evaluation of frozen features (cosine similarity, votes exp(sim / T)).

The monitor SSL papers report (InstDisc, DINO): every query's k most similar bank features vote for
their class with weight ``exp(cos / T)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def extract_features(backbone: nn.Module, loader, precision: str = "bf16", normalize: bool = True,
                     progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``backbone`` (in eval mode) over every batch of ``loader`` (its first view).

    -> (N, D) fp32 features, L2-normalized unless ``normalize=False``, and (N,) int64 labels, on the
    backbone's device. ``progress``: an optional callable given each batch's image count (a bar's update).
    """
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    try:
        for batch in loader:
            x = batch.views[0]
            with _autocast(x.device, precision):
                f = backbone(x)
            f = f.float()
            feats.append(F.normalize(f, dim=1) if normalize else f)
            labels.append(batch.labels.to(f.device))
            if progress is not None:
                progress(x.shape[0])
    finally:
        backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def _autocast(device: torch.device, precision: str):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, k: int = 20,
                temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024) -> torch.Tensor:
    """Predicted class per query. bank: (N, D), queries: (M, D), both L2-normalized fp32 -> (M,) int64."""
    if bank.shape[0] == 0:
        raise ValueError("kNN bank is empty")
    num_classes = int(bank_labels.max()) + 1 if num_classes is None else num_classes
    k = min(k, bank.shape[0])
    preds = []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start:start + chunk] @ bank.T
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, bank_labels[top_idx], weights)
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
             k: int = 20, temperature: float = 0.07, num_classes: int | None = None) -> float:
    """kNN top-1 accuracy in percent."""
    pred = knn_predict(bank, bank_labels, queries, k, temperature, num_classes)
    return 100.0 * (pred == query_labels).float().mean().item()
