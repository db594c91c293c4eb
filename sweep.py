"""The paper's table in miniature, with power: the toy student distilled under every rule x keep on
the same seeds (paired), each run its own `python distill.py` process, two or more at a time.

    python sweep.py                          # SWEEP x seeds 0-4 at the first command's settings
    python sweep.py --jobs 2                 # processes at once (default: one per CPU core)
    python sweep.py --configs all@1,my-rule@0.2    # your rule against all tokens, same seeds
    python sweep.py                          # again after a kill: finished runs are not run again
    python sweep.py --report-to tensorboard  # each run to a tracker, grouped by rule@keep (tracking.py)

Settings: the first command's (toy.DISTILL_DEFAULTS: lr 1e-3, 8 prompts x 4 rollouts, 150 steps),
where all-token OPD takes the toy student from ~40% to ~90%, so the rules are compared after the
student has learned, not while every run is still near its start.

Each run is `python distill.py` with every setting written out, on one torch thread; the command
is stored with the run's row, so any row can be re-run alone. A row (runs.jsonl) holds the
held-out accuracy after the last step (greedy, 500 problems), overall and per part; the mean
response length over the first and last LOOK steps and the share of rollouts cut at
--max-new-tokens; an artifact flag; the toy's carry-token figures (toy/carry/..., every WINDOW
steps) where the run logged them. A run is finished once its row is written: started again on the
same folder with the same settings, the sweep runs only the rest.

Statistics, per configuration and part, over seeds: the mean with a 95% t-interval, and the paired
difference against all tokens on the same seeds with its 95% t-interval. A run whose response
length collapsed or exploded is flagged, shown, and left out of both. verdicts() turns intervals
into holds / fails / cannot tell for the paper's claims, as the README reports them.

Writes into --output-dir: a folder per (rule, keep, seed) with the run and its log, sweep.json
(the settings), runs.jsonl, table.md, verdicts.md, sweep.png and carry.png.
"""
import concurrent.futures
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time

from scipy import stats as scipy_stats

import selection
import toy
import tracking
from loading import ArgumentParser, UsageError, check_writable

SWEEP = [("all", 1.0), ("entropy", 0.5), ("entropy", 0.2), ("entropy", 0.1),
         ("entropy-topk", 0.5), ("entropy-topk", 0.2), ("entropy-topk", 0.1), ("soft-or", 0.5),
         ("soft-or", 0.2), ("soft-or", 0.1), ("q3", 0.2), ("q3", 0.1), ("divergence", 0.2),
         ("divergence", 0.1), ("soft-or-bottom", 0.5), ("random", 0.5)]
SEEDS = (0, 1, 2, 3, 4)
BASELINE = ("all", 1.0)
PARTS = ("accuracy", "misconception", "other")  # overall, then the toy held-out split's parts
EVAL = "eval/toy/mean@1"
LOOK = 10  # steps at each end of a run compared for the artifact flags
COLLAPSED, EXPLODED, CUT = 0.5, 2.0, 0.25  # last/first length ratios; rise in the share cut
MARGIN = 2.0  # points: "matches" means the paired difference's interval lies above -MARGIN
WINDOW = 10  # the carry-token series are kept as means over windows of this many steps
CARRY = "toy/carry/"  # the toy's followed carry tokens (distill's metrics of a followed group)
DISTILL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distill.py")


# ---------------------------------------------------------------------------------------------
# One run: its command, its row
# ---------------------------------------------------------------------------------------------

def run_folder(output_dir, rule, keep, seed):
    return os.path.join(output_dir, f"{rule}-{keep:g}-seed{seed}")


def command(rule, keep, seed, folder, settings, pair=None, eval_every=None, report_to=()):
    """distill.py's flags for one run, every setting written out (defaults may change later);
    with `report_to`, one tracker run per (rule, keep, seed), grouped by (sweep folder, rule, keep)."""
    flags = ["--rule", rule, "--keep", f"{keep:g}", "--seed", str(seed)]
    if report_to:
        group = f"{os.path.basename(os.path.abspath(os.path.dirname(folder)))}-{rule}-{keep:g}"
        flags += ["--report-to", ",".join(report_to), "--run-group", group,
                  "--run-name", f"{group}-seed{seed}"]
    for name, value in settings.items():
        flags += [f"--{name.replace('_', '-')}", str(value)]
    for name, value in (pair or {}).items():  # an explicit pair (tests, forks); else the toy's
        flags += [f"--{name}", value]
    return flags + ["--eval-benchmarks", "toy", "--eval-every", str(eval_every or settings["steps"]),
                    "--no-eval-before", "--output-dir", folder]


