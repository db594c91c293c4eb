"""One task's sandbox: the official loop's rules around the 9 tools (ToolsFnAgent._exec_tool).

Departure: arguments that decode to a string holding JSON5 but not JSON are refused (qwen-agent
tries json5).
"""
import functools
import json
import os

import jsonschema

from loading import UsageError

from .data import _task_id, resolve_data_dir, tool_schemas
from .tools import TEXT, TOOLS, _dumps, _table


@functools.lru_cache(maxsize=None)
def _validators(root, lang):
    """A checked validator per tool (jsonschema.validate would check the schema again every call)."""
    out = {}
    for tool in tool_schemas(root, lang):
        schema = tool["function"]["parameters"]
        jsonschema.validators.validator_for(schema).check_schema(schema)
        out[tool["function"]["name"]] = jsonschema.validators.validator_for(schema)(schema)
    return out


class Sandbox:
    """One task's tools. The loop's rules: an unknown tool is an error; arguments that are not JSON
    are {}; a JSON string is decoded once more; then schema validation; any exception is answered
    {"error": str(exception)}. Nothing a model writes makes call() raise."""

    def __init__(self, database_dir, task_id):
        root, self.lang = resolve_data_dir(database_dir)
        if os.path.basename(os.path.abspath(os.fspath(database_dir))) != f"database_{self.lang}":
            raise UsageError(f"Sandbox needs a database_en or database_zh folder, got {database_dir}")
        self.dir = os.path.join(os.path.abspath(os.fspath(database_dir)), f"id_{_task_id(task_id)}")
        if not os.path.isdir(self.dir):
            raise UsageError(f"no database for DeepPlanning task {task_id}: {self.dir} is missing")
        self.validators = _validators(root, self.lang)
        self.text = {k: v[self.lang == "zh"] for k, v in TEXT.items()}

    def call(self, name, arguments):
        if not isinstance(name, str) or name not in TOOLS:
            return _dumps({"error": f"tool '{name}' not found"}, None)
        if isinstance(arguments, (str, bytes)) or arguments is None:
            try:
                arguments = json.loads(arguments) if arguments else {}
            except Exception:
                arguments = {}
        fn, rel = TOOLS[name]
        try:
            if isinstance(arguments, str):  # qwen-agent's json_loads, minus its json5 fallback
                text = arguments.strip("\n")
                if text.startswith("```") and text.endswith("\n```"):
                    text = "\n".join(text.split("\n")[1:-1])
                try:
                    arguments = json.loads(text)
                except json.JSONDecodeError:
                    raise ValueError("Parameters must be formatted as a valid JSON!")
            error = jsonschema.exceptions.best_match(self.validators[name].iter_errors(arguments))
            if error is not None:  # what jsonschema.validate raises, as upstream calls it
                raise error
            return fn(_table(os.path.join(self.dir, rel)), arguments, self.text)
        except Exception as e:
            return _dumps({"error": str(e)}, None)
