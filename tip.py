"""TIP's two axes and four quadrants: student entropy and teacher-student divergence per token.

Contract. The math is pure functions over tensors, with no model, tokenizer, file or print inside;
distill.py, the notebook, the tests and people's forks import these exact names. The quadrant
analysis CLI at the end of the file (`python tip.py`) is the only part that loads models, prints
and writes pictures.

Notation: `V` vocabulary, `N` response positions (flattened), `D` hidden size, `B` rollouts and
`T` positions when a batch is kept padded. P_S is the student's next-token distribution, P_T the
frozen teacher's, both at the same context c_t = (x, y_<t). All divergence math runs in fp32,
whatever dtype the models run in.

    entropy(z)              H(P_S) = -Σ_v P_S(v) log P_S(v)                       (Eq. 2, raw nats)
    reverse_kl(zs, zt)      KL(P_S ‖ P_T) = Σ_v P_S (log P_S - log P_T)           (Eq. 1, Eq. 3)
    forward_kl(zs, zt)      KL(P_T ‖ P_S) = Σ_v P_T (log P_T - log P_S)           (q3's detector)
    generalized_jsd(zs, zt, beta)                                                (a --loss option)
    token_stats(...)        all of the above from hidden states, `chunk_size` rows at a time
    normalize_entropy / normalize_divergence                                      (Sections 6, 7.3)
    classify_quadrants      Q1..Q4 of Table 1;  quadrant_summary  shares of tokens and KL mass

Where this departs from the paper ([ours] in ../shared/TIP.md):
- The high/low split of each axis is the per-batch median of the normalised axis unless given.
- An axis that is constant over the batch carries no ranking information and normalises to 0.
- Percentiles are nearest-rank via `torch.kthvalue` (`torch.quantile` fails above 2^24 elements).

Run `python tip.py --help` for the quadrant analysis CLI (pictures of where the signal is).
"""
import math

import torch
import torch.nn.functional as F


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
    ws, wt = student_head[:vocab], teacher_head[:vocab]  # (V, D_s), (V, D_t)
    # Σ_v a_v b_v per row as a batched (1, V) @ (V, 1) product: no (n, V) temporary
    dot = lambda a, b: (a.unsqueeze(1) @ b.unsqueeze(-1)).view(-1)  # noqa: E731
    out = {k: [] for k in ("entropy", "reverse_kl", "forward_kl", "student_top1", "student_top1_p",
                           "teacher_top1", "teacher_top1_p")}
    for i in range(0, student_hidden.shape[0], chunk_size):
        # Three (n, V) buffers at a time, reused in place: this pass sets the peak memory of a
        # training step, since the loss touches only the kept positions.
        logp_s = F.log_softmax((student_hidden[i:i + chunk_size] @ ws.T).float(), -1)  # (n, V)
        logp_t = F.log_softmax((teacher_hidden[i:i + chunk_size] @ wt.T).float(), -1)  # (n, V)
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


def quadrant_summary(quadrant, reverse_kl_values, mask):
    """Per quadrant: share of the masked tokens and share of their total reverse-KL mass."""
    q, d = quadrant[mask], reverse_kl_values[mask].float()  # (N,) each
    total_n, total_kl = max(q.numel(), 1), d.sum().clamp_min(1e-12)
    return {k: {"share": (q == k).sum().item() / total_n,
                "kl_share": (d[q == k].sum() / total_kl).item()} for k in QUADRANTS}


# ---------------------------------------------------------------------------------------------
# Quadrant analysis: tables (pure functions), pictures and the CLI.
# ---------------------------------------------------------------------------------------------

def quadrant_table(stats, mask, h_threshold=None, d_threshold=None):
    """Per quadrant: token share, reverse-KL mass share, mean h (entropy / log V) and mean δ.

    `stats` holds (B, T) tensors `entropy`, `entropy_norm`, `reverse_kl`; ĥ, δ̂ and the quadrants
    are computed here over the whole batch. Returns (rows, thresholds, stats with h_hat, d_hat,
    quadrant added).
    """
    stats = dict(stats, h_hat=normalize_entropy(stats["entropy"], mask),
                 d_hat=normalize_divergence(stats["reverse_kl"], mask))
    stats["quadrant"], thresholds = classify_quadrants(stats["h_hat"], stats["d_hat"], mask,
                                                       h_threshold, d_threshold)
    summary = quadrant_summary(stats["quadrant"], stats["reverse_kl"], mask)
    rows = []
    for q, name in QUADRANTS.items():
        sel = stats["quadrant"] == q
        mean = lambda x: x[sel].float().mean().item() if sel.any() else float("nan")  # noqa: E731
        rows.append({"quadrant": name, **summary[q], "mean_h": mean(stats["entropy_norm"]),
                     "mean_kl": mean(stats["reverse_kl"])})
    return rows, thresholds, stats


