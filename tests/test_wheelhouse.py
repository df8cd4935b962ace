"""scripts/wheelhouse.py's parts, sums and dependency pruning, and install_offline.sh's checks and joins, on small
fake files (no network, no pip)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "scripts" / "install_offline.sh"


wh = load_script("wheelhouse")
PART = 1000  # bytes: the tests' --part-mib


def _files(tmp_path: Path, sizes: dict[str, int]) -> list[Path]:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    paths = []
    for i, (name, size) in enumerate(sizes.items()):
        p = src / name
        p.write_bytes(bytes((i * 7 + k * 13) % 251 for k in range(size)))
        paths.append(p)
    return paths


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- parts and sums ---------------------------------------------------------------------------------------
def test_part_names_cover_the_file_and_exact_multiples_add_no_empty_part():
    assert wh.part_names("a.whl", 2500, 1000) == ["a.whl.part000", "a.whl.part001", "a.whl.part002"]
    assert wh.part_names("a.whl", 2000, 1000) == ["a.whl.part000", "a.whl.part001"]
    assert wh.part_names("a.whl", 1, 1000) == ["a.whl.part000"]


def test_publish_splits_large_files_and_sha256sums_verifies_everything(tmp_path):
    small, big, exact = _files(tmp_path, {"small-1.0-py3-none-any.whl": 300, "big-2.0-py3-none-any.whl": 2500,
                                          "exact-1.0-py3-none-any.whl": 2000})
    out = tmp_path / "house"
    result = wh.publish([small, big, exact], out, PART)
    assert result["split"] == {big.name: wh.part_names(big.name, 2500, PART),
                               exact.name: wh.part_names(exact.name, 2000, PART)}
    assert not (out / big.name).exists()  # only its parts are carried
    for f in out.iterdir():
        assert f.stat().st_size <= PART or f.name.startswith("SHA256SUMS"), f.name
    joined = b"".join((out / p).read_bytes() for p in result["split"][big.name])
    assert joined == big.read_bytes()
    # sha256sum itself accepts both files: every file as carried, then the whole files the parts join into.
    listed = wh.read_sums(out / wh.SUMS)
    assert set(listed) == {p.name for p in out.iterdir()} - {wh.SUMS}
    subprocess.run(["sha256sum", "-c", "--quiet", wh.SUMS], cwd=out, check=True)
    assert wh.read_sums(out / wh.JOINED_SUMS) == {big.name: _sha(big), exact.name: _sha(exact)}


def test_publish_rerun_keeps_what_is_right_and_removes_what_is_stale(tmp_path):
    small, big = _files(tmp_path, {"small-1.0-py3-none-any.whl": 300, "big-2.0-py3-none-any.whl": 2500})
    out = tmp_path / "house"
    wh.publish([small, big], out, PART)
    kept = out / small.name
    os.utime(kept, (1, 1))
    # A part of the right size but the wrong content (an interrupted earlier run of other bytes) is rewritten.
    (out / f"{big.name}.part001").write_bytes(b"x" * PART)
    (out / "old-0.1-py3-none-any.whl").write_bytes(b"stale")
    wh.publish([small, big], out, PART)
    assert kept.stat().st_mtime == 1  # unchanged: not copied again
    assert not (out / "old-0.1-py3-none-any.whl").exists()
    assert b"".join((out / p).read_bytes() for p in wh.part_names(big.name, 2500, PART)) == big.read_bytes()
    # With larger parts the big file is carried whole and its old parts go.
    wh.publish([small, big], out, 4000)
    assert (out / big.name).read_bytes() == big.read_bytes()
    assert not list(out.glob("*.part*"))
    assert wh.read_sums(out / wh.JOINED_SUMS) == {}
    subprocess.run(["sha256sum", "-c", "--quiet", wh.SUMS], cwd=out, check=True)


def test_publish_refuses_a_part_size_of_zero(tmp_path):
    with pytest.raises(ValueError, match="part size"):
        wh.publish([], tmp_path, 0)


def test_transfer_plan_fills_loads_up_to_the_cap_with_the_sums_first():
    sizes = {"SHA256SUMS": 5, "install_offline.sh": 5, "a.part000": 60, "a.part001": 60, "a.part002": 10,
             "b.whl": 30, "c.whl": 25, "d.whl": 4, "e.whl": 1}
    transfers = wh.plan_transfers(sizes, 64, first=("SHA256SUMS", "install_offline.sh", "absent"))
    assert transfers[0][:2] == ["SHA256SUMS", "install_offline.sh"]
    assert sorted(n for t in transfers for n in t) == sorted(sizes)
    assert all(sum(sizes[n] for n in t) <= 64 for t in transfers)
    assert len(transfers) == 4  # 195 bytes need at least 4 loads of 64
    with pytest.raises(ValueError, match="a.part000, a.part001: larger than one transfer"):
        wh.plan_transfers(sizes, 50)


def test_part_size_above_the_transfer_size_is_refused(capsys):
    with pytest.raises(SystemExit):
        wh.main(["--python", "3.12", "--out", "/nonexistent", "--part-mib", "80", "--transfer-mib", "64"])
    assert "--part-mib must be positive and at most --transfer-mib (64)" in capsys.readouterr().err


# ---- resolving for another Python -------------------------------------------------------------------------
def _report(packages: dict[str, list[str]]) -> dict:
    return {"install": [{"metadata": {"name": n, "version": "1.0", "requires_dist": deps},
                         "download_info": {"url": f"https://example.invalid/{n}-1.0-py3-none-any.whl"}}
                        for n, deps in packages.items()]}


def test_closure_leaves_out_excluded_packages_and_what_only_they_need():
    report = _report({
        "app": ["torch>=2", "Nvidia-DALI", "tomli; python_version < '3.11'", "extra-thing; extra == 'more'",
                "helper[fast]"],
        "torch": ["sympy", "nvidia-nvjpeg", "triton"],
        "sympy": ["mpmath"], "mpmath": [], "triton": [],
        "nvidia-dali": ["nvidia-nvjpeg", "nvtx; platform_machine == 'x86_64'"],
        "nvidia-nvjpeg": [], "nvtx": [], "tomli": [], "extra-thing": [],
        "helper": ["speedup; extra == 'fast'", "slowpath; extra == 'slow'"], "speedup": [], "slowpath": [],
    })
    target = wh.Target("3.12", Path(sys.executable), "3.12.1", "manylinux_2_28_x86_64")
    keep = wh.closure(report, ["app"], {"torch", "triton"}, target.markers())
    # nvjpeg stays: DALI needs it too; sympy and mpmath go with torch.
    assert set(keep) == {"app", "nvidia-dali", "nvidia-nvjpeg", "nvtx", "helper", "speedup"}
    old = wh.Target("3.10", Path(sys.executable), "3.10.13", "manylinux_2_28_x86_64")
    assert "tomli" in wh.closure(report, ["app"], {"torch"}, old.markers())
    assert "extra-thing" in wh.closure(report, ["app[more]"], {"torch"}, target.markers())


def test_the_requirement_pip_found_no_wheel_of_is_read_from_old_and_new_pips():
    new = "ERROR: No matching distribution found for ffcv==1.0.2 (from fastssl[ffcv])\n"
    old = "ERROR: No matching distribution found for ffcv==1.0.2; extra == \"ffcv\"\n"
    assert wh.missing_requirement(new) == wh.missing_requirement(old) == "ffcv==1.0.2"
    assert wh.missing_requirement("ERROR: ResolutionImpossible: ...") is None


def test_target_platforms_include_every_older_manylinux_tag_and_built_ones():
    target = wh.Target("3.12", Path(sys.executable), "3.12.1", "manylinux_2_28_x86_64")
    tags = target.platforms()
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in tags and "manylinux2014_x86_64" in tags
    assert "manylinux1_x86_64" in tags and "manylinux_2_29_x86_64" not in tags
    target.built_platforms.append("manylinux_2_35_x86_64")
    assert "manylinux_2_35_x86_64" in target.platforms()
    flags = target.pip_flags()
    assert flags[:4] == ["--only-binary=:all:", "--python-version", "3.12", "--platform"]
    assert flags[-2:] == ["--abi", "cp312"]


# ---- install_offline.sh: checks and joins -------------------------------------------------------------------
@pytest.fixture
def house(tmp_path) -> tuple[Path, Path]:
    small, big = _files(tmp_path, {"small-1.0-py3-none-any.whl": 300, "big-2.0-py3-none-any.whl": 2500})
    out = tmp_path / "house"
    wh.publish([small, big], out, PART)
    return out, big


def _install(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True)


def test_install_names_the_missing_parts_and_touches_nothing(house):
    out, big = house
    (out / f"{big.name}.part001").unlink()
    (out / f"{big.name}.part002").unlink()
    r = _install("--verify-only", str(out))
    assert r.returncode == 1
    assert "missing 2 of" in r.stderr
    assert f"{big.name}.part001" in r.stderr and f"{big.name}.part002" in r.stderr
    assert f"{big.name}.part000" not in r.stderr
    assert not (out / big.name).exists()


def test_install_names_a_damaged_file(house):
    out, big = house
    part = out / f"{big.name}.part000"
    part.write_bytes(b"y" + part.read_bytes()[1:])
    r = _install("--verify-only", str(out))
    assert r.returncode == 1 and "damaged" in r.stderr and part.name in r.stderr


def test_install_joins_the_parts_verifies_them_and_a_rerun_is_harmless(house):
    out, big = house
    r = _install("--verify-only", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / big.name).read_bytes() == big.read_bytes()
    assert "joined from 3 parts, verified" in r.stdout
    subprocess.run(["sha256sum", "-c", "--quiet", wh.JOINED_SUMS], cwd=out, check=True)
    again = _install("--verify-only", str(out))
    assert again.returncode == 0 and f"{big.name}: already joined" in again.stdout


def test_install_without_sha256sums_says_what_to_carry(house, tmp_path):
    out, _ = house
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    (partial / wh.SUMS).unlink()
    r = _install(str(partial))
    assert r.returncode == 1 and "SHA256SUMS is missing" in r.stderr


def test_install_refuses_a_wheelhouse_for_another_python_before_pip_runs(tmp_path):
    (small,) = _files(tmp_path, {"small-1.0-py3-none-any.whl": 300})
    out = tmp_path / "house"
    out.mkdir()
    (out / wh.MANIFEST).write_text('{"python": "2.7", "excluded": ["torch"]}')
    (out / wh.REQUIREMENTS).write_text("small\n")
    wh.publish([small], out, PART, extra_managed=(wh.MANIFEST, wh.REQUIREMENTS))
    r = subprocess.run(["bash", str(INSTALL), str(out)], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode != 0
    assert "the wheelhouse is for Python 2.7, this environment" in r.stderr
    assert "pip install done" not in r.stdout


def test_fastssl_is_built_from_its_source_files_only(tmp_path):
    """Build leftovers (setuptools' build/ of an earlier run would ship deleted modules) and ignored data stay out."""
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "mod.py").write_text("x = 1\n")
    (repo / ".gitignore").write_text("build/\ndata/\n")
    (repo / "build" / "lib" / "pkg").mkdir(parents=True)
    (repo / "build" / "lib" / "pkg" / "deleted.py").write_text("stale\n")
    (repo / "data").mkdir()
    (repo / "data" / "big.bin").write_bytes(b"0" * 10)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "pkg/mod.py", ".gitignore"], check=True)
    (repo / "pkg" / "new.py").write_text("y = 2\n")  # not committed yet: still part of the checkout
    dst = tmp_path / "copy"
    wh.copy_sources(repo, dst)
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file()) == [
        ".gitignore", "pkg/mod.py", "pkg/new.py"]


