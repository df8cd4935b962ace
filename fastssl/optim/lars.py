"""LARS: SGD with momentum whose step is scaled per tensor by a trust ratio.

    d     = g + wd * w
    trust = eta * ||w|| / (||g|| + wd * ||w||), or 1 where ||w|| or ||g|| is 0
    buf   = momentum * buf + trust * d
    w     = w - lr * buf                     (nesterov: w - lr * (trust * d + momentum * buf))

Parameter groups with ``lars_exclude=True`` (biases and normalization parameters, the BYOL / SwAV recipe)
get neither the trust ratio nor weight decay: a plain SGD-momentum update.

The trust ratio is computed with ``torch.where`` on tensors (or on the device, in the kernels), never
``.item()`` or a Python branch, so a step never forces a device-to-host sync. Implementations (``impl=``):

* ``"loop"``: ``_step_loop``, one tensor at a time: the reference twin every other path is tested against.
* ``"foreach"``: ``_step_foreach``, multi-tensor ops over a whole group (~15 tensor-sized memory streams).
* ``"fused_cpu"``: ``csrc/lars_cpu.cpp``, per cache-sized block of tensors one pass for the norms and one
  fused read-modify-write pass (5 streams from memory); JIT-built on first use and cached
  (:mod:`pipelines.native`, the builder shared with the photometric stage).
* ``"cuda"``: ``csrc/lars_cuda.cu``, every parameter of every group in one kernel launch (a cooperative
  grid: norms, grid barrier, update; two launches where cooperative launch is unsupported).
* ``"auto"`` (default): ``cuda`` on CUDA, ``fused_cpu`` on CPU, ``foreach`` where those do not apply (a
  dtype other than fp32, a non-dense layout) or their build fails (with one warning).

``foreach=False`` (the older switch, ``optim.foreach`` in the config) means ``impl="loop"``; ``True`` or
``None`` leave ``impl`` as given, so ``foreach=True`` gets the fastest multi-tensor path.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch.optim import Optimizer

from pipelines import native

IMPLS = ("auto", "loop", "foreach", "fused_cpu", "cuda")


class LARS(Optimizer):
    """LARS optimizer; ``impl`` picks the implementation (module docstring), ``foreach=False`` the reference loop."""

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        nesterov: bool = False,
        foreach: bool | None = None,
        impl: str = "auto",
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS: invalid lr={lr}, momentum={momentum}, weight_decay={weight_decay}, eta={eta}")
        if nesterov and momentum <= 0:
            raise ValueError("LARS: nesterov needs momentum > 0")
        if impl not in IMPLS:
            raise ValueError(f"LARS: impl={impl!r}; choose one of {IMPLS}")
        if foreach is False:
            if impl not in ("auto", "loop"):
                raise ValueError(f"LARS: foreach=False contradicts impl={impl!r}")
            impl = "loop"
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, nesterov=nesterov,
                        lars_exclude=False)
        self._bufs_cache: dict[int, list] = {}
        super().__init__(params, defaults)
        self.impl = impl
        self.foreach = impl != "loop"

    def _gather(self, group: dict) -> tuple[list, list, list]:
        params = group["params"]
        grads = [p.grad for p in params]
        # Fast path, every step of a normal run: every parameter has a dense gradient and its buffer exists.
        # The buffer list is cached per group (invalidated when state is loaded or groups change), so a step
        # does no per-parameter dict lookups on the host.
        key = id(group)
        cached = self._bufs_cache.get(key)
        if cached is not None and len(cached) == len(params) and all(g is not None and not g.is_sparse for g in grads):
            return params, grads, cached
        params_out, grads_out, bufs = [], [], []
        for p, g in zip(params, grads, strict=True):
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError("LARS does not support sparse gradients")
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params_out.append(p)
            grads_out.append(g)
            bufs.append(state["momentum_buffer"])
        if len(params_out) == len(params):
            self._bufs_cache[key] = bufs
        return params_out, grads_out, bufs

    def load_state_dict(self, state_dict: dict) -> None:
        self._bufs_cache.clear()
        super().load_state_dict(state_dict)

    def add_param_group(self, param_group: dict) -> None:
        if hasattr(self, "_bufs_cache"):
            self._bufs_cache.clear()
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        cuda_batch: list[tuple[dict, list, list, list]] = []
        for group in self.param_groups:
            params, grads, bufs = self._gather(group)
            if not params:
                continue
            impl = _resolve(self.impl, params, grads, bufs)
            if impl == "cuda":
                cuda_batch.append((group, params, grads, bufs))  # every group in one launch, below
                continue
            step = {"loop": _step_loop, "foreach": _step_foreach, "fused_cpu": _step_fused_cpu}[impl]
            step(params, grads, bufs, lr=group["lr"], momentum=group["momentum"],
                 weight_decay=group["weight_decay"], eta=group["eta"], nesterov=group["nesterov"],
                 exclude=group["lars_exclude"])
        if cuda_batch:
            try:
                _step_cuda(cuda_batch)
            except RuntimeError as exc:  # the kernel's input checks run before anything is written
                if self.impl != "auto" or "lars_step_cuda:" not in str(exc):
                    raise
                if "cuda-inputs" not in _warned:
                    _warned.add("cuda-inputs")
                    warnings.warn(f"LARS: the CUDA kernel refused these tensors ({exc}); using the foreach path",
                                  RuntimeWarning, stacklevel=2)
                for group, params, grads, bufs in cuda_batch:
                    _step_foreach(params, grads, bufs, lr=group["lr"], momentum=group["momentum"],
                                  weight_decay=group["weight_decay"], eta=group["eta"], nesterov=group["nesterov"],
                                  exclude=group["lars_exclude"])
        return loss


_warned: set[str] = set()


def _fused_eligible(params: list, grads: list, bufs: list, device_type: str) -> bool:
    """The kernels take fp32 dense tensors whose param, grad and buffer share one layout."""
    for p, g, b in zip(params, grads, bufs, strict=True):
        if p.device.type != device_type or p.dtype != torch.float32 or g.dtype != torch.float32:
            return False
        if not _same_dense_layout(p, g, b):
            return False
    return len({p.device for p in params}) == 1


def _same_dense_layout(*tensors: torch.Tensor) -> bool:
    """Elements in the same storage order with no gaps: all contiguous, or all channels-last contiguous."""
    return any(all(t.is_contiguous(memory_format=f) for t in tensors)
               for f in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d))


def _kernel_available(impl: str) -> bool:
    try:
        if impl == "cuda":
            native.load_lars_cuda()
        else:
            native.load_lars_cpu()
        return True
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the foreach path
        if impl not in _warned:
            _warned.add(impl)
            warnings.warn(f"LARS: the {impl} kernel is unavailable ({type(exc).__name__}: {exc}); "
                          "using the foreach path", RuntimeWarning, stacklevel=4)
        return False


def _resolve(impl: str, params: list, grads: list, bufs: list) -> str:
    if impl in ("loop", "foreach"):
        return impl
    device_type = params[0].device.type
    if impl == "auto":
        impl = "cuda" if device_type == "cuda" else "fused_cpu" if device_type == "cpu" else "foreach"
        if impl == "cuda":  # the kernel checks its inputs itself; step() falls back to foreach if it refuses
            return impl if _kernel_available(impl) else "foreach"
        if impl == "foreach" or not _fused_eligible(params, grads, bufs, device_type):
            return "foreach"
        return impl if _kernel_available(impl) else "foreach"
    # Asked for explicitly: wrong inputs or a failed build are errors, not silent fallbacks.
    expected = "cuda" if impl == "cuda" else "cpu"
    if not _fused_eligible(params, grads, bufs, expected):
        raise ValueError(f"LARS impl={impl!r} needs fp32 dense {expected} tensors whose grad and buffer share "
                         "the parameter's layout")
    return impl


def _trust_ratio(w_norm: torch.Tensor, g_norm: torch.Tensor, eta: float, weight_decay: float) -> torch.Tensor:
    ratio = eta * w_norm / (g_norm + weight_decay * w_norm)
    return torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))


def _step_loop(params, grads, bufs, *, lr, momentum, weight_decay, eta, nesterov, exclude) -> None:
    for p, g, buf in zip(params, grads, bufs, strict=True):
        if exclude:
            d = g
        else:
            trust = _trust_ratio(p.norm(), g.norm(), eta, weight_decay)
            d = g.add(p, alpha=weight_decay).mul_(trust)
        buf.mul_(momentum).add_(d)
        update = d.add(buf, alpha=momentum) if nesterov else buf
        p.add_(update, alpha=-lr)


def _step_foreach(params, grads, bufs, *, lr, momentum, weight_decay, eta, nesterov, exclude) -> None:
    if exclude:
        d = grads
    else:
        w_norm = torch.stack(torch._foreach_norm(params))
        g_norm = torch.stack(torch._foreach_norm(grads))
        trust = _trust_ratio(w_norm, g_norm, eta, weight_decay)
        d = torch._foreach_add(grads, params, alpha=weight_decay)
        torch._foreach_mul_(d, list(trust.unbind(0)))
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, d)
    update = torch._foreach_add(d, bufs, alpha=momentum) if nesterov else bufs
    torch._foreach_add_(params, update, alpha=-lr)



def _step_fused_cpu(params, grads, bufs, *, lr, momentum, weight_decay, eta, nesterov, exclude) -> None:
    native.load_lars_cpu().lars_step(params, grads, bufs, float(lr), float(momentum), float(weight_decay),
                                     float(eta), bool(nesterov), bool(exclude))


def _step_cuda(batch: list[tuple[dict, list, list, list]]) -> None:
    """All groups in one launch: tensors flattened, each tagged with its group's index."""
    params, grads, bufs, index = [], [], [], []
    for k, (_, p, g, b) in enumerate(batch):
        params += p
        grads += g
        bufs += b
        index += [k] * len(p)
    groups = [group for group, *_ in batch]
    native.load_lars_cuda().lars_step(
        params, grads, bufs, index,
        [float(g["lr"]) for g in groups], [float(g["momentum"]) for g in groups],
        [float(g["weight_decay"]) for g in groups], [float(g["eta"]) for g in groups],
        [bool(g["nesterov"]) for g in groups], [bool(g["lars_exclude"]) for g in groups],
    )
