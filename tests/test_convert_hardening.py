"""fastssl-convert on hostile input (issue 8): malformed files, odd formats, kills, write errors, --verify."""

from __future__ import annotations

import errno
import io
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastssl.convert import JOURNAL, convert, main, verify
from fastssl.convert import image as convert_mod
from pipelines.formats import MANIFEST, ShardWriter, iter_samples, load_manifest, shard_paths

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# Helpers


def _noise(seed: int, size=(48, 36), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode)


def _save(im: Image.Image, path: Path, fmt: str | None = None, **kwargs) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, fmt, **kwargs)
    return path.read_bytes()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels but holds no pixel data: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _decode(jpeg: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(jpeg))
    assert im.format == "JPEG"
    im.load()
    return im


def _by_class(dst: Path) -> dict[str, list[Image.Image]]:
    manifest = load_manifest(dst)
    out: dict[str, list[Image.Image]] = {}
    for split in manifest["splits"]:
        for path in shard_paths(dst, split, manifest):
            for _, jpeg, label in iter_samples(path):
                out.setdefault(manifest["classes"][label], []).append(_decode(jpeg))
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _cli(*args: str) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return [sys.executable, "-m", "fastssl.convert", *args], env


def _loader_labels(dst: Path) -> list[int]:
    import pipelines

    spec = pipelines.MultiCropSpec.preset("byol", global_size=24)
    loader = pipelines.build_loader(dst, spec, 4, backend="torch", num_workers=0, drop_last=False)
    labels = []
    for batch in loader:
        assert all(v.shape[1:] == (3, 24, 24) for v in batch.views)
        labels += batch.labels.tolist()
    return labels


DENIED = "cannot read file: Permission denied"
UNICODE_CLASS = "j grün ordner"
UNICODE_FILE = "bild mit leerzeichen ü 猫.jpg"


