"""evaluate.py: box extraction, math-verify equivalence, the mean@k arithmetic, the scoring path on
completions with known verdicts, and the CLI end to end on a tiny local Qwen3."""
import json
import math
import os
import subprocess
import sys
import threading

import pytest

import loading
import evaluate
import math_task
import grading
from task_api import Settings
from rollouts import Rollouts
from helpers import make_tiny_pair, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------
# Extraction


@pytest.mark.parametrize("text, expected", [
    (r"so $\boxed{\frac{1}{2}}$", r"\frac{1}{2}"),                     # nested braces
    (r"\boxed{x^{2^{3}}} + 1", r"x^{2^{3}}"),                          # deeper nesting
    (r"first \boxed{1}, then \boxed{2}.", "2"),                         # several boxes: the last
    (r"\boxed 5.", "5"),                                                # MATH's bare form
    (r"\fbox{7}", "7"),
    (r"\boxed {3}", "3"),
    (r"\boxed{\left\{ x \right.}", r"\left\{ x \right."),               # escaped braces don't nest
    (r"\boxed{4} and then \boxed{5", "4"),                              # an unclosed box is skipped
    (r"\boxed{4} ... within \boxed{}.", "4"),                           # an empty box is skipped
    ("no answer here", None),
    (r"\boxed{", None),
])
def test_extract_boxed(text, expected):
    assert grading.extract_boxed(text) == expected


def test_box_inside_thinking_is_a_draft():
    assert grading.is_correct(r"<think>maybe \boxed{2}</think> so \boxed{3}", "3")
    assert not grading.is_correct(r"<think>maybe \boxed{3}</think> I give up", "3")


# ---------------------------------------------------------------------------------------------
# Equivalence: what math-verify decides for an extracted answer against a gold answer

ACCEPT = [  # (gold, boxed answer in the completion)
    (r"\frac{1}{2}", "0.5"), (r"\frac{1}{2}", r"\frac12"), (r"\frac{1}{2}", "1/2"),
    (r"\frac{1}{2}", r"\dfrac{1}{2}"), ("10", r"10\%"), (r"10\%", "10"), ("3", "x=3"),
    ("5", r"5\text{ cm}"), ("90", r"90^\circ"), (r"\sqrt{8}", r"2\sqrt{2}"), ("1000", "1,000"),
    ("(x+1)^2", "x^2+2x+1"), (r"\{1,2\}", r"\{2,1\}"), (r"\text{(C)}", "C"), ("33", "033"),
    (r"(3,\frac{\pi}{2})", r"\left( 3, \frac{\pi}{2} \right)"),
]
REJECT = [
    ("(1,2]", "(1,2)"), ("3", "-3"), ("4", "3"), (r"\frac13", "0.333"), ("(2,1)", "(1,2)"),
    ("3.14159", r"\pi"), ("x+1", "x-1"),
]


@pytest.mark.parametrize("gold, answer", ACCEPT)
def test_math_verify_accepts(gold, answer):
    assert grading.is_correct(f"The answer is $\\boxed{{{answer}}}$.", gold)


@pytest.mark.parametrize("gold, answer", REJECT)
def test_math_verify_rejects(gold, answer):
    assert not grading.is_correct(f"The answer is $\\boxed{{{answer}}}$.", gold)


def test_no_box_is_wrong_even_with_the_right_number():
    assert not grading.is_correct("The answer is 3.", "3")


def test_grading_works_outside_the_main_thread():
    # math-verify's default timeout uses signal.alarm, which raises outside the main thread
    out = {}
    thread = threading.Thread(target=lambda: out.update(ok=grading.is_correct(r"\boxed{0.5}",
                                                                               r"\frac{1}{2}")))
    thread.start()
    thread.join()
    assert out == {"ok": True}


# ---------------------------------------------------------------------------------------------
# Arithmetic and the scoring path


