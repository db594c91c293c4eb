"""Evaluate a model on the benchmarks of any task in tasks.TASKS: each task samples and scores its
own (mean@k of boxed answers graded with math-verify, hard constraints of plans, ...). distill.py's periodic
evaluations call `evaluate_benchmark` too, so a training log and this script report numbers from
one piece of code.

    python evaluate.py --model Qwen/Qwen3-0.6B --benchmarks math500 --limit 20     # a quick look
    python evaluate.py --model runs/<run>/checkpoint-000200 --benchmarks math500,aime24,aime25 \\
        --samples 16 --temperature 1.0                                             # the paper's
    python evaluate.py --model M --benchmarks mine --data mine=problems.jsonl      # a local file

`--benchmarks` takes any task's benchmark names (`--help` lists them); `--data NAME=PATH` reads a
local .jsonl/.json/.parquet of problems and answers as benchmark NAME (the default task's format).
Every benchmark is loaded before the model, so bad input fails in seconds, not after a download.

Outputs: one markdown table per task on stdout, with mean@k per part (`mean/<part>`, where the
problems have parts) under it; <output-dir>/scores.json (settings, a summary per benchmark) and
each task's rows file (completions.jsonl: every completion, its extracted answer and verdict;
episodes.jsonl: every episode), written only once every benchmark has finished. Bad input: one
line on stderr, exit status 2.

Trap handled here: greedy decoding (temperature 0) with k > 1 would score k copies of one
completion, so the CLI refuses it.
"""
import json
import os
import sys
import time

import loading
import tasks
from loading import UsageError
from task_api import Settings

EVAL_FLAGS = ("data_dir", "max_turns", "max_total_tokens")  # the task flags a benchmark may read


def evaluate_benchmark(model, tokenizer, name, settings, problems=None, data=None, return_rows=False):
    """Sample `settings.samples` completions (or episodes) per problem of benchmark `name` and
    score them, by the task whose benchmark it is. `data`: a local file to read instead;
    `problems`: already loaded (task.load_benchmark). Returns the summary, or (summary, rows)."""
    task = tasks.owner(name, local=data is not None or problems is not None)
    if problems is None:
        problems = task.load_benchmark(name, settings, data)
    summary, rows = task.evaluate(model, tokenizer, name, problems, settings)
    return (summary, rows) if return_rows else summary


def during_training(model, tokenizer, names, settings):
    """distill.py's periodic evaluation: mean@k of each benchmark in `names`, for its log."""
    scores = {}
    for name in names:
        summary = evaluate_benchmark(model, tokenizer, name, settings)
        key = f"eval/{name}/mean@{settings.samples}"
        scores[key] = summary["mean"]
        scores.update({f"{key}/{k[5:]}": v for k, v in summary.items() if k.startswith("mean/")})
    return scores


def before_and_after(history):
    """distill.py's closing line: the first benchmark of its first and last evaluation, with the
    benchmark's parts where it has them; None with fewer than two evaluations."""
    evals = [r for r in history if any(k.startswith("eval/") for k in r)]
    if len(evals) < 2:
        return None
    key = next(k for k in evals[-1] if k.startswith("eval/"))
    parts = "".join(f", {k[len(key) + 1:]} {100 * evals[0][k]:.1f}% -> {100 * evals[-1][k]:.1f}%"
                    for k in evals[-1] if k.startswith(key + "/") and k in evals[0])
    first = "before" if not evals[0].get("step") else f"at step {evals[0]['step']}"  # --no-eval-before
    return (f"held-out accuracy ({key}): {first} {100 * evals[0][key]:.1f}% -> after "
            f"{100 * evals[-1][key]:.1f}%" + (f" ({parts[2:]})" if parts else "") + "\n")


# ---------------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    known = ", ".join(b for t in tasks.TASKS.values() for b in t.benchmarks)
    p = loading.ArgumentParser(description="Score a model on the benchmarks of any task (each "
                               "task's own measure: mean@k, hard constraints, ...).")
    p.add_argument("--model", required=True, help="HF id or local directory (e.g. a checkpoint)")
    p.add_argument("--benchmarks", help=f"comma-separated: {known}, or --data names (default: the "
                   f"--data names, else {tasks.TASKS[tasks.DEFAULT].default_benchmarks()[0]})")
    p.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                   help="read benchmark NAME from a local .jsonl/.json/.parquet (repeatable)")
    p.add_argument("--samples", type=int, default=1, help="completions per problem, k (paper: 16)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (paper: 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--max-new-tokens", type=int, default=2048, help="length cap (paper: 8192)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per generate call")
    p.add_argument("--enable-thinking", action="store_true", help="Qwen3 chat-template thinking")
    tasks.add_flags(p, EVAL_FLAGS, task=False)
    p.add_argument("--limit", type=int, help="evaluate on the first N problems of each benchmark")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (reset per benchmark)")
    p.add_argument("--output-dir", help="for scores.json and the rows "
                   "(default: runs/eval-<time>)")
    loading.add_model_flags(p)
    return p.parse_args(argv)


