"""Weighted kNN monitor on hand-made features."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastssl.engine.knn import knn_predict, knn_top1


def test_weighted_vote_prefers_close_neighbours_over_many_far_ones():
    # Query at angle 0: one class-1 neighbour almost on top of it, two class-0 neighbours far away.
    bank = F.normalize(torch.tensor([[1.0, 0.01], [0.2, 1.0], [0.25, 1.0]]), dim=1)
    labels = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.0]])
    # With a sharp temperature the close neighbour's weight exp(cos/T) dominates the two far votes.
    assert knn_predict(bank, labels, query, k=3, temperature=0.07).tolist() == [1]
    # With a flat temperature every vote weighs about the same, and the majority wins.
    assert knn_predict(bank, labels, query, k=3, temperature=100.0).tolist() == [0]
    # k=1 is nearest-neighbour.
    assert knn_predict(bank, labels, query, k=1).tolist() == [1]


def test_top1_on_separable_clusters_is_100_and_on_shuffled_labels_is_chance():
    gen = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 16, generator=gen), dim=1)
    labels = torch.arange(4).repeat_interleave(50)
    feats = F.normalize(centres[labels] + 0.05 * torch.randn(200, 16, generator=gen), dim=1)
    queries = F.normalize(centres[labels] + 0.05 * torch.randn(200, 16, generator=gen), dim=1)
    assert knn_top1(feats, labels, queries, labels, k=5) == 100.0
    shuffled = labels[torch.randperm(200, generator=gen)]
    assert knn_top1(feats, shuffled, queries, labels, k=5) < 50.0
