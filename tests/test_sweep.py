"""sweep.py: the interval and paired-difference arithmetic against hand-computed values, the
verdicts and artifact flags they feed, and real sweeps on the tiny `quick` toy build: every run is
a `python distill.py` process whose row matches its own metrics, a killed sweep resumes without
re-running finished rows, bad settings are refused before anything runs."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

import sweep
import toy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def row(rule, keep, seed, acc, mis=0.0, other=0.0, flag=None):
    return {"rule": rule, "keep": keep, "seed": seed, "accuracy": acc, "misconception": mis,
            "other": other, "flag": flag, "tokens_trained": 100}


def test_mean_ci_is_the_t_interval_by_hand():
    # 1..5: mean 3, sample sd sqrt(2.5) = 1.58114, t(0.975, 4 dof) = 2.77645 (a t table)
    m, h = sweep.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert m == 3.0 and h == pytest.approx(2.77645 * 1.58114 / math.sqrt(5), rel=1e-5)
    assert h == pytest.approx(1.96324, rel=1e-5)
    m, h = sweep.mean_ci([7.0])
    assert m == 7.0 and math.isnan(h)


def test_paired_difference_uses_the_same_seeds_and_skips_flagged_runs():
    rows = [row("all", 1.0, s, a) for s, a in [(0, 40.0), (1, 50.0), (2, 45.0), (3, 10.0)]]
    rows += [row("q3", 0.1, s, a) for s, a in [(0, 41.0), (1, 53.0), (2, 47.0)]]  # no seed 3
    rows += [row("q3", 0.1, 4, 99.0)]  # a seed the baseline lacks: unpaired, left out
    rows += [row("all", 1.0, 5, 0.0, flag="length collapsed"), row("q3", 0.1, 5, 90.0)]
    m, h, n = sweep.paired(rows, ("q3", 0.1), ("all", 1.0), "accuracy")
    # differences 1, 3, 2: mean 2, sd 1, t(0.975, 2 dof) = 4.30265
    assert n == 3 and m == pytest.approx(2.0) and h == pytest.approx(4.30265 / math.sqrt(3), rel=1e-5)
    entry = sweep.summarize(rows, [("all", 1.0), ("q3", 0.1)])[1]
    assert entry["n"] == 5 and entry["accuracy_vs_all"] == pytest.approx((m, h))
    assert entry["accuracy"][0] == pytest.approx((41 + 53 + 47 + 99 + 90) / 5)
    flagged = sweep.summarize(rows, [("all", 1.0)])[0]
    assert flagged["n"] == 4 and flagged["flagged"] == ["seed 5: length collapsed, accuracy 0.0%"]


def test_verdicts_follow_the_intervals():
    assert sweep.verdict(0.5, 3.0) == "holds" and sweep.verdict(-3.0, -0.5) == "fails"
    assert sweep.verdict(-1.0, 2.0) == "cannot tell"
    assert sweep.verdict(-1.5, 1.0, threshold=-2.0) == "holds"  # within the margin
    seeds = range(5)
    rows = [row("all", 1.0, s, 50.0 + s) for s in seeds]
    rows += [row("entropy", 0.5, s, 50.0 + s + 0.1 * (s % 2)) for s in seeds]  # equal: matches
    rows += [row("soft-or", 0.5, s, 55.0 + s + 0.2 * (s % 2)) for s in seeds]  # clearly better
    rows += [row("soft-or-bottom", 0.5, s, 1.0 + s * 0.1) for s in seeds]  # clearly worst
    rows += [row("q3", 0.1, s, 50.0 + (10 if s % 2 else -10)) for s in seeds]  # too noisy
    configs = [("all", 1.0), ("entropy", 0.5), ("soft-or", 0.5), ("soft-or-bottom", 0.5), ("q3", 0.1)]
    found = sweep.verdicts(rows, configs)
    assert found["a"][1] == "holds" and found["b"][1] == "holds" and found["d"][1] == "holds"
    assert found["c"][1] == "cannot tell"
    assert len(found["b"][2]) == 1 and "soft-or@0.5 − entropy@0.5 on accuracy: +5.0 [+5.0, +5.1] (5 seeds)" == found["b"][2][0][1]
    rows += [row("divergence", 0.2, s, 0.5) for s in seeds]  # below soft-or-bottom: (d) fails
    assert sweep.verdicts(rows, configs + [("divergence", 0.2)])["d"][1] == "fails"


def test_a_rule_whose_runs_all_broke_is_worse_by_a_sign_test():
    seeds = range(5)
    good = [row("all", 1.0, s, 50.0 + s) for s in seeds]
    bad = [row("soft-or-bottom", 0.5, s, 0.0, flag="length exploded") for s in seeds]
    a, b = ("all", 1.0), ("soft-or-bottom", 0.5)
    found, text = sweep.claim_worse(good + bad, a, b)
    assert found == "holds" and "alone broke on 5 of the 5 seeds" in text and "P = 0.031" in text
    assert sweep.claim_worse(good[:4] + bad[:4], a, b)[0] == "cannot tell"  # 0.5^4 = 0.0625
    both = good[:4] + [row("all", 1.0, 4, 0.0, flag="length exploded")] + bad  # seed 4: both broke
    assert sweep.claim_worse(both, a, b)[0] == "cannot tell"
    mixed = good[:4] + [row("all", 1.0, 4, 0.0, flag="length exploded")] + bad[:4] + [
        row("soft-or-bottom", 0.5, 4, 10.0)]  # one seed the other way: no longer all one way
    assert sweep.claim_worse(mixed, a, b)[0] == "cannot tell"
    assert sweep.verdicts(good + bad, [a, b])["d"][1] == "holds"
    clean = [row("soft-or-bottom", 0.5, s, 1.0 + s * 0.1) for s in seeds]  # paired as before
    assert sweep.claim_worse(good + clean, a, b) == sweep.claim(good + clean, a, b, "accuracy")


def records(lengths, cut):
    return [{"step": i + 1, "loss": 0.1, "response_length": n, "truncated_share": c,
             "kept_tokens": 10} for i, (n, c) in enumerate(zip(lengths, cut))] + [
        {"step": len(lengths), sweep.EVAL: 0.5, f"{sweep.EVAL}/misconception": 0.25,
         f"{sweep.EVAL}/other": 0.75}]


@pytest.mark.parametrize("lengths, cut, flag", [
    ([40] * 30, [0.0] * 30, None),
    ([40] * 20 + [15] * 10, [0.0] * 30, "length collapsed (40.0 -> 15.0 tokens)"),
    ([20] * 20 + [45] * 10, [0.0] * 30, "length exploded (20.0 -> 45.0 tokens, rollouts cut at the cap 0% -> 0%)"),
    ([40] * 30, [0.0] * 20 + [0.5] * 10, "length exploded (40.0 -> 40.0 tokens, rollouts cut at the cap 0% -> 50%)"),
    ([40] * 30, [0.5] * 30, None),  # cut as often at the end as at the start: the student's own
])
def test_artifact_flags(lengths, cut, flag):
    r = sweep.row_of(records(lengths, cut), "all", 1.0, 0, "cmd", 1.0)
    assert r["flag"] == flag
    assert (r["accuracy"], r["misconception"], r["other"]) == (50.0, 25.0, 75.0)
    assert r["tokens_trained"] == 10 * len(lengths)


SETTINGS = {**toy.DISTILL_DEFAULTS, "steps": 10, "prompts_per_step": 2, "samples_per_prompt": 2,
            "generation_batch_size": 8}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("toy"))
    teacher, student = toy.build(cache, seed=0, quick=True)
    return cache, {"teacher": teacher, "student": student, "dataset": toy.split_path("train", cache)}


def test_carry_summary_by_hand():
    """Means over seeds of the windowed carry series; ĥ over the threshold window by window."""
    def row(seed, kept, q3, h_hat, thr, flag=None):
        return {"rule": "entropy", "keep": 0.5, "seed": seed, "flag": flag,
                "carry": {"toy/carry/kept_share": kept, "toy/carry/q3_share": q3,
                          "toy/carry/h_hat": h_hat, "h_threshold": thr}}
    rows = [row(0, [0.0, 0.2], [1.0, 0.5], [0.01, 0.3], [0.1, 0.1]),
            row(1, [0.1, 0.3], [0.8, 0.7], [0.02, 0.1], [0.1, 0.2]),
            row(2, [1.0, 1.0], [0.0, 0.0], [9.0, 9.0], [0.1, 0.1], flag="length collapsed")]
    assert sweep.carry_series(rows[1], "h_over_threshold") == pytest.approx([0.2, 0.5])
    (e,) = sweep.carry_summary(rows, [("all", 1.0), ("entropy", 0.5)])  # all@1: no rows, no entry
    assert e["n"] == 2 and e["kept"] == pytest.approx((0.1 + 0.2) / 2)
    assert (e["q3_first"], e["q3_last"]) == pytest.approx((0.9, 0.6))
    assert (e["h_first"], e["h_last"]) == pytest.approx(((0.1 + 0.2) / 2, (3.0 + 0.5) / 2))
    assert "| entropy | 0.5 | 2 | 15% | 90% → 60% | 0.15 → 1.75 |" in sweep.carry_markdown([e])


@pytest.fixture(scope="module")
def result(quick, tmp_path_factory):
    cache, pair = quick
    out = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIP_TOY_CACHE", cache)  # the held-out split of this build
        found = sweep.sweep(str(out), [("all", 1.0), ("soft-or", 0.5)], [0, 1], SETTINGS, jobs=2,
                            pair=pair, curve_every=5)
    return found, out


def test_every_row_is_its_runs_metrics_and_the_table_their_statistics(result):
    (rows, table, _), out = result
    assert sorted((r["rule"], r["keep"], r["seed"]) for r in rows) == [
        ("all", 1.0, 0), ("all", 1.0, 1), ("soft-or", 0.5, 0), ("soft-or", 0.5, 1)]
    for r in rows:  # each row against its own run folder
        folder = out / f"{r['rule']}-{r['keep']:g}-seed{r['seed']}"
        metrics = [json.loads(line) for line in open(folder / "metrics.jsonl")]
        assert [m["step"] for m in metrics] == list(range(1, 11))
        assert [c["step"] for c in r["curve"]] == [5, 10]
        for part, key in (("accuracy", sweep.EVAL), ("misconception", f"{sweep.EVAL}/misconception"),
                          ("other", f"{sweep.EVAL}/other")):
            assert r[part] == pytest.approx(100 * metrics[-1][key])
        assert r["tokens_trained"] == sum(m["kept_tokens"] for m in metrics)
        assert r["length_last"] == pytest.approx(sum(m["response_length"] for m in metrics[-10:]) / 10)
        assert r["command"].startswith("OMP_NUM_THREADS=1 python distill.py --rule " + r["rule"])
        assert f"--seed {r['seed']}" in r["command"] and "--steps 10" in r["command"]
    for e in table:  # every row of the table, every part, from the runs
        for part in sweep.PARTS:
            values = [r[part] for r in rows if (r["rule"], r["keep"]) == (e["rule"], e["keep"])]
            assert e[part] == pytest.approx(sweep.mean_ci(values))
    for seed in (0, 1):  # the same seed samples the same rollouts at step 1 under both rules
        first = lambda name: json.loads(open(out / f"{name}-seed{seed}" / "metrics.jsonl").readline())  # noqa: E731
        a, s = first("all-1"), first("soft-or-0.5")
        assert a["response_tokens"] == s["response_tokens"] == a["kept_tokens"] > s["kept_tokens"]
    assert "| soft-or | 0.5 | 2 |" in open(out / "table.md").read()
    assert "(a) entropy at 50%" in open(out / "verdicts.md").read()
    drawn = sweep.plot_sweep(table, {"accuracy": 50.0}, out / "again.png")
    assert drawn == {f"{e['rule']}@{e['keep']:g}": e["accuracy"][0] for e in table}


def test_a_killed_sweep_resumes_without_rerunning_finished_rows(quick, tmp_path):
    cache, pair = quick
    out, env = tmp_path / "sweep", {**os.environ, "TIP_TOY_CACHE": cache}
    cmd = [sys.executable, os.path.join(REPO, "sweep.py"), "--configs", "all@1", "--seeds", "0,1",
           "--steps", "10", "--jobs", "1", "--output-dir", str(out), "--teacher", pair["teacher"],
           "--student", pair["student"], "--dataset", pair["dataset"]]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    rows, deadline = out / "runs.jsonl", time.time() + 120
    while not (rows.exists() and rows.read_text().count("\n") >= 1) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its running distill.py, as Ctrl-C would
    proc.wait()
    first = rows.read_text().splitlines()
    assert len(first) == 1  # killed while the second run was going
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 runs, 1 already finished, 1 to run" in r.stdout
    again = rows.read_text().splitlines()
    assert again[0] == first[0] and len(again) == 2
    assert sorted(json.loads(line)["seed"] for line in again) == [0, 1]


@pytest.mark.parametrize("flags, message", [
    (["--configs", "nope@0.5"], "unknown rule 'nope'"),
    (["--configs", "entropy@1.5"], "keep must be in (0, 1]"),
    (["--configs", "entropy"], "is not RULE@KEEP"),
    (["--seeds", "a,b"], "--seeds must be comma-separated integers"),
    (["--steps", "0"], "must be at least 1"),
    (["--jobs", "0"], "must be at least 1"),
    (["--steps", "5"], "--steps must be at least 10"),
    (["--teacher", "x"], "give --teacher, --student and --dataset together"),
])
def test_bad_settings_get_one_line_and_status_2(flags, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        sweep.main(["--output-dir", str(tmp_path / "out"), *flags])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_refuses_a_folder_that_holds_a_sweep_with_other_settings(result):
    out = result[1]
    with pytest.raises(sweep.UsageError, match="holds a sweep with other settings"):
        sweep.sweep(str(out), [("all", 1.0)], [0], SETTINGS, jobs=1)


def test_the_committed_sweep_is_its_rows_statistics():
    """docs/sweep/table.md, verdicts.md and the README's table follow from docs/sweep/runs.jsonl
    by this sweep.py, at the settings that `python sweep.py` runs by default."""
    docs = os.path.join(REPO, "docs", "sweep")
    with open(os.path.join(docs, "sweep.json")) as f:
        meta = json.load(f)
    assert meta["settings"] == dict(toy.DISTILL_DEFAULTS) and meta["seeds"] == list(sweep.SEEDS)
    configs = [tuple(c) for c in meta["configs"]]
    assert configs == sweep.SWEEP
    rows = sweep.read_rows(os.path.join(docs, "runs.jsonl"))
    assert sorted((r["rule"], r["keep"], r["seed"]) for r in rows) == sorted(
        (rule, keep, seed) for rule, keep in configs for seed in sweep.SEEDS)
    table = sweep.summarize(rows, configs)
    start = {"accuracy": 0.0}  # the head line is not compared: it needs the student's evaluation
    lines = sweep.markdown(table, start, meta["settings"], sweep.SEEDS).split("\n\n", 1)[1]
    with open(os.path.join(docs, "table.md")) as f:
        assert f.read().split("\n\n", 1)[1].strip() == lines.strip()
    with open(os.path.join(REPO, "README.md")) as f:
        assert lines.strip() in f.read()
    found, carry = sweep.verdicts(rows, configs), sweep.carry_summary(rows, configs)
    with open(os.path.join(docs, "verdicts.md")) as f:
        assert f.read().strip() == sweep.verdicts_markdown(found, table, carry).strip()
