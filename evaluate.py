"""Evaluate a model on MATH-500, AIME 2024 and AIME 2025 (or the toy task): mean@k, graded with
math-verify. distill.py's periodic evaluations call `evaluate_benchmark`, so a training log and this
script report numbers from one piece of code.

    python evaluate.py --model Qwen/Qwen3-0.6B --benchmarks math500 --limit 20     # a quick look
    python evaluate.py --model runs/<run>/checkpoint-000200 --benchmarks math500,aime24,aime25 \\
        --samples 16 --temperature 1.0                                             # the paper's
    python evaluate.py --model M --benchmarks mine --data mine=problems.jsonl      # a local file

Benchmarks (hub id, split): math500 = HuggingFaceH4/MATH-500 (test); aime24 =
HuggingFaceH4/aime_2024 (train); aime25 = yentinglin/aime_2025 (train: the AIME 2025 set lighteval
uses, in aime_2024's schema); toy = the toy task's held-out split (`python toy.py` builds it).
`--data NAME=PATH` reads a local .jsonl/.json/.parquet instead. The problem is the first of
PROBLEM_FIELDS present; the gold answer the first of ANSWER_FIELDS, else the last \\boxed{} of the
row's `solution`.

Grading one completion:
    1. Prompt    the chat template around the problem plus loading.INSTRUCTION ("... put your final
                 answer within \\boxed{}"), rendered exactly as distill.py renders training prompts.
    2. Extract   grading.py: the last complete \\boxed{...}, not inside a `</think>` draft. No box:
                 wrong, and counted in `no_box`.
    3. Verify    grading.py: math-verify decides equivalence (\\frac12 = 0.5 = 1/2), not our code.

Metrics over P problems x k samples (verdicts: a (P, k) 0/1 matrix):
    mean@k           mean over j of acc_j, the accuracy of sample j over all problems (the paper
                     reports mean@16 at temperature 1.0).
    std              standard deviation of the k accuracies acc_j (population: k = 1 gives 0).
    pass@k           share of problems with at least one correct sample.
    no_box           share of completions with no boxed answer.
    truncated        share of completions cut by --max-new-tokens before their end of sequence.
    response_length  mean completion length in tokens (the end-of-sequence token included).
    mean/<part>      mean@k over the problems of one part, where the rows carry a "part" (the toy's
                     held-out split: misconception / other); printed under the table.

Outputs: the markdown table on stdout; <output-dir>/scores.json (settings, a summary per benchmark)
and <output-dir>/completions.jsonl (every completion, its extracted answer and verdict), or
episodes.jsonl for deepplanning (every episode's messages, plan and verdicts; deepplanning/episodes.py),
written only once every benchmark has finished. Bad input: one line on stderr, exit status 2.

Trap handled here: greedy decoding (temperature 0) with k > 1 would score k copies of one
completion, so the CLI refuses it.
"""
import json
import os
import sys
import time

import torch

import deepplanning
import loading
from grading import extract_boxed, grade, parse_answer
import toy
from loading import UsageError
from parallel import rank, shared_map
from rollouts import sample, stop_ids

HUB = {"math500": ("HuggingFaceH4/MATH-500", "test"),
       "aime24": ("HuggingFaceH4/aime_2024", "train"),
       "aime25": ("yentinglin/aime_2025", "train")}
BENCHMARKS = (*HUB, "toy", "deepplanning")
PROBLEM_FIELDS = ("problem", "question", "prompt", "Problem")
ANSWER_FIELDS = ("answer", "Answer")


# ---------------------------------------------------------------------------------------------
# Data: rows of a benchmark as {"problem", "answer"}
# ---------------------------------------------------------------------------------------------

