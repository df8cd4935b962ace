"""Online linear probe: a linear classifier trained beside the SSL objective on the backbone's detached
features of each training batch's first global view, with its own optimizer, so a run shows how linearly
separable its features become while it trains (solo-learn's online classifier; the MAE linear probe's
non-affine BatchNorm in front of the linear layer makes it indifferent to the features' scale).

No extra backbone forward: a forward hook on the method's backbone keeps the first output of the step's
first call. Every method here runs its online backbone first on the global views concatenated in spec
order (``SSLMethod.forward_by_resolution``) or on view 0 alone, so that output's first B rows are view 0's
features (tests/test_probes.py checks this for every registered method). The features are detached and
the probe's parameters belong to no method optimizer: the backbone never sees the probe's gradients.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class OnlineLinearProbe:
    """Trains ``BatchNorm1d(affine=False) -> Linear(feat_dim, num_classes)`` on ``backbone``'s features.

    Per step: ``arm(step)`` before the training step (``step`` = steps completed so far; the probe trains on
    every ``every``-th), then ``update(labels)`` after it. ``log_window()`` returns the window's mean loss and
    top-1 (%, measured on each batch before the probe trains on it) and starts a new window; with several
    ranks the gradients and the window's sums are all-reduced, so every rank holds the same probe.
    """

    def __init__(self, backbone: nn.Module, feat_dim: int, num_classes: int, *, lr: float = 1e-3,
                 every: int = 1, device: torch.device | str = "cpu", world_size: int = 1):
        if every < 1:
            raise ValueError(f"probe every={every}: must be >= 1")
        self.every, self.world_size = int(every), int(world_size)
        linear = nn.Linear(feat_dim, num_classes)
        # Zero start: deterministic, and it draws nothing from the global RNG the run's resume restores.
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(feat_dim, affine=False, track_running_stats=False), linear)
        self.head.to(device)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=lr)
        self._sums = torch.zeros(3, device=device)  # loss * n, correct, n over the log window
        self._armed = False
        self._feats: torch.Tensor | None = None
        self.enabled = True
        self._hook = backbone.register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs, output) -> None:
        if self._armed:
            self._armed = False
            self._feats = output.detach() if isinstance(output, torch.Tensor) else None

    def arm(self, step: int) -> None:
        """Keep the backbone's next output when step ``step`` (0-based) is a probe step."""
        self._feats = None
        self._armed = self.enabled and step % self.every == 0

    def discard(self) -> None:
        """Forget what ``arm`` captured: the step was skipped (non-finite loss), so the probe does not learn from it."""
        self._feats, self._armed = None, False

    def update(self, labels: torch.Tensor) -> None:
        """One probe step on the features captured since ``arm`` and ``labels`` (B,) int64; a no-op otherwise."""
        armed, self._armed = self._armed, False
        feats, self._feats = self._feats, None
        if not self.enabled or (feats is None and not armed):
            return
        b = labels.shape[0]
        if feats is None or feats.ndim != 2 or feats.shape[0] < b or feats.shape[0] % b:
            got = "no backbone call" if feats is None else f"an output of shape {tuple(feats.shape)}"
            self.disable(f"the online linear probe expected backbone features (k*{b}, D) in the step, got {got}")
            return
        if b < 2:  # batch statistics need two samples
            return
        x = torch.nan_to_num(feats[:b].float(), nan=0.0, posinf=0.0, neginf=0.0)  # a NaN step stays out
        logits = self.head(x)
        loss = F.cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.world_size > 1:
            grads = [p.grad for p in self.head.parameters()]
            flat = torch.cat([g.flatten() for g in grads]) / self.world_size
            dist.all_reduce(flat)
            for g, piece in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                g.copy_(piece.view_as(g))
        self.optimizer.step()
        with torch.no_grad():
            correct = (logits.argmax(dim=1) == labels).sum()
            # the count as a Python scalar (a kernel argument): a host tensor would be a synchronizing copy
            self._sums[:2] += torch.stack([loss.detach() * b, correct.to(self._sums.dtype)])
            self._sums[2] += b

    def log_window(self) -> dict[str, float]:
        """``{"probe_loss", "probe_top1"}`` over the probe steps since the last call ({} when there were none)."""
        sums = self._sums.clone()
        self._sums.zero_()
        if self.world_size > 1:
            dist.all_reduce(sums)
        loss_sum, correct, n = sums.tolist()
        if n == 0:
            return {}
        return {"probe_loss": loss_sum / n, "probe_top1": 100.0 * correct / n}

    def disable(self, why: str) -> None:
        self.enabled = False
        self._hook.remove()
        warnings.warn(f"{why}; the probe is off for this run", stacklevel=2)

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
