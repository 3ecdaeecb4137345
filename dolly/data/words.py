"""An open vocabulary for the built-in tasks and the pretraining corpus: words generated, not
looked up in a list.

A word is nonsense syllables (`kaki`, `zabokiru`: 1-4 consonant-vowel syllables), an
English-looking word built from English spelling patterns (`brindle`, `stomper`: onset
clusters, vowel teams, codas and endings), or either one capitalised as a name (`Mo`, `Tobi`).
The space of words is far larger than any run draws from, so words recur only by chance.

Every word belongs to one of three disjoint parts of that space, by a hash of its lowercase
spelling (`part_of`): the instruction dataset draws from one part, the pretraining corpus from
another, and evaluate's unseen-word probe from the third. So a word of the probe can occur in no
text the model or its tokenizer was trained on, and a held-out record's words (each word is used
by one record of the dataset only) occur nowhere in fine-tuning or pretraining. Words that the
fixed wording of the tasks and the corpus use (`word`, `river`, `hello`) are never generated.
"""
from __future__ import annotations

import hashlib
import random
import re

DATASET, CORPUS, PROBE = "dataset", "corpus", "probe"
# Shares of the word space, in sixteenths of the hash range: the dataset gets the most, the
# probe enough for thousands of distinct words even among the short ones.
_PARTS = ((DATASET, 10), (CORPUS, 4), (PROBE, 2))

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_ONSETS = ("b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
           "bl", "br", "ch", "cl", "cr", "dr", "fl", "fr", "gl", "gr", "pl", "pr", "sh", "sk",
           "sl", "sm", "sn", "sp", "st", "str", "sw", "th", "tr", "tw", "wh")
_NUCLEI = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "u", "ai", "ea", "ee", "oa", "oo", "ou")
_CODAS = ("", "", "", "ck", "ft", "l", "ll", "m", "mp", "n", "nd", "ng", "nk", "nt", "p", "r",
          "rk", "rn", "rt", "s", "sh", "sk", "st", "t", "th", "x")
_ENDINGS = ("", "", "", "", "er", "le", "ing", "y", "en", "et", "ow", "on", "ish")
# Syllables of a nonsense word: mostly two, as in the README's examples.
_SYLLABLES = (1, 2, 2, 2, 3, 3, 4)
# Word tokens of a text as `words_in` counts them: letters only, so "Hello," gives "hello".
_WORD = re.compile(r"[^\W\d_]+")


def words_in(text: str) -> set[str]:
    """The distinct words of `text`, lowercased: maximal runs of letters (Unicode `\\w` without
    digits and `_`). `Hello, Tobi!` -> {"hello", "tobi"}."""
    return {w.lower() for w in _WORD.findall(text)}


def part_of(word: str) -> str:
    """Which part of the word space `word` belongs to: "dataset", "corpus" or "probe", fixed by
    the first byte of sha256(lowercase word) (16 slots shared 10 / 4 / 2)."""
    slot = hashlib.sha256(word.lower().encode()).digest()[0] % 16
    for part, share in _PARTS:
        if slot < share:
            return part
        slot -= share
    raise AssertionError("the shares add up to 16")


def _nonsense(rng: random.Random) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS)
                   for _ in range(rng.choice(_SYLLABLES)))


def _english_like(rng: random.Random) -> str:
    word = rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)
    ending = rng.choice(_ENDINGS)
    if ending and word[-1] in _VOWELS + "y" and ending[0] in _VOWELS + "y":
        ending = ending[1:] or ""
    return word + ending


class WordSource:
    """Seeded words of one part of the word space (`part`: "dataset", "corpus" or "probe").

    `word()` draws a word: 60% nonsense, 25% English-looking, 15% a capitalised name of either
    kind. `fresh()` draws one this source has not given out before (case-insensitively), so the
    words of one dataset are each used once. `avoid` holds lowercase words never to give out
    (the fixed wording of the texts the words go into). The same seed gives the same words."""

    def __init__(self, seed, part: str, avoid: set[str] | frozenset[str] = frozenset(),
                 stream: str = ""):
        if part not in dict(_PARTS):
            raise ValueError(f"part must be one of {[p for p, _ in _PARTS]}, not {part!r}")
        # `stream` names an independent sequence of draws from the same part
        self.rng = random.Random(f"{stream}-{seed}" if stream else f"words-{part}-{seed}")
        self.part = part
        self.avoid = frozenset(avoid)
        self.used: set[str] = set()

    def word(self) -> str:
        rng = self.rng
        while True:
            kind = rng.random()
            word = _nonsense(rng) if kind < 0.6 or kind >= 0.85 and rng.random() < 0.5 \
                else _english_like(rng)
            if len(word) < 2 or word in self.avoid or part_of(word) != self.part:
                continue
            return word.capitalize() if kind >= 0.85 else word

    def fresh(self) -> str:
        for _ in range(100_000):
            word = self.word()
            if word.lower() not in self.used:
                self.used.add(word.lower())
                return word
        raise ValueError(f"the {self.part} part of the word space ran out of fresh words")

    def fresh_words(self, n: int) -> list[str]:
        return [self.fresh() for _ in range(n)]
