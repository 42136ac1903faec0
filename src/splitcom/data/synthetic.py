"""Built-in E2E-style data (restaurant attributes -> varied references), so the default run needs
no download. Deterministic for a seed; several references per input, like the real E2E set."""

from __future__ import annotations

import random

from splitcom.data.records import Example

NAMES = [
    "The Eagle", "The Mill", "Blue Spice", "Zizzi", "The Punter", "Aromi", "Cotto", "Fitzbillies",
    "Green Man", "Loch Fyne", "The Wrestlers", "Strada", "Alimentum", "The Phoenix", "Giraffe",
    "The Golden Curry", "Midsummer House", "Browns Cambridge", "Clowns", "Wildwood",
]
EAT_TYPES = ["restaurant", "pub", "coffee shop"]
FOODS = ["French", "Italian", "English", "Japanese", "Chinese", "Indian", "Fast food"]
PRICES = ["cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"]
RATINGS = ["low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"]
AREAS = ["city centre", "riverside"]
NEAR = ["Café Sicilia", "The Bakers", "Burger King", "Raja Indian Cuisine", "Café Rouge", "All Bar One"]

_OPENERS = [
    "{name} is a {eat}",
    "There is a {eat} called {name}",
    "{name}, a {eat},",
    "Located {where}, {name} is a {eat}",
]


def _mr(rng: random.Random) -> dict[str, str]:
    attrs = {"name": rng.choice(NAMES), "eatType": rng.choice(EAT_TYPES)}
    for key, pool in (("food", FOODS), ("priceRange", PRICES), ("customer rating", RATINGS), ("area", AREAS)):
        if rng.random() < 0.7:
            attrs[key] = rng.choice(pool)
    if rng.random() < 0.5:
        attrs["familyFriendly"] = rng.choice(["yes", "no"])
    if rng.random() < 0.4:
        attrs["near"] = rng.choice(NEAR)
    return attrs


def linearise(attrs: dict[str, str]) -> str:
    return ", ".join(f"{k}[{v}]" for k, v in attrs.items())


def _reference(attrs: dict[str, str], rng: random.Random) -> str:
    where = f"in the {attrs['area']}" if "area" in attrs else "in town"
    parts = [rng.choice(_OPENERS).format(name=attrs["name"], eat=attrs["eatType"], where=where)]
    clauses = []
    if "food" in attrs:
        clauses.append(rng.choice(["serving {v} food", "that serves {v} cuisine", "offering {v} dishes"])
                       .format(v=attrs["food"]))
    if "area" in attrs and "Located" not in parts[0]:
        clauses.append(f"in the {attrs['area']}")
    if "near" in attrs:
        clauses.append(rng.choice(["near {v}", "close to {v}"]).format(v=attrs["near"]))
    text = " ".join(parts + clauses).rstrip(",") + "."
    extra = []
    if "priceRange" in attrs:
        extra.append(rng.choice(["Prices are {v}.", "It has a {v} price range.", "Its prices are {v}."])
                     .format(v=attrs["priceRange"]))
    if "customer rating" in attrs:
        extra.append(rng.choice(["Customers rate it {v}.", "It has a {v} customer rating."])
                     .format(v=attrs["customer rating"]))
    if "familyFriendly" in attrs:
        extra.append("It is family friendly." if attrs["familyFriendly"] == "yes"
                     else "It is not family friendly.")
    rng.shuffle(extra)
    return " ".join([text] + extra)


def generate(n: int, seed: int, refs_per_input: int = 3) -> list[Example]:
    """``n`` examples: ceil(n / refs_per_input) inputs, each with ``refs_per_input`` references."""
    rng = random.Random(seed)
    out: list[Example] = []
    while len(out) < n:
        attrs = _mr(rng)
        mr = linearise(attrs)
        for _ in range(refs_per_input):
            out.append(Example(prompt=mr, completion=_reference(attrs, rng), group=mr, attrs=attrs))
    return out[:n]
