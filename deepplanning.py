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
"""
import ast
import csv
import functools
import json
import os
import random
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import jsonschema
import torch

from loading import ArgumentParser, UsageError
from parallel import rank, shared_map
from rollouts import as_rollouts, run_episodes

SPLIT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "deepplanning_split.json")
NEEDED = ("hotels/hotels.csv", "attractions/attractions.csv", "restaurants/restaurants.csv",
          "locations/locations_coords.csv", "transportation/distance_matrix.csv")


@dataclass
class Task:
    id: int
    query: str
    meta_info: dict  # holds the answers (hard_constraints): for the scorer, never for the policy
    database_dir: str  # the database_{lang} folder: Sandbox(task.database_dir, task.id)
    lang: str = "en"


# ---------------------------------------------------------------------------------------------
# Data: folders, tasks, schemas, prompt, split
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# The sandbox: the 9 tools, answering what upstream's tools/*.py answer
# ---------------------------------------------------------------------------------------------

NAN = float("nan")  # an empty cell as pandas reads it (dtype=str): str() is 'nan', JSON has NaN
NA_CELLS = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
            "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}  # pandas' defaults
_CACHE, _LOCK, CACHE_FILES = OrderedDict(), threading.Lock(), 64  # tables kept, least recent dropped
TEXT = {  # upstream's fixed texts, (English, Chinese): the database folder's language picks one
    "seg": ("Segment {}", "第{}段"), "seats": ("Remaining Seats", "剩余票数量"),
    "available": ("Available", "充足"), "station": (" Station", "站"),
    "db": ("Database not loaded", "数据库未加载"), "train_none": ("No information found", "未查询到信息"),
    "flight_none": ("No information found, please check input parameters", "未查询到信息，请检查输入参数"),
    "train_missing": ("No train information found from {} to {} on {}", "未找到从 {} 到 {} 在 {} 的火车票信息"),
    "hotel_missing": ("No hotel information found in {} from {} to {}, please check parameters or "
                      "reduce constraints", "未找到满足条件的 {} 在 {} 到 {} 的酒店信息,请检查参数信息或减少约束条件"),
    "attr_missing": ("Detailed information not found for attraction {}", "未找到景点 {} 的详细信息"),
    "rec_head": ("Recommended attractions:\n", "推荐的景点有：\n"),
    "rec_line": ("{}, {}. This is a {} type attraction", "{}，{}这是一个{}类型的景点"),
    "rec_none": ("No attraction recommendations found", "未找到景点推荐"),
    "loc_missing": ("Coordinate information not found for location {}, please check: 1. Whether the "
                    "place name comes from other tool results; 2. Whether the place name is exactly "
                    "consistent with tool results, no abbreviation, renaming or additional description "
                    "allowed", "未找到地点 {} 的坐标信息, 请检查：1. 地点名称是否来自其他工具的返回结果; "
                    "2. 地点名称是否与工具返回结果保持完全一致，不得缩写、改名或添加额外描述"),
    "rest_missing": ("No recommended restaurants found near coordinates ({}, {}), please check "
                     "coordinate source", "未找到坐标 ({}, {}) 附近的推荐餐厅, 请检查坐标来源"),
    "detail_missing": ("Detailed information not found for restaurant {}", "未找到餐厅 {} 的详细信息"),
    "route_missing": ("No transportation information found from {} to {}", "未找到从 {} 到 {} 的交通信息"),
    "coord": ("Coordinate {} is not in query range, please check:\n1. Whether coordinate comes from "
              "valid tool query result, not manual input or fabrication;\n2. Whether coordinate "
              "precision is exactly consistent with query result, 6 decimal places",
              "坐标 {} 不在查询范围内，请检查：\n1. 坐标是否源自有效的工具查询结果，而非手动输入或编造；\n"
              "2. 坐标数值精度是否与查询结果保持完全一致,6位小数"),
    "labels": (("Attraction ID", "Attraction Name", "City", "Address", "Coordinates", "Latitude",
                "Longitude", "Description", "Rating", "(average visitor rating)", "Opening Hours", "to",
                "Closed Dates", "Minimum Visit Duration", "Maximum Visit Duration", "hours",
                "Ticket Price", "RMB", "Attraction Type"),
               ("景点ID", "景点名称", "所属城市", "地址", "经纬度坐标", "纬度", "经度", "景点简介", "用户评分",
                "（游客平均评价）", "开放时间", "至", "闭馆日期", "建议最短游玩时长", "建议最长游玩时长",
                "小时", "门票价格", "元", "景点类型")),
}


def _dumps(obj, indent=2):
    return json.dumps(obj, ensure_ascii=False, indent=indent)


def _is_nan(v):
    return isinstance(v, float) and v != v


def _float(v):
    """float(v), or None where upstream catches the failure and skips the value."""
    try:
        return float(v)
    except Exception:
        return None


def _table(path):
    """(columns, rows as dicts) of a CSV, read once; None when absent (the tool then answers its
    'not loaded' text). The distance matrix (45k rows) keeps only the first row of each pair."""
    with _LOCK:  # rollouts may call tools from several threads
        if path in _CACHE:
            _CACHE.move_to_end(path)
            return _CACHE[path]
    table = None
    if os.path.isfile(path):
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            cols = next(reader, [])
            rows = ({c: NAN if v in NA_CELLS else v for c, v in zip(cols, r + [""] * len(cols))}
                    for r in reader if r)  # a short row is padded with empty cells, as pandas does
            if path.endswith("distance_matrix.csv"):
                first = {}
                for r in rows:
                    first.setdefault((r["origin"], r["destination"]), r)
                table = (cols, {c for pair in first for c in pair}, first)
            else:
                table = (cols, list(rows))
    with _LOCK:
        _CACHE[path] = table
        while len(_CACHE) > CACHE_FILES:
            _CACHE.popitem(last=False)
    return table


def _transport(table, p, T, train):
    origin, dest, date = p.get("origin"), p.get("destination"), p.get("depDate")
    seat = p.get("seatClassName", "")
    if table is None:
        return T["train_none" if train else "flight_none"]
    hits = [r for r in table[1] if r["origin_city"] == origin and r["destination_city"] == dest
            and r["dep_date"] == date and (not seat or r["seat_class"] == seat)]
    if not hits:
        if train:
            return T["train_missing"].format(origin, dest, date)
        # upstream's flight not-found text is a lambda of 4 arguments called with 3: every empty
        # flight query raises, and the loop answers this text. Reproduced, not fixed.
        raise TypeError("FlightQueryTool.<lambda>() missing 1 required positional argument: 'seat'")
    routes = []
    for route in sorted(dict.fromkeys(r["route_index"] for r in hits)):  # string order, as upstream
        legs = sorted((r for r in hits if r["route_index"] == route),
                      key=lambda r: (_is_nan(r["segment_index"]), str(r["segment_index"])))
        out = {}
        for i, r in enumerate(legs, 1):
            status = r["seat_status"]
            if str(status).strip() == "" or str(status).lower() == "nan":
                status = T["available"]
            out[T["seg"].format(i)] = leg = {
                "arrCityName": r["destination_city"], "arrStationCode": r["arr_station_code"],
                "arrStationName": r["arr_station_name"],  # a train's later legs leave from the city
                "depCityName": r["origin_city"] if i == 1 or not train  # of the previous arrival
                else legs[i - 2]["arr_station_name"].split(T["station"])[0],
                "depStationCode": r["dep_station_code"], "depStationName": r["dep_station_name"],
                "duration": int(r["duration"]), "arrDateTime": r["arr_datetime"],
                "depDateTime": r["dep_datetime"],
                "marketingTransportName": r["train_type" if train else "airline"],
                "marketingTransportNo": r["train_no" if train else "flight_no"],
                "seatClassName": r["seat_class"], T["seats"]: status}
            if not train:
                leg.update(equipSize=r["equip_size"], equipType=r["equip_type"],
                           manufacturer=r["manufacturer"])
        price = _float(legs[0]["price"])  # the first leg carries the whole route's fare
        out["price"] = price if price is not None else 0
        routes.append([out] if train else out)
    return _dumps(routes)


def _listed(d, r, col):
    """A ';'-separated cell (services, tags) is listed only when it holds text."""
    if col in r and isinstance(r[col], str) and r[col].strip():
        d[col] = r[col].split(";")
    return d


def _hotels(table, p, T):
    star, brand = p.get("hotelStar", ""), p.get("hotelBrands", "")
    if table is None:
        return T["db"]
    hits = [r for r in table[1]  # the destination filters nothing: every hotel of the task's database
            if (not star or r["hotel_star"] == star) and (not brand or r["brand"] == brand)]
    if not hits:
        return T["hotel_missing"].format(*map(p.get, ("destination", "checkinDate", "checkoutDate")))
    text = lambda v: "" if v is None or _is_nan(v) else str(v)  # hotels print an empty cell as ""
    keys = {"name": "name", "address": "address", "latitude": "latitude", "longitude": "longitude",
            "decorationTime": "decoration_time", "hotelStar": "hotel_star", "price": "price",
            "score": "score", "brand": "brand"}
    return _dumps([_listed({k: text(r.get(c, "")) for k, c in keys.items()}, r, "services")
                   for r in hits])


def _attraction(table, p, T):
    name = p.get("attraction_name")
    if table is None:
        return T["db"]
    r = next((r for r in table[1] if r["attraction_name"] == name), None)
    if r is None:
        return T["attr_missing"].format(name)
    (ID, NAME, CITY, ADDR, COORD, LAT, LON, DESC, RATING, VISITORS, OPEN, TO, CLOSED, MIN, MAX, HOURS,
     TICKET, CUR, TYPE) = T["labels"]
    s = lambda col, default="": str(r.get(col, default))
    num = lambda col, none="": none if _is_nan(r.get(col)) or _float(r.get(col)) is None \
        else _float(r.get(col))  # a number prints as a float: '4.0 hours', '0.0 RMB'
    opening, closing = s("opening_time"), s("closing_time")
    return "\n".join([
        f"{ID}：{s('attraction_id')}", f"{NAME}：{s('attraction_name', name)}", f"{CITY}：{s('city')}",
        f"{ADDR}：{s('address')}", f"{COORD}：{LAT} {s('latitude')}，{LON} {s('longitude')}",
        f"{DESC}：{s('description')}", f"{RATING}：{num('rating')}{VISITORS}",
        f"{OPEN}：{opening}" if opening == closing else f"{OPEN}：{opening} {TO} {closing}",
        f"{CLOSED}：{s('closing_dates')}", f"{MIN}：{num('min_visit_hours')} {HOURS}",
        f"{MAX}：{num('max_visit_hours')} {HOURS}", f"{TICKET}：{num('ticket_price', '0')} {CUR}",
        f"{TYPE}：{s('attraction_type')}"])


def _recommend_attractions(table, p, T):
    kind = p.get("attraction_type", "")
    if table is None:
        return T["db"]
    hits = [r for r in table[1] if not kind or r["attraction_type"] == kind]  # the city filters nothing
    if not hits:
        return T["rec_none"]
    return "\n".join([T["rec_head"]] + [T["rec_line"].format(*(r.get(c, "") for c in (
        "attraction_name", "description", "attraction_type"))) for r in hits])


def _location(table, p, T):
    place = p.get("place_name")
    if table is None:
        return T["db"]
    col = "poi_name" if "poi_name" in table[0] else "place_name"
    r = next((r for r in table[1] if r[col] == place), None)
    if r is None:
        return T["loc_missing"].format(place)
    return _dumps({"place_name": r.get("poi_name", r.get("place_name", place)),
                   "latitude": str(r.get("latitude", "")), "longitude": str(r.get("longitude", ""))})


def _restaurant(r, name, price, rating):
    get = lambda col: r.get(col, "")
    return _listed({"name": r.get("restaurant_name", name), "latitude": str(r.get("latitude", 0)),
                    "longitude": str(r.get("longitude", 0)),
                    "price_per_person": str(r.get("price_per_person", price)), "cuisine": get("cuisine"),
                    "opening_time": get("opening_time"), "closing_time": get("closing_time"),
                    "nearby_attraction_name": get("nearby_attraction_name"),
                    "rating": str(r.get("rating", rating))}, r, "tags")


def _recommend_restaurants(table, p, T):
    lat, lon = p.get("latitude"), p.get("longitude")
    if table is None:
        return T["db"]
    hits = []  # the exact strings of a query point (coordinates an earlier answer gave)
    if "query_latitude" in table[0] and "query_longitude" in table[0]:
        hits = [r for r in table[1] if r["query_latitude"] == lat and r["query_longitude"] == lon]
    if not hits:
        return T["rest_missing"].format(lat, lon)
    return _dumps([_restaurant(r, "", 0, 4.5) for r in hits])


def _restaurant_details(table, p, T):
    name = p.get("restaurant_name")
    if table is None:
        return _dumps({"message": T["db"], "restaurant_name": name})
    hits = [r for r in table[1] if r["restaurant_name"] == name] if "restaurant_name" in table[0] else []
    if not hits:
        return _dumps({"message": T["detail_missing"].format(name), "restaurant_name": name})
    return _dumps({"id": hits[0].get("restaurant_id", ""), **_restaurant(hits[0], name, "100", 4.0)})


def _road_route(table, p, T):
    origin, dest = p.get("origin"), p.get("destination")
    if table is None:
        return T["db"]
    _, coords, first = table
    for c in (origin, dest):  # a coordinate no route starts or ends at gets a hint of its own
        if c not in coords:
            return T["coord"].format(c)
    r = first.get((origin, dest))
    if r is None:
        return T["route_missing"].format(origin, dest)
    return _dumps({"origin": r["origin"], "destination": r["destination"],
                   "distance_in_meters": int(r["distance_meters"]),
                   "duration_in_minutes": int(r["duration_minutes"]), "cost": int(r["cost"])})


TOOLS = {  # name -> (function, the task's CSV it reads)
    "query_train_info": (lambda t, p, T: _transport(t, p, T, True), "trains/trains.csv"),
    "query_flight_info": (lambda t, p, T: _transport(t, p, T, False), "flights/flights.csv"),
    "query_hotel_info": (_hotels, "hotels/hotels.csv"),
    "query_attraction_details": (_attraction, "attractions/attractions.csv"),
    "recommend_attractions": (_recommend_attractions, "attractions/attractions.csv"),
    "search_location": (_location, "locations/locations_coords.csv"),
    "query_road_route_info": (_road_route, "transportation/distance_matrix.csv"),
    "recommend_restaurants": (_recommend_restaurants, "restaurants/restaurants.csv"),
    "query_restaurant_details": (_restaurant_details, "restaurants/restaurants.csv"),
}


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


# ---------------------------------------------------------------------------------------------
# The plan: extract it, parse it into the converted-plan JSON, score the hard constraints
# ---------------------------------------------------------------------------------------------

def extract_plan(text):
    """The plan inside <plan>...</plan> after the last </think>, as upstream's loop takes it
    (several blocks joined by a blank line); None when there is none."""
    text = re.split(r"</think>", text or "", flags=re.I)[-1]
    blocks = [m.strip() for m in re.findall(r"<plan>(.*?)</plan>", text, flags=re.S | re.I) if m.strip()]
    return "\n\n".join(blocks) or None


DAY_RE = re.compile(r"(?:day\s*(\d+)|第\s*(\d+)\s*天)", re.I)
HEAD_RE = re.compile(r"(current city|当前城市|accommodation|住宿)\s*[:：]\s*(.*)", re.I)
ACT_RE = re.compile(r"(\d{1,2}:\d{2})\s*[-–~～至]\s*(\d{1,2}:\d{2})\s*[|｜]\s*([A-Za-z_]+)"
                    r"\s*(?:[|｜]\s*(.*))?")
BUDGET_KEYS = (("transportation", r"transport|交通"), ("accommodation", r"accommodation|hotel|住宿|酒店"),
               ("meals", r"meal|food|dining|餐"), ("attractions_and_tickets", r"attraction|ticket|景点|门票"),
               ("other", r"other|其他"), ("total_estimated_budget", r"total|总"))
MODES = (("flight", ("flight", "plane", "航班", "飞机")),
         ("train", ("train", "railway", "高铁", "动车", "火车", "列车")))
MONEY = r"[￥¥]\s*(\d[\d,]*(?:\.\d+)?)|(\d[\d,]*(?:\.\d+)?)\s*(?:元|rmb|cny|yuan)"


def _number(s):
    v = float(s)
    return int(v) if v.is_integer() else v


def _price(field):
    """A price field ('￥67/人', '¥60/person', '120 RMB', '免费', 'free') -> number, else None."""
    f = field.strip().replace(",", "")
    if re.fullmatch(r"免费\S{0,4}|free( of charge| admission| entry)?|no charge", f, re.I):
        return 0
    m = re.search(r"\d+(?:\.\d+)?", f)
    if m and (re.search(r"[￥¥$]|元|rmb|cny|yuan|/人|/person", f, re.I) or re.fullmatch(r"[\d.]+", f)):
        return _number(m.group())
    return None


def _fields(s):
    """Split on '，' and ',' outside brackets (English names hold commas in parentheses), not on a
    thousands comma -> (fields, the separator to join them back with)."""
    out, depth, cur = [], 0, ""
    for i, ch in enumerate(s):
        depth = depth + (ch in "(（[【") - (ch in ")）]】" and depth > 0)
        thousands = 0 < i < len(s) - 1 and s[i - 1].isdigit() and s[i + 1].isdigit()
        if depth == 0 and (ch == "，" or (ch == "," and not thousands)):
            out, cur = out + [cur], ""
        else:
            cur += ch
    return [f.strip() for f in out + [cur] if f.strip()], ("，" if "，" in s else ", ")


def _until_price(fields):
    """(the fields before the first price field, that price or 0 when there is none)."""
    i = next((i for i, f in enumerate(fields) if _price(f) is not None), len(fields))
    return fields[:i], (_price(fields[i]) if i < len(fields) else 0)


def _route(s, known):
    """'A - B' -> (A, B). Names may hold ' - ' too (many English hotels do): of the possible cuts,
    the one whose sides are names seen elsewhere in the plan wins, else the first."""
    cuts = [(s[:m.start()].strip(), s[m.end():].strip())
            for m in re.finditer(r"\s+[-–—]\s*|\s*[-–—]\s+|\s*(?:→|->|—)\s*", s)]
    return max(cuts, key=lambda c: (c[0] in known) + (c[1] in known)) if cuts else (s.strip(), "")


def _details(kind, text, city):
    """The details object of one activity line, as FORMAT_CONVERT_PROMPT_* defines it; routes and
    hotel names are settled in parse_plan's second pass (the keys starting with '_')."""
    fields, sep = _fields(text)
    if kind == "travel_intercity_public":  # 'flight CA1234, A - B, ¥650/person', '高铁G48，A - B，￥403/人'
        fields, cost = _until_price(fields)
        m = re.match(r"\s*([^\W\d_]*?)\s*[:：]?\s*([A-Za-z]*\d[A-Za-z0-9]*)\s*(.*)", (fields or [""])[0])
        word, number, rest = (m.group(1), m.group(2), m.group(3)) if m else ((fields or [""])[0], "", "")
        route = sep.join(([rest] if re.search(r"\s[-–—]\s|→|->", rest) else []) + fields[1:])
        mode = next((k for k, words in MODES if any(w in word.lower() for w in words)), "")
        if not mode and (number or route):  # no mode word: an airport or station says, else the number
            mode = ("flight" if re.search(r"机场|airport", route, re.I)
                    else "train" if re.search(r"站|station", route, re.I)
                    else "train" if re.fullmatch(r"[GDCKTZYSL]\d{1,4}", number) else "flight")
        return {"mode": mode, "number": number, "_route": route, "cost": cost}
    if kind == "travel_city":  # 'A - B, 30km, 60min, ¥100', read from the right
        cost = _price(fields.pop()) if fields and _price(fields[-1]) is not None else 0
        last = lambda rx: fields.pop() if fields and re.search(rx, fields[-1], re.I) else ""
        dur, dist = last(r"\d\s*(min|分钟|小时|hours?|h)\w*$"), last(r"^\D{0,3}[\d.]+\s*(km|m|公里|千米|米)$")
        return {"_route": sep.join(fields), "distance": dist, "duration": dur, "cost": cost}
    if kind == "attraction":
        name, cost = _until_price(fields)
        return {"name": sep.join(name), "city": city, "cost": cost}
    if kind == "meal":  # 'Lunch, NAME, ¥100/person'; '午餐NAME，￥52/人' has no comma after the meal
        name, cost = _until_price(fields)
        if len(name) == 1:
            m = re.match(r"(早餐|午餐|晚餐|夜宵|breakfast|lunch|dinner|supper)\s*[:：]?\s*(.*)", name[0], re.I)
            name = [m.group(1), m.group(2)] if m else ["", name[0]]
        return {"meal_type": name[0] if name else "", "name": sep.join(name[1:]), "cost": cost}
    if kind == "hotel":
        return {"activity": sep.join(fields), "_parts": (fields, sep)}
    return {"description": text}


