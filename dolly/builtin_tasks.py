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
    return template.format(w=w), "", w, (w,)


def _greet(rng, words):
    w = rng.choice(words)
    template = rng.choice(("Write a greeting for {w}.", "Say hello to {w}.", "Greet {w}."))
    return template.format(w=w), "", f"Hello, {w}!", (w,)


def _pick(rng, words):
    ws = rng.sample(words, rng.randint(3, 5))
    which = rng.choice(("first", "last"))
    return (f"What is the {which} word of the input?", " ".join(ws),
            ws[0] if which == "first" else ws[-1], (which, *ws))


def _count(rng, words):
    ws = rng.sample(words, rng.randint(2, 5))
    template = rng.choice(("How many words are in the input?", "Count the words in the input."))
    return template, " ".join(ws), _NUMBER_WORDS[len(ws)], tuple(ws)


def _contains(rng, words):
    ws = rng.sample(words, 4)
    present = rng.random() < 0.5
    target = rng.choice(ws[:3]) if present else ws[3]
    shown = ws[:3]
    return (f"Does the input contain the word {target}? Answer yes or no.", " ".join(shown),
            "yes" if present else "no", (target, *shown))


def _swap(rng, words):
    a, b = rng.sample(words, 2)
    return "Swap the two words in the input.", f"{a} {b}", f"{b} {a}", (a, b)


FAMILIES = {"repeat": _repeat, "greet": _greet, "pick": _pick, "count": _count,
            "contains": _contains, "swap": _swap}


def generate(n: int, seed: int = 42, lexicon_size: int = 400) -> list[dict]:
    """`n` records {instruction, input, output, category}, the same for the same seed."""
    rng = random.Random(seed)
    words = lexicon(lexicon_size, seed)
    used: set[tuple] = set()
    records: list[dict] = []
    names = list(FAMILIES)
    misses = 0
    while len(records) < n:
        family = names[(len(records) + misses) % len(names)]
        instruction, input_, output, args = FAMILIES[family](rng, words)
        if (family, args) in used:  # an input occurs once, so held-out inputs stay unseen
            misses += 1
            if misses > 100 * n:
                raise ValueError(f"cannot make {n} distinct records from {lexicon_size} words")
            continue
        used.add((family, args))
        records.append({"instruction": instruction, "input": input_, "output": output,
                        "category": family})
    rng.shuffle(records)
    return records
