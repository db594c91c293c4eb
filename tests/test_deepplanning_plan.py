"""deepplanning/plan.py: the plan taken from the final answer, and parsed like the official LLM
conversion (English and Chinese, the prompts' own examples and names that hold separators)."""
import json

import deepplanning as dp
from deepplanning_data import DATA, RUN, needs_data

pytestmark = needs_data


def test_extract_plan():
    for f in sorted((RUN / "trajectories").glob("id_*.json")):
        run = json.loads(f.read_text(encoding="utf-8"))
        assert dp.extract_plan(run["messages"][-1]["content"]) == run["final_plan"]
    text = "<think>draft <plan>x</plan></think>\n<plan>\n a \n</plan> <PLAN>b</PLAN>"
    assert dp.extract_plan(text) == "a\n\nb"  # after the thinking; blocks joined
    assert dp.extract_plan("no plan here") is None and dp.extract_plan(None) is None
    assert dp.extract_plan("<plan> </plan>") is None and dp.extract_plan("<plan>unclosed") is None


def test_parse_english_plans():
    example = dp.parse_plan(dp.extract_plan(dp.system_prompt(DATA)))  # the prompt's complete example
    assert example["budget_summary"] == {"transportation": 2820, "accommodation": 2000, "meals": 1100,
                                         "attractions_and_tickets": 360, "other": 0,
                                         "total_estimated_budget": 6280, "currency": "CNY"}
    d1, d2, d3 = example["daily_plans"]
    assert (d1["day_number"], d1["current_city"], d3["current_city"]) == (1, "from Shanghai to Beijing",
                                                                         "from Beijing to Shanghai")
    hotel = "Beijing Wangfujing Mandarin Oriental Hotel"
    assert d1["accommodation"] == {"name": hotel, "price_per_night": 1000}
    assert "accommodation" not in d3  # 'Accommodation: -'
    airport = "Beijing Capital International Airport"
    flight = {"mode": "flight", "number": "CA1234", "from": "Shanghai Hongqiao International Airport",
              "to": airport, "cost": 650}
    assert d1["activities"][0] == {"time_slot": "07:00-09:00", "type": "travel_intercity_public",
                                   "details": flight}
    acts = [a["details"] for a in d1["activities"]]
    assert acts[2] == {"from": airport, "to": hotel, "distance": "30km", "duration": "60min", "cost": 30}
    assert acts[3] == {"activity": "Check-in", "name": hotel}
    duck = "Siji Minfu Roast Duck Restaurant (Wangfujing Branch)"
    assert acts[5] == {"meal_type": "Lunch", "name": duck, "cost": 150}
    great_wall = {"name": "Badaling Great Wall", "city": "Beijing", "cost": 40}
    assert d2["activities"][1]["details"] == great_wall
    assert d3["activities"][1]["details"]["city"] == "Beijing"  # before the flight home
    assert [a["type"] for a in d3["activities"]][-2:] == ["buffer", "travel_intercity_public"]

    hotel = "Home Inn·Neo - Shanghai North Bund Branch"  # names with ' - ' and commas, as in the data
    cafe = "Little George Cafe (Lane 1782, West Yan'an Road, Community Store 1-4)"
    sight = "Purple Mountain Observatory, Chinese Academy of Sciences"
    south, north = "Shanghai Pudong International Airport", "Dalian Zhoushuizi International Airport"
    tricky = dp.parse_plan(f"""### Day 1:
**Current City:** from Dalian to Shanghai
**Accommodation:** {hotel}, ¥1,200/room/night
- 08:00-13:30 | travel_intercity_public | G1234, Dalian North Station - Shanghai Hongqiao Station, ¥553.5
- 13:30-14:10 | travel_city | Shanghai Hongqiao Station - {hotel}, 21.4km, 40min, ¥76
- 14:10-14:30 | hotel | Check-in, {hotel}
- 14:30-15:00 | travel_city | {hotel} - {sight}, 3km, 30min, ¥0
- 15:00-17:00 | attraction | {sight}, Free
- 17:00-18:00 | meal | Dinner, {cafe}, ¥1,050/person
- 18:00-24:00 | hotel | Rest
### Day 2:
Current City: from Shanghai to Dalian
Accommodation: -
08:00-10:00 | travel_intercity_public | flight MU5131, {south} - {north}, ¥395
**Budget Summary**:
- **Transportation: 1,100 RMB**
- Day 1: 100 RMB
- **Total Estimated Budget: ¥3,500**
""")
    day1, day2 = tricky["daily_plans"]
    assert day1["accommodation"] == {"name": hotel, "price_per_night": 1200}
    acts = [a["details"] for a in day1["activities"]]
    assert acts[0] == {"mode": "train", "number": "G1234", "from": "Dalian North Station",
                       "to": "Shanghai Hongqiao Station", "cost": 553.5}
    assert (acts[1]["from"], acts[1]["to"], acts[1]["cost"]) == ("Shanghai Hongqiao Station", hotel, 76)
    assert acts[2] == {"activity": "Check-in", "name": hotel}
    assert (acts[3]["from"], acts[3]["to"]) == (hotel, sight)
    assert acts[4] == {"name": sight, "city": "Shanghai", "cost": 0}
    assert acts[5] == {"meal_type": "Dinner", "name": cafe, "cost": 1050}
    assert acts[6] == {"activity": "Rest", "name": hotel}  # a bare 'Rest' is at the night's hotel
    assert "accommodation" not in day2
    assert day2["activities"][0]["details"] == {"mode": "flight", "number": "MU5131", "from": south,
                                                "to": north, "cost": 395}
    assert tricky["budget_summary"]["transportation"] == 1100
    assert tricky["budget_summary"]["total_estimated_budget"] == 3500


def test_parse_chinese_prompt_example():
    days = dp.parse_plan(dp.extract_plan(dp.system_prompt(DATA, "zh")))["daily_plans"]
    first = days[0]["activities"]
    assert first[0]["details"] == {"mode": "flight", "number": "CA1234", "from": "上海虹桥国际机场",
                                   "to": "北京首都国际机场", "cost": 650}
    assert next(a["details"] for a in first if a["type"] == "meal")["meal_type"] == "午餐"
    assert "accommodation" not in days[-1]
