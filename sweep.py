"""The paper's table in miniature: the toy student distilled under every rule x keep, several seeds.

    python sweep.py                          # SWEEP x seeds 0,1,2, 100 steps each (~35 min, 2 CPUs)
    python sweep.py --steps 20 --seeds 0     # a quick look
    python sweep.py --configs all@1,my-rule@0.5,entropy@0.5   # your own rule against the baselines

Every run is `distill.train` on the toy pair (toy.py; built first if missing) with the toy's laptop
settings (toy.DISTILL_DEFAULTS) except a gentler peak lr (LR: these runs are half as long as the
default run) and 4 prompts per step. Its score is the greedy held-out accuracy after the last step,
graded by evaluate.py. Writes into --output-dir: one distill.py run folder per (rule, keep, seed),
results.json (every run), table.md (mean ± std over seeds) and sweep.png.

Runs go one after another in this one process, so the peak-RSS column only grows from run to run
and says nothing about a rule: bench.py measures memory per configuration, each in a fresh process.
Which of the paper's findings hold on the toy task is written up in the README.
"""
import argparse
import json
import os
import statistics
import sys

import distill
import evaluate
import selection
import toy
from loading import UsageError, check_writable

LR = 5e-4
STEPS = 100
PROMPTS_PER_STEP = 4
SWEEP = [("all", 1.0), ("entropy", 0.5), ("entropy", 0.2), ("entropy-topk", 0.5),
         ("entropy-topk", 0.2), ("soft-or", 0.5), ("soft-or", 0.2), ("q3", 0.2), ("q3", 0.1),
         ("divergence", 0.2), ("divergence", 0.1), ("soft-or-bottom", 0.5), ("random", 0.5)]


def run_args(teacher_dir, student_dir, rule, keep, seed, steps, output_dir):
    """distill.py's settings for one run of the sweep (validated as the CLI would)."""
    args = distill.parse_args(["--teacher", teacher_dir, "--student", student_dir,
                               "--dataset", toy.split_path("train"), "--rule", rule,
                               "--keep", str(keep), "--steps", str(steps), "--seed", str(seed),
                               "--eval-every", str(steps), "--no-eval-before",
                               "--eval-benchmarks", "toy", "--lr", str(LR),
                               "--prompts-per-step", str(PROMPTS_PER_STEP),
                               "--output-dir", os.path.join(output_dir, f"{rule}-{keep:g}-seed{seed}")])
    distill.validate(args)
    for name, value in distill.TOY_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.toy = False  # evaluation follows --eval-every, not the toy's before/after default
    return args


def summarize(runs, configs):
    """Mean ± sample std of the accuracy over seeds, per (rule, keep), in percent."""
    rows = []
    for rule, keep in configs:
        mine = [r for r in runs if (r["rule"], r["keep"]) == (rule, keep)]
        acc = [100 * r["accuracy"] for r in mine]
        rows.append({"rule": rule, "keep": keep, "accuracy": statistics.mean(acc),
                     "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                     "tokens_trained": statistics.mean(r["tokens_trained"] for r in mine),
                     "peak_memory_gib": max(r["peak_memory_bytes"] for r in mine) / 2**30})
    return rows


def markdown(rows, start, steps, seeds):
    return (f"Toy student before distillation: {start:.1f}% held-out accuracy (greedy); "
            f"{steps} steps per run, seeds {', '.join(map(str, seeds))}.\n\n"
            "| rule | keep | held-out accuracy % (mean ± std) | tokens trained | peak RSS GiB * |\n"
            "|---|---|---|---|---|\n" + "\n".join(
                f"| {r['rule']} | {r['keep']:g} | {r['accuracy']:.1f} ± {r['std']:.1f} | "
                f"{r['tokens_trained']:.0f} | {r['peak_memory_gib']:.2f} |" for r in rows)
            + "\n\n* the peak RSS of the one process that runs every configuration in turn: it grows "
            "from run to run, so it says nothing about the rule; bench.py measures memory per rule.")


def plot_sweep(rows, start, path):
    """Held-out accuracy per rule@keep (mean ± std over seeds), the starting student dashed."""
    import matplotlib
    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    labels = [f"{r['rule']}@{r['keep']:g}" for r in rows]
    bars = ax.bar(range(len(rows)), [r["accuracy"] for r in rows], yerr=[r["std"] for r in rows],
                  color=["0.3" if r["rule"] == "all" else "tab:blue" for r in rows], capsize=3)
    ax.axhline(start, color="tab:red", ls="--", label=f"student before: {start:.1f}%")
    ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right")
    ax.set_ylabel("held-out accuracy % (greedy)")
    ax.set_ylim(0, 100)  # room above the bars for the legend
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {label: bar.get_height() for label, bar in zip(labels, bars)}  # what was drawn


def sweep(teacher_dir, student_dir, output_dir, steps=STEPS, seeds=(0, 1, 2), configs=SWEEP):
    """Distil the toy student under each (rule, keep) of `configs` for each seed; write
    results.json, table.md and sweep.png into output_dir. Returns the table rows."""
    plan = [(rule, keep, seed) for rule, keep in configs for seed in seeds]
    # every run's settings are checked before the first one starts, not 20 minutes in
    plan = [(rule, keep, seed, run_args(teacher_dir, student_dir, rule, keep, seed, steps,
                                        output_dir)) for rule, keep, seed in plan]
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    start = evaluate.evaluate_benchmark(AutoModelForCausalLM.from_pretrained(student_dir), tokenizer,
                                        "toy", max_new_tokens=toy.DISTILL_DEFAULTS["max_new_tokens"])
    runs = []
    for rule, keep, seed, args in plan:
        _, _, history = distill.train(args)
        runs.append({"rule": rule, "keep": keep, "seed": seed,
                     "accuracy": history[-1]["eval/toy/mean@1"],
                     "tokens_trained": sum(r["kept_tokens"] for r in history if "kept_tokens" in r),
                     "peak_memory_bytes": max(r["peak_memory_bytes"] for r in history
                                              if "peak_memory_bytes" in r)})
        print(f"sweep: {rule}@{keep:g} seed {seed}: {100 * runs[-1]['accuracy']:.1f}%", flush=True)
    rows = summarize(runs, configs)
    table = markdown(rows, 100 * start["mean"], steps, seeds)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump({"start_accuracy": start["mean"], "steps": steps, "seeds": list(seeds),
                   "runs": runs, "rows": rows}, f, indent=1)
    with open(os.path.join(output_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    plot_sweep(rows, 100 * start["mean"], os.path.join(output_dir, "sweep.png"))
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
    p.add_argument("--output-dir", default="sweep", help="where the runs and the table go")
    args = p.parse_args(argv)
    try:
        try:
            seeds = [int(x) for x in args.seeds.split(",")]
        except ValueError:
            raise UsageError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
        if args.steps < 1:
            raise UsageError("--steps must be at least 1")
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
        sweep(teacher_dir, student_dir, args.output_dir, args.steps, seeds, configs)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
