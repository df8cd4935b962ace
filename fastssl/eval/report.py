"""fastssl-eval: the evaluations papers report, on a finished run, in one report.

    fastssl-eval runs/byol                                  # kNN, linear (paper protocol), fine-tune 1 % and 10 %
    torchrun --nproc-per-node 8 -m fastssl.eval.report runs/byol --labels 1%,10%
    fastssl-eval runs/byol --protocols linear eval.linear.epochs=10    # the recipe's settings, one overridden

For the run's newest checkpoint (RUN/checkpoints/last.pt) and, beside it, the same architecture at random init
(seed 0; ``--no-random`` leaves it out), on the run's dataset (``--data`` for another):

* ``knn``: weighted kNN top-1 (the run's eval.knn_k / eval.knn_t), train split as the bank;
* ``linear``: fastssl-linear --protocol paper with the run's ``eval.linear``;
* ``finetune``: fastssl-finetune on each of ``--labels`` (default 1 % and 10 %) with ``eval.finetune_1pct`` /
  ``eval.finetune_10pct`` (the canonical ImageNet lists on ImageNet, a class-balanced subset elsewhere).

Each evaluation works in its own folder, RUN/eval/<name>/ (checkpoints, metrics.jsonl, result.json): a rerun
after a stop resumes the unfinished one and reuses the finished ones (same checkpoint and settings). The report:
RUN/eval/report.json (every figure with its settings), report.md (a Markdown table: each protocol from the run
and from random init) and report.png (top-1 against the fraction of labels used). ``key=value`` overrides
(``eval.linear.epochs=10``) change the settings taken from the run's config (or ``--recipe``). Nothing is
fetched from the network: the ImageNet label lists ship with fastssl.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from fastssl.eval import group
from pipelines.native import cpu_model

PROG = "fastssl-eval"
PROTOCOLS = ("knn", "linear", "finetune")
FRACTIONS = ("1%", "10%")
REPORT = "report"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished training run's folder (out_dir)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="settings of the protocols, e.g. eval.linear.epochs=10 eval.finetune_1pct.base_lr=0.05")
    parser.add_argument("--checkpoint", default=None, help="default: RUN_DIR/checkpoints/last.pt")
    parser.add_argument("--data", default=None, help="the converted dataset (default: the run's data.path)")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help="a comma list of knn, linear, finetune")
    parser.add_argument("--labels", default=",".join(FRACTIONS), help="the fine-tuning label fractions (1%%,10%%)")
    parser.add_argument("--no-random", action="store_true", help="leave out the random-init column")
    parser.add_argument("--recipe", default=None, help="take the protocols' settings from this recipe")
    parser.add_argument("--branch", choices=("online", "momentum"), default="online")
    parser.add_argument("--backend", choices=("auto", "torch", "dali", "ffcv"), default="auto")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: torch's default)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def eval_settings(saved: dict | None, recipe: str | None, overrides: Sequence[str]):
    """The ``eval`` section to evaluate with: the schema <- the run's config (or ``recipe``) <- ``overrides``,
    checked like a training config. Raises ConfigError naming a bad key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from fastssl.config import Config, ConfigError, load_config, validate

    if recipe is not None:
        cfg = load_config(recipe, list(overrides))
    else:
        try:
            cfg = OmegaConf.merge(OmegaConf.structured(Config), {"eval": (saved or {}).get("eval", {})})
            bad = [o for o in overrides if "=" not in o or not o.startswith("eval.")]
            if bad:
                raise ConfigError(f"override {bad[0]!r}: expected eval.KEY=VALUE, e.g. eval.linear.epochs=10")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as e:
            raise ConfigError(f"config key {getattr(e, 'full_key', None)!r}: {str(e).strip().splitlines()[0]}") \
                from None
        validate(cfg)
    return cfg.eval


def _same(result_file: Path, identity: dict) -> dict | None:
    """The result in ``result_file`` when it was computed for ``identity``, else None."""
    try:
        result = json.loads(result_file.read_text())
    except (OSError, ValueError):
        return None
    return result if result.get("identity") == identity else None


