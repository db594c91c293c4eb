"""Each training divergence and its gradient with respect to the student's logits, in closed form,
built in place in the two (n, V) buffers that the two models' logits arrive in.

This is the inner step of tip.chunked_divergence. No autograd graph and no third (n, V) tensor:
the working set of a chunk is the student's and the teacher's logits, the floor for any loss that
compares them, plus per-row vectors and (block, V) scratch blocks (forward KL one, JSD two),
whose size does not grow with the chunk: on a CPU a block is one row at V = 151,936.

Notation: one row is one position; z_S, z_T its logits, s = log P_S, t = log P_T (log-softmaxes),
p = P_S, q = P_T. For any loss L(p) the softmax Jacobian gives dL/dz_u = p_u (a_u - Σ_v p_v a_v)
with a = dL/dp. Per row:

    reverse_kl  L = KL(P_S ‖ P_T) = Σ p (s - t)        a = s - t + 1
                G = dL/dz_S = p ⊙ (s - t - L)
    forward_kl  L = KL(P_T ‖ P_S) = Σ q (t - s)        (only -Σ q s depends on z_S)
                G = p - q
    jsd(β)      M = β q + (1 - β) p,  m = log M        (tip.generalized_jsd's convention)
                L = β KL(P_T ‖ M) + (1 - β) KL(P_S ‖ M)
                  = β Σ q (t - m) + (1 - β) Σ p (s - m)
                a = (1 - β)(s - m): the terms through m cancel, since β q + (1 - β) p = M.
                With c = log(β / (1 - β)), u = t - s + c and y = softplus(u) = log(1 + e^u):
                s - m = -log(1 - β) - y  and  t - m = -log β - softplus(-u) = -log β + (u - y),
                KL(P_S ‖ M) = -log(1 - β) - Σ p y,  KL(P_T ‖ M) = -log β + Σ q (u - y),
                G = (1 - β) · p ⊙ (Σ p y - y)
                β = 0 and β = 1 are forward_kl and reverse_kl (defined, not limits), as in
                tip.py.
    Every difference of log-probabilities is formed per token (s - t, u), so where the models
    agree it cancels per token, not between two sums the size of an entropy (Σ q (u - y), not
    Σ q u - Σ q y).

Underflow: where p or q underflows to 0 its log-softmax stays finite, so 0 · (finite) = 0, never
0 · log 0 = NaN: every product here is a probability times a finite difference of log-softmaxes.

Speed: the rows are taken `block` at a time, every pass of a block before the next. On a CPU a
block is the rows whose (rows, V) slice fits in CACHE_BYTES (one row at V = 151,936), so after the
first pass over it the others read a core's L2 cache instead of memory; on a GPU the passes are
memory-bound anyway and a block is GPU_BLOCK_ROWS rows (the whole chunk for reverse KL, which
needs no scratch), so a chunk launches few kernels.
"""
import math

import torch

CACHE_BYTES = 1 << 19  # a CPU block's (rows, V) slice of one buffer: half of a 1 MiB L2 cache
GPU_BLOCK_ROWS = 16


def rowdot(a, b):
    """Σ_v a_v b_v per row as a batched (1, V) @ (V, 1) product: no (n, V) temporary. -> (n,)."""
    return (a.unsqueeze(1) @ b.unsqueeze(-1)).view(-1)


def check(loss, beta):
    """The errors tip.divergence raises for an unknown loss or a JSD β outside [0, 1]."""
    if loss not in ("reverse_kl", "forward_kl", "jsd"):
        raise ValueError(f"unknown loss {loss!r}; valid: reverse_kl, forward_kl, jsd")
    if loss == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")


