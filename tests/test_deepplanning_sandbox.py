"""deepplanning/sandbox.py: the official loop's rules for whatever a model writes as a tool call."""
import json

import pytest

import deepplanning as dp
from deepplanning_data import DATA, EN_DB, needs_data
from loading import UsageError

pytestmark = needs_data


def test_sandbox_rules_for_model_made_input():
    sb = dp.Sandbox(EN_DB, "0")
    place = sb.call("search_location", {"place_name": "Laomendong"})
    assert json.loads(place) == {"place_name": "Laomendong", "latitude": "32.011682",
                                 "longitude": "118.787631"}
    assert sb.call("search_location", '{"place_name": "Laomendong"}') == place  # a dict or its JSON
    double = json.dumps('{"place_name": "Laomendong"}')  # a JSON string holding the JSON
    assert sb.call("search_location", double) == place
    assert sb.call("search_location", json.dumps('```json\n{"place_name": "Laomendong"}\n```')) == place
    assert sb.call("search_location", '"no json"') \
        == '{"error": "Parameters must be formatted as a valid JSON!"}'
    assert sb.call("nope", "{}") == '{"error": "tool \'nope\' not found"}'
    assert sb.call(None, None) == '{"error": "tool \'None\' not found"}'
    for junk in ("{", "", None, b"{}", "{}"):  # not JSON or empty -> {} -> the schema's complaint
        answer = sb.call("search_location", junk)
        assert answer.startswith('{"error": "\'place_name\' is a required property')
    assert sb.call("search_location", "7").startswith('{"error": "7 is not of type \'object\'')


def test_a_sandbox_needs_a_task_database():
    with pytest.raises(UsageError, match="no database for DeepPlanning task 62") as e:
        dp.Sandbox(EN_DB, 62)
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="database_en or database_zh folder"):
        dp.Sandbox(DATA, 0)