def load_benchmark(name, data=None, limit=None):
    """The problems of benchmark `name` (or of the local file `data`), the first `limit` only."""
    if data is not None:
        records = loading.load_records(data)
    elif name == "toy":
        path = toy.split_path("heldout")
        if not os.path.isfile(path):
            raise UsageError(f"the toy held-out split {path} does not exist: run `python toy.py`")
        records = loading.load_records(path)
    elif name in HUB:
        records = loading.load_records(*HUB[name])
    else:
        raise UsageError(f"unknown benchmark {name!r}; valid: {', '.join(BENCHMARKS)}, "
                         "or any name given a file with --data NAME=PATH")
    problem_field = next((f for f in PROBLEM_FIELDS if f in records[0]), None)
    answer_field = next((f for f in ANSWER_FIELDS if f in records[0]), None)
    columns = ", ".join(records[0])
    if problem_field is None:
        raise UsageError(f"{name}: no problem field ({'/'.join(PROBLEM_FIELDS)}) in: {columns}")
    if answer_field is None and "solution" not in records[0]:
        raise UsageError(f"{name}: no answer field ({'/'.join(ANSWER_FIELDS)}/solution) in: {columns}")
    problems = []
    for i, row in enumerate(records[:limit]):
        # A row may lack the answer that another row has (a JSON file's columns are the union of
        # its rows' keys): fall back to its solution. AIME answers may be ints; we grade text.
        answer = row.get(answer_field) if answer_field else None
        gold = str(answer) if answer not in (None, "") else extract_boxed(row.get("solution") or "")
        if not gold:
            raise UsageError(f"{name}: row {i} has no gold answer")
        part = {"part": row["part"]} if "part" in row else {}  # the toy's misconception / other
        problems.append({"problem": row[problem_field], "answer": gold, **part})
    return problems


# ---------------------------------------------------------------------------------------------
# Metrics: pure arithmetic on the (P, k) verdict matrix
# ---------------------------------------------------------------------------------------------

def mean_at_k(verdicts):
    """verdicts: (P, k) 0/1 (problems x samples). Returns {mean, std, pass_at_k} as floats."""
    v = torch.as_tensor(verdicts, dtype=torch.float64)  # (P, k)
    per_sample = v.mean(0)  # (k,) acc_j: accuracy of the j-th sample over all problems
    return {"mean": per_sample.mean().item(),
            "std": per_sample.std(correction=0).item(),  # population std: k = 1 gives 0, not NaN
            "pass_at_k": v.amax(1).mean().item()}  # any of the k samples right


def score(name, problems, completions, lengths, truncated, samples):
    """Grade completions in problem-major order (the `samples` completions of problem i are
    consecutive, as rollouts.sample returns them). Returns (summary dict, one row per completion)."""
    verdicts, rows = [], []
    for i, item in enumerate(problems):
        gold = parse_answer(item["answer"])  # once per problem, not once per sample
        verdicts.append([])
        for j in range(samples):
            n = i * samples + j
            answer, correct = grade(completions[n], gold)
            verdicts[-1].append(int(correct))
            rows.append({"benchmark": name, "index": i, "sample": j, "problem": item["problem"],
                         "gold": item["answer"], "completion": completions[n], "extracted": answer,
                         "correct": correct, "length": lengths[n], "truncated": truncated[n]})
    summary = {"benchmark": name, "n_problems": len(problems), "samples": samples,
               **mean_at_k(verdicts),
               "no_box": sum(r["extracted"] is None for r in rows) / len(rows),
               "truncated": sum(truncated) / len(rows),
               "response_length": sum(lengths) / len(rows)}
    for part in sorted({p["part"] for p in problems if "part" in p}):  # mean/<part>: the toy's
        summary[f"mean/{part}"] = mean_at_k([v for v, p in zip(verdicts, problems)
                                             if p.get("part") == part])["mean"]
    return summary, rows


# ---------------------------------------------------------------------------------------------
# One benchmark: prompts -> samples -> grades
# ---------------------------------------------------------------------------------------------

def evaluate_benchmark(model, tokenizer, name, samples=1, temperature=0.0, max_new_tokens=2048,
                       batch_size=32, enable_thinking=False, limit=None, data=None, top_p=1.0,
                       problems=None, seed=None, progress=False, return_rows=False,
                       data_dir=None, max_turns=40, max_total_tokens=40960):
    """Sample `samples` completions per problem of benchmark `name` and grade them.

    `data`: a local file to read instead of the benchmark's hub set; `problems`: already loaded
    rows (the CLI loads every benchmark before the model, so bad input fails fast). Returns the
    summary dict (see the module docstring), or (summary, rows) with `return_rows`. `deepplanning`
    plays the held-out tasks of `data_dir` instead (deepplanning.evaluate).
    """
    if name == "deepplanning":
        result = deepplanning.evaluate(model, tokenizer, data_dir, samples, temperature, top_p,
                                       max_new_tokens, max_turns, max_total_tokens, batch_size,
                                       enable_thinking, limit, seed, progress, problems)
        return result if return_rows else result[0]
    if problems is None:
        problems = load_benchmark(name, data, limit)
    if seed is not None:
        torch.manual_seed(seed * 1_009 + rank())  # the completions are a function of (seed, rank)
    stops = stop_ids(model, tokenizer)

    def complete(share):  # this rank's problems -> their samples' (text, length, truncated)
        prompts = [tokenizer(loading.render_prompt(tokenizer, problems[i]["problem"], "problem",
                                                   enable_thinking), add_special_tokens=False)["input_ids"]
                   for i in share]
        responses = sample(model, tokenizer, prompts, samples, max_new_tokens, temperature, top_p,
                           batch_size, progress=progress).responses
        done = [(tokenizer.decode(r, skip_special_tokens=True), len(r), not r or r[-1] not in stops)
                for r in responses]  # no EOS: cut off
        return [done[k * samples:(k + 1) * samples] for k in range(len(share))]
    # Under torchrun each rank samples its share of the problems; every rank gets them all back.
    flat = [x for per_problem in shared_map(len(problems), complete) for x in per_problem]
    texts, lengths, truncated = (list(column) for column in zip(*flat))
    summary, rows = score(name, problems, texts, lengths, truncated, samples)
    return (summary, rows) if return_rows else summary