def windows(series):
    """Means over consecutive WINDOW-step windows of a per-step series."""
    return [statistics.fmean(series[i:i + WINDOW]) for i in range(0, len(series), WINDOW)]


def artifact(row):
    """Why a run's numbers say more about its response lengths than its rule, or None."""
    first, last = row["length_first"], row["length_last"]
    if last < COLLAPSED * first:
        return f"length collapsed ({first:.1f} -> {last:.1f} tokens)"
    if last > EXPLODED * first or row["cut_last"] - row["cut_first"] > CUT:
        return (f"length exploded ({first:.1f} -> {last:.1f} tokens, rollouts cut at the cap "
                f"{100 * row['cut_first']:.0f}% -> {100 * row['cut_last']:.0f}%)")
    return None


def row_of(records, rule, keep, seed, cmd, seconds):
    """The row of one finished run from its metrics.jsonl records (accuracies in percent)."""
    steps = [r for r in records if "loss" in r]  # training steps, in order
    evals = [r for r in records if EVAL in r]
    mean = lambda rs, key: statistics.fmean(r[key] for r in rs)  # noqa: E731
    score = lambda r: {p: 100 * r[EVAL if p == "accuracy" else f"{EVAL}/{p}"] for p in PARTS  # noqa: E731
                       if (EVAL if p == "accuracy" else f"{EVAL}/{p}") in r}
    row = {"rule": rule, "keep": keep, "seed": seed, **score(evals[-1]),
           "length_first": mean(steps[:LOOK], "response_length"),
           "length_last": mean(steps[-LOOK:], "response_length"),
           "cut_first": mean(steps[:LOOK], "truncated_share"),
           "cut_last": mean(steps[-LOOK:], "truncated_share"),
           "tokens_trained": sum(r["kept_tokens"] for r in steps),
           "curve": [{"step": r["step"], **score(r)} for r in evals],
           "carry": {k: windows([r[k] for r in steps]) for k in steps[0]
                     if k.startswith(CARRY) or (k == "h_threshold" and CARRY + "h_hat" in steps[0])},
           "seconds": round(seconds, 1), "command": cmd}
    row["flag"] = artifact(row)
    return row


