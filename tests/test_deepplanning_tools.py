"""deepplanning/tools.py: every recorded official tool answer reproduced exactly, through the sandbox
(689 English calls, the 336 tool messages of ten Chinese runs), and upstream's quirks."""
import json

import deepplanning as dp
from deepplanning import tools
from deepplanning_data import EN_DB, FIXTURES, RUN, ZH_DB, needs_data

pytestmark = needs_data


def test_official_english_tool_calls_reproduced_exactly():
    rows = [json.loads(line) for line in (FIXTURES / "official_tools_en" / "tool_calls.jsonl").open()]
    wrong = [r for r in rows
             if dp.Sandbox(EN_DB, r["task_id"]).call(r["name"], r["arguments"]) != r["result"]]
    assert len(rows) == 689 and not wrong, wrong[:2]
    assert set(dp.TOOLS) <= {r["name"] for r in rows}  # every tool is exercised, and an unknown one
    assert '{"error": "tool \'recommend_around_restaurants\' not found"}' in {r["result"] for r in rows}


def test_chinese_trajectory_tool_messages_reproduced_exactly():
    n, wrong = 0, []
    for f in sorted((RUN / "trajectories").glob("id_*.json")):
        run = json.loads(f.read_text(encoding="utf-8"))
        sandbox, calls = dp.Sandbox(ZH_DB, run["id"].split("_")[1]), {}
        for m in run["messages"]:
            calls.update({c["id"]: c["function"] for c in m.get("tool_calls") or []})
            if m["role"] == "tool":
                fn, n = calls[m["tool_call_id"]], n + 1
                if sandbox.call(fn["name"], fn["arguments"]) != m["content"]:
                    wrong.append((f.name, fn))
    assert n == 336 and not wrong, wrong[:2]


def test_upstream_quirks_and_the_table_cache():
    sb = dp.Sandbox(EN_DB, "0")
    # a flight query that finds nothing answers upstream's TypeError text
    nothing = {"origin": "Hefei", "destination": "Nanjing", "depDate": "2030-01-01"}
    assert sb.call("query_flight_info", nothing) \
        == '{"error": "FlightQueryTool.<lambda>() missing 1 required positional argument: \'seat\'"}'
    no_flights = dp.Sandbox(EN_DB, 10)  # tasks without flights.csv answer upstream's not-loaded text
    assert no_flights.call("query_flight_info", {"origin": "a", "destination": "b", "depDate": "c"}) \
        == "No information found, please check input parameters"
    # empty cells print as nan where upstream prints them
    mall = sb.call("query_attraction_details", {"attraction_name": "Nanjing Deji Plaza"})
    assert "\nAddress：nan\n" in mall and "\nClosed Dates：nan\n" in mall
    assert tools._table(str(EN_DB / "id_0" / "hotels" / "hotels.csv")) is \
        tools._table(str(EN_DB / "id_0" / "hotels" / "hotels.csv"))  # read once, shared by every sample
