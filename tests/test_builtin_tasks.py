from collections import Counter

from dolly import builtin_tasks


def test_generation_is_seeded():
    assert builtin_tasks.generate(50, seed=1) == builtin_tasks.generate(50, seed=1)
    assert builtin_tasks.generate(50, seed=1) != builtin_tasks.generate(50, seed=2)


def test_families_mix_inputs_and_no_inputs():
    records = builtin_tasks.generate(600)
    counts = Counter(r["category"] for r in records)
    assert set(counts) == set(builtin_tasks.FAMILIES) and len(counts) >= 4
    assert min(counts.values()) >= 60
    assert any(r["input"] for r in records) and any(not r["input"] for r in records)


def test_no_input_occurs_twice_so_held_out_inputs_are_unseen():
    records = builtin_tasks.generate(2000)
    lexicon = set(builtin_tasks.lexicon(400, 42))
    keys = Counter()
    for r in records:
        words = [w.strip(".?:!,") for w in (r["instruction"] + " " + r["input"]).split()]
        keys[(r["category"], tuple(w for w in words if w in lexicon))] += 1
    assert max(keys.values()) == 1


def test_answers_follow_from_instruction_and_input():
    numbers = {"two": 2, "three": 3, "four": 4, "five": 5}
    for r in builtin_tasks.generate(300):
        words, out, ins = r["input"].split(), r["output"], r["instruction"]
        if r["category"] == "count":
            assert numbers[out] == len(words)
        elif r["category"] == "pick":
            assert out == (words[0] if "first" in ins else words[-1])
        elif r["category"] == "swap":
            assert out.split() == words[::-1]
        elif r["category"] == "contains":
            target = ins.split("word ")[1].split("?")[0]
            assert out == ("yes" if target in words else "no")
        elif r["category"] == "repeat":
            assert out in ins.replace(".", " ").replace(":", " ").split()
        elif r["category"] == "greet":
            assert out == f"Hello, {ins.rstrip('.').split()[-1]}!"