def _knn(backbone, meta: dict, data: str, settings, work: Path, init: str, args, dist) -> dict:
    """kNN top-1 on rank 0 (the others wait); cached in work/result.json."""
    from fastssl.engine.knn import knn_top1
    from fastssl.eval.features import dataset_features
    from pipelines.formats import atomic_write_bytes

    identity = {"source": init, "step": meta.get("step"), "k": settings.knn_k, "t": settings.knn_t,
                "data": os.path.abspath(data), "precision": meta.get("precision"), "image_size": meta["image_size"]}
    result = None
    if dist.is_main:
        result = _same(work / "result.json", identity)
        if result is None:
            t0 = time.perf_counter()
            with _all_local_cores(dist):
                feats, classes = dataset_features(backbone, meta, data, batch_size=settings.batch_size,
                                                  device=dist.device, precision=meta.get("precision", "fp32"),
                                                  num_workers=args.num_workers, progress=not args.no_progress)
            top1 = knn_top1(*feats["train"], *feats["val"], k=settings.knn_k, temperature=settings.knn_t,
                            num_classes=len(classes))
            result = {"protocol": "knn", "top1": top1, "k": settings.knn_k, "t": settings.knn_t,
                      "train_images": int(feats["train"][0].shape[0]), "val_images": int(feats["val"][0].shape[0]),
                      "seconds": round(time.perf_counter() - t0, 1), "identity": identity}
            work.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(work / "result.json", (json.dumps(result, indent=2) + "\n").encode())
    group.wait_for_main()
    return result or {}


class _all_local_cores:
    """Rank 0 computes the kNN alone: on a CPU it borrows the waiting local ranks' threads meanwhile."""

    def __init__(self, dist):
        self.local = min(dist.world_size, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        self.cpu = dist.device.type == "cpu"

    def __enter__(self):
        self.before = torch.get_num_threads()
        if self.cpu and self.local > 1:
            torch.set_num_threads(self.before * self.local)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def evaluate_run(run_dir: str | os.PathLike, *, protocols: Sequence[str] = PROTOCOLS,
                 fractions: Sequence[str] = FRACTIONS, random_init: bool = True, data: str | None = None,
                 checkpoint: str | None = None, recipe: str | None = None, overrides: Sequence[str] = (),
                 branch: str = "online", backend: str = "auto", device: str = "auto", num_workers: int | None = None,
                 progress: bool = True) -> dict:
    """Run the protocols on ``run_dir``'s checkpoint (and at random init) and write the report; returns it (rank 0;
    the other ranks of a torchrun job get ``{}``). Raises ConfigError, ExportError, SubsetError, ValueError,
    DatasetFormatError (with a message for the user) and supervised.StopRequested (checkpoint written)."""
    from fastssl.eval.protocol_cli import saved_config
    from fastssl.eval.subsets import choose_subset, write_subset_list
    from fastssl.eval.supervised import Job, Protocol, run
    from fastssl.eval.weights import ExportError, build_from_meta, load_backbone
    from pipelines.formats import load_manifest

    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise ValueError(f"--protocols {','.join(protocols)}: choose from {', '.join(PROTOCOLS)}")
    bad = [f for f in fractions if f not in FRACTIONS]
    if bad:
        raise ValueError(f"--labels {','.join(fractions)}: fastssl-eval reports {' and '.join(FRACTIONS)}; other "
                         "fractions or lists: fastssl-finetune --labels")
    run_dir = Path(run_dir)
    checkpoint = Path(checkpoint or run_dir / "checkpoints" / "last.pt")
    if not checkpoint.is_file():
        raise ExportError(f"{checkpoint}: no checkpoint; RUN_DIR is a training run's out_dir (its checkpoints/ holds "
                          "last.pt once an epoch ends)")
    saved = saved_config(checkpoint) or {}
    settings = eval_settings(saved, recipe, overrides)
    data = data or saved.get("data", {}).get("path")
    if not data:
        raise ValueError(f"{checkpoint}: its config names no data.path; pass --data")
    classes = load_manifest(data)["classes"]
    args = argparse.Namespace(num_workers=num_workers, no_progress=not progress)
    dist = group.join(device)
    t_start = time.perf_counter()
    rows: list[dict] = []
    try:
        meta = load_backbone(checkpoint, branch)[1]
        inits = ["checkpoint"] + (["random"] if random_init else [])
        subsets = {f: choose_subset(data, f) for f in fractions} if "finetune" in protocols else {}

        def backbone(init: str):
            if init == "checkpoint":
                return load_backbone(checkpoint, branch)[0]  # a fresh copy: fine-tuning changes its weights
            torch.manual_seed(0)  # the same random network for every protocol
            return build_from_meta(meta, "random init")

        def suffix(init: str) -> str:
            return "" if init == "checkpoint" else "-random"

        source = {"checkpoint": f"{checkpoint} ({branch}, step {meta.get('step')})", "random": "random init"}
        base = dict(data=data, image_size=int(meta["image_size"]), mean=tuple(meta["mean"]), std=tuple(meta["std"]),
                    precision=meta.get("precision", "fp32"), backend=backend, num_workers=num_workers, device=device,
                    progress=progress)
        if "knn" in protocols:
            row = {"protocol": "knn", "labels": "100%", "what": f"kNN (k={settings.knn_k}, T={settings.knn_t})"}
            for init in inits:
                t0 = time.perf_counter()
                result = _knn(backbone(init), meta, data, settings, run_dir / "eval" / f"knn{suffix(init)}",
                              source[init], args, dist)
                row[init] = {**result, "wall_s": round(time.perf_counter() - t0, 1)}
            rows.append(row)
        if "linear" in protocols:
            protocol = Protocol.from_section("linear", _plain(settings.linear))
            row = {"protocol": "linear", "labels": "100%", "what": f"linear, paper protocol ({protocol.epochs} epochs)"}
            for init in inits:
                job = Job(protocol=protocol, work_dir=run_dir / "eval" / f"linear{suffix(init)}", source=source[init],
                          **base)
                row[init] = _supervised(run, backbone(init), meta, classes, job)
            rows.append(row)
        for fraction, subset in subsets.items():
            section = {"1%": "finetune_1pct", "10%": "finetune_10pct"}[fraction]
            protocol = Protocol.from_section("finetune", _plain(settings[section]))
            row = {"protocol": "finetune", "labels": fraction, "images": len(subset.ids),
                   "what": f"fine-tune on {fraction} ({len(subset.ids):,d} images, {protocol.epochs} epochs)"}
            for init in inits:
                work = run_dir / "eval" / f"finetune-{fraction[:-1]}pct{suffix(init)}"
                if dist.is_main:
                    write_subset_list(work / "labels.txt", subset, data)
                job = Job(protocol=protocol, work_dir=work, source=source[init], subset=subset.ids,
                          subset_file=str(work / "labels.txt"),
                          extra={"labels": fraction, "labels_kind": subset.kind, "labelled_images": len(subset.ids),
                                 "labelled_per_class": subset.per_class}, **base)
                row[init] = _supervised(run, backbone(init), meta, classes, job)
            rows.append(row)
    finally:
        group.leave()
    if not dist.is_main:
        return {}
    report = {"run": str(run_dir), "checkpoint": str(checkpoint), "step": meta.get("step"),
              "method": meta.get("method"), "backbone": f"{meta['backbone']} (width {meta['width']})",
              "data": str(data), "rows": rows, "wall_s": round(time.perf_counter() - t_start, 1),
              "world_size": dist.world_size, "device": str(dist.device), "machine": _machine(),
              "date": time.strftime("%Y-%m-%d"), "overrides": list(overrides), "recipe": recipe}
    write_report(run_dir / "eval", report)
    return report


def _plain(node) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node)


