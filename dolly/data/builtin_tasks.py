"""The built-in offline instruction dataset: seeded task families in Alpaca's layout.

Every answer follows from the instruction and its input by a rule (copy, pick, count, compare),
so a small model learns the *skill* and applies it to inputs it never saw. Words come from a
seeded lexicon of pronounceable nonsense words; no record's input (its family and arguments)
occurs twice in the dataset, so whatever the split, a test record's input never occurs in
training. Instructions without an input (repeat, greet) exercise Dolly's no-input prompt, the
one the registered model serves with.
"""
from __future__ import annotations

import random

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}


def lexicon(size: int, seed: int) -> list[str]:
    """`size` distinct lowercase two-syllable words."""
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(2)))
    return sorted(words)


def _repeat(rng, words):
    w = rng.choice(words)
    template = rng.choice(("Repeat the word {w}.", "Say the word {w} back to me.", "Echo this word: {w}"))
    return template.format(w=w), "", w


def _greet(rng, words):
    w = rng.choice(words)
    template = rng.choice(("Write a greeting for {w}.", "Say hello to {w}.", "Greet {w}."))
    return template.format(w=w), "", f"Hello, {w}!"


def _first(rng, words):
    ws = rng.sample(words, rng.randint(2, 5))
    return "What is the first word of the input?", " ".join(ws), ws[0]


def _count_word(rng, words):
    ws = rng.sample(words, rng.randint(2, 5))
    template = rng.choice(("How many words are in the input?", "Count the words in the input."))
    return template, " ".join(ws), _NUMBER_WORDS[len(ws)]


def _count_digit(rng, words):
    ws = rng.sample(words, rng.randint(2, 5))
    return "How many words are in the input? Answer with a digit.", " ".join(ws), str(len(ws))


def _more_than(rng, words):
    ws = rng.sample(words, rng.randint(2, 5))
    k = rng.randint(2, 4)
    return (f"Does the input have more than {_NUMBER_WORDS.get(k, k)} words? Answer yes or no.",
            " ".join(ws), "yes" if len(ws) > k else "no")


# The same input under different instructions gets different answers: the model has to read
# the instruction. Copy tasks (repeat, greet, first) need the most training to learn.
FAMILIES = {"repeat": _repeat, "greet": _greet, "first": _first, "count_word": _count_word,
            "count_digit": _count_digit, "more_than": _more_than}


# Draws in a row that may all repeat a used input before a family counts as used up: a no-input
# family has only `lexicon_size` distinct records (one per word).
_MAX_REPEATS = 1000


def generate(n: int, seed: int = 42, lexicon_size: int = 400) -> list[dict]:
    """`n` records {instruction, input, output, category}, the same for the same seed.

    Families take turns, so each has an equal share until one runs out of distinct records (the
    no-input families have one per lexicon word); the others then share its turns. A draw that
    repeats a used input is drawn again *for the same family*: moving on to the next family, as
    this once did, left greet and repeat with 9% and 8% of 3,000 records instead of 13% each, and
    the copy after `Hello, ` was the last family a default run learned. Raises ValueError when
    every family has run out before `n` records.
    """
    rng = random.Random(seed)
    words = lexicon(lexicon_size, seed)
    used: set[tuple] = set()
    records: list[dict] = []
    active = list(FAMILIES)
    turn = 0
    while len(records) < n:
        if not active:
            raise ValueError(f"cannot make {n} distinct records from {lexicon_size} words")
        family = active[turn % len(active)]
        for _ in range(_MAX_REPEATS):
            instruction, input_, output = FAMILIES[family](rng, words)
            # An input occurs once in the dataset (whatever the instruction), and a no-input
            # instruction once: whatever the split, a held-out record's input is unseen.
            key = input_ if input_ else (family, instruction.split()[-1].strip(".:!?"))
            if key not in used:
                break
        else:
            active.remove(family)  # used up: the others share its turns
            continue
        used.add(key)
        records.append({"instruction": instruction, "input": input_, "output": output,
                        "category": family})
        turn += 1
    rng.shuffle(records)
    return records
