"""Bad input gets one clear line and exit 2 with nothing written; a killed run resumes to the
same result; a non-finite step is skipped and counted."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import distill
import opd_step
from helpers import make_model, make_tokenizer
from test_distill import REPO, pair  # noqa: F401  (pair: fixture)

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
VOLATILE = ("tokens_per_s", "peak_memory_bytes", "step_seconds")


def cli(*args, cwd):
    return subprocess.run([sys.executable, os.path.join(REPO, "distill.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=ENV)


def tiny(pair, out, *extra):
    return ["--teacher", pair["teacher"], "--student", pair["student"], "--dataset", pair["data"],
            "--steps", "4", "--prompts-per-step", "2", "--samples-per-prompt", "2",
            "--max-new-tokens", "8", "--lr", "1e-3", "--output-dir", str(out), *extra]


@pytest.fixture(scope="module")
def bad_files(pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.jsonl").write_text("")
    (root / "nofield.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    (root / "long.jsonl").write_text(json.dumps({"problem": "x" * 500}) + "\n")
    (root / "afile").write_text("not a folder")
    other = make_tokenizer()
    other.add_tokens(["<extra>"])
    make_model(other, 1, 16, seed=0).save_pretrained(root / "other")
    other.save_pretrained(root / "other")
    return root


@pytest.mark.parametrize("case,args,message", [
    ("rule", ["--rule", "entropi"], "argument --rule: invalid choice: 'entropi' (choose from 'all'"),
    ("keep0", ["--keep", "0"], "--keep must be in (0, 1]"),
    ("keep2", ["--keep", "1.5"], "--keep must be in (0, 1]"),
    ("loss", ["--loss", "kl"], "argument --loss: invalid choice: 'kl'"),
    ("device", ["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    ("beta", ["--loss", "jsd", "--beta", "2"], "--beta must be in [0, 1]"),
    ("path", ["--student", "./no/such/model"], "is not a directory"),
    ("hub", ["--teacher", "no-such-org/no-such-model"], "offline use needs a local directory"),
    ("tokenizer", ["--student", "{bad}/other"], "teacher and student tokenizers differ"),
    ("empty", ["--dataset", "{bad}/empty.jsonl"], "empty"),
    ("nofile", ["--dataset", "{bad}/missing.jsonl"], "does not exist"),
    ("field", ["--dataset", "{bad}/nofield.jsonl"], "no prompt field found"),
    ("long", ["--dataset", "{bad}/long.jsonl", "--max-prompt-length", "64"], "longer than"),
    ("outdir", ["--output-dir", "{bad}/afile/run"], "is not writable"),
])
def test_bad_input_one_line_exit_2_nothing_written(pair, bad_files, tmp_path, case, args, message):
    out = tmp_path / "run"
    args = [a.replace("{bad}", str(bad_files)) for a in args]
    base = tiny(pair, out)
    for flag in args[::2]:  # let the case's flags replace the base ones
        if flag in base:
            i = base.index(flag)
            del base[i:i + 2]
    r = cli(*base, *args, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip().splitlines()[-1]]  # one line
    assert r.stderr.startswith("error:")
    assert os.listdir(tmp_path) == []  # nothing written: no run folder, no stray file


def test_existing_run_is_not_overwritten_without_resume(pair, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    r = cli(*tiny(pair, out), cwd=tmp_path)
    assert r.returncode == 2 and "already holds a run" in r.stderr
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def _metrics(path):
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE and not k.startswith("time/")}
            for line in open(path)]


def test_killed_run_resumes_to_the_same_metrics_and_weights(pair, tmp_path):
    ref = tmp_path / "ref"
    assert cli(*tiny(pair, ref, "--save-every", "2"), cwd=tmp_path).returncode == 0
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "distill.py"),
                             *tiny(pair, run, "--save-every", "2")], cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # SIGKILL right after step 3 is logged: checkpoint 2 is the newest
        if line.startswith("step    3/4"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(_metrics(run / "metrics.jsonl")) == 3 and not (run / "checkpoint-000004").exists()
    # a kill during a save leaves only a partial .tmp folder: it must be ignored, then replaced
    (run / "checkpoint-000004.tmp").mkdir()
    (run / "checkpoint-000004.tmp" / "config.json").write_text("{")
    r = cli(*tiny(pair, run, "--save-every", "2", "--resume"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and "checkpoint-000002" in r.stdout
    assert _metrics(run / "metrics.jsonl") == _metrics(ref / "metrics.jsonl")
    from safetensors.torch import load_file
    a = load_file(ref / "checkpoint-000004" / "model.safetensors")
    b = load_file(run / "checkpoint-000004" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (run / "checkpoint-000004.tmp").exists()


def test_non_finite_step_is_skipped_and_counted(pair, tmp_path, monkeypatch, capsys):
    real, calls = opd_step.tip.chunked_divergence, {}

    def poisoned(*args, **kwargs):  # every loss of step 2 is NaN
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["step"] == 2 else loss

    real_step = opd_step.opd_step

    def counting_step(*args, **kwargs):
        calls["step"] = calls.get("step", 0) + 1
        return real_step(*args, **kwargs)

    monkeypatch.setattr(opd_step.tip, "chunked_divergence", poisoned)
    monkeypatch.setattr(distill, "opd_step", counting_step)
    distill.main(tiny(pair, tmp_path / "run", "--steps", "3"))
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["skipped"] for r in records] == [False, True, False]
    assert "SKIPPED: loss or grad norm not finite" in capsys.readouterr().out
    calls.clear()
    with pytest.raises(SystemExit) as exit_info:
        distill.main(tiny(pair, tmp_path / "run2", "--steps", "3", "--max-skipped-steps", "1"))
    assert exit_info.value.code == 1
    assert "1 steps in a row had a non-finite" in capsys.readouterr().err


@pytest.mark.parametrize("module,argv", [("distill", []), ("evaluate", []), ("analysis", []),
                                         ("analysis", ["plot"]), ("sweep", []), ("bench", []),
                                         ("toy", []), ("deepplanning.__main__", [])])
def test_every_help_shows_defaults_as_values(module, argv, capsys):
    """--help prints each default as its value: never `(default: None)` or an empty list."""
    import importlib
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main([*argv, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and "usage:" in out
    assert "None" not in out and "default: []" not in out, out
