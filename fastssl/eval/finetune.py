"""fastssl-finetune: semi-supervised fine-tuning of the whole network on 1 % or 10 % of the labels.

    fastssl-finetune runs/swav/checkpoints/last.pt --data data/imagenet --labels 1%
    torchrun --nproc-per-node 8 -m fastssl.eval.finetune runs/swav/checkpoints/last.pt --data data/imagenet \\
        --labels 10%
    fastssl-finetune runs/byol/checkpoints/last.pt --data data/fashion-mnist --labels 1% [--init random]
    fastssl-finetune exports/byol --data data/imagenet --labels my_subset.txt --recipe simclr_resnet50_imagenet

The backbone and a linear head train together with SGD (each at its own learning rate) on RandomResizedCrop +
flip views of the labelled images only, then the val split's centre view is scored, top-1 / top-5 after the
last epoch. ``--labels``:

* ``1%`` / ``10%`` on ImageNet-1k: the canonical subsets (SimCLR's lists, used by BYOL, SwAV, Barlow Twins,
  VICReg), shipped inside fastssl and read offline;
* ``P%`` on any other converted dataset: a deterministic class-balanced subset (``--subset-seed``); its file list
  is written next to the result (``labels.txt``), in the same format, so the split can be cited and reused;
* ``FILE``: the images a list of source names selects (one per line, file name or path under the converted SRC).

A listed name that matches no image is an error naming the first missing files. Selecting by name needs each
image's source name, which fastssl-convert keeps; a dataset converted before it did gets a message saying how
to add them without re-encoding (``fastssl-convert SRC DST --add-names``).

The settings are the recipe's ``eval.finetune_1pct`` or ``eval.finetune_10pct`` (the run's own config, or
``--recipe``; each ImageNet recipe carries its paper's). Like training: the loader backends, torchrun ranks, a
checkpoint each epoch and on SIGTERM (rerun to resume), a progress bar. Results in ``--work-dir`` (default
RUN/eval/finetune-1pct). ``--init random`` trains the same network from random init on the same images with the
same schedule: the baseline the SSL figure is compared with.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

PROG = "fastssl-finetune"


def build_parser() -> argparse.ArgumentParser:
    from fastssl.eval.features import add_input_args
    from fastssl.eval.protocol_cli import add_protocol_args

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_args(parser)
    parser.add_argument("--labels", required=True, metavar="1%|10%|P%|FILE",
                        help="the labelled train images: the canonical ImageNet 1 %% / 10 %% lists on ImageNet, a "
                             "class-balanced P %% subset elsewhere, or a file of image names")
    parser.add_argument("--subset-seed", type=int, default=0, help="the class-balanced subset's seed (default 0)")
    parser.add_argument("--settings", choices=("1%", "10%"), default=None,
                        help="which recipe section: eval.finetune_1pct or _10pct (default: the one nearer to the "
                             "labelled fraction)")
    add_protocol_args(parser, finetune=True)
    return parser


def work_name(labels: str, init: str) -> str:
    """The default work folder's name: ``finetune-1pct``, ``finetune-10pct-random``, ``finetune-mylist``."""
    text = labels.strip()
    if text.endswith("%"):
        stem = f"{text[:-1].replace('.', '_')}pct"
    else:
        from pathlib import Path

        stem = Path(text).stem
    return f"finetune-{stem}" + ("-random" if init == "random" else "")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fastssl.eval.protocol_cli import (
        describe_protocol,
        is_main_rank,
        make_job,
        make_protocol,
        run_job,
        starting_backbone,
    )
    from fastssl.eval.subsets import SubsetError, choose_subset, describe, write_subset_list
    from fastssl.eval.weights import ExportError
    from pipelines.formats import DatasetFormatError, atomic_write_bytes, load_manifest

    try:
        subset = choose_subset(args.data, args.labels, seed=args.subset_seed)
        settings = args.settings or ("1%" if subset.fraction < 0.03 else "10%")
        section = {"1%": "finetune_1pct", "10%": "finetune_10pct"}[settings]
        protocol, origin = make_protocol("finetune", section, args)
        backbone, meta = starting_backbone(args)
        classes = load_manifest(args.data)["classes"]
    except (SubsetError, ExportError, DatasetFormatError, ValueError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    job = make_job(args, meta, protocol, work_name(args.labels, args.init), subset=subset.ids,
                   extra={"labels": args.labels, "labels_kind": subset.kind, "labelled_images": len(subset.ids),
                          "labelled_per_class": subset.per_class, "subset_seed": subset.seed,
                          "settings_section": section})
    labels_file = job.work_dir / "labels.txt"
    job.subset_file = str(labels_file)
    if is_main_rank():
        write_subset_list(labels_file, subset, args.data)  # beside the result: the split can be cited and reused
        print(f"{PROG}: {describe(subset)} of {args.data}, listed in {labels_file}", flush=True)
        for note in subset.notes:
            print(f"{PROG}: note: {note}", flush=True)
        print(f"{PROG}: eval.{section}: {describe_protocol(protocol, origin)}; from "
              f"{'random init' if args.init == 'random' else args.checkpoint}", flush=True)
    status, result = run_job(PROG, backbone, meta, len(classes), job)
    if status or not is_main_rank():
        return status
    if args.out:
        atomic_write_bytes(args.out, (json.dumps(result, indent=2) + "\n").encode())
    print(f"fine-tuned on {len(subset.ids):,d} labelled images ({args.labels}): top-1 {result['top1']:.2f}%, top-5 "
          f"{result['top5']:.2f}% on {result['val_images']:,d} val images after {protocol.epochs} epochs; wrote "
          f"{job.work_dir / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
