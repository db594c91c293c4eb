"""The paper's table in miniature: the toy student distilled under every rule x keep, several seeds.

    python sweep.py                          # SWEEP x seeds 0,1,2, 60 steps each (see the README)
    python sweep.py --steps 20 --seeds 0     # a quick look
    python sweep.py --configs all@1,my-rule@0.5,entropy@0.5   # your own rule against the baselines
    python sweep.py --report-to tensorboard  # each run to a tracker, grouped by rule@keep (tracking.py)

Every run is `distill.train` on the toy pair (toy.py; built first if missing) with the toy's laptop
settings (toy.DISTILL_DEFAULTS) except a gentler peak lr (LR: with 16 rollouts a step, 1e-3 first
knocks the student down, then it recovers), fewer steps (STEPS) and 4 prompts per step, on the
toy's thread count. Its score is the greedy held-out accuracy after the last step, overall and on each
part of the held-out split (misconception / other), graded by evaluate.py; the runs at CURVE_KEEP
and all@1 are also scored every --curve-every steps, for the misconception curves. Writes into
--output-dir: one distill.py run folder per (rule, keep, seed), results.json (every run),
table.md (mean ± std over seeds), sweep.png and misconception_curves.png.

Runs go one after another in this one process, so the peak-RSS column only grows from run to run
and says nothing about a rule: bench.py measures memory per configuration, each in a fresh process.
Which of the paper's findings hold on the toy task is written up in the README.
"""
import argparse
import json
import os
import statistics
import sys

import torch

import distill
import evaluate
import selection
import toy
import tracking
from loading import UsageError, check_writable

LR = 5e-4
STEPS = 60
PROMPTS_PER_STEP = 4
SWEEP = [("all", 1.0), ("entropy", 0.5), ("entropy", 0.2), ("entropy", 0.1), ("entropy-topk", 0.5),
         ("entropy-topk", 0.2), ("soft-or", 0.5), ("soft-or", 0.2), ("soft-or", 0.1), ("q3", 0.2),
         ("q3", 0.1), ("divergence", 0.2), ("divergence", 0.1), ("soft-or-bottom", 0.5),
         ("random", 0.5)]
CURVE_KEEP = 0.2  # runs at this keep (and all@1) are also scored every --curve-every steps
CURVE_EVERY = 20
PARTS = ("misconception", "other")  # the toy held-out split's parts (toy.make_item)


def run_args(teacher_dir, student_dir, rule, keep, seed, steps, output_dir, eval_every=None,
             report_to=()):
    """distill.py's settings for one run of the sweep (validated as the CLI would); with
    `report_to`, one tracker run per (rule, keep, seed), grouped by (sweep folder, rule, keep)."""
    args = distill.parse_args(["--teacher", teacher_dir, "--student", student_dir,
                               "--dataset", toy.split_path("train"), "--rule", rule,
                               "--keep", str(keep), "--steps", str(steps), "--seed", str(seed),
                               "--eval-every", str(eval_every or steps), "--no-eval-before",
                               "--eval-benchmarks", "toy", "--lr", str(LR),
                               "--prompts-per-step", str(PROMPTS_PER_STEP),
                               "--report-to", ",".join(report_to) or "none",
                               "--output-dir", os.path.join(output_dir, f"{rule}-{keep:g}-seed{seed}")])
    distill.validate(args)
    for name, value in distill.TOY_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.toy = False  # evaluation follows --eval-every, not the toy's before/after default
    args.run_group = f"{os.path.basename(os.path.abspath(output_dir))}-{rule}-{keep:g}"  # tracking.py
    args.run_name = f"{args.run_group}-seed{seed}"
    return args


def summarize(runs, configs):
    """Mean ± sample std of the accuracy over seeds, per (rule, keep), in percent."""
    rows = []
    for rule, keep in configs:
        mine = [r for r in runs if (r["rule"], r["keep"]) == (rule, keep)]
        acc = [100 * r["accuracy"] for r in mine]
        spread = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
        parts = {part: [100 * r["parts"][part] for r in mine if part in r["parts"]] for part in PARTS}
        rows.append({"rule": rule, "keep": keep, "accuracy": statistics.mean(acc), "std": spread(acc),
                     **{f"{part}": statistics.mean(v) for part, v in parts.items() if v},
                     **{f"{part}_std": spread(v) for part, v in parts.items() if v},
                     "tokens_trained": statistics.mean(r["tokens_trained"] for r in mine),
                     "peak_memory_gib": max(r["peak_memory_bytes"] for r in mine) / 2**30})
    return rows