def test_mean_at_k_on_a_fixed_matrix():
    verdicts = [[1, 0, 1, 1],
                [0, 0, 1, 0],
                [0, 0, 0, 0]]  # per-sample accuracies 1/3, 0, 2/3, 1/3
    m = math_task.mean_at_k(verdicts)
    assert m["mean"] == pytest.approx(1 / 3)
    assert m["std"] == pytest.approx(math.sqrt((0 + 1 / 9 + 1 / 9 + 0) / 4))  # population std
    assert m["pass_at_k"] == pytest.approx(2 / 3)
    assert math_task.mean_at_k([[1], [0]]) == {"mean": 0.5, "std": 0.0, "pass_at_k": 0.5}


def test_the_closing_line_names_its_first_evaluation():
    key = "eval/toy/mean@1"
    history = [{"step": 0, key: 0.5, f"{key}/misconception": 0.0}, {"step": 5, "loss": 1.0},
               {"step": 10, key: 0.75, f"{key}/misconception": 0.5}]
    assert evaluate.before_and_after(history) == (
        f"held-out accuracy ({key}): before 50.0% -> after 75.0% (misconception 0.0% -> 50.0%)\n")
    # --no-eval-before: the first evaluation is after step 10, not before training
    assert evaluate.before_and_after(history[1:] + [{"step": 20, key: 0.8}]).startswith(
        f"held-out accuracy ({key}): at step 10 75.0% -> after 80.0%")
    assert evaluate.before_and_after(history[:2]) is None


PROBLEMS = [{"problem": "p0", "answer": r"\frac{1}{2}"}, {"problem": "p1", "answer": "7"}]
COMPLETIONS = [r"so \boxed{0.5}", r"\boxed{1/3}",          # problem 0: right, wrong
               r"\boxed{7} or \boxed{8}", "seven"]         # problem 1: wrong (last box), no box
VERDICTS = [[1, 0], [0, 0]]


def test_score_on_completions_with_known_verdicts():
    summary, rows = math_task.score("demo", PROBLEMS, COMPLETIONS, [4, 6, 8, 10],
                                   [False, False, False, True], samples=2)
    assert [r["correct"] for r in rows] == [bool(v) for row in VERDICTS for v in row]
    assert [(r["index"], r["sample"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r["extracted"] for r in rows] == ["0.5", "1/3", "8", None]
    assert summary == {"benchmark": "demo", "n_problems": 2, "samples": 2,
                       **math_task.mean_at_k(VERDICTS), "no_box": 0.25, "truncated": 0.25,
                       "response_length": 7.0}
    assert summary["mean"] == 0.25 and summary["pass_at_k"] == 0.5 and summary["std"] == 0.25


def test_evaluate_benchmark_grades_what_sample_returns(tmp_path, monkeypatch):
    """The whole function with sampling replaced by fixed token ids: prompts, decoding, order."""
    _, student = make_tiny_pair(tmp_path)
    tokenizer = loading.load_tokenizer(student)
    model = loading.load_model(student, loading.resolve_device("cpu")[0], None)
    seen = {}

    def fake_sample(model, tokenizer, prompts, samples_per_prompt, *args, **kwargs):
        seen["prompts"] = [tokenizer.decode(p) for p in prompts]
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in COMPLETIONS]
        ids = [r + [tokenizer.eos_token_id] for r in ids[:3]] + ids[3:]  # the last one: cut off
        return Rollouts(prompts=[p for p in prompts for _ in range(samples_per_prompt)],
                                responses=ids)

    monkeypatch.setattr(math_task, "sample", fake_sample)
    data = write_jsonl(tmp_path / "mini.jsonl", PROBLEMS)
    summary, rows = evaluate.evaluate_benchmark(model, tokenizer, "mini", Settings(samples=2, temperature=1.0),
                                                data=data, return_rows=True)
    assert len(seen["prompts"]) == 2 and loading.INSTRUCTION in seen["prompts"][0]
    assert "p0" in seen["prompts"][0] and "<|im_start|>assistant" in seen["prompts"][0]
    assert [r["completion"] for r in rows] == COMPLETIONS  # EOS stripped by the decode
    assert summary["mean"] == 0.25 and summary["pass_at_k"] == 0.5 and summary["no_box"] == 0.25
    assert summary["truncated"] == 0.25
    assert summary["response_length"] == (sum(len(c) for c in COMPLETIONS) + 3) / 4


def test_gold_from_the_last_box_of_the_solution(tmp_path):
    path = write_jsonl(tmp_path / "sol.jsonl", [
        {"question": "q", "solution": r"First \boxed{1}, finally $\boxed{\frac{3}{4}}$."}])
    assert math_task.load_benchmark("sol", path) == [{"problem": "q", "field": "question",
                                                      "answer": r"\frac{3}{4}"}]
    # a row without the answer another row has falls back to its own solution; ints become text
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"problem": "a", "solution": r"\boxed{2}"},
                                                  {"problem": "b", "solution": "-", "answer": 4}])
    assert [p["answer"] for p in math_task.load_benchmark("mixed", path)] == ["2", "4"]
    assert len(math_task.load_benchmark("mixed", path, limit=1)) == 1