def _budget_line(budget, raw, line, category):
    """One line of the budget summary; categories are bold lines ('**Meals: 1100 RMB**'), and a
    'subtotal' line fills the category above it. Returns the current category."""
    bold = re.search(r"\*\*([^*]*[:：][^*]*)\*\*", raw)  # '**Meals: 1100 RMB**. (150+...)*2=1100'
    text = re.sub(r"[*`]", "", bold.group(1) if bold else line).replace("：", ":")
    label, colon, value = text.partition(":")
    key = next((k for k, rx in BUDGET_KEYS if re.search(rx, label, re.I)), None) if "**" in raw else None
    if key is None and re.search(r"合计|小计|总计|subtotal", label, re.I):
        key = category
    value = value.rsplit("=", 1)[-1]  # '(650+550)*2 = 2400 RMB' -> the result
    num = re.search(MONEY, value, re.I) or re.search(r"()(\d[\d,]*(?:\.\d+)?)", value)
    if colon and key and budget[key] is None and num:
        budget[key] = _number((num.group(1) or num.group(2)).replace(",", ""))
    return key or category


def parse_plan(text):
    """Plan text (inside <plan>) in English or Chinese -> the JSON of upstream's converted_plans/:
    {budget_summary, daily_plans: [{day_number, current_city, accommodation, activities}]}."""
    budget, days, seen = dict.fromkeys(k for k, _ in BUDGET_KEYS), [], set()
    in_budget, category = False, None
    for raw in (text or "").splitlines():
        line = raw.replace("**", "").strip().strip("*#`>-•· ").strip()  # markdown decoration
        act, day, head = ACT_RE.fullmatch(line), DAY_RE.match(line), HEAD_RE.fullmatch(line)
        if in_budget:  # 'Day2: 100元' lines inside a budget are not days
            category = _budget_line(budget, raw, line, category)
        elif act and days:
            start, end, kind, detail = act.groups()
            city, acts = days[-1]["current_city"], days[-1]["activities"]
            trip = re.fullmatch(r"from\s+(.+?)\s+to\s+(.+)|从\s*(.+?)\s*(?:到|至|前往)\s*(.+)", city, re.I)
            if trip:  # a transfer day: until the intercity leg we are still in the origin city
                moved = any(a["type"] == "travel_intercity_public" for a in acts)
                city = (trip.group(2) or trip.group(4)) if moved else (trip.group(1) or trip.group(3))
            acts.append({"time_slot": f"{start}-{end}", "type": kind.lower(),
                         "details": _details(kind.lower(), (detail or "").strip(" *"), city)})
        elif day and line.rstrip(":：").strip():
            n = int(day.group(1) or day.group(2))
            if n in seen and n == min(seen):  # the plan starts again (written twice): keep the first
                break
            if n in seen:  # a day already open, named again (a note): not a new day
                continue
            seen.add(n)
            days.append({"day_number": n, "current_city": "", "activities": []})
        elif head and days:
            value = head.group(2).strip()
            if head.group(1).lower() in ("current city", "当前城市"):
                days[-1]["current_city"] = value
            elif value.strip("-—–/ ").lower() not in ("", "无", "none", "n/a", "null", "no"):  # '-': none
                (name, price), sep = _until_price(_fields(value)[0]), _fields(value)[1]
                days[-1]["accommodation"] = {"name": sep.join(name), "price_per_night": price}
        elif days and re.search(r"^\W*(budget|预算|费用)|budget (summary|breakdown)|预算(汇总|明细)", line, re.I):
            in_budget = True  # a budget heading, not a note that mentions the budget
    # second pass, now that every name of the plan is known: routes and hotel-activity names
    hotels = {d["accommodation"]["name"] for d in days if "accommodation" in d}
    known, stay = hotels | {a["details"].get("name") for d in days for a in d["activities"]}, ""
    for d in days:
        stay = d.get("accommodation", {}).get("name", stay)  # a bare 'Rest' line: the night's hotel
        for a in d["activities"]:
            x = a["details"]
            if "_route" in x:
                x["from"], x["to"] = _route(x.pop("_route"), known)
                a["details"] = {k: x[k] for k in ("mode", "number", "from", "to", "distance", "duration",
                                                  "cost") if k in x}
            if "_parts" in x:  # 'Check-in, NAME': a known hotel name ending the line, else the name
                parts, sep = x.pop("_parts")  # is the last field in Chinese, after the first in English
                cut = next((i for i in range(len(parts)) if sep.join(parts[i:]) in hotels), None)
                cut = cut if cut is not None else 1 if len(parts) < 2 or sep != "，" else len(parts) - 1
                x["activity"], x["name"] = sep.join(parts[:cut]), sep.join(parts[cut:]) or stay
    return {"budget_summary": {**{k: v or 0 for k, v in budget.items()}, "currency": "CNY"},
            "daily_plans": days}


