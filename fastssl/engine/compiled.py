"""``train.compile``: the training step's model compute through ``torch.compile``.

What is compiled: the method's whole forward (backbone, heads, per-view BatchNorm, the loss twins) as one graph,
wrapped around the DDP module where there is one (DDP's own compiler support splits the graph at its buckets).
Multi-crop methods get one graph for the whole step, both resolutions inside it, so a step never recompiles;
``graphs()`` counts the graphs compiled so far and the trainer logs it, so a recompilation storm shows. The
fused Triton loss kernels step aside inside a compiled step (``fastssl.kernels.use_triton``): the compiler fuses
the reference twins with their neighbours itself. The kNN evaluation, the probe and the EMA use the plain
modules: only the training forward is compiled.

The default per device type (``train.compile=auto``) is the measured one (BENCHMARKS.md, "Memory format and
compile"): off on CPUs, where the compiled step was no faster than eager in the faster layout and the first
compile costs a minute or more; off on CUDA until ``scripts/gpu_check.py`` has measured it on a GPU.

Inductor's caches go to ``<fastssl cache>/inductor`` (``TORCHINDUCTOR_CACHE_DIR`` overrides), so a second run
of the same model finds its compiled code there and starts in seconds. Without a C++ compiler (inductor's CPU
backend needs one) the run warns once and stays eager. ``FASTSSL_COMPILE_BACKEND`` picks another torch.compile
backend (``aot_eager``: dynamo and AOT autograd without inductor's code generation, to tell a tracing problem from
a code-generation one, and the tests' cheap way through dynamo).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from fastssl.engine.layout import AUTO, cache_dir
from pipelines import progress

# train.compile=auto per device type, as measured (module docstring).
DEFAULT_COMPILE = {"cpu": False, "cuda": False}


def wanted(setting: object, device: torch.device) -> bool:
    """Whether the run compiles: ``setting`` True/False, or "auto" = the measured default for the device type."""
    if setting == AUTO:
        return DEFAULT_COMPILE.get(device.type, False)
    return bool(setting)


def _cxx_compiler() -> str | None:
    """The C++ compiler inductor would use on a CPU (``$CXX``, else the usual names), or None."""
    names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++", "c++"]
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


class _DropNoCudaRuntime(logging.Filter):
    """torch.utils.cpp_extension logs "No CUDA runtime is found" whenever inductor loads it on a machine without a
    GPU: true, expected, and no concern of a CPU run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No CUDA runtime is found" not in record.getMessage()


def prepare(device: torch.device) -> str | None:
    """Set up the persistent cache and the log filter; the reason compilation cannot run here, or None."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # Torch writes its default (a folder under /tmp, gone at a reboot or on a fresh node) into the variable as soon
    # as anything asks for it, so only a value other than that default is the user's own choice.
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")
    if device.type == "cpu":
        logging.getLogger("torch.utils.cpp_extension").addFilter(_DropNoCudaRuntime())
        if _cxx_compiler() is None:
            return ("no C++ compiler was found ($CXX, g++, clang++ or c++), which torch.compile needs on a CPU; "
                    "install one (apt-get install g++) to compile")
    return None


def compile_model(model: nn.Module, mode: str, device: torch.device) -> nn.Module | None:
    """``torch.compile(model, mode=mode)``, or None after one warning where compilation cannot run."""
    why = prepare(device)
    if why is not None:
        warnings.warn(f"train.compile: {why}; training eagerly", RuntimeWarning, stacklevel=2)
        return None
    if mode == "reduce-overhead" and device.type != "cuda":
        mode = "default"  # CUDA graphs: nothing to capture on a CPU
    backend = os.environ.get("FASTSSL_COMPILE_BACKEND", "inductor")
    if backend != "inductor":  # modes are inductor's
        return torch.compile(model, backend=backend, dynamic=False)
    return torch.compile(model, mode=mode, dynamic=False)


def graphs() -> int:
    """How many graphs dynamo has compiled in this process so far (one per distinct input signature)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class TrainingForward:
    """The training step's forward: ``model(views)``, compiled when ``setting`` asks for it (``wanted``).

    The first call of a compiled model compiles it, with a line before and after on the main rank; where the
    compiler fails it warns once, calls ``restore`` (to undo what the failed call changed, e.g. BatchNorm
    statistics) and uses the eager model from then on. ``log_row()`` gives the metrics of a log window: the graphs
    compiled for this run so far, with a warning line when their number grew (a recompilation)."""

    def __init__(self, model: nn.Module, setting: object, mode: str, device: torch.device, announce: bool):
        self.eager = self.model = model
        self.mode, self.announce = mode, announce
        self._pending = False
        self._base = self._logged = 0  # dynamo counts graphs per process: earlier runs in it are not this one's
        if wanted(setting, device):
            fast = compile_model(model, mode, device)
            if fast is not None:
                self.model, self._pending = fast, True

    @property
    def compiled(self) -> bool:
        return self.model is not self.eager

    def __call__(self, views: list[torch.Tensor], restore: Callable[[], None]) -> tuple[torch.Tensor, dict]:
        if not self._pending:
            return self.model(views)
        self._pending = False
        if self.announce:
            progress.write(f"train.compile: compiling the training step (mode {self.mode}; the first run of a model "
                           f"on a machine takes a minute or more, later ones load it from "
                           f"{os.environ.get('TORCHINDUCTOR_CACHE_DIR')})...")
        t0 = time.perf_counter()
        self._base = graphs()
        try:
            out = self.model(views)
        except Exception as exc:  # noqa: BLE001 - the compiler fails in many ways (missing headers, a lowering)
            restore()
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            warnings.warn(f"train.compile: compiling failed ({type(exc).__name__}: {first}); training eagerly",
                          RuntimeWarning, stacklevel=2)
            self.model = self.eager
            return self.model(views)
        self._logged = graphs() - self._base
        if self.announce:
            progress.write(f"train.compile: compiled in {time.perf_counter() - t0:.1f} s ({self._logged} graph(s))")
        return out

    def log_row(self) -> dict:
        """``{"compiled_graphs": n}`` for a compiled run (empty for an eager one), warning when n grew."""
        if not self.compiled:
            return {}
        count = graphs() - self._base
        if count > self._logged and self.announce:
            progress.write(f"warning: train.compile recompiled the step: {count} graphs now, {self._logged} before "
                           "(TORCH_LOGS=recompiles prints why)")
        self._logged = count
        return {"compiled_graphs": count}
