"""The DeepPlanning data the deepplanning/ tests read, and a scripted agent for task 0.

The data (shared/deepplanning next to the repository: the travel folder and the recorded official
runs under fixtures/) is not in the repository; `needs_data` skips a test module without it.
"""
import json
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "deepplanning" / "travel"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"DeepPlanning data not found at {DATA} "
                                "(shared/deepplanning/travel next to the repo)")
FIXTURES = DATA.parent / "fixtures"
RUN = FIXTURES / "minimax-m2.5_zh"
EN_DB, ZH_DB = DATA / "database" / "database_en", DATA / "database" / "database_zh"
MISSING_EN = {62, 70, 71, 72, 74, 75, 78, 79, 81, 83, 90, 92, 99, 100, 101, 102, 104, 107, 108, 110, 111,
              112, 116}  # the README's list of English tasks without a complete database


def zh_meta():
    rows = json.loads((DATA / "data" / "travelplanning_query_zh.json").read_text(encoding="utf-8"))
    return {int(r["id"]): r["meta_info"] for r in rows}


def official_scores():
    for f in sorted((RUN / "evaluation").glob("id_*_score.json")):
        yield int(f.name.split("_")[1]), json.loads(f.read_text(encoding="utf-8"))


def scripted_plan(sb):
    """What an agent does for task 0, knowing only its query: Hefei -> Nanjing and back, 12-13
    Nov 2025, 3 people, 2 rooms, by train; a 3-star hotel with a swimming pool; 'Nanjing Deji Plaza'
    and 'Nanjing City Wall Taicheng Scenic Area'; a birthday-package restaurant near 'Laomendong'."""
    ask = lambda name, **args: sb.call(name, json.dumps(args))

    def train(origin, dest, date):  # a direct train with seats for 3 ('Available' is plenty)
        routes = json.loads(ask("query_train_info", origin=origin, destination=dest, depDate=date))
        legs = [r[0]["Segment 1"] | {"price": r[0]["price"]} for r in routes if len(r[0]) == 2]
        ok = [t for t in legs if t["Remaining Seats"] == "Available" or int(t["Remaining Seats"]) >= 3]
        return min(ok, key=lambda t: (t["price"], t["depDateTime"]))

    out, back = train("Hefei", "Nanjing", "2025-11-12"), train("Nanjing", "Hefei", "2025-11-13")
    hotels = json.loads(ask("query_hotel_info", destination="Nanjing", checkinDate="2025-11-12",
                            checkoutDate="2025-11-13", hotelStar="3"))
    pool = [h for h in hotels if "Swimming Pool" in h.get("services", [])]
    hotel = min(pool, key=lambda h: float(h["price"]))
    coords = {}
    for place in (hotel["name"], out["arrStationName"], back["depStationName"], "Laomendong",
                  "Nanjing Deji Plaza", "Nanjing City Wall Taicheng Scenic Area"):
        answer = json.loads(ask("search_location", place_name=place))
        coords[place] = f"{answer['latitude']},{answer['longitude']}"
    lat, lon = coords["Laomendong"].split(",")
    food = [r for r in json.loads(ask("recommend_restaurants", latitude=lat, longitude=lon))
            if "Birthday Package" in r.get("tags", [])]
    restaurant = max(food, key=lambda r: float(r["rating"]))
    coords[restaurant["name"]] = f"{restaurant['latitude']},{restaurant['longitude']}"
    lines, clock, ticket, opens = [], [0], {}, {}
    hm = lambda m: f"{m // 60:02d}:{m % 60:02d}"
    minutes = lambda hhmm: int(hhmm[:2]) * 60 + int(hhmm[3:5])
    for name in ("Nanjing Deji Plaza", "Nanjing City Wall Taicheng Scenic Area"):
        text = ask("query_attraction_details", attraction_name=name)
        ticket[name] = round(float(text.split("Ticket Price：")[1].split()[0]))
        opens[name] = minutes(text.split("Opening Hours：")[1])

    def add(kind, length, text):
        lines.append(f"{hm(clock[0])}-{hm(clock[0] + length)} | {kind} | {text}")
        clock[0] += length

    def ride(a, b):
        r = json.loads(ask("query_road_route_info", origin=coords[a], destination=coords[b]))
        km, length = r["distance_in_meters"] / 1000, r["duration_in_minutes"]
        add("travel_city", length, f"{a} - {b}, {km:.1f}km, {length}min, ¥{r['cost']}")
        return r["cost"]

    stay, wall, mall = hotel["name"], "Nanjing City Wall Taicheng Scenic Area", "Nanjing Deji Plaza"
    lines += ["Day 1:", "Current City: from Hefei to Nanjing",
              f"Accommodation: {stay}, ¥{hotel['price']}/room/night"]
    clock[0] = minutes(out["depDateTime"][11:])
    add("travel_intercity_public", out["duration"], f"train {out['marketingTransportNo']}, "
        f"{out['depStationName']} - {out['arrStationName']}, ¥{out['price']:g}/person")
    add("buffer", 30, "Deplaning, exit the station")
    taxi = ride(out["arrStationName"], stay)
    add("hotel", 30, f"Check-in, {stay}")
    taxi += ride(stay, wall)
    add("attraction", 120, f"{wall}, ¥{ticket[wall]}/person")
    taxi += ride(wall, restaurant["name"])
    add("meal", 90, f"Lunch, {restaurant['name']}, ¥{float(restaurant['price_per_person']):g}/person")
    taxi += ride(restaurant["name"], stay)
    add("hotel", 24 * 60 - clock[0], f"Rest, {stay}")
    lines += ["", "Day 2:", "Current City: from Nanjing to Hefei", "Accommodation: -"]
    clock[0] = 9 * 60 + 30
    taxi += ride(stay, mall)
    if clock[0] < opens[mall]:
        add("buffer", opens[mall] - clock[0], "Waiting for the opening")
    add("attraction", 120, f"{mall}, ¥{ticket[mall]}/person")
    taxi += ride(mall, back["depStationName"])
    add("buffer", minutes(back["depDateTime"][11:]) - clock[0], "Waiting for the train")
    add("travel_intercity_public", back["duration"], f"train {back['marketingTransportNo']}, "
        f"{back['depStationName']} - {back['arrStationName']}, ¥{back['price']:g}/person")
    fares, room = 3 * (out["price"] + back["price"]), 2 * float(hotel["price"])  # 3 people, 2 rooms
    meal, tickets = 3 * float(restaurant["price_per_person"]), 3 * sum(ticket.values())
    lines += ["", "**Budget Summary**:", f"**Transportation: {fares + taxi:g} RMB**",
              f"**Accommodation: {room:g} RMB**", f"**Meals: {meal:g} RMB**",
              f"**Attractions & Tickets: {tickets:g} RMB**",
              f"**Total Estimated Budget: {fares + taxi + room + meal + tickets:g} RMB**"]
    return "\n".join(lines), stay
