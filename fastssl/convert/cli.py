"""The command line of ``fastssl-convert``: options, exit statuses, the summary."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from fastssl.convert.errors import ConvertError
from fastssl.convert.find import FASHION_MNIST, FASHION_MNIST_DIR
from fastssl.convert.image import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SIDE, DEFAULT_QUALITY
from fastssl.convert.names import add_names
from fastssl.convert.report import PROG, format_summary
from fastssl.convert.run import convert, default_workers
from fastssl.convert.verify import verify
from fastssl.convert.write import DEFAULT_FFCV_MAX_SIDE, DEFAULT_FFCV_QUALITY, DEFAULT_SHARD_SIZE


def _limit_arg(text: str) -> int | dict[str, int]:
    try:
        if "=" not in text:
            return int(text)
        out = {}
        for part in text.split(","):
            split, _, n = part.partition("=")
            out[split.strip()] = int(n)
        return out
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or train=N,val=M, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fastssl-convert``."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Convert an ImageFolder tree or Fashion-MNIST into fastssl webdataset shards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "src",
        metavar="SRC",
        help=f"ImageFolder tree (class folders, optionally under train/ and val/) or the name {FASHION_MNIST!r} "
        f"(the IDX files of the Debian package dataset-fashion-mnist in {FASHION_MNIST_DIR})",
    )
    # "%(default).0s" prints nothing: it keeps ArgumentDefaultsHelpFormatter from appending "(default: None)"
    p.add_argument("dst", metavar="DST", nargs="?",
                   help="output folder for manifest.json and the shards (required; with --verify, the converted "
                   "folder to check)%(default).0s")
    p.add_argument(
        "--max-side",
        type=int,
        default=DEFAULT_MAX_SIDE,
        metavar="PX",
        help="an image whose longer side exceeds this is shrunk to it (Lanczos)",
    )
    p.add_argument(
        "--quality", type=int, default=DEFAULT_QUALITY, metavar="Q", help="JPEG quality of re-encoded images"
    )
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, metavar="N", help="samples per shard")
    p.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        metavar="N",
        help="encoding processes (0 or 1: encode in this process)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the class-mixing order of the samples")
    p.add_argument(
        "--limit",
        type=_limit_arg,
        default=None,
        metavar="N|train=N,val=M",
        help="at most this many samples per split (quick tests and demos)",
    )
    p.add_argument(
        "--formats",
        default="wds",
        metavar="wds[,ffcv]",
        help="what to write: wds (webdataset shards, always) and ffcv (also <split>.beton for data.backend=ffcv)",
    )
    p.add_argument(
        "--ffcv-max-side",
        type=int,
        default=DEFAULT_FFCV_MAX_SIDE,
        metavar="PX",
        help="with --formats ...,ffcv: longer side of the images in the .beton files (larger ones are shrunk)",
    )
    p.add_argument(
        "--ffcv-quality", type=int, default=DEFAULT_FFCV_QUALITY, metavar="Q", help="JPEG quality in the .beton files"
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="skip files declaring more pixels than this, unread (decompression bombs)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing converted dataset in DST")
    p.add_argument(
        "--verify",
        action="store_true",
        help="`--verify DST`: reread every shard and .beton and check counts and sha256 against the manifest "
        "(exit 1 naming the bad file); with SRC DST: convert, then verify",
    )
    p.add_argument(
        "--add-names",
        action="store_true",
        help="`SRC DST --add-names`: DST was converted (from SRC) before fastssl-convert kept each image's source "
        "name: write the names beside its shards, without re-encoding (checked against SRC first)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fastssl-convert``; returns the exit status (2 for user errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dst is None and not args.verify:
        parser.error("the following arguments are required: DST")
    t0 = time.perf_counter()
    if args.add_names:
        if args.dst is None:
            parser.error("--add-names needs SRC and DST: the source the dataset was converted from, and the dataset")
        try:
            counts = add_names(args.src, args.dst)
        except ConvertError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return e.exit_code
        listed = ", ".join(f"{n} {split}" for split, n in counts.items())
        print(f"{PROG}: {args.dst} lists the source names of its images ({listed}); no image was re-encoded")
        return 0
    if args.dst is None:  # --verify DST
        try:
            checked = verify(args.src)
        except ConvertError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return e.exit_code
        print(f"{PROG}: verified {args.src}: {len(checked)} files match the manifest")
        return 0
    try:
        manifest = convert(
            args.src,
            args.dst,
            max_side=args.max_side,
            quality=args.quality,
            shard_size=args.shard_size,
            workers=args.workers,
            overwrite=args.overwrite,
            seed=args.seed,
            limit=args.limit,
            progress=not args.no_progress,
            formats=args.formats,
            ffcv_max_side=args.ffcv_max_side,
            ffcv_quality=args.ffcv_quality,
            max_pixels=args.max_pixels,
        )
        seconds = time.perf_counter() - t0
        if args.verify:
            verify(args.dst)
    except ConvertError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; {args.dst} has no manifest.json and is incomplete "
              "(rerun the same command to resume)", file=sys.stderr)  # fmt: skip
        return 130
    print(format_summary(manifest, args.dst, seconds))
    if args.verify:
        print(f"{PROG}: verified {args.dst}")
    return 0
