"""tip.py against brute-force float64 references: explicit sums over a small vocabulary."""
import math

import numpy as np
import pytest
import torch

import closed_form
import memory
import tip


def softmax_np(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kl_np(p, q):  # KL(p ‖ q) by the definition, one explicit sum per row
    return np.array([sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(pr, qr) if pi > 0)
                     for pr, qr in zip(p, q)])


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return 3 * torch.randn(6, 11, generator=g), 3 * torch.randn(6, 11, generator=g)


def test_entropy_matches_definition(logits):
    zs, _ = logits
    p = softmax_np(zs.numpy())
    expected = [-sum(pi * math.log(pi) for pi in row) for row in p]
    np.testing.assert_allclose(tip.entropy(zs).numpy(), expected, rtol=1e-5)


def test_entropy_of_uniform_is_log_v():
    assert tip.entropy(torch.zeros(3, 50)).allclose(torch.full((3,), math.log(50)))


def test_reverse_and_forward_kl_match_definition(logits):
    zs, zt = logits
    ps, pt = softmax_np(zs.numpy()), softmax_np(zt.numpy())
    np.testing.assert_allclose(tip.reverse_kl(zs, zt).numpy(), kl_np(ps, pt), rtol=1e-4)
    np.testing.assert_allclose(tip.forward_kl(zs, zt).numpy(), kl_np(pt, ps), rtol=1e-4)
    assert not torch.allclose(tip.reverse_kl(zs, zt), tip.forward_kl(zs, zt))  # direction matters


def test_kl_of_identical_is_zero_and_kl_nonnegative(logits):
    zs, zt = logits
    assert tip.reverse_kl(zs, zs).abs().max() < 1e-6
    assert tip.forward_kl(zt, zt).abs().max() < 1e-6
    assert (tip.reverse_kl(zs, zt) >= 0).all() and (tip.forward_kl(zs, zt) >= 0).all()


def test_any_leading_shape(logits):
    zs, zt = logits
    a, b = zs.reshape(2, 3, 11), zt.reshape(2, 3, 11)
    assert tip.reverse_kl(a, b).shape == (2, 3)
    assert tip.reverse_kl(a, b).flatten().allclose(tip.reverse_kl(zs, zt))


def test_jsd_endpoints_and_interior(logits):
    zs, zt = logits
    assert torch.equal(tip.generalized_jsd(zs, zt, 0.0), tip.forward_kl(zs, zt))
    assert torch.equal(tip.generalized_jsd(zs, zt, 1.0), tip.reverse_kl(zs, zt))
    beta = 0.3
    ps, pt = softmax_np(zs.numpy()), softmax_np(zt.numpy())
    m = beta * pt + (1 - beta) * ps
    expected = beta * kl_np(pt, m) + (1 - beta) * kl_np(ps, m)
    np.testing.assert_allclose(tip.generalized_jsd(zs, zt, beta).numpy(), expected, rtol=1e-4)
    assert tip.generalized_jsd(zs, zs, 0.5).abs().max() < 1e-6
    with pytest.raises(ValueError, match="beta"):
        tip.generalized_jsd(zs, zt, 1.5)


def test_divergence_dispatch(logits):
    zs, zt = logits
    assert torch.equal(tip.divergence("reverse_kl", zs, zt), tip.reverse_kl(zs, zt))
    assert torch.equal(tip.divergence("jsd", zs, zt, beta=1.0), tip.reverse_kl(zs, zt))
    with pytest.raises(ValueError, match="reverse_kl, forward_kl, jsd"):
        tip.divergence("kl", zs, zt)


def _heads(n=13, ds=8, dt=12, vs=37, vt=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, ds, generator=g), torch.randn(vs, ds, generator=g),
            torch.randn(n, dt, generator=g), torch.randn(vt, dt, generator=g))


@pytest.mark.parametrize("chunk_size", [1, 4, 13, 100])
def test_token_stats_chunked_equals_unchunked(chunk_size):
    hs, ws, ht, wt = _heads()
    zs, zt = hs @ ws.T, ht @ wt.T
    stats = tip.token_stats(hs, ws, ht, wt, chunk_size=chunk_size)
    assert stats["entropy"].allclose(tip.entropy(zs), atol=1e-5)
    assert stats["entropy_norm"].allclose(tip.entropy(zs) / math.log(37), atol=1e-6)
    assert stats["reverse_kl"].allclose(tip.reverse_kl(zs, zt), atol=1e-4)
    assert stats["forward_kl"].allclose(tip.forward_kl(zs, zt), atol=1e-4)
    assert torch.equal(stats["student_top1"], zs.argmax(-1))
    assert stats["teacher_top1_p"].allclose(zt.softmax(-1).max(-1).values)


