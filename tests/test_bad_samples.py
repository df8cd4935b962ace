"""A JPEG damaged after conversion: every backend names its shard and sample; training skips it (replaced in
its batch by the next sample), counts it in metrics.jsonl, warns once, and stops past data.max_bad_samples."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_same_batches, dataset_labels

from fastssl.config import load_config
from fastssl.engine.trainer import TooManyBadSamples, Trainer
from pipelines import MultiCropSpec, build_loader, replacements
from pipelines.formats import DatasetFormatError, load_manifest, shard_paths, write_manifest
from pipelines.torch_loader import index_shard

BAD = (45, 52)  # global ids in shard 1 (samples 40-69) of tiny_gray_dataset
SPEC = MultiCropSpec.preset("byol", global_size=16)
# backend -> build_loader options; dali and ffcv need their packages
BACKENDS = {
    "torch-ram": {"backend": "torch", "cache": "ram"},
    "torch-workers": {"backend": "torch", "cache": "none"},
    "torch-device": {"backend": "torch", "decode": "device"},
    "dali": {"backend": "dali"},
    "ffcv": {"backend": "ffcv"},
}


def _damage(jpeg: bytes, how: str) -> tuple[int, bytes]:
    """(offset in the JPEG, the bytes to write there), same length: the file's size is unchanged."""
    if how == "header":  # the SOI marker and the start of the headers zeroed: nothing recognizes the file
        return 0, bytes(64)
    dht = jpeg.index(b"\xff\xc4")  # a Huffman table's code counts: the header parses, decoding fails
    return dht + 5, b"\xff" * 16


def _damaged_copy(src: Path, dst: Path, how: str, ids=BAD, betons: bool = True) -> Path:
    """A copy of the converted dataset ``src`` with the JPEGs of ``ids`` damaged in place inside their shard
    (and, when FFCV is installed and ``betons``, a .beton written from the clean shards and damaged alike)."""
    shutil.copytree(src, dst)
    manifest = load_manifest(dst)
    beton = None
    try:
        if betons:
            from pipelines.ffcv_loader import write_betons

            manifest["ffcv"] = write_betons(dst, manifest, workers=1)
            write_manifest(dst, manifest)
            beton = build_loader(dst, SPEC, 8, backend="ffcv", num_workers=1)
    except ImportError:
        beton = None
    shards = shard_paths(dst, "train", manifest)
    counts = [int(s["count"]) for s in manifest["splits"]["train"]["shards"]]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    for sample in ids:
        s = int(np.searchsorted(offsets, sample, side="right")) - 1
        jpg_off, jpg_size = (int(v) for v in index_shard(shards[s])[sample - offsets[s], :2])
        with open(shards[s], "r+b") as f:
            f.seek(jpg_off)
            jpeg = f.read(jpg_size)
            at, data = _damage(jpeg, how)
            f.seek(jpg_off + at)
            f.write(data)
        if beton is not None:
            start = int(beton._starts[sample])
            with open(beton.beton, "r+b") as f:
                f.seek(start)
                at, data = _damage(f.read(int(beton._sizes[sample])), how)
                f.seek(start + at)
                f.write(data)
    return dst


@pytest.fixture(scope="module", params=["header", "huffman"])
def damaged(request, tiny_gray_dataset, tmp_path_factory) -> tuple[Path, str]:
    return _damaged_copy(tiny_gray_dataset, tmp_path_factory.mktemp("damaged") / "data", request.param), request.param


def _loader(path, name, **kw):
    if name in ("dali", "ffcv"):
        pytest.importorskip("nvidia.dali" if name == "dali" else "ffcv")
    return build_loader(path, SPEC, 8, num_workers=1, seed=3, progress=False, **BACKENDS[name], **kw)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_a_damaged_jpeg_is_an_error_naming_its_shard_and_sample(damaged, name):
    path, how = damaged
    if name == "torch-device" and how == "huffman":
        pytest.importorskip("torchvision")
    file = f"{path / 'train.beton'}" if name == "ffcv" else f"{path / 'train-00001.tar'}"
    with pytest.raises(DatasetFormatError, match=rf"{file}: sample ({BAD[0]}|{BAD[1]}) does not decode \("):
        loader = _loader(path, name)
        for _ in loader:
            pass


@pytest.mark.parametrize("name", list(BACKENDS))
def test_training_loaders_replace_a_bad_sample_by_the_next_one_of_its_batch(damaged, name, tiny_gray_dataset):
    path, _ = damaged
    labels = dataset_labels(tiny_gray_dataset)
    loader = _loader(path, name, skip_bad_samples=True)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader) and all(b.labels.shape == (8,) for b in batches)  # shapes kept
        assert set(loader.bad_samples) == set(BAD)
        for pos, batch in zip(loader.batch_positions(epoch), batches, strict=True):
            ids = loader.sample_ids[pos]
            stand_in = ids[replacements(np.isin(ids, BAD))]  # each bad one: the next good one of the batch
            assert batch.labels.tolist() == [labels[i] for i in stand_in]
    for sample, message in loader.bad_samples.items():
        where = path / ("train.beton" if name == "ffcv" else "train-00001.tar")
        assert message.startswith(f"{where}: sample {sample} does not decode (")
    # Deterministic, also across a resume mid-epoch (the replacement depends on the data only).
    again = _loader(path, name, skip_bad_samples=True)
    again.load_state_dict({"epoch": 1, "batch": 3})
    assert_same_batches(batches[3:], list(again))


