"""Episodes: a task's prompt, playing it with a model in its sandbox, scoring what it delivered;
the benchmark and its table (task.py turns these into the task distill.py and evaluate.py run).
"""
import torch

from loading import UsageError
from parallel import rank, shared_map
from rollouts import run_episodes

from .data import resolve_data_dir, split_tasks, system_prompt, tool_schemas
from .sandbox import Sandbox
from .score import score_episode


def episode_prompt(tokenizer, task, enable_thinking=False):
    """The ids the student starts from: the agent's system prompt, the 9 tool schemas and the
    query, rendered by the tokenizer's own chat template (Qwen3: the hermes tool format)."""
    root, lang = resolve_data_dir(task.database_dir)
    if tokenizer.chat_template is None:
        raise UsageError("DeepPlanning needs a tokenizer with a chat template that renders tools")
    messages = [{"role": "system", "content": system_prompt(root, lang)},
                {"role": "user", "content": task.query}]
    text = tokenizer.apply_chat_template(messages, tools=tool_schemas(root, lang), tokenize=False,
                                         add_generation_prompt=True, enable_thinking=enable_thinking)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def training_tasks(tokenizer, data_dir, split, max_prompt_length, enable_thinking=False):
    """The split's tasks whose rendered prompt fits in `max_prompt_length` tokens, and how many
    did not (skipped, never truncated)."""
    tasks = split_tasks(data_dir, split)
    fits = [t for t in tasks if len(episode_prompt(tokenizer, t, enable_thinking)) <= max_prompt_length]
    if not fits:
        raise UsageError(f"every DeepPlanning {split} prompt is longer than --max-prompt-length "
                         f"{max_prompt_length}")
    return fits, len(tasks) - len(fits)


def play(model, tokenizer, tasks, samples=1, max_turns=40, max_new_tokens=4096,
         max_total_tokens=40960, temperature=1.0, top_p=1.0, batch_size=32, enable_thinking=False,
         progress=False):
    """`samples` episodes of each task (consecutive), each in its own fresh sandbox, scored.
    Returns [(task, rollouts.Episode, score_episode's dict)]; a truncated episode is undelivered."""
    plays = [t for t in tasks for _ in range(samples)]
    prompts = [episode_prompt(tokenizer, t, enable_thinking) for t in plays]
    tools = [Sandbox(t.database_dir, t.id).call for t in plays]
    episodes = run_episodes(model, tokenizer, prompts, tools, max_turns, max_new_tokens,
                            max_total_tokens, temperature, top_p, batch_size, enable_thinking,
                            progress)
    return [(t, e, score_episode("" if e.truncated else e.final, t)) for t, e in zip(plays, episodes)]


def record(task, episode, verdict):
    """One played episode as a flat record: what the evaluator writes and the training log sums."""
    return {"task_id": task.id, "messages": episode.messages, "turns": episode.turns,
            "tool_calls": episode.tool_calls, "truncated": episode.truncated,
            "tokens": len(episode.prompt) + len(episode.response), **verdict}


EPISODE_METRICS = ("turns", "tool_calls", "tokens", "delivered", "hard_fraction", "truncated")


def evaluate(model, tokenizer, data_dir, samples=1, temperature=0.0, top_p=1.0, max_new_tokens=4096,
             max_turns=40, max_total_tokens=40960, batch_size=32, enable_thinking=False, limit=None,
             seed=None, progress=False, tasks=None):
    """avg@k over the held-out tasks (evaluate.py's `deepplanning` benchmark): k episodes per task,
    each scored on its hard constraints. Returns (summary, one record per episode: messages, plan,
    verdicts). `mean` is the average hard_fraction over every episode (TIP's metric),
    `personalized` the average personalized_score (DeepPlanning's: 1 only when every constraint
    passes), `std` the spread of the k sample-wise averages of hard_fraction."""
    tasks = tasks if tasks is not None else split_tasks(data_dir, "heldout")[:limit]
    if seed is not None:
        torch.manual_seed(seed * 1_009 + rank())

    def episodes(share):  # this rank's tasks -> their k records each
        played = play(model, tokenizer, [tasks[i] for i in share], samples, max_turns,
                      max_new_tokens, max_total_tokens, temperature, top_p, batch_size,
                      enable_thinking, progress)
        rows = [{"benchmark": "deepplanning", "sample": j % samples, **record(*p)}
                for j, p in enumerate(played)]
        return [rows[k * samples:(k + 1) * samples] for k in range(len(share))]
    per_task = shared_map(len(tasks), episodes)  # under torchrun each rank plays its share
    rows = [row for task_rows in per_task for row in task_rows]
    per_sample = torch.tensor([[row["hard_fraction"] for row in task_rows] for task_rows in per_task],
                              dtype=torch.float64).mean(0)  # (k,): each sample's average
    mean = lambda key: sum(float(row[key]) for row in rows) / len(rows)  # noqa: E731
    summary = {"benchmark": "deepplanning", "n_problems": len(tasks), "samples": samples,
               "mean": mean("hard_fraction"), "std": per_sample.std(correction=0).item(),
               "personalized": mean("personalized_score"), "delivered": mean("delivered"),
               "tool_calls": mean("tool_calls"), "turns": mean("turns"),
               "truncated": mean("truncated"), "episode_tokens": mean("tokens")}
    return summary, rows


def markdown_table(summaries):
    """evaluate.py's table for this benchmark: one row per summary of `evaluate`."""
    lines = ["| benchmark | tasks | k | hard constraints % | ± std | all passed % | delivered % | "
             "tool calls | turns | truncated % | tokens |", "|---|" + "---:|" * 10]
    for s in summaries:
        shares = [f"{100 * s[k]:.1f}" for k in ("mean", "std", "personalized", "delivered")]
        lines.append(f"| {s['benchmark']} | {s['n_problems']} | {s['samples']} | " + " | ".join(shares)
                     + f" | {s['tool_calls']:.1f} | {s['turns']:.1f} | {100 * s['truncated']:.1f} | "
                     f"{s['episode_tokens']:.0f} |")
    return "\n".join(lines)
