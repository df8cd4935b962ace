"""The demo: convert Fashion-MNIST (once), train BYOL on this machine's CPU, and compare the kNN top-1
of the trained backbone with the same backbone at random initialization.

    python -m fastssl.demo [--ranks N] [key=value ...]        (what `make demo` runs)

On a CPU the demo trains data-parallel: one process per core (``torch.distributed`` over gloo, as
``torchrun --nproc-per-node N fastssl/train.py`` would), each with a single intra-op thread. The recipe's
small convolutions use one thread well and two threads poorly: on the 2-core machine two single-thread ranks
train 1.5x faster than one process with two threads (5.58 against 3.68 step/s, same recipe and kNN; BENCHMARKS.md,
"The demo against raw pixels"). Ranks are capped so that each one's BatchNorm still sees at least
``MIN_RANK_BATCH`` images per view.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

RECIPE = "byol_resnet18_fmnist"
MIN_RANK_BATCH = 64


def plan_ranks(batch_size: int, cores: int, cuda: bool) -> tuple[int, int]:
    """(ranks, intra-op threads per rank) for the demo on this machine. A GPU trains in one process; a CPU
    gets one rank per core, at most ``batch_size // MIN_RANK_BATCH`` ranks, and a number of ranks that
    divides the batch; the cores left over are shared out as threads."""
    if cuda or cores < 2:
        return 1, 0  # 0: torch's default threads
    ranks = max(1, min(cores, batch_size // MIN_RANK_BATCH))
    while batch_size % ranks:
        ranks -= 1
    return ranks, max(1, cores // ranks)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(ranks: int, threads: int, overrides: list[str]) -> int:
    """Train ``RECIPE`` with ``overrides`` in ``ranks`` processes of ``python -m fastssl.train`` on this host (the
    environment torchrun would give them). Returns the first non-zero exit status, else 0. A rank that fails
    stops the others; SIGTERM / SIGINT to the demo reach every rank, which checkpoint and stop together."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(ranks),
               LOCAL_WORLD_SIZE=str(ranks), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "fastssl.train", "--no-results", "--config", RECIPE,
           f"train.threads={threads}", *overrides]
    # Their own process group: a Ctrl-C at the terminal reaches the demo alone, which passes it on once (a rank
    # that got it twice, from the terminal and from here, could take the second as "stop now, no checkpoint").
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), process_group=0)
             for r in range(ranks)]

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        status = 0
        while any(p.poll() is None for p in procs):
            for p in procs:
                rc = p.poll()
                if rc not in (None, 0) and status == 0:
                    status = rc
                    time.sleep(5)  # the others see the same stop (a signal, a config check) and exit by themselves
                    for q in procs:
                        if q.poll() is None:
                            q.terminate()
            time.sleep(0.2)
        codes = [status] + [p.returncode for p in procs]
        rc = next((c for c in codes if c), 0)
        return 128 - rc if rc < 0 else rc  # killed by signal N: the shell's 128 + N
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    import pipelines
    from fastssl.config import ConfigError, load_config
    from fastssl.convert import ConvertError, convert
    from pipelines.formats import load_manifest

    argv = list(sys.argv[1:] if argv is None else argv)
    ranks = None
    if "--ranks" in argv:
        i = argv.index("--ranks")
        try:
            ranks = int(argv[i + 1])
            if ranks < 1:
                raise ValueError
        except (IndexError, ValueError):
            print("fastssl demo: error: --ranks takes a whole number >= 1 (processes to train with)", file=sys.stderr)
            return 2
        del argv[i:i + 2]
    t0 = time.perf_counter()
    overrides = ["eval.knn_init=true", "out_dir=runs/demo", *argv]
    try:
        cfg = load_config(RECIPE, overrides)
    except ConfigError as e:
        print(f"fastssl demo: error: {e}", file=sys.stderr)
        return 2
    data = Path(cfg.data.path)
    if not (data / "manifest.json").is_file():
        print(f"Converting Fashion-MNIST into {data} ...", flush=True)
        try:
            convert("fashion-mnist", data)
        except ConvertError as e:
            print(f"fastssl demo: error: {e}", file=sys.stderr)
            return 2
    else:
        print(f"Using the converted dataset in {data}", flush=True)
    t_convert = time.perf_counter() - t0
    import torch

    cores = pipelines.usable_cpus()
    cuda = torch.cuda.is_available()
    planned, threads = plan_ranks(cfg.train.batch_size, cores, cuda)
    ranks = planned if ranks is None else ranks
    if ranks > 1 and cfg.train.batch_size % ranks:
        print(f"fastssl demo: error: --ranks {ranks} does not divide train.batch_size={cfg.train.batch_size}",
              file=sys.stderr)
        return 2
    threads = cfg.train.threads or (threads if ranks == planned else max(1, cores // ranks))
    length = f"{cfg.train.epochs} epochs" + (f" (at most {cfg.train.max_steps} steps)" if cfg.train.max_steps > 0
                                              else "")
    where = (f"{ranks} processes x {threads} thread(s)" if ranks > 1 else
             "1 process" + (f" x {threads} thread(s)" if threads else ""))
    print(f"Training {RECIPE}: {length}, batch {cfg.train.batch_size}, {where}, run folder {cfg.out_dir}", flush=True)
    if ranks > 1:
        status = launch_ranks(ranks, threads, overrides)
        if status:
            return status
        try:
            results = json.loads((Path(cfg.out_dir) / "knn.json").read_text())
        except (OSError, ValueError) as e:
            print(f"fastssl demo: error: the run ended without its kNN result ({e})", file=sys.stderr)
            return 1
        steps = results["step"]
    else:
        from fastssl.train import run_reporting

        if threads and threads != cfg.train.threads:
            cfg = load_config(RECIPE, [f"train.threads={threads}", *overrides])
        # the run's start-up checks (the dataset, a resume of runs/demo with another config), a damaged sample
        # beyond data.max_bad_samples, a divergence or a stop (SIGTERM, Ctrl-C: checkpoint, then 128 + signal)
        status, results = run_reporting(cfg, "fastssl demo")
        if status:
            return status
        steps = results["steps"]
    total = time.perf_counter() - t0
    init, ssl = results.get("knn_top1_init"), results["knn_top1"]  # no init figure with eval.knn_init=false
    print()
    splits = load_manifest(data)["splits"]
    limit = cfg.eval.knn_max_train
    bank = f"{splits['train']['count']:,d}" if not 0 < limit < splits["train"]["count"] else f"the first {limit:,d}+"
    print(f"{data.name} weighted kNN top-1 (k={cfg.eval.knn_k}, T={cfg.eval.knn_t}; bank: {bank} train, "
          f"queries: {splits['val']['count']:,d} test images)")
    if init is not None:
        print(f"  {cfg.model.backbone} (width {cfg.model.width}) at random init : {init:6.2f} %")
    gain = f"   ({ssl - init:+.2f} points)" if init is not None else ""
    print(f"  after BYOL, {steps} steps        : {ssl:6.2f} %{gain}")
    print(f"wall time: {total / 60:.1f} min (conversion {t_convert:.0f} s); run folder: {cfg.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
