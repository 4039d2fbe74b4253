"""A generated corpus with distinct sub-domains, so expert specialisation can be observed without a download.

`embedded_documents(size)` returns (domain, text) pairs whose texts total exactly `size` bytes (ASCII). The output
depends only on `size` (its own `random.Random(CORPUS_SEED)`, never the global RNG), and the corpus of a smaller size
is a prefix of a larger one. Every domain has structure a small byte-level LM can learn, so its loss falls well below
the unigram entropy (~4.5 bits/byte):
    story     English-like narrative from a small grammar: pronouns agree with the protagonist, a/an with the noun
    code      Python-like functions, loops and classes (indentation, `def`/`return`, consistent names)
    math      arithmetic equations with correct answers: `37+45=82`, `12*7=84`, `90-15=75`
    csv       a header then rows; in sales tables total = qty * unit price
    json      JSON-lines records with a fixed key order and typed values
    dialogue  Q/A about a fixed fact table (capital cities) and User/Assistant requests
Generating 1 MB takes well under a second. `entropy_floor` gives the entropy of the generators per token, per domain:
no model can have a lower expected loss on this corpus.
"""

from __future__ import annotations

import math
import random
from statistics import fmean
from typing import Callable

from moe_train.data import lexicon as lx

CORPUS_SEED = 20240601


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _sentence(rng: random.Random, name: str) -> str:
    pronoun = lx.PRONOUN[name]
    forms = (
        f"{pronoun} {rng.choice(lx.MOTION_VERBS)} to the {rng.choice(lx.PLACES)} {rng.choice(lx.TIMES)}.",
        f"{pronoun} saw {_a(rng.choice(lx.ADJECTIVES))} {rng.choice(lx.ANIMALS)} near the {rng.choice(lx.PLACES)}.",
        f"{pronoun} found {_a(rng.choice(lx.COLORS))} {rng.choice(lx.OBJECTS)} and {rng.choice(lx.FEELINGS)}.",
        f"the {rng.choice(lx.ADJECTIVES)} {rng.choice(lx.ANIMALS)} followed {name} to the {rng.choice(lx.PLACES)}.",
        f"when the sun went down, {pronoun} {rng.choice(lx.FEELINGS)}.",
    )
    sentence = rng.choice(forms)
    return sentence[0].upper() + sentence[1:]


def _story(rng: random.Random) -> str:
    name = rng.choice(lx.NAMES)
    opening = f"Once upon a time, {name.capitalize()} lived near the {rng.choice(lx.PLACES)}."
    body = [_sentence(rng, name) for _ in range(rng.randint(3, 8))]
    return " ".join([opening, *body, "The end."]) + "\n"


def _code_arith(rng: random.Random) -> str:
    noun, verb, op = rng.choice(lx.CODE_NOUNS), rng.choice(lx.CODE_VERBS), rng.choice(lx.CODE_OPS)
    return (f"def {verb}_{noun}(a, b):\n    {noun} = a {op} b\n    return {noun}\n\n\n"
            f"print({verb}_{noun}({rng.randint(1, 9)}, {rng.randint(1, 9)}))\n")


def _code_loop(rng: random.Random) -> str:
    noun, limit = rng.choice(lx.CODE_NOUNS), rng.randint(1, 99)
    return (f"def count_{noun}s({noun}s):\n    total = 0\n    for {noun} in {noun}s:\n"
            f"        if {noun} > {limit}:\n            total += 1\n    return total\n")


def _code_class(rng: random.Random) -> str:
    noun, field = rng.choice(lx.CODE_NOUNS), rng.choice(lx.CODE_NOUNS)
    return (f"class {noun.capitalize()}:\n    def __init__(self, {field}):\n        self.{field} = {field}\n\n"
            f"    def get_{field}(self):\n        return self.{field}\n")


def _code(rng: random.Random) -> str:
    return rng.choice((_code_arith, _code_loop, _code_class))(rng)


def _equation(rng: random.Random) -> str:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 19), rng.randint(2, 19)
        return f"{a}*{b}={a * b}"
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"{a}-{b}={a - b}"
    return f"{a}+{b}={a + b}"


def _math(rng: random.Random) -> str:
    return "\n".join(_equation(rng) for _ in range(rng.randint(6, 16))) + "\n"


def _csv_people(rng: random.Random) -> list[str]:
    rows = ["id,name,city,age"]
    for i in range(1, rng.randint(4, 10)):
        rows.append(f"{i},{rng.choice(lx.NAMES)},{rng.choice(lx.CITIES)},{rng.randint(18, 90)}")
    return rows


def _csv_sales(rng: random.Random) -> list[str]:
    rows = ["day,product,qty,price,total"]
    for day in range(1, rng.randint(4, 10)):
        product, price = rng.choice(lx.PRODUCTS)
        qty = rng.randint(1, 9)
        rows.append(f"{day},{product},{qty},{price},{qty * price}")
    return rows


def _csv(rng: random.Random) -> str:
    return "\n".join(rng.choice((_csv_people, _csv_sales))(rng)) + "\n"


def _json_record(rng: random.Random, i: int) -> str:
    tags = ", ".join(f'"{c}"' for c in rng.sample(lx.COLORS, rng.randint(1, 3)))
    active = "true" if rng.random() < 0.5 else "false"
    return (f'{{"id": {i}, "user": "{rng.choice(lx.NAMES)}", "city": "{rng.choice(lx.CITIES)}", '
            f'"active": {active}, "tags": [{tags}]}}')