def during_training(model, tokenizer, args):
    """distill.py's periodic evaluation: mean@k of each of args.eval_benchmarks, for its log."""
    scores = {}
    for name in args.eval_benchmarks.split(","):
        summary = evaluate_benchmark(
            model, tokenizer, name, samples=args.eval_samples,
            temperature=0.0 if args.eval_samples == 1 else 1.0, max_new_tokens=args.max_new_tokens,
            batch_size=args.generation_batch_size, enable_thinking=args.enable_thinking,
            limit=args.eval_limit, seed=args.seed, data_dir=args.data_dir,
            max_turns=args.max_turns, max_total_tokens=args.max_total_tokens)
        scores[f"eval/{name}/mean@{args.eval_samples}"] = summary["mean"]
        scores.update({f"eval/{name}/mean@{args.eval_samples}/{k[5:]}": v  # per part (the toy)
                       for k, v in summary.items() if k.startswith("mean/")})
    return scores


# ---------------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = loading.ArgumentParser(description="mean@k on math benchmarks, graded with math-verify; "
                               "avg@k of hard constraints on DeepPlanning.")
    p.add_argument("--model", required=True, help="HF id or local directory (e.g. a checkpoint)")
    p.add_argument("--benchmarks", help=f"comma-separated: {', '.join(BENCHMARKS)} or --data names "
                   "(default: the --data names, else math500)")
    p.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                   help="read benchmark NAME from a local .jsonl/.json/.parquet (repeatable)")
    p.add_argument("--samples", type=int, default=1, help="completions per problem, k (paper: 16)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (paper: 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--max-new-tokens", type=int, default=2048, help="length cap (paper: 8192)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per generate call")
    p.add_argument("--enable-thinking", action="store_true", help="Qwen3 chat-template thinking")
    p.add_argument("--data-dir", help="deepplanning: the DeepPlanning travel folder (data/, tools/, "
                   "agent/, database/) or its database_en / database_zh folder")
    p.add_argument("--max-turns", type=int, help="deepplanning: turns per episode (default 40)")
    p.add_argument("--max-total-tokens", type=int, help="deepplanning: prompt + every turn and tool "
                   "answer of an episode (default 40960)")
    p.add_argument("--limit", type=int, help="evaluate on the first N problems of each benchmark")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (reset per benchmark)")
    p.add_argument("--output-dir", help="for scores.json and completions.jsonl "
                   "(default: runs/eval-<time>)")
    loading.add_model_flags(p)
    return p.parse_args(argv)


def validate(args):
    """Settings that can be checked before anything is loaded; one clear line if not."""
    pairs = [d.split("=", 1) for d in args.data]
    if any(len(pair) != 2 or not all(pair) for pair in pairs):
        raise UsageError(f"--data takes NAME=PATH, got {args.data}")
    args.data = dict(pairs)
    args.benchmarks = args.benchmarks or ",".join(args.data) or "math500"
    names = [n.strip() for n in args.benchmarks.split(",")]
    unknown = [n for n in names if n not in BENCHMARKS and n not in args.data]
    if unknown:
        raise UsageError(f"unknown benchmark {unknown[0]!r}; valid: {', '.join(BENCHMARKS)}, "
                         "or any name given a file with --data NAME=PATH")
    unused = [n for n in args.data if n not in names]  # most likely a typo: say so, don't ignore it
    if unused:
        raise UsageError(f"--data names {unused[0]!r}, not in --benchmarks {args.benchmarks}")
    if "deepplanning" in names and not args.data_dir:
        raise UsageError("the deepplanning benchmark needs --data-dir (the DeepPlanning travel folder)")
    ignored = [f for f in ("data_dir", "max_turns", "max_total_tokens") if getattr(args, f) is not None]
    if ignored and "deepplanning" not in names:  # a flag no chosen benchmark reads: refused
        raise UsageError(f"--{ignored[0].replace('_', '-')} applies only to the deepplanning benchmark")
    args.max_turns, args.max_total_tokens = args.max_turns or 40, args.max_total_tokens or 40960
    for flag in ("samples", "max_new_tokens", "batch_size", "limit", "max_turns", "max_total_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UsageError("--temperature must be >= 0 and --top-p in (0, 1]")
    if args.temperature == 0 and args.samples > 1:
        raise UsageError("--temperature 0 is greedy: all samples would be the same completion; "
                         "use --samples 1 or a temperature above 0")
    args.output_dir = args.output_dir or time.strftime("runs/eval-%Y%m%d-%H%M%S")
    loading.check_writable(args.output_dir)
    return names


def markdown_table(summaries):
    if summaries and summaries[0]["benchmark"] == "deepplanning":
        return deepplanning.markdown_table(summaries)
    lines = ["| benchmark | problems | k | mean@k % | ± std | pass@k % | no box % | truncated % "
             "| length |", "|---|" + "---:|" * 8]
    for s in summaries:
        shares = [f"{100 * s[k]:.1f}" for k in ("mean", "std", "pass_at_k", "no_box", "truncated")]
        cells = [s["benchmark"], str(s["n_problems"]), str(s["samples"]), *shares,
                 f"{s['response_length']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args):
    names = validate(args)
    device, device_reason = loading.resolve_device(args.device)
    dtype, dtype_reason = loading.resolve_dtype(args.dtype, device)
    print("settings: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
    print(f"device: {device} ({device_reason}); dtype: {dtype} ({dtype_reason})")
    # Every benchmark is loaded before the model: a bad file fails in seconds, not after a download.
    problems = {name: deepplanning.split_tasks(args.data_dir, "heldout")[:args.limit]
                if name == "deepplanning" else load_benchmark(name, args.data.get(name), args.limit)
                for name in names}
    tokenizer = loading.load_tokenizer(args.model, args.trust_remote_code)
    model = loading.load_model(args.model, device, dtype, args.trust_remote_code).eval()
    summaries, rows = [], []
    for name in names:
        print(f"{name}: {len(problems[name])} problems x {args.samples} samples", flush=True)
        summary, benchmark_rows = evaluate_benchmark(
            model, tokenizer, name, samples=args.samples, temperature=args.temperature,
            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
            enable_thinking=args.enable_thinking, top_p=args.top_p, problems=problems[name],
            seed=args.seed, progress=True, return_rows=True, data_dir=args.data_dir,
            max_turns=args.max_turns, max_total_tokens=args.max_total_tokens)
        summaries.append(summary)
        rows += benchmark_rows
    agentic = [s for s in summaries if s["benchmark"] == "deepplanning"]
    print("\n\n".join(markdown_table(group) for group in
                       ([s for s in summaries if s not in agentic], agentic) if group))
    for s in summaries:  # a benchmark whose rows have parts (the toy): mean@k of each part
        parts = [k for k in s if k.startswith("mean/")]
        if parts:
            print(f"{s['benchmark']} mean@k by part: " + ", ".join(
                f"{k[5:]} {100 * s[k]:.1f}%" for k in parts))
    # Files only now, when every benchmark has been scored: an error above leaves nothing behind.
    os.makedirs(args.output_dir, exist_ok=True)
    scores = {"model": args.model, "settings": vars(args),
              "benchmarks": {s["benchmark"]: s for s in summaries}}
    with open(os.path.join(args.output_dir, "scores.json"), "w") as f:
        json.dump(scores, f, indent=2)
    episodes = [r for r in rows if r["benchmark"] == "deepplanning"]  # messages, plan, verdicts
    for name, part in (("completions.jsonl", [r for r in rows if r not in episodes]),
                       ("episodes.jsonl", episodes)):
        if part:
            with open(os.path.join(args.output_dir, name), "w") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
    print(f"wrote {args.output_dir}/scores.json, {len(rows) - len(episodes)} completions and "
          f"{len(episodes)} episodes")
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
