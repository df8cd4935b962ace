"""fastssl-linear: linear evaluation of a frozen backbone on a converted dataset.

    fastssl-linear runs/byol/checkpoints/last.pt --data data/fashion-mnist [--epochs 100] [--lr 1e-3]
    fastssl-linear exports/byol --data data/imagenet --device cuda --out byol_linear.json

The features of every train and val image (eval view, no augmentation) are extracted once; a linear
classifier is then trained on the standardized train features for E epochs (AdamW, cosine learning rate,
progress bar) and its top-1 on the val split is printed and written as JSON (default: beside the input).
The reported figure is the last epoch's, never the best over epochs (that would tune on the val split).
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


def build_parser() -> argparse.ArgumentParser:
    from fastssl.eval.features import add_input_args

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_input_args(parser)
    parser.add_argument("--epochs", type=int, default=100, help="classifier epochs over the train features (100)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate, cosine to 0 (1e-3)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (0)")
    parser.add_argument("--train-batch", type=int, default=256, help="classifier batch size (256)")
    parser.add_argument("--seed", type=int, default=0, help="order of the classifier's batches (0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
    result.update({"epochs": args.epochs, "lr": args.lr, "weight_decay": args.weight_decay,
                   "train_batch": args.train_batch, "train_images": int(feats["train"][0].shape[0]),
                   "val_images": int(feats["val"][0].shape[0]), **info})
    out = args.out or default_out(args.checkpoint, "linear")
    atomic_write_bytes(out, (json.dumps(result, indent=2) + "\n").encode())
    print(f"linear top-1 {result['top1']:.2f}% on {result['val_images']} val images (train top-1 "
          f"{result['train_top1']:.2f}%, {args.epochs} epochs on {result['train_images']} train images); wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
