"""Word lists and fact tables of the embedded corpus (moe_train.data.embedded). Small on purpose: a repeated vocabulary
is part of what a small LM can learn from it."""

from __future__ import annotations

NAMES = ("anna", "tom", "maria", "ben", "lucy", "omar", "nina", "leo", "sara", "ivan", "mia", "sam")
PRONOUN = {"anna": "she", "tom": "he", "maria": "she", "ben": "he", "lucy": "she", "omar": "he", "nina": "she",
           "leo": "he", "sara": "she", "ivan": "he", "mia": "she", "sam": "he"}
ANIMALS = ("fox", "dog", "cat", "bird", "horse", "rabbit", "owl", "bear", "mouse", "frog")
ADJECTIVES = ("old", "small", "happy", "quiet", "brave", "tired", "clever", "young", "hungry", "gentle")
COLORS = ("red", "blue", "green", "yellow", "black", "white", "brown", "orange")
PLACES = ("river", "forest", "market", "garden", "village", "hill", "lake", "school", "bridge", "farm")
OBJECTS = ("boat", "book", "apple", "basket", "lamp", "key", "box", "hat", "letter", "ball")
MOTION_VERBS = ("walked", "ran", "went", "hurried", "wandered", "drove", "climbed")
FEELINGS = ("smiled", "laughed", "sighed", "waited", "sang", "rested", "nodded")
TIMES = ("in the morning", "at noon", "in the evening", "at night", "after lunch", "before dinner")

CITIES = ("paris", "rome", "berlin", "madrid", "lisbon", "vienna", "oslo", "prague", "dublin", "athens")
COUNTRY_CAPITAL = (("france", "paris"), ("italy", "rome"), ("germany", "berlin"), ("spain", "madrid"),
                   ("portugal", "lisbon"), ("austria", "vienna"), ("norway", "oslo"), ("ireland", "dublin"),
                   ("greece", "athens"), ("japan", "tokyo"), ("egypt", "cairo"), ("peru", "lima"))
ITEMS = ("pencil", "notebook", "cable", "chair", "lamp", "mug", "charger", "bottle", "stapler", "towel")
ROOMS = ("kitchen", "office", "hallway", "bedroom", "garage", "basement", "closet")
PRODUCTS = (("apple", 3), ("bread", 4), ("milk", 2), ("cheese", 7), ("rice", 5), ("coffee", 9), ("tea", 6),
            ("eggs", 4), ("butter", 8), ("honey", 11))

CODE_NOUNS = ("item", "value", "price", "score", "count", "user", "record", "node", "line", "word")
CODE_VERBS = ("get", "compute", "update", "load", "parse", "check", "build", "scale")
CODE_OPS = ("+", "-", "*")
