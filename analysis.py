"""The quadrant analysis: where is the learning signal of a teacher/student pair?

    python analysis.py                                  # the laptop pair on its held-out problems
    python analysis.py --teacher Qwen/Qwen3-4B --student Qwen/Qwen3-0.6B --dataset HuggingFaceH4/MATH-500
    python analysis.py --teacher T --student S --task NAME ...   # any task of tasks.py (README)
    python analysis.py plot runs/A runs/B --output curves.png

Samples rollouts as training does (the task's rollouts: tasks.py), builds every response token's
statistics with quadrant_inputs.batch_statistics (the one builder of a rule's input), and prints (1)
the quadrant table: share of tokens and of the reverse-KL mass, mean h and δ, the thresholds used;
(2) the rule-coverage table: for each rule at keep 0.5 / 0.2 / 0.1, the fraction of each quadrant
it keeps and of the KL mass; (3) what the task adds (task.analysis_report). Writes quadrants.png
(ĥ × δ̂ scatter with marginals), coverage.png (the coverage table as bars) and tokens.html
(rollouts coloured by quadrant, a tooltip per token, tokens the student did not generate greyed
out; self-contained, readable offline). `plot` draws distill.py's metrics.jsonl curves of several
runs into one PNG. matplotlib runs headless (Agg).

The divergences are tip.py's and the rules selection.py's: nothing here computes one.
"""
import html
import json
import os
import sys

import matplotlib
matplotlib.use("Agg")  # headless: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import loading  # noqa: E402
import selection  # noqa: E402
import tasks  # noqa: E402
from loading import hidden_states, lm_head  # noqa: E402
from quadrant_inputs import batch_statistics  # noqa: E402
from rollouts import collate, pad_id  # noqa: E402
from tip import QUADRANTS, quadrant_summary  # noqa: E402
from tracking import COLORS, quadrant_figure  # noqa: E402


def quadrant_table(stats, mask):
    """Per quadrant: token share, reverse-KL mass share, mean h (entropy / log V) and mean δ.

    `stats` holds (B, T) tensors with `entropy_norm`, `reverse_kl` and `quadrant` (as quadrant_inputs.
    batch_statistics builds them); only positions in `mask` count.
    """
    summary = quadrant_summary(stats["quadrant"], stats["reverse_kl"], mask)
    rows = []
    for q, name in QUADRANTS.items():
        sel = (stats["quadrant"] == q) & mask
        mean = lambda x: x[sel].float().mean().item() if sel.any() else float("nan")  # noqa: E731
        rows.append({"quadrant": name, **summary[q], "mean_h": mean(stats["entropy_norm"]),
                     "mean_kl": mean(stats["reverse_kl"])})
    return rows


def followed_row(name, stats, mask, marked, thresholds):
    """Where a followed token group sits (e.g. a planted carry token): how many, the share in each
    quadrant and of the whole reverse-KL mass, and medians: the student's top-1 probability, ĥ and
    δ̂ over their thresholds (ĥ/threshold <= 0.5: far inside the low-entropy half), the reverse KL."""
    n, q = int(marked.sum()), stats["quadrant"][marked]
    median = lambda x: x[marked].float().median().item() if n else float("nan")  # noqa: E731
    return {"tokens": name, "n": n, **{f"q{k}": (q == k).sum().item() / max(n, 1) for k in QUADRANTS},
            "kl_share": (stats["reverse_kl"][marked].sum() / stats["reverse_kl"][mask].sum()
                         .clamp_min(1e-12)).item(),
            "p_top1": median(stats["student_top1_p"]), "h_ratio": median(stats["h_hat"]) / thresholds[0],
            "d_ratio": median(stats["d_hat"]) / thresholds[1], "kl": median(stats["reverse_kl"])}


def coverage_table(stats, mask, rules, keeps, seed=0):
    """For each rule and keep ratio: the fraction of each quadrant's tokens that the rule keeps
    and the fraction of the total reverse-KL mass it keeps. `stats` from quadrant_inputs.batch_statistics."""
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


def plot_quadrants(stats, mask, thresholds, path):
    """quadrants.png: ĥ vs δ̂ coloured by quadrant, threshold lines, log-count marginal histograms
    (drawn by tracking.quadrant_figure, the picture the trackers get during training)."""
    fig, drawn = quadrant_figure(stats["h_hat"][mask], stats["d_hat"][mask], stats["quadrant"][mask],
                                 thresholds=thresholds)
    fig.savefig(path)
    return drawn  # points drawn per quadrant


