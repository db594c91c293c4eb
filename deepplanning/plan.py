"""The plan: extract it from the final answer, parse its text into the converted-plan JSON.

Upstream has an LLM convert the plan (FORMAT_CONVERT_PROMPT_*) into that JSON; parse_plan is a
rule-based parser of the format the system prompt asks for, in English and Chinese. A plan written
twice (the day numbers start again) is read once, as the official conversion did on the fixtures.
"""
import re


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