def test_token_stats_teacher_head_larger_uses_common_rows():
    hs, ws, ht, wt = _heads(vs=37, vt=45)
    stats = tip.token_stats(hs, ws, ht, wt, chunk_size=5)
    zs, zt = hs @ ws.T, (ht @ wt.T)[:, :37]
    assert stats["reverse_kl"].allclose(tip.reverse_kl(zs, zt), atol=1e-4)
    assert stats["entropy_norm"].allclose(tip.entropy(zs) / math.log(37), atol=1e-6)


def test_token_stats_never_tracks_gradients():
    hs, ws, ht, wt = _heads()
    ws.requires_grad_(True)
    assert not tip.token_stats(hs, ws, ht, wt)["reverse_kl"].requires_grad


def _reference_loss(hs, ws, ht, wt, loss, beta, weights):
    """Σ w_t·D_t over explicit float64 logits, gradients by plain autograd."""
    zs = hs.double() @ ws.double().T  # (N, V)
    zt = (ht.double() @ wt.double().T)[:, :ws.shape[0]]  # (N, V): the common leading rows
    p, q = zs.softmax(-1), zt.softmax(-1)
    m = beta * q + (1 - beta) * p  # the GKD mixture
    per_token = {"reverse_kl": (p * (p.log() - q.log())).sum(-1),
                 "forward_kl": (q * (q.log() - p.log())).sum(-1),
                 "jsd": beta * (q * (q.log() - m.log())).sum(-1)
                 + (1 - beta) * (p * (p.log() - m.log())).sum(-1)}[loss]
    return (per_token * weights.double()).sum()


@pytest.mark.parametrize("loss,beta", [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.3)])
@pytest.mark.parametrize("chunk_size", [1, 6, 100])
def test_chunked_divergence_value_and_gradients_match_float64_autograd(loss, beta, chunk_size):
    hs, ws, ht, wt = _heads(vs=37, vt=45)  # the teacher's head has 8 rows past the student's
    weights = torch.rand(hs.shape[0], generator=torch.Generator().manual_seed(3)) + 0.5
    hs64, ws64 = hs.double().requires_grad_(), ws.double().requires_grad_()
    ref = _reference_loss(hs64, ws64, ht, wt, loss, beta, weights)
    ref.backward()
    hs.requires_grad_(), ws.requires_grad_()
    got = tip.chunked_divergence(hs, ws, ht, wt, loss, beta, chunk_size, weights)
    (3.0 * got).backward()  # the incoming gradient scales the one formed in the forward
    # fp32's error for a sum of per-token divergences: about eps·log V per log-softmax, four per
    # token (both models, the difference, the sum), times the largest weight
    eps = torch.finfo(torch.float32).eps
    tolerance = 4 * hs.shape[0] * eps * math.log(37) * weights.max().item()
    assert got.item() == pytest.approx(ref.item(), rel=0, abs=tolerance)
    assert hs.grad.double().allclose(3.0 * hs64.grad, rtol=1e-4, atol=1e-6)
    assert ws.grad.double().allclose(3.0 * ws64.grad, rtol=1e-4, atol=1e-6)


def test_chunked_divergence_gives_the_teacher_no_gradient_and_a_frozen_head_none():
    hs, ws, ht, wt = _heads()
    hs.requires_grad_(), ht.requires_grad_(), wt.requires_grad_()
    tip.chunked_divergence(hs, ws, ht, wt, chunk_size=4).backward()
    assert hs.grad is not None and hs.grad.abs().sum() > 0
    assert ws.grad is None and ht.grad is None and wt.grad is None


def test_percentile_nearest_rank():
    x = torch.arange(1.0, 101.0)[torch.randperm(100)]
    assert tip.percentile(x, 98).item() == 98.0
    assert tip.percentile(x, 50).item() == 50.0
    assert tip.percentile(torch.tensor([5.0]), 98).item() == 5.0


def test_normalize_entropy_clips_at_98th_percentile_then_min_max():
    h = torch.arange(0.0, 100.0).reshape(2, 50)  # 0..99
    mask = torch.ones_like(h, dtype=torch.bool)
    h_hat = tip.normalize_entropy(h, mask)
    cap = 97.0  # nearest rank 98 of 0..99
    expected = torch.clamp(h, max=cap) / cap
    assert h_hat.allclose(expected)
    assert h_hat.max() == 1.0 and h_hat.min() == 0.0


