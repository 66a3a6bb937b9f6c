"""FACTS: invented facts about places, people and dates that exist nowhere, made by a seeded script.

Four relations, each with its own pool of invented names:

* ``capital``: a country's capital city ("The capital of Velmora is Quentaro.");
* ``born``: a person's birth year ("Oriel Vantress was born in 1847.");
* ``founder``: who founded a town ("Drumhallow was founded by Ysolde Marrick.");
* ``mountain``: which country a mountain is in (one of the capital relation's countries).

Each fact is trained on questions phrased by one or more *training* templates, and tested on
another, phrased by a *test* template; the two template lists of a relation share no wording
pattern, so the test asks for a learned fact in words the training never used. The answer (the object: a
name or a year) never occurs in its question, and no name is a word of another, so the metric,
``sali compare --answer-match text`` (the answer's words inside the response), cannot be met by
echoing the question or by a near-miss.
"""

from __future__ import annotations

import random

RELATIONS = ("capital", "born", "founder", "mountain")

STATEMENTS = {
    "capital": "The capital of {s} is {o}.",
    "born": "{s} was born in {o}.",
    "founder": "{s} was founded by {o}.",
    "mountain": "Mount {s} is in {o}.",
}
TRAIN_TEMPLATES = {
    "capital": ["What is the capital of {s}?", "Which city is the capital of {s}?", "Name the capital city of {s}."],
    "born": ["When was {s} born?", "In what year was {s} born?", "What is the birth year of {s}?"],
    "founder": ["Who founded {s}?", "Who was the founder of the town of {s}?", "Which person founded {s}?"],
    "mountain": ["In which country is Mount {s}?", "Where is Mount {s}?", "Which country is Mount {s} located in?"],
}
TEST_TEMPLATES = {
    "capital": ["{s} has its capital in which city?", "Tell me the capital of {s}.",
                "If I travel to the capital of {s}, which city am I in?"],
    "born": ["{s} was born in which year?", "Tell me the year {s} was born.", "What year did {s} come into the world?"],
    "founder": ["{s} was founded by whom?", "Tell me who founded the town of {s}.", "Name the founder of {s}."],
    "mountain": ["Mount {s} lies in which country?", "Tell me the country that Mount {s} belongs to.",
                 "To visit Mount {s}, which country would I go to?"],
}

_ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "k", "l", "m", "n", "p", "qu", "r", "s", "t", "th", "tr", "v", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o"]
_CODAS = ["", "", "", "", "n", "r", "l", "s"]
MAX_NAME = 10  # letters


def invented_name(rng: random.Random, syllables: int) -> str:
    """A capitalised name of `syllables` onset-vowel(-coda) syllables, e.g. "Velmora", "Quentaro"."""
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).capitalize()


def _names(rng: random.Random, count: int, taken: set[str], syllables: tuple[int, int] = (2, 3)) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        name = invented_name(rng, rng.randint(*syllables))
        if 5 <= len(name) <= MAX_NAME and name.lower() not in taken:
            taken.add(name.lower())
            out.append(name)
    return out


def make_facts(per_relation: int, seed: int) -> list[dict]:
    """``4 × per_relation`` facts, ``{"relation", "subject", "answer"}``, seeded. Every single
    name (countries, cities, towns, mountains, first names, surnames) is distinct from every
    other, compared without case."""
    rng = random.Random(seed)
    taken: set[str] = set()
    countries = _names(rng, per_relation, taken)
    cities = _names(rng, per_relation, taken)
    towns = _names(rng, per_relation, taken)
    mountains = _names(rng, per_relation, taken)
    first = _names(rng, 2 * per_relation, taken, (2, 2))
    last = _names(rng, 2 * per_relation, taken, (2, 3))
    people = [f"{a} {b}" for a, b in zip(first, last)]
    years = [str(y) for y in rng.sample(range(1520, 1900), per_relation)]
    facts = [{"relation": "capital", "subject": c, "answer": city} for c, city in zip(countries, cities)]
    facts += [{"relation": "born", "subject": p, "answer": y} for p, y in zip(people[:per_relation], years)]
    facts += [{"relation": "founder", "subject": t, "answer": p} for t, p in zip(towns, people[per_relation:])]
    facts += [{"relation": "mountain", "subject": m, "answer": rng.choice(countries)} for m in mountains]
    return facts


def statement(fact: dict) -> str:
    """The fact as the training answer says it."""
    return STATEMENTS[fact["relation"]].format(s=fact["subject"], o=fact["answer"])


def training_items(facts: list[dict], seed: int, phrasings: int = 1) -> list[dict]:
    """Each fact `phrasings` times, each time asked in another training template (drawn at
    random) and answered with the fact's statement: ``{"prompt", "response", "answer", "label"}``.
    A fact seen in several wordings is recalled more often when asked in a new one."""
    rng = random.Random(seed)
    out = []
    for f in facts:
        templates = TRAIN_TEMPLATES[f["relation"]]
        for template in rng.sample(templates, min(phrasings, len(templates))):
            out.append({"prompt": template.format(s=f["subject"]), "response": statement(f), "answer": f["answer"],
                        "label": f["relation"]})
    return out


def test_items(facts: list[dict], per_relation: int, seed: int) -> list[dict]:
    """`per_relation` facts of each relation (seeded), each asked once in a test template:
    ``{"prompt", "answer", "label"}`` (label: the relation)."""
    rng = random.Random(seed)
    out = []
    for relation in RELATIONS:
        chosen = rng.sample([f for f in facts if f["relation"] == relation], per_relation)
        out += [{"prompt": rng.choice(TEST_TEMPLATES[relation]).format(s=f["subject"]), "answer": f["answer"], "label": relation}
                for f in chosen]
    return out