def read_rows(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------
# Statistics: t-intervals over seeds, paired differences on the same seeds
# ---------------------------------------------------------------------------------------------

def mean_ci(xs, level=0.95):
    """(mean, half-width of the two-sided t-interval at `level`); the half-width is nan for n < 2."""
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return m, math.nan
    t = scipy_stats.t.ppf((1 + level) / 2, len(xs) - 1)
    return m, t * statistics.stdev(xs) / math.sqrt(len(xs))


def by_seed(rows, config, part):
    """{seed: value} of the unflagged runs of one (rule, keep)."""
    return {r["seed"]: r[part] for r in rows
            if (r["rule"], r["keep"]) == config and not r["flag"] and part in r}


def paired(rows, a, b, part):
    """Mean and 95% half-width of (a - b) over the seeds where both ran unflagged, and n."""
    xa, xb = by_seed(rows, a, part), by_seed(rows, b, part)
    diffs = [xa[s] - xb[s] for s in sorted(set(xa) & set(xb))]
    return (*mean_ci(diffs), len(diffs)) if diffs else (math.nan, math.nan, 0)


def summarize(rows, configs):
    """One entry per configuration: per part the mean and half-width over seeds, and the paired
    difference against all tokens; the flagged runs named."""
    table = []
    for config in configs:
        mine = [r for r in rows if (r["rule"], r["keep"]) == config]
        entry = {"rule": config[0], "keep": config[1], "n": sum(not r["flag"] for r in mine),
                 "tokens_trained": statistics.fmean(r["tokens_trained"] for r in mine) if mine else 0,
                 "flagged": [f"seed {r['seed']}: {r['flag']}, accuracy {r['accuracy']:.1f}%"
                             for r in mine if r["flag"]]}
        for part in PARTS:
            values = list(by_seed(rows, config, part).values())
            entry[part] = mean_ci(values) if values else (math.nan, math.nan)
            entry[f"{part}_vs_all"] = paired(rows, config, BASELINE, part)[:2]
        table.append(entry)
    return table


def verdict(lo, hi, threshold=0.0):
    """holds / fails / cannot tell for "the difference is above `threshold`", from its interval."""
    if math.isnan(lo):
        return "cannot tell"
    return "holds" if lo > threshold else "fails" if hi < threshold else "cannot tell"


def claim(rows, a, b, part, threshold=0.0):
    """One comparison as text: 'a - b = m [lo, hi] (n seeds): verdict'."""
    m, h, n = paired(rows, a, b, part)
    name = f"{a[0]}@{a[1]:g} − {b[0]}@{b[1]:g} on {part}"
    if n < 2:
        return "cannot tell", f"{name}: {n} seed(s) where both ran unflagged"
    return verdict(m - h, m + h, threshold), f"{name}: {m:+.1f} [{m - h:+.1f}, {m + h:+.1f}] ({n} seeds)"


def broke(rows, config):
    """{seed: whether its run was flagged} of one (rule, keep)."""
    return {r["seed"]: bool(r["flag"]) for r in rows if (r["rule"], r["keep"]) == config}


def claim_worse(rows, a, b):
    """"b is worse than a" on accuracy. The paired difference where both ran clean; where that
    leaves under 2 seeds because runs broke (were flagged), an exact one-sided sign test on the
    seeds where exactly one of the two broke: b alone broke on all k of them, P = 0.5^k < 0.05."""
    found, numbers = claim(rows, a, b, "accuracy")
    fa, fb = broke(rows, a), broke(rows, b)
    one = sorted(s for s in set(fa) & set(fb) if fa[s] != fb[s])
    if paired(rows, a, b, "accuracy")[2] >= 2 or not one:
        return found, numbers
    only_b = sum(fb[s] for s in one)
    p = 0.5 ** len(one) if only_b == len(one) else 1.0
    return ("holds" if p < 0.05 else "cannot tell",
            f"{numbers}; {b[0]}@{b[1]:g} alone broke on {only_b} of the {len(one)} seeds where "
            f"one of the two broke, {a[0]}@{a[1]:g} alone on {len(one) - only_b}: sign test P = {p:.3f}")


def verdicts(rows, configs):
    """The paper's claims (a)-(f) against this sweep: {letter: (claim, verdict, [(verdict,
    numbers)])}. Each claim is a conjunction of its comparisons: it holds when every one holds,
    fails when any one fails, and cannot be told otherwise. (e), memory, is bench.py's."""
    have = set(configs)
    keeps = lambda a, b, ks: [((a, k), (b, k)) for k in ks if (a, k) in have and (b, k) in have]  # noqa: E731
    checks = {
        "a": (f"entropy at 50% matches all tokens (within {MARGIN:g} points)",
              [claim(rows, ("entropy", 0.5), BASELINE, "accuracy", -MARGIN)]),
        "b": ("soft-or beats entropy at equal keep",
              [claim(rows, a, b, "accuracy") for a, b in keeps("soft-or", "entropy", (0.5, 0.2, 0.1))]),
        "c": (f"q3 at 10% matches all tokens (within {MARGIN:g} points)",
              [claim(rows, ("q3", 0.1), BASELINE, "accuracy", -MARGIN)]),
        "d": ("soft-or-bottom at 50% is the worst rule",
              [claim_worse(rows, c, ("soft-or-bottom", 0.5)) for c in configs
               if c != ("soft-or-bottom", 0.5)]),
        "f": ("rules that see the divergence fix the misconception more than entropy-only rules "
              "at equal keep", [claim(rows, a, b, "misconception") for r in ("soft-or", "q3", "divergence")
                                for a, b in keeps(r, "entropy", (0.5, 0.2, 0.1))]),
    }
    out = {}
    for letter, (text, results) in checks.items():
        found = [v for v, _ in results]
        overall = ("not in this sweep" if not found else "fails" if "fails" in found
                   else "holds" if set(found) == {"holds"} else "cannot tell")
        out[letter] = (text, overall, results)
    return out


def resolution(table):
    """The median half-width of the paired differences against all tokens, overall accuracy: a
    difference of this size is about the smallest this sweep tells from zero."""
    widths = [e["accuracy_vs_all"][1] for e in table
              if (e["rule"], e["keep"]) != BASELINE and not math.isnan(e["accuracy_vs_all"][1])]
    return statistics.median(widths) if widths else math.nan


# ---------------------------------------------------------------------------------------------
# Reports: table.md, verdicts.md, sweep.png, carry.png
# ---------------------------------------------------------------------------------------------

def markdown(table, start, settings, seeds):
    cell = lambda m_h: "-" if math.isnan(m_h[0]) else f"{m_h[0]:.1f} ± {m_h[1]:.1f}"  # noqa: E731
    diff = lambda m_h: "-" if math.isnan(m_h[0]) else f"{m_h[0]:+.1f} ± {m_h[1]:.1f}"  # noqa: E731
    head = (f"Student before: {start['accuracy']:.1f}% held-out (misconception "
            f"{start.get('misconception', math.nan):.1f}%, other {start.get('other', math.nan):.1f}%); "
            f"{settings['steps']} steps, lr {settings['lr']:g}, {settings['prompts_per_step']} × "
            f"{settings['samples_per_prompt']} rollouts; seeds {', '.join(map(str, seeds))} "
            "(paired). Mean ± 95% t-interval over seeds; Δ = paired difference against all tokens "
            "on the same seeds, ± its 95% t-interval; flagged runs are left out.\n\n")
    cols = " | ".join(f"{p} % | Δ {p}" for p in PARTS)
    lines = [f"| rule | keep | n | {cols} | tokens trained | flagged |",
             "|---|---|---|" + "---|---|" * len(PARTS) + "---|---|"]
    for e in table:
        parts = " | ".join(f"{cell(e[p])} | {diff(e[p + '_vs_all'])}" for p in PARTS)
        lines.append(f"| {e['rule']} | {e['keep']:g} | {e['n']} | {parts} | "
                     f"{e['tokens_trained']:.0f} | {'; '.join(e['flagged']) or '-'} |")
    return head + "\n".join(lines)


def verdicts_markdown(found, table, carry=()):
    lines = [f"Resolution: a paired difference of about {resolution(table):.1f} points "
             "(the median 95% half-width against all tokens) is the smallest this sweep tells from "
             "zero.\n"]
    for letter, (text, overall, results) in found.items():
        lines.append(f"- ({letter}) {text}: **{overall}**")
        lines += [f"  - {numbers}: {v}" for v, numbers in results]
    if carry:
        lines.append("\nThe carry tokens (for (f)), means over seeds:\n\n" + carry_markdown(carry))
    return "\n".join(lines)


def plot_sweep(table, start, path):
    """Overall accuracy per rule@keep (mean ± 95% half-width), misconception part as dots."""
    import matplotlib
    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=100)
    labels, x = [f"{e['rule']}@{e['keep']:g}" for e in table], range(len(table))
    bars = ax.bar(x, [e["accuracy"][0] for e in table], yerr=[e["accuracy"][1] for e in table],
                  color=["0.3" if (e["rule"], e["keep"]) == BASELINE else "tab:blue" for e in table],
                  capsize=3, label="all held-out problems")
    ax.errorbar(x, [e["misconception"][0] for e in table], [e["misconception"][1] for e in table],
                fmt="o", color="tab:orange", capsize=2, label="misconception part")
    ax.axhline(start["accuracy"], color="tab:red", ls="--",
               label=f"student before: {start['accuracy']:.1f}%")
    for i, e in enumerate(table):  # a configuration whose every run was flagged: say so in its slot
        if e["flagged"] and not e["n"]:
            ax.text(i, 2, f"all {len(e['flagged'])} runs flagged", rotation=90, ha="center",
                    va="bottom", fontsize=8, color="tab:red")
    ax.set_xticks(x, labels, rotation=45, ha="right")
    ax.set_ylabel("held-out accuracy % (greedy; 95% CI)")
    ax.set_ylim(0, 110)  # room above the bars for the legend
    ax.legend(loc="upper right", ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return {label: bar.get_height() for label, bar in zip(labels, bars)}  # what was drawn


def carry_series(row, key):
    """A run's windowed carry series; "h_over_threshold" is the carry's mean ĥ over the step's ĥ
    threshold (below 1: the low-entropy half, where an entropy rule does not look)."""
    carry = row.get("carry", {})
    if key == "h_over_threshold":
        if CARRY + "h_hat" not in carry or "h_threshold" not in carry:
            return None
        return [h / t if t else math.nan for h, t in zip(carry[CARRY + "h_hat"], carry["h_threshold"])]
    return carry.get(CARRY + key)


def carry_summary(rows, configs):
    """Per configuration, means over its unflagged seeds: the share of the carry tokens the rule
    kept over training; their share in Q3 and their ĥ / threshold in the first and last window."""
    out = []
    for config in configs:
        mine = [r for r in rows if (r["rule"], r["keep"]) == config and not r["flag"]
                and carry_series(r, "kept_share")]
        if not mine:
            continue
        mean = lambda key, pick: statistics.fmean(pick(carry_series(r, key)) for r in mine)  # noqa: E731
        out.append({"rule": config[0], "keep": config[1], "n": len(mine),
                    "kept": mean("kept_share", statistics.fmean),
                    "q3_first": mean("q3_share", lambda s: s[0]),
                    "q3_last": mean("q3_share", lambda s: s[-1]),
                    "h_first": mean("h_over_threshold", lambda s: s[0]),
                    "h_last": mean("h_over_threshold", lambda s: s[-1])})
    return out


def carry_markdown(summary):
    lines = ["| rule | keep | n | carry kept (mean over training) | carry in Q3, first → last "
             f"{WINDOW} steps | ĥ / threshold, first → last |", "|---|---|---|---|---|---|"]
    for e in summary:
        lines.append(f"| {e['rule']} | {e['keep']:g} | {e['n']} | {100 * e['kept']:.0f}% | "
                     f"{100 * e['q3_first']:.0f}% → {100 * e['q3_last']:.0f}% | "
                     f"{e['h_first']:.2f} → {e['h_last']:.2f} |")
    return "\n".join(lines)


def plot_carry(rows, configs, path, keys=("q3_share", "h_over_threshold", "kept_share")):
    """The planted carry tokens over training, mean over unflagged seeds, one line per rule: the
    share of them in Q3, their ĥ over the threshold and the share the rule kept (verdict (f)).
    Returns what was drawn."""
    import matplotlib
    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.5), dpi=100, squeeze=False)
    drawn = {}
    for ax, key in zip(axes[0], keys):
        for config in configs:
            series = [s for r in rows if (r["rule"], r["keep"]) == config and not r["flag"]
                      for s in [carry_series(r, key)] if s]
            if not series:
                continue
            mean = [statistics.fmean(s[i] for s in series) for i in range(min(map(len, series)))]
            drawn[(key, config)] = mean
            ax.plot([WINDOW * (i + 1) for i in range(len(mean))], mean,
                    "--" if config[0].startswith("entropy") else "-",
                    color="0.3" if config == BASELINE else None, label=f"{config[0]}@{config[1]:g}")
        ax.set_xlabel(f"distillation step (means over {WINDOW}-step windows)")
        ax.set_ylabel({"q3_share": "share of the carry tokens in Q3",
                       "h_over_threshold": "carry tokens' mean ĥ / the step's ĥ threshold",
                       "kept_share": "share of the carry tokens kept"}[key])
        if key == "h_over_threshold" and any(v > 0 for (k, _), m in drawn.items()
                                             if k == key for v in m):
            ax.set_yscale("log")
            ax.axhline(1.0, color="tab:red", ls=":", lw=1)
        else:
            ax.set_ylim(0, 1)
    fig.legend(*axes[0][0].get_legend_handles_labels(), fontsize=8, loc="center left",
               bbox_to_anchor=(1.0, 0.5))  # beside the panels: the lines fill them
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return drawn