def markdown(rows, start, steps, seeds):
    part = lambda r, p: f"{r[p]:.1f} ± {r[p + '_std']:.1f}" if p in r else "-"  # noqa: E731
    return (f"Toy student before distillation: {start['mean']:.1f}% held-out accuracy (greedy; "
            + ", ".join(f"{p} {start[p]:.1f}%" for p in PARTS if p in start)
            + f"); {steps} steps per run, seeds {', '.join(map(str, seeds))}.\n\n"
            "| rule | keep | held-out accuracy % (mean ± std) | misconception % | other % "
            "| tokens trained | peak RSS GiB * |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(
                f"| {r['rule']} | {r['keep']:g} | {r['accuracy']:.1f} ± {r['std']:.1f} | "
                f"{part(r, 'misconception')} | {part(r, 'other')} | "
                f"{r['tokens_trained']:.0f} | {r['peak_memory_gib']:.2f} |" for r in rows)
            + "\n\n* the peak RSS of the one process that runs every configuration in turn: it grows "
            "from run to run, so it says nothing about the rule; bench.py measures memory per rule.")


def plot_sweep(rows, start, path):
    """Held-out accuracy per rule@keep (mean ± std over seeds), the starting student dashed."""
    import matplotlib
    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    labels, x = [f"{r['rule']}@{r['keep']:g}" for r in rows], range(len(rows))
    bars = ax.bar(x, [r["accuracy"] for r in rows], yerr=[r["std"] for r in rows],
                  color=["0.3" if r["rule"] == "all" else "tab:blue" for r in rows], capsize=3,
                  label="all held-out problems")
    if all("misconception" in r for r in rows):  # the toy's misconception part, as dots
        ax.errorbar(x, [r["misconception"] for r in rows], [r["misconception_std"] for r in rows],
                    fmt="o", color="tab:orange", capsize=2, label="misconception part")
    ax.axhline(start["mean"], color="tab:red", ls="--", label=f"student before: {start['mean']:.1f}%")
    ax.set_xticks(x, labels, rotation=45, ha="right")
    ax.set_ylabel("held-out accuracy % (greedy)")
    ax.set_ylim(0, 110)  # room above the bars for the legend
    ax.legend(loc="upper right", ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {label: bar.get_height() for label, bar in zip(labels, bars)}  # what was drawn


def plot_curves(runs, start, keep, path):
    """Misconception-part accuracy against steps, mean over seeds: one line per rule at `keep`
    (and all tokens), from the runs scored every CURVE_EVERY steps."""
    import matplotlib
    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for rule, k in dict.fromkeys((r["rule"], r["keep"]) for r in runs if len(r["curve"]) > 1):
        if k not in (keep, 1.0):
            continue
        curves = [r["curve"] for r in runs if (r["rule"], r["keep"]) == (rule, k)]
        steps = [0] + [c["step"] for c in curves[0]]
        mean = [start["misconception"]] + [statistics.mean(100 * c[i]["misconception"] for c in curves)
                                           for i in range(len(curves[0]))]
        entropy_only = rule.startswith("entropy")  # blind to Q3: dashed
        ax.plot(steps, mean, "o--" if entropy_only else "o-", color="0.3" if rule == "all" else None,
                label=f"{rule}@{k:g}" + (" (entropy only)" if entropy_only else ""))
    ax.set_xlabel("distillation step")
    ax.set_ylabel("misconception-part accuracy % (greedy)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def scores(record):
    """{"mean", part...} in [0, 1] from one metrics record's toy evaluation."""
    key = "eval/toy/mean@1"
    return {"mean": record[key], **{p: record[f"{key}/{p}"] for p in PARTS if f"{key}/{p}" in record}}


def sweep(teacher_dir, student_dir, output_dir, steps=STEPS, seeds=(0, 1, 2), configs=SWEEP,
          curve_every=CURVE_EVERY, report_to=()):
    """Distil the toy student under each (rule, keep) of `configs` for each seed; write
    results.json, table.md, sweep.png and misconception_curves.png into output_dir. Returns the
    table rows."""
    plan = [(rule, keep, seed) for rule, keep in configs for seed in seeds]
    # every run's settings are checked before the first one starts, not 20 minutes in
    plan = [(rule, keep, seed, run_args(teacher_dir, student_dir, rule, keep, seed, steps, output_dir,
                                        curve_every if keep in (CURVE_KEEP, 1.0) else None, report_to))
            for rule, keep, seed in plan]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    summary = evaluate.evaluate_benchmark(AutoModelForCausalLM.from_pretrained(student_dir),
                                          tokenizer, "toy",
                                          max_new_tokens=toy.DISTILL_DEFAULTS["max_new_tokens"])
    start = {k[5:] if k.startswith("mean/") else k: 100 * v for k, v in summary.items()
             if k == "mean" or k.startswith("mean/")}  # percent
    runs = []
    for rule, keep, seed, args in plan:
        _, _, history = distill.train(args)
        curve = [{"step": r["step"], **scores(r)} for r in history if "eval/toy/mean@1" in r]
        runs.append({"rule": rule, "keep": keep, "seed": seed, "accuracy": curve[-1]["mean"],
                     "parts": {p: curve[-1][p] for p in PARTS if p in curve[-1]}, "curve": curve,
                     "tokens_trained": sum(r["kept_tokens"] for r in history if "kept_tokens" in r),
                     "peak_memory_bytes": max(r["peak_memory_bytes"] for r in history
                                              if "peak_memory_bytes" in r)})
        print(f"sweep: {rule}@{keep:g} seed {seed}: {100 * runs[-1]['accuracy']:.1f}% "
              + " ".join(f"{p} {100 * v:.1f}%" for p, v in runs[-1]["parts"].items()), flush=True)
    rows = summarize(runs, configs)
    table = markdown(rows, start, steps, seeds)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump({"start": start, "steps": steps, "seeds": list(seeds), "runs": runs, "rows": rows},
                  f, indent=1)
    with open(os.path.join(output_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    plot_sweep(rows, start, os.path.join(output_dir, "sweep.png"))
    if "misconception" in start:
        plot_curves(runs, start, CURVE_KEEP, os.path.join(output_dir, "misconception_curves.png"))
    print(table)
    return rows


def parse_configs(text):
    """'all@1,soft-or@0.5' -> [("all", 1.0), ("soft-or", 0.5)], each checked."""
    configs = []
    for item in text.split(","):
        rule, _, keep = item.strip().partition("@")
        try:
            keep = float(keep)
        except ValueError:
            raise UsageError(f"--configs: {item!r} is not RULE@KEEP (e.g. soft-or@0.5)") from None
        if rule not in selection.RULES:
            raise UsageError(f"--configs: unknown rule {rule!r}; valid rules: "
                             f"{', '.join(selection.RULES)}")
        if not 0.0 < keep <= 1.0:
            raise UsageError(f"--configs: keep must be in (0, 1], got {item!r}")
        configs.append((rule, keep))
    return configs


def main(argv=None):
    p = argparse.ArgumentParser(prog="sweep.py", description="The paper's table in miniature: the "
                                "toy student distilled under every rule x keep, several seeds.")
    p.add_argument("--steps", type=int, default=STEPS, help="optimizer steps per run")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated distillation seeds")
    p.add_argument("--configs", help="comma-separated RULE@KEEP (default: the paper's SWEEP)")
    p.add_argument("--curve-every", type=int, default=CURVE_EVERY, help="score the runs at keep "
                   f"{CURVE_KEEP} and all@1 every N steps (the misconception curves)")
    p.add_argument("--output-dir", default="sweep", help="where the runs and the table go")
    tracking.add_flag(p)
    args = p.parse_args(argv)
    try:
        try:
            seeds = [int(x) for x in args.seeds.split(",")]
        except ValueError:
            raise UsageError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
        if args.steps < 1 or args.curve_every < 1:
            raise UsageError("--steps and --curve-every must be at least 1")
        configs = parse_configs(args.configs) if args.configs else SWEEP
        check_writable(args.output_dir)
        if os.path.exists(os.path.join(args.output_dir, "results.json")):
            raise UsageError(f"--output-dir {args.output_dir!r} already holds a sweep: choose "
                             "another folder")
        try:
            teacher_dir, student_dir = toy.build()
        except (FileExistsError, PermissionError, NotADirectoryError) as e:
            raise UsageError(f"cannot build the toy pair: {e}") from None
        os.makedirs(args.output_dir, exist_ok=True)
        torch.set_num_threads(toy.SETTINGS["threads"])  # as `python distill.py` on the toy pair
        sweep(teacher_dir, student_dir, args.output_dir, args.steps, seeds, configs, args.curve_every,
              args.report_to)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
