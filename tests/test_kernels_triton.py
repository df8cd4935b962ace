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

pytest.importorskip("triton")

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
