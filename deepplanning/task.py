"""DeepPlanning as a task (task_api.Task): its train split's tasks played as tool-use episodes for
distill.py, its held-out split for evaluate.py (`deepplanning`, avg@k of hard constraints) and
analysis.py. Only the student's own tokens are trained and scored; tool answers are masked out.
"""
from loading import UsageError
from rollouts import as_rollouts
from task_api import Task

from .data import resolve_data_dir, split_tasks
from .episodes import EPISODE_METRICS, evaluate, markdown_table, play, record, training_tasks


class DeepPlanningTask(Task):
    """multi-turn tool-use episodes on the DeepPlanning travel tasks in --data-dir"""
    name = "deepplanning"
    flags = ("data_dir", "max_turns", "max_total_tokens")
    benchmarks = ("deepplanning",)
    # ~6k-token prompts, long tool-use episodes: all ours
    defaults = dict(max_prompt_length=16384, max_new_tokens=4096, prompts_per_step=8, samples_per_prompt=4)
    rows_file = "episodes.jsonl"

    def laptop_pair(self):
        raise UsageError("--task deepplanning needs --teacher and --student (models whose chat "
                         "template renders tools)")

    def check(self, settings):
        if not settings.data_dir:
            raise UsageError("--task deepplanning needs --data-dir (the DeepPlanning travel folder)")
        resolve_data_dir(settings.data_dir)  # a missing or wrongly laid out folder: one line

    def describe(self, settings):
        return settings.data_dir

    def items(self, tokenizer, settings):
        return training_tasks(tokenizer, settings.data_dir, "train", settings.max_prompt_length,
                              settings.enable_thinking)

    def positions(self, items, settings):
        return settings.max_total_tokens, "--max-total-tokens, the length of an episode"

    def rollouts(self, model, tokenizer, items, settings):
        """`settings.samples` episodes per task; the sums of EPISODE_METRICS over them."""
        s = settings
        played = play(model, tokenizer, items, s.samples, s.max_turns, s.max_new_tokens,
                      s.max_total_tokens, s.temperature, s.top_p, s.batch_size, s.enable_thinking,
                      s.progress)
        records = [record(*p) for p in played]
        sums = {k: sum(float(r[k]) for r in records) for k in EPISODE_METRICS}
        return as_rollouts([e for _, e, _ in played]), sums, len(records)

    def load_benchmark(self, name, settings, data=None):
        self.check(settings)
        return split_tasks(settings.data_dir, "heldout")[:settings.limit]

    def evaluate(self, model, tokenizer, name, problems, settings):
        s = settings
        return evaluate(model, tokenizer, s.data_dir, s.samples, s.temperature, s.top_p,
                        s.max_new_tokens, s.max_turns, s.max_total_tokens, s.batch_size,
                        s.enable_thinking, s.limit, s.seed, s.progress, problems)

    def table(self, summaries):
        return markdown_table(summaries)

    def analysis_items(self, tokenizer, settings):
        return split_tasks(settings.data_dir, "heldout")[:settings.limit], None