# ---------------------------------------------------------------------------------------------
# The sweep: plan, resume, run in parallel, report
# ---------------------------------------------------------------------------------------------

def start_scores(student_dir):
    """The student's held-out accuracy before distillation, overall and per part, in percent."""
    import evaluate
    from task_api import Settings
    from transformers import AutoModelForCausalLM, AutoTokenizer
    summary = evaluate.evaluate_benchmark(AutoModelForCausalLM.from_pretrained(student_dir),
                                          AutoTokenizer.from_pretrained(student_dir), "toy", Settings(
                                              max_new_tokens=toy.DISTILL_DEFAULTS["max_new_tokens"],
                                              temperature=0.0))
    return {"accuracy": 100 * summary["mean"],
            **{k[5:]: 100 * v for k, v in summary.items() if k.startswith("mean/")}}


def run_all(output_dir, plan, settings, pair, jobs, curve_every, report_to=()):
    """Run the plan's missing runs, `jobs` processes at a time; append each row as it finishes."""
    rows_path, lock, failed = os.path.join(output_dir, "runs.jsonl"), threading.Lock(), []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread a run, as the toy pins its own

    def one(rule, keep, seed):
        folder = run_folder(output_dir, rule, keep, seed)
        shutil.rmtree(folder, ignore_errors=True)  # what a killed run left: start it afresh
        os.makedirs(folder)
        flags = command(rule, keep, seed, folder, settings, pair, curve_every, report_to)
        t0 = time.time()
        with open(os.path.join(folder, "log.txt"), "w") as log:
            code = subprocess.run([sys.executable, DISTILL, *flags], stdout=log,
                                  stderr=subprocess.STDOUT, env=env).returncode
        if code:
            failed.append(f"{rule}@{keep:g} seed {seed} (exit {code}, {folder}/log.txt)")
            return
        records = read_rows(os.path.join(folder, "metrics.jsonl"))
        row = row_of(records, rule, keep, seed, "OMP_NUM_THREADS=1 " + shlex.join(
            ["python", "distill.py", *flags]), time.time() - t0)
        with lock:  # one writer at a time; a row is one line, written whole
            with open(rows_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"sweep: {rule}@{keep:g} seed {seed}: {row['accuracy']:.1f}% ("
                  + ", ".join(f"{p} {row[p]:.1f}%" for p in PARTS[1:] if p in row)
                  + f") in {row['seconds']:.0f}s" + (f" FLAGGED: {row['flag']}" if row["flag"] else ""),
                  flush=True)

    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for future in [pool.submit(one, *p) for p in plan]:
            future.result()
    return failed