def _hostile_tree(src: Path) -> dict[str, str]:
    """Every case of the issue, one class folder per valid oddity; returns {bad relative path: reason fragment}."""
    for i, cls in enumerate(("k_bad", "l_good")):
        for j in range(3):
            _save(_noise(10 * i + j), src / cls / f"ok_{j}.jpg", "JPEG", quality=90)
    _save(_noise(1, mode="RGB").convert("CMYK"), src / "a_cmyk" / "x.jpg", "JPEG", quality=95)
    pal = Image.new("P", (40, 30), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (0, 15, 40, 30))
    _save(pal, src / "b_palette_alpha" / "x.png", transparency=1)  # bottom half (index 1) transparent
    gray_alpha = Image.merge("LA", (Image.new("L", (40, 30), 40), Image.linear_gradient("L").resize((40, 30))))
    _save(gray_alpha, src / "c_gray_alpha" / "x.png")
    sixteen = Image.fromarray(np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50)
    _save(sixteen, src / "d_16bit" / "x.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(_noise(2, size=(60, 20)), src / "e_exif" / "x.jpg", "JPEG", quality=95, exif=exif.tobytes())
    _save(_noise(3, size=(1600, 1200)), src / "f_huge" / "x.jpg", "JPEG", quality=80)
    _save(_noise(4), src / "g_webp" / "x.webp", lossless=True)
    _save(_noise(5), src / "h_bmp" / "x.BMP", "BMP")
    _save(_noise(6), src / "i_tiff" / "x.tiff", "TIFF")
    _save(_noise(7), src / UNICODE_CLASS / UNICODE_FILE, "JPEG", quality=90)
    (src / "m_empty" / "nested").mkdir(parents=True)
    (src / "m_empty" / "readme.txt").write_text("no images")

    bad = src / "k_bad"
    whole = _save(_noise(8, size=(200, 150)), src / "whole.jpg", "JPEG", quality=95)
    (src / "whole.jpg").unlink()
    (bad / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (bad / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + np.random.default_rng(9).bytes(3000))
    (bad / "empty.png").write_bytes(b"")
    (bad / "text.jpeg").write_text("this is not an image\n")
    (bad / "bomb.png").write_bytes(_png_header_only(40_000, 40_000))
    os.symlink("self_b.jpg", bad / "self_a.jpg")
    os.symlink("self_a.jpg", bad / "self_b.jpg")
    os.symlink("../k_bad", bad / "loop")  # a folder symlink back to its own parent
    return {
        "k_bad/truncated.jpg": "truncated",
        "k_bad/corrupt.jpg": "",
        "k_bad/empty.png": "empty file",
        "k_bad/text.jpeg": "not an image",
        "k_bad/bomb.png": "decompression bomb",
        "k_bad/self_a.jpg": "symbolic links",
        "k_bad/self_b.jpg": "symbolic links",
        "k_bad/loop/": "symlink loop",
        "m_empty/": "empty class folder",
    }


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """The hostile tree, converted once through the CLI entry point (2 workers, several shards)."""
    root = tmp_path_factory.mktemp("hostile")
    src, dst = root / "src", root / "out"
    expected = _hostile_tree(src)
    argv = [str(src), str(dst), "--workers", "2", "--shard-size", "4", "--max-side", "64", "--no-progress"]
    stdout = io.StringIO()
    saved, sys.stdout = sys.stdout, stdout
    try:
        rc = main(argv)
    finally:
        sys.stdout = saved
    return {"src": src, "dst": dst, "rc": rc, "report": stdout.getvalue(), "expected": expected, "argv": argv}


# --------------------------------------------------------------------------------------------------
# Malformed and odd input


def test_every_malformed_input_is_skipped_and_named_in_report_and_manifest(hostile):
    assert hostile["rc"] == 0
    manifest = load_manifest(hostile["dst"])
    skipped = {item["path"]: item["reason"] for item in manifest["skipped"]}
    assert set(skipped) == set(hostile["expected"])
    for path, fragment in hostile["expected"].items():
        assert fragment.lower() in skipped[path].lower(), (path, skipped[path])
        assert f"{path}: " in hostile["report"], path
    assert "m_empty" not in manifest["classes"]
    assert manifest["splits"]["train"]["count"] == 6 + 10  # 2 x 3 plain + 10 odd-but-valid


def test_the_loader_reads_what_a_hostile_tree_converts_to(hostile):
    manifest = load_manifest(hostile["dst"])
    labels = _loader_labels(hostile["dst"])
    assert sorted(labels) == sorted(
        label for label, n in enumerate(manifest["splits"]["train"]["class_counts"]) for _ in range(n)
    )


def test_odd_valid_images_become_upright_rgb_or_gray_jpegs(hostile):
    got = {cls: ims[0] for cls, ims in _by_class(hostile["dst"]).items()}
    cmyk = got["a_cmyk"]
    assert cmyk.mode == "RGB" and cmyk.size == (48, 36)
    palette = np.asarray(got["b_palette_alpha"])
    assert got["b_palette_alpha"].mode == "RGB"
    assert palette[:12, :, 0].min() > 220 and palette[:12, :, 2].max() < 40  # opaque red
    assert palette[18:].min() > 220  # transparent half: flattened onto white
    # Grayscale stays single-channel (smaller, and every loader backend expands it to 3 channels).
    assert got["c_gray_alpha"].mode == "L" and got["c_gray_alpha"].size == (40, 30)
    assert got["d_16bit"].mode == "L" and np.asarray(got["d_16bit"]).max() > 200  # high byte, not clipped
    assert got["e_exif"].size == (20, 60) and got["e_exif"].getexif().get(0x0112) is None
    assert got["f_huge"].size == (64, 48)
    for cls in ("g_webp", "h_bmp", "i_tiff", UNICODE_CLASS):
        assert got[cls].mode == "RGB" and got[cls].size == (48, 36), cls
    stored = load_manifest(hostile["dst"])["splits"]["train"]["stored"]
    assert stored["resized"] == 1


def test_unicode_and_spaces_in_paths_survive_to_manifest_and_report(hostile, tmp_path):
    manifest = load_manifest(hostile["dst"])
    assert UNICODE_CLASS in manifest["classes"]
    # Skipped paths with unicode are reported verbatim too.
    src = tmp_path / "src"
    _save(_noise(0), src / "ä b" / "ok.jpg", "JPEG")
    (src / "ä b" / "kaputt ü.jpg").write_bytes(b"nope")
    out = convert(src, tmp_path / "out", workers=0, progress=False)
    assert [item["path"] for item in out["skipped"]] == ["ä b/kaputt ü.jpg"]


def test_a_lower_max_pixels_skips_large_images_unread(tmp_path):
    src = tmp_path / "src"
    _save(_noise(0, size=(100, 100)), src / "c" / "big.png")
    _save(_noise(1, size=(20, 20)), src / "c" / "small.png")
    manifest = convert(src, tmp_path / "out", workers=0, progress=False, max_pixels=5000)
    assert [item["path"] for item in manifest["skipped"]] == ["c/big.png"]
    assert "100 x 100 = 10,000 > --max-pixels 5,000" in manifest["skipped"][0]["reason"]
    assert manifest["splits"]["train"]["count"] == 1


def test_unreadable_file_is_skipped_with_permission_denied(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 files stay readable; see the simulated test below")
    src = tmp_path / "src"
    _save(_noise(0), src / "c" / "ok.jpg", "JPEG")
    locked = src / "c" / "locked.jpg"
    _save(_noise(1), locked, "JPEG")
    locked.chmod(0)
    try:
        manifest = convert(src, tmp_path / "out", workers=0, progress=False)
    finally:
        locked.chmod(0o644)
    assert manifest["skipped"] == [{"split": "train", "path": "c/locked.jpg", "reason": DENIED}]


def test_unreadable_file_simulated_by_a_permission_error_is_skipped(tmp_path, monkeypatch):
    # Root reads chmod 000 files, so the open() failure that a normal user gets is injected instead.
    src = tmp_path / "src"
    _save(_noise(0), src / "c" / "ok.jpg", "JPEG")
    _save(_noise(1), src / "c" / "locked.jpg", "JPEG")
    real = convert_mod._read_source

    def read(path: str) -> bytes:
        if path.endswith("locked.jpg"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real(path)

    monkeypatch.setattr(convert_mod, "_read_source", read)
    manifest = convert(src, tmp_path / "out", workers=0, progress=False)
    assert manifest["skipped"] == [{"split": "train", "path": "c/locked.jpg", "reason": DENIED}]
    assert manifest["splits"]["train"]["count"] == 1


def test_hostile_tree_gives_byte_identical_output_with_0_and_2_workers(hostile, tmp_path):
    convert(hostile["src"], tmp_path / "w0", workers=0, shard_size=4, max_side=64, progress=False)
    assert _files(tmp_path / "w0") == _files(hostile["dst"])  # hostile["dst"] was written with 2 workers


# --------------------------------------------------------------------------------------------------
# Kill and resume


def test_resume_after_sigkill_keeps_finished_shards_and_matches_an_uninterrupted_run(tmp_path):
    src, dst, ref = tmp_path / "src", tmp_path / "out", tmp_path / "ref"
    for i in range(240):
        _save(_noise(i, size=(160, 120)), src / f"c{i % 3}" / f"{i:03d}.jpg", "JPEG", quality=90)
    args = [str(src), str(dst), "--shard-size", "4", "--max-side", "40", "--workers", "1", "--no-progress"]
    cmd, env = _cli(*args)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = dst / "train-00000.tar"
    # Kill once the first shard is finished and recorded (the journal is written right after the rename).
    deadline = time.monotonic() + 60
    while not (dst / JOURNAL).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert first.exists() and not (dst / MANIFEST).exists(), "the conversion finished before the kill"
    # Nothing half-written under a final name: every tar there is complete and listed in the journal.
    finished = sorted(p.name for p in dst.glob("train-*.tar"))
    assert finished and len(finished) < 60
    kept = {name: (dst / name).stat().st_ino for name in finished}

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed: kept" in rerun.stdout
    assert not (dst / JOURNAL).exists()
    # Finished shards of the killed run were kept, not rewritten (same inode); at most the last
    # one (finished after the journal's last write) is redone.
    still = [name for name, ino in kept.items() if (dst / name).stat().st_ino == ino]
    assert len(still) >= len(kept) - 1 and "train-00000.tar" in still

    convert(src, ref, shard_size=4, max_side=40, workers=2, progress=False)
    assert _files(dst) == _files(ref)
    assert verify(dst)


def test_resume_redoes_a_finished_shard_whose_checksum_no_longer_matches(tmp_path, monkeypatch):
    src, dst, ref = tmp_path / "src", tmp_path / "out", tmp_path / "ref"
    for i in range(12):
        _save(_noise(i), src / f"c{i % 2}" / f"{i:02d}.jpg", "JPEG", quality=90)
    real_close = ShardWriter.close
    closed = []

    def close_then_die(self):
        info = real_close(self)
        closed.append(info.name)
        if len(closed) == 2:
            raise KeyboardInterrupt  # as if killed right after the second shard
        return info

    monkeypatch.setattr(ShardWriter, "close", close_then_die)
    with pytest.raises(KeyboardInterrupt):
        convert(src, dst, shard_size=3, workers=0, progress=False)
    monkeypatch.setattr(ShardWriter, "close", real_close)
    shard0 = dst / "train-00000.tar"
    data = bytearray(shard0.read_bytes())
    data[600] ^= 0xFF  # bit rot in a finished shard
    shard0.write_bytes(bytes(data))
    manifest = convert(src, dst, shard_size=3, workers=0, progress=False)
    assert "resumed_shards" not in manifest  # shard 0 failed its checksum, so everything after it is redone
    convert(src, ref, shard_size=3, workers=0, progress=False)
    assert _files(dst) == _files(ref)


# --------------------------------------------------------------------------------------------------
# --verify and write errors


def test_verify_accepts_a_good_dataset_and_names_a_corrupt_shard(hostile, tmp_path, capsys):
    dst = tmp_path / "copy"
    dst.mkdir()
    for name, data in _files(hostile["dst"]).items():
        (dst / name).write_bytes(data)
    assert main(["--verify", str(dst)]) == 0
    assert "files match the manifest" in capsys.readouterr().out
    shard = dst / "train-00001.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01
    shard.write_bytes(bytes(data))
    assert main(["--verify", str(dst)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastssl-convert: error:") and str(shard) in err and "sha256" in err
    shard.unlink()
    assert main(["--verify", str(dst)]) == 1
    assert "missing" in capsys.readouterr().err
    assert main(["--verify", str(tmp_path / "nothing")]) == 1


def test_verify_checks_the_beton_files_too(tmp_path, capsys):
    pytest.importorskip("ffcv")
    src, dst = tmp_path / "src", tmp_path / "out"
    for i in range(6):
        _save(_noise(i), src / f"c{i % 2}" / f"{i}.jpg", "JPEG", quality=90)
    assert main([str(src), str(dst), "--formats", "wds,ffcv", "--workers", "1", "--verify", "--no-progress"]) == 0
    assert "verified" in capsys.readouterr().out
    beton = dst / "train.beton"
    with open(beton, "r+b") as f:
        f.seek(beton.stat().st_size - 10)
        f.write(b"\x00" * 10 if f.read(10) != b"\x00" * 10 else b"\x01" * 10)
    assert main(["--verify", str(dst)]) == 1
    assert str(beton) in capsys.readouterr().err


def test_disk_full_is_a_clear_error_naming_the_shard_and_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    src, dst = tmp_path / "src", tmp_path / "out"
    for i in range(8):
        _save(_noise(i), src / "c" / f"{i}.jpg", "JPEG", quality=90)
    real_add = ShardWriter._add
    writes = []

    def add_until_full(self, name, data):
        writes.append(name)
        if len(writes) > 10:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_add(self, name, data)

    monkeypatch.setattr(ShardWriter, "_add", add_until_full)
    rc = main([str(src), str(dst), "--shard-size", "3", "--workers", "0", "--no-progress"])
    assert rc == 1
    err = capsys.readouterr().err
    assert err.startswith("fastssl-convert: error:") and "Traceback" not in err
    assert str(dst / "train-00001.tar") in err and "No space left on device" in err
    names = sorted(p.name for p in dst.iterdir())
    assert MANIFEST not in names and "train-00001.tar" not in names
    assert not [n for n in names if n.endswith(".tmp")]


def test_output_that_is_a_file_and_existing_dataset_are_clear_errors(tmp_path, capsys):
    src = tmp_path / "src"
    _save(_noise(0), src / "c" / "x.jpg", "JPEG")
    (tmp_path / "file").write_text("x")
    assert main([str(src), str(tmp_path / "file"), "--no-progress"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main([str(src), str(tmp_path / "out"), "--no-progress", "--workers", "0"]) == 0
    assert main([str(src), str(tmp_path / "out"), "--no-progress", "--workers", "0"]) == 2
    assert "--overwrite" in capsys.readouterr().err
