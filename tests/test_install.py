"""fastssl as a user installs it: a wheel in a fresh virtualenv keeps every native kernel a checkout has.

The wheel is built the way a release is (sdist, then a wheel from the sdist, so the sdist must carry csrc/),
installed with pip into a new virtualenv with torch from a local wheel file, and used from a temporary
folder outside the checkout: fastssl-convert, then `torchrun -m fastssl.train` for 3 steps. The kernels are
built from the installed copy of the sources (pipelines/csrc/) into a fresh TORCH_EXTENSIONS_DIR.

Measured on the shared 2-core machine (2026-12-02), at load ~10: 5 min 40 s in all; pip install 102 s (torch
with its CUDA libraries: ~5.5 GB unpacked, deleted at the end), fastssl-convert 22 s, the 3-step run 88 s
(with the LARS kernel's first build), the check 70 s (with the photometric kernel's first build); at load ~12:
9 min 13 s (128, 28, 219 and 110 s). Not measured on an idle machine.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote

import pytest
from packaging.tags import sys_tags
from packaging.utils import parse_wheel_filename
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[1]
CSRC = sorted(p for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".cu", ".h", ".cuh"))
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # the Debian package dataset-fashion-mnist
KERNELS = ("fastssl_lars_cpu", "fastssl_photometric_cpu")


def _run(cmd: list, timeout: float, log: dict, label: str, **kwargs) -> subprocess.CompletedProcess:
    """Run ``cmd``, record its wall time in ``log[label]``, and fail with its output unless it exits 0."""
    t0 = time.monotonic()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    log[label] = round(time.monotonic() - t0, 1)
    assert proc.returncode == 0, (f"{shlex.join(str(c) for c in cmd)} exited {proc.returncode}\n"
                                  f"stdout: {proc.stdout[-3000:]}\nstderr: {proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """sdist of the checkout, then a wheel built from that sdist (in pip's own temporary folder, so no stale
    build/ of the checkout can leak into it)."""
    dist = tmp_path_factory.mktemp("dist")
    times: dict = {}
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    built = _run([sys.executable, "-c", code, dist], 300, times, "sdist", cwd=ROOT)
    sdist = dist / built.stdout.strip().splitlines()[-1]
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, sdist],
         300, times, "wheel")
    (whl,) = dist.glob("fastssl-*.whl")
    return whl


def test_the_wheel_ships_every_csrc_source_as_pipelines_csrc(wheel):
    with zipfile.ZipFile(wheel) as zf:
        shipped = {n.removeprefix("pipelines/csrc/"): zf.read(n) for n in zf.namelist()
                   if n.startswith("pipelines/csrc/")}
        names = zf.namelist()
    assert shipped == {p.name: p.read_bytes() for p in CSRC}
    assert "pipelines/native.py" in names and "fastssl/train.py" in names
    assert not any(n.startswith("csrc/") for n in names)  # no top-level csrc/ in site-packages
    # The canonical ImageNet label subsets travel inside the package, with their source and license.
    subsets = ROOT / "fastssl" / "eval" / "imagenet_subsets"
    with zipfile.ZipFile(wheel) as zf:
        for p in sorted(subsets.iterdir()):
            assert zf.read(f"fastssl/eval/imagenet_subsets/{p.name}") == p.read_bytes()
    assert sorted(p.name for p in subsets.iterdir()) == ["10percent.txt.xz", "1percent.txt.xz", "SOURCE.md"]


def _pip_local_sources() -> tuple[list[Path], list[Path]]:
    """(find-links folders, file:// simple-index folders) in pip's configuration and environment."""
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                          timeout=60)
    links, indexes = [], []
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        for entry in value.strip().strip("'\"").split():
            path = Path(entry.removeprefix("file://"))
            if key.endswith("find-links") and path.is_dir() and path not in links:
                links.append(path)
            elif key.endswith("index-url") and entry.startswith("file://") and path not in indexes:
                indexes.append(path)
    if os.environ.get("FASTSSL_TORCH_WHEELS"):
        links.insert(0, Path(os.environ["FASTSSL_TORCH_WHEELS"]))
    return links, indexes


