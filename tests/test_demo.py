"""The README's first command (`make demo` -> fastssl.demo): convert if needed, train BYOL, kNN before/after."""

from __future__ import annotations

from fastssl import demo


def test_demo_trains_and_reports_knn_before_and_after(tiny_gray_dataset, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = [f"data.path={tiny_gray_dataset}", f"out_dir={out}", "train.max_steps=2", "model.width=4",
            "method.proj_hidden=32", "method.proj_dim=16", "method.pred_hidden=32", "train.batch_size=16",
            "data.num_workers=0", "train.progress=false", "train.threads=1", "eval.batch_size=64"]
    assert demo.main(argv) == 0
    text = capsys.readouterr().out
    assert f"Using the converted dataset in {tiny_gray_dataset}" in text
    assert "Training byol_resnet18_fmnist: 4 epochs (at most 2 steps), batch 16" in text
    # the bank and queries are the dataset's own counts (96 train, 32 val), not Fashion-MNIST's
    assert f"{tiny_gray_dataset.name} weighted kNN top-1 (k=20, T=0.07; bank: 96 train, queries: 32 test images)" \
        in text
    assert "at random init" in text and "after BYOL, 2 steps" in text
    assert (out / "knn.json").is_file()
