"""TIP's two axes and four quadrants: student entropy and teacher-student divergence per token.

Contract. The math is pure functions over tensors, with no model, tokenizer, file or print inside;
distill.py, analysis.py, bench.py, the notebook, the tests and people's forks import these exact
names. The method they implement, with the paper's equations and every departure from it, is
docs/method.md; the quadrant analysis CLI is analysis.py.

Notation: `V` vocabulary, `N` response positions (flattened), `D` hidden size, `B` rollouts and
`T` positions when a batch is kept padded. P_S is the student's next-token distribution, P_T the
frozen teacher's, both at the same context c_t = (x, y_<t).

    entropy(z)              H(P_S) = -Σ_v P_S(v) log P_S(v)                       (Eq. 2, raw nats)
    reverse_kl(zs, zt)      KL(P_S ‖ P_T) = Σ_v P_S (log P_S - log P_T)           (Eq. 1, Eq. 3)
    forward_kl(zs, zt)      KL(P_T ‖ P_S) = Σ_v P_T (log P_T - log P_S)           (q3's detector)
    generalized_jsd(zs, zt, beta)                                                (a --loss option)
    token_stats(...)        all of the above from hidden states, `chunk_size` rows at a time
    chunked_divergence(...) the training loss Σ w_t·D_t from hidden states, chunked, with gradient
    normalize_entropy / normalize_divergence                                      (Sections 6, 7.3)
    classify_quadrants      Q1..Q4 of Table 1;  quadrant_summary  shares of tokens and KL mass
    normalized_axes         ĥ, δ̂ and the quadrants of a batch: the rule inputs beyond token_stats

Precision. Logits are projected in fp32 (`project`: autocast off, hidden rows and head upcast), and
every softmax and divergence runs in fp32, whatever dtype the models run in. Under bf16 autocast a
bf16 projection would put a few percent of relative error on small divergences and scramble their
ranking, which is what the selection rules act on; bench.py measures what fp32 costs.
"""
import math

import torch
import torch.nn.functional as F

import closed_form


# ---------------------------------------------------------------------------------------------
# Divergences over the vocabulary. Inputs are logits of any leading shape (..., V).
# ---------------------------------------------------------------------------------------------

def entropy(logits):
    """Shannon entropy H(P) = -Σ_v P(v) log P(v) in nats, P = softmax(logits). (..., V) -> (...)."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (..., V)
    return -(logp.exp() * logp).sum(-1)


def reverse_kl(student_logits, teacher_logits):
    """reverse_kl = KL(P_S ‖ P_T) = Σ_v P_S(v) [log P_S(v) - log P_T(v)], nats. (Eq. 1)

    Mode-seeking: the student is penalised for mass where the teacher has none. This is OPD's
    per-token loss and TIP's divergence axis δ_t. (..., V), (..., V) -> (...).
    """
    logp_s = F.log_softmax(student_logits.float(), dim=-1)  # (..., V)
    logp_t = F.log_softmax(teacher_logits.float(), dim=-1)  # (..., V)
    return (logp_s.exp() * (logp_s - logp_t)).sum(-1)


def forward_kl(student_logits, teacher_logits):
    """forward_kl = KL(P_T ‖ P_S) = Σ_v P_T(v) [log P_T(v) - log P_S(v)], nats.

    Mass-covering: large when the teacher puts mass where a confident student puts none, which is
    why the q3 rule uses it to detect overconfident errors. (..., V), (..., V) -> (...).
    """
    return reverse_kl(teacher_logits, student_logits)


def generalized_jsd(student_logits, teacher_logits, beta):
    """Generalised Jensen-Shannon divergence with explicit endpoints (the GKD / TRL convention).

        M = beta·P_T + (1 - beta)·P_S
        JSD(beta) = beta·KL(P_T ‖ M) + (1 - beta)·KL(P_S ‖ M)      for 0 < beta < 1
        JSD(0) = KL(P_T ‖ P_S) = forward_kl,   JSD(1) = KL(P_S ‖ P_T) = reverse_kl

    The endpoints are defined, not limits: as beta -> 0 the mixture formula tends to 0, not to a
    KL, so clamping beta near an endpoint would silently train on a vanishing loss.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits)
    logp_s = F.log_softmax(student_logits.float(), dim=-1)  # (..., V)
    logp_t = F.log_softmax(teacher_logits.float(), dim=-1)  # (..., V)
    # log M computed in log space so that tiny probabilities do not underflow
    logp_m = torch.logsumexp(torch.stack([logp_t + math.log(beta), logp_s + math.log(1 - beta)]), 0)
    kl_t = (logp_t.exp() * (logp_t - logp_m)).sum(-1)  # KL(P_T ‖ M), (...)
    kl_s = (logp_s.exp() * (logp_s - logp_m)).sum(-1)  # KL(P_S ‖ M), (...)
    return beta * kl_t + (1 - beta) * kl_s


