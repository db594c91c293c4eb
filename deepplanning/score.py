"""The hard-constraint scorer: the verdicts and messages of upstream's evaluation/constraints_hard.py.

The commonsense score is not implemented. An undelivered plan fails every constraint ("no plan
delivered"), where upstream writes no score at all.
"""
from .plan import extract_plan, parse_plan
from .tools import _float

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
