"""Each Triton kernel against its plain-torch twin, forward and gradients.

Without CUDA the kernels run on CPU tensors under Triton's interpreter. Triton picks interpreted or
compiled when ``@triton.jit`` runs, i.e. when fastssl's ``*_triton`` modules are first imported (the
dispatch module imports them lazily), so TRITON_INTERPRET is set here at collection, before any test
runs. Triton 3.8's interpreter gets bf16 dots wrong; the kernels upcast them to fp32 when interpreted,
and bf16 is also checked compiled by the ``gpu`` tests.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from fastssl import kernels  # noqa: E402
from fastssl.kernels import reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=2e-3, atol=5e-4),
       torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("FASTSSL_KERNELS", "triton")


def _rand(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype).requires_grad_()


def _twin_inputs(*xs):
    return [x.detach().clone().requires_grad_() for x in xs]


def _close_grads(fused, twin, dtype, scale=1.0):
    """Gradient parity relative to the gradient's own size."""
    tol = TOL[dtype]
    for a, b in zip(fused, twin, strict=True):
        assert a.grad.dtype == a.dtype
        if a.shape[1] == 1:
            # D = 1: a unit vector cannot turn, the true gradient is 0 and both sides hold rounding noise.
            assert a.grad.float().abs().max() < 1e-2 and b.grad.float().abs().max() < 1e-2
            continue
        ref = b.grad.float()
        size = max(ref.abs().max().item(), 1e-3 * scale)
        torch.testing.assert_close(a.grad.float() / size, ref / size, rtol=tol["rtol"], atol=max(tol["atol"], 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,d", [(37, 1), (5, 127), (70, 256), (3, 300)])
def test_normalized_mse_matches_twin(n, d, dtype):
    p, z = _rand(n, d, dtype=dtype, scale=30.0, seed=n), _rand(n, d, dtype=dtype, seed=d)
    g = torch.rand(n, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    out = kernels.normalized_mse(p, z)
    p2, z2 = _twin_inputs(p, z)
    ref = reference.normalized_mse(p2, z2)
    assert out.dtype == torch.float32 and out.shape == (n,)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])  # fp32 accumulation of the same inputs
    (out * g).sum().backward()
    (ref * g).sum().backward()
    _close_grads([p, z], [p2, z2], dtype)


def test_normalized_mse_gradient_only_where_asked():
    p, z = _rand(9, 20), _rand(9, 20, seed=1).detach()
    kernels.normalized_mse(p, z).sum().backward()
    p2 = _twin_inputs(p)[0]
    reference.normalized_mse(p2, z).sum().backward()
    torch.testing.assert_close(p.grad, p2.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,d,queue_len", [(37, 127, 0), (70, 1, 0), (20, 256, 83), (33, 16, 130)])
def test_info_nce_matches_twin(n, d, queue_len, dtype):
    q, k = _rand(n, d, dtype=dtype, seed=3), _rand(n, d, dtype=dtype, seed=4)
    queue = None
    if queue_len:
        g = torch.Generator().manual_seed(5)
        queue = torch.nn.functional.normalize(torch.randn(queue_len, d, generator=g), dim=1).to(DEVICE, dtype)
    out = kernels.info_nce(q, k, 0.2, queue=queue, scale=2.0)
    q2, k2 = _twin_inputs(q, k)
    ref = reference.info_nce(q2, k2, 0.2, queue=queue, scale=2.0)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    out.backward()
    ref.backward()
    _close_grads([q, k], [q2, k2], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_info_nce_with_large_logits_is_stable(dtype):
    # temperature 0.01: logits up to 100, exp overflows in fp32 without the running max.
    q, k = _rand(40, 32, dtype=dtype, seed=6), _rand(40, 32, dtype=dtype, seed=7)
    with torch.no_grad():
        k[:20] = q[:20]  # half the rows have their positive at cos 1: logits of exactly 1 / T
    out = kernels.info_nce(q, k, 0.01)
    q2, k2 = _twin_inputs(q, k)
    ref = reference.info_nce(q2, k2, 0.01)
    assert torch.isfinite(out)
    torch.testing.assert_close(out, ref, rtol=TOL[dtype]["rtol"], atol=1e-3)
    out.backward()
    ref.backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    # Rounding the normalized fp16 inputs (5e-4) is amplified 100x in the logits: bf16-level tolerance.
    _close_grads([q, k], [q2, k2], dtype if dtype == torch.float32 else torch.bfloat16, scale=100.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,d", [(37, 127), (3, 1)])
def test_nt_xent_matches_twin(n, d, dtype):
    z1, z2 = _rand(n, d, dtype=dtype, seed=8), _rand(n, d, dtype=dtype, seed=9)
    out = kernels.nt_xent(z1, z2, 0.1)
    a, b = _twin_inputs(z1, z2)
    ref = reference.nt_xent(a, b, 0.1)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    out.backward()
    ref.backward()
    _close_grads([z1, z2], [a, b], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,k,path", [(37, 130, "on_chip"), (5, 7, "on_chip"), (37, 130, "streaming"),
                                      (300, 70, "auto"), (5, 7, "streaming")])
def test_sinkhorn_matches_twin(b, k, path, dtype):
    from fastssl.kernels import sinkhorn_triton

    g = torch.Generator().manual_seed(b)
    scores = torch.nn.functional.normalize(torch.randn(b, k, generator=g), dim=1).to(DEVICE, dtype)
    q = sinkhorn_triton.sinkhorn(scores, eps=0.05, n_iters=3, path=path)
    ref = reference.sinkhorn(scores, eps=0.05, n_iters=3)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(b, device=DEVICE))


@pytest.mark.parametrize("n_iters", [0, 1])
def test_sinkhorn_few_iterations_match_twin(n_iters):
    from fastssl.kernels import sinkhorn_triton

    scores = torch.randn(9, 33, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    for path in ("on_chip", "streaming"):
        torch.testing.assert_close(sinkhorn_triton.sinkhorn(scores, 0.5, n_iters, path=path),
                                   reference.sinkhorn(scores, 0.5, n_iters), rtol=1e-5, atol=1e-6)


def test_sinkhorn_on_chip_refuses_big_tiles():
    from fastssl.kernels import sinkhorn_triton

    with pytest.raises(ValueError, match="on-chip"):
        sinkhorn_triton.sinkhorn(torch.randn(300, 70, device=DEVICE), path="on_chip")


def test_sinkhorn_fp16_large_scores_stay_finite():
    g = torch.Generator().manual_seed(11)
    scores = (torch.randn(12, 20, generator=g) * 8).half().to(DEVICE)
    q = kernels.sinkhorn(scores, eps=0.05)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q, reference.sinkhorn(scores.double(), eps=0.05).float(), rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_sizes_on_gpu(dtype):
    p, z = _rand(4096, 256, dtype=dtype), _rand(4096, 256, dtype=dtype, seed=1)
    torch.testing.assert_close(kernels.normalized_mse(p, z), reference.normalized_mse(p, z), **TOL[torch.float32])
    q, k = _rand(1024, 256, dtype=dtype, seed=2), _rand(1024, 256, dtype=dtype, seed=3)
    queue = torch.nn.functional.normalize(torch.randn(65536, 256, device=DEVICE), dim=1).to(dtype)
    for qu in (None, queue):
        out = kernels.info_nce(q, k, 0.2, queue=qu)
        q2, k2 = _twin_inputs(q, k)
        ref = reference.info_nce(q2, k2, 0.2, queue=qu)
        torch.testing.assert_close(out, ref, **TOL[dtype])
        q.grad = k.grad = None
        out.backward()
        ref.backward()
        _close_grads([q, k], [q2, k2], dtype)
    z1, z2 = _rand(2048, 128, dtype=dtype, seed=4), _rand(2048, 128, dtype=dtype, seed=5)
    torch.testing.assert_close(kernels.nt_xent(z1, z2, 0.1), reference.nt_xent(z1, z2, 0.1), **TOL[dtype])
    scores = torch.nn.functional.normalize(torch.randn(256, 3000, device=DEVICE), dim=1).to(dtype)
    torch.testing.assert_close(kernels.sinkhorn(scores), reference.sinkhorn(scores), rtol=1e-4, atol=1e-6)


def test_byol_trains_the_same_through_the_fused_kernel(monkeypatch):
    from fastssl.methods import build_method
    from fastssl.models import build_backbone

    def loss_and_grads(mode):
        monkeypatch.setenv("FASTSSL_KERNELS", mode)
        torch.manual_seed(0)
        backbone = build_backbone("resnet18", width=4, small_images=True)
        method = build_method("byol", backbone, backbone.feat_dim, proj_hidden=32, proj_dim=16, pred_hidden=32)
        method = method.to(DEVICE)
        g = torch.Generator().manual_seed(1)
        views = [torch.randn(4, 3, 16, 16, generator=g).to(DEVICE) for _ in range(2)]
        loss, _ = method(views)
        loss.backward()
        return loss.detach(), next(iter(method.predictor.parameters())).grad

    loss_t, grad_t = loss_and_grads("triton")
    loss_r, grad_r = loss_and_grads("reference")
    torch.testing.assert_close(loss_t, loss_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_t, grad_r, rtol=1e-4, atol=1e-6)


# ---- split-K: too few row blocks for the GPU's SMs -------------------------------------------------------------
@pytest.mark.parametrize("splits", [2, 5])
@pytest.mark.parametrize("mode", ["queue", "self", "plain"])
def test_keys_cut_into_parts_match_the_twin(splits, mode):
    """The forward's partial logsumexps merged, and dq's parts summed, give the twin's loss and gradients: with the
    positive as an extra logit (MoCo v2's queue), with a left-out column (NT-Xent), and plain (MoCo v3)."""
    from fastssl.kernels import info_nce_triton

    n, m, d = 13, 150, 20  # D = 20: key blocks of 64, so 150 keys are 3 blocks; 5 parts become 3
    q, pos = _rand(n, d, seed=11), _rand(n, d, seed=12)
    keys = _rand(m, d, seed=13)
    with torch.no_grad():
        for t in (q, pos, keys):
            t.copy_(torch.nn.functional.normalize(t, dim=1))
    self_col = torch.arange(n, device=DEVICE) * 7 if mode == "self" else None
    out = info_nce_triton.contrastive_rows(q, pos, keys, 0.2, self_col, extra_pos=mode == "queue", splits=splits)
    q2, pos2, keys2 = _twin_inputs(q, pos, keys)
    ref = reference.contrastive_rows(q2, pos2, keys2, 0.2, self_col, extra_pos=mode == "queue")
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    g = torch.rand(n, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    _close_grads([q, pos, keys], [q2, pos2, keys2], torch.float32)


def test_too_few_row_blocks_split_the_keys_to_fill_the_gpu():
    """MoCo v2's bench shape on a 132-SM H100: 4,096 rows are 64 programs; cut into 5 parts of keys, 320."""
    from fastssl.kernels import info_nce_triton

    cfg = info_nce_triton._config(torch.float32, 256)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    splits = info_nce_triton.key_splits(4096, 65536, bm, bn, sms=132)
    assert 4096 // bm == 64 and splits == 5 and 64 * splits >= 2 * 132
    assert info_nce_triton.key_splits(65536, 65536, bm, bn, sms=132) == 1  # enough rows: no merge to pay
    assert info_nce_triton.key_splits(64, 256, bm, bn, sms=132) == 1  # too few keys to be worth cutting
    per = info_nce_triton._keys_per_split(65536, splits, bn)
    assert per % bn == 0 and -(-65536 // per) == splits


# ---- configurations that fit the GPU's shared memory ------------------------------------------------------------
class _SharedMemoryOf:
    """A kernel whose launch fails as Triton's does on a GPU with too little shared memory for the configurations
    that ``too_big`` picks out, and runs (interpreted) otherwise."""

    def __init__(self, kernel, too_big):
        self.kernel, self.too_big, self.launched = kernel, too_big, []

    def __getitem__(self, grid):
        def launch(*args, **cfg):
            from triton.runtime.errors import OutOfResources

            if self.too_big(cfg):
                raise OutOfResources(196608, 166912, "shared memory")
            self.launched.append(cfg)
            return self.kernel[grid](*args, **cfg)
        return launch


def test_a_configuration_too_big_for_the_gpu_falls_back_to_one_that_fits(monkeypatch):
    """fp32 with 256 < D <= 512 takes 192-197 KiB at 3 stages: an H100's 227 KiB holds it, an A100's 163 KiB not.
    Triton refuses such a launch (OutOfResources); the kernels then take the next configuration, and remember it."""
    from fastssl.kernels import info_nce_triton as it

    monkeypatch.setattr(it, "_FITS", {})
    kernels_ = {}
    for name in ("_fwd_kernel", "_dq_kernel", "_dk_kernel"):
        kernels_[name] = _SharedMemoryOf(getattr(it, name), lambda cfg: "num_stages" not in cfg)
        monkeypatch.setattr(it, name, kernels_[name])
    q, pos, keys = (_rand(9, 20, seed=s) for s in (21, 22, 23))
    for _ in range(2):
        out = it.contrastive_rows(q, pos, keys, 0.2)
        out.sum().backward()
    q2, pos2, keys2 = _twin_inputs(q, pos, keys)
    ref = reference.contrastive_rows(q2, pos2, keys2, 0.2)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    assert all(k.launched and all(c.get("num_stages") == 2 for c in k.launched) for k in kernels_.values())
    assert sorted(v for v in it._FITS.values()) == [1, 1, 1]

    for name in kernels_:  # nothing fits: one line that says what to do
        monkeypatch.setattr(it, name, _SharedMemoryOf(kernels_[name].kernel, lambda cfg: True))
    monkeypatch.setattr(it, "_FITS", {})
    with pytest.raises(RuntimeError, match="no configuration fits this GPU's shared memory.*FASTSSL_KERNELS=reference"):
        it.contrastive_rows(q, pos, keys, 0.2)


_SHARED_MEMORY_OF_DK = """
import json, sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastssl.kernels import info_nce_triton as it

kernel = it._dk_kernel
signature = {a: "*fp32" if a.endswith("_ptr") else "fp32" if a == "inv_t" else "constexpr" if a.isupper() else "i32"
             for a in kernel.arg_names}
signature["self_ptr"] = "*i32"
out = []
for cfg, arch in zip(it._configs(torch.float32, 512), (90, 80, 86)):
    constants = {"HAS_SELF": True, **{k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")}}
    src = ASTSource(kernel, signature, {a: constants[a] for a in kernel.arg_names if a.isupper()})
    options = {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}
    out.append(triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options).metadata.shared)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_the_fallback_configurations_fit_a100_and_sm86_shared_memory_when_compiled(tmp_path):
    """Compiled for each architecture here (Triton compiles without a GPU; in a fresh process, as this one
    interprets): the widest kernel (dkeys), fp32 with D = 512. The first configuration fits sm_90's 227 KiB but
    not sm_80's 163 KiB, the second fits sm_80, the last sm_86's 99 KiB."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(root)}
    run = subprocess.run([sys.executable, "-c", _SHARED_MEMORY_OF_DK], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    first, second, last = json.loads(run.stdout.strip().splitlines()[-1])
    kib = 1024
    assert 163 * kib < first <= 227 * kib and second <= 163 * kib and last <= 99 * kib, (first, second, last)