def divergence(name, student_logits, teacher_logits, beta=0.5):
    """The training loss by name: 'reverse_kl' (the paper's), 'forward_kl' or 'jsd' (with beta)."""
    if name == "reverse_kl":
        return reverse_kl(student_logits, teacher_logits)
    if name == "forward_kl":
        return forward_kl(student_logits, teacher_logits)
    if name == "jsd":
        return generalized_jsd(student_logits, teacher_logits, beta)
    raise ValueError(f"unknown loss {name!r}; valid: reverse_kl, forward_kl, jsd")


def project(hidden, head):
    """Logits hidden @ headᵀ in fp32, also under autocast. (n, D), (V, D) -> (n, V).

    Callers upcast the head once per call (a no-op for fp32 weights) and pass chunks of rows.
    """
    with torch.autocast(hidden.device.type, enabled=False):
        return hidden.float() @ head.float().T


# ---------------------------------------------------------------------------------------------
# Per-token statistics from hidden states, chunk by chunk: no (N, V) tensor ever exists.
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def token_stats(student_hidden, student_head, teacher_hidden, teacher_head, chunk_size=512):
    """Entropy and both KLs at every position, projecting at most `chunk_size` rows at a time.

    student_hidden (N, D_s), student_head (V_s, D_s); teacher_hidden (N, D_t), teacher_head
    (V_t, D_t). Only the common leading min(V_s, V_t) rows are used: Qwen2.5 sizes share a
    tokenizer but pad `lm_head` to different lengths, and the extra rows are never real tokens.
    Returns a dict of (N,) fp32 tensors: entropy (nats), entropy_norm = entropy / log V (Eq. 2),
    reverse_kl (δ_t, Eq. 3), forward_kl, and the top-1 token and its probability for each model.
    """
    vocab = min(student_head.shape[0], teacher_head.shape[0])
    ws, wt = student_head[:vocab].float(), teacher_head[:vocab].float()  # (V, D_s), (V, D_t)
    # Σ_v a_v b_v per row as a batched (1, V) @ (V, 1) product: no (n, V) temporary
    dot = lambda a, b: (a.unsqueeze(1) @ b.unsqueeze(-1)).view(-1)  # noqa: E731
    out = {k: [] for k in ("entropy", "reverse_kl", "forward_kl", "student_top1", "student_top1_p",
                           "teacher_top1", "teacher_top1_p")}
    for i in range(0, student_hidden.shape[0], chunk_size):
        # Three (n, V) buffers at a time, reused in place: this pass sets the peak memory of a
        # training step, since the loss touches only the kept positions.
        logp_s = F.log_softmax(project(student_hidden[i:i + chunk_size], ws), -1)  # (n, V)
        logp_t = F.log_softmax(project(teacher_hidden[i:i + chunk_size], wt), -1)  # (n, V)
        p = logp_s.exp()  # (n, V): P_S
        out["entropy"].append(-dot(p, logp_s))
        for who, logp in (("student", logp_s), ("teacher", logp_t)):
            top_logp, top_id = logp.max(-1)  # (n,) each
            out[f"{who}_top1"].append(top_id)
            out[f"{who}_top1_p"].append(top_logp.exp())
        diff = logp_s.sub_(logp_t)  # (n, V): log P_S - log P_T, in place of log P_S
        out["reverse_kl"].append(dot(p, diff))
        torch.exp(logp_t, out=p)  # (n, V): P_T, in place of P_S
        out["forward_kl"].append(-dot(p, diff))
        del logp_s, logp_t, p, diff
    stats = {k: torch.cat(v) if v else student_hidden.new_zeros(0) for k, v in out.items()}
    stats["entropy_norm"] = stats["entropy"] / math.log(vocab)  # h_t in [0, 1] (Eq. 2)
    return stats


