"""Each training divergence and its gradient with respect to the student's logits, in closed form,
built in place in the two (n, V) buffers that the two models' logits arrive in.

This is the inner step of tip.chunked_divergence. No autograd graph and no third (n, V) tensor:
the working set of a chunk is the student's and the teacher's logits, the floor for any loss that
compares them, plus per-row vectors and (rows, cols) scratch tiles (forward KL one, JSD two) whose
size does not grow with the chunk or the vocabulary: on a CPU a tile is one row of 43,690 or
32,768 columns (0.11% and 0.17% of a (256, 151,936) buffer).

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
JSD computes y as log(1 + e^u), u first capped at U_MAX = 80 so that e^u stays finite: four cheap
vectorised ops, where logaddexp(u, 0) or softplus take twice as long on a CPU. Where u > 80,
q > e^80 p, and the cap moves q (u - y) = -q softplus(-u) by under q e^-80 and p y by under
q e^(c - 80): far below that token's own share of the loss. Rounding 1 + e^u costs y an absolute
error under ε (y ≈ e^u below ε reads 0), no more than the rounding of the terms beside it.

Speed: the rows are taken `block` at a time and, for the losses with scratch, each block
`cols` columns at a time, every pass over a tile before the next. On a CPU a tile is one row and
as many columns as keep its slices of both buffers and the scratch within CACHE_BYTES, so after
the first pass over it the others read a core's L2 cache instead of memory (reverse KL, which
needs no scratch, takes whole rows); on a GPU the passes are memory-bound anyway, so a tile is
GPU_BLOCK_ROWS whole rows (the whole chunk for reverse KL) and a chunk launches few kernels.
"""
import math

import torch

CACHE_BYTES = 1 << 19  # a CPU block's (rows, V) slice of one buffer: half of a 1 MiB L2 cache
GPU_BLOCK_ROWS = 16
U_MAX = 80.0  # JSD's u = t - s + c is capped here: e^80 is finite in fp32 (module docstring)


def rowdot_(acc, a, b):
    """acc += Σ_v a_v b_v per row, as a batched (1, V) @ (V, 1) product (one row: a matrix-vector
    product in place, a third of the batched product's cost), no (n, V) temporary. -> acc (n,)."""
    if a.shape[0] == 1:  # a CPU tile
        return acc.addmv_(a, b[0])
    return acc.add_((a.unsqueeze(1) @ b.unsqueeze(-1)).view(-1))


def check(loss, beta):
    """The errors tip.divergence raises for an unknown loss or a JSD β outside [0, 1]."""
    if loss not in ("reverse_kl", "forward_kl", "jsd"):
        raise ValueError(f"unknown loss {loss!r}; valid: reverse_kl, forward_kl, jsd")
    if loss == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")


