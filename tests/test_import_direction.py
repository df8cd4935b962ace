"""Imports flow one way: pipelines never imports fastssl (DESIGN.md, "Dependency direction").

Two checks, as an import can hide in two places: every import statement in pipelines/ (function bodies
included, where lazy imports live, and importlib calls naming a module), read from the source; and a fresh
interpreter that imports every pipelines module and runs the CPU photometric stage (which builds or loads
the C++ kernel), with a finder watching for any attempt to import fastssl.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ROOT / "pipelines"


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every absolute import in the file, at any depth, and every
    ``importlib.import_module("x")`` / ``__import__("x")`` with a literal name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def test_no_import_statement_in_pipelines_names_fastssl():
    files = sorted(PIPELINES.rglob("*.py"))
    assert len(files) >= 5, f"found only {files} under {PIPELINES}"
    offenders = [f"{path.relative_to(ROOT)}:{line}: {module}"
                 for path in files for line, module in _imported_modules(path)
                 if module == "fastssl" or module.startswith("fastssl.")]
    assert not offenders, "pipelines must never import fastssl:\n" + "\n".join(offenders)


def test_the_static_check_sees_lazy_and_dynamic_imports(tmp_path):
    # The check above must not pass by missing the forms an import can take.
    sample = tmp_path / "sample.py"
    sample.write_text("import os\n"
                      "def f():\n    from fastssl.optim import lars\n"
                      "def g():\n    import importlib\n    return importlib.import_module('fastssl.kernels')\n"
                      "from . import spec\n")
    assert [m for _, m in _imported_modules(sample)] == ["os", "fastssl.optim", "importlib", "fastssl.kernels"]


_WATCH = r"""
import importlib, importlib.abc, json, pkgutil, sys, warnings

attempts = []

class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "fastssl" or name.startswith("fastssl."):
            attempts.append(name)
        return None  # let the import proceed: a try/except ImportError fallback must not hide it

sys.meta_path.insert(0, Watch())
import pipelines
missing = {}
for info in pkgutil.iter_modules(pipelines.__path__):
    try:
        importlib.import_module("pipelines." + info.name)
    except ImportError as exc:  # an optional backend's package (DALI, FFCV, Triton) not installed here
        if exc.name and exc.name.split(".")[0] in ("fastssl", "pipelines"):
            raise
        missing[info.name] = str(exc)

import torch
from pipelines.photometric import apply_photometric, photometric_path
from pipelines.spec import PRESETS

x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # a kernel that cannot build falls back; the import is what counts here
    path = photometric_path(x)
    apply_photometric(x, PRESETS["byol"](16, 8, None)[0], (0.5,) * 3, (0.25,) * 3, torch.Generator().manual_seed(0))
print(json.dumps({"attempts": attempts, "loaded": sorted(m for m in sys.modules if m.split(".")[0] == "fastssl"),
                  "missing": missing, "path": path}))
"""


def test_importing_and_running_pipelines_never_imports_fastssl():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FASTSSL_PHOTOMETRIC": "auto"}
    proc = subprocess.run([sys.executable, "-c", _WATCH], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["attempts"] == [] and report["loaded"] == [], report
