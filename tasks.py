"""The task registry: every task distill.py, evaluate.py and analysis.py can run, by name.

A task is a task_api.Task: its training items, its rollouts (single-turn, or episodes with their
per-episode sums), its benchmarks, table and analysis extras, its defaults and its checks. Adding
one is a file with a Task subclass and one line below (README, "Add your own task"); the scripts
above name no task.

    TASKS              name -> task, in --task's order; DEFAULT the one a run gets unasked
    get(name)          the task, or one line naming the valid ones
    check(task, flags) a task flag the task does not read, then its own checks: one line each
    owner(benchmark)   the task whose benchmark that is
    add_flags(p)       the flags only some tasks read (task_api.TASK_FLAGS), with their help
"""
import deepplanning
from loading import UsageError
from math_task import MathTask
from task_api import TASK_FLAGS, Settings, Task, refuse_unread  # noqa: F401 (the scripts' imports)

TASKS = {}


def register(task):
    """Add a task (a task_api.Task) under its name; its benchmarks must not clash with another's."""
    taken = {b for t in TASKS.values() if t.name != task.name for b in t.benchmarks}
    if taken & set(task.benchmarks):
        raise ValueError(f"benchmark {sorted(taken & set(task.benchmarks))[0]!r} already has a task")
    TASKS[task.name] = task
    return task


register(MathTask())  # the default: the toy pair on a laptop, MATH-style data on real models
register(deepplanning.DeepPlanningTask())
DEFAULT = "math"


def get(name):
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; valid: {', '.join(TASKS)}")
    return TASKS[name]


def owner(benchmark, local=False):
    """The task that evaluates `benchmark`; a name given a local file (`local`) is the default
    task's (a file of problems and answers)."""
    found = [t for t in TASKS.values() if benchmark in t.benchmarks]
    if found:
        return found[0]
    if local:
        return TASKS[DEFAULT]
    valid = ", ".join(b for t in TASKS.values() for b in t.benchmarks)
    raise UsageError(f"unknown benchmark {benchmark!r}; valid: {valid}, or any name given a file "
                     "with --data NAME=PATH")


def check(task, flags):
    """Before anything loads, one line (UsageError) for a task flag that `task` does not read, then
    the task's own checks. `flags`: {name: value} holding the task flags (None: not given)."""
    refuse_unread(flags, task)
    task.check(Settings(**{f: flags[f] for f in task.flags if flags.get(f) is not None}))


HELP = {"dataset": "math: HF dataset id or local .jsonl/.json/.parquet",
        "split": "math: dataset split (hub datasets; default train, analysis: test)",
        "prompt_field": "math: prompt column (default: the first of loading.PROMPT_FIELDS present)",
        "data_dir": "deepplanning: the travel folder (data/, tools/, agent/, database/) or its "
                    "database_en / database_zh folder",
        "max_turns": f"deepplanning: assistant turns per episode (default {Settings.max_turns})",
        "max_total_tokens": "deepplanning: prompt + every turn and tool answer of an episode "
                            f"(default {Settings.max_total_tokens})"}


def add_flags(p, names=TASK_FLAGS, task=True, dataset_help=None):
    """--task (unless not `task`) and the task flags `names`, each refused where its task does not
    read it (task_api.refuse_unread)."""
    if task:
        p.add_argument("--task", default=DEFAULT, choices=list(TASKS),
                       help="what the student practises on: " + "; ".join(
                           f"{t.name}: {(t.__doc__ or '').strip().splitlines()[0]}" for t in TASKS.values()
                           if t.__doc__))
    for name in names:
        kind = int if name in ("max_turns", "max_total_tokens") else None
        text = dataset_help if (name == "dataset" and dataset_help) else HELP[name]
        p.add_argument("--" + name.replace("_", "-"), type=kind, help=text)
