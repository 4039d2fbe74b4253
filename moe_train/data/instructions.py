"""A small instruction-tuning set generated in the package (no download), for tests, benchmarks and `make finetune`.

Five tasks a byte-level model can learn from a few thousand examples, each with a fixed prompt wording:
    add       "What is 37 + 45?" -> "82"
    reverse   "Reverse the words: the red fox" -> "fox red the"
    upper     "Write in capitals: quiet river" -> "QUIET RIVER"
    sort      "Sort these numbers: 9 2 7" -> "2 7 9"
    capital   "What is the capital of France?" -> "The capital of France is Paris."
Records are `{"prompt", "response", "task"}` dicts (the JSON-lines format data=chat reads), the tasks shuffled
together; the output depends only on (n, seed).
"""

from __future__ import annotations

import random
from typing import Callable

from moe_train.data import lexicon as lx

CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Kenya": "Nairobi", "Peru": "Lima", "Italy": "Rome",
            "Egypt": "Cairo", "Canada": "Ottawa", "Norway": "Oslo", "Chile": "Santiago", "India": "New Delhi",
            "Spain": "Madrid", "Ghana": "Accra", "Cuba": "Havana", "Nepal": "Kathmandu", "Poland": "Warsaw"}
WORDS = lx.ADJECTIVES + lx.ANIMALS + lx.PLACES + lx.COLORS + lx.OBJECTS


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"What is {a} + {b}?", str(a + b)


def _words(rng: random.Random) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(2, 5))]


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = _words(rng)
    return f"Reverse the words: {' '.join(words)}", " ".join(reversed(words))


def _upper(rng: random.Random) -> tuple[str, str]:
    words = " ".join(_words(rng))
    return f"Write in capitals: {words}", words.upper()


def _sort(rng: random.Random) -> tuple[str, str]:
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    return f"Sort these numbers: {' '.join(map(str, numbers))}", " ".join(map(str, sorted(numbers)))


def _capital(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(CAPITALS))
    return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add, "reverse": _reverse, "upper": _upper, "sort": _sort, "capital": _capital}


def generate_instructions(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n records cycling through TASKS in a shuffled order (each task about n / 5 times)."""
    rng = random.Random(f"moe_train.instructions/{seed}")
    names = [name for _ in range(-(-n // len(TASKS))) for name in TASKS][:n]
    rng.shuffle(names)
    return [dict(zip(("prompt", "response"), TASKS[name](rng)), task=name) for name in names]
