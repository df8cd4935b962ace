"""fastssl-linear: linear evaluation of a frozen backbone on a converted dataset, by the papers' protocol or the
quick features probe.

    fastssl-linear runs/byol/checkpoints/last.pt --data data/imagenet --protocol paper [--recipe NAME]
    torchrun --nproc-per-node 8 -m fastssl.eval.linear runs/byol/checkpoints/last.pt --data data/imagenet \
        --protocol paper
    fastssl-linear runs/byol/checkpoints/last.pt --data data/fashion-mnist [--protocol features] [--epochs 100]

``--protocol paper`` is what the papers report: the frozen backbone with its BatchNorm in eval mode under a linear
head trained with SGD on RandomResizedCrop + flip views from fastssl's own loaders (DALI, FFCV or torch, as in
training), scored top-1 / top-5 on the val split's centre view after the last epoch. The lr, batch, epochs and
schedule are the recipe's ``eval.linear`` (each ImageNet recipe carries its paper's); torchrun ranks, a checkpoint
each epoch and on SIGTERM (rerun to resume), a progress bar. Results in ``--work-dir`` (default RUN/eval/linear).

``--protocol features`` (default) is the quick monitor: the features of every train and val image (eval view, no
augmentation) are extracted once; a linear classifier is then trained on the standardized train features for E
epochs (AdamW, cosine learning rate, progress bar) and its top-1 on the val split is printed and written as JSON
(default: beside the input). Useful to compare runs, not comparable with papers.

Either way the reported figure is the last epoch's, never the best over epochs (that would tune on the val split).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.progress import progress_bar

PROG = "fastssl-linear"


def train_linear(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], num_classes: int,
                 *, epochs: int = 100, lr: float = 1e-3, weight_decay: float = 0.0, batch_size: int = 256,
                 seed: int = 0, progress: bool = True) -> dict:
    """Train ``Linear(D, num_classes)`` on standardized ``train`` = ((N, D) fp32, (N,) int64); evaluate on ``val``.

    The standardization (train mean and std per feature) is part of the classifier. -> {"top1", "train_top1",
    "loss"}: val top-1 (%) after the last epoch, the last epoch's running train top-1 (%) and mean loss.
    """
    x, y = train
    vx, vy = val
    mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)
    x, vx = (x - mean) / std, (vx - mean) / std
    classifier = nn.Linear(x.shape[1], num_classes).to(x.device)
    nn.init.zeros_(classifier.weight)  # a convex problem: a zero start is as good as any, and deterministic
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    n = x.shape[0]
    steps = epochs * math.ceil(n / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    loss_sum = correct = torch.zeros((), device=x.device)
    bar = progress_bar(range(epochs), desc="linear", unit="epoch", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        order = torch.randperm(n, generator=gen).to(x.device)
        loss_sum = torch.zeros((), device=x.device)
        correct = torch.zeros((), device=x.device)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            logits = classifier(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.detach() * idx.numel()
            correct += (logits.argmax(dim=1) == y[idx]).sum()
        bar.set_postfix(loss=f"{loss_sum.item() / n:.4f}", train_top1=f"{100 * correct.item() / n:.1f}%")
    bar.close()
    with torch.no_grad():
        top1 = 100.0 * (classifier(vx).argmax(dim=1) == vy).float().mean().item()
    return {"top1": top1, "train_top1": 100.0 * correct.item() / n, "loss": loss_sum.item() / n}


# --protocol features: its own defaults (the quick probe's AdamW), not a paper's
FEATURES_DEFAULTS = {"epochs": 100, "lr": 1e-3, "weight_decay": 0.0, "train_batch": 256, "seed": 0}


def build_parser() -> argparse.ArgumentParser:
    from fastssl.eval.features import add_input_args
    from fastssl.eval.protocol_cli import add_protocol_args

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_args(parser)
    parser.add_argument("--protocol", choices=("features", "paper"), default="features",
                        help="paper: the papers' augmented protocol (SGD on crop + flip views, frozen BatchNorm); "
                             "features (default): the quick probe on features extracted once")
    add_protocol_args(parser, finetune=False, features_defaults=FEATURES_DEFAULTS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.protocol == "paper":
        return _paper(parser, args)
    for key, value in FEATURES_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.epochs < 1 or args.train_batch < 1 or args.batch_size < 1 or args.lr <= 0:
        parser.error("--epochs, --train-batch and --batch-size must be >= 1 and --lr > 0")
    from fastssl.eval.features import default_out, features_from_args
    from fastssl.eval.weights import ExportError
    from pipelines.formats import atomic_write_bytes

    try:
        feats, classes, info = features_from_args(args, normalize=False)
    except (ExportError, ValueError, OSError, ImportError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    result = train_linear(feats["train"], feats["val"], len(classes), epochs=args.epochs, lr=args.lr,
                          weight_decay=args.weight_decay, batch_size=args.train_batch, seed=args.seed,
                          progress=not args.no_progress)
    result.update({"protocol": "features", "epochs": args.epochs, "lr": args.lr, "weight_decay": args.weight_decay,
                   "train_batch": args.train_batch, "train_images": int(feats["train"][0].shape[0]),
                   "val_images": int(feats["val"][0].shape[0]), **info})
    out = args.out or default_out(args.checkpoint, "linear")
    atomic_write_bytes(out, (json.dumps(result, indent=2) + "\n").encode())
    print(f"linear top-1 {result['top1']:.2f}% on {result['val_images']} val images (train top-1 "
          f"{result['train_top1']:.2f}%, {args.epochs} epochs on {result['train_images']} train images); wrote {out}")
    return 0


def _paper(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """--protocol paper: the supervised loop of fastssl.eval.supervised with the frozen backbone."""
    from fastssl.eval.protocol_cli import (
        describe_protocol,
        is_main_rank,
        make_job,
        make_protocol,
        run_job,
        starting_backbone,
    )
    from fastssl.eval.weights import ExportError
    from pipelines.formats import DatasetFormatError, atomic_write_bytes, load_manifest

    try:
        protocol, origin = make_protocol("linear", "linear", args)
        backbone, meta = starting_backbone(args)
        classes = load_manifest(args.data)["classes"]
    except (ExportError, ValueError, OSError, DatasetFormatError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    job = make_job(args, meta, protocol, "linear" if args.init == "checkpoint" else "linear-random")
    if is_main_rank():
        print(f"{PROG}: paper protocol on {args.data}: {describe_protocol(protocol, origin)}; work folder "
              f"{job.work_dir}", flush=True)
    status, result = run_job(PROG, backbone, meta, len(classes), job)
    if status or not is_main_rank():
        return status
    if args.out:
        atomic_write_bytes(args.out, (json.dumps(result, indent=2) + "\n").encode())
    print(f"linear (paper protocol) top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}% on {result['val_images']} "
          f"val images after {protocol.epochs} epochs; wrote {job.work_dir / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
