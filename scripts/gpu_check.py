"""Every GPU claim of fastssl checked in one command on a CUDA machine, within a time budget.

    python scripts/gpu_check.py --out DIR [--budget-min 12] [--steps a,b,...] [--plan | --dry-run]

Steps, most valuable first, each with a time cap (``--plan`` prints each one's exact command, its cap and the
budget; ``--dry-run`` runs each step's CPU-possible part here, see below):

  machine          GPU, driver, torch / CUDA and backend versions -> machine.json
  images           scripts/make_bench_images.py: ImageNet-like JPEGs, made here (nothing to carry)
  convert          fastssl-convert of those images to shards and .beton
  loader           1. scripts/bench_loader.py, DALI on the GPU (nvJPEG), SwAV recipe (2x224 + 6x96), batch 256:
                   img/s, and the training thread's ms per batch inside the loader
  train            2. scripts/bench_train.py, SwAV ResNet-50 end to end (bf16, channels-last, eager) with each
                   loader (dali, ffcv, torch): img/s and data-wait %, and the plain reference loop in the same run
  train_decode     3. the same with the torch backend and data.decode=device (its own run: the other backends
                   refuse data.decode=device)
  decode_profile   3. scripts/profile_device_decode.py: where data.decode=device spends its time, per decoder
  train_compiled   4. the SwAV ResNet-50 run on DALI with train.compile=true, against step 2's eager dali figure
  step_layout      4. scripts/bench_step.py: BYOL ResNet-50's own step (batch 128, bf16), channels-last vs NCHW,
                   eager vs compiled (what train.channels_last / train.compile=auto should pick on CUDA)
  gpu_tests        5. pytest -m gpu (every test that needs CUDA)
  equivalence      5. tests/test_backend_equivalence.py with FASTSSL_TEST_DEVICE=cuda: dali, ffcv and torch (its
                   worker, RAM-cache and device-decode modes) draw the spec's augmentation on the GPU
  kernels          6. scripts/bench_kernels.py: fused Triton losses against their eager twins
  optim            6. scripts/bench_optim.py: LARS paths (one fused CUDA launch vs loops) and the EMA update
  photometric      6. scripts/bench_photometric.py: the Triton photometric chain against the torch path, SwAV
                   views, batch 256, each image's own jitter order against one order per batch (its cost)

Each step runs as its own process group with a time cap (killed when it runs past it) and its log in
DIR/logs/. A step that fails or times out is recorded with the tail of its log, and the next one runs; a
step whose input step failed is skipped, and so is every step once the budget is spent (each cap is
also cut to what is left of it). After every step DIR/gpu_check.json and DIR/gpu_check.md (a table with
each step's figures) are rewritten atomically, so a session that ends early still leaves the results so far.
Exit status: 0 when every step passed, 1 otherwise.

``--dry-run`` (on any machine, no GPU needed) runs every step in DIR/dry-run with its GPU-only values swapped
for CPU ones and its sizes cut down (``Step.dry``: the device, batch sizes, repeats, the model's width and the
view sizes): the same scripts, options, overrides and imports, so a wrong flag, a config key that does not exist
or a missing import is found there and not in the GPU window. The GPU tests are collected and skipped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_JSON, RESULTS_MD = "gpu_check.json", "gpu_check.md"
KILL_GRACE_S = 5  # after SIGTERM to the group, SIGKILL if it is still there
MIN_STEP_S = 10  # a step is not started with less budget than this
DEFAULT_BUDGET_MIN = 11.0  # one 15-minute GPU window less the machine's start and the wheelhouse's install
DRY_CAP_S = 600  # a dry-run step's cap: a shared CPU is slower than the GPU node at some of them


@dataclass
class Step:
    """One command of the check. ``needs``: steps that must have passed (else this one is skipped).

    ``dry``: how the dry run changes the command for a CPU: ``{"--flag": "value"}`` replaces a flag's value,
    ``{"key=": "value"}`` a ``key=value`` override (added when absent); ``dry_env``: the environment there.
    """

    name: str
    what: str
    cmd: list[str]
    cap_s: float
    env: dict[str, str] = field(default_factory=dict)
    needs: tuple[str, ...] = ()
    figures_from: str | None = None  # a JSON the command writes, read into the record's figures
    dry: dict[str, str] = field(default_factory=dict)
    dry_env: dict[str, str] | None = None


# The dry run's training runs: the recipe and its overrides as on the GPU, the model and views shrunk for a CPU.
_DRY_TRAIN = {"--window": "1", "--repeats": "1", "--workers": "1", "train.batch_size=": "16", "model.width=": "8",
              "data.global_size=": "32", "data.local_size=": "16", "data.num_workers=": "1"}


# ---- the plan ---------------------------------------------------------------------------------------------
def plan(out: Path, python: str = sys.executable, cores: int | None = None) -> list[Step]:
    """The steps of a full check writing into ``out``, with the exact commands, most valuable first."""
    cores = cores or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    workers = max(1, cores - 2)  # the main process and the GPU feeder keep a core each
    bench = out / "bench"
    images, data = bench / "images", bench / "data"
    cuda = {"FASTSSL_TEST_DEVICE": "cuda"}
    swav = ["--method", "swav", "--config", "swav_resnet50_imagenet", "--window", "5", "--repeats", "2"]
    train_common = [f"data.path={data}", "train.batch_size=128", "train.precision=bf16", "train.channels_last=true",
                    f"data.num_workers={workers}"]
    script = lambda name: str(ROOT / "scripts" / name)  # noqa: E731
    return [
        Step("machine", "GPU, driver and package versions", [python, script("gpu_check.py"), "--machine-info",
                                                               str(out / "machine.json")], 30,
             figures_from=str(out / "machine.json")),
        Step("images", "bench images (make_bench_images.py)",
             [python, script("make_bench_images.py"), "--out", str(images), "--n", "1024", "--no-progress"], 40,
             dry={"--n": "48"}),
        Step("convert", "shards + .beton of the bench images",
             [python, "-m", "fastssl.convert", str(images), str(data), "--formats", "wds,ffcv", "--max-side", "65536",
              "--ffcv-max-side", "520", "--workers", str(cores), "--overwrite", "--no-progress"], 40,
             needs=("images",), dry={"--workers": "2"}),
        Step("loader", "1. DALI loader on the GPU, SwAV 2x224 + 6x96, batch 256: img/s, training-thread ms",
             [python, script("bench_loader.py"), "--images", str(images), "--work", str(bench / "loader"),
              "--recipe", "swav", "--backends", "dali", "--device", "cuda", "--batch-size", "256", "--batches", "16",
              "--warmup", "4", "--repeats", "2", "--json", str(out / "bench_loader.json"),
              "--plot", str(out / "bench_loader.png")], 90,
             needs=("images",), figures_from=str(out / "bench_loader.json"),
             dry={"--device": "cpu", "--batch-size": "8", "--batches": "1", "--warmup": "1", "--repeats": "1",
                  "--workers": "1"}),
        Step("train", "2. SwAV ResNet-50 end to end, eager, dali + ffcv + torch, reference loop",
             [python, script("bench_train.py"), *swav, "--backend", "dali,ffcv,torch", "--workers", str(cores),
              "--json", str(out / "bench_train.json"), "--plot", str(out / "bench_train.png"), *train_common,
              "train.compile=false"], 200,
             needs=("convert",), figures_from=str(out / "bench_train.json"), dry=_DRY_TRAIN),
        Step("train_decode", "3. SwAV ResNet-50 end to end, torch with data.decode=device",
             [python, script("bench_train.py"), *swav, "--backend", "torch", "--skip-reference",
              "--json", str(out / "bench_train_decode.json"), *train_common, "train.compile=false",
              "data.decode=device", "data.cache=none"],
             70, needs=("convert",), figures_from=str(out / "bench_train_decode.json"), dry=_DRY_TRAIN),
        Step("decode_profile", "3. data.decode=device per decoder",
             [python, script("profile_device_decode.py"), "--data", str(data), "--device", "cuda", "--batches", "8",
              "--workers", str(workers)], 40, needs=("convert",),
             dry={"--device": "cpu", "--batch": "8", "--batches": "2", "--workers": "1"}),
        Step("train_compiled", "4. SwAV ResNet-50 on dali with train.compile=true (eager: step 2's dali figure)",
             [python, script("bench_train.py"), *swav, "--backend", "dali", "--skip-reference",
              "--json", str(out / "bench_train_compiled.json"), *train_common, "train.compile=true"],
             180, needs=("convert",), figures_from=str(out / "bench_train_compiled.json"), dry=_DRY_TRAIN),
        Step("step_layout", "4. BYOL ResNet-50 step: channels-last vs NCHW, eager vs compiled",
             [python, script("bench_step.py"), "--config", "byol_resnet50_imagenet", "--method", "byol", "--device",
              "cuda", "--batch", "128", "--compile", "yes", "--warmup", "3", "--repeats", "10",
              "--json", str(out / "bench_step.json")], 150, figures_from=str(out / "bench_step.json"),
             dry={"--device": "cpu", "--batch": "2", "--compile": "no", "--warmup": "0", "--repeats": "1",
                  "model.width=": "8", "data.global_size=": "32"}),
        Step("gpu_tests", "5. pytest -m gpu", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                                               str(ROOT / "tests")], 90),
        Step("equivalence", "5. backend equivalence on the GPU (dali, ffcv, torch)",
             [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests/test_backend_equivalence.py")],
             90, env=cuda, dry_env={}),
        Step("kernels", "6. fused loss kernels vs eager (no torch.compile column: its compiles take minutes)",
             [python, script("bench_kernels.py"), "--device", "cuda", "--no-compile",
              "--json", str(out / "bench_kernels.json")], 45, figures_from=str(out / "bench_kernels.json"),
             dry={"--device": "cpu", "--reps": "1"}),
        Step("optim", "6. LARS and EMA paths", [python, script("bench_optim.py"), "--device", "cuda",
                                                "--json", str(out / "bench_optim.json")], 45,
             figures_from=str(out / "bench_optim.json"), dry={"--device": "cpu", "--repeats": "1", "--warmup": "0"}),
        Step("photometric", "6. photometric stage: Triton chain vs torch path, per-image vs per-batch jitter order",
             [python, script("bench_photometric.py"), "--recipe", "swav", "--batch", "256", "--device", "cuda",
              "--order", "both", "--json", str(out / "bench_photometric.json")], 45,
             figures_from=str(out / "bench_photometric.json"),
             dry={"--device": "cpu", "--batch": "4", "--reps": "1", "--warmup": "0"}),
    ]


def dry_command(step: Step) -> tuple[list[str], dict[str, str]]:
    """The step's command and environment for the dry run (``Step.dry``, ``Step.dry_env``)."""
    cmd = list(step.cmd)
    scripts = [i for i, a in enumerate(cmd) if a.endswith(".py")]
    for key, value in step.dry.items():
        if key.endswith("="):
            at = [i for i, a in enumerate(cmd) if a.startswith(key)]
            if at:
                cmd[at[-1]] = key + value
            else:
                cmd.append(key + value)
        elif key in cmd:
            cmd[cmd.index(key) + 1] = value
        else:  # right after the script: before its positional key=value overrides, which argparse takes last
            at = scripts[0] + 1 if scripts else len(cmd)
            cmd[at:at] = [key, value]
    return cmd, dict(step.env if step.dry_env is None else step.dry_env)


