"""deepplanning/data.py: tasks, tool schemas, system prompt, the committed split, one-line errors."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import deepplanning as dp
from deepplanning_data import DATA, EN_DB, MISSING_EN, RUN, ZH_DB, needs_data
from loading import UsageError

pytestmark = needs_data


def test_tasks_schemas_and_prompt():
    tasks = dp.load_tasks(DATA)
    assert [t.id for t in tasks] == sorted(set(range(120)) - MISSING_EN)
    assert tasks[0].query.startswith("I'm planning a two-day trip from Hefei to Nanjing")
    assert tasks[0].database_dir == str(EN_DB) and tasks[0].lang == "en"
    zh = [0, 2, 4, 12, 16, 18, 20, 22, 28, 38]
    assert [t.id for t in dp.load_tasks(ZH_DB)] == zh  # a database_zh folder means Chinese
    assert dp.resolve_data_dir(ZH_DB) == (str(DATA), "zh")
    assert dp.resolve_data_dir(DATA) == (str(DATA), "en")
    schemas = dp.tool_schemas(DATA)
    assert [s["type"] for s in schemas] == ["function"] * 9
    assert {s["function"]["name"] for s in schemas} == set(dp.TOOLS)
    run = json.loads((RUN / "trajectories" / "id_0.json").read_text(encoding="utf-8"))
    assert dp.system_prompt(DATA, "zh") == run["messages"][0]["content"]  # what the official run used
    assert dp.system_prompt(DATA).startswith("You are a top-tier travel planning expert.")


def test_split_is_stratified_and_reproducible(tmp_path):
    train, heldout = dp.split_ids("train"), dp.split_ids("heldout")
    assert (len(train), len(heldout)) == (78, 19) and not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(set(range(120)) - MISSING_EN)
    for days in range(2, 8):  # a fifth of each trip length, rounded
        n = sum(1 for i in train + heldout if i // 20 + 2 == days)
        assert sum(1 for i in heldout if i // 20 + 2 == days) == round(0.2 * n)
    remade = dp.make_split(DATA, path=tmp_path / "split.json")
    assert remade == {"train": train, "heldout": heldout}
    assert (tmp_path / "split.json").read_text() == Path(dp.SPLIT_PATH).read_text()
    assert dp.split_ids("heldout", ZH_DB) == [28]  # only the ids with a database there


def one_line_usage_error(fn, *args, match):
    with pytest.raises(UsageError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value)


def test_bad_input_is_a_one_line_usage_error(tmp_path):
    one_line_usage_error(dp.load_tasks, tmp_path / "nowhere", match="data directory not found")
    (tmp_path / "data").mkdir()
    one_line_usage_error(dp.load_tasks, tmp_path, match="data/travelplanning_query_en.json")
    one_line_usage_error(dp.resolve_data_dir, DATA, "fr", match="must be en or zh")
    one_line_usage_error(dp.load_tasks, DATA, "en", [0, 120], match="unknown DeepPlanning task id 120")
    one_line_usage_error(dp.load_tasks, DATA, "en", [62], match="task 62 has no complete database")
    one_line_usage_error(dp.load_tasks, DATA, "en", ["x"], match="must be a non-negative integer")
    one_line_usage_error(dp.split_ids, "test", match="unknown DeepPlanning split")
    empty = tmp_path / "travel"  # the right layout with no database in it
    for sub in ("data", "tools", "agent"):
        shutil.copytree(DATA / sub, empty / sub)
    (empty / "database" / "database_en").mkdir(parents=True)
    one_line_usage_error(dp.split_ids, "train", empty, match="split 'train' is empty")
    one_line_usage_error(dp.load_tasks, empty, match="no DeepPlanning task with a complete database")


def test_the_split_command_refuses_a_bad_folder_in_one_line():
    repo = Path(__file__).resolve().parents[1]
    before = Path(dp.SPLIT_PATH).read_bytes()
    r = subprocess.run([sys.executable, "-m", "deepplanning", str(repo / "no-such-folder")], cwd=repo,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: DeepPlanning data directory not found: {repo / 'no-such-folder'}"]
    assert Path(dp.SPLIT_PATH).read_bytes() == before  # nothing written