FLIGHT_MODES = ("flight", "飞机", "airplane", "plane")  # the modes upstream's checker counts
TRAIN_MODES = ("train", "火车", "railway", "高铁", "gaotie")
WANTED = {  # upstream's messages: "Required <what> not found: <name>" (hotels, restaurants) ...
    "hotel_cheapest_brand": "{brand} brand hotel", "hotel_highest_rated": "highest rated hotel",
    "hotel_cheapest_star": "{hotel_star}-star hotel",
    "hotel_newest_decoration": "hotel with newest decoration",
    "hotel_brand_highest_rated": "highest rated {brand} hotel",
    "hotel_star_highest_rated": "highest rated {hotel_star}-star hotel",
    "hotel_price_range": "hotel in price range {price_range}",
    "hotel_star_service_required": "{hotel_star}-star hotel with {required_service_cn}",
    "hotel": "hotel",
    "restaurant_cheapest_nearby_attraction": "restaurant near {attraction_name}",
    "restaurant_highest_rated": "highly rated restaurant near {attraction_name}",
    "restaurant_must_eat_named": "must-eat restaurant",
    "restaurant_closest_to_attraction": "closest restaurant to {attraction_name}",
    "restaurant_specific_cuisine_nearby": "{cuisine_type} restaurant near {attraction_name}",
    "restaurant_specific_tag_nearby": "restaurant with {required_tag_cn} near {attraction_name}",
    "restaurant": "restaurant",
    # ... and "<prefix>: <missing, comma-separated>" (attractions)
    "attraction_must_visit_named": "Missing required attractions", "attraction": "Missing attractions",
    "attraction_all_of_type": "Missing {attraction_type} type attractions",
    "attraction_top_rated_must_visit": "Missing top rated attractions",
    "attraction_all_free_attractions": "Missing free attractions",
    "attraction_type_highest_rated": "Required highest rated {attraction_type} attraction not found",
}
DEFAULTS = {"brand": "specified", "hotel_star": "specified", "price_range": "specified",
            "required_service_cn": "specified service", "attraction_name": "specified attraction",
            "cuisine_type": "specified cuisine", "required_tag_cn": "specified tag",
            "attraction_type": "specified"}  # what upstream prints for an absent field