def dry_steps(out: Path) -> list[Step]:
    """The plan for ``out`` with every command made its dry-run version (same names, needs and figures)."""
    steps = []
    for step in plan(out):
        cmd, env = dry_command(step)
        steps.append(Step(**{**asdict(step), "cmd": cmd, "env": env, "cap_s": max(step.cap_s, DRY_CAP_S)}))
    return steps


def format_plan(steps: list[Step], budget_s: float) -> str:
    """The plan as text: each step's cap, the cumulative caps against the budget, and its exact command."""
    lines = [f"gpu_check plan: {len(steps)} steps, budget {budget_s / 60:.1f} min ({budget_s:.0f} s); sum of caps "
             f"{sum(s.cap_s for s in steps):.0f} s (a cap is cut to the budget left; steps past it are skipped)"]
    total = 0.0
    for i, s in enumerate(steps, 1):
        total += s.cap_s
        over = "  (past the budget if every earlier step used its whole cap)" if total > budget_s else ""
        lines.append(f"{i:>2}. {s.name:<15} cap {s.cap_s:>4.0f} s, cumulative {total:>5.0f} s{over}: {s.what}")
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in s.env.items())
        lines.append(f"      {env + ' ' if env else ''}{shlex.join(s.cmd)}")
        if s.needs:
            lines.append(f"      (needs {', '.join(s.needs)})")
    return "\n".join(lines)


