"""sweep.py on the tiny `quick` toy build: every run trains and is scored, the table is the mean and
std of the runs, and bad settings are refused before any run starts."""
import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

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
        for r in runs:  # each run folder holds its own 2 steps and the final score, overall and by part
            records = [json.loads(line) for line in open(out / f"{rule}-{keep:g}-seed{r['seed']}" / "metrics.jsonl")]
            assert [rec["step"] for rec in records] == [1, 2]
            assert records[-1]["eval/toy/mean@1"] == r["accuracy"]
            assert r["parts"] == {part: records[-1][f"eval/toy/mean@1/{part}"] for part in sweep.PARTS}
            assert r["parts"] == {part: r["curve"][-1][part] for part in sweep.PARTS}
            assert r["tokens_trained"] == sum(rec["kept_tokens"] for rec in records)
        for part in sweep.PARTS:  # this row's per-part columns: the mean and std of its runs' parts
            assert row[part] == pytest.approx(statistics.mean(100 * r["parts"][part] for r in runs))
            assert row[f"{part}_std"] == pytest.approx(statistics.stdev(100 * r["parts"][part] for r in runs))
        assert (f"| {rule} | {keep:g} | {row['accuracy']:.1f} ± {row['std']:.1f} | "
                + " | ".join(f"{row[part]:.1f} ± {row[part + '_std']:.1f}" for part in sweep.PARTS)
                + " |") in open(out / "table.md").read()
    assert saved["rows"] == rows
    # step 1 of the same seed samples the same rollouts under both rules; soft-or keeps about half
    first = lambda rule, seed: json.loads(open(out / f"{rule}-seed{seed}" / "metrics.jsonl").readline())  # noqa: E731
    for seed in (0, 1):
        a, s = first("all-1", seed), first("soft-or-0.5", seed)
        assert a["response_tokens"] == s["response_tokens"] == a["kept_tokens"]
        assert s["kept_tokens"] < a["kept_tokens"]
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


def test_every_summary_row_is_the_mean_and_std_of_its_own_runs():
    """The tiny build scores 0% everywhere, so the sweep above cannot tell one row's runs from
    another's: here every run has its own figures, and every column of every row is checked."""
    gen = torch.Generator().manual_seed(0)
    configs = [("all", 1.0), ("soft-or", 0.5), ("q3", 0.2), ("entropy", 0.5)]
    runs = []
    for rule, keep in configs:
        for seed in range(3):
            u = torch.rand(5, generator=gen).tolist()  # accuracy, two parts, tokens, memory
            parts = {} if rule == "entropy" else dict(zip(sweep.PARTS, u[1:3]))  # no part scores
            runs.append({"rule": rule, "keep": keep, "seed": seed, "accuracy": u[0], "parts": parts,
                         "tokens_trained": int(1000 * u[3]), "peak_memory_bytes": int(2**30 * u[4])})
    rows = sweep.summarize(runs, configs)
    assert [(r["rule"], r["keep"]) for r in rows] == configs
    table = sweep.markdown(rows, {"mean": 1.0}, steps=2, seeds=[0, 1, 2])
    for row, (rule, keep) in zip(rows, configs):
        mine = [r for r in runs if (r["rule"], r["keep"]) == (rule, keep)]
        acc = [100 * r["accuracy"] for r in mine]
        assert row["accuracy"] == pytest.approx(statistics.mean(acc))
        assert row["std"] == pytest.approx(statistics.stdev(acc))
        assert row["tokens_trained"] == pytest.approx(statistics.mean(r["tokens_trained"] for r in mine))
        assert row["peak_memory_gib"] == max(r["peak_memory_bytes"] for r in mine) / 2**30
        cells = []
        for part in sweep.PARTS:
            if rule == "entropy":  # no run scored the parts: no column, a dash in the table
                assert part not in row and f"{part}_std" not in row
                cells.append("-")
                continue
            scores = [100 * r["parts"][part] for r in mine]
            assert row[part] == pytest.approx(statistics.mean(scores))
            assert row[f"{part}_std"] == pytest.approx(statistics.stdev(scores))
            cells.append(f"{row[part]:.1f} ± {row[part + '_std']:.1f}")
        line = (f"| {rule} | {keep:g} | {row['accuracy']:.1f} ± {row['std']:.1f} | " + " | ".join(cells)
                + f" | {row['tokens_trained']:.0f} | {row['peak_memory_gib']:.2f} |")
        assert line in table.splitlines()


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
