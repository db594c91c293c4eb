"""Each training divergence and its gradient with respect to the student's logits, in closed form,
built in place in the two (n, V) buffers that the two models' logits arrive in.

This is the inner step of tip.chunked_divergence. No autograd graph and no third (n, V) tensor:
the working set of a chunk is the student's and the teacher's logits, the floor for any loss that
compares them, plus per-row vectors and (SCRATCH_ROWS, V) scratch blocks (one for forward KL, two for JSD).

Notation: one row is one position; z_S, z_T its logits, s = log P_S, t = log P_T (log-softmaxes),
p = P_S, q = P_T. For any loss L(p) the softmax Jacobian gives dL/dz_u = p_u (a_u - Σ_v p_v a_v)
with a = dL/dp. Per row:

    reverse_kl  L = KL(P_S ‖ P_T) = Σ p (s - t)        a = s - t + 1
                G = dL/dz_S = p ⊙ (s - t - L)
    forward_kl  L = KL(P_T ‖ P_S) = Σ q (t - s)        (only -Σ q s depends on z_S)
                G = p - q
    jsd(β)      M = β q + (1 - β) p,  m = log M        (tip.generalized_jsd's convention)
                L = β KL(P_T ‖ M) + (1 - β) KL(P_S ‖ M) = β Σ q (t - m) + (1 - β) Σ p (s - m)
                a = (1 - β)(s - m): the terms through m cancel, since β q + (1 - β) p = M, so
                G = (1 - β) · p ⊙ (s - m - KL(P_S ‖ M))
                β = 0 and β = 1 are forward_kl and reverse_kl (defined, not limits), as in tip.py.

Underflow: where p or q underflows to 0 its log-softmax stays finite, so 0 · (finite) = 0, never
0 · log 0 = NaN: every product here is a probability times a difference of log-softmaxes.
"""
import math

import torch

SCRATCH_ROWS = 16  # rows of the small scratch blocks: forward KL's t - s, JSD's q and softplus


def rowdot(a, b):
    """Σ_v a_v b_v per row as a batched (1, V) @ (V, 1) product: no (n, V) temporary. -> (n,)."""
    return (a.unsqueeze(1) @ b.unsqueeze(-1)).view(-1)


def check(loss, beta):
    """The errors tip.divergence raises for an unknown loss or a JSD β outside [0, 1]."""
    if loss not in ("reverse_kl", "forward_kl", "jsd"):
        raise ValueError(f"unknown loss {loss!r}; valid: reverse_kl, forward_kl, jsd")
    if loss == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")


def divergence_and_grad_(loss, beta, zs, zt):
    """Per-row loss and dL/dz_S from student and teacher logits zs, zt (n, V), both overwritten.

    Returns (per_row (n,), grad, scale): `grad` is zs or zt, now holding G / scale, and scale is a
    float (1, or 1 - β for JSD) for the caller to fold into its per-row weights, which costs an
    (n, D) product instead of another pass over (n, V).
    """
    check(loss, beta)
    if loss == "jsd" and beta in (0.0, 1.0):  # the endpoints are the two KLs (tip.generalized_jsd)
        loss = "forward_kl" if beta == 0.0 else "reverse_kl"
    s = torch.log_softmax(zs, -1, out=zs)  # (n, V) log P_S, in place of z_S
    t = torch.log_softmax(zt, -1, out=zt)  # (n, V) log P_T, in place of z_T
    if loss == "reverse_kl":
        d = torch.sub(s, t, out=zt)  # (n, V) s - t, in place of t
        p = s.exp_()  # (n, V) P_S, in place of s
        kl = rowdot(p, d)  # (n,) KL(P_S ‖ P_T)
        return kl, d.sub_(kl.unsqueeze(1)).mul_(p), 1.0  # G = p ⊙ (s - t - KL)
    n = zs.shape[0]
    per_row = zs.new_empty(n)  # (n,)
    c = math.log(beta / (1 - beta)) if loss == "jsd" else 0.0
    zero = zs.new_zeros(())  # softplus(x) = logaddexp(x, 0), which has an out= form
    for i in range(0, n, SCRATCH_ROWS):
        r = slice(i, i + SCRATCH_ROWS)
        if loss == "forward_kl":
            diff = t[r] - s[r]  # (r, V) scratch: t - s
            per_row[r] = rowdot(t[r].exp_(), diff)  # KL(P_T ‖ P_S); t becomes q, block by block
            continue
        # JSD. With x = s - t - c, c = log(β / (1 - β)): m = t + log β + softplus(x), so
        # t - m = -log β - softplus(x) and s - m = x - softplus(x) - log(1 - β). Both are formed
        # per token, so where the models agree they cancel per token, not between two sums the
        # size of an entropy (which would lose ~5x more of fp32's precision).
        q = t[r].exp()  # (r, V) scratch: P_T
        sp = torch.sub(s[r], t[r]).sub_(c)  # (r, V) scratch: x
        torch.logaddexp(sp, zero, out=sp)  # softplus(x)
        per_row[r] = -math.log(beta) - rowdot(q, sp)  # KL(P_T ‖ M), as Σ q = 1
        torch.sub(s[r], t[r], out=t[r]).sub_(c).sub_(sp)  # s - m + log(1 - β), in place of t
    if loss == "forward_kl":
        return per_row, s.exp_().sub_(t), 1.0  # G = p - q, in place of s
    p = s.exp_()  # (n, V) P_S, in place of s
    k = rowdot(p, t)  # (n,) Σ p (s - m) + log(1 - β) = KL(P_S ‖ M) + log(1 - β), as Σ p = 1
    per_row.mul_(beta).add_((1 - beta) * (k - math.log(1 - beta)))
    return per_row, t.sub_(k.unsqueeze(1)).mul_(p), 1 - beta  # the shift cancels in s - m - KL
