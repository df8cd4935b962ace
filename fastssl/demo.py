"""The demo: convert Fashion-MNIST (once), train BYOL on this machine's CPU, and compare the kNN top-1
of the trained backbone with the same backbone at random initialization.

    python -m fastssl.demo [key=value ...]        (what `make demo` runs)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

RECIPE = "byol_resnet18_fmnist"


def main(argv: list[str] | None = None) -> int:
    from fastssl.config import ConfigError, load_config
    from fastssl.convert import ConvertError, convert
    from fastssl.engine.trainer import run
    from pipelines.formats import load_manifest

    argv = sys.argv[1:] if argv is None else argv
    t0 = time.perf_counter()
    try:
        cfg = load_config(RECIPE, ["eval.knn_init=true", "out_dir=runs/demo", *argv])
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
    length = f"{cfg.train.epochs} epochs" + (f" (at most {cfg.train.max_steps} steps)" if cfg.train.max_steps > 0
                                              else "")
    print(f"Training {RECIPE}: {length}, batch {cfg.train.batch_size}, run folder {cfg.out_dir}", flush=True)
    try:
        results = run(cfg)
    except ConfigError as e:  # the run's start-up checks (the dataset, a resume of runs/demo with another config)
        print(f"fastssl demo: error: {e}", file=sys.stderr)
        return 2
    total = time.perf_counter() - t0
    init, ssl = results["knn_top1_init"], results["knn_top1"]
    print()
    splits = load_manifest(data)["splits"]
    limit = cfg.eval.knn_max_train
    bank = f"{splits['train']['count']:,d}" if not 0 < limit < splits["train"]["count"] else f"the first {limit:,d}+"
    print(f"{data.name} weighted kNN top-1 (k={cfg.eval.knn_k}, T={cfg.eval.knn_t}; bank: {bank} train, "
          f"queries: {splits['val']['count']:,d} test images)")
    print(f"  {cfg.model.backbone} (width {cfg.model.width}) at random init : {init:6.2f} %")
    print(f"  after BYOL, {results['steps']} steps        : {ssl:6.2f} %   ({ssl - init:+.2f} points)")
    print(f"wall time: {total / 60:.1f} min (conversion {t_convert:.0f} s); run folder: {cfg.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
