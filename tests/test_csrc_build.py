"""The C++/CUDA kernels in csrc/ compile here, GPU or not, so a broken build fails CI.

The builds are cached (pipelines.native.build_dir(), a folder per source folder, sources, flags and torch):
a fresh machine pays once — measured on 2 cores at load ~3: ~11-14 s for the CPU LARS kernel (g++), ~19-24 s
for the CUDA one (nvcc for the kernel, g++ for the host part; one architecture, sm_90); at load 4-9, ~20-50 s
for the CPU photometric kernel; a rerun with unchanged sources only loads the libraries (< 1 s).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipelines import native

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="needs a C++ compiler")
def test_cpu_lars_kernel_builds_and_steps():
    module = native.load_lars_cpu()
    p, g, b = torch.ones(5), torch.full((5,), 2.0), torch.zeros(5)
    module.lars_step([p], [g], [b], 0.5, 0.9, 0.0, 1.0, False, True)  # excluded: plain SGD
    torch.testing.assert_close(p, torch.zeros(5))
    torch.testing.assert_close(b, g)


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="needs a C++ compiler")
def test_cpu_photometric_kernel_builds_and_normalizes():
    module = native.load_photometric_cpu()
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 3)
    factors = torch.tensor([[1.0, 1.0, 1.0, 0.0]] * 2)  # identity jitter, no gray / blur / solarize
    order = torch.arange(4).repeat(2, 1)  # each image's jitter order (B, 4)
    out = module.photometric(x, factors, order, torch.zeros(2, dtype=torch.int32), torch.ones(2), 3,
                             torch.full((3,), 2.0), torch.full((3,), -1.0))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, (x.float() / 255) * 2 - 1)


@pytest.mark.skipif(not native.nvcc_available(), reason="needs nvcc (a CUDA toolkit)")
def test_cuda_lars_kernel_compiles_with_nvcc():
    # One architecture keeps the build short and needs no GPU to pick it (H100: 9.0).
    module = native.load_lars_cuda(arch_list="9.0")
    assert callable(module.lars_step)


def test_loading_a_kernel_prints_no_cuda_runtime_warning_on_a_cpu_machine(tmp_path):
    # torch.utils.cpp_extension warns "No CUDA runtime is found, using CUDA_HOME=..." when imported on a machine
    # with a CUDA toolkit (here: CUDA_HOME set) and no GPU (here: none visible): once per rank of every CPU run.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "CUDA_HOME": str(tmp_path)}

    def stderr_of(code: str) -> str:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return proc.stderr

    assert "No CUDA runtime is found" in stderr_of("import torch.utils.cpp_extension")  # the setup shows it
    quiet = stderr_of("from pipelines import native\n"
                      "native.cpp_extension()\n"
                      "native.load_lars_cpu()\n"
                      "import torch.utils.cpp_extension\n")
    assert "No CUDA runtime" not in quiet, quiet


def _fake_layout(tmp_path: Path, *, checkout: bool, packaged: bool) -> tuple[Path, Path]:
    """A repository root and an installed package folder holding copies of csrc/ as asked."""
    repo, package = tmp_path / "repo", tmp_path / "site-packages" / "pipelines"
    package.mkdir(parents=True)
    repo.mkdir()
    if checkout:
        (repo / "pyproject.toml").write_text("[project]\nname = 'fastssl'\n")
        shutil.copytree(ROOT / "csrc", repo / "csrc")
    if packaged:
        shutil.copytree(ROOT / "csrc", package / "csrc")
    return repo, package


@pytest.mark.parametrize("checkout, packaged, expected", [
    (True, False, "repo/csrc"),  # a checkout or an editable install
    (False, True, "site-packages/pipelines/csrc"),  # a wheel or pip install .
    (True, True, "repo/csrc"),  # a checkout wins over a stray copy: csrc/ is the one being edited
])
def test_sources_come_from_the_checkout_else_from_the_installed_copy(tmp_path, monkeypatch, checkout, packaged,
                                                                     expected):
    repo, package = _fake_layout(tmp_path, checkout=checkout, packaged=packaged)
    monkeypatch.setattr(native, "_REPO", repo)
    monkeypatch.setattr(native, "_PACKAGED", package / "csrc")
    assert native.source_dir() == tmp_path / expected


def test_missing_sources_name_both_places(tmp_path, monkeypatch):
    repo, package = _fake_layout(tmp_path, checkout=False, packaged=False)
    (repo / "csrc").mkdir()  # site-packages/csrc of some other distribution: not ours without pyproject.toml
    (repo / "csrc" / "lars_cpu.cpp").write_text("// someone else's\n")
    monkeypatch.setattr(native, "_REPO", repo)
    monkeypatch.setattr(native, "_PACKAGED", package / "csrc")
    with pytest.raises(FileNotFoundError, match=r"repo/csrc .*site-packages/pipelines/csrc"):
        native.source_dir()


def test_build_folders_differ_by_source_folder_content_and_flags(tmp_path, monkeypatch):
    # A checkout and an install (or an edited checkout) must never share a build folder: cpp_extension's ninja
    # file names the sources' paths, so sharing one rebuilds it in turn, and a stale library could be loaded.
    repo, package = _fake_layout(tmp_path, checkout=False, packaged=True)
    other = tmp_path / "other" / "csrc"
    shutil.copytree(ROOT / "csrc", other)

    def key(src: Path, flags: dict | None = None) -> str:
        monkeypatch.setattr(native, "source_dir", lambda: src)
        return native.cache_key("fastssl_lars_cpu", flags or {"extra_cflags": ["-O3"]})

    installed = key(package / "csrc")
    assert key(package / "csrc") == installed  # stable: a second process finds the same folder
    assert key(other) != installed  # same contents, another folder
    assert key(package / "csrc", {"extra_cflags": ["-O2"]}) != installed
    header = package / "csrc" / "dense_layout.h"  # a header counts, not only the compiled file
    header.write_text(header.read_text() + "\n// edited\n")
    assert key(package / "csrc") != installed
