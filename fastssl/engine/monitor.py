"""What a person watches during a run besides the bar: advice when the loader starves the model, and the
optional Weights & Biases sink (used only when ``wandb`` is installed and ``eval.wandb=true``)."""

from __future__ import annotations

import statistics
import uuid
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pipelines import progress, usable_cpus

DATA_WAIT_THRESHOLD_PCT = 10.0  # of the step time
DATA_WAIT_WINDOWS = 10  # log windows looked at together, and at least this many between two warnings


def data_wait_warning(wait_pcts: Sequence[float], *, backend: str, num_workers: int | None, ram_cache: bool,
                      device_type: str, cpus: int, device_decode: bool = False,
                      threshold: float = DATA_WAIT_THRESHOLD_PCT, windows: int = DATA_WAIT_WINDOWS) -> str | None:
    """The warning to print when the loader holds training back, else None.

    wait_pcts: data-wait % of the step time of the log windows since the last warning, oldest first. It warns
    when there are at least ``windows`` of them and the median of the last ``windows`` exceeds ``threshold``
    (the median, so the first window's loader start-up or one slow epoch boundary alone does not warn).
    backend: the loader actually running (torch | dali | ffcv); num_workers: its decode processes/threads;
    ram_cache: the torch backend serves decoded images from RAM; cpus: cores this process may use;
    device_decode: the torch backend decodes on the device (data.decode=device).
    """
    if windows < 1 or len(wait_pcts) < windows:
        return None
    median = statistics.median(wait_pcts[-windows:])
    if median <= threshold:
        return None
    hints = []
    more = max(1, cpus - 1)
    if backend == "torch" and not ram_cache and not device_decode:
        hints.append("data.cache=ram (decode every image once into RAM; same-size images that fit in memory)")
    if not (backend == "torch" and ram_cache) and (num_workers or 0) < more:
        hints.append(f"data.num_workers={more} (now {num_workers}; {cpus} cores here)")
    if device_type == "cuda" and backend == "torch" and not ram_cache and not device_decode:
        hints.append("data.decode=device (torchvision decodes each batch on the GPU; no DALI needed)")
    if device_type == "cuda" and backend != "dali":
        hints.append("data.backend=dali (decode on the GPU)")
    if backend != "ffcv":
        hints.append("data.backend=ffcv (convert with `fastssl-convert --formats wds,ffcv`)")
    if device_type != "cuda":
        hints.append("on a CPU-only machine decoding and training share the cores: a smaller data.global_size "
                     "or fewer local views (data.n_local) cuts both")
    return (f"data wait is {median:.0f}% of the step time (median of the last {windows} log windows, "
            f"threshold {threshold:.0f}%): the loader holds training back. Try " + "; ".join(hints) + ".")


class DataWaitMonitor:
    """Feeds each log window's data-wait % to :func:`data_wait_warning`; a warning at most once per
    ``windows`` windows."""

    def __init__(self, loader, device_type: str, threshold: float = DATA_WAIT_THRESHOLD_PCT,
                 windows: int = DATA_WAIT_WINDOWS):
        self.facts = loader_facts(loader)
        self.device_type, self.threshold, self.windows = device_type, threshold, windows
        self.history: list[float] = []

    def update(self, wait_pct: float) -> str | None:
        self.history.append(float(wait_pct))
        message = data_wait_warning(self.history, device_type=self.device_type, threshold=self.threshold,
                                    windows=self.windows, **self.facts)
        if message is not None:
            self.history.clear()
        else:
            del self.history[:-self.windows]
        return message


def loader_facts(loader) -> dict:
    """backend, num_workers, ram_cache and cpus of a running loader, for :func:`data_wait_warning`."""
    module = type(loader).__module__.rsplit(".", 1)[-1]
    backend = module.removesuffix("_loader") if module.endswith("_loader") else module
    workers = getattr(loader, "num_workers", getattr(loader, "num_threads", None))
    cpus = usable_cpus()
    return {"backend": backend, "num_workers": workers, "ram_cache": getattr(loader, "mode", None) == "ram",
            "cpus": cpus, "device_decode": getattr(loader, "decode", "host") == "device"}


class WandbSink:
    """Logs metric rows to a W&B run; the run id is kept in ``out_dir/wandb_id`` so a resumed run continues
    the same W&B run."""

    def __init__(self, wandb, cfg: DictConfig, out_dir: Path):
        id_file = out_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        out_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=cfg.eval.wandb_project, name=out_dir.name, id=run_id, resume="allow",
                              dir=str(out_dir), config=OmegaConf.to_container(cfg))

    def log(self, row: dict, step: int, prefix: str = "train") -> None:
        self.run.log({f"{prefix}/{k}": v for k, v in row.items() if k not in ("step", "epoch")}, step=step)

    def close(self) -> None:
        self.run.finish()


def open_wandb(cfg: DictConfig, out_dir: Path) -> WandbSink | None:
    """A W&B sink when ``eval.wandb`` is on and ``wandb`` imports; None otherwise (with a note when asked for)."""
    if not cfg.eval.wandb:
        return None
    try:
        import wandb
    except ImportError:
        progress.write("eval.wandb=true but wandb is not installed (pip install wandb): logging to TensorBoard "
                       "and metrics.jsonl only")
        return None
    return WandbSink(wandb, cfg, out_dir)
