"""DeepPlanning's data: the travel folder, its tasks, the tool schemas and system prompt, the split.

A task is loaded when its database is complete; its `meta_info` holds the answers (the hard
constraints) and goes to the scorer, never to the policy. The train/heldout split
(data/deepplanning_split.json, written by make_split: `python -m deepplanning DATA_DIR`) is ours.
"""
import ast
import functools
import json
import os
import random
import re
from dataclasses import dataclass

from loading import UsageError

# the split lives in the repository's data/ folder, beside this package
SPLIT_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data",
                          "deepplanning_split.json")
NEEDED = ("hotels/hotels.csv", "attractions/attractions.csv", "restaurants/restaurants.csv",
          "locations/locations_coords.csv", "transportation/distance_matrix.csv")


@dataclass
class Task:
    id: int
    query: str
    meta_info: dict  # holds the answers (hard_constraints): for the scorer, never for the policy
    database_dir: str  # the database_{lang} folder: Sandbox(task.database_dir, task.id)
    lang: str = "en"


def resolve_data_dir(path, lang=None):
    """The travel folder (data/, tools/, agent/, database/) or a database_en/_zh folder inside it
    -> (root, lang); a database folder fixes the language. Anything else: UsageError."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise UsageError(f"DeepPlanning data directory not found: {path}")
    if os.path.basename(path) in ("database_en", "database_zh"):
        root, lang = os.path.dirname(os.path.dirname(path)), os.path.basename(path)[-2:]
    else:
        root, lang = path, lang or "en"
    if lang not in ("en", "zh"):
        raise UsageError(f"DeepPlanning language must be en or zh, got {lang!r}")
    for rel in (f"data/travelplanning_query_{lang}.json", f"tools/tool_schema_{lang}.json",
                "agent/prompts.py", f"database/database_{lang}"):
        if not os.path.exists(os.path.join(root, rel)):
            raise UsageError(f"{path} is not a DeepPlanning travel folder: no {rel} under {root}")
    return root, lang


def _complete(task_dir):
    """Usable database: the five tables every task has, and trains or flights (some lack one)."""
    has = lambda rel: os.path.isfile(os.path.join(task_dir, rel))
    return all(map(has, NEEDED)) and (has("trains/trains.csv") or has("flights/flights.csv"))


def _task_id(x):
    if not re.fullmatch(r"\d+", str(x).strip()):
        raise UsageError(f"DeepPlanning task id must be a non-negative integer, got {x!r}")
    return int(x)


def load_tasks(data_dir, lang="en", ids=None):
    """The tasks asked for, or (ids None) every task whose database is complete."""
    root, lang = resolve_data_dir(data_dir, lang)
    with open(os.path.join(root, "data", f"travelplanning_query_{lang}.json"), encoding="utf-8") as f:
        rows = {int(r["id"]): r for r in json.load(f)}
    db = os.path.join(root, "database", f"database_{lang}")
    if ids is None:
        ids = [i for i in sorted(rows) if _complete(os.path.join(db, f"id_{i}"))]
    tasks = []
    for i in map(_task_id, ids):
        if i not in rows:
            raise UsageError(f"unknown DeepPlanning task id {i} (the ids are {min(rows)}-{max(rows)})")
        if not _complete(os.path.join(db, f"id_{i}")):
            raise UsageError(f"DeepPlanning task {i} has no complete database under {db}")
        tasks.append(Task(i, rows[i]["query"], rows[i]["meta_info"], db, lang))
    if not tasks:
        raise UsageError(f"no DeepPlanning task with a complete database under {db}")
    return tasks


@functools.lru_cache(maxsize=None)  # read once, not once per episode (callers must not mutate it)
def tool_schemas(data_dir, lang="en"):
    """The 9 tools in OpenAI function format, as a chat template's `tools=` takes them."""
    root, lang = resolve_data_dir(data_dir, lang)
    with open(os.path.join(root, "tools", f"tool_schema_{lang}.json"), encoding="utf-8") as f:
        return json.load(f)


@functools.lru_cache(maxsize=None)  # parsed once, not once per episode
def system_prompt(data_dir, lang="en"):
    """SYSTEM_PROMPT_EN/_ZH of agent/prompts.py, read with ast, never run. Upstream's loop fills in
    nothing (no date): the constant is the system message as it is."""
    root, lang = resolve_data_dir(data_dir, lang)
    path, want = os.path.join(root, "agent", "prompts.py"), f"SYSTEM_PROMPT_{lang.upper()}"
    with open(path, encoding="utf-8") as f:
        for node in ast.parse(f.read()).body:
            if (isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [want]
                    and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
                return node.value.value
    raise UsageError(f"{path} defines no string constant {want}")


def make_split(data_dir, heldout_fraction=0.2, seed=0, path=SPLIT_PATH):
    """Write the train/heldout split of the complete English tasks, stratified by trip length (ids
    20k..20k+19 are (k+2)-day trips): each stratum is shuffled with a fixed seed and its first
    round(fraction * size) ids are held out."""
    ids, split = [t.id for t in load_tasks(data_dir, "en")], {"train": [], "heldout": []}
    for days in range(2, 8):
        group = [i for i in ids if i // 20 + 2 == days]
        random.Random(seed * 100 + days).shuffle(group)
        n = round(heldout_fraction * len(group))
        split["heldout"] += sorted(group[:n])
        split["train"] += sorted(group[n:])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"about": f"DeepPlanning Travel (en) split, deepplanning.make_split(seed={seed})",
                   **split}, f)
        f.write("\n")
    return split


def split_ids(name, data_dir=None):
    """Task ids of the committed split; with data_dir, only those with a complete database there."""
    if name not in ("train", "heldout"):
        raise UsageError(f"unknown DeepPlanning split {name!r} (train or heldout)")
    with open(SPLIT_PATH, encoding="utf-8") as f:
        ids = json.load(f)[name]
    if data_dir is not None:
        root, lang = resolve_data_dir(data_dir)
        db = os.path.join(root, "database", f"database_{lang}")
        ids = [i for i in ids if _complete(os.path.join(db, f"id_{i}"))]
    if not ids:
        where = f" under {data_dir}" if data_dir else ""
        raise UsageError(f"DeepPlanning split {name!r} is empty{where}")
    return ids


def split_tasks(data_dir, split):
    """The tasks of the committed split ("train" or "heldout") that `data_dir` holds complete."""
    root, lang = resolve_data_dir(data_dir)
    return load_tasks(root, lang, split_ids(split, data_dir))
