"""sweep.py on the tiny `quick` toy build: every run trains and is scored, the table is the mean and
std of the runs, and bad settings are refused before any run starts."""
import json
import os
import statistics
import subprocess
import sys

import pytest

import sweep
import toy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("toy"))
    teacher, student = toy.build(cache, seed=0, quick=True)
    out = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIP_TOY_CACHE", cache)  # the train and held-out splits of this build
        rows = sweep.sweep(teacher, student, str(out), steps=2, seeds=[0, 1],
                           configs=[("all", 1.0), ("soft-or", 0.5)], curve_every=1)
    return rows, out


def test_sweep_scores_every_run_and_summarises_over_seeds(result):
    rows, out = result
    saved = json.load(open(out / "results.json"))
    assert [(r["rule"], r["keep"], r["seed"]) for r in saved["runs"]] == [
        ("all", 1.0, 0), ("all", 1.0, 1), ("soft-or", 0.5, 0), ("soft-or", 0.5, 1)]
    for rule, keep in [("all", 1.0), ("soft-or", 0.5)]:
        runs = [r for r in saved["runs"] if (r["rule"], r["keep"]) == (rule, keep)]
        row = next(r for r in rows if (r["rule"], r["keep"]) == (rule, keep))
        acc = [100 * r["accuracy"] for r in runs]
        assert row["accuracy"] == pytest.approx(statistics.mean(acc))
        assert row["std"] == pytest.approx(statistics.stdev(acc))
        for r in runs:  # each run folder holds its own 2 steps and the final score
            records = [json.loads(line) for line in open(out / f"{rule}-{keep:g}-seed{r['seed']}" / "metrics.jsonl")]
            assert [rec["step"] for rec in records] == [1, 2]
            assert records[-1]["eval/toy/mean@1"] == r["accuracy"]
            assert r["tokens_trained"] == sum(rec["kept_tokens"] for rec in records)
    # step 1 of the same seed samples the same rollouts under both rules; soft-or keeps about half
    first = lambda rule, seed: json.loads(open(out / f"{rule}-seed{seed}" / "metrics.jsonl").readline())  # noqa: E731
    for seed in (0, 1):
        a, s = first("all-1", seed), first("soft-or-0.5", seed)
        assert a["response_tokens"] == s["response_tokens"] == a["kept_tokens"]
        assert s["kept_tokens"] < a["kept_tokens"]
        for part in sweep.PARTS:  # the per-part columns: each run's last evaluation, by part
            assert row[part] == pytest.approx(statistics.mean(100 * r["parts"][part] for r in runs))
            assert [r["parts"][part] for r in runs] == [r["curve"][-1][part] for r in runs]
    saved_runs = {(r["rule"], r["seed"]): r for r in saved["runs"]}
    # all@1 is scored every curve_every=1 step (the curves), soft-or@0.5 only at the end
    assert [c["step"] for c in saved_runs[("all", 0)]["curve"]] == [1, 2]
    assert [c["step"] for c in saved_runs[("soft-or", 0)]["curve"]] == [2]
    assert set(saved["start"]) == {"mean", *sweep.PARTS}  # the student before, overall and by part
    table = open(out / "table.md").read()
    assert "| soft-or | 0.5 |" in table and "seeds 0, 1" in table and "misconception %" in table
    drawn = sweep.plot_sweep(rows, {"mean": 50.0}, out / "again.png")
    assert drawn == {f"{r['rule']}@{r['keep']:g}": r["accuracy"] for r in rows}
    assert (out / "sweep.png").is_file() and (out / "misconception_curves.png").is_file()


@pytest.mark.parametrize("flags, message", [
    (["--configs", "nope@0.5"], "unknown rule 'nope'"),
    (["--configs", "entropy@1.5"], "keep must be in (0, 1]"),
    (["--configs", "entropy"], "is not RULE@KEEP"),
    (["--seeds", "a,b"], "--seeds must be comma-separated integers"),
    (["--steps", "0"], "--steps and --curve-every must be at least 1"),
    (["--curve-every", "0"], "--steps and --curve-every must be at least 1"),
])
def test_bad_settings_get_one_line_and_status_2(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        sweep.main(["--output-dir", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_refuses_a_folder_that_holds_a_sweep(result):
    r = subprocess.run([sys.executable, os.path.join(REPO, "sweep.py"), "--output-dir",
                        str(result[1])], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "already holds a sweep" in r.stderr