def sweep(output_dir, configs=SWEEP, seeds=SEEDS, settings=None, jobs=None, pair=None,
          curve_every=None, report_to=()):
    """Distil the toy student under each (rule, keep) for each seed (resuming a sweep already in
    output_dir), then write the reports. Returns (rows, table, verdicts)."""
    settings = settings or dict(toy.DISTILL_DEFAULTS)
    jobs = jobs or os.cpu_count() or 1
    meta = {"configs": [list(c) for c in configs], "seeds": list(seeds), "settings": settings,
            "pair": pair, "curve_every": curve_every}
    meta_path = os.path.join(output_dir, "sweep.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f) != meta:
                raise UsageError(f"--output-dir {output_dir!r} holds a sweep with other settings "
                                 "(its sweep.json): choose another folder, or the same settings "
                                 "to resume it")
    os.makedirs(output_dir, exist_ok=True)
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    rows_path, t0 = os.path.join(output_dir, "runs.jsonl"), time.time()
    done = {(r["rule"], r["keep"], r["seed"]) for r in read_rows(rows_path)}
    plan = [(rule, keep, seed) for rule, keep in configs for seed in seeds
            if (rule, keep, seed) not in done]
    print(f"sweep: {len(configs) * len(seeds)} runs, {len(done)} already finished, {len(plan)} to "
          f"run, {jobs} at a time", flush=True)
    failed = run_all(output_dir, plan, settings, pair, jobs, curve_every, report_to)
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed: {'; '.join(failed)}; run the sweep "
                           "again to retry them (finished runs are kept)")
    rows = read_rows(rows_path)
    start = start_scores(pair["student"] if pair else toy.build()[1])
    table, found, carry = summarize(rows, configs), verdicts(rows, configs), carry_summary(rows, configs)
    with open(os.path.join(output_dir, "table.md"), "w") as f:
        f.write(markdown(table, start, settings, seeds) + "\n")
    with open(os.path.join(output_dir, "verdicts.md"), "w") as f:
        f.write(verdicts_markdown(found, table, carry) + "\n")
    plot_sweep(table, start, os.path.join(output_dir, "sweep.png"))
    if any(r.get("carry") for r in rows):
        plot_carry(rows, configs, os.path.join(output_dir, "carry.png"))
    print(markdown(table, start, settings, seeds) + "\n\n" + verdicts_markdown(found, table, carry))
    print(f"sweep: {len(plan)} runs in {(time.time() - t0) / 60:.1f} min on {jobs} processes; "
          f"{len(rows)} rows in {rows_path}")
    return rows, table, found