def _local_wheel(project: str, version: str, links: list[Path], indexes: list[Path]) -> Path | None:
    """A wheel file of ``project==version`` on this disk that installs on this interpreter, or None."""
    candidates = [p for folder in links for p in folder.glob(f"{project}-*.whl")]
    for index in indexes:  # a simple index on disk: <index>/<project>/index.html links the files
        page = index / project / "index.html"
        if page.is_file():
            candidates += [(page.parent / unquote(href)).resolve()
                           for href in re.findall(r'href="([^"#]+)', page.read_text())]
    supported = set(sys_tags())
    for path in candidates:
        if path.is_file() and path.suffix == ".whl":
            name, found, _, tags = parse_wheel_filename(path.name)
            if name == project and found == Version(version) and tags & supported:
                return path
    return None


def _is_version(text: str) -> bool:
    try:
        Version(text)
        return True
    except InvalidVersion:  # a legacy version string pip would refuse in a constraints file
        return False


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_installed_wheel_converts_trains_with_torchrun_m_and_loads_its_fused_kernels(wheel, tmp_path):
    # torch and torchvision: the versions this interpreter runs (a pair that works with fastssl and with each
    # other), from wheel files on this disk. Not the CPU-only torch in pip's find-links here (/opt/wheels,
    # 2.13.0+cpu): PyPI's torchvision wheels link torch's CUDA libraries, and no CPU torchvision is local.
    links, indexes = _pip_local_sources()
    versions = {name: metadata.version(name) for name in ("torch", "torchvision")}
    local = {name: _local_wheel(name, version, links, indexes) for name, version in versions.items()}
    if local["torch"] is None:
        pytest.skip(f"torch cannot be installed offline here: no wheel of torch=={versions['torch']} for this "
                    f"Python in pip's find-links {[str(p) for p in links]} or file:// indexes "
                    f"{[str(p) for p in indexes]}; set FASTSSL_TORCH_WHEELS to a folder holding one")
    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian package dataset-fashion-mnist not installed (scripts/setup.sh installs it)")
    times: dict = {}
    venv = tmp_path / "venv"
    (tmp_path / "work").mkdir()
    # No pip inside the venv: this interpreter's pip installs into it (--python), a few seconds less.
    _run([sys.executable, "-m", "venv", "--without-pip", venv], 120, times, "venv")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "TORCH_EXTENSIONS_DIR")}
    env.update(PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    # Every other dependency from pip's configured sources, at the version this interpreter has (the set the
    # test suite passes with; a new release elsewhere cannot break this test). --no-compile: byte-compiling
    # torch's ~5,000 modules is tens of seconds on 2 cores, and the run compiles what it imports anyway.
    pins = tmp_path / "constraints.txt"
    pins.write_text("".join(f"{d.metadata['Name']}=={d.version}\n" for d in metadata.distributions()
                            if d.metadata["Name"] and d.metadata["Name"].lower() != "fastssl"
                            and _is_version(d.version)))
    try:
        _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-compile",
              "--prefer-binary", "-c", pins, *[p for p in local.values() if p], wheel], 1500, times, "pip install",
             env=env)
        _use_the_install(venv, tmp_path, env, times)
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # ~5.5 GB with torch's CUDA libraries


