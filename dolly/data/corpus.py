"""The built-in pretraining corpus: seeded running text over the built-in tasks' lexicon.

The tiny profile's base model is pretrained on this text as a plain causal language model
before any instruction tuning, the way GPT-J was pretrained on the Pile before Dolly tuned it.
It is prose about the lexicon's nonsense words: people (words) meeting and greeting each other,
saying words and having them said back, lists of words that are counted and whose first word is
named, and phrases repeated later in a paragraph. Names recur within a paragraph, so predicting
the text needs copying a word seen earlier in the context (what induction heads do). There is no
Dolly marker, no instruction template and no question addressed to a reader: the base learns the
language, not the instruction format.
"""
from __future__ import annotations

import random

from dolly.data.builtin_tasks import lexicon

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _meet(rng, cast, words):
    a, b = rng.sample(cast, 2)
    return rng.choice((f"{a} met {b} by the river.", f"{a} and {b} walked home together.",
                       f"{b} waited for {a} all day.", f"{a} saw {b} and waved."))


def _greet(rng, cast, words):
    a, b = rng.sample(cast, 2)
    return rng.choice((f"{a} said hello to {b}: Hello, {b}!", f"Hello, {b}! said {a}.",
                       f"When {b} came in, {a} called out: Hello, {b}!"))


def _say(rng, cast, words):
    a, b = rng.sample(cast, 2)
    w = rng.choice(words)
    return rng.choice((f"{a} said the word {w}, and {b} said {w} back.",
                       f"{a} wrote the word {w} twice: {w} {w}.",
                       f"The word {a} liked best was {w}. {b} repeated it: {w}."))


def _list(rng, cast, words):
    a, b = rng.sample(cast, 2)
    ws = rng.sample(words, rng.randint(2, 5))
    n, phrase = NUMBER_WORDS[len(ws)], " ".join(ws)
    return rng.choice((
        f"{a} wrote down {phrase}. {b} read it back: {phrase}. That is {n} words, and the "
        f"first word is {ws[0]}.",
        f"The list {phrase} has {n} words ({len(ws)} in all); it starts with {ws[0]}.",
        f"There were {n} of them: {_join(ws)}. {ws[0]} came first.",
    ))


def _echo(rng, cast, words):
    ws = [rng.choice(words) for _ in range(rng.randint(3, 8))]
    phrase = " ".join(ws)
    return rng.choice((f"{rng.choice(cast)} sang {phrase}, and everyone sang {phrase} again.",
                       f"{rng.choice(cast)} said {phrase}. Then {rng.choice(cast)} said {phrase} too.",
                       f"On the wall it said {phrase}; below, someone had copied {phrase}."))


def _chant(rng, cast, words):
    ws = [rng.choice(words) for _ in range(rng.randint(4, 8))]
    phrase = " ".join(ws)
    return f"{rng.choice(cast)} chanted: {', '.join([phrase] * rng.randint(2, 4))}."


# Copying dominates: most sentences repeat a phrase or a name seen earlier in the paragraph,
# the pressure that makes a language model learn to copy from its context (induction heads).
_SENTENCES = (_meet, _greet, _say, _list, _list, _echo, _echo, _chant, _chant, _chant)


def paragraph(rng: random.Random, words: list[str]) -> str:
    """One paragraph: 3-6 sentences about a cast of 2-4 words that recur in it."""
    cast = rng.sample(words, rng.randint(2, 4))
    return " ".join(rng.choice(_SENTENCES)(rng, cast, words) for _ in range(rng.randint(3, 6)))


def generate(n: int, seed: int = 42, lexicon_size: int = 400) -> list[str]:
    """`n` paragraphs of running text over `lexicon(lexicon_size, seed)`; the same for the same
    arguments. A different `seed` gives other paragraphs over another lexicon draw, so held-out
    text for perplexity uses `seed` with a different stream (see `held_out`)."""
    words = lexicon(lexicon_size, seed)
    rng = random.Random(f"corpus-{seed}")
    return [paragraph(rng, words) for _ in range(n)]


def read_back_lines(n: int, seed: int = 42, lexicon_size: int = 400,
                    words_per_list: int = 8) -> list[str]:
    """`n` lines that read a list back: `words_per_list` words drawn from the lexicon (repeats
    allowed), a space and a semicolon, and the same words again, e.g. 'kela mopi zutu ;kela mopi
    zutu' (with 3 words). Half of each line can only be predicted by copying from earlier in the
    line: the dense copying signal that forms induction heads within a few hundred steps, where
    running prose, whose repeats are sparse, did not. Seeded; the same for the same arguments."""
    words = lexicon(lexicon_size, seed)
    rng = random.Random(f"read-back-{seed}")
    lines = []
    for _ in range(n):
        phrase = " ".join(rng.choice(words) for _ in range(words_per_list))
        lines.append(f"{phrase} ;{phrase}")
    return lines


def held_out(n: int, seed: int = 42, lexicon_size: int = 400) -> list[str]:
    """`n` paragraphs over the same lexicon as `generate(..., seed)` from another random stream:
    text the base model never trained on, for its perplexity."""
    words = lexicon(lexicon_size, seed)
    rng = random.Random(f"corpus-held-out-{seed}")
    return [paragraph(rng, words) for _ in range(n)]
