"""Training entry point.

    torchrun --nproc_per_node=N fastssl/train.py --config byol_resnet18_fmnist train.batch_size=512 ...
    python fastssl/train.py --config byol_resnet18_fmnist          # one process
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):
    # Run as a script (torchrun fastssl/train.py): put the repository root first, not fastssl/ itself.
    _here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0]) == _here:
        sys.path[0] = os.path.dirname(_here)


def main(argv: list[str] | None = None) -> int:
    from fastssl.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="fastssl/train.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe name in fastssl/configs or a YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.batch_size=256")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        parser.exit(2, f"fastssl/train.py: error: {e}\n")
    from fastssl.engine.trainer import run
    from pipelines.formats import DatasetFormatError

    try:
        results = run(cfg)
    except DatasetFormatError as e:
        parser.exit(2, f"fastssl/train.py: error: {e}\n")
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
