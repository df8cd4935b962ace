"""``build_loader(..., subset=ids)``: a loader over some samples of a split (the labelled 1 % / 10 % of
semi-supervised fine-tuning) reads exactly those, on every backend, split over ranks like a whole split."""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import pytest
import torch
from conftest import dataset_labels

from pipelines import MultiCropSpec, build_loader
from pipelines.formats import load_manifest, write_manifest

# Spanning the three unequal shards (40, 30, 26) of tiny_gray_dataset, unsorted and with a repeat.
SUBSET = [95, 2, 5, 39, 40, 41, 70, 5, 69]


def _backends() -> list:
    out = [pytest.param("torch", {"cache": "none", "num_workers": 0}, id="torch-workers"),
           pytest.param("torch", {"cache": "ram"}, id="torch-ram")]
    for name in ("dali", "ffcv"):
        missing = importlib.util.find_spec({"dali": "nvidia.dali", "ffcv": "ffcv"}[name]) is None
        out.append(pytest.param(name, {"num_workers": 1}, id=name,
                                marks=pytest.mark.skipif(missing, reason=f"{name} not installed")))
    return out


@pytest.fixture(scope="module")
def gray_with_betons(tiny_gray_dataset, tmp_path_factory):
    if importlib.util.find_spec("ffcv") is None:
        return tiny_gray_dataset
    from pipelines.ffcv_loader import write_betons

    dst = tmp_path_factory.mktemp("subset") / "gray"
    shutil.copytree(tiny_gray_dataset, dst)
    manifest = load_manifest(dst)
    manifest["ffcv"] = write_betons(dst, manifest, workers=1)
    write_manifest(dst, manifest)
    return dst


@pytest.mark.parametrize(("backend", "options"), _backends())
def test_a_subset_loader_reads_exactly_the_subsets_images_over_two_ranks(gray_with_betons, backend, options):
    data = gray_with_betons
    spec = MultiCropSpec.preset("eval", global_size=28)
    labels = dataset_labels(data)
    ids = sorted(set(SUBSET))

    def evaluation(**kw):
        return build_loader(data, spec, 3, backend=backend, augment=False, **options, **kw)

    full = torch.cat([b.views[0] for b in evaluation()])  # every image of the split, stored order
    views, got = [], []
    for rank in (0, 1):
        loader = evaluation(subset=SUBSET, rank=rank, world_size=2)
        assert loader.sample_ids.tolist() == ids[rank * 4:(rank + 1) * 4]  # contiguous ranges of the sorted ids
        batches = list(loader)
        views.append(torch.cat([b.views[0] for b in batches]))
        got += torch.cat([b.labels for b in batches]).tolist()
    assert got == [labels[i] for i in ids]
    torch.testing.assert_close(torch.cat(views), full[ids], rtol=0, atol=0)  # the same pixels as in the split

    train = build_loader(data, MultiCropSpec.preset("byol", global_size=16), 2, backend=backend, subset=SUBSET,
                         **options)
    for epoch in (0, 1):
        train.set_epoch(epoch)
        seen = torch.cat([b.labels for b in train]).tolist()
        order = train.epoch_sample_ids(epoch).tolist()
        assert sorted(order) == ids  # each subset image once per epoch, nothing else
        assert seen == [labels[i] for i in order]
    assert len(train) == 4


def test_a_subset_id_outside_the_split_is_refused(tiny_gray_dataset):
    with pytest.raises(ValueError, match=r"subset: sample id 96 outside the split's 96 samples"):
        build_loader(tiny_gray_dataset, "eval", 4, subset=[0, 96], backend="torch", cache="none")
    assert np.array_equal(build_loader(tiny_gray_dataset, "eval", 4, backend="torch", cache="none").sample_ids,
                          np.arange(96))