def block_rows(z, scratch_blocks):
    """Rows per block for the (n, V) buffer z (see the module's docstring)."""
    if z.device.type != "cpu":  # a loss without scratch (reverse KL) takes the chunk at once
        return GPU_BLOCK_ROWS if scratch_blocks else z.shape[0]
    return max(1, CACHE_BYTES // (z.shape[1] * z.element_size()))


def _reverse_kl(zs, zt, scratch, per_row, beta):
    """G = p ⊙ (s - t - KL) in place of zt; zs ends as p."""
    s = torch.log_softmax(zs, -1, out=zs)  # (r, V) log P_S, in place of z_S
    t = torch.log_softmax(zt, -1, out=zt)  # (r, V) log P_T, in place of z_T
    d = torch.sub(s, t, out=zt)  # (r, V) s - t, in place of t
    p = s.exp_()  # (r, V) P_S, in place of s
    per_row.copy_(rowdot(p, d))  # KL(P_S ‖ P_T)
    d.sub_(per_row.unsqueeze(1)).mul_(p)


def _forward_kl(zs, zt, scratch, per_row, beta):
    """G = p - q in place of zs; zt ends as q."""
    s = torch.log_softmax(zs, -1, out=zs)
    t = torch.log_softmax(zt, -1, out=zt)
    d = torch.sub(t, s, out=scratch[0])  # (r, V) t - s
    q = t.exp_()  # (r, V) P_T, in place of t
    per_row.copy_(rowdot(q, d))  # KL(P_T ‖ P_S)
    s.exp_().sub_(q)


def _jsd(zs, zt, scratch, per_row, beta):
    """G / -(1 - β) = p ⊙ (y - Σ p y) in place of zs; zt ends as q."""
    c = math.log(beta / (1 - beta))
    s = torch.log_softmax(zs, -1, out=zs)
    t = torch.log_softmax(zt, -1, out=zt)
    u = torch.sub(t, s, out=scratch[0])  # (r, V) u = t - s + c
    if c:
        u.add_(c)
    y = torch.logaddexp(u, u.new_zeros(()), out=scratch[1])  # (r, V) y = softplus(u)
    q = t.exp_()  # (r, V) P_T, in place of t
    kl_t = rowdot(q, u.sub_(y)).sub_(math.log(beta))  # KL(P_T ‖ M) = Σ q (u - y) - log β
    p = s.exp_()  # (r, V) P_S, in place of s
    py = rowdot(p, y)  # (r,) Σ p y = -KL(P_S ‖ M) - log(1 - β)
    per_row.copy_(kl_t.mul_(beta).sub_((1 - beta) * (py + math.log(1 - beta))))
    torch.mul(p, y.sub_(py.unsqueeze(1)), out=p)


STEPS = {"reverse_kl": (_reverse_kl, 0), "forward_kl": (_forward_kl, 1),
         "jsd": (_jsd, 2)}  # loss -> (one block's step, how many (block, V) scratch blocks)


def divergence_and_grad_(loss, beta, zs, zt, block=None):
    """Per-row loss and dL/dz_S from student and teacher logits zs, zt (n, V), both overwritten.

    Returns (per_row (n,), grad, scale): `grad` is zs or zt, now holding G / scale, and scale is a
    float (1, or -(1 - β) for JSD) for the caller to fold into its per-row weights, which costs an
    (n, D) product instead of another pass over (n, V). `block`: rows per block (block_rows).
    """
    check(loss, beta)
    if loss == "jsd" and beta in (0.0, 1.0):  # the endpoints are the two KLs (tip.generalized_jsd)
        loss = "forward_kl" if beta == 0.0 else "reverse_kl"
    n = zs.shape[0]
    step, blocks = STEPS[loss]
    block = min(n, block or block_rows(zs, blocks))
    scratch = zs.new_empty(blocks, block, zs.shape[1])  # (blocks, block, V)
    per_row = zs.new_empty(n)  # (n,)
    for i in range(0, n, block):
        r = slice(i, i + block)
        step(zs[r], zt[r], scratch[:, :zs[r].shape[0]], per_row[r], beta)
    grad, scale = {"reverse_kl": (zt, 1.0), "forward_kl": (zs, 1.0), "jsd": (zs, -(1 - beta))}[loss]
    return per_row, grad, scale
