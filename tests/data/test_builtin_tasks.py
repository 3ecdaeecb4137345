from collections import Counter

import pytest

from dolly.data import builtin_tasks, corpus
from dolly.data.words import CORPUS, DATASET, PROBE, part_of, words_in


def test_generation_is_seeded_and_literal():
    assert builtin_tasks.generate(6, seed=1) == [
        {"instruction": "Does the input have more than four words? Answer yes or no.",
         "input": "Mala fedape Nopo", "output": "no", "category": "more_than"},
        {"instruction": "What is the first word of the input?", "input": "vubi frart",
         "output": "vubi", "category": "first"},
        {"instruction": "How many words are in the input?", "input": "vomuse nagotu bonizafe",
         "output": "three", "category": "count_word"},
        {"instruction": "Greet Crastish.", "input": "", "output": "Hello, Crastish!",
         "category": "greet"},
        {"instruction": "Say the word whoathish back to me.", "input": "", "output": "whoathish",
         "category": "repeat"},
        {"instruction": "How many words are in the input? Answer with a digit.",
         "input": "faro fu misezofu si", "output": "4", "category": "count_digit"},
    ]
    assert builtin_tasks.generate(50, seed=1) == builtin_tasks.generate(50, seed=1)
    assert builtin_tasks.generate(50, seed=1) != builtin_tasks.generate(50, seed=2)


def test_families_take_equal_turns():
    assert Counter(r["category"] for r in builtin_tasks.generate(3000, seed=42)) == {
        family: 500 for family in builtin_tasks.FAMILIES}
    records = builtin_tasks.generate(600)
    assert any(r["input"] for r in records) and any(not r["input"] for r in records)


def task_words(record):
    """The words the record's skill works on, lowercase: the input's, or the repeated or
    greeted word."""
    if record["input"]:
        return {w.lower() for w in record["input"].split()}
    word = record["output"]
    if record["category"] == "greet":
        word = word.removeprefix("Hello, ").removesuffix("!")
    return {word.lower()}


def test_every_word_is_used_by_one_record_and_comes_from_the_dataset_part():
    records = builtin_tasks.generate(3000, seed=42)
    uses = Counter(w for r in records for w in task_words(r))
    assert max(uses.values()) == 1
    assert len(uses) > 7500  # an open vocabulary: thousands of distinct words
    assert {part_of(w) for w in uses} == {DATASET}
    # the probe's records come from another part, and avoid what they are told to
    probe = builtin_tasks.generate(300, seed=42, part=PROBE, avoid={"kaki"})
    assert {part_of(w) for r in probe for w in task_words(r)} == {PROBE}
    assert "kaki" not in {w for r in probe for w in task_words(r)}


def test_answers_follow_from_instruction_and_input():
    numbers = {"two": 2, "three": 3, "four": 4, "five": 5}
    for r in builtin_tasks.generate(300):
        words, out, ins = r["input"].split(), r["output"], r["instruction"]
        if r["category"] == "count_word":
            assert numbers[out] == len(words)
        elif r["category"] == "count_digit":
            assert out == str(len(words))
        elif r["category"] == "more_than":
            k = numbers[ins.split("more than ")[1].split()[0]]
            assert out == ("yes" if len(words) > k else "no")
        elif r["category"] == "first":
            assert out == words[0]
        elif r["category"] == "repeat":
            assert out in ins.replace(".", " ").replace(":", " ").split()
        elif r["category"] == "greet":
            assert out == f"Hello, {ins.rstrip('.').split()[-1]}!"
        else:
            raise AssertionError(r["category"])


def test_held_out_words_of_the_shipped_default_occur_nowhere_in_fine_tuning_or_pretraining():
    """The default profile's own records, seed and split (what `mlflow run .` evaluates on): no
    word of a held-out record occurs in the training split or in the pretraining corpus."""
    from dolly.config import load_config
    from dolly.data import split_indices

    cfg = load_config("configs/tiny.yaml", {})
    records = builtin_tasks.generate(cfg.builtin_records, cfg.seed)
    train, test = split_indices(len(records), cfg.test_count_or_fraction, cfg.seed)
    seen = set().union(*(words_in(" ".join(records[i].values())) for i in train))
    seen |= set().union(*(words_in(p) for p in corpus.generate(2000, cfg.seed)))
    seen |= set().union(*(words_in(line) for line in corpus.read_back_lines(5000, cfg.seed)))
    held = set().union(*(task_words(records[i]) for i in test))
    assert len(held) > 500 and held & seen == set()
    # every family is held out, so each one's exact match measures unseen words
    assert {records[i]["category"] for i in test} == set(builtin_tasks.FAMILIES)
    assert {part_of(w) for w in corpus.read_back_lines(1, cfg.seed)[0].split(";")[0].split()} \
        == {CORPUS}


def test_the_families_own_wording_is_never_a_task_word():
    fixed = builtin_tasks.fixed_words()
    assert {"repeat", "word", "hello", "greet", "input", "digit", "yes", "no"} <= fixed
    records = builtin_tasks.generate(3000, seed=7)
    assert not set().union(*(task_words(r) for r in records)) & fixed
    with pytest.raises(ValueError, match="part must be one of"):
        builtin_tasks.generate(1, part="lexicon")