# ---- running ----------------------------------------------------------------------------------------------
def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    # Progress bars redraw with carriage returns: keep each line's last frame.
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:])


def run_step(step: Step, log: Path, cap_s: float) -> dict:
    """Run one step as its own process group, killed past ``cap_s``; its record (status ok | failed | timeout)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **step.env}
    # The checkout's packages, whatever is installed: the steps check this tree.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    started = time.monotonic()
    with open(log, "wb") as f:
        f.write(f"$ {shlex.join(step.cmd)}\n".encode())
        f.flush()
        try:
            proc = subprocess.Popen(step.cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=ROOT, env=env, start_new_session=True)
        except OSError as e:
            return {"status": "failed", "rc": None, "seconds": 0.0, "error": f"could not start: {e}"}
        try:
            rc = proc.wait(timeout=cap_s)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, status = proc.returncode, "timeout"
    record = {"status": status, "rc": rc, "seconds": round(time.monotonic() - started, 1)}
    if status != "ok":
        why = f"ran past its cap of {cap_s:.0f} s and was killed" if status == "timeout" else f"exit status {rc}"
        record["error"] = f"{why}\n{_tail(log)}"
    return record


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the step's whole process group (its workers too), then SIGKILL whatever of it is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the group is gone
            break
        if sig == signal.SIGTERM:
            try:
                proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
    proc.wait()


def run_steps(steps: list[Step], out: Path, budget_s: float, meta: dict | None = None) -> dict:
    """Run ``steps`` in order within ``budget_s`` seconds; the results are rewritten after each step."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = {
        "started": datetime.datetime.now().isoformat(timespec="seconds"), "budget_s": budget_s,
        "command": shlex.join([sys.executable, *sys.argv]), **(meta or {}),
        "steps": [{"name": s.name, "what": s.what, "command": shlex.join(s.cmd), "env": s.env, "cap_s": s.cap_s,
                   "status": "pending"} for s in steps],
    }
    write_results(out, results)
    status_of: dict[str, str] = {}
    for step, record in zip(steps, results["steps"], strict=True):
        left = budget_s - (time.monotonic() - started)
        failed_needs = [n for n in step.needs if status_of.get(n) != "ok"]
        if failed_needs:
            record.update(status="skipped", reason=f"needs {', '.join(failed_needs)}, which did not pass")
        elif left < MIN_STEP_S:
            record.update(status="skipped", reason=f"budget spent ({left:.0f} s of {budget_s:.0f} s left)")
        else:
            cap = min(step.cap_s, left)
            record["cap_s"] = round(cap, 1)
            record["log"] = f"logs/{step.name}.log"
            print(f"[gpu_check] {step.name}: {step.what} (cap {cap:.0f} s, {left:.0f} s of budget left)", flush=True)
            record.update(run_step(step, out / record["log"], cap))
            figures = collect_figures(step, out / record["log"])
            if figures:
                record["figures"] = figures
        status_of[step.name] = record["status"]
        print(f"[gpu_check] {step.name}: {record['status']}"
              + (f" in {record['seconds']} s" if "seconds" in record else f" ({record.get('reason', '')})")
              + (f": {summary(record)}" if record.get("figures") else ""), flush=True)
        if record["status"] in ("failed", "timeout"):
            print("\n".join(f"    {line}" for line in record["error"].splitlines()[-8:]), flush=True)
        results["elapsed_s"] = round(time.monotonic() - started, 1)
        write_results(out, results)
    return results