def _supervised(run, backbone, meta: dict, classes: list, job) -> dict:
    """A supervised protocol's result: the finished one in its work folder when it matches, else a run."""
    from fastssl.engine import distributed
    from fastssl.eval.supervised import RESULT

    t0 = time.perf_counter()
    done = _same(Path(job.work_dir) / RESULT, job.identity())
    if not distributed.broadcast_object(done is not None):  # rank 0's files decide, so every rank runs alike
        done = run(backbone, int(meta["feat_dim"]), len(classes), job, shutdown=False)
    return {**(done or {}), "wall_s": round(time.perf_counter() - t0, 1)}


def _machine() -> dict:
    cpu = cpu_model()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version()}


# ------------------------------------------------------------------------------------------------ the report
def write_report(folder: Path, report: dict) -> list[Path]:
    """report.json, report.md and report.png in ``folder``, each written atomically."""
    from pipelines.formats import atomic_write_bytes

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{REPORT}.json", folder / f"{REPORT}.md", folder / f"{REPORT}.png"]
    atomic_write_bytes(paths[0], (json.dumps(report, indent=2) + "\n").encode())
    atomic_write_bytes(paths[1], markdown(report).encode())
    atomic_write_bytes(paths[2], plot_png(report))
    return paths


def _fmt(result: dict | None, key: str) -> str:
    if not result or result.get(key) is None:
        return "-"
    return f"{result[key]:.2f}"


