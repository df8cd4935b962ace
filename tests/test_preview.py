"""fastssl-preview writes a readable PNG grid: rows = images, columns = every view."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fastssl.preview import GAP, main


@pytest.mark.parametrize("backend, spec, n_views", [("torch", "swav", 2 + 6), ("dali", "byol", 2)])
def test_preview_png_has_one_cell_per_image_and_view(tiny_dataset, tmp_path, backend, spec, n_views):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    out = tmp_path / "grid.png"
    rows, size = 5, 40
    rc = main([str(tiny_dataset), str(out), "--spec", spec, "--backend", backend, "--n", str(rows),
               "--global-size", str(size), "--local-size", "16", "--seed", "3"])
    assert rc == 0 and out.is_file()
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temp file left behind
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (rows * size + (rows - 1) * GAP, n_views * size + (n_views - 1) * GAP, 3)
    # Real image content, not a blank grid: the first view's cells differ from image to image.
    firsts = [img[r * (size + GAP) : r * (size + GAP) + size, :size].astype(float) for r in range(rows)]
    assert np.std([c.mean(axis=(0, 1)) for c in firsts]) > 5 and img.std() > 20


def test_preview_reports_a_missing_dataset(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "x.png")]) == 1
    assert "fastssl-convert" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
