from collections import Counter

from dolly import builtin_tasks


def test_generation_is_seeded():
    assert builtin_tasks.generate(50, seed=1) == builtin_tasks.generate(50, seed=1)
    assert builtin_tasks.generate(50, seed=1) != builtin_tasks.generate(50, seed=2)


def test_families_are_balanced_and_some_have_inputs():
    records = builtin_tasks.generate(500)
    counts = Counter(r["category"] for r in records)
    assert set(counts) == set(builtin_tasks.FAMILIES) and len(counts) >= 4
    assert min(counts.values()) == 100
    assert any(r["input"] for r in records) and any(not r["input"] for r in records)


def test_no_word_is_shared_between_records():
    # so whatever the split, a held-out record's input never occurs in training
    records = builtin_tasks.generate(1000)
    owner = {}
    for i, r in enumerate(records):
        words = {w.strip(".!:,?").lower() for w in (r["instruction"] + " " + r["input"]).split()}
        answer_words = {w.strip(".!,").lower() for w in r["output"].split()} - {"hello", "two", "three", "four", "five"}
        for w in answer_words:
            assert w in words  # the answer follows from the instruction and input
            assert owner.setdefault(w, i) == i