def test_replacements_take_the_next_good_slot_cyclically():
    bad = np.array([True, False, True, True, False, True])
    assert replacements(bad).tolist() == [1, 1, 4, 4, 4, 1]
    with pytest.raises(DatasetFormatError, match="every one of its 2 samples"):
        replacements(np.array([True, True]), "batch 3")


# ------------------------------------------------------------------------------------------ training
def _fit(data: Path, out: Path, **extra):
    base = {
        "data.path": data, "data.num_workers": 0, "model.width": 4, "train.batch_size": 16, "train.epochs": 2,
        "train.log_every": 1, "train.progress": False, "train.threads": 1, "eval.knn": False, "eval.probe": False,
        "method.proj_hidden": 32, "method.proj_dim": 16, "method.pred_hidden": 32, "out_dir": out,
    }
    base.update(extra)
    return Trainer(load_config("byol_resnet18_fmnist", [f"{k}={v}" for k, v in base.items()])).fit()


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("cache", ["ram", "none"])
def test_training_skips_bad_samples_counts_them_and_warns_once(tiny_gray_dataset, tmp_path, capsys, cache):
    data = _damaged_copy(tiny_gray_dataset, tmp_path / "data", "header")
    results = _fit(data, tmp_path / "run", **{"data.cache": cache})
    assert results["steps"] == 2 * 6 and results["bad_samples"] == 2
    events = [r for r in _rows(tmp_path / "run") if r.get("event") == "bad_samples"]
    assert sum(r["new"] for r in events) == 2 and events[-1]["bad_samples_total"] == 2
    assert sorted(int(m.split(": sample ")[1].split()[0]) for r in events for m in r["samples"]) == list(BAD)
    out = capsys.readouterr().out
    for sample in BAD:  # one warning each, over two epochs, naming the shard
        assert out.count(f"train-00001.tar: sample {sample} does not decode") == 1, out


def test_bad_samples_are_checkpointed_and_not_counted_again_after_a_resume(tiny_gray_dataset, tmp_path, capsys):
    """Each distinct bad sample counts once toward data.max_bad_samples over a run and the runs it resumes: the
    checkpoint keeps them, so epoch 2 of a resumed run meets them again without a second warning or count."""
    import torch

    data = _damaged_copy(tiny_gray_dataset, tmp_path / "data", "header")
    out = tmp_path / "run"
    first = _fit(data, out, **{"train.epochs": 1})
    assert first["bad_samples"] == 2
    state = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert sorted(int(k) for k in state["bad_samples"]) == list(BAD)
    capsys.readouterr()
    second = _fit(data, out, **{"train.epochs": 2, "data.max_bad_samples": 3})
    assert second["steps"] == 12 and second["bad_samples"] == 2
    assert "does not decode" not in capsys.readouterr().out  # warned in the first run, once each
    events = [r for r in _rows(out) if r.get("event") == "bad_samples"]
    assert sum(r["new"] for r in events) == 2 and max(r["step"] for r in events) <= 6


def test_more_bad_samples_than_allowed_stop_the_run_with_a_message(tiny_gray_dataset, tmp_path):
    data = _damaged_copy(tiny_gray_dataset, tmp_path / "data", "header")
    message = r"bad samples \(that do not decode\) in .*: 2, more than data.max_bad_samples=1 "
    with pytest.raises(TooManyBadSamples, match=message):
        _fit(data, tmp_path / "run", **{"data.max_bad_samples": 1})
    steps = [r["step"] for r in _rows(tmp_path / "run") if "loss" in r]
    assert 0 < max(steps) < 12  # it trained past the first bad sample, and stopped at the second


def test_max_bad_samples_must_not_be_negative(tiny_gray_dataset, tmp_path):
    from fastssl.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.max_bad_samples=-1: must be an integer >= 0"):
        _fit(tiny_gray_dataset, tmp_path / "run", **{"data.max_bad_samples": -1})


def test_a_whole_batch_of_bad_samples_is_an_error(tiny_gray_dataset, tmp_path):
    data = _damaged_copy(tiny_gray_dataset, tmp_path / "data", "header", ids=range(40, 48))
    loader = build_loader(data, SPEC, 8, num_workers=0, shuffle=False, cache="ram", skip_bad_samples=True,
                          progress=False)
    seen = []
    with pytest.raises(DatasetFormatError, match=rf"{data / 'train-00001.tar'}: sample 40 and the rest of its batch: "
                                                 "every one of its 8 samples fails to decode"):
        for batch in loader:
            seen.append(batch)
    assert len(seen) == 5  # the batches before it were fine


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["header", "huffman"])
def test_writing_a_beton_from_a_damaged_shard_names_the_samples_and_writes_nothing(tiny_gray_dataset, tmp_path,
                                                                                   how):
    """FFCV's writer decodes in worker processes and used to wait forever for the chunk of a worker that died on
    the damaged JPEG; now the write fails at once, naming every damaged sample, and leaves no file behind."""
    pytest.importorskip("ffcv")
    from pipelines.ffcv_loader import write_betons

    data = _damaged_copy(tiny_gray_dataset, tmp_path / "data", how, betons=False)
    before = sorted(p.name for p in data.iterdir())
    with pytest.raises(DatasetFormatError) as err:
        write_betons(data, load_manifest(data), workers=2)
    message = str(err.value)
    for sample in BAD:
        assert f"{data / 'train-00001.tar'}: sample {sample} does not decode" in message
    assert "train.beton: not written: 2 sample(s)" in message and "rerun fastssl-convert --overwrite" in message
    assert sorted(p.name for p in data.iterdir()) == before  # no beton, no temp file, no error list