def tile(z, scratch_blocks):
    """(rows, cols) of a block for the (n, V) buffer z (see the module's docstring)."""
    n, vocab = z.shape
    if z.device.type != "cpu":  # a loss without scratch (reverse KL) takes the chunk at once
        return (GPU_BLOCK_ROWS if scratch_blocks else n), vocab
    if not scratch_blocks:
        return max(1, CACHE_BYTES // (vocab * z.element_size())), vocab
    return 1, max(1, CACHE_BYTES // ((2 + scratch_blocks) * z.element_size()))


def _reverse_kl(zs, zt, scratch, per_row, beta, cols):
    """G = p ⊙ (s - t - KL) in place of zt; zs ends as p."""
    s = torch.log_softmax(zs, -1, out=zs)  # (r, V) log P_S, in place of z_S
    t = torch.log_softmax(zt, -1, out=zt)  # (r, V) log P_T, in place of z_T
    d = torch.sub(s, t, out=zt)  # (r, V) s - t, in place of t
    p = s.exp_()  # (r, V) P_S, in place of s
    rowdot_(per_row.zero_(), p, d)  # KL(P_S ‖ P_T)
    d.sub_(per_row.unsqueeze(1)).mul_(p)


def _forward_kl(zs, zt, scratch, per_row, beta, cols):
    """G = p - q in place of zs; zt ends as q."""
    s = torch.log_softmax(zs, -1, out=zs)
    t = torch.log_softmax(zt, -1, out=zt)
    per_row.zero_()
    for sj, tj in zip(s.split(cols, 1), t.split(cols, 1)):  # (r, c) tiles; t - s in the scratch
        d = torch.sub(tj, sj, out=scratch[0, :, :sj.shape[1]])  # (r, c) t - s
        rowdot_(per_row, tj.exp_(), d)  # KL(P_T ‖ P_S), with t -> q in place
    s.exp_().sub_(t)


def _jsd(zs, zt, scratch, per_row, beta, cols):
    """G / -(1 - β) = p ⊙ (y - Σ p y) in place of zs; zt ends as y."""
    c = math.log(beta / (1 - beta))
    s = torch.log_softmax(zs, -1, out=zs)
    t = torch.log_softmax(zt, -1, out=zt)
    kl_t, py = torch.zeros_like(per_row), torch.zeros_like(per_row)  # (r,) each
    for sj, tj in zip(s.split(cols, 1), t.split(cols, 1)):  # (r, c) tiles; u, q in the scratch
        u, q = scratch[0, :, :sj.shape[1]], scratch[1, :, :sj.shape[1]]  # (r, c) each
        torch.sub(tj, sj, out=u)  # u = t - s + c
        if c:
            u.add_(c)
        u.clamp_max_(U_MAX)  # so that e^u is finite (module docstring)
        torch.exp(tj, out=q)  # q: t is spent, and its tile takes y
        y = torch.exp(u, out=tj).add_(1.0).log_()  # y = softplus(u) = log(1 + e^u)
        rowdot_(kl_t, q, u.sub_(y))  # Σ q (u - y)
        rowdot_(py, sj.exp_(), y)  # Σ p y, with s -> p in place
    kl_t.sub_(math.log(beta))  # KL(P_T ‖ M)
    per_row.copy_(kl_t.mul_(beta).sub_((1 - beta) * (py + math.log(1 - beta))))
    torch.mul(s, t.sub_(py.unsqueeze(1)), out=s)


STEPS = {"reverse_kl": (_reverse_kl, 0), "forward_kl": (_forward_kl, 1),
         "jsd": (_jsd, 2)}  # loss -> (one block's step, how many scratch tiles)


def divergence_and_grad_(loss, beta, zs, zt, block=None, cols=None):
    """Per-row loss and dL/dz_S from student and teacher logits zs, zt (n, V), both overwritten.

    Returns (per_row (n,), grad, scale): `grad` is zs or zt, now holding G / scale, and scale is a
    float (1, or -(1 - β) for JSD) for the caller to fold into its per-row weights, which costs an
    (n, D) product instead of another pass over (n, V). `block`, `cols`: a tile's rows and columns
    (default: tile()).
    """
    check(loss, beta)
    if loss == "jsd" and beta in (0.0, 1.0):  # the endpoints are the two KLs (tip.generalized_jsd)
        loss = "forward_kl" if beta == 0.0 else "reverse_kl"
    (n, vocab), (step, blocks) = zs.shape, STEPS[loss]
    rows, width = tile(zs, blocks)
    block, cols = min(n, block or rows), min(vocab, cols or width)
    scratch = zs.new_empty(blocks, block, cols)  # (blocks, block, cols)
    per_row = zs.new_empty(n)  # (n,)
    for i in range(0, n, block):
        r = slice(i, i + block)
        step(zs[r], zt[r], scratch[:, :zs[r].shape[0]], per_row[r], beta, cols)
    grad, scale = {"reverse_kl": (zt, 1.0), "forward_kl": (zs, 1.0), "jsd": (zs, -(1 - beta))}[loss]
    return per_row, grad, scale
