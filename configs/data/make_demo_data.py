#!/usr/bin/env python3
"""Write the demo's three small Alpaca-format tasks as JSONL files next to this script.

Each task is short and regular, so SmolLM2-135M-Instruct with a LoRA adapter visibly
learns it within about 60 optimizer steps (the loss falls clearly), and each example stays
well under 96 tokens so the demo is quick on a CPU:

* ``uppercase.jsonl``: rewrite a short sentence in capital letters.
* ``sentiment.jsonl``: classify a one-line review as exactly ``positive`` or ``negative``.
* ``extract_json.jsonl``: pull name, age and city out of a sentence as compact JSON,
  e.g. ``{"name": "Alice", "age": 31, "city": "Paris"}``.

And one evaluation task, ``sentiment_choice.jsonl``: held-out reviews (none is in
``sentiment.jsonl``) as a 3-way multiple choice (positive, negative, neutral; `mc` format:
question, choices, answer), on which the demo scores the base model and every adapter.

The rows are generated from word lists with seeded ``random.Random`` instances (string
seeds, so the output is byte-identical on every run and Python version): no downloads.
Usage: ``python configs/data/make_demo_data.py [--out DIR]``. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import random

ROWS_PER_TASK = 300

# --------------------------------------------------------------------------------------
# uppercase
# --------------------------------------------------------------------------------------

_UPPER_INSTRUCTIONS = [
    "Rewrite the sentence in capital letters.",
    "Convert this sentence to uppercase.",
    "Write the following sentence in all caps.",
]
_SUBJECTS = [
    "the cat", "my neighbor", "a small boy", "the old farmer", "our teacher", "the pilot",
    "a tired nurse", "the baker", "my sister", "the young artist", "a quiet student",
    "the mayor", "his uncle", "the chef", "a curious fox", "the driver", "her brother",
    "the gardener", "a lost tourist", "the captain", "my grandmother", "the dog",
    "a busy doctor", "the singer", "our coach", "the librarian", "a brave knight",
    "the fisherman", "my cousin", "the robot",
]
_VERBS = [
    "painted", "found", "carried", "opened", "cleaned", "sold", "fixed", "watched",
    "borrowed", "dropped", "built", "washed", "lost", "packed", "moved", "bought",
    "hid", "counted", "cooked", "repaired", "wrapped", "delivered", "shared", "stole",
]
_OBJECTS = [
    "a red bicycle", "the wooden door", "an old map", "three apples", "a blue kite",
    "the heavy box", "a silver key", "some fresh bread", "the broken clock", "a tiny boat",
    "two green chairs", "the garden hose", "a paper lantern", "the last cookie",
    "a leather bag", "the yellow tent", "a warm blanket", "five letters", "the glass jar",
    "a wooden spoon", "the family car", "a strange stone",
]
_ADJUNCTS = [
    "", "", "", "yesterday", "at noon", "in the rain", "before dinner", "near the river",
    "after school", "on monday", "last night", "by the window", "in the park", "at dawn",
    "with great care", "without a word",
]


def make_uppercase(n: int) -> list[dict]:
    rng = random.Random("mlora-tui-demo/uppercase")
    rows, seen = [], set()
    while len(rows) < n:
        words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
        adjunct = rng.choice(_ADJUNCTS)
        if adjunct:
            words.append(adjunct)
        sentence = " ".join(words)
        sentence = sentence[0].upper() + sentence[1:] + rng.choice([".", ".", ".", "!"])
        if sentence in seen:
            continue
        seen.add(sentence)
        rows.append({"instruction": rng.choice(_UPPER_INSTRUCTIONS), "input": sentence,
                     "output": sentence.upper()})
    return rows


# --------------------------------------------------------------------------------------
# sentiment
# --------------------------------------------------------------------------------------

_SENTIMENT_INSTRUCTION = "Classify the sentiment of the review as positive or negative."
_ITEMS = [
    "The blender", "This phone case", "The hotel", "The movie", "This novel", "The pizza",
    "The headphones", "This backpack", "The coffee maker", "The app", "The concert",
    "This jacket", "The restaurant", "The sofa", "This game", "The printer", "The tour",
    "The shampoo", "This laptop", "The museum", "The desk lamp", "The running shoes",
    "The delivery", "This cookbook", "The hair dryer", "The rental car",
]
# Phrases fit any item (a film, a phone, a hotel...), so every review reads naturally.
_POSITIVE = [
    "works perfectly", "exceeded my expectations", "is worth every penny",
    "made my week", "is simply wonderful", "was a delight from start to finish",
    "feels well made", "is fast and reliable", "was a pleasant surprise",
    "is exactly what I wanted", "is the best I have tried", "did not disappoint",
    "was fun and memorable", "is excellent quality", "keeps getting better",
]
_NEGATIVE = [
    "broke after two days", "was a waste of money", "stopped working within a week",
    "is cheaply made", "was not worth it", "is a total letdown",
    "did not live up to the hype", "arrived damaged", "left me annoyed",
    "is slow and frustrating", "fell apart quickly", "is poor quality",
    "was worse than expected", "gets worse every day", "was a huge disappointment",
]
_POSITIVE_TAILS = ["", "", "", "Highly recommended.", "Would buy again.", "Five stars.",
                   "I love it.", "Great value."]
_NEGATIVE_TAILS = ["", "", "", "Avoid it.", "Never again.", "One star.",
                   "I want a refund.", "Not recommended."]


def make_sentiment(n: int) -> list[dict]:
    rng = random.Random("mlora-tui-demo/sentiment")
    # Exactly balanced labels in a shuffled order: a constant answer scores only 50%.
    labels = [True] * (n // 2) + [False] * (n - n // 2)
    rng.shuffle(labels)
    rows, seen = [], set()
    while len(rows) < n:
        positive = labels[len(rows)]
        phrases, tails = (_POSITIVE, _POSITIVE_TAILS) if positive else (_NEGATIVE, _NEGATIVE_TAILS)
        review = f"{rng.choice(_ITEMS)} {rng.choice(phrases)}."
        tail = rng.choice(tails)
        if tail:
            review += " " + tail
        if review in seen:
            continue
        seen.add(review)
        rows.append({"instruction": _SENTIMENT_INSTRUCTION, "input": review,
                     "output": "positive" if positive else "negative"})
    return rows


EVAL_ROWS = 40
_CHOICES = ["positive", "negative", "neutral"]


def make_sentiment_choice(n: int) -> list[dict]:
    """Reviews the sentiment adapter never saw, as multiple choice (answer: an index)."""
    trained = {row["input"] for row in make_sentiment(ROWS_PER_TASK)}
    rng = random.Random("mlora-tui-demo/sentiment_choice")
    labels = [True] * (n // 2) + [False] * (n - n // 2)
    rng.shuffle(labels)
    rows, seen = [], set(trained)
    while len(rows) < n:
        positive = labels[len(rows)]
        review = f"{rng.choice(_ITEMS)} {rng.choice(_POSITIVE if positive else _NEGATIVE)}."
        if review in seen:
            continue
        seen.add(review)
        rows.append({"question": f"What is the sentiment of this review? {review}",
                     "choices": list(_CHOICES), "answer": 0 if positive else 1})
    return rows


# --------------------------------------------------------------------------------------
# extract_json
# --------------------------------------------------------------------------------------

_EXTRACT_INSTRUCTION = "Extract name, age and city as JSON."
_NAMES = [
    "Alice", "Bob", "Carmen", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jamal",
    "Kenji", "Laura", "Mateo", "Nadia", "Omar", "Priya", "Quentin", "Rosa", "Samuel",
    "Tara", "Umar", "Vera", "Walter", "Ximena", "Yusuf", "Zoe", "Anton", "Bianca", "Chen",
    "Dmitri", "Eva", "Felix", "Hana", "Ivan", "Julia", "Kofi", "Lena", "Marco", "Nora",
    "Oscar", "Paula", "Rafael", "Sofia", "Tomas", "Ada", "Leo", "Mia", "Noah",
]
_CITIES = [
    "Paris", "Berlin", "Madrid", "Rome", "Lisbon", "Vienna", "Prague", "Oslo", "Dublin",
    "Warsaw", "Athens", "Cairo", "Nairobi", "Lagos", "Tokyo", "Seoul", "Mumbai", "Lima",
    "Bogota", "Toronto", "Chicago", "Boston", "Denver", "Sydney", "Auckland", "Istanbul",
    "Helsinki", "Zurich", "Amsterdam", "Montreal", "Austin", "Kyoto", "Manila", "Santiago",
]
_EXTRACT_SENTENCES = [
    "{name} is {age} years old and lives in {city}.",
    "Meet {name}, a {age}-year-old from {city}.",
    "{city} is home to {name}, who is {age}.",
    "At {age}, {name} moved to {city}.",
    "My friend {name} ({age}) lives in {city}.",
    "{name}, aged {age}, works in {city}.",
    "Born {age} years ago, {name} now lives in {city}.",
    "{name} from {city} turned {age} this year.",
    "The new tenant in {city} is {name}, {age} years old.",
    "{name} just celebrated a {age}th birthday in {city}.",
]


def make_extract_json(n: int) -> list[dict]:
    rng = random.Random("mlora-tui-demo/extract_json")
    rows, seen = [], set()
    while len(rows) < n:
        name, city, age = rng.choice(_NAMES), rng.choice(_CITIES), rng.randint(19, 88)
        sentence = rng.choice(_EXTRACT_SENTENCES).format(name=name, age=age, city=city)
        if sentence in seen:
            continue
        seen.add(sentence)
        rows.append({"instruction": _EXTRACT_INSTRUCTION, "input": sentence,
                     "output": json.dumps({"name": name, "age": age, "city": city})})
    return rows


# --------------------------------------------------------------------------------------

TASKS = {
    "uppercase.jsonl": make_uppercase,
    "sentiment.jsonl": make_sentiment,
    "extract_json.jsonl": make_extract_json,
}


def render(rows: list[dict]) -> str:
    """The JSONL text for ``rows``: one compact object a line, ``\\n`` line ends."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def generate(n: int = ROWS_PER_TASK) -> dict[str, str]:
    """File name -> JSONL text, for every demo task (and its evaluation task)."""
    files = {name: render(make(n)) for name, make in TASKS.items()}
    files["sentiment_choice.jsonl"] = render(make_sentiment_choice(EVAL_ROWS))
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                        help="folder to write into (default: this script's folder)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name, text in generate().items():
        path = os.path.join(args.out, name)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        print(f"wrote {path}: {text.count(chr(10))} rows, {len(text.encode())} bytes")


if __name__ == "__main__":
    main()
