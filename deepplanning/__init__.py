"""DeepPlanning Travel, offline: tasks, the 9 sandbox tools, a plan parser, the hard-constraint scorer.

DeepPlanning (Qwen team, arXiv 2601.18137): an agent plans a trip with 9 look-up tools over a per-task
database, then writes a day-by-day plan inside <plan></plan>, checked against the task's hidden hard
constraints (required trains/flights, hotel, restaurants, attractions, budget).

Data (pass its folder as `data_dir`; nothing is downloaded):
  * queries, tool schemas, system prompt: QwenLM/Qwen-Agent benchmark/deepplanning/travelplanning
    (data/travelplanning_query_{en,zh}.json, tools/tool_schema_{en,zh}.json, agent/prompts.py);
  * databases: the hub dataset Qwen/DeepPlanning, database_en.zip (and database_zh.zip), unzipped
    into that folder's database/: database/database_en/id_K/{trains,flights,hotels,...}/*.csv.

What is reproduced, and every departure from upstream:
  * Sandbox(database_dir, task_id).call(name, arguments) returns exactly the string the official loop
    (ToolsFnAgent._exec_tool over tools/*.py, with pandas 3 and jsonschema 4) puts in the tool
    message, quirks included: hotel and attraction look-ups ignore the city; a flight query that
    finds nothing answers a TypeError text (upstream's not-found lambda takes 4 arguments, gets 3);
    empty cells print as `nan` (NaN inside JSON). Departures: CSVs are read with `csv`, not pandas;
    arguments that decode to a string holding JSON5 but not JSON are refused (qwen-agent tries json5).
  * parse_plan is a rule-based parser of the plan format the system prompt asks for; upstream has an
    LLM convert the plan (FORMAT_CONVERT_PROMPT_*) into the same JSON. A plan written twice (the day
    numbers start again) is read once, as the official conversion did on the fixtures.
  * score_plan gives the verdicts and messages of evaluation/constraints_hard.py on that JSON; the
    commonsense score is not implemented. An undelivered plan fails every constraint ("no plan
    delivered"), where upstream writes no score at all.
  * The train/heldout split (data/deepplanning_split.json, written by make_split) is ours.

One concept per file, read in this order (each imports only the ones above it, and plumbing):
  data.py      folders, tasks, tool schemas, system prompt, the train/heldout split
  tools.py     the 9 tools over the task's CSVs, with upstream's texts and quirks
  sandbox.py   Sandbox: the official loop's rules around the tools
  plan.py      extract_plan, parse_plan: the final answer -> the converted-plan JSON
  score.py     score_plan, score_episode: the hard-constraint verdicts
  episodes.py  the episode prompt, play, the held-out benchmark and its table
  task.py      DeepPlanningTask: what distill.py, evaluate.py and analysis.py run (task_api.Task)
  __main__.py  `python -m deepplanning DATA_DIR` writes the split
Only episodes.py touches a model (and torch); the ~600 lines above it reproduce upstream.
"""
from .data import (SPLIT_PATH, Task, load_tasks, make_split, resolve_data_dir, split_ids, split_tasks,
                   system_prompt, tool_schemas)
from .episodes import (EPISODE_METRICS, episode_prompt, evaluate, markdown_table, play, record,
                       training_tasks)
from .plan import extract_plan, parse_plan
from .sandbox import Sandbox
from .task import DeepPlanningTask
from .score import score_episode, score_plan
from .tools import TOOLS

__all__ = ["SPLIT_PATH", "Task", "load_tasks", "make_split", "resolve_data_dir", "split_ids", "split_tasks",
           "system_prompt", "tool_schemas", "TOOLS", "Sandbox", "extract_plan", "parse_plan", "score_plan",
           "score_episode", "EPISODE_METRICS", "episode_prompt", "training_tasks", "play", "record",
           "evaluate", "markdown_table", "DeepPlanningTask"]