def coverage_table(stats, mask, rules, keeps, seed=0):
    """For each rule and keep ratio: the fraction of each quadrant's tokens that the rule keeps
    and the fraction of the total reverse-KL mass it keeps. `stats` as returned by quadrant_table."""
    import selection
    rows, total_kl = [], stats["reverse_kl"][mask].sum().clamp_min(1e-12)
    for rule in rules:
        for keep in keeps:
            kept, _ = selection.select(rule, stats, mask, keep, torch.Generator().manual_seed(seed))
            row = {"rule": rule, "keep": keep,
                   "kl_kept": (stats["reverse_kl"][kept].sum() / total_kl).item()}
            for q in QUADRANTS:
                in_q = stats["quadrant"] == q
                row[f"q{q}_kept"] = ((kept & in_q).sum() / in_q.sum().clamp_min(1)).item()
            rows.append(row)
    return rows


def markdown(rows, columns):
    """A markdown table of dict rows: floats with 3 decimals."""
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                     + ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows])


COLORS = {1: "#d62728", 2: "#ff9f1c", 3: "#7b2cbf", 4: "#2a9d8f"}  # Q1 red .. Q4 teal


def plot_quadrants(stats, mask, thresholds, path):
    """Scatter of ĥ vs δ̂ coloured by quadrant, threshold lines, log-count marginal histograms."""
    import matplotlib.pyplot as plt
    h, d, q = stats["h_hat"][mask].numpy(), stats["d_hat"][mask].numpy(), stats["quadrant"][mask].numpy()
    fig = plt.figure(figsize=(8, 8), dpi=100)
    grid = fig.add_gridspec(2, 2, width_ratios=(4, 1), height_ratios=(1, 4), hspace=0.05, wspace=0.05)
    ax = fig.add_subplot(grid[1, 0])
    top, right = fig.add_subplot(grid[0, 0], sharex=ax), fig.add_subplot(grid[1, 1], sharey=ax)
    for k, name in QUADRANTS.items():
        ax.scatter(h[q == k], d[q == k], s=6, alpha=0.5, color=COLORS[k],
                   label=f"{name} ({(q == k).mean():.0%})")
    ax.axvline(thresholds[0], color="k", lw=0.8, ls="--")
    ax.axhline(thresholds[1], color="k", lw=0.8, ls="--")
    ax.set_xlabel("ĥ: normalised student entropy")
    ax.set_ylabel("δ̂: normalised reverse KL(P_S ‖ P_T)")
    ax.legend(loc="upper right", fontsize=8, markerscale=2)
    top.hist(h, bins=50, color="0.4", log=True)
    right.hist(d, bins=50, color="0.4", log=True, orientation="horizontal")
    top.tick_params(labelbottom=False)
    right.tick_params(labelleft=False)
    top.set_title(f"{len(h)} response tokens; dashed: thresholds {thresholds[0]:.3f}, {thresholds[1]:.3f}")
    fig.savefig(path)
    plt.close(fig)