# ---------------------------------------------------------------------------------------------
# The CLI


def run_cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


def test_cli_end_to_end_on_a_tiny_model(tmp_path):
    _, student = make_tiny_pair(tmp_path)
    problems = [{"problem": f"What is {a} + {a}?", "solution": f"{a}+{a}=\\boxed{{{2 * a}}}",
                 "answer": str(2 * a)} for a in (1, 2, 3)]  # the MATH-500 schema
    data = write_jsonl(tmp_path / "math500.jsonl", problems)
    out = tmp_path / "out"
    proc = run_cli("--model", student, "--benchmarks", "math500", "--data", f"math500={data}",
                   "--samples", "2", "--temperature", "1.0", "--max-new-tokens", "8",
                   "--batch-size", "4", "--output-dir", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "| math500 | 3 | 2 |" in proc.stdout  # the markdown table
    scores = json.loads((out / "scores.json").read_text())
    summary = scores["benchmarks"]["math500"]
    assert summary["n_problems"] == 3 and summary["samples"] == 2
    for key in ("mean", "std", "pass_at_k", "no_box", "truncated"):
        assert 0.0 <= summary[key] <= 1.0
    assert 1 <= summary["response_length"] <= 8
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 2
    assert {r["gold"] for r in rows} == {"2", "4", "6"}
    # the summary is the arithmetic of the rows, whatever a random model wrote
    verdicts = [[int(r["correct"]) for r in rows if r["index"] == i] for i in range(3)]
    for key, value in math_task.mean_at_k(verdicts).items():
        assert summary[key] == pytest.approx(value)
    assert summary["no_box"] == pytest.approx(sum(r["extracted"] is None for r in rows) / 6)


def test_cli_unknown_benchmark_exits_2_with_one_line(tmp_path):
    proc = run_cli("--model", "unused", "--benchmarks", "math5000", "--output-dir",
                   str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line, no traceback
    assert "unknown benchmark 'math5000'" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("rows, message", [
    (None, "does not exist"),
    ([{"text": "What is 1+1?", "answer": "2"}], "no problem field"),
    ([{"problem": "What is 1+1?", "hint": "2"}], "no answer field"),
])
def test_cli_bad_data_exits_2_before_loading_a_model(tmp_path, capsys, rows, message):
    path = tmp_path / "bad.jsonl"
    if rows is not None:
        write_jsonl(path, rows)
    with pytest.raises(SystemExit) as exit_info:  # in-process: same main(), no interpreter start
        evaluate.main(["--model", "not-loaded", "--benchmarks", "mine", "--data", f"mine={path}",
                       "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_flag_no_chosen_benchmark_reads(capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", "m", "--benchmarks", "math500", "--max-turns", "3"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "--max-turns does not apply to --benchmarks math500" in err


def test_cli_refuses_greedy_with_several_samples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", "m", "--samples", "4", "--temperature", "0"])
    assert exit_info.value.code == 2 and "greedy" in capsys.readouterr().err


def test_toy_heldout_solutions_grade_as_correct():
    toy = pytest.importorskip("toy")
    if not hasattr(toy, "split_path") or not os.path.isfile(toy.split_path("heldout")):
        pytest.skip("the toy cache is not built (run `python toy.py`)")
    problems = math_task.load_benchmark("toy", limit=20)
    rows = [json.loads(line) for line in open(toy.split_path("heldout"))][:20]
    assert [p["answer"] for p in problems] == [r["answer"] for r in rows]
    assert all(grading.is_correct(r["solution"], r["answer"]) for r in rows)