class _ChunkedDivergence(torch.autograd.Function):
    """Σ_t w_t · D_t from hidden states, `chunk_size` rows at a time, gradient formed in the forward.

    Each chunk's logits are projected into two preallocated (n, V) buffers, which
    closed_form.divergence_and_grad_ turns in place into the per-row loss and G = dD/dz_S (no
    autograd graph, no third (n, V) tensor); G goes straight into the gradients of the hidden
    states, G @ W_S, and of lm_head, Gᵀ @ H_S (weights scale the (n, D) side, not G): four matrix
    products per chunk, the floor of any chunked loss, and a few elementwise passes. Backward at most
    scales them. Versus recomputing each chunk in backward this skips a second pair of projections,
    for the lm_head's (V, D_S) gradient held from forward to backward. fp32 (float64 if given)."""

    @staticmethod
    def forward(ctx, student_hidden, student_head, teacher_hidden, teacher_head, weights, loss,
                beta, chunk_size):
        n_all, device = student_hidden.shape[0], student_hidden.device
        dtype = torch.promote_types(student_hidden.dtype, torch.float32)
        ws, wt = student_head.to(dtype), teacher_head.to(dtype)  # (V, D_s), (V, D_t)
        zs_buf, zt_buf = torch.empty(2, min(chunk_size, n_all), len(ws), dtype=dtype, device=device)
        grad_hidden = torch.empty_like(student_hidden)  # (N, D_s)
        grad_head = torch.empty_like(ws) if ctx.needs_input_grad[1] else None  # (V, D_s)
        total = torch.zeros((), dtype=dtype, device=device)
        with torch.autocast(device.type, enabled=False):  # projections and gradients in fp32
            for i in range(0, n_all, chunk_size):
                hs = student_hidden[i:i + chunk_size].to(dtype)  # (n, D_s)
                zs, zt = zs_buf[:hs.shape[0]], zt_buf[:hs.shape[0]]  # (n, V) views
                torch.mm(hs, ws.T, out=zs)
                torch.mm(teacher_hidden[i:i + chunk_size].to(dtype), wt.T, out=zt)
                per_token, g, scale = closed_form.divergence_and_grad_(loss, beta, zs, zt)
                w = weights[i:i + chunk_size].to(dtype) if weights is not None else None  # (n,)
                total += (per_token * w).sum() if w is not None else per_token.sum()
                row_scale = (w * scale).unsqueeze(1) if w is not None else scale  # (n, 1) or float
                gh = grad_hidden[i:i + hs.shape[0]]  # (n, D_s), first the weighted H_S: no copy
                if grad_head is not None:  # (V, D_s) += Gᵀ H_S
                    h = hs if w is None else torch.mul(hs, row_scale, out=gh)
                    grad_head.addmm_(g.T, h, beta=1 if i else 0, alpha=scale if w is None else 1)
                torch.mm(g, ws, out=gh).mul_(row_scale)  # (n, D_s)
        ctx.grads = grad_hidden, grad_head  # not saved tensors: backward hands them on uncopied
        return total

    @staticmethod
    def backward(ctx, grad_total):  # in place and released: a second (V, D_S) tensor (a copy, or
        grads, ctx.grads = ctx.grads, None  # autograd's clone of one still referenced) would double
        if grad_total.item() != 1.0:  # the head's share of the peak; so one backward per graph
            grads = [g.mul_(grad_total) if g is not None else None for g in grads]  # 1: no pass
        return (*grads, None, None, None, None, None, None)  # (1 is distill's, on one rank)


def chunked_divergence(student_hidden, student_head, teacher_hidden, teacher_head,
                       loss="reverse_kl", beta=0.5, chunk_size=512, weights=None):
    """Σ_t w_t · D(P_S(·|c_t), P_T(·|c_t)) over N positions (a sum, not a mean), from hidden states.

    student_hidden (N, D_s) and student_head (V_s, D_s) receive gradients; the teacher's (N, D_t)
    and (V_t, D_t) do not. Only the common leading min(V_s, V_t) rows are used (see token_stats).
    At most `chunk_size` rows of logits exist at any time, in two (chunk, V) buffers, in forward
    and backward alike; see _ChunkedDivergence for how the gradient is formed.
    """
    closed_form.check(loss, beta)
    vocab = min(student_head.shape[0], teacher_head.shape[0])
    if vocab < student_head.shape[0]:  # a slice's backward would copy the whole head's gradient
        student_head = student_head[:vocab]
    return _ChunkedDivergence.apply(student_hidden, student_head, teacher_hidden.detach(),
                                    teacher_head[:vocab].detach(), weights, loss, beta, chunk_size)