def _json(rng: random.Random) -> str:
    start = rng.randint(1, 900)
    return "\n".join(_json_record(rng, start + i) for i in range(rng.randint(3, 8))) + "\n"


def _exchange(rng: random.Random) -> str:
    if rng.random() < 0.5:
        country, capital = rng.choice(lx.COUNTRY_CAPITAL)
        return f"Q: What is the capital of {country}?\nA: The capital of {country} is {capital}."
    item, room = rng.choice(lx.ITEMS), rng.choice(lx.ROOMS)
    return f"User: Where is my {item}?\nAssistant: Your {item} is in the {room}. Check the {room} first."


def _dialogue(rng: random.Random) -> str:
    return "\n".join(_exchange(rng) for _ in range(rng.randint(2, 6))) + "\n"


GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "story": _story, "code": _code, "math": _math, "csv": _csv, "json": _json, "dialogue": _dialogue}
DOMAINS = tuple(GENERATORS)
"""Domain names; a domain's index here is its label in `moe_train.data.packing.domain_labels`."""


def embedded_documents(size: int) -> list[tuple[str, str]]:
    """(domain, text) pairs, domains drawn uniformly, texts totalling exactly `size` bytes (the last one is cut)."""
    if size < 1:
        raise ValueError(f"data.embedded_size={size} must be >= 1 byte")
    rng, docs, total = random.Random(CORPUS_SEED), [], 0
    while total < size:
        domain = rng.choice(DOMAINS)
        text = GENERATORS[domain](rng)[: size - total]
        docs.append((domain, text))
        total += len(text)
    return docs


# --- The corpus's entropy ---------------------------------------------------------------------------------------------
# Expected entropy (nats) of one document of each domain: the log-count of every random choice that shows in the text
# (choices made but not shown, such as the sentence forms `_sentence` builds and drops, do not count), with the
# expected number of repeats for counted parts. Mirrors the generators above; tests/test_data.py checks each part
# against the generators' own draws, or against a plug-in estimate from sampled texts where a draw does not show.


def _choices(*options) -> float:
    """Entropy of independent uniform choices among options (sizes of lists, or counts)."""
    return sum(math.log(n if isinstance(n, int) else len(n)) for n in options)


def sentence_entropy() -> float:
    forms = ((lx.MOTION_VERBS, lx.PLACES, lx.TIMES), (lx.ADJECTIVES, lx.ANIMALS, lx.PLACES),
             (lx.COLORS, lx.OBJECTS, lx.FEELINGS), (lx.ADJECTIVES, lx.ANIMALS, lx.PLACES), (lx.FEELINGS,))
    return math.log(len(forms)) + fmean(_choices(*form) for form in forms)


def code_entropy() -> float:
    arith = _choices(lx.CODE_NOUNS, lx.CODE_VERBS, lx.CODE_OPS, 9, 9)
    return math.log(3) + fmean((arith, _choices(lx.CODE_NOUNS, 99), _choices(lx.CODE_NOUNS, lx.CODE_NOUNS)))


def equation_entropy() -> float:
    """`a-b` shows (max, min) of two draws from 0..99: 100 equal pairs at 1e-4, 4,950 others at 2e-4."""
    subtraction = 100 * 1e-4 * math.log(1e4) + 4950 * 2e-4 * math.log(5e3)
    return math.log(3) + fmean((_choices(18, 18), _choices(100, 100), subtraction))


def csv_row_entropy() -> float:
    """Mean over the two table kinds (a document's rows are all of one kind)."""
    return fmean((_choices(lx.NAMES, lx.CITIES, 73), _choices(lx.PRODUCTS, 9)))


def json_record_entropy() -> float:
    colors = len(lx.COLORS)
    tags = math.log(3) + fmean(math.log(math.perm(colors, k)) for k in (1, 2, 3))  # ordered samples of 1-3
    return tags + _choices(2, lx.NAMES, lx.CITIES)


def exchange_entropy() -> float:
    return math.log(2) + fmean((_choices(lx.COUNTRY_CAPITAL), _choices(lx.ITEMS, lx.ROOMS)))


DOCUMENT_ENTROPY: dict[str, Callable[[], float]] = {  # expected nats per document; counts randint(a, b): (a+b)/2
    "story": lambda: _choices(lx.NAMES, lx.PLACES, 6) + 5.5 * sentence_entropy(),
    "code": code_entropy,
    "math": lambda: _choices(11) + 11 * equation_entropy(),
    "csv": lambda: _choices(2, 7) + 6 * csv_row_entropy(),
    "json": lambda: _choices(900, 6) + 5.5 * json_record_entropy(),
    "dialogue": lambda: _choices(5) + 4 * exchange_entropy(),
}


def entropy_floor(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Nats per token (a byte, or a document's separator) of the generators over the documents `pairs` (from
    `embedded_documents`), per domain and "all": each document's expected entropy plus its domain draw. A lower bound
    on any model's expected loss; a model seeing 128 bytes of context also misses what lies before its window."""
    docs, tokens = dict.fromkeys(DOMAINS, 0), dict.fromkeys(DOMAINS, 0)
    for domain, text in pairs:
        docs[domain] += 1
        tokens[domain] += len(text) + 1
    nats = {d: docs[d] * (DOCUMENT_ENTROPY[d]() + math.log(len(DOMAINS))) for d in DOMAINS}
    floor = {d: nats[d] / tokens[d] for d in DOMAINS if tokens[d]}
    return {**floor, "all": sum(nats.values()) / sum(tokens.values())}
