"""The quadrant analysis (`python analysis.py`): tables against direct computation, and its files."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import analysis
import loading
import math_task
import quadrant_inputs
import tip
import toy
from helpers import make_tiny_pair, write_jsonl
from rollouts import Rollouts, collate, pad_id

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fixed_batch():
    mask = torch.tensor([[True, True, True, True, False], [True, True, True, True, True]])
    entropy = torch.tensor([[0.1, 2.0, 0.2, 1.5, 9.0], [0.05, 1.8, 0.3, 0.4, 2.2]])
    rkl = torch.tensor([[3.0, 0.1, 0.05, 2.0, 9.0], [0.01, 1.0, 2.5, 0.02, 0.3]])
    flat = {"entropy": entropy[mask], "entropy_norm": entropy[mask] / 5, "reverse_kl": rkl[mask],
            "forward_kl": 2 * rkl[mask]}
    return flat, mask


def test_quadrant_table_matches_direct_computation():
    flat, mask = fixed_batch()
    out, (th, td) = quadrant_inputs.rule_inputs(flat, mask, h_threshold=0.5, d_threshold=0.5,
                                                return_thresholds=True)
    rows = analysis.quadrant_table(out, mask)
    stats = tip.to_padded(flat, mask)
    h_hat = tip.normalize_entropy(stats["entropy"], mask)
    d_hat = tip.normalize_divergence(stats["reverse_kl"], mask)
    high_h, high_d = (h_hat > 0.5) & mask, (d_hat > 0.5) & mask
    direct = {1: high_h & high_d, 2: high_h & ~high_d & mask, 3: ~high_h & high_d & mask,
              4: ~high_h & ~high_d & mask}
    total = stats["reverse_kl"][mask].sum()
    for q, row in zip(range(1, 5), rows):
        sel = direct[q]
        assert row["share"] == pytest.approx(sel.sum().item() / 9)
        assert row["kl_share"] == pytest.approx((stats["reverse_kl"][sel].sum() / total).item())
        if sel.any():
            assert row["mean_kl"] == pytest.approx(stats["reverse_kl"][sel].mean().item())
            assert row["mean_h"] == pytest.approx(stats["entropy_norm"][sel].mean().item())
    assert (th, td) == (0.5, 0.5) and torch.equal(out["quadrant"] > 0, mask)


def test_coverage_table_matches_direct_computation():
    flat, mask = fixed_batch()
    stats = quadrant_inputs.rule_inputs(flat, mask)
    rows = analysis.coverage_table(stats, mask, ["soft-or", "entropy-topk"], [0.5], seed=0)
    import selection
    for row in rows:
        kept, _ = selection.select(row["rule"], stats, mask, 0.5)
        assert row["kl_kept"] == pytest.approx((stats["reverse_kl"][kept].sum()
                                                / stats["reverse_kl"][mask].sum()).item())
        for q in range(1, 5):
            in_q = stats["quadrant"] == q
            assert row[f"q{q}_kept"] == pytest.approx(((kept & in_q).sum() / max(in_q.sum(), 1)).item())


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    teacher, student = make_tiny_pair(root)
    data = write_jsonl(root / "p.jsonl", [{"problem": f"{a}+{a}=?"} for a in range(5)])
    out = root / "out"
    r = subprocess.run([sys.executable, os.path.join(REPO, "analysis.py"), "--teacher", teacher,
                        "--student", student, "--dataset", data, "--prompts", "3",
                        "--samples-per-prompt", "2", "--max-new-tokens", "12", "--output-dir", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r, out


def test_analysis_cli_prints_tables_and_writes_files(cli_run):
    r, out = cli_run
    assert "| Q3 low h, high δ |" in r.stdout and "| soft-or | 0.500 |" in r.stdout
    from PIL import Image
    for name in ("quadrants.png", "coverage.png"):
        Image.open(out / name).verify()  # a complete PNG (what is drawn: the tests below)
    page = (out / "tokens.html").read_text()
    assert "<script" not in page and "http" not in page  # offline: nothing external
    # one coloured span per response token of the rollouts shown (6 rollouts, ≤ 12 tokens each)
    spans = re.findall(r"<span class='q[1-4]'", page)
    assert 6 <= len(spans) <= 6 * 12
    n_tokens = int(r.stdout.split(" response tokens")[0].split()[-1])
    assert len(spans) == n_tokens  # all 6 rollouts are shown, so every token is a span


def test_plots_draw_the_data(tmp_path):
    flat, mask = fixed_batch()
    stats, thresholds = quadrant_inputs.rule_inputs(flat, mask, return_thresholds=True)
    drawn = analysis.plot_quadrants(stats, mask, thresholds, tmp_path / "q.png")
    assert drawn == {q: int(((stats["quadrant"] == q) & mask).sum()) for q in range(1, 5)}
    rows = analysis.coverage_table(stats, mask, ["soft-or", "q3"], [0.5, 0.2])
    bars = analysis.plot_coverage(rows, tmp_path / "c.png")
    assert bars == {q: pytest.approx([r[f"q{q}_kept"] for r in rows]) for q in range(1, 5)}


def test_plot_handles_runs_with_and_without_eval(tmp_path):
    base = {"loss": 0.5, "reverse_kl": 0.4, **{f"q{q}_kept_share": 0.25 for q in range(1, 5)}}
    for name, evals in (("a", False), ("b", True)):
        rows = [{"step": s, **base} for s in (1, 2, 3)]
        if evals:
            rows = [{"step": 0, "eval/toy/mean@1": 0.3}] + rows
            rows[-1]["eval/toy/mean@1"] = 0.5
        write_jsonl(tmp_path / name / "metrics.jsonl", rows) if os.makedirs(tmp_path / name) is None else None
    r = subprocess.run([sys.executable, os.path.join(REPO, "analysis.py"), "plot",
                        str(tmp_path / "a"), "--output", str(tmp_path / "one.png")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and (tmp_path / "one.png").is_file(), r.stderr
    drawn = analysis.plot_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "two.png")
    loss = "loss (kept tokens)"
    assert drawn[(loss, "a")] == drawn[(loss, "b")] == ([1, 2, 3], [0.5, 0.5, 0.5])
    assert drawn[("evaluation score", "b toy/mean@1")] == ([0, 3], [0.3, 0.5])
    assert not any(label.startswith("a ") for title, label in drawn if title == "evaluation score")
    assert not any(title.startswith("followed") for title, _ in drawn)  # no group: no second row

    carry = [{"step": s, **base, "h_threshold": 0.02, "toy/carry/n": 5, "toy/carry/h_hat": 0.01 * s,
              "toy/carry/kept_share": 0.2 * s, **{f"toy/carry/q{q}_share": (q == 3) * 0.9 + 0.025
                                                  for q in range(1, 5)}} for s in (1, 2, 3)]
    write_jsonl(tmp_path / "c" / "metrics.jsonl", carry) if os.makedirs(tmp_path / "c") is None else None
    drawn = analysis.plot_runs([tmp_path / "a", tmp_path / "c"], tmp_path / "three.png")
    assert drawn[("followed tokens: share in each quadrant", "c toy/carry Q3")] == ([1, 2, 3], [0.925] * 3)
    assert drawn[("followed tokens: share the rule kept", "c toy/carry")] == ([1, 2, 3], pytest.approx([0.2, 0.4, 0.6]))
    ratio = drawn[("followed tokens: mean ĥ / the step's ĥ threshold (< 1: low entropy)", "c toy/carry")]
    assert ratio == ([1, 2, 3], pytest.approx([0.5, 1.0, 1.5]))


def test_bad_input(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(REPO, "analysis.py"), "plot", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "holds no metrics.jsonl" in r.stderr and "Traceback" not in r.stderr


def test_analysis_refuses_a_non_writable_output_dir(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = subprocess.run([sys.executable, os.path.join(REPO, "analysis.py"), "--output-dir",
                        str(tmp_path / "afile" / "out")], capture_output=True, text=True)
    assert r.returncode == 2 and "is not writable" in r.stderr and "Traceback" not in r.stderr


def test_first_wrong_quadrants_finds_the_first_departure_from_the_reference():
    """Wrong rollouts are counted at their first token that differs from the worked solution;
    right ones are skipped; parts are counted apart (the toy's misconception / other)."""
    import toy
    from rollouts import Rollouts, collate
    tok = toy.make_tokenizer()
    records = [toy.make_item(478, 657), toy.make_item(123, 456)]  # misconception, other
    assert [r["part"] for r in records] == ["misconception", "other"]
    ids = lambda text: tok(text + tok.eos_token)["input_ids"]  # noqa: E731
    responses = [ids(toy.make_item(478, 657, misconception=True)["solution"]),  # dropped carry
                 ids(records[0]["solution"]),                                   # right
                 ids(records[1]["solution"].replace("2+5+0=07", "2+5+0=08").replace("579", "589")),
                 ids(records[1]["solution"].replace("{579}", "{679}"))]         # read back wrong
    prompts = [tok(loading.render_prompt(tok, r["problem"], "problem"))["input_ids"] for r in records
               for _ in range(2)]
    rollouts = Rollouts(prompts, responses)
    _, _, mask = collate(prompts, responses, tok.pad_token_id)  # (4, L)
    quadrant = torch.zeros(mask.shape, dtype=torch.long)  # (4, L): quadrant = response index % 4 + 1
    for b in range(4):
        cols = mask[b].nonzero().flatten()
        quadrant[b, cols] = torch.arange(len(cols)) % 4 + 1
    counts = math_task.first_wrong_quadrants(rollouts, {"quadrant": quadrant}, mask, tok, records, 2)
    # Rollout 0 departs at index 22 (the carry of line 3) -> Q3; rollout 2 at index 16 (the sum's
    # units digit of line 2) -> Q1; rollout 3 at the boxed answer's first digit, index 34 -> Q3.
    first = [22, 16, 34]
    assert [toy.make_item(478, 657)["solution"][22], records[1]["solution"][16],
            records[1]["solution"][34]] == ["1", "7", "5"]
    assert counts == {"all": [1, 0, 2, 0], "misconception": [0, 0, 1, 0], "other": [1, 0, 1, 0]}
    assert [j % 4 + 1 for j in first] == [3, 1, 3]


def test_first_wrong_quadrants_grades_with_math_verify(tmp_path):
    """A right answer in another form (\\frac12 for \\frac{1}{2}, 0.5) is right, as evaluate.py
    grades it: only the rollout that boxes 1/3 is wrong. (A `[^{}]*` regex and string equality
    counted the three right ones as wrong too.)"""
    from helpers import make_tool_tokenizer
    from rollouts import Rollouts, collate
    answers = ["\\boxed{\\frac{1}{2}}", "so \\boxed{\\frac12}", "\\boxed{0.5}", "\\boxed{\\frac{1}{3}}"]
    record = {"problem": "Half of one?", "answer": "\\frac{1}{2}", "solution": "It is \\boxed{\\frac{1}{2}}"}
    tok = make_tool_tokenizer([record["solution"], *answers] * 20, vocab_size=400)
    prompts = [tok("Half of one?")["input_ids"]] * 4
    responses = [tok(a + tok.eos_token)["input_ids"] for a in answers]
    _, _, mask = collate(prompts, responses, tok.pad_token_id)
    quadrant = torch.where(mask, 3, 0)  # (4, L): every response position in Q3
    counts = math_task.first_wrong_quadrants(Rollouts(prompts, responses), {"quadrant": quadrant},
                                            mask, tok, [record], 4)
    assert counts == {"all": [0, 0, 1, 0]}


def test_the_shipped_pair_puts_the_misconception_in_q3():
    """The README's claim, pinned on data/toy_pair/sample.json (256 rollouts the shipped student
    sampled when it was shipped): Q3 holds 66.6% of their reverse-KL mass (>= 25%, the toy's
    point), and the planted carry token sits in Q3, its median ĥ far below the threshold."""
    sample = json.load(open(os.path.join(toy.SHIPPED, "sample.json")))
    rollouts = Rollouts(sample["prompts"], sample["responses"])
    tok = toy.make_tokenizer()
    teacher, student = (loading.load_model(os.path.join(toy.SHIPPED, who), torch.device("cpu"),
                                           torch.float32).eval() for who in ("teacher", "student"))
    stats, mask, thresholds = analysis.statistics(teacher, student, rollouts, tok)
    q3 = analysis.quadrant_table(stats, mask)[2]
    assert q3["kl_share"] == pytest.approx(0.666, abs=0.01) and q3["kl_share"] >= 0.25
    marked = collate(rollouts.prompts, rollouts.responses, pad_id(tok),
                     toy.carry_flags(tok, rollouts))[2] & mask
    carry = analysis.followed_row("toy/carry", stats, mask, marked, thresholds)
    assert carry["n"] > 100 and carry["q3"] > 0.9 and carry["h_ratio"] <= 0.5