def plot_coverage(rows, path):
    """The rule-coverage table as grouped bars: per rule@keep, the share of each quadrant kept."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(12, 5), dpi=100)
    labels, width = [f"{r['rule']}@{r['keep']:g}" for r in rows], 0.18
    for j, q in enumerate(QUADRANTS):
        ax.bar([i + (j - 1.5) * width for i in range(len(rows))], [r[f"q{q}_kept"] for r in rows],
               width, color=COLORS[q], label=QUADRANTS[q])
    ax.plot(range(len(rows)), [r["kl_kept"] for r in rows], "k.", label="share of KL mass kept")
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("fraction kept")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, 1.13))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def tokens_html(rollouts, stats, mask, tokenizer, limit=6):
    """A self-contained page: each response token's background is its quadrant's colour, and its
    tooltip gives h, δ, forward KL and both models' top-1 token with its probability."""
    import html
    name = lambda i: html.escape(repr(tokenizer.decode([int(i)]))[1:-1])  # noqa: E731
    parts = ["<!doctype html><meta charset='utf-8'><title>TIP quadrants</title><style>body{font:"
             "14px monospace;max-width:60em}span{white-space:pre-wrap}</style><p>"
             + " ".join(f"<span style='background:{COLORS[q]}55'>{QUADRANTS[q]}</span>" for q in QUADRANTS)
             + "</p>"]
    for b in range(min(limit, len(rollouts.responses))):
        cols = mask[b].nonzero().flatten().tolist()
        parts.append(f"<h3>rollout {b}</h3><p>{html.escape(tokenizer.decode(rollouts.prompts[b]))}</p><p>")
        for t, col in zip(rollouts.responses[b], cols):
            s = {k: v[b, col].item() for k, v in stats.items()}
            tip_text = (f"h={s['entropy_norm']:.3f} δ={s['reverse_kl']:.3f} fwdKL={s['forward_kl']:.3f}"
                        f" | student top-1 {name(s['student_top1'])} p={s['student_top1_p']:.2f}"
                        f" | teacher top-1 {name(s['teacher_top1'])} p={s['teacher_top1_p']:.2f}")
            parts.append(f"<span class='q{int(s['quadrant'])}' style='background:"
                         f"{COLORS[int(s['quadrant'])]}55' title='{tip_text}'>"
                         f"{html.escape(tokenizer.decode([t]))}</span>")
        parts.append("</p>")
    return "".join(parts)


def plot_runs(run_dirs, path):
    """Training curves of distill.py runs, overlaid: loss, mean reverse KL, kept share per
    quadrant, and eval scores where the run has them."""
    import json
    import os
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), dpi=100)
    for run in run_dirs:
        records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
        steps = [r for r in records if "loss" in r]
        label = os.path.basename(os.path.normpath(run))
        x = [r["step"] for r in steps]
        axes[0, 0].plot(x, [r["loss"] for r in steps], label=label)
        axes[0, 1].plot(x, [r["reverse_kl"] for r in steps], label=label)
        for q in QUADRANTS:
            axes[1, 0].plot(x, [r[f"q{q}_kept_share"] for r in steps], color=COLORS[q],
                            label=f"{label} Q{q}", alpha=0.8)
        evals = [(r["step"], k, v) for r in records for k, v in r.items() if k.startswith("eval/")]
        for key in sorted({k for _, k, _ in evals}):
            pts = [(s, v) for s, k, v in evals if k == key]
            axes[1, 1].plot(*zip(*pts), "o-", label=f"{label} {key[5:]}")
    titles = ("loss (kept tokens)", "mean reverse KL, all response tokens",
              "share of kept tokens per quadrant", "evaluation score")
    for ax, title in zip(axes.flat, titles):
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.has_data():
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no records", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@torch.no_grad()
def collect(teacher, student, tokenizer, prompts, samples_per_prompt, max_new_tokens, chunk_size=512,
            batch_size=16):
    """Sample rollouts from the student (distill.py's sampling) and compute every response token's
    statistics. Returns (rollouts, stats of (B, L) tensors, loss mask (B, L))."""
    import distill
    rollouts = distill.sample(student, tokenizer, prompts, samples_per_prompt, max_new_tokens,
                              batch_size=batch_size, progress=True)
    ids, attn, mask = distill.collate(rollouts.prompts, rollouts.responses, distill.pad_id(tokenizer))
    device = next(student.parameters()).device
    flat = []
    for i in range(0, len(ids), batch_size):
        part = [t[i:i + batch_size].to(device) for t in (ids, attn, mask)]
        h_s = distill.hidden_states(student, part[0], part[1])[part[2]]  # (n, D_s)
        h_t = distill.hidden_states(teacher, part[0], part[1])[part[2]]  # (n, D_t)
        flat.append(token_stats(h_s, distill.lm_head(student), h_t, distill.lm_head(teacher), chunk_size))
    stats = to_padded({k: torch.cat([f[k] for f in flat]).cpu() for k in flat[0]}, mask)
    return rollouts, stats, mask


