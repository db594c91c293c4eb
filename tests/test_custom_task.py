"""A task defined here, registered with one line, runs through distill.py, evaluate.py and
analysis.py without a change to them: the README's "Add your own task", on tiny local models.

The task: reverse a string of digits. Its items are the prompts' token ids; its rollouts are
rollouts.sample's, with a per-episode sum (the response length, counted per rollout) and a followed
token group (each response's first token); its benchmark grades a completion right when it is the
digits reversed; its analysis report counts the right rollouts.
"""
import json
import random

import pytest

import analysis
import distill
import evaluate
import tasks
from helpers import make_tiny_pair
from rollouts import sample
from task_api import Task


def reverse_problems(n, seed):
    rng = random.Random(seed)
    return [{"problem": "Reverse " + "".join(rng.choice("0123456789") for _ in range(4))}
            for _ in range(n)]


def reversed_digits(problem):
    return problem.split()[-1][::-1]


class ReverseTask(Task):
    """reverse a string of digits (a test's own task)"""
    name = "reverse"
    benchmarks = ("reverse",)
    defaults = dict(max_new_tokens=6, samples_per_prompt=2, prompts_per_step=2, steps=1)

    def items(self, tokenizer, settings):
        return [tokenizer(p["problem"])["input_ids"] for p in reverse_problems(6, 0)], 0

    def rollouts(self, model, tokenizer, items, settings):
        s = settings
        rollouts = sample(model, tokenizer, items, s.samples, s.max_new_tokens, s.temperature, s.top_p,
                          s.batch_size)
        rollouts.followed = {"reverse/first": [[1] + [0] * (len(r) - 1) for r in rollouts.responses]}
        return rollouts, {"length": sum(len(r) for r in rollouts.responses)}, len(rollouts.responses)

    def load_benchmark(self, name, settings, data=None):
        return reverse_problems(3, 1)[:settings.limit]

    def evaluate(self, model, tokenizer, name, problems, settings):
        prompts = [tokenizer(p["problem"])["input_ids"] for p in problems]
        out = sample(model, tokenizer, prompts, settings.samples, settings.max_new_tokens,
                     settings.temperature, settings.top_p, settings.batch_size)
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in out.responses]
        rows = [{"benchmark": name, "problem": p["problem"], "completion": t,
                 "correct": t.strip() == reversed_digits(p["problem"])}
                for p, t in zip([p for p in problems for _ in range(settings.samples)], texts)]
        return ({"benchmark": name, "n_problems": len(problems), "samples": settings.samples,
                 "mean": sum(r["correct"] for r in rows) / len(rows)}, rows)

    rows_file = "reversals.jsonl"

    def analysis_items(self, tokenizer, settings):
        return self.items(tokenizer, settings)[0][:settings.limit], "my notes"

    def analysis_report(self, notes, rollouts, stats, mask, tokenizer, settings):
        return f"reverse: {len(rollouts.responses)} rollouts analysed ({notes})"


@pytest.fixture()
def registered():
    tasks.register(ReverseTask())  # the one line a forker adds to tasks.py
    yield
    del tasks.TASKS["reverse"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_tiny_pair(tmp_path_factory.mktemp("reverse_pair"))


def test_a_new_task_trains_evaluates_and_is_analysed(registered, pair, tmp_path, capsys):
    teacher, student = pair
    distill.main(["--task", "reverse", "--teacher", teacher, "--student", student, "--lr", "1e-3",
                  "--eval-every", "1", "--output-dir", str(tmp_path / "run")])
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [0, 1]  # evaluated before and after the one step
    assert {"eval/reverse/mean@1"} <= set(records[0]) and 0 <= records[1]["eval/reverse/mean@1"] <= 1
    step = records[1]
    # the task's defaults: 2 prompts x 2 rollouts of at most 6 tokens
    assert step["response_tokens"] <= 2 * 2 * 6
    # its per-episode sum over its count: the mean response length, as distill measures it
    assert step["episode/length"] == pytest.approx(step["response_length"])
    # its followed group: one first token per rollout, its shares from the step's selection
    assert step["reverse/first/n"] == 4 and 0 <= step["reverse/first/kept_share"] <= 1
    assert sum(step[f"reverse/first/q{q}_share"] for q in range(1, 5)) == pytest.approx(1)

    out = tmp_path / "eval"
    evaluate.main(["--model", student, "--benchmarks", "reverse", "--max-new-tokens", "6",
                   "--output-dir", str(out)])
    summary = json.load(open(out / "scores.json"))["benchmarks"]["reverse"]
    rows = [json.loads(line) for line in open(out / "reversals.jsonl")]
    assert summary["n_problems"] == 3 and len(rows) == 3
    assert summary["mean"] == sum(r["correct"] for r in rows) / 3
    assert all(r["correct"] == (r["completion"].strip() == reversed_digits(r["problem"])) for r in rows)
    assert "| reverse | 3 | 1 |" in capsys.readouterr().out  # the default table

    analysis.main(["--task", "reverse", "--teacher", teacher, "--student", student, "--prompts", "2",
                   "--samples-per-prompt", "2", "--output-dir", str(tmp_path / "analysis")])
    printed = capsys.readouterr().out
    assert "| Q3 low h, high δ |" in printed
    assert "reverse: 4 rollouts analysed (my notes)" in printed  # the task's own report
    assert (tmp_path / "analysis" / "tokens.html").is_file()


def test_a_flag_the_new_task_does_not_read_is_refused(registered, pair, tmp_path, capsys):
    teacher, student = pair
    with pytest.raises(SystemExit) as exit_:
        distill.main(["--task", "reverse", "--teacher", teacher, "--student", student,
                      "--dataset", "x.jsonl", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err == "error: --dataset does not apply to --task reverse\n"