def to_padded(flat, mask):
    """Scatter a dict of (N,) per-position values back to (B, T) tensors, zeros outside `mask`."""
    padded = {}
    for name, values in flat.items():
        padded[name] = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)  # (B, T)
        padded[name][mask.to(values.device)] = values
    return padded


# ---------------------------------------------------------------------------------------------
# Per-batch normalisation (Sections 6, 7.3). `mask` marks the positions that belong to the batch;
# everything else (prompt, padding, after EOS) is ignored and comes back as 0.
# ---------------------------------------------------------------------------------------------

def percentile(values, q):
    """Nearest-rank q-th percentile (0 < q ≤ 100) of a 1-D tensor, via kthvalue, not quantile."""
    k = max(1, math.ceil(q / 100 * values.numel()))
    return values.float().kthvalue(k).values


def _min_max(x, mask):
    x = x.float()
    lo, hi = x[mask].min(), x[mask].max()
    if hi <= lo:  # a constant axis ranks nothing: map it to 0 rather than divide by zero
        return torch.zeros_like(x)
    return torch.where(mask, (x - lo) / (hi - lo), torch.zeros_like(x))


def normalize_entropy(h, mask):
    """ĥ: clip the entropy at the batch's 98th percentile, then min-max scale to [0, 1].

    Clipping stops a few near-uniform positions from squashing everything else towards 0.
    """
    if not mask.any():
        return torch.zeros_like(h, dtype=torch.float32)
    cap = percentile(h[mask], 98)
    return _min_max(torch.minimum(h.float(), cap), mask)


def normalize_divergence(d, mask):
    """δ̂: min-max scale the divergence to [0, 1] over the batch."""
    if not mask.any():
        return torch.zeros_like(d, dtype=torch.float32)
    return _min_max(d, mask)


# ---------------------------------------------------------------------------------------------
# The four quadrants (Table 1).
# ---------------------------------------------------------------------------------------------

QUADRANTS = {1: "Q1 high h, high δ", 2: "Q2 high h, low δ", 3: "Q3 low h, high δ",
             4: "Q4 low h, low δ"}


def classify_quadrants(h_hat, d_hat, mask, h_threshold=None, d_threshold=None):
    """Quadrant id per position: 1..4 as in Table 1, 0 where `mask` is False.

    "High" means strictly above the threshold. Thresholds default to the (lower) median of each
    normalised axis over the masked positions ([ours]: the paper gives no number).
    Returns (quadrant, (h_threshold, d_threshold)) with the thresholds actually used.
    """
    if h_threshold is None:
        h_threshold = percentile(h_hat[mask], 50).item() if mask.any() else 0.0
    if d_threshold is None:
        d_threshold = percentile(d_hat[mask], 50).item() if mask.any() else 0.0
    high_h, high_d = h_hat > h_threshold, d_hat > d_threshold  # same shape as mask
    quadrant = torch.where(high_h, torch.where(high_d, 1, 2), torch.where(high_d, 3, 4))
    return torch.where(mask, quadrant, 0), (float(h_threshold), float(d_threshold))


def normalized_axes(entropy_values, reverse_kl_values, h_threshold=None, d_threshold=None):
    """ĥ, δ̂ and the quadrant of each of N positions that form one batch. (N,), (N,) ->
    ({"h_hat", "d_hat", "quadrant"} of (N,) each, (h_threshold, d_threshold) used)."""
    every = torch.ones_like(entropy_values, dtype=torch.bool)  # (N,)
    h_hat = normalize_entropy(entropy_values, every)  # (N,)
    d_hat = normalize_divergence(reverse_kl_values, every)  # (N,)
    quadrant, thresholds = classify_quadrants(h_hat, d_hat, every, h_threshold, d_threshold)
    return {"h_hat": h_hat, "d_hat": d_hat, "quadrant": quadrant}, thresholds


def quadrant_summary(quadrant, reverse_kl_values, mask):
    """Per quadrant: share of the masked tokens and share of their total reverse-KL mass."""
    q, d = quadrant[mask], reverse_kl_values[mask].float()  # (N,) each
    total_n, total_kl = max(q.numel(), 1), d.sum().clamp_min(1e-12)
    return {k: {"share": (q == k).sum().item() / total_n,
                "kl_share": (d[q == k].sum() / total_kl).item()} for k in QUADRANTS}