def analyze(args):
    """The analysis CLI: tables on stdout; quadrants.png, coverage.png, tokens.html on disk."""
    import os
    import loading
    import selection
    if args.teacher is None:
        import toy
        try:
            args.teacher, args.student = toy.build()
        except (FileExistsError, PermissionError) as e:
            raise loading.UsageError(f"cannot build the toy pair: {e}")
        args.dataset = args.dataset or toy.split_path("heldout")
    device, _ = loading.resolve_device(args.device)
    dtype, _ = loading.resolve_dtype(args.dtype, device)
    records = loading.load_records(args.dataset, args.split)
    field = loading.find_prompt_field(records, args.prompt_field)
    tokenizer = loading.load_tokenizer(args.student)
    loading.check_same_tokenizer(loading.load_tokenizer(args.teacher), tokenizer)
    prompts, _ = loading.encode_prompts(tokenizer, records[:args.prompts], field, args.max_prompt_length)
    teacher = loading.load_model(args.teacher, device, dtype).eval()
    student = loading.load_model(args.student, device, dtype).eval()
    torch.manual_seed(args.seed)
    rollouts, stats, mask = collect(teacher, student, tokenizer, prompts, args.samples_per_prompt,
                                    args.max_new_tokens, args.chunk_size)
    rows, thresholds, stats = quadrant_table(stats, mask, args.h_threshold, args.d_threshold)
    print(f"{int(mask.sum())} response tokens from {len(rollouts.responses)} rollouts; thresholds "
          f"ĥ > {thresholds[0]:.4f}, δ̂ > {thresholds[1]:.4f}\n")
    print(markdown(rows, ["quadrant", "share", "kl_share", "mean_h", "mean_kl"]) + "\n")
    rules = [r for r in selection.RULES if r != "all"]
    coverage = coverage_table(stats, mask, rules, (0.5, 0.2, 0.1), args.seed)
    print(markdown(coverage, ["rule", "keep", "q1_kept", "q2_kept", "q3_kept", "q4_kept", "kl_kept"]))
    os.makedirs(args.output_dir, exist_ok=True)
    plot_quadrants(stats, mask, thresholds, os.path.join(args.output_dir, "quadrants.png"))
    plot_coverage(coverage, os.path.join(args.output_dir, "coverage.png"))
    with open(os.path.join(args.output_dir, "tokens.html"), "w") as f:
        f.write(tokens_html(rollouts, stats, mask, tokenizer))
    print(f"\nwrote quadrants.png, coverage.png, tokens.html in {args.output_dir}")


def main(argv=None):
    import argparse
    import os
    import sys
    import loading
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["plot"]:
            p = argparse.ArgumentParser(prog="tip.py plot", description="Training curves of runs.")
            p.add_argument("runs", nargs="+", help="distill.py output folders (with metrics.jsonl)")
            p.add_argument("--output", default="curves.png", help="PNG to write")
            args = p.parse_args(argv[1:])
            loading.check_writable(os.path.dirname(os.path.abspath(args.output)), "--output")
            for run in args.runs:
                if not os.path.isfile(os.path.join(run, "metrics.jsonl")):
                    raise loading.UsageError(f"{run!r} holds no metrics.jsonl")
            plot_runs(args.runs, args.output)
            print(f"wrote {args.output}")
            return
        p = argparse.ArgumentParser(description="Where is the learning signal? Quadrant analysis "
                                    "of a teacher/student pair (default: the toy pair). "
                                    "`python tip.py plot RUN_DIR...` draws training curves.")
        p.add_argument("--teacher", help="HF id or local directory (default: the toy pair)")
        p.add_argument("--student", help="HF id or local directory (default: the toy pair)")
        p.add_argument("--dataset", help="HF id or local file (default: the toy held-out split)")
        p.add_argument("--split", default="test", help="dataset split (hub datasets)")
        p.add_argument("--prompt-field", help="prompt column (default: auto-detect)")
        p.add_argument("--prompts", type=int, default=32, help="prompts to sample from")
        p.add_argument("--samples-per-prompt", type=int, default=4, help="rollouts per prompt")
        p.add_argument("--max-new-tokens", type=int, default=256, help="maximum response length")
        p.add_argument("--max-prompt-length", type=int, default=1024, help="longer prompts skipped")
        p.add_argument("--h-threshold", type=float, help="ĥ threshold (default: batch median)")
        p.add_argument("--d-threshold", type=float, help="δ̂ threshold (default: batch median)")
        p.add_argument("--chunk-size", type=int, default=512, help="rows per lm_head chunk")
        p.add_argument("--output-dir", default="analysis", help="where the pictures go")
        p.add_argument("--seed", type=int, default=0, help="sampling and selection seed")
        p.add_argument("--device", default="auto", help="auto, cpu or cuda")
        p.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16")
        args = p.parse_args(argv)
        if (args.teacher is None) != (args.student is None):
            raise loading.UsageError("give both --teacher and --student, or neither (the toy pair)")
        if args.prompts < 1 or args.samples_per_prompt < 1:
            raise loading.UsageError("--prompts and --samples-per-prompt must be at least 1")
        loading.check_writable(args.output_dir)
        analyze(args)
    except loading.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
