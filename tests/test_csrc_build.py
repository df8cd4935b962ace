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
    out = module.photometric(x, factors, [0, 1, 2, 3], torch.zeros(2, dtype=torch.int32), torch.ones(2), 3,
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
