"""The one builder of native code: JIT builds of the C++/CUDA kernels in ``csrc/`` (torch.utils.cpp_extension,
cached) for both packages: the CPU photometric stage (pipelines.photometric) and the LARS steps
(fastssl.optim.lars). It lives in pipelines, the lower of the two packages, because pipelines never imports
fastssl; it imports nothing of either.

Where the sources are (``source_dir()``): in a checkout (or an editable install), ``csrc/`` at the top of the
repository, the source of truth; in a wheel or a ``pip install .``, ``pipelines/csrc/``, where setup.py's
build hook copies them at build time. Nothing is compiled at install time, so ``pip install`` works without
nvcc; a kernel is built on first use, the CUDA one only where a CUDA toolkit is found.

The first call compiles (on 2 loaded cores: ~11-14 s for the CPU LARS kernel with g++, ~19-24 s for the CUDA
one with nvcc and g++, one architecture; narrow includes, not torch/extension.h, halve both) into
``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/fastssl/torch_extensions``; later calls, in any process, load the
cached library in well under a second. Each kernel gets its own folder ``<name>-<key>``, the key hashing
the folder of the sources, their contents, the flags, and the torch and Python versions: a checkout and an
install (or two installs with different torch) never share, and so never rebuild each other's copy nor
load a library built from other sources. The CUDA architecture is part of ``<name>``.
A failed build is remembered for the process, so callers can fall back without retrying each step.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

# Every file a kernel compiles from, sources and the headers they include (one folder: includes are "x.h").
SOURCE_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")

_PACKAGED = Path(__file__).resolve().parent / "csrc"  # a wheel / pip install . (copied by setup.py)
_REPO = Path(__file__).resolve().parents[1]  # a checkout: pyproject.toml and csrc/ beside pipelines/

_lock = threading.Lock()
_loaded: dict[str, ModuleType | BaseException] = {}


def source_dir() -> Path:
    """The folder holding the kernel sources: the checkout's ``csrc/`` when this module runs from a checkout,
    else the copy installed with the package. Raises FileNotFoundError naming both places when neither
    holds them (an install built without setup.py's hook)."""
    checkout = _REPO / "csrc"
    # pyproject.toml marks a checkout: an install's parent folder is site-packages, whose csrc/ (if any)
    # would belong to some other distribution.
    if (_REPO / "pyproject.toml").is_file() and (checkout / "lars_cpu.cpp").is_file():
        return checkout
    if (_PACKAGED / "lars_cpu.cpp").is_file():
        return _PACKAGED
    raise FileNotFoundError(
        f"the native kernel sources are missing: neither {checkout} (a checkout) nor {_PACKAGED} (an installed "
        "package) holds lars_cpu.cpp; reinstall fastssl from a wheel built with its setup.py (pip wheel .), "
        "which ships csrc/ as pipelines/csrc/")


def build_dir() -> Path:
    """Where compiled extensions are cached: ``$TORCH_EXTENSIONS_DIR`` or ``~/.cache/fastssl/torch_extensions``."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "fastssl" / "torch_extensions"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_key(name: str, flags: dict) -> str:
    """16 hex digits naming one build: the source folder and every file in it, ``flags`` (the keyword arguments
    of cpp_extension.load), torch (version, CUDA version), Python and the machine. The folder is part of it
    because cpp_extension's ninja file records source paths: two source folders sharing a build folder
    would rebuild it in turn (and one process could load a library while the other replaces it)."""
    import torch

    src = source_dir()
    digest = hashlib.sha256()
    for part in (name, str(src), repr(sorted(flags.items())), torch.__version__, str(torch.version.cuda),
                 sys.implementation.cache_tag, platform.machine()):
        digest.update(part.encode() + b"\0")
    for path in sorted(p for p in src.iterdir() if p.suffix in SOURCE_SUFFIXES):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


class _DropCudaRuntimeWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


def cpp_extension() -> ModuleType:
    """``torch.utils.cpp_extension``, imported without its "No CUDA runtime is found, using CUDA_HOME" warning.

    On import it guesses a CUDA toolkit and warns when the machine has one but no GPU: on a CPU run that is
    expected, says nothing useful, and was printed once per rank. Where a CUDA build needs the toolkit,
    ``cuda_home()`` checks it and ``load_lars_cuda`` says when it is missing."""
    module = sys.modules.get("torch.utils.cpp_extension")
    if module is not None:
        return module
    logger = logging.getLogger("torch.utils.cpp_extension")
    quiet = _DropCudaRuntimeWarning()
    logger.addFilter(quiet)
    try:
        from torch.utils import cpp_extension as module
    finally:
        logger.removeFilter(quiet)
    return module


def cuda_home() -> str | None:
    """The CUDA toolkit root, or None. torch guesses it from ``which nvcc``; where that nvcc is a wrapper
    script (``/usr/local/bin/nvcc`` here), the guess has no ``lib64/libcudart.so`` and linking fails, so
    the guess is checked and ``/usr/local/cuda`` tried next; cpp_extension is pointed at the result."""
    ext = cpp_extension()
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), ext.CUDA_HOME, "/usr/local/cuda"]
    for root in candidates:
        if root and (Path(root) / "bin" / "nvcc").exists() and any(
                (Path(root) / lib / "libcudart.so").exists() for lib in ("lib64", "lib")):
            ext.CUDA_HOME = root
            return root
    return None


def nvcc_available() -> bool:
    """True when nvcc is installed (on PATH or under a CUDA toolkit root), GPU or not: the CUDA kernel must
    then compile, and a toolkit that cannot build it is an error, not a reason to skip."""
    return shutil.which("nvcc") is not None or cuda_home() is not None


def _load(name: str, sources: list[str], **kwargs) -> ModuleType:
    with _lock:
        cached = _loaded.get(name)
        if isinstance(cached, ModuleType):
            return cached
        if cached is not None:
            raise RuntimeError(f"building {name} failed earlier in this process") from cached
        try:
            src = source_dir()
            directory = build_dir() / f"{name}-{cache_key(name, kwargs)}"
            directory.mkdir(parents=True, exist_ok=True)
            module = cpp_extension().load(
                name=name, sources=[str(src / s) for s in sources], build_directory=str(directory),
                verbose=False, **kwargs,
            )
        except Exception as exc:  # noqa: BLE001 - compiler errors arrive as several exception types
            _loaded[name] = exc
            raise
        _loaded[name] = module
        return module


def load_lars_cpu() -> ModuleType:
    """The fused CPU LARS kernel (``csrc/lars_cpu.cpp``): ``lars_step(params, grads, bufs, lr, momentum,
    weight_decay, eta, nesterov, exclude)`` over lists of fp32 CPU tensors."""
    # No implicit contraction: the kernel places its FMAs where torch's ops have them (bit-identical updates).
    # No -fopenmp, on purpose: at::parallel_for (inline in the headers) then runs serially. Measured on the
    # shared 2-core machine (load ~3.5, bench_optim, 2026-11-23): serial 57-60 ms per ResNet-50 step, with
    # OpenMP 346-347 ms, as every barrier waits for a preempted thread; the step is memory-bound anyway.
    flags = ["-O3", "-ffp-contract=off"] + (["-mfma"] if _cpu_has_fma() else [])
    return _load("fastssl_lars_cpu", ["lars_cpu.cpp"], extra_cflags=flags)


def _cpu_has_fma() -> bool:
    return "fma" in _cpu_flags()


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line's value in ``/proc/cpuinfo``, or None (no such line, or no such file)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def _cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where it cannot be read)."""
    return set((_cpuinfo("flags") or "").split())


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows: the name every benchmark records."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def load_photometric_cpu() -> ModuleType:
    """The fused CPU photometric stage (``csrc/photometric_cpu.cpp``): ``photometric(x, factors, order, flags,
    sigma, kernel, scale, bias)`` -> normalized float32 channels-last views; see pipelines.photometric."""
    # -fopenmp makes at::parallel_for (inline in the headers) use torch's OpenMP pool; the symbols resolve to
    # the libgomp that libtorch_cpu already loads. No FMA contraction: products round as torch's separate
    # ops do (the kernel calls fma where it wants one). -fno-trapping-math lets the compiler turn the selects
    # (hue, solarize) into vector blends; it changes no value. AVX2 (256-bit integer widening for the uint8
    # loads) and FMA (the blur's multiply-adds) where the CPU has them; the flags are part of the cache key,
    # so a machine without them builds its own copy.
    cpu = _cpu_flags()
    flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
    flags += [f"-m{f}" for f in ("avx2", "fma") if f in cpu]
    return _load("fastssl_photometric_cpu", ["photometric_cpu.cpp"], extra_cflags=flags)


def load_lars_cuda(arch_list: str | None = None) -> ModuleType:
    """The multi-tensor CUDA LARS kernel (``csrc/lars_cuda.cu`` + binding ``csrc/lars_cuda.cpp``):
    ``lars_step(params, grads, bufs, group_index, lr, momentum, weight_decay, eta, nesterov, exclude)``.

    ``arch_list`` (e.g. ``"9.0"``) is the ``TORCH_CUDA_ARCH_LIST`` of the build; it lets the kernel compile
    on a machine without a GPU and keeps the build short (one architecture). By default: the current GPU's.
    The architecture is part of the cached module's name, as cpp_extension's cache key ignores it.
    """
    if cuda_home() is None:
        raise RuntimeError("no CUDA toolkit (nvcc + libcudart) found; set CUDA_HOME")
    if arch_list is None:
        import torch

        major, minor = torch.cuda.get_device_capability()
        arch_list = f"{major}.{minor}"
    name = "fastssl_lars_cuda_sm" + "_".join(a.replace(".", "") for a in arch_list.split(";"))
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    try:
        # No implicit FMA contraction: the kernel writes its FMAs where torch's ops have them.
        return _load(name, ["lars_cuda.cpp", "lars_cuda.cu"], extra_cflags=["-O3"],
                     extra_cuda_cflags=["-O3", "--fmad=false"])
    finally:
        if saved is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved
