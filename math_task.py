"""The math task: single-turn problems with a boxed final answer, graded by grading.py.

Training items are the distinct prompts of --dataset (an HF id or a local .jsonl/.json/.parquet; the
prompt column is the first of loading.PROMPT_FIELDS, rendered by loading.render_prompt). With no
--teacher/--student the laptop pair is the toy (toy.py): its train split, its held-out benchmark
`toy`, and the token the toy student gets wrong followed step by step (`toy/carry`).

Benchmarks (hub id, split): math500 = HuggingFaceH4/MATH-500 (test); aime24 =
HuggingFaceH4/aime_2024 (train); aime25 = yentinglin/aime_2025 (train: the AIME 2025 set lighteval
uses, in aime_2024's schema); toy = the toy's held-out split (`python toy.py` builds it); any other
name given a local file (evaluate.py --data NAME=PATH). The gold answer is the first of
ANSWER_FIELDS, else the last \\boxed{} of the row's `solution`.

Metrics over P problems x k samples (verdicts: a (P, k) 0/1 matrix):
    mean@k           mean over j of acc_j, the accuracy of sample j over all problems (the paper
                     reports mean@16 at temperature 1.0).
    std              standard deviation of the k accuracies acc_j (population: k = 1 gives 0).
    pass@k           share of problems with at least one correct sample.
    no_box           share of completions with no boxed answer.
    truncated        share of completions cut by --max-new-tokens before their end of sequence.
    response_length  mean completion length in tokens (the end-of-sequence token included).
    mean/<part>      mean@k over the problems of one part, where the rows carry a "part" (the toy's
                     held-out split: misconception / other).
"""
import os

import torch

import loading
import toy
from grading import extract_boxed, grade, is_correct, parse_answer
from loading import UsageError
from parallel import rank, shared_map
from rollouts import sample, stop_ids
from task_api import Task

HUB = {"math500": ("HuggingFaceH4/MATH-500", "test"),
       "aime24": ("HuggingFaceH4/aime_2024", "train"),
       "aime25": ("yentinglin/aime_2025", "train")}
ANSWER_FIELDS = ("answer", "Answer")


def load_benchmark(name, data=None, limit=None):
    """The problems of benchmark `name` (or of the local file `data`), the first `limit` only, as
    {"problem", "field", "answer"(, "part")}."""
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
        raise UsageError(f"unknown benchmark {name!r}")
    field = next((f for f in loading.PROMPT_FIELDS if f in records[0]), None)  # as training finds it
    answer_field = next((f for f in ANSWER_FIELDS if f in records[0]), None)
    columns = ", ".join(records[0])
    if field is None:
        raise UsageError(f"{name}: no problem field ({'/'.join(loading.PROMPT_FIELDS)}) in: {columns}")
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
        problems.append({"problem": row[field], "field": field, "answer": gold, **part})
    return problems


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


def first_wrong_quadrants(rollouts, stats, mask, tokenizer, records, samples_per_prompt):
    """Where the wrong rollouts go wrong: for each rollout that grading.py grades wrong against its
    record's answer, the quadrant of its first token that departs from the record's worked
    solution. On the toy that solution is the one procedure the teacher learned, so the departure
    is the error; on other data it is one right derivation among many. -> {part: how many wrong
    rollouts start in Q1..Q4}, with part "all" and, where records carry a "part" (the toy), one
    entry per part."""
    counts = {}
    for b, response in enumerate(rollouts.responses):
        record = records[b // samples_per_prompt]  # rollouts of one prompt are consecutive
        if is_correct(tokenizer.decode(response, skip_special_tokens=True), str(record["answer"])):
            continue
        reference = tokenizer(record["solution"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        j = next((j for j, (a, r) in enumerate(zip(response, reference)) if a != r),
                 min(len(response), len(reference)) - 1)  # a right prefix cut short: its last token
        q = int(stats["quadrant"][b, mask[b].nonzero().flatten()[j]])
        for part in ("all", record.get("part")):
            if part is not None:
                counts.setdefault(part, [0, 0, 0, 0])[q - 1] += 1
    return counts


class MathTask(Task):
    """single-turn problems from --dataset, graded by their boxed answer"""
    name = "math"
    flags = ("dataset", "split", "prompt_field")
    benchmarks = (*HUB, "toy")
    defaults = dict(dataset="BytedTsinghua-SIA/DAPO-Math-17k")  # ours
    laptop = {"max_prompt_length": 2048, "micro_batch_tokens": 4096, "eval_benchmarks": "toy",
              **toy.DISTILL_DEFAULTS}

    def laptop_pair(self):
        """The toy pair, built once into its cache (toy.py), on its train split."""
        try:
            teacher, student = toy.build()
        except (FileExistsError, PermissionError) as e:
            raise UsageError(f"cannot build the toy pair: {e}")
        torch.set_num_threads(toy.SETTINGS["threads"])  # the README's numbers on any core count
        return teacher, student, {**self.laptop, "dataset": toy.split_path("train")}

    def default_benchmarks(self):
        return ["math500"]

    def items(self, tokenizer, settings):
        records = loading.load_records(settings.dataset, settings.split or "train")
        return loading.encode_prompts(tokenizer, records, loading.find_prompt_field(
            records, settings.prompt_field), settings.max_prompt_length, settings.enable_thinking)

    def rollouts(self, model, tokenizer, items, settings):
        s = settings
        rollouts = sample(model, tokenizer, items, s.samples, s.max_new_tokens, s.temperature, s.top_p,
                          s.batch_size, progress=s.progress)
        if "toy" in s.benchmarks:  # the toy's items (also an explicit pair, as sweep.py passes):
            # where the planted misconception's token sits, step by step
            rollouts.followed = {"toy/carry": toy.carry_flags(tokenizer, rollouts)}
        return rollouts, {}, 0

    def load_benchmark(self, name, settings, data=None):
        return load_benchmark(name, data, settings.limit)

    def evaluate(self, model, tokenizer, name, problems, settings):
        """`settings.samples` completions per problem, sampled under torchrun by each rank for its
        share of the problems, then graded (score)."""
        s = settings
        if s.seed is not None:
            torch.manual_seed(s.seed * 1_009 + rank())  # the completions are a function of (seed, rank)
        stops = stop_ids(model, tokenizer)

        def complete(share):  # this rank's problems -> their samples' (text, length, truncated)
            prompts = [tokenizer(loading.render_prompt(tokenizer, problems[i]["problem"],
                                                       problems[i].get("field", "problem"), s.enable_thinking),
                                 add_special_tokens=False)["input_ids"] for i in share]
            responses = sample(model, tokenizer, prompts, s.samples, s.max_new_tokens, s.temperature,
                               s.top_p, s.batch_size, progress=s.progress).responses
            done = [(tokenizer.decode(r, skip_special_tokens=True), len(r), not r or r[-1] not in stops)
                    for r in responses]  # no EOS: cut off
            return [done[k * s.samples:(k + 1) * s.samples] for k in range(len(share))]
        flat = [x for per_problem in shared_map(len(problems), complete) for x in per_problem]
        texts, lengths, truncated = (list(column) for column in zip(*flat))
        return score(name, problems, texts, lengths, truncated, s.samples)

    def table(self, summaries):
        lines = ["| benchmark | problems | k | mean@k % | ± std | pass@k % | no box % | truncated % "
                 "| length |", "|---|" + "---:|" * 8]
        for s in summaries:
            shares = [f"{100 * s[k]:.1f}" for k in ("mean", "std", "pass_at_k", "no_box", "truncated")]
            cells = [s["benchmark"], str(s["n_problems"]), str(s["samples"]), *shares,
                     f"{s['response_length']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def analysis_items(self, tokenizer, settings):
        """The first `limit` rows of --dataset (default: the toy's held-out split), split test, and
        the rows themselves when each kept its own prompt (for analysis_report)."""
        records = loading.load_records(settings.dataset or toy.split_path("heldout"),
                                       settings.split or "test")[:settings.limit]
        prompts, _ = loading.encode_prompts(tokenizer, records, loading.find_prompt_field(
            records, settings.prompt_field), settings.max_prompt_length, settings.enable_thinking)
        return prompts, (records if len(prompts) == len(records) else None)  # one prompt per row?

    def analysis_report(self, records, rollouts, stats, mask, tokenizer, settings):
        """Where the wrong rollouts go wrong, where every row kept its prompt and carries a worked
        `solution` and an `answer` (the toy does)."""
        if not records or not all("solution" in r and "answer" in r for r in records):
            return ""
        counts = first_wrong_quadrants(rollouts, stats, mask, tokenizer, records, settings.samples)
        return "\n".join(["wrong rollouts (boxed answer not equivalent to the answer, by math-verify), "
                          "by the quadrant of their first token that departs from the dataset's worked "
                          "solution (on the toy the one procedure the teacher learned, so the departure "
                          "is the error; on other data one right derivation among many):"]
                         + [f"  {part}: {sum(n)} wrong; first wrong token in Q1-4 "
                            + "/".join(f"{k / sum(n):.2f}" for k in n) for part, n in counts.items()])
