"""fastssl-knn: weighted kNN top-1 of a trained backbone on a converted dataset (train split = bank, val = queries).

    fastssl-knn runs/byol/checkpoints/last.pt --data data/fashion-mnist [--k 20] [--temperature 0.07]
    fastssl-knn exports/byol --data data/imagenet --device cuda --out byol_knn.json

Prints the top-1 and writes it, with the settings, as JSON (default: beside the input). With the run's k, T
and precision (the default) it reproduces the run's knn.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

PROG = "fastssl-knn"


def build_parser() -> argparse.ArgumentParser:
    from fastssl.eval.features import add_input_args

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_args(parser)
    parser.add_argument("--k", type=int, default=20, help="neighbours that vote (default 20)")
    parser.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(cos / T) (default 0.07)")
    parser.add_argument("--max-train", type=int, default=0, help="> 0: at most this many train images in the bank")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.k < 1 or args.temperature <= 0 or args.batch_size < 1:
        parser.error("--k and --batch-size must be >= 1 and --temperature > 0")
    from fastssl.engine.knn import knn_top1
    from fastssl.eval.features import default_out, features_from_args
    from fastssl.eval.weights import ExportError
    from pipelines.formats import atomic_write_bytes

    try:
        feats, classes, info = features_from_args(args, max_train=args.max_train)
    except (ExportError, ValueError, OSError, ImportError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    top1 = knn_top1(*feats["train"], *feats["val"], k=args.k, temperature=args.temperature,
                    num_classes=len(classes))
    result = {"knn_top1": top1, "k": args.k, "t": args.temperature, "bank": int(feats["train"][0].shape[0]),
              "queries": int(feats["val"][0].shape[0]), **info}
    out = args.out or default_out(args.checkpoint, "knn")
    atomic_write_bytes(out, (json.dumps(result, indent=2) + "\n").encode())
    print(f"kNN top-1 {top1:.2f}% (k={args.k}, T={args.temperature}, {result['bank']} train images as the bank, "
          f"{result['queries']} val queries); wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
