"""Agentic OPD on DeepPlanning, end to end on tiny local models and the real data: distill.py trains
on episodes, evaluate.py scores them (a random model near 0, a scripted policy at 1.0), and bad
input gets one line. The data comes from shared/deepplanning/travel next to the repository."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deepplanning as dp
import loading
import rollouts
from deepplanning_data import scripted_plan
from helpers import make_tool_pair

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = Path(REPO).parent / "shared" / "deepplanning" / "travel"
if not DATA.is_dir():
    pytest.skip(f"DeepPlanning data not found at {DATA}", allow_module_level=True)
DB = str(DATA / "database" / "database_en")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A teacher and a student whose tokenizer is a BPE trained on DeepPlanning's own texts."""
    consts = {node.targets[0].id: node.value.value
              for node in ast.parse(open(DATA / "agent" / "prompts.py").read()).body
              if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)}
    queries = json.load(open(DATA / "data" / "travelplanning_query_en.json"))
    texts = [consts["SYSTEM_PROMPT_EN"], open(DATA / "tools" / "tool_schema_en.json").read()]
    return make_tool_pair(tmp_path_factory.mktemp("tool_pair"), texts + [q["query"] for q in queries])


def run(script, *args, cwd):
    return subprocess.run([sys.executable, os.path.join(REPO, script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_two_training_steps_on_episodes(pair, tmp_path):
    teacher, student = pair
    out = tmp_path / "run"
    r = run("distill.py", "--task", "deepplanning", "--teacher", teacher, "--student", student,
            "--data-dir", DB, "--rule", "q3", "--keep", "0.2", "--steps", "2",
            "--prompts-per-step", "1", "--samples-per-prompt", "2", "--max-new-tokens", "6",
            "--max-turns", "2", "--max-total-tokens", "8192", "--micro-batch-size", "2",
            "--output-dir", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [rec["step"] for rec in records] == [1, 2]
    for rec in records:
        # a random model never ends a turn within 6 tokens: one cut turn per episode, undelivered
        assert rec["episode/turns"] == 1 and rec["episode/truncated"] == 1.0
        assert rec["episode/delivered"] == 0 and rec["episode/hard_fraction"] == 0
        assert rec["response_tokens"] == 2 * 6  # only the generated tokens are trained
        assert rec["episode/tokens"] > 3000  # system prompt, 9 tool schemas and the query
        assert rec["kept_tokens"] == 2 * 1  # q3 at 0.2 keeps max(1, ⌊0.2·6⌋) per episode
        assert torch.isfinite(torch.tensor(rec["loss"]))
    assert (out / "checkpoint-000002" / "config.json").is_file()


def test_evaluate_scores_a_random_model_near_zero_and_writes_every_episode(pair, tmp_path):
    _, student = pair
    out = tmp_path / "eval"
    r = run("evaluate.py", "--model", student, "--benchmarks", "deepplanning", "--data-dir", DB,
            "--limit", "2", "--samples", "2", "--temperature", "1.0", "--max-new-tokens", "6",
            "--max-turns", "2", "--output-dir", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.load(open(out / "scores.json"))["benchmarks"]["deepplanning"]
    assert summary["n_problems"] == 2 and summary["samples"] == 2
    assert summary["mean"] == summary["personalized"] == summary["delivered"] == 0.0
    assert summary["truncated"] == 1.0
    episodes = [json.loads(line) for line in open(out / "episodes.jsonl")]
    assert len(episodes) == 4 and all(e["messages"] and e["constraints"] for e in episodes)
    assert [e["task_id"] for e in episodes] == [dp.split_ids("heldout")[0]] * 2 + [dp.split_ids("heldout")[1]] * 2
    assert "| deepplanning | 2 | 2 | 0.0 |" in r.stdout


def test_a_scripted_policy_scores_one_through_the_evaluator(pair, monkeypatch):
    """The evaluator's whole path (prompt, turns, tool calls in the sandbox, plan, scorer) with a
    policy that calls a tool, then writes task 0's plan meeting every hard constraint."""
    _, student = pair
    tokenizer = loading.load_tokenizer(student)
    model = loading.load_model(student, torch.device("cpu"), torch.float32)
    task = dp.load_tasks(DB, ids=[0])[0]
    plan, _ = scripted_plan(dp.Sandbox(task.database_dir, task.id))
    turns = iter(['<tool_call>\n{"name": "search_location", "arguments": {"place_name": '
                  '"Laomendong"}}\n</tool_call>', f"<plan>\n{plan}\n</plan>"])

    def policy(model, prompts, config, pad):
        return [tokenizer(next(turns) + "<|im_end|>", add_special_tokens=False)["input_ids"]]
    monkeypatch.setattr(rollouts, "generate", policy)
    summary, rows = dp.evaluate(model, tokenizer, DB, tasks=[task])
    assert summary["mean"] == summary["personalized"] == summary["delivered"] == 1.0
    assert rows[0]["turns"] == 2 and rows[0]["tool_calls"] == 1
    assert '"latitude"' in rows[0]["messages"][1]["content"]  # the sandbox answered the call


@pytest.mark.parametrize("args,message", [
    (["--task", "deepplanning"], "--task deepplanning needs --data-dir"),
    (["--task", "deepplanning", "--data-dir", "/no/such/folder"], "/no/such/folder"),
    (["--task", "deepplanning", "--data-dir", DB, "--dataset", "x.jsonl"],
     "--dataset does not apply to --task deepplanning"),
    (["--task", "deepplanning", "--data-dir", DB, "--split", "test"], "--split does not apply"),
    (["--max-turns", "3"], "--max-turns does not apply to --task math"),
    # the tiny models hold 16384 positions; an episode may grow to 40960 (the default): refused
    # before anything is generated, not a 34 GB allocation in generate
    (["--task", "deepplanning", "--data-dir", DB], "holds 16384 positions, but this run needs 40960"),
])
def test_bad_agentic_input_one_line_exit_2(pair, tmp_path, args, message):
    teacher, student = pair
    r = run("distill.py", "--teacher", teacher, "--student", student, *args,
            "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_the_quadrant_analysis_runs_on_episodes(pair, tmp_path):
    teacher, student = pair
    out = tmp_path / "analysis"
    r = run("analysis.py", "--teacher", teacher, "--student", student, "--task", "deepplanning",
            "--data-dir", DB,
            "--prompts", "1", "--samples-per-prompt", "2", "--max-new-tokens", "5",
            "--max-turns", "2", "--max-total-tokens", "8192", "--output-dir", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("10 response tokens from 2 rollouts")  # generated tokens only
    assert "| Q3 low h, high δ |" in r.stdout and (out / "tokens.html").is_file()


def test_tokens_html_greys_what_the_student_did_not_generate(pair, monkeypatch):
    import analysis
    teacher_dir, student_dir = pair
    tokenizer = loading.load_tokenizer(student_dir)
    cpu = torch.device("cpu")
    student = loading.load_model(student_dir, cpu, torch.float32).eval()
    teacher = loading.load_model(teacher_dir, cpu, torch.float32).eval()
    task = dp.load_tasks(DB, ids=[0])[0]
    turns = iter(['<tool_call>\n{"name": "search_location", "arguments": {"place_name": '
                  '"Laomendong"}}\n</tool_call>', "<plan>none</plan>"])
    monkeypatch.setattr(rollouts, "generate", lambda model, prompts, config, pad: [
        tokenizer(next(turns) + "<|im_end|>", add_special_tokens=False)["input_ids"]])
    [(_, episode, _)] = dp.play(student, tokenizer, [task])
    batch = rollouts.as_rollouts([episode])
    stats, mask, _ = analysis.statistics(teacher, student, batch, tokenizer)
    page = analysis.tokens_html(batch, stats, mask, tokenizer)
    grey = "".join(__import__("re").findall(r"<span class='q0'>([^<]*)</span>", page))
    assert "latitude" in grey and "search_location" not in grey  # the answer is grey, the call not
    assert page.count("<span class='q0'>") == episode.mask.count(0) + 1  # + the legend's
    assert len(__import__("re").findall(r"<span class='q[1-4]'", page)) == episode.mask.count(1)
