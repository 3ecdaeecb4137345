from collections import Counter

from dolly.data import builtin_tasks


def test_generation_is_seeded():
    assert builtin_tasks.generate(50, seed=1) == builtin_tasks.generate(50, seed=1)
    assert builtin_tasks.generate(50, seed=1) != builtin_tasks.generate(50, seed=2)


def test_families_mix_inputs_and_no_inputs():
    records = builtin_tasks.generate(600)
    counts = Counter(r["category"] for r in records)
    assert set(counts) == set(builtin_tasks.FAMILIES) and len(counts) >= 4
    assert min(counts.values()) >= 60
    assert any(r["input"] for r in records) and any(not r["input"] for r in records)


def test_families_take_equal_turns_until_a_no_input_family_runs_out():
    """A repeated draw is drawn again for the same family: the default's 3,000 records hold every
    word of the 400-word lexicon once in greet and once in repeat, and the other four families
    share the rest equally (before, a repeat moved the draw to the next family: greet 302,
    repeat 263)."""
    counts = Counter(r["category"] for r in builtin_tasks.generate(3000, seed=42))
    assert counts == {"count_digit": 550, "count_word": 550, "first": 550, "more_than": 550,
                      "greet": 400, "repeat": 400}
    assert Counter(r["category"] for r in builtin_tasks.generate(600)) == {
        family: 100 for family in builtin_tasks.FAMILIES}


def test_too_many_records_for_the_lexicon_is_an_error():
    import pytest

    with pytest.raises(ValueError, match="cannot make 10000 distinct records from 6 words"):
        builtin_tasks.generate(10000, lexicon_size=6)


def test_no_input_occurs_twice_so_held_out_inputs_are_unseen():
    records = builtin_tasks.generate(2000)
    inputs = Counter(r["input"] for r in records if r["input"])
    assert max(inputs.values()) == 1
    no_input = Counter((r["category"], r["instruction"].split()[-1].strip(".:!"))
                       for r in records if not r["input"])
    assert max(no_input.values()) == 1


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


def test_held_out_inputs_of_the_shipped_default_are_unseen_in_fine_tuning():
    """The default profile's own records, seed and split (what `mlflow run .` evaluates on):
    no held-out record's input, nor a no-input instruction's word in its family, occurs in the
    training split."""
    from dolly.config import Config
    from dolly.data import split_indices

    cfg = Config()
    records = builtin_tasks.generate(cfg.builtin_records, cfg.seed)
    train, test = split_indices(len(records), cfg.test_count_or_fraction, cfg.seed)

    def key(r):
        return r["input"] or (r["category"], r["instruction"].split()[-1].strip(".:!"))

    seen = {key(records[i]) for i in train}
    assert len(test) == round(cfg.builtin_records * cfg.test_size)
    assert [key(records[i]) for i in test if key(records[i]) in seen] == []
    # every family is held out, so each one's exact match measures unseen inputs
    assert {records[i]["category"] for i in test} == set(builtin_tasks.FAMILIES)