# ---- figures ----------------------------------------------------------------------------------------------
PYTEST_COUNTS = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)")


def collect_figures(step: Step, log: Path) -> dict:
    """The numbers worth a table cell: pytest's counts from the log, or the fields of the step's JSON."""
    if step.figures_from:
        try:
            data = json.loads(Path(step.figures_from).read_text())
        except (OSError, ValueError):
            return {}
        return _figures_of(step.name, data)
    if "pytest" in step.cmd:
        text = _tail(log, 5)
        counts = {m.group(2).rstrip("s") if m.group(2).startswith("error") else m.group(2): int(m.group(1))
                  for m in PYTEST_COUNTS.finditer(text)}
        return counts
    return {}


def _figures_of(name: str, data: dict) -> dict:
    if name == "machine":
        return {k: data.get(k) for k in ("gpu", "driver", "torch", "cuda", "dali", "ffcv", "torchcodec", "cpus")}
    if name == "loader":
        return {r["backend"]: (f"{r['img_s']:.0f} img/s" + (f", training thread {r['thread_ms']:.2f} ms/batch"
                                                           if r.get("thread_ms") is not None else "")
                               if r.get("status") == "ok" else r.get("status"))
                for r in data.get("results", [])}
    if name.startswith("train"):
        figures = {}
        for run in data.get("runs", []):
            for r in run["results"]:
                key = "reference" if r["name"] == "reference" else run["backend"]
                figures[key] = f"{r['img_s']:.0f} img/s, data-wait {r['data_wait_pct']:.1f} %"
        return figures
    if name == "step_layout":
        figures = {f"{r['layout']} {r['mode']}": f"{r['ms']:.1f} ms/step" for r in data.get("rows", [])}
        return {**figures, "best": data.get("best")}
    if name == "kernels":
        return {f"{r['op']} {r['impl']}": f"{r['median_ms']:.3f} ms (x{r['x_vs_eager']})"
                for r in data.get("results", []) if r["impl"] != "eager"}
    if name == "photometric":
        return {f"{r['path']} {r['order']} order": f"{r['img_s']:.0f} img/s (x{r['x_vs_torch']:.2f})"
                for r in data.get("results", [])}
    if name == "optim":
        return {k: f"{v['median_s'] * 1e3:.2f} ms" for part in ("lars", "ema") for k, v in data.get(part, {}).items()}
    return {}