def validate(args):
    """Settings that can be checked before anything is loaded; one clear line if not.
    Returns ({benchmark: its task}, the tasks' Settings)."""
    pairs = [d.split("=", 1) for d in args.data]
    if any(len(pair) != 2 or not all(pair) for pair in pairs):
        raise UsageError(f"--data takes NAME=PATH, got {args.data}")
    args.data = dict(pairs)
    default = tasks.TASKS[tasks.DEFAULT].default_benchmarks()[0]
    args.benchmarks = args.benchmarks or ",".join(args.data) or default
    names = [n.strip() for n in args.benchmarks.split(",")]
    owners = {n: tasks.owner(n, local=n in args.data) for n in names}
    unused = [n for n in args.data if n not in names]  # most likely a typo: say so, don't ignore it
    if unused:
        raise UsageError(f"--data names {unused[0]!r}, not in --benchmarks {args.benchmarks}")
    for flag in ("samples", "max_new_tokens", "batch_size", "limit", "max_turns", "max_total_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1")
    unread = [f for f in EVAL_FLAGS if getattr(args, f) is not None
              and not any(f in t.flags for t in owners.values())]
    if unread:  # a flag no chosen benchmark reads: refused, never silently ignored
        raise UsageError(f"--{unread[0].replace('_', '-')} does not apply to --benchmarks {args.benchmarks}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UsageError("--temperature must be >= 0 and --top-p in (0, 1]")
    if args.temperature == 0 and args.samples > 1:
        raise UsageError("--temperature 0 is greedy: all samples would be the same completion; "
                         "use --samples 1 or a temperature above 0")
    given = {f: getattr(args, f) for f in EVAL_FLAGS if getattr(args, f) is not None}
    settings = Settings(samples=args.samples, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size,
                        enable_thinking=args.enable_thinking, seed=args.seed, limit=args.limit,
                        benchmarks=tuple(names), progress=True, **given)
    for task in dict.fromkeys(owners.values()):
        task.check(settings)
    args.output_dir = args.output_dir or time.strftime("runs/eval-%Y%m%d-%H%M%S")
    loading.check_writable(args.output_dir)
    return owners, settings


def run(args):
    owners, settings = validate(args)
    device, device_reason = loading.resolve_device(args.device)
    dtype, dtype_reason = loading.resolve_dtype(args.dtype, device)
    print("settings: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
    print(f"device: {device} ({device_reason}); dtype: {dtype} ({dtype_reason})")
    # Every benchmark is loaded before the model: a bad file fails in seconds, not after a download.
    problems = {name: task.load_benchmark(name, settings, args.data.get(name))
                for name, task in owners.items()}
    tokenizer = loading.load_tokenizer(args.model, args.trust_remote_code)
    model = loading.load_model(args.model, device, dtype, args.trust_remote_code).eval()
    summaries, rows = {}, {}
    for name, task in owners.items():
        print(f"{name}: {len(problems[name])} problems x {args.samples} samples", flush=True)
        summaries[name], rows[name] = evaluate_benchmark(model, tokenizer, name, settings,
                                                         problems[name], return_rows=True)
    by_task = {}  # one table per task, in the order its first benchmark came
    for name, task in owners.items():
        by_task.setdefault(task, []).append(summaries[name])
    print("\n\n".join(task.table(group) for task, group in by_task.items()))
    for s in summaries.values():  # a benchmark whose problems have parts: mean@k of each part
        parts = [k for k in s if k.startswith("mean/")]
        if parts:
            print(f"{s['benchmark']} mean@k by part: " + ", ".join(
                f"{k[5:]} {100 * s[k]:.1f}%" for k in parts))
    # Files only now, when every benchmark has been scored: an error above leaves nothing behind.
    os.makedirs(args.output_dir, exist_ok=True)
    scores = {"model": args.model, "settings": vars(args), "benchmarks": summaries}
    with open(os.path.join(args.output_dir, "scores.json"), "w") as f:
        json.dump(scores, f, indent=2)
    files = {}  # each task's rows file: completions.jsonl, episodes.jsonl, ...
    for name, task in owners.items():
        files.setdefault(task.rows_file, []).extend(rows[name])
    for file, part in files.items():
        with open(os.path.join(args.output_dir, file), "w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
    print(f"wrote {args.output_dir}/scores.json and " + ", ".join(
        f"{len(part)} rows in {file}" for file, part in files.items()))
    return scores


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