def test_normalisation_ignores_masked_positions():
    d = torch.tensor([[1.0, 3.0, 100.0], [2.0, -50.0, 5.0]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    d_hat = tip.normalize_divergence(d, mask)
    assert d_hat.allclose(torch.tensor([[0.0, 0.5, 0.0], [0.25, 0.0, 1.0]]))


def test_normalisation_of_constant_batch_is_zero_not_nan():
    x = torch.full((3, 4), 0.7)
    mask = torch.ones(3, 4, dtype=torch.bool)
    for f in (tip.normalize_entropy, tip.normalize_divergence):
        out = f(x, mask)
        assert torch.isfinite(out).all() and (out == 0).all()


def test_each_quadrant_from_constructed_tokens():
    # columns: (high h, high d), (high h, low d), (low h, high d), (low h, low d), then fillers
    h_hat = torch.tensor([[0.9, 0.8, 0.1, 0.0, 0.5]])
    d_hat = torch.tensor([[0.9, 0.1, 0.8, 0.0, 0.5]])
    mask = torch.tensor([[True, True, True, True, False]])
    quadrant, (th, td) = tip.classify_quadrants(h_hat, d_hat, mask, 0.5, 0.5)
    assert quadrant.tolist() == [[1, 2, 3, 4, 0]] and (th, td) == (0.5, 0.5)


def test_quadrant_default_thresholds_are_medians():
    g = torch.Generator().manual_seed(0)
    h_hat, d_hat = torch.rand(4, 25, generator=g), torch.rand(4, 25, generator=g)
    mask = torch.ones(4, 25, dtype=torch.bool)
    quadrant, (th, td) = tip.classify_quadrants(h_hat, d_hat, mask)
    assert th == h_hat.flatten().sort().values[49].item()  # lower median of 100 values
    assert td == d_hat.flatten().sort().values[49].item()
    assert ((quadrant == 1) | (quadrant == 2)).sum() == 50  # exactly half strictly above


def test_quadrant_summary_shares():
    quadrant = torch.tensor([[1, 1, 3, 4], [2, 4, 0, 0]])
    kl = torch.tensor([[2.0, 2.0, 4.0, 0.0], [1.0, 1.0, 9.0, 9.0]])
    mask = quadrant > 0
    summary = tip.quadrant_summary(quadrant, kl, mask)
    assert summary[1] == {"share": 2 / 6, "kl_share": pytest.approx(0.4)}
    assert summary[3]["kl_share"] == pytest.approx(0.4)
    assert summary[4]["share"] == 2 / 6 and summary[4]["kl_share"] == pytest.approx(0.1)
    assert sum(s["share"] for s in summary.values()) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# The closed-form loss and gradient (closed_form.py) against autograd on the plain formula
# ---------------------------------------------------------------------------------------------

def _plain(loss, beta, zs, zt):
    """Per-row divergence by its definition over log-softmaxes (finite where P underflows)."""
    s, t = zs.log_softmax(-1), zt.log_softmax(-1)
    p, q = s.exp(), t.exp()
    if loss == "jsd" and beta == 0.0 or loss == "forward_kl":
        return (q * (t - s)).sum(-1)
    if loss == "jsd" and beta == 1.0 or loss == "reverse_kl":
        return (p * (s - t)).sum(-1)
    m = torch.logaddexp(t + math.log(beta), s + math.log(1 - beta))  # log M
    return beta * (q * (t - m)).sum(-1) + (1 - beta) * (p * (s - m)).sum(-1)


def _extreme_logits(n=40, v=37, seed=4):
    """Float64 logits: ordinary rows, then rows where P_T, P_S or both underflow (-1e4 gaps),
    rows where the two models agree exactly, and rows with one near-certain token."""
    g = torch.Generator().manual_seed(seed)
    zs, zt = 3 * torch.randn(n, v, generator=g, dtype=torch.float64), \
        3 * torch.randn(n, v, generator=g, dtype=torch.float64)
    zt[10:15, :20] -= 1e4  # the teacher gives 20 tokens probability 0 (underflow)
    zs[15:20, 5:30] -= 1e4  # the student does
    zt[20:25, :10] -= 1e4
    zs[20:25, 20:] -= 1e4  # both, on different tokens
    zs[25:30] = zt[25:30]  # identical rows: loss and gradient 0
    zs[30:35, 3] += 60.0  # the student is sure of one token
    return zs, zt


LOSSES = [("reverse_kl", 0.5), ("forward_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9),
          ("jsd", 0.0), ("jsd", 1.0)]


@pytest.mark.parametrize("loss,beta", LOSSES)
@pytest.mark.parametrize("block, cols", [(None, None), (1, None), (7, None), (1, 5), (7, 16)])
def test_closed_form_value_and_gradient_equal_autograd_in_float64(loss, beta, block, cols):
    """Tiles of any shape (None: closed_form.tile's; ragged last tiles with 7 rows, 5 or 16 columns
    of 40 rows, 37 columns) give the same loss and gradient."""
    zs, zt = _extreme_logits()
    w = torch.rand(zs.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref_zs = zs.clone().requires_grad_()
    ref = _plain(loss, beta, ref_zs, zt)  # (n,)
    (ref * w).sum().backward()
    per_row, g, scale = closed_form.divergence_and_grad_(loss, beta, zs.clone(), zt.clone(),
                                                         block, cols)
    grad = g * scale * w.unsqueeze(1)  # (n, V): the caller folds weights and the scale in
    assert torch.isfinite(ref).all() and torch.isfinite(ref_zs.grad).all()
    assert torch.isfinite(per_row).all() and torch.isfinite(grad).all()
    assert torch.allclose(per_row, ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(grad, ref_zs.grad, rtol=1e-9, atol=1e-12)
    assert per_row[25:30].abs().max() < 1e-12 and grad[25:30].abs().max() < 1e-12
    assert per_row[10:25].min() > 0.01  # the underflow rows carry a real loss


@pytest.mark.parametrize("loss,beta", LOSSES)
@pytest.mark.parametrize("chunk_size", [7, 100])
def test_chunked_divergence_in_float64_is_exact_with_weights_and_underflow(loss, beta, chunk_size):
    """With an identity head the hidden states are the logits, so the extreme rows reach the loss."""
    zs, zt = _extreme_logits()
    eye = torch.eye(zs.shape[1], dtype=torch.float64)  # (V, D) with D = V
    w = torch.rand(zs.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    hs, ws = zs.clone().requires_grad_(), eye.clone().requires_grad_()
    ref_hs, ref_ws = zs.clone().requires_grad_(), eye.clone().requires_grad_()
    ref = (_plain(loss, beta, ref_hs @ ref_ws.T, zt) * w).sum()
    ref.backward()
    got = tip.chunked_divergence(hs, ws, zt, eye, loss, beta, chunk_size, w)
    (2.0 * got).backward()
    assert got.dtype == torch.float64 and got.item() == pytest.approx(ref.item(), rel=1e-10)
    assert torch.allclose(hs.grad, 2.0 * ref_hs.grad, rtol=1e-9, atol=1e-12)
    assert torch.allclose(ws.grad, 2.0 * ref_ws.grad, rtol=1e-9, atol=1e-12)


def test_closed_form_refuses_what_divergence_refuses():
    zs, zt = torch.zeros(2, 5), torch.zeros(2, 5)
    with pytest.raises(ValueError, match="reverse_kl, forward_kl, jsd"):
        closed_form.divergence_and_grad_("kl", 0.5, zs, zt)
    with pytest.raises(ValueError, match="beta"):
        tip.chunked_divergence(zs, zt, zs, zt, "jsd", 1.5)


@pytest.mark.parametrize("loss", ["reverse_kl", "forward_kl", "jsd"])
def test_chunked_divergence_works_in_two_chunk_buffers(loss):
    """Forward + backward, with weights, holds two fp32 (chunk, V) buffers beyond the gradients it
    returns, plus scratch tiles, vectors and the allocator's small-block caches (here 0.3-2.1% of
    a buffer): measured on the C heap at every aten op, so a third (chunk, V) tensor alive at any
    op boundary (+1.0) fails it."""
    rows, chunk, vocab, ds, dt = 320, 256, 40_000, 16, 24
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(rows, ds, generator=g).requires_grad_()
    ws = torch.randn(vocab, ds, generator=g).requires_grad_()
    ht, wt = torch.randn(rows, dt, generator=g), torch.randn(vocab, dt, generator=g)
    w = torch.rand(rows, generator=g)
    with memory.HeapPeak():  # the mode's first use allocates for itself
        tip.chunked_divergence(hs, ws, ht, wt, loss, 0.5, chunk, w).backward()
    hs.grad = ws.grad = None
    with memory.HeapPeak() as heap:
        tip.chunked_divergence(hs, ws, ht, wt, loss, 0.5, chunk, w).backward()
    if math.isnan(heap.peak):
        pytest.skip("no glibc mallinfo2 here")
    extra = (heap.peak - heap.start - (vocab + rows) * ds * 4) / (chunk * vocab * 4)
    assert 1.99 < extra < 2.05