def summary(record: dict) -> str:
    return "; ".join(f"{k} {v}" for k, v in record.get("figures", {}).items() if v is not None)


def write_results(out: Path, results: dict) -> None:
    """gpu_check.json and gpu_check.md, each written to a temp name and renamed."""
    _atomic(out / RESULTS_JSON, json.dumps(results, indent=2) + "\n")
    _atomic(out / RESULTS_MD, markdown(results))


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def markdown(results: dict) -> str:
    """The results as a Markdown table, a row per step, then each step's command."""
    machine = next((s.get("figures", {}) for s in results["steps"] if s["name"] == "machine"), {})
    head = f"# gpu_check, {results['started']}"
    if machine.get("gpu"):
        head += f", {machine['gpu']}"
    lines = [head, "", f"Budget {results['budget_s']:.0f} s, elapsed {results.get('elapsed_s', 0):.0f} s.", "",
             "| step | status | seconds | cap s | result |", "| --- | --- | ---: | ---: | --- |"]
    for s in results["steps"]:
        cell = summary(s) or s.get("reason", "")
        if s["status"] in ("failed", "timeout"):
            last = [line for line in s.get("error", "").splitlines() if line.strip()]
            cell = (cell + "; " if cell else "") + (last[-1] if last else "")
        cell = cell.replace("|", "\\|")
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', '')} | {s['cap_s']:.0f} | {cell} |")
    lines += ["", "Commands (run from the repository root; logs in logs/):", ""]
    for s in results["steps"]:
        env = " ".join(f"{k}={v}" for k, v in s.get("env", {}).items())
        lines.append(f"- {s['name']}: `{env + ' ' if env else ''}{s['command']}`")
    return "\n".join(lines) + "\n"