def parse_configs(text):
    """'all@1,soft-or@0.5' -> [("all", 1.0), ("soft-or", 0.5)], each checked."""
    configs = []
    for item in text.split(","):
        rule, _, keep = item.strip().partition("@")
        try:
            keep = float(keep)
        except ValueError:
            raise UsageError(f"--configs: {item!r} is not RULE@KEEP (e.g. soft-or@0.5)") from None
        if rule not in selection.RULES:
            raise UsageError(f"--configs: unknown rule {rule!r}; valid rules: "
                             f"{', '.join(selection.RULES)}")
        if not 0.0 < keep <= 1.0:
            raise UsageError(f"--configs: keep must be in (0, 1], got {item!r}")
        configs.append((rule, keep))
    if BASELINE not in configs:  # every difference is taken against it
        configs.insert(0, BASELINE)
    return configs


def main(argv=None):
    p = ArgumentParser(prog="sweep.py", description="The paper's table in miniature: the "
                       "toy student distilled under every rule x keep on paired seeds.")
    p.add_argument("--configs", default=",".join(f"{r}@{k:g}" for r, k in SWEEP),
                   help="comma-separated RULE@KEEP (all@1 is always added: the baseline)")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds, "
                   "the same for every configuration")
    p.add_argument("--steps", type=int, default=toy.DISTILL_DEFAULTS["steps"], help="steps per run")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="runs at once")
    p.add_argument("--curve-every", type=int, default=50, help="evaluate every N steps too")
    p.add_argument("--teacher", help="an explicit pair instead of the toy's (with --student, "
                   "--dataset); its held-out split is the toy cache's (default: the toy pair)")
    p.add_argument("--student", help="the explicit pair's student (default: the toy pair)")
    p.add_argument("--dataset", help="the explicit pair's training file (default: the toy's train split)")
    p.add_argument("--output-dir", default="sweep", help="where the runs and reports go; a sweep "
                   "already there with the same settings is resumed")
    tracking.add_flag(p, runs=False)
    args = p.parse_args(argv)
    try:
        try:
            seeds = [int(x) for x in args.seeds.split(",")]
        except ValueError:
            raise UsageError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
        if min(args.steps, args.jobs, args.curve_every) < 1:
            raise UsageError("--steps, --jobs and --curve-every must be at least 1")
        if args.steps < LOOK:
            raise UsageError(f"--steps must be at least {LOOK} (the artifact flags compare the "
                             f"first and last {LOOK} steps)")
        configs = parse_configs(args.configs)
        pair = {k: getattr(args, k) for k in ("teacher", "student", "dataset")}
        if any(pair.values()) and not all(pair.values()):
            raise UsageError("give --teacher, --student and --dataset together, or none (the toy pair)")
        check_writable(args.output_dir)
        tracking.check(args.report_to)  # a missing tracker: one line before any run starts
        if not any(pair.values()):
            try:
                toy.build()
            except (FileExistsError, PermissionError, NotADirectoryError) as e:
                raise UsageError(f"cannot build the toy pair: {e}") from None
        settings = {**toy.DISTILL_DEFAULTS, "steps": args.steps}
        sweep(args.output_dir, configs, seeds, settings, args.jobs,
              pair if any(pair.values()) else None, args.curve_every, args.report_to)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
