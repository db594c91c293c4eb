"""What a task is: the class a task subclasses, and the settings it is handed.

A task is what the student practises on and is measured by: math problems (single-turn rollouts,
graded by their boxed answer), DeepPlanning (multi-turn tool-use episodes, scored on hard
constraints), or yours. distill.py, evaluate.py and analysis.py run any task in tasks.TASKS
through the methods below and name none; adding one is a subclass in a file of its own and one
line in tasks.py (README, "Add your own task").

Nothing here imports a task, a model or the scripts above: the settings arrive as a `Settings`,
never as a script's argparse namespace, so a task depends on no script's flag names.
"""
from dataclasses import dataclass

from loading import UsageError

# The flags that only some tasks read. A task lists the ones it reads in `flags`; a run that sets
# one its task does not read is refused (refuse_unread), never silently ignored.
TASK_FLAGS = ("dataset", "split", "prompt_field", "data_dir", "max_turns", "max_total_tokens")


@dataclass
class Settings:
    """Everything a task reads, set by the script that runs it (None: the task's own default)."""
    dataset: str = None  # data: an HF dataset id or a local file (math)
    split: str = None  # its split
    prompt_field: str = None  # its prompt column (None: auto-detect)
    data_dir: str = None  # a task's data folder (DeepPlanning's travel folder)
    max_prompt_length: int = 2048  # longer prompts are skipped, never truncated
    enable_thinking: bool = False  # Qwen3 chat template thinking mode
    samples: int = 1  # rollouts (or completions, or episodes) per item
    max_new_tokens: int = 256  # response length, or of one turn of an episode
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 32  # sequences per generate call
    max_turns: int = 40  # episodes: assistant turns
    max_total_tokens: int = 40960  # episodes: prompt + every turn and tool answer
    benchmarks: tuple = ()  # what the run evaluates on (a task may follow tokens for one of them)
    seed: int = None  # evaluation: the completions are a function of (seed, rank)
    limit: int = None  # evaluation: the first N items only
    progress: bool = False  # a tqdm bar over generation


class Task:
    """One task. Override what yours needs; the defaults suit a single-turn task without extras.

    name        the --task value
    flags       which of TASK_FLAGS it reads
    benchmarks  the names evaluate.py (--benchmarks) and distill.py (--eval-benchmarks) accept
    defaults    distill.py's settings for real models where this task differs (e.g. longer prompts)
    laptop      distill.py's settings for the laptop pair (laptop_pair), if the task has one
    """
    name = "task"
    flags = ()
    benchmarks = ()
    defaults = {}
    laptop = {}

    # --- set-up: before anything is loaded -------------------------------------------------------
    def laptop_pair(self):
        """(teacher, student, distill settings) for a run given no --teacher/--student."""
        raise UsageError(f"--task {self.name} has no default pair: give --teacher and --student")

    def check(self, settings):
        """One-line errors (UsageError) for settings that cannot work, before anything loads."""

    def default_benchmarks(self):
        """What a run evaluates on when it is not told."""
        return list(self.benchmarks[:1])

    # --- training: items, then rollouts ----------------------------------------------------------
    def items(self, tokenizer, settings):
        """The items rollouts start from (e.g. prompt ids) and how many were skipped as too long."""
        raise NotImplementedError

    def describe(self, settings):
        """Where the items come from, for the start-up line."""
        return settings.dataset or settings.data_dir

    def positions(self, items, settings):
        """(positions a model must hold, the settings that ask for them): checked against the
        models' context before anything is generated. Single-turn: longest prompt + response."""
        longest = max(len(p) for p in items)
        return (longest + settings.max_new_tokens,
                f"the longest prompt, {longest} tokens, + --max-new-tokens {settings.max_new_tokens}")

    def rollouts(self, model, tokenizer, items, settings):
        """(rollouts.Rollouts, per-episode sums, their count): `settings.samples` rollouts per
        item, consecutive; masks keep only the student's own tokens, and `followed` may name token
        groups whose statistics distill.py logs. Sums are {name: Σ over episodes} (logged as
        episode/<name>, divided by the count summed over ranks); a single-turn task returns {}, 0."""
        raise NotImplementedError

    # --- evaluation ------------------------------------------------------------------------------
    def load_benchmark(self, name, settings, data=None):
        """A benchmark's problems, loaded before any model (a bad file fails in seconds);
        `data`: a local file given with evaluate.py's --data NAME=PATH."""
        raise NotImplementedError

    def evaluate(self, model, tokenizer, name, problems, settings):
        """(summary with at least "benchmark", "n_problems", "samples", "mean"; one row per
        completion or episode). Keys "mean/<part>" are logged per part."""
        raise NotImplementedError

    def table(self, summaries):
        """The markdown table of this task's summaries."""
        lines = ["| benchmark | problems | k | mean % |", "|---|---:|---:|---:|"]
        return "\n".join(lines + [f"| {s['benchmark']} | {s['n_problems']} | {s['samples']} | "
                                  f"{100 * s['mean']:.1f} |" for s in summaries])

    rows_file = "completions.jsonl"  # where evaluate.py writes the rows

    # --- analysis ----------------------------------------------------------------------------------
    def analysis_items(self, tokenizer, settings):
        """(the first `settings.limit` items analysis.py samples from, anything analysis_report
        wants to see again). Default: the training items, nothing more."""
        return self.items(tokenizer, settings)[0][:settings.limit], None

    def analysis_report(self, notes, rollouts, stats, mask, tokenizer, settings):
        """Extra lines for analysis.py's report (e.g. where the wrong rollouts go wrong), or ""."""
        return ""


def refuse_unread(values, task):
    """One line (UsageError) for a task flag set in `values` ({flag: value}) that `task` does not read."""
    unread = [f for f in TASK_FLAGS if values.get(f) is not None and f not in task.flags]
    if unread:
        raise UsageError(f"--{unread[0].replace('_', '-')} does not apply to --task {task.name}")