def _use_the_install(venv: Path, tmp_path: Path, env: dict, times: dict) -> None:
    work, ext = tmp_path / "work", tmp_path / "torch_extensions"
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", TORCH_EXTENSIONS_DIR=str(ext))
    _run([venv / "bin" / "fastssl-convert", "fashion-mnist", "data", "--limit", "train=256,val=128",
          "--workers", "1", "--no-progress"], 300, times, "convert", cwd=work, env=env)
    train = _run([venv / "bin" / "torchrun", "--standalone", "--nproc_per_node=1", "-m", "fastssl.train",
                  "--config", "byol_resnet18_fmnist", "data.path=data", "train.max_steps=3", "train.batch_size=32",
                  "out_dir=run", "train.progress=false", "eval.knn=false"], 900, times, "train", cwd=work, env=env)
    assert json.loads(train.stdout.strip().splitlines()[-1])["steps"] == 3
    for line in ("unavailable", "No CUDA runtime", "Traceback"):  # the fallback warnings say "... is unavailable"
        assert line not in train.stderr, train.stderr[-6000:]

    # The run built the LARS kernel from the installed sources into the fresh extension cache. (Fashion-MNIST is
    # gray, and gray batches take the photometric stage's torch path: the check below runs the C++ one on RGB.)
    assert [p.name.rpartition("-")[0] for p in ext.iterdir()] == ["fastssl_lars_cpu"], list(ext.iterdir())

    # What the training paths pick, in the install: LARS's fused_cpu step (the run's library, loaded from the
    # cache) and the photometric stage's C++ kernel (built now), whose output matches its torch twin.
    check = r"""
import json, os, warnings
import torch, fastssl, pipelines
from pipelines import native, photometric
from pipelines.spec import PRESETS
from fastssl.optim import lars
p, g, b = [torch.ones(3, 4)], [torch.full((3, 4), 0.5)], [torch.zeros(3, 4)]
x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
view = PRESETS["byol"](16, 8, None)[1]  # jitter, gray, blur and solarize all possible
with warnings.catch_warnings(record=True) as caught:  # a kernel that fails to load warns and falls back
    warnings.simplefilter("always")
    got = {"lars": lars._resolve("auto", p, g, b), "photometric": photometric.photometric_path(x)}
    out = photometric.apply_photometric(x, view, (0.5,) * 3, (0.25,) * 3, torch.Generator().manual_seed(1))
os.environ["FASTSSL_PHOTOMETRIC"] = "torch"
ref = photometric.apply_photometric(x, view, (0.5,) * 3, (0.25,) * 3, torch.Generator().manual_seed(1))
got.update(fastssl=fastssl.__file__, pipelines=pipelines.__file__, sources=str(native.source_dir()),
           warnings=[str(w.message) for w in caught], max_diff=(out - ref).abs().max().item(),
           libraries=[native.load_lars_cpu().__file__, native.load_photometric_cpu().__file__])
print(json.dumps(got))
"""
    got = json.loads(_run([venv / "bin" / "python", "-c", check], 600, times, "check", cwd=work, env=env).stdout)
    site = Path(got["pipelines"]).parent.parent
    assert site.is_relative_to(venv) and Path(got["fastssl"]).is_relative_to(site), got
    assert got["sources"] == str(site / "pipelines" / "csrc"), got
    assert (got["lars"], got["photometric"], got["warnings"]) == ("fused_cpu", "cpp", []), got
    assert got["max_diff"] < 1e-5, got  # tests/test_photometric_cpp.py's tolerance
    assert [Path(lib).parent.parent for lib in got["libraries"]] == [ext, ext], got
    for name in KERNELS:  # each built once, from the installed copy of csrc/
        (folder,) = ext.glob(f"{name}-*")
        assert str(site / "pipelines" / "csrc" / "") in (folder / "build.ninja").read_text(), name
    print("test_install seconds:", times)


def test_setups_pip_filter_folds_the_known_notices_and_passes_everything_else():
    """scripts/pip_quiet.awk on pip output as it reaches the demo's log (the notice text as setuptools 80 prints
    it): the editable-install box and the repeated index-folder warnings become one line each; an error stays."""
    import shutil
    import subprocess

    awk = shutil.which("awk")
    assert awk is not None, "scripts/setup.sh pipes pip through awk: install it (apt-get install -y gawk)"
    notice = (
        "  /venv/lib/python3.11/site-packages/setuptools/command/editable_wheel.py:354: BuildBackendWarning: "
        "Editable installation.\n  !!\n  \n          " + "*" * 80 + "\n"
        "          Please be careful with folders in your working directory with the same\n"
        "          name as your package as they may take precedence during imports.\n          " + "*" * 80 + "\n"
        "  \n  !!\n    with strategy, WheelFile(wheel_path, \"w\") as wheel_obj:\n")
    folder = "WARNING: Location '/srv/wheels' is ignored: it is neither a file nor a directory.\n"
    text = folder + "Collected one line\n" + notice + folder + "ERROR: No matching distribution found for x\n"
    out = subprocess.run([awk, "-f", str(ROOT / "scripts" / "pip_quiet.awk")], input=text, text=True,
                         capture_output=True, check=True).stdout.splitlines()
    assert out == ["Collected one line", "ERROR: No matching distribution found for x",
                   "[setup] pip: 2 warnings about configured index folders that do not exist here",
                   "[setup] pip: setuptools notes that the install is editable (imports read this checkout)"]
