"""The built-in offline instruction dataset: seeded task families in Alpaca's layout.

Every answer follows from the instruction and its input by a rule (copy, pick, count, compare),
so a small model learns the *skill* and applies it to inputs it never saw. Words come from an
open generator (dolly.data.words: nonsense words of 1-4 syllables, English-looking words,
capitalised names), and each word is used by one record only: whatever the split, a held-out
record's words occur nowhere in fine-tuning, and none of them occurs in the pretraining corpus
(another part of the word space). Instructions without an input (repeat, greet) exercise Dolly's
no-input prompt, the one the registered model serves with.
"""
from __future__ import annotations

import random

from dolly.data.words import DATASET, WordSource, words_in

NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}

REPEAT = ("Repeat the word {w}.", "Say the word {w} back to me.", "Echo this word: {w}")
GREET = ("Write a greeting for {w}.", "Say hello to {w}.", "Greet {w}.")
GREETING = "Hello, {w}!"
FIRST = "What is the first word of the input?"
COUNT_WORD = ("How many words are in the input?", "Count the words in the input.")
COUNT_DIGIT = "How many words are in the input? Answer with a digit."
MORE_THAN = "Does the input have more than {k} words? Answer yes or no."
# The multi-turn family (conversations only): the answer is in an earlier turn.
RECALL_NOTED = "Noted."
RECALL_FIRST = "What was the first word I said?"
RECALL_NAME_INTRO = "My name is {w}."
RECALL_NAME_REPLY = "Nice to meet you, {w}!"
RECALL_NAME = "What is my name?"


def fixed_words(conversations: bool = False) -> set[str]:
    """Every word of the families' own wording (lowercase): never generated as a task word; with
    `conversations`, the multi-turn families' wording too (built-in data in chat form). The
    instruction families' set alone is what the default's dataset and the pretraining corpus
    avoid, unchanged since before conversations."""
    texts = [*REPEAT, *GREET, GREETING, FIRST, *COUNT_WORD, COUNT_DIGIT, MORE_THAN,
             *NUMBER_WORDS.values(), "yes no"]
    if conversations:
        texts += [RECALL_NOTED, RECALL_FIRST, RECALL_NAME_INTRO, RECALL_NAME_REPLY, RECALL_NAME]
    return set().union(*(words_in(t.replace("{w}", " ").replace("{k}", " ")) for t in texts))


def _repeat(rng, words):
    w = words.fresh()
    return rng.choice(REPEAT).format(w=w), "", w


def _greet(rng, words):
    w = words.fresh()
    return rng.choice(GREET).format(w=w), "", GREETING.format(w=w)


def _first(rng, words):
    ws = words.fresh_words(rng.randint(2, 5))
    return FIRST, " ".join(ws), ws[0]


def _count_word(rng, words):
    ws = words.fresh_words(rng.randint(2, 5))
    return rng.choice(COUNT_WORD), " ".join(ws), NUMBER_WORDS[len(ws)]


def _count_digit(rng, words):
    ws = words.fresh_words(rng.randint(2, 5))
    return COUNT_DIGIT, " ".join(ws), str(len(ws))


def _more_than(rng, words):
    ws = words.fresh_words(rng.randint(2, 5))
    k = rng.randint(2, 4)
    return MORE_THAN.format(k=NUMBER_WORDS[k]), " ".join(ws), "yes" if len(ws) > k else "no"


# The same kind of input under different instructions gets different answers: the model has to
# read the instruction. Copy tasks (repeat, greet, first) need the most training to learn.
FAMILIES = {"repeat": _repeat, "greet": _greet, "first": _first, "count_word": _count_word,
            "count_digit": _count_digit, "more_than": _more_than}


def _recall(rng, words) -> list[dict]:
    """Two turns; the second question's answer is in the first turn: the first of the words the
    user said, or the name the user gave."""
    if rng.random() < 0.5:
        ws = words.fresh_words(rng.randint(2, 4))
        turns = [" ".join(ws), RECALL_NOTED, RECALL_FIRST, ws[0]]
    else:
        w = words.fresh().capitalize()
        turns = [RECALL_NAME_INTRO.format(w=w), RECALL_NAME_REPLY.format(w=w), RECALL_NAME, w]
    return [{"role": role, "content": text}
            for role, text in zip(("user", "assistant", "user", "assistant"), turns)]


# Families of conversations of more than one user turn: built-in data in chat form only.
CHAT_FAMILIES = {"recall": _recall}


def generate(n: int, seed: int = 42, part: str = DATASET,
             avoid: set[str] | None = None, conversations: bool = False) -> list[dict]:
    """`n` records {instruction, input, output, category}, the same for the same seed; with
    `conversations`, the multi-turn families (CHAT_FAMILIES) take their turns too, as records
    {messages, category} (OpenAI / Hugging Face chat layout) beside the instruction records.

    Families take turns, so each has an equal share. Every task word is drawn fresh from `part`
    of the word space (dolly.data.words; "probe" for evaluate's unseen-word probe), used by one
    record only, and never one of `avoid` (lowercase) nor of the families' own wording.
    """
    rng = random.Random(f"tasks-{part}-{seed}")
    words = WordSource(seed, part, avoid=fixed_words(conversations) | set(avoid or ()))
    records: list[dict] = []
    families = list(FAMILIES) + (list(CHAT_FAMILIES) if conversations else [])
    for i in range(n):
        family = families[i % len(families)]
        if family in CHAT_FAMILIES:
            records.append({"messages": CHAT_FAMILIES[family](rng, words), "category": family})
            continue
        instruction, input_, output = FAMILIES[family](rng, words)
        records.append({"instruction": instruction, "input": input_, "output": output,
                        "category": family})
    rng.shuffle(records)
    return records
