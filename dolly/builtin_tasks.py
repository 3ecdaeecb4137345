"""The built-in offline instruction dataset: seeded task families in Alpaca's layout.

Every answer follows from the instruction and input alone (copying, reordering, counting), so a
small model can learn the *skill* and apply it to words it never saw. Each record's arguments are
unique across the whole dataset, so whatever the split, a test record's input never occurs in
training. Words are pronounceable nonsense built from syllables, so none is a lookup.
"""
from __future__ import annotations

import random

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_ORDINALS = {1: "first", 2: "second", 3: "third"}
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.choice((2, 3))))


def _repeat(rng, w):
    word = w()
    templates = ("Repeat the word {w}.", "Say the word {w} back to me.", "Echo this word: {w}")
    return rng.choice(templates).format(w=word), "", word, (word,)


def _greet(rng, w):
    name = w().capitalize()
    templates = ("Write a greeting for {n}.", "Say hello to {n}.", "Greet {n}.")
    return rng.choice(templates).format(n=name), "", f"Hello, {name}!", (name,)


def _reverse(rng, w):
    words = [w() for _ in range(3)]
    templates = ("Reverse the order of the words in the input.",
                 "Write the words of the input in reverse order.")
    return rng.choice(templates), " ".join(words), " ".join(reversed(words)), tuple(words)


def _pick(rng, w):
    n = rng.randint(3, 5)
    words = [w() for _ in range(n)]
    pos = rng.choice((1, 2, 3, n))
    which = "last" if pos == n else _ORDINALS[pos]
    return (f"What is the {which} word of the input?", " ".join(words), words[pos - 1],
            tuple(words) + (which,))


def _count(rng, w):
    n = rng.randint(2, 5)
    words = [w() for _ in range(n)]
    templates = ("How many words are in the input?", "Count the words in the input.")
    return rng.choice(templates), " ".join(words), _NUMBER_WORDS[n], tuple(words)


FAMILIES = {"repeat": _repeat, "greet": _greet, "reverse": _reverse, "pick": _pick,
            "count": _count}


def generate(n: int, seed: int = 42) -> list[dict]:
    """`n` records {instruction, input, output, category}, the same for the same seed."""
    rng = random.Random(seed)
    used_args: set[tuple] = set()
    used_words: set[str] = set()
    records = []
    names = list(FAMILIES)

    def fresh_word() -> str:
        # A word used by one record is never reused by another: held-out inputs stay unseen.
        while True:
            word = _word(rng)
            if word not in used_words:
                used_words.add(word)
                return word

    while len(records) < n:
        family = names[len(records) % len(names)]
        instruction, input_, output, args = FAMILIES[family](rng, fresh_word)
        if (family, args) in used_args:
            continue
        used_args.add((family, args))
        records.append({"instruction": instruction, "input": input_, "output": output,
                        "category": family})
    rng.shuffle(records)
    return records
