"""The built-in pretraining corpus: seeded running text over generated words.

The tiny profile's base model is pretrained on this text as a plain causal language model
before any instruction tuning, the way GPT-J was pretrained on the Pile before Dolly tuned it.
It is prose about generated words (dolly.data.words, the corpus's own part of the word space:
none of them is ever a task word): people meeting and greeting each other, saying words and
having them said back, lists of words that are counted and whose first word is named, and
phrases repeated later in a paragraph. Names recur within a paragraph, so predicting the text
needs copying a word seen earlier in the context (what induction heads do), whatever its
letters. There is no Dolly marker, no instruction template and no question addressed to a
reader: the base learns the language, not the instruction format.
"""
from __future__ import annotations

import random

from dolly.data.builtin_tasks import fixed_words as task_words
from dolly.data.words import CORPUS, WordSource, words_in

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")

# Placeholders: {a} {b} cast members, {w} a word, {p} a phrase, {n} a number word, {d} a digit,
# {f} the phrase's first word, {j} the phrase joined as a list ("x, y and z").
MEET = ("{a} met {b} by the river.", "{a} and {b} walked home together.",
        "{b} waited for {a} all day.", "{a} saw {b} and waved.")
GREET = ("{a} said hello to {b}: Hello, {b}!", "Hello, {b}! said {a}.",
         "When {b} came in, {a} called out: Hello, {b}!")
SAY = ("{a} said the word {w}, and {b} said {w} back.", "{a} wrote the word {w} twice: {w} {w}.",
       "The word {a} liked best was {w}. {b} repeated it: {w}.")
LIST = ("{a} wrote down {p}. {b} read it back: {p}. That is {n} words, and the first word is {f}.",
        "The list {p} has {n} words ({d} in all); it starts with {f}.",
        "There were {n} of them: {j}. {f} came first.")
ECHO = ("{a} sang {p}, and everyone sang {p} again.", "{a} said {p}. Then {b} said {p} too.",
        "On the wall it said {p}; below, someone had copied {p}.")
CHANT = "{a} chanted: {c}."


def fixed_words() -> set[str]:
    """Every word of the corpus's own wording (lowercase): never generated as a corpus word."""
    texts = [*MEET, *GREET, *SAY, *LIST, *ECHO, CHANT, *NUMBER_WORDS]
    return set().union(*(words_in(t.replace("{", " {").replace("}", "} ")) - set("abwpndfjc")
                         for t in texts))


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _meet(rng, cast, words):
    a, b = rng.sample(cast, 2)
    return rng.choice(MEET).format(a=a, b=b)


def _greet(rng, cast, words):
    a, b = rng.sample(cast, 2)
    return rng.choice(GREET).format(a=a, b=b)


def _say(rng, cast, words):
    a, b = rng.sample(cast, 2)
    return rng.choice(SAY).format(a=a, b=b, w=words.word())


def _list(rng, cast, words):
    a, b = rng.sample(cast, 2)
    ws = [words.word() for _ in range(rng.randint(2, 5))]
    return rng.choice(LIST).format(a=a, b=b, p=" ".join(ws), n=NUMBER_WORDS[len(ws)], d=len(ws),
                                   f=ws[0], j=_join(ws))


def _echo(rng, cast, words):
    a, b = rng.choice(cast), rng.choice(cast)
    phrase = " ".join(words.word() for _ in range(rng.randint(3, 8)))
    return rng.choice(ECHO).format(a=a, b=b, p=phrase)


def _chant(rng, cast, words):
    phrase = " ".join(words.word() for _ in range(rng.randint(4, 8)))
    return CHANT.format(a=rng.choice(cast), c=", ".join([phrase] * rng.randint(2, 4)))


# Copying dominates: most sentences repeat a phrase or a name seen earlier in the paragraph,
# the pressure that makes a language model learn to copy from its context (induction heads).
_SENTENCES = (_meet, _greet, _say, _list, _list, _echo, _echo, _chant, _chant, _chant)


def _source(seed: int, stream: str, part: str = CORPUS) -> WordSource:
    return WordSource(seed, part, avoid=fixed_words() | task_words(),
                      stream=f"corpus-words-{stream}")


def paragraph(rng: random.Random, words: WordSource) -> str:
    """One paragraph: 3-6 sentences about a cast of 2-4 words that recur in it."""
    cast = [words.word() for _ in range(rng.randint(2, 4))]
    return " ".join(rng.choice(_SENTENCES)(rng, cast, words) for _ in range(rng.randint(3, 6)))


def generate(n: int, seed: int = 42) -> list[str]:
    """`n` paragraphs of running text over corpus words (dolly.data.words); the same for the
    same arguments, and a longer corpus starts with a shorter one's paragraphs. Held-out text for
    perplexity comes from another random stream (see `held_out`)."""
    rng, words = random.Random(f"corpus-{seed}"), _source(seed, "train")
    return [paragraph(rng, words) for _ in range(n)]


def read_back_lines(n: int, seed: int = 42, words_per_list: tuple[int, int] = (2, 6),
                    part: str = CORPUS) -> list[str]:
    """`n` lines that read a list back: a number of words in `words_per_list` (inclusive),
    a space and a semicolon, and the same words again, e.g. 'kela Strinder zu ;kela Strinder zu'.
    Half of each line can only be predicted by copying from earlier in the line, token by token
    (a generated word is often several tokens): the dense copying signal that forms induction
    heads within a few hundred steps, where running prose, whose repeats are sparse, did not.
    Seeded; the same for the same arguments. `part` "probe" draws the words from the probe's
    part of the word space (dolly.data.words), for measuring copying on unseen words."""
    rng, words = random.Random(f"read-back-{part}-{seed}"), _source(seed, "read-back", part)
    lines = []
    for _ in range(n):
        phrase = " ".join(words.word() for _ in range(rng.randint(*words_per_list)))
        lines.append(f"{phrase} ;{phrase}")
    return lines


def held_out(n: int, seed: int = 42) -> list[str]:
    """`n` paragraphs like `generate(..., seed)` from another random stream: text the base model
    never trained on, for its perplexity."""
    rng, words = random.Random(f"corpus-held-out-{seed}"), _source(seed, "held-out")
    return [paragraph(rng, words) for _ in range(n)]
