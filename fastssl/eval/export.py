"""fastssl-export: a run's trained backbone as safetensors and as a torchvision-compatible state_dict.

    fastssl-export runs/byol/checkpoints/last.pt exports/byol [--formats auto|safetensors|pth|safetensors,pth]
                                                              [--branch online|momentum]

OUT is a folder; it receives backbone.safetensors (every backbone; the description in its metadata),
backbone.pth (ResNets: torchvision's parameter names, no fc) and export.json. With width 64 and the
standard stem, ``m = torchvision.models.resnet50(); m.fc = torch.nn.Identity();
m.load_state_dict(torch.load("OUT/backbone.pth"), strict=True)`` loads every trunk parameter and buffer.
ViTs have no torchvision twin and export as safetensors only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

PROG = "fastssl-export"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", metavar="CKPT", help="a training checkpoint, e.g. runs/NAME/checkpoints/last.pt")
    parser.add_argument("out", metavar="OUT", help="the export folder (created; files in it are replaced)")
    parser.add_argument("--formats", default="auto",
                        help="auto (safetensors + pth for ResNets, safetensors for ViTs), or a comma list of "
                             "safetensors, pth")
    parser.add_argument("--branch", choices=("online", "momentum"), default="online",
                        help="the trained backbone (default) or the method's momentum copy (BYOL target, MoCo key "
                             "encoder, DINO teacher)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fastssl.eval.weights import ExportError, checkpoint_backbone, is_resnet, load_note, write_export

    try:
        state, meta = checkpoint_backbone(args.checkpoint, args.branch)
        if args.formats == "auto":
            formats = ("safetensors", "pth") if is_resnet(meta["backbone"]) else ("safetensors",)
        else:
            formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
        written = write_export(state, meta, args.out, formats)
    except (ExportError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    n = sum(t.numel() for t in state.values())
    print(f"{meta['backbone']} (width {meta['width']}, {meta['branch']} branch, step {meta['step']}, "
          f"{n / 1e6:.2f}M values, {meta['feat_dim']}-d features) -> " + ", ".join(str(p) for p in written))
    if "pth" not in formats and not is_resnet(meta["backbone"]):
        print(f"{meta['backbone']}: no torchvision-compatible .pth (ResNets only); safetensors written")
    print(f"load: {load_note(meta)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