def plot_coverage(rows, path):
    """The rule-coverage table as grouped bars: per rule@keep, the share of each quadrant kept."""
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
    return {q: [bar.get_height() for bar in ax.containers[j]] for j, q in enumerate(QUADRANTS)}


def tokens_html(rollouts, stats, mask, tokenizer, limit=6):
    """A self-contained page: each generated token's background is its quadrant's colour, and its
    tooltip gives h, δ, forward KL and both models' top-1 token with its probability. Response
    tokens the student did not generate (tool results, template tokens) are grey: never scored."""
    name = lambda i: html.escape(repr(tokenizer.decode([int(i)]))[1:-1])  # noqa: E731
    parts = ["<!doctype html><meta charset='utf-8'><title>TIP quadrants</title><style>body{font:"
             "14px monospace;max-width:60em}span{white-space:pre-wrap}.q0{color:#999}</style><p>"
             + " ".join(f"<span style='background:{COLORS[q]}55'>{QUADRANTS[q]}</span>" for q in QUADRANTS)
             + " <span class='q0'>not generated by the student</span></p>"]
    P = max(len(p) for p in rollouts.prompts)  # collate's first response column
    for b in range(min(limit, len(rollouts.responses))):
        parts.append(f"<h3>rollout {b}</h3><p>{html.escape(tokenizer.decode(rollouts.prompts[b]))}</p><p>")
        for j, t in enumerate(rollouts.responses[b]):
            col, text = P - 1 + j, html.escape(tokenizer.decode([t]))  # its loss position
            if not mask[b, col]:
                parts.append(f"<span class='q0'>{text}</span>")
                continue
            s = {k: v[b, col].item() for k, v in stats.items()}
            tip_text = (f"h={s['entropy_norm']:.3f} δ={s['reverse_kl']:.3f} fwdKL={s['forward_kl']:.3f}"
                        f" | student top-1 {name(s['student_top1'])} p={s['student_top1_p']:.2f}"
                        f" | teacher top-1 {name(s['teacher_top1'])} p={s['teacher_top1_p']:.2f}")
            parts.append(f"<span class='q{int(s['quadrant'])}' style='background:"
                         f"{COLORS[int(s['quadrant'])]}55' title='{tip_text}'>{text}</span>")
        parts.append("</p>")
    return "".join(parts)


def plot_runs(run_dirs, path):
    """Training curves of distill.py runs, overlaid: loss, mean reverse KL, kept share per
    quadrant, and eval scores where the run has them; where a task follows token groups (a planted
    carry token, `<group>/...` in the metrics), a second row: the group's share in each quadrant, its
    mean ĥ against the step's threshold, and the share of it the rule kept."""
    records = {run: [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
               for run in run_dirs}
    groups = sorted({k[:-len("/kept_share")] for rs in records.values() for r in rs for k in r
                     if k.endswith("/kept_share")})
    fig, axes = plt.subplots(2 + bool(groups), 2 if not groups else 3,
                             figsize=(12 if not groups else 16, 8 if not groups else 12), dpi=100)
    for run, rs in records.items():
        steps = [r for r in rs if "loss" in r]
        label = os.path.basename(os.path.normpath(run))
        x = [r["step"] for r in steps]
        axes[0, 0].plot(x, [r["loss"] for r in steps], label=label)
        axes[0, 1].plot(x, [r["reverse_kl"] for r in steps], label=label)
        for q in QUADRANTS:
            axes[1, 0].plot(x, [r[f"q{q}_kept_share"] for r in steps], color=COLORS[q],
                            label=f"{label} Q{q}", alpha=0.8)
        evals = [(r["step"], k, v) for r in rs for k, v in r.items() if k.startswith("eval/")]
        for key in sorted({k for _, k, _ in evals}):
            pts = [(s, v) for s, k, v in evals if k == key]
            axes[1, 1].plot(*zip(*pts), "o-", label=f"{label} {key[5:]}")
        for g in groups:
            has = [r for r in steps if f"{g}/n" in r and r[f"{g}/n"] > 0]
            gx = [r["step"] for r in has]
            for q in QUADRANTS:
                axes[2, 0].plot(gx, [r[f"{g}/q{q}_share"] for r in has], color=COLORS[q],
                                label=f"{label} {g} Q{q}", alpha=0.8)
            axes[2, 1].plot(gx, [r[f"{g}/h_hat"] / max(r["h_threshold"], 1e-12) for r in has],
                            label=f"{label} {g}")
            axes[2, 2].plot(gx, [r[f"{g}/kept_share"] for r in has], label=f"{label} {g}")
    titles = ["loss (kept tokens)", "mean reverse KL, all response tokens",
              "share of kept tokens per quadrant", "evaluation score"]
    panels = [axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1]]
    if groups:
        titles += ["followed tokens: share in each quadrant",
                   "followed tokens: mean ĥ / the step's ĥ threshold (< 1: low entropy)",
                   "followed tokens: share the rule kept"]
        panels += [axes[2, 0], axes[2, 1], axes[2, 2]]
        axes[2, 1].axhline(1.0, color="grey", lw=0.8, ls="--")
        for ax in (axes[0, 2], axes[1, 2]):
            ax.axis("off")
    for ax, title in zip(panels, titles):
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.has_data():
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no records", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {(ax.get_title(), line.get_label()): (list(line.get_xdata()), list(line.get_ydata()))
            for ax in panels for line in ax.get_lines()}  # what was drawn, panel by panel


