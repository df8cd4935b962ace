"""The plain-torch twins against hand-computed values, and the dispatch rules of fastssl.kernels."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from fastssl import kernels
from fastssl.kernels import reference


def test_info_nce_without_queue_matches_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    k = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    # logits = identity: each row has its positive at 1 and one negative at 0.
    expected = math.log(math.e + 1.0) - 1.0
    assert reference.info_nce(q, k, 1.0).item() == pytest.approx(expected, rel=1e-6)
    assert reference.info_nce(q, k, 1.0, scale=2.0).item() == pytest.approx(2 * expected, rel=1e-6)


def test_info_nce_with_queue_uses_the_queue_rows_as_the_only_negatives():
    q, k = torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    # logits [1, 0, -1] / 0.5, label 0
    expected = math.log(math.exp(2.0) + 1.0 + math.exp(-2.0)) - 2.0
    assert reference.info_nce(q, k, 0.5, queue=queue).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_masks_self_similarity():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    # Row z1[0]: positive z2[0] (cos 1), negatives z1[1] and z2[1] (cos 0), self left out; all rows alike.
    expected = math.log(math.exp(2.0) + 2.0) - 2.0
    assert reference.nt_xent(z1, z2, 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_contrastive_rows_core_reproduces_the_three_losses():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    queue = torch.nn.functional.normalize(torch.randn(9, 5, generator=g), dim=1)
    qn, kn = (torch.nn.functional.normalize(t, dim=1) for t in (q, k))
    torch.testing.assert_close(reference.contrastive_rows(qn, kn, kn, 0.2).mean(), reference.info_nce(q, k, 0.2))
    torch.testing.assert_close(reference.contrastive_rows(qn, kn, queue, 0.2, extra_pos=True).mean(),
                               reference.info_nce(q, k, 0.2, queue=queue))
    torch.testing.assert_close(kernels.nt_xent(q, k, 0.3), reference.nt_xent(q, k, 0.3))


def test_sinkhorn_matches_hand_computed_iteration():
    # eps 1: exp(S) = [[2, 1], [1, 1]]; columns to 1/K each: [[1/3, 1/4], [1/6, 1/4]]; rows to 1.
    scores = torch.log(torch.tensor([[2.0, 1.0], [1.0, 1.0]]))
    expected = torch.tensor([[4 / 7, 3 / 7], [2 / 5, 3 / 5]])
    torch.testing.assert_close(reference.sinkhorn(scores, eps=1.0, n_iters=1), expected)
    uniform = reference.sinkhorn(torch.full((3, 4), 0.7), eps=0.05, n_iters=3)
    torch.testing.assert_close(uniform, torch.full((3, 4), 0.25))


def test_sinkhorn_is_finite_in_half_precision_where_plain_exp_overflows():
    g = torch.Generator().manual_seed(1)
    scores = (torch.randn(16, 10, generator=g) * 5).half()
    assert torch.isinf(torch.exp(scores / 0.05)).any()  # the plain exp version overflows here
    q = reference.sinkhorn(scores, eps=0.05, n_iters=3)
    assert q.dtype == torch.float32 and torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(16))
    torch.testing.assert_close(reference.sinkhorn(scores.double(), eps=0.05).float(), q, rtol=1e-4, atol=1e-6)


def test_swav_loss_matches_hand_computation():
    scores = [torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])]
    codes = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    # view 0's code from view 1: -log(3/4); view 1's code from view 0: -log(1/2)
    expected = (math.log(4 / 3) + math.log(2.0)) / 2
    assert kernels.swav_loss(scores, codes, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="swav_loss"):
        kernels.swav_loss(scores[:1], codes[:1])


def test_forced_reference_and_bad_mode(monkeypatch):
    p, z = torch.randn(4, 3), torch.randn(4, 3)
    monkeypatch.setenv("FASTSSL_KERNELS", "reference")
    assert not kernels.use_triton(p, z)
    monkeypatch.setenv("FASTSSL_KERNELS", "fast")
    with pytest.raises(ValueError, match="FASTSSL_KERNELS"):
        kernels.normalized_mse(p, z)


def test_forced_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("FASTSSL_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.normalized_mse(torch.randn(4, 3), torch.randn(4, 3))


def test_cpu_tensors_default_to_the_twin(monkeypatch):
    monkeypatch.delenv("FASTSSL_KERNELS", raising=False)
    assert not kernels.use_triton(torch.randn(2, 2))


def test_interpreter_enabled_after_kernel_import_says_why():
    # Triton fixes interpreted-or-compiled at import; a fresh process imports the kernel without the flag.
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = ("import os, torch, fastssl.kernels as k, fastssl.kernels.normalized_mse_triton\n"
            "os.environ.update(FASTSSL_KERNELS='triton', TRITON_INTERPRET='1')\n"
            "try:\n    k.normalized_mse(torch.randn(3, 2), torch.randn(3, 2))\n"
            "except RuntimeError as e:\n    print(e)\n")
    env = {key: v for key, v in os.environ.items() if key not in ("TRITON_INTERPRET", "FASTSSL_KERNELS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "imported before TRITON_INTERPRET=1" in out.stdout, out.stderr


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_contrastive_losses_accumulate_in_fp32_inside_an_autocast_region(dtype):
    """Inside the training step's autocast region the twins' matmuls must not drop to bf16/fp16: the loss on
    bf16 inputs equals the same loss computed outside autocast, bit for bit (before the fix: ~1e-2 apart)."""
    torch.manual_seed(3)
    q, k, queue = torch.randn(32, 64), torch.randn(32, 64), F.normalize(torch.randn(256, 64), dim=1)
    cases = {
        "info_nce": lambda: kernels.info_nce(q, k, 0.2, gather=False),
        "info_nce_queue": lambda: kernels.info_nce(q, k, 0.2, queue=queue),
        "nt_xent": lambda: kernels.nt_xent(q, k, 0.2, gather=False),
        "ref_info_nce": lambda: reference.info_nce(q, k, 0.2, queue=queue),
        "ref_nt_xent": lambda: reference.nt_xent(q, k, 0.2),
    }
    for name, loss in cases.items():
        plain = loss()
        with torch.autocast("cpu", dtype=dtype):
            auto = loss()
        assert auto.dtype == torch.float32, name
        torch.testing.assert_close(auto, plain, rtol=0, atol=0, msg=name)