# ---- machine info (the first step runs this in its own process) -------------------------------------------
def machine_info(path: Path) -> dict:
    """GPU name, driver, torch / CUDA and the backends' versions, written to ``path``."""
    import importlib
    import platform

    info: dict = {"python": platform.python_version(), "cpus": os.cpu_count(), "host": platform.node()}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        gpu, driver, memory = (x.strip() for x in smi.stdout.splitlines()[0].split(","))
        info.update(gpu=gpu, driver=driver, gpu_memory=memory)
    except (OSError, IndexError, ValueError, subprocess.SubprocessError) as e:
        info["nvidia_smi"] = f"unavailable: {e}"
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written after each import: a slow one (ffcv compiles with numba on its first import) that hits the cap
    # still leaves what came before.
    for name, module in (("torch", "torch"), ("torchvision", "torchvision"), ("triton", "triton"),
                         ("dali", "nvidia.dali"), ("ffcv", "ffcv"), ("torchcodec", "torchcodec"), ("numba", "numba")):
        t0 = time.perf_counter()
        try:
            info[name] = str(getattr(importlib.import_module(module), "__version__", "?"))
        except Exception as e:  # noqa: BLE001 - a missing backend is a finding, not a crash
            info[name] = f"not importable: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(f"{name}: {info[name]} ({time.perf_counter() - t0:.1f} s)", flush=True)
        if name == "torch" and not info[name].startswith("not importable"):
            import torch

            info["cuda"] = torch.version.cuda
            info["cuda_available"] = torch.cuda.is_available()
            if torch.cuda.is_available():
                info["gpu"] = torch.cuda.get_device_name()
        _atomic(path, json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return info


# ---- main -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=Path, help="results folder (gpu_check.json, gpu_check.md, logs/, bench data)")
    ap.add_argument("--budget-min", type=float, default=DEFAULT_BUDGET_MIN,
                    help="total minutes for all steps")
    ap.add_argument("--steps", default="", help="comma-separated subset of the steps, in plan order (default: all)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true", help="print the plan, its commands and budget; run nothing")
    mode.add_argument("--dry-run", action="store_true",
                      help="run every step's CPU-possible part here, in DIR/dry-run (see the module docstring)")
    ap.add_argument("--machine-info", type=Path, metavar="FILE", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.machine_info:
        machine_info(args.machine_info)
        return 0
    if args.out is None:
        ap.error("--out DIR is required")
    if args.budget_min <= 0:
        ap.error(f"--budget-min must be positive, got {args.budget_min}")
    out = args.out.resolve()
    if args.dry_run:
        out = out / "dry-run"
    steps = dry_steps(out) if args.dry_run else plan(out)
    if args.steps:
        wanted = [s.strip() for s in args.steps.split(",") if s.strip()]
        unknown = sorted(set(wanted) - {s.name for s in steps})
        if unknown:
            ap.error(f"--steps: unknown {', '.join(unknown)}; the steps are {', '.join(s.name for s in steps)}")
        steps = [s for s in steps if s.name in wanted]
        # A chosen step whose input step was left out uses what an earlier run made (bench images, conversion).
        chosen = {s.name for s in steps}
        steps = [Step(**{**asdict(s), "needs": tuple(n for n in s.needs if n in chosen)}) for s in steps]
    budget_s = sum(s.cap_s for s in steps) if args.dry_run else args.budget_min * 60  # a dry run: each step's cap
    print(format_plan(steps, budget_s), flush=True)
    if args.plan:
        return 0
    results = run_steps(steps, out, budget_s)
    bad = [s["name"] for s in results["steps"] if s["status"] != "ok"]
    print(f"[gpu_check] {len(steps) - len(bad)}/{len(steps)} steps passed in {results['elapsed_s']:.0f} s; "
          f"results: {out / RESULTS_MD}" + (f"; not passed: {', '.join(bad)}" if bad else ""), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