@torch.no_grad()
def statistics(teacher, student, rollouts, tokenizer, chunk_size=512, batch_size=16,
               h_threshold=None, d_threshold=None):
    """Every trained position's statistics over all the rollouts, normalised together.
    Returns (stats of (B, L) tensors, loss mask (B, L), thresholds)."""
    ids, attn, mask = collate(rollouts.prompts, rollouts.responses, pad_id(tokenizer), rollouts.masks)
    device = next(student.parameters()).device
    h_s, h_t = [], []
    for i in range(0, len(ids), batch_size):  # the forward passes in batches, the axes over all
        part = [t[i:i + batch_size].to(device) for t in (ids, attn, mask)]
        h_s.append(hidden_states(student, part[0], part[1])[part[2]])  # (n, D_s)
        h_t.append(hidden_states(teacher, part[0], part[1])[part[2]])  # (n, D_t)
    stats, thresholds = batch_statistics(
        torch.cat(h_s), lm_head(student), torch.cat(h_t), lm_head(teacher), mask.to(device),
        chunk_size, h_threshold=h_threshold, d_threshold=d_threshold, return_thresholds=True)
    return {k: v.cpu() for k, v in stats.items()}, mask, thresholds


def analyze(args):
    """The analysis CLI: tables on stdout; quadrants.png, coverage.png, tokens.html on disk."""
    task = tasks.get(args.task)
    laptop = {}
    if args.teacher is None:  # the task's laptop pair, with the benchmarks its runs evaluate on
        args.teacher, args.student, laptop = task.laptop_pair()  # (its followed tokens too)
    given = {f: getattr(args, f) for f in tasks.TASK_FLAGS if getattr(args, f) is not None}
    settings = tasks.Settings(max_prompt_length=args.max_prompt_length, max_new_tokens=args.max_new_tokens,
                              enable_thinking=args.enable_thinking, samples=args.samples_per_prompt,
                              batch_size=16, limit=args.prompts, progress=True,
                              benchmarks=tuple(filter(None, laptop.get("eval_benchmarks", "").split(","))),
                              **given)
    device, _ = loading.resolve_device(args.device)
    dtype, _ = loading.resolve_dtype(args.dtype, device)
    tokenizer = loading.load_tokenizer(args.student, args.trust_remote_code)
    loading.check_same_tokenizer(loading.load_tokenizer(args.teacher, args.trust_remote_code), tokenizer)
    items, notes = task.analysis_items(tokenizer, settings)  # e.g. held-out prompts, or tasks to play
    loading.check_context((("--teacher", args.teacher), ("--student", args.student)),
                          *task.positions(items, settings), args.trust_remote_code)
    teacher = loading.load_model(args.teacher, device, dtype, args.trust_remote_code).eval()
    student = loading.load_model(args.student, device, dtype, args.trust_remote_code).eval()
    for name, model in ((args.teacher, teacher), (args.student, student)):
        loading.check_output_head(model, name)
    torch.manual_seed(args.seed)
    rollouts, _, _ = task.rollouts(student, tokenizer, items, settings)  # the training sampler
    stats, mask, thresholds = statistics(teacher, student, rollouts, tokenizer, args.chunk_size,
                                         h_threshold=args.h_threshold, d_threshold=args.d_threshold)
    rows = quadrant_table(stats, mask)
    print(f"{int(mask.sum())} response tokens from {len(rollouts.responses)} rollouts; thresholds "
          f"ĥ > {thresholds[0]:.4f}, δ̂ > {thresholds[1]:.4f}\n")
    print(markdown(rows, ["quadrant", "share", "kl_share", "mean_h", "mean_kl"]) + "\n")
    for name, flags in (rollouts.followed or {}).items():
        marked = collate(rollouts.prompts, rollouts.responses, pad_id(tokenizer), flags)[2] & mask
        print(markdown([followed_row(name, stats, mask, marked, thresholds)],
                       ["tokens", "n", "q1", "q2", "q3", "q4", "kl_share", "p_top1", "h_ratio",
                        "d_ratio", "kl"]) + "\n")
    coverage = coverage_table(stats, mask, list(selection.RULES), (0.5, 0.2, 0.1), args.seed)
    print(markdown(coverage, ["rule", "keep", "q1_kept", "q2_kept", "q3_kept", "q4_kept", "kl_kept"]))
    report = task.analysis_report(notes, rollouts, stats, mask, tokenizer, settings)
    if report:  # what the task adds, e.g. where the wrong rollouts go wrong
        print("\n" + report)
    os.makedirs(args.output_dir, exist_ok=True)
    plot_quadrants(stats, mask, thresholds, os.path.join(args.output_dir, "quadrants.png"))
    plot_coverage(coverage, os.path.join(args.output_dir, "coverage.png"))
    with open(os.path.join(args.output_dir, "tokens.html"), "w") as f:
        f.write(tokens_html(rollouts, stats, mask, tokenizer))
    print(f"\nwrote quadrants.png, coverage.png, tokens.html in {args.output_dir}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["plot"]:
            p = loading.ArgumentParser(prog="analysis.py plot", description="Training curves of runs.")
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
        p = loading.ArgumentParser(description="Where is the learning signal? Quadrant analysis "
                                   "of a teacher/student pair (default: the laptop pair). "
                                   "`python analysis.py plot RUN_DIR...` draws training curves.")
        p.add_argument("--teacher", help="HF id or local directory (default: the laptop pair)")
        p.add_argument("--student", help="HF id or local directory (default: the laptop pair)")
        tasks.add_flags(p, dataset_help="HF id or local file (default: the laptop pair's held-out split)")
        p.add_argument("--prompts", type=int, default=32, help="prompts (or tasks) to sample from")
        p.add_argument("--samples-per-prompt", type=int, default=4, help="rollouts per prompt")
        max_new = {t.name: t.defaults.get("max_new_tokens", 256) for t in tasks.TASKS.values()}
        p.add_argument("--max-new-tokens", type=int, help="maximum response length, or of one turn of "
                       "an episode (default, as distill.py's: " + ", ".join(f"--task {k}: {v}" for k, v
                                                                          in max_new.items()) + ")")
        p.add_argument("--max-prompt-length", type=int, help="longer prompts skipped (default: 1024; "
                       "or the task's, as distill.py's)")
        p.add_argument("--enable-thinking", action="store_true", help="Qwen3 chat template thinking mode")
        p.add_argument("--h-threshold", type=float, help="ĥ threshold (default: batch median)")
        p.add_argument("--d-threshold", type=float, help="δ̂ threshold (default: batch median)")
        p.add_argument("--chunk-size", type=int, default=512, help="rows per lm_head chunk")
        p.add_argument("--output-dir", default="analysis", help="where the pictures go")
        p.add_argument("--seed", type=int, default=0, help="sampling and selection seed")
        loading.add_model_flags(p)
        args = p.parse_args(argv)
        loading.check_pair(args.teacher, args.student)  # both or neither; a local model is a folder
        if args.prompts < 1 or args.samples_per_prompt < 1:
            raise loading.UsageError("--prompts and --samples-per-prompt must be at least 1")
        task = tasks.get(args.task)
        tasks.check(task, vars(args))  # a flag this task would ignore, its own checks: one line
        args.max_new_tokens = args.max_new_tokens or max_new[args.task]
        args.max_prompt_length = args.max_prompt_length or task.defaults.get("max_prompt_length", 1024)
        loading.check_writable(args.output_dir)
        analyze(args)
    except loading.UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
