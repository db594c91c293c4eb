"""tracking.py: `--report-to` trackio, TensorBoard and wandb on the (quick) toy pair, each read back
through its own reader and compared with metrics.jsonl value by value; the quadrant picture is in
each, decodes, and is the same picture in all three; its table counts the step's tokens; --resume
continues the same tracker runs; a missing or failing tracker is one line, exit 2, before anything
runs; a tracker that fails mid-run is reported once and the run goes on; only rank 0 reports."""
import glob
import io
import json
import os
import struct
import subprocess
import sys
import types

import numpy as np
import pytest

import distill
import toy
import tracking
from helpers import make_tiny_pair, write_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = ("trackio", "tensorboard", "wandb")
installed = all(__import__("importlib").util.find_spec(m) for m in ("trackio", "tensorboard", "wandb"))
needs_trackers = pytest.mark.skipif(not installed, reason="pip install -r requirements.txt")


def tracker_env(root):
    """Offline, and every tracker's files under `root` (none in the user's home)."""
    return {**os.environ, "TRACKIO_DIR": str(root / "trackio"), "WANDB_MODE": "offline",
            "WANDB_CONFIG_DIR": str(root / "wandb-config"), "WANDB_CACHE_DIR": str(root / "wandb-cache"),
            "WANDB_DATA_DIR": str(root / "wandb-data"), "WANDB_SILENT": "true",
            "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two steps on the quick toy pair reporting to all three trackers, evaluated every step,
    then --resume to a third step: (metrics.jsonl records, output folder, trackio folder)."""
    if not installed:
        pytest.skip("pip install -r requirements.txt")
    root = tmp_path_factory.mktemp("tracked")
    teacher, student = toy.build(str(root / "toy"), seed=0, quick=True)
    env = {**tracker_env(root), "TIP_TOY_CACHE": str(root / "toy")}
    out = root / "run"
    flags = ["--teacher", teacher, "--student", student, "--dataset", toy.split_path("train", str(root / "toy")),
             "--prompts-per-step", "2", "--samples-per-prompt", "2", "--micro-batch-size", "2",
             "--max-new-tokens", "24", "--generation-batch-size", "4", "--lr", "1e-3",
             "--eval-every", "1", "--eval-benchmarks", "toy", "--eval-limit", "4", "--save-every", "1",
             "--report-to", ",".join(ALL), "--output-dir", str(out)]
    for more in (["--steps", "2"], ["--steps", "3", "--resume"]):
        r = subprocess.run([sys.executable, os.path.join(REPO, "distill.py"), *flags, *more],
                           capture_output=True, text=True, env=env, cwd=root)
        assert r.returncode == 0, r.stderr[-3000:]
        assert "warning" not in r.stderr, r.stderr[-3000:]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert all(any(k.startswith("eval/") for k in r) for r in records)
    return records, out, root / "trackio"


def scalars(record):
    return {k: v for k, v in record.items() if k != "step"}


def decode_png(data):
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # (H, W, 3)


def check_picture(image, table, record):
    """The image is the 800x800 scatter with every quadrant's colour in it; the table counts the
    step's tokens exactly as the record does."""
    assert image.shape == (800, 800, 3)
    for colour in tracking.COLORS.values():  # every quadrant is drawn (alpha 0.5 over white)
        rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(image.astype(int) - (rgb + 255) // 2).sum(-1) <= 3).any(), colour
    assert [row[0] for row in table] == list(tracking.QUADRANTS.values())
    assert sum(row[1] for row in table) == record["response_tokens"]
    assert sum(row[3] for row in table) == record["kept_tokens"]
    for q, row in enumerate(table, start=1):
        assert row[2] == pytest.approx(record[f"q{q}_share"], rel=1e-6)
        assert row[4] == pytest.approx(record[f"q{q}_kept_share"], rel=1e-6)


@needs_trackers
def start(args, rank):
    """tracking.start as distill.train calls it, for a run from step 0."""
    return tracking.start(args.report_to, args.output_dir, rank, 0, args.run_name, args.run_group,
                          vars(args))


def test_trackio_holds_every_value_of_metrics_jsonl_and_the_pictures(run):
    records, out, trackio_dir = run
    code = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage; "
            "run = json.load(open(sys.argv[1]))['name']; "
            "print(json.dumps(SQLiteStorage.get_logs('tip', run), default=str))")
    # trackio fixes its folder when imported: read it back in a process started with it set
    r = subprocess.run([sys.executable, "-c", code, str(out / "trackers.json")], capture_output=True,
                       text=True, env={**os.environ, "TRACKIO_DIR": str(trackio_dir)})
    assert r.returncode == 0, r.stderr
    logs = json.loads(r.stdout)
    by_step = {}
    for row in logs:  # one row per log call; the resumed run's rows are in the same run
        assert row["step"] not in by_step, "a step logged twice"
        by_step[row["step"]] = row
    assert sorted(by_step) == [0, 1, 2, 3]
    for record in records:
        row = by_step[record["step"]]
        for key, value in scalars(record).items():
            assert row[key] == value, key
        if record["step"] > 0:  # the steps that trained have a picture (step 0 only evaluates)
            image = decode_png(open(trackio_dir / "media" / row["eval/quadrants"]["file_path"], "rb").read())
            table = [[r[c] for c in tracking.TABLE_COLUMNS] for r in row["eval/quadrant_table"]["_value"]]
            check_picture(image, table, record)
        else:
            assert "eval/quadrants" not in row


def tensorboard_events(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    return events.Reload()


@needs_trackers
def test_tensorboard_holds_every_value_of_metrics_jsonl_and_the_pictures(run):
    records, out, _ = run
    events = tensorboard_events(out)
    assert len(glob.glob(str(out / "events.out.tfevents.*"))) == 2  # the resumed run appended
    for key in scalars(records[1]):
        logged = {e.step: e.value for e in events.Scalars(key)}
        expected = {r["step"]: r[key] for r in records if key in r}
        assert sorted(logged) == sorted(expected), key
        for step, value in expected.items():  # event files hold float32
            assert logged[step] == float(np.float32(value)), (key, step)
    images = {e.step: decode_png(e.encoded_image_string) for e in events.Images("eval/quadrants")}
    tables = {e.step: e.tensor_proto.string_val[0].decode() for e in
              events.Tensors("eval/quadrant_table/text_summary")}
    assert sorted(images) == sorted(tables) == [1, 2, 3]
    for record in records[1:]:
        rows = [line.strip("|").split(" | ") for line in tables[record["step"]].splitlines()[2:]]
        table = [[r[0].strip(), int(r[1]), float(r[2]), int(r[3]), float(r[4]), float(r[5])] for r in rows]
        image = images[record["step"]]
        check_picture(image, table, {**record, **{f"q{q}_{k}": round(record[f"q{q}_{k}"], 4)
                                                 for q in range(1, 5) for k in ("share", "kept_share")}})
    settings = events.Tensors("settings/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"| output_dir | {out} |" in settings and "| rule | entropy |" in settings


def wandb_records(path):
    """The records of a wandb transaction log (`run-<id>.wandb`). wandb 0.31 has no Python reader
    of its own (the one it had went into its Go core), so this reads the framing it writes (a
    7-byte header, then LevelDB-log chunks in 32 KiB blocks) and parses each record with wandb's
    own protobuf schema."""
    from wandb.proto import wandb_internal_pb2
    data, pos, block, buf = open(path, "rb").read(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])  # after a 4-byte checksum
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            yield wandb_internal_pb2.Record.FromString(buf)
            buf = b""


@needs_trackers
def test_wandb_offline_holds_every_value_of_metrics_jsonl_and_the_pictures(run):
    records, out, _ = run
    wandb_id = json.load(open(out / "trackers.json"))["wandb"]
    folders = sorted(glob.glob(str(out / "wandb" / f"offline-run-*-{wandb_id}")))
    assert len(folders) == 2  # the run, and its resumption under the same id
    rows = {}
    for folder in folders:
        for rec in wandb_records(os.path.join(folder, f"run-{wandb_id}.wandb")):
            if rec.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in rec.history.item}
                assert rec.history.step.num not in rows, "a step logged twice"
                rows[rec.history.step.num] = (folder, items)
    assert sorted(rows) == [0, 1, 2, 3]
    for record in records:
        folder, row = rows[record["step"]]
        for key, value in scalars(record).items():
            assert row[key] == value, key
        if record["step"] > 0:
            image = decode_png(open(os.path.join(folder, "files", row["eval/quadrants/path"]), "rb").read())
            table = json.load(open(os.path.join(folder, "files", row["eval/quadrant_table/path"])))
            assert table["columns"] == tracking.TABLE_COLUMNS
            check_picture(image, table["data"], record)


@needs_trackers
def test_the_three_trackers_got_the_same_picture(run):
    """One drawing per evaluation step goes to every tracker, pixel for pixel."""
    records, out, trackio_dir = run
    tb = {e.step: decode_png(e.encoded_image_string) for e in tensorboard_events(out).Images("eval/quadrants")}
    wandb_pngs = glob.glob(str(out / "wandb" / "offline-run-*" / "files" / "media" / "**" / "*.png"),
                           recursive=True)
    trackio_pngs = sorted(glob.glob(str(trackio_dir / "media" / "tip" / "*" / "*" / "*.png")))
    assert len(wandb_pngs) == len(trackio_pngs) == len(tb) == 3
    for path in trackio_pngs:  # trackio's media folder: <project>/<run>/<step>/<file>
        step = int(os.path.basename(os.path.dirname(path)))
        assert np.array_equal(decode_png(open(path, "rb").read()), tb[step])
    assert any(np.array_equal(decode_png(open(p, "rb").read()), tb[3]) for p in wandb_pngs)


@needs_trackers
def test_resume_continues_the_same_tracker_runs(run):
    _, out, _ = run
    ids = json.load(open(out / "trackers.json"))
    assert ids["name"] == "run" and set(ids) == {"name", "trackio", "wandb"}


# ---------------------------------------------------------------------------------------------
# Refusals, failures, ranks: in this process, cheap
# ---------------------------------------------------------------------------------------------

def main_exit(argv, capsys):
    with pytest.raises(SystemExit) as e:
        distill.main(argv)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("name,module", [("trackio", "trackio"), ("wandb", "wandb"),
                                         ("tensorboard", "torch.utils.tensorboard")])
def test_a_missing_tracker_is_one_line_naming_the_pip_install(name, module, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if not installed
    (tmp_path / "t").mkdir(), (tmp_path / "s").mkdir()
    code, err = main_exit(["--teacher", str(tmp_path / "t"), "--student", str(tmp_path / "s"),
                           "--report-to", f"none,{name}", "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: --report-to {name}: cannot import") and f"pip install {tracking.PACKAGES[name]}" in err
    assert not (tmp_path / "out").exists()


def test_an_unknown_tracker_is_one_line(capsys):
    code, err = main_exit(["--report-to", "trackio,mlflow"], capsys)
    assert code == 2 and err.count("\n") == 1 and "unknown tracker 'mlflow'" in err, err


class Recorder:
    """A tracker that keeps what it is sent, and can be told to fail."""
    opened, fail_start, fail_log = [], False, False

    def __init__(self, run):
        if Recorder.fail_start:
            raise ConnectionError("no route to the server\nsecond line")
        self.run, self.logged, self.closed = run, [], False
        Recorder.opened.append(self)

    def log(self, scalars, step, picture):
        self.logged.append((step, scalars, picture))
        if Recorder.fail_log:
            raise OSError("disk full")

    def close(self):
        self.closed = True


@pytest.fixture()
def tiny(tmp_path, monkeypatch):
    teacher, student = make_tiny_pair(tmp_path)
    write_jsonl(tmp_path / "p.jsonl", [{"problem": f"What is {a} + 1?", "answer": str(a + 1)} for a in range(8)])
    monkeypatch.setattr(Recorder, "opened", [])
    for name in ALL:
        monkeypatch.setitem(tracking.ADAPTERS, name, Recorder)
    monkeypatch.setattr(tracking, "check", lambda names: None)  # Recorder needs no import
    return ["--teacher", teacher, "--student", student, "--dataset", str(tmp_path / "p.jsonl"),
            "--steps", "2", "--prompts-per-step", "2", "--samples-per-prompt", "2", "--max-new-tokens", "6",
            "--lr", "1e-3", "--output-dir", str(tmp_path / "out")]


def test_a_tracker_that_cannot_start_is_one_line_and_leaves_nothing(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Recorder, "fail_start", True)
    code, err = main_exit(tiny + ["--report-to", "wandb"], capsys)
    assert code == 2 and err == ("error: --report-to wandb: cannot start (ConnectionError: no route to "
                                 "the server)\n"), err
    assert not (tmp_path / "out").exists()


def test_when_a_later_tracker_cannot_start_the_earlier_ones_are_closed(tiny, tmp_path, monkeypatch):
    class Late(Recorder):
        def __init__(self, run):
            raise RuntimeError("refused")
    monkeypatch.setitem(tracking.ADAPTERS, "tensorboard", Late)
    args = distill.parse_args(tiny + ["--report-to", "tensorboard,trackio"])
    with pytest.raises(distill.UsageError, match="tensorboard: cannot start"):
        start(args, 0)
    assert [r.closed for r in Recorder.opened] == [True] and not (tmp_path / "out").exists()


def test_a_failing_log_call_is_reported_once_and_the_run_goes_on(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Recorder, "fail_log", True)
    distill.main(tiny + ["--report-to", "trackio,wandb"])
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: --report-to")]
    assert warnings == [  # one line per tracker, though both failed at both steps
        "warning: --report-to trackio failed at step 1 (OSError: disk full); the run goes on, "
        "metrics.jsonl has every step, and further failures of it are not reported",
        "warning: --report-to wandb failed at step 1 (OSError: disk full); the run goes on, "
        "metrics.jsonl has every step, and further failures of it are not reported"]
    records = [json.loads(line) for line in open(tmp_path / "out" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2]
    for tracker in Recorder.opened:  # each was still sent every step, and closed at the end
        assert [(step, scalars) for step, scalars, _ in tracker.logged] == [
            (r["step"], scalars_of(r)) for r in records]
        assert tracker.closed


def scalars_of(record):
    return {k: v for k, v in record.items() if k != "step"}


def test_only_rank_0_reports(tiny, tmp_path):
    args = distill.parse_args(tiny + ["--report-to", "trackio,wandb,tensorboard"])
    trackers = start(args, 1)
    assert trackers.adapters == {} and trackers.tokens() is None and Recorder.opened == []
    trackers.log({"step": 1, "loss": 0.5})  # a no-op
    assert not (tmp_path / "out").exists()
    assert list(start(args, 0).adapters) == ["trackio", "wandb", "tensorboard"]


def test_the_sweep_reports_one_run_per_configuration_and_seed_grouped(tiny, tmp_path):
    import distill
    import sweep
    teacher, student = tiny[1], tiny[3]
    pair = {"teacher": teacher, "student": student, "dataset": "unused.jsonl"}
    settings = {"steps": 2}
    for seed in (0, 1):  # the flags each run's distill.py process gets
        flags = sweep.command("soft-or", 0.5, seed, str(tmp_path / "sw" / f"soft-or-0.5-seed{seed}"),
                              settings, pair, report_to=["trackio", "wandb"])
        args = distill.parse_args(flags)
        assert args.report_to == ["trackio", "wandb"]
        start(args, 0).close()
    assert [(r.run["name"], r.run["group"], r.run["output_dir"]) for r in Recorder.opened] == [
        (f"sw-soft-or-0.5-seed{seed}", "sw-soft-or-0.5", str(tmp_path / "sw" / f"soft-or-0.5-seed{seed}"))
        for seed in (0, 1) for _ in ("trackio", "wandb")]
    assert Recorder.opened[0].run["config"]["rule"] == "soft-or" and all(r.closed for r in Recorder.opened)
    plain = sweep.command("all", 1.0, 0, str(tmp_path / "sw" / "all-1-seed0"), settings, pair)
    assert distill.parse_args(plain).report_to == [] and "--run-name" not in plain


@needs_trackers
def test_tensorboard_on_resume_hides_the_steps_after_the_checkpoint(tmp_path):
    """A run killed after logging steps 1-3 with its last checkpoint at step 1: the resumed run
    logs 2 and 3 again, and the reader sees each step once, with the resumed value."""
    run = {"output_dir": str(tmp_path), "resuming": False, "start": 0, "config": {"rule": "all"}}
    first = tracking.TensorBoard(run)
    for step in (1, 2, 3):
        first.log({"loss": float(step)}, step, None)
    first.close()
    again = tracking.TensorBoard({**run, "resuming": True, "start": 1})
    for step in (2, 3):
        again.log({"loss": 10.0 * step}, step, None)
    again.close()
    assert [(e.step, e.value) for e in tensorboard_events(tmp_path).Scalars("loss")] == [
        (1, 1.0), (2, 20.0), (3, 30.0)]