class _Fill(dict):  # str.format_map with upstream's defaults
    def __missing__(self, key):
        return DEFAULTS[key]


def _kind(key):
    kinds = ("flight", "train", "hotel", "restaurant", "attraction")
    budget = "budget" if key == "budget_constraint" else None
    return next((k for k in kinds if key.startswith(k + "_")), budget)


def _activities(plan, kind):
    """Details of every activity of a type; as upstream, a day without 'activities' is skipped and
    a malformed plan raises (the constraint then fails with 'Evaluation error: ...')."""
    return [a.get("details", {}) for day in plan.get("daily_plans", []) if "activities" in day
            for a in day["activities"] if a.get("type") == kind] if "daily_plans" in plan else []


def _check(key, c, plan, meta):
    """One hard constraint -> (passed, message), as evaluation/constraints_hard.py decides it."""
    kind = _kind(key)
    if kind in ("flight", "train"):
        modes = FLIGHT_MODES if kind == "flight" else TRAIN_MODES
        numbers = {d.get("number", "") for d in _activities(plan, "travel_intercity_public")
                   if d.get("mode", "").lower() in modes}
        for way in ("outbound", "inbound"):
            if f"{way}_{kind}_no" in c and c[f"{way}_{kind}_no"] not in numbers:
                return False, f"Required {way} {kind} not found: {c[f'{way}_{kind}_no']}"
        return True, None
    if kind == "budget":
        return _check_budget(c, plan, meta)
    if kind == "attraction":
        names = {d.get("name", "") for d in _activities(plan, "attraction")}
        if not c.get("attraction_names", []):
            return False, "No attraction names specified in constraint data"
        missing = [a for a in c["attraction_names"] if a not in names]
        what = WANTED.get(key, WANTED[kind]).format_map(_Fill(c))
        return (False, f"{what}: {', '.join(missing)}") if missing else (True, None)
    if kind == "hotel":  # the accommodation of every day, the last day's included
        names = {d["accommodation"].get("name", "") for d in plan.get("daily_plans", [])
                 if d.get("accommodation")} if "daily_plans" in plan else set()
    else:
        names = {d.get("name", "") for d in _activities(plan, "meal")}
    if not c.get(f"{kind}_name"):
        return False, f"No {kind} name specified in constraint data"
    if c[f"{kind}_name"] in names:
        return True, None
    what = WANTED.get(key, WANTED[kind]).format_map(_Fill(c))
    return False, f"Required {what} not found: {c[f'{kind}_name']}"