def markdown(report: dict) -> str:
    """The report as a Markdown table: each protocol from the run and from random init, top-1 / top-5 (%)."""
    random_col = any("random" in row for row in report["rows"])
    lines = [f"# Evaluation of {report['run']}", "",
             f"{report['method']} {report['backbone']}, step {report['step']} ({report['checkpoint']}); data "
             f"{report['data']}; {report['date']}; {report['world_size']} rank(s) on {report['device']} "
             f"({report['machine']['cpu']}{', ' + report['machine']['gpu'] if report['machine']['gpu'] else ''}).",
             ""]
    head = ["protocol", "labels", "top-1", "top-5"]
    if random_col:
        head += ["random init top-1", "random init top-5", "gain (top-1)"]
    head += ["compute time"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["rows"]:
        ssl, rnd = row.get("checkpoint"), row.get("random")
        cells = [row["what"], row["labels"], _fmt(ssl, "top1"), _fmt(ssl, "top5")]
        if random_col:
            gain = f"{ssl['top1'] - rnd['top1']:+.2f}" if ssl and rnd else "-"
            cells += [_fmt(rnd, "top1"), _fmt(rnd, "top5"), gain]
        spent = sum(r.get("seconds", r.get("seconds_this_process", 0)) for r in (ssl, rnd) if r)
        cells.append(f"{spent / 60:.1f} min")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Settings:", ""]
    for row in report["rows"]:
        result = row.get("checkpoint") or {}
        if row["protocol"] == "knn":
            lines.append(f"- {row['what']}: train split as the bank, {result.get('val_images', '?')} val queries")
        else:
            s = result.get("settings", {})
            lr = f"lr {s.get('base_lr')}" + (f", head lr {s.get('head_lr')}" if row["protocol"] == "finetune" else "")
            sched = s.get("schedule") if s.get("schedule") == "cosine" else \
                f"x{s.get('gamma')} at epochs {s.get('milestones')}"
            lines.append(f"- {row['what']}: SGD {lr} (x batch/256), batch {s.get('batch_size')}, momentum "
                         f"{s.get('momentum')}{' Nesterov' if s.get('nesterov') else ''}, weight decay "
                         f"{s.get('weight_decay')}, {sched}, crops {s.get('crop_scale')}, centre crop "
                         f"{s.get('center_crop')}{BN_NOTE if s.get('head_bn') else ''}; last epoch's score"
                         + (f"; labelled images listed in {result.get('labels_file')}" if result.get("labels_file")
                            else ""))
    lines += ["", f"Compute time: each protocol's, from the run and from random init together, across resumes (a "
              f"finished evaluation is reused by a rerun). This report's wall time: {report['wall_s'] / 60:.1f} min. "
              f"Plot: {REPORT}.png (top-1 against the fraction of labels used).", ""]
    return "\n".join(lines)


BN_NOTE = ", a BatchNorm (no affine) before the linear layer"
# Colours of the plot: the run, and random init.
SSL_COLOUR, RANDOM_COLOUR = (31, 119, 180), (150, 150, 150)


def plot_png(report: dict, width: int = 760, height: int = 480) -> bytes:
    """Top-1 (%) against the fraction of labels used (log scale): fine-tuning at each fraction joined by a line,
    the frozen-backbone protocols (linear, kNN) at 100 %; the run in blue, random init in grey. PNG bytes."""
    import io

    from PIL import Image, ImageDraw, ImageFont

    def font(size: int):
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: the fixed bitmap font
            return ImageFont.load_default()

    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 70, width - 190, 40, height - 60
    points = {init: [] for init in ("checkpoint", "random")}  # (fraction %, top-1, protocol)
    for row in report["rows"]:
        percent = float(row["labels"].rstrip("%"))
        for init in points:
            if row.get(init) and row[init].get("top1") is not None:
                points[init].append((percent, row[init]["top1"], row["protocol"]))
    values = [v for series in points.values() for _, v, _ in series]
    lo = max(0.0, math.floor((min(values, default=0) - 5) / 10) * 10)
    hi = min(100.0, math.ceil((max(values, default=100) + 5) / 10) * 10)
    hi = hi if hi > lo else lo + 10

    x_lo, x_hi = math.log10(0.7), math.log10(140)  # 1 % .. 100 % with a margin for the markers

    def xy(percent: float, value: float) -> tuple[float, float]:
        x = left + (math.log10(percent) - x_lo) / (x_hi - x_lo) * (right - left)
        y = bottom - (value - lo) / (hi - lo) * (bottom - top)
        return x, y

    # the frozen protocols share 100 %: kNN a little left of it, linear a little right, so neither hides the other
    nudge = {"knn": -9, "linear": 9, "finetune": 0}

    small, normal = font(12), font(14)
    d.rectangle([left, top, right, bottom], outline="black")
    for percent in (1, 10, 100):
        x, _ = xy(percent, lo)
        d.line([x, bottom, x, bottom + 5], fill="black")
        d.text((x, bottom + 8), f"{percent} %", fill="black", font=small, anchor="ma")
    step = 10 if hi - lo > 30 else 5
    v = lo
    while v <= hi + 1e-9:
        _, y = xy(1, v)
        d.line([left - 5, y, left, y], fill="black")
        d.line([left + 1, y, right - 1, y], fill=(235, 235, 235))
        d.text((left - 8, y), f"{v:g}", fill="black", font=small, anchor="rm")
        v += step
    d.rectangle([left, top, right, bottom], outline="black")
    d.text(((left + right) / 2, height - 22), "labels used (log scale)", fill="black", font=normal, anchor="mm")
    d.text((left - 40, top - 6), "top-1 (%)", fill="black", font=normal, anchor="ld")
    d.text(((left + right) / 2, 16), f"{report.get('method')} {report.get('backbone')} on "
           f"{Path(str(report.get('data'))).name}", fill="black", font=normal, anchor="mm")
    for init, colour in (("random", RANDOM_COLOUR), ("checkpoint", SSL_COLOUR)):
        tuned = sorted((p, v) for p, v, proto in points[init] if proto == "finetune")
        if len(tuned) > 1:
            d.line([xy(p, v) for p, v in tuned], fill=colour, width=3)
        for p, v, proto in points[init]:
            x, y = xy(p, v)
            x += nudge[proto]
            if proto == "finetune":
                d.ellipse([x - 6, y - 6, x + 6, y + 6], fill=colour)
            elif proto == "linear":
                d.rectangle([x - 6, y - 6, x + 6, y + 6], fill=colour)
            else:
                d.polygon([(x, y - 7), (x - 7, y + 6), (x + 7, y + 6)], fill=colour)
    legend = [("the run", SSL_COLOUR, None), ("random init", RANDOM_COLOUR, None), ("fine-tune", "black", "o"),
              ("linear (frozen)", "black", "s"), ("kNN (frozen)", "black", "^")]
    lx, ly = right + 20, top + 10
    for text, colour, marker in legend:
        if marker is None:
            d.line([lx, ly + 7, lx + 24, ly + 7], fill=colour, width=4)
        elif marker == "o":
            d.ellipse([lx + 6, ly + 1, lx + 18, ly + 13], fill=colour)
        elif marker == "s":
            d.rectangle([lx + 6, ly + 1, lx + 18, ly + 13], fill=colour)
        else:
            d.polygon([(lx + 12, ly), (lx + 5, ly + 13), (lx + 19, ly + 13)], fill=colour)
        d.text((lx + 32, ly + 7), text, fill="black", font=small, anchor="lm")
        ly += 24
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # KEY=VALUE may stand before or after the options
    from fastssl.config import ConfigError
    from fastssl.eval.features import apply_threads
    from fastssl.eval.subsets import SubsetError
    from fastssl.eval.supervised import StopRequested
    from fastssl.eval.weights import ExportError
    from pipelines.formats import DatasetFormatError

    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        apply_threads(args.threads)
        report = evaluate_run(
            args.run_dir, protocols=[p.strip() for p in args.protocols.split(",") if p.strip()],
            fractions=[f.strip() for f in args.labels.split(",") if f.strip()], random_init=not args.no_random,
            data=args.data, checkpoint=args.checkpoint, recipe=args.recipe, overrides=args.overrides,
            branch=args.branch, backend=args.backend, device=args.device, num_workers=args.num_workers,
            progress=not args.no_progress)
    except StopRequested as e:
        if main_rank:
            print(f"{PROG}: {e}", file=sys.stderr)
        return e.exit_code
    except (ConfigError, ExportError, SubsetError, DatasetFormatError, ValueError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if main_rank:
        print(markdown(report))
        print(f"wrote {Path(args.run_dir) / 'eval'}/{REPORT}.json, {REPORT}.md, {REPORT}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