# ---- requirements of wheels built here ------------------------------------------------------------------------
def _wheel(path: Path, requires: list[str]) -> Path:
    """A minimal wheel of 'demo 1.0' with those Requires-Dist lines and a RECORD that hashes its files."""
    import base64
    import zipfile

    files = {"demo/__init__.py": b"x = 1\n",
             "demo-1.0.dist-info/METADATA": ("Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n"
                                             + "".join(f"Requires-Dist: {r}\n" for r in requires)).encode(),
             "demo-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}"
              for n, d in files.items()] + ["demo-1.0.dist-info/RECORD,,"]
    files["demo-1.0.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def test_ffcvs_opencv_requirement_becomes_the_headless_build_the_node_has(tmp_path):
    """FFCV 1.0.2 requires opencv-python: beside the node's opencv-python-headless it would install a second cv2
    (76 MiB more to carry). The built wheel's requirement is rewritten, RECORD still verifies, a rerun is a no-op."""
    import base64
    import zipfile

    old = "OpenCV_Python>=4; python_version >= '3.8'"
    wheel = _wheel(tmp_path / "demo-1.0-py3-none-any.whl", ["numba", "opencv-python", old])
    replacements = wh.parse_replacements(wh.DEFAULT_REPLACE)
    changed = wh.replace_requirements(wheel, replacements)
    assert changed == ["opencv-python -> opencv-python-headless",
                       f"{old} -> opencv-python-headless>=4; python_version >= \"3.8\""]
    with zipfile.ZipFile(wheel) as z:
        meta = z.read("demo-1.0.dist-info/METADATA")
        rows = dict(line.split(",", 1) for line in z.read("demo-1.0.dist-info/RECORD").decode().splitlines())
        assert z.read("demo/__init__.py") == b"x = 1\n"
    requires = [line.split(": ", 1)[1] for line in meta.decode().splitlines() if line.startswith("Requires-Dist")]
    assert requires == ["numba", "opencv-python-headless", 'opencv-python-headless>=4; python_version >= "3.8"']
    digest = base64.urlsafe_b64encode(hashlib.sha256(meta).digest()).rstrip(b"=").decode()
    assert rows["demo-1.0.dist-info/METADATA"] == f"sha256={digest},{len(meta)}"
    before = wheel.read_bytes()
    assert wh.replace_requirements(wheel, replacements) == [] and wheel.read_bytes() == before
    # With the node's headless OpenCV excluded, nothing of OpenCV is carried.
    report = _report({"app": ["demo"], "demo": requires[:2], "numba": [], "opencv-python-headless": []})
    target = wh.Target("3.12", Path(sys.executable), "3.12.1", "manylinux_2_28_x86_64")
    assert set(wh.closure(report, ["app"], {"opencv-python-headless", "numba"}, target.markers())) == {"app", "demo"}


def test_replacements_are_parsed_and_bad_ones_refused():
    assert wh.parse_replacements("opencv-python=opencv-python-headless, A_B=c") == {
        "opencv-python": "opencv-python-headless", "a-b": "c"}
    assert wh.parse_replacements("") == {}
    with pytest.raises(ValueError, match="'opencv-python' is not OLD=NEW"):
        wh.parse_replacements("opencv-python")


def test_the_h200_node_list_names_what_the_node_has():
    """torch 2.11, Triton 3.6, numba, llvmlite, opencv-python-headless, scipy, scikit-image, matplotlib, pytest and
    pytest-timeout; numpy and pillow come with them."""
    assert set(wh.H200_NODE.split(",")) == {"torch", "torchvision", "triton", "numba", "llvmlite",
                                             "opencv-python-headless", "scipy", "scikit-image", "matplotlib", "pytest",
                                             "pytest-timeout", "numpy", "pillow"}