def _check_budget(c, plan, meta):
    """Upstream's budget: per day the first priced intercity leg (a transfer's legs all show the
    whole fare) x people, the hotel x rooms every day but the last, meals and tickets x people,
    taxis x ceil(people / 4); summed in upstream's order, so the message's figures match."""
    if c.get("max_budget") is None:
        return False, "Budget constraint missing max_budget value"
    try:
        cap = float(c["max_budget"])
    except (ValueError, TypeError):
        return False, f"Invalid max_budget value: {c['max_budget']}"
    days = plan.get("daily_plans", [])
    if not days:
        return False, "Plan missing daily_plans"
    people, rooms = int(meta.get("people_number", 1)), int(meta.get("room_number", 1))
    details = lambda day, kind: [a.get("details") or {} for a in day.get("activities", []) or []
                                 if a.get("type") == kind]
    cost = lambda d: _float(d.get("cost")) if d.get("cost") else None  # absent, 0 or bad: skipped
    transport = hotel = meals = tickets = 0.0
    for day in days:
        fares = (_float(d.get("cost", 0)) for d in details(day, "travel_intercity_public"))
        fare = next((v for v in fares if v is not None), 0.0)
        transport += fare * people if fare > 0 else 0.0
    for day in days[:-1]:
        room = day.get("accommodation")
        if not isinstance(room, dict):
            continue
        price = room.get("price") or room.get("price_per_night") or room.get("cost")
        hotel += _float(price) * rooms if price and _float(price) is not None else 0.0
    priced = lambda kind: [cost(d) for day in days for d in details(day, kind) if cost(d) is not None]
    meals += sum(v * people for v in priced("meal"))
    tickets += sum(v * people for v in priced("attraction"))
    for v in priced("travel_city"):
        transport += v * max(1, (people + 3) // 4)  # taxis of 4 seats
    total = transport + hotel + meals + tickets
    if total <= cap:
        return True, None
    return False, (f"Actual budget exceeds limit: {total:.2f} > {cap:.2f} "
                   f"(exceeded by {total - cap:.2f}). Breakdown: Transportation={transport:.2f}, "
                   f"Accommodation={hotel:.2f}, Meals={meals:.2f}, Attractions={tickets:.2f}")


def score_plan(plan, meta_info):
    """Hard-constraint verdicts of a converted plan -> constraints {key: {passed, message}},
    hard_fraction, personalized_score (1.0 only if all pass: upstream's one-vote veto), delivered."""
    delivered, constraints = isinstance(plan, dict) and bool(plan), {}
    for key, c in meta_info.get("hard_constraints", {}).items():
        if _kind(key) is None:  # unknown constraint types are not scored, as upstream
            continue
        if not delivered:
            constraints[key] = {"passed": False, "message": "no plan delivered"}
            continue
        try:
            passed, message = _check(key, c, plan, meta_info)
        except Exception as e:
            passed, message = False, f"Evaluation error: {e}"
        constraints[key] = {"passed": passed, "message": message}
    n = sum(v["passed"] for v in constraints.values())
    return {"constraints": constraints, "hard_fraction": n / len(constraints) if constraints else 0.0,
            "personalized_score": float(bool(constraints) and n == len(constraints)),
            "delivered": delivered}


def score_episode(final_text, task):
    """The evaluator's path: final assistant text -> plan text -> parsed plan -> scores."""
    plan_text = extract_plan(final_text)
    plan = parse_plan(plan_text) if plan_text else None
    return {**score_plan(plan, task.meta_info), "plan_text": plan_text, "plan": plan}


# ---------------------------------------------------------------------------------------------
# Episodes: a task's prompt, playing it with a model in its sandbox, scoring what it delivered
# ---------------------------------------------------------------------------------------------

def split_tasks(data_dir, split):
    """The tasks of the committed split ("train" or "heldout") that `data_dir` holds complete."""
    root, lang = resolve_data_dir(data_dir)
    return load_tasks(root, lang, split_ids(split, data_dir))


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


def training_rollouts(student, tokenizer, tasks, args):
    """distill.py's sampling step on DeepPlanning: args.samples_per_prompt episodes per task, as a
    Rollouts record whose masks keep only the student's own tokens, and the step's sums of
    EPISODE_METRICS over its episodes (with their count, "episodes")."""
    played = play(student, tokenizer, tasks, args.samples_per_prompt, args.max_turns,
                  args.max_new_tokens, args.max_total_tokens, args.temperature, args.top_p,
                  args.generation_batch_size, args.enable_thinking)
    records = [record(*p) for p in played]
    sums = {k: sum(float(r[k]) for r in records) for k in EPISODE_METRICS}
    return as_rollouts([e for _, e, _ in played]), {**sums, "episodes": len(records)}


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


def main(argv=None):
    p = ArgumentParser(description="Write the committed train/heldout split of the DeepPlanning "
                       "travel tasks (data/deepplanning_split.json) from a data folder.")
    p.add_argument("data_dir", help="the travel folder (data/, tools/, agent/, database/)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed within each trip length")
    args = p.parse_args(argv)
    try:
        split = make_split(args.data_dir, seed=args.seed)
    except UsageError as e:
        p.exit(2, f"error: {e}\n")
    print(f"wrote {SPLIT_PATH}: {len(split['train'])} train, {len(split['heldout'])} heldout tasks")


if __name__ == "__main__":
    main()
