"""Build hook only; everything else about the package is in pyproject.toml.

csrc/ (the C++/CUDA kernel sources) stays at the top of the repository, the one copy anyone edits. A wheel
or a `pip install .` ships it as pipelines/csrc/, copied here at build time, where pipelines.native (the
builder) finds it when no checkout is around. Nothing is compiled here: the kernels build on first use
(the CUDA one only where a CUDA toolkit is), so installing needs no compiler and no nvcc.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.errors import FileError

CSRC = "csrc"  # relative to this file's folder, where pip and setuptools run the build
SHIPPED_AS = ("pipelines", "csrc")
SUFFIXES = (".cpp", ".cu", ".h", ".cuh")  # keep in step with pipelines.native.SOURCE_SUFFIXES


def csrc_files() -> list[Path]:
    """The kernel sources to ship; a missing csrc/ is an error, not a wheel without kernels."""
    files = sorted(p for p in Path(CSRC).glob("*") if p.suffix in SUFFIXES)
    if not files:
        raise FileError(f"{Path(CSRC).resolve()} holds no kernel sources ({', '.join(SUFFIXES)}): build from a "
                        "checkout or an sdist of fastssl, which carry csrc/")
    return files


class BuildPyWithCsrc(build_py):
    """build_py that also copies csrc/*.{cpp,cu,h,cuh} into pipelines/csrc/ of the build (and lists them
    as sources, so an sdist carries csrc/ too)."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install imports the checkout, where the builder finds csrc/ itself
            return
        for src, dst in self._csrc_mapping().items():
            self.mkpath(str(Path(dst).parent))
            self.copy_file(src, dst, preserve_mode=False)

    def _csrc_mapping(self) -> dict[str, str]:
        target = Path(self.build_lib, *SHIPPED_AS)
        return {str(p): str(target / p.name) for p in csrc_files()}

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = super().get_outputs(include_bytecode)
        return outputs if self.editable_mode else outputs + list(self._csrc_mapping().values())

    def get_source_files(self) -> list[str]:
        return super().get_source_files() + [str(p) for p in csrc_files()]


setup(cmdclass={"build_py": BuildPyWithCsrc})
