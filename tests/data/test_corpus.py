"""The built-in pretraining corpus: seeded running text over generated words, no Dolly markers."""
from dolly.data import builtin_tasks, corpus
from dolly.data.words import CORPUS, PROBE, part_of, words_in
from dolly.prompts import END_KEY, INPUT_KEY, INSTRUCTION_KEY, INTRO_NO_INPUT, RESPONSE_KEY

MARKERS = ("###", END_KEY, INSTRUCTION_KEY, INPUT_KEY, RESPONSE_KEY, INTRO_NO_INPUT[:20],
           "<|endoftext|>")


def test_generate_is_seeded_and_literal():
    assert corpus.generate(1, seed=7) == [
        "chirle wrote down ladi sneathen. pupi read it back: ladi sneathen. That is two words, "
        "and the first word is ladi. chirle chanted: zo guto Supibo fupe Metanake lona, zo guto "
        "Supibo fupe Metanake lona, zo guto Supibo fupe Metanake lona, zo guto Supibo fupe "
        "Metanake lona. pupi waited for chirle all day. chirle chanted: pakapo jeafting kuvusoso "
        "zevisi bebapale veme, pakapo jeafting kuvusoso zevisi bebapale veme. On the wall it said "
        "da gago seto vonara; below, someone had copied da gago seto vonara. pupi chanted: trox "
        "nato mevu freshon lote do tari, trox nato mevu freshon lote do tari, trox nato mevu "
        "freshon lote do tari."]
    assert corpus.read_back_lines(2, seed=7) == [
        "bo Sopon Foseno ;bo Sopon Foseno",
        "mera su ziluse Vobuzo rigo nudusola ;mera su ziluse Vobuzo rigo nudusola"]
    assert corpus.generate(50, seed=7) == corpus.generate(50, seed=7)
    assert corpus.generate(50, seed=7) != corpus.generate(50, seed=8)
    # a longer corpus starts with the shorter one: more steps read more of the same text
    assert corpus.generate(80, seed=7)[:50] == corpus.generate(50, seed=7)
    assert corpus.read_back_lines(80, seed=7)[:50] == corpus.read_back_lines(50, seed=7)


def test_generated_words_come_from_the_corpus_part_of_the_word_space():
    text = " ".join(corpus.generate(300, seed=3) + corpus.read_back_lines(300, seed=3))
    generated = words_in(text) - corpus.fixed_words()
    assert len(generated) > 3000
    assert {part_of(w) for w in generated} == {CORPUS}
    # the fixed wording is never a generated word, nor a task family's
    assert not generated & builtin_tasks.fixed_words()
    probe_lines = corpus.read_back_lines(50, seed=3, part=PROBE)
    assert {part_of(w) for line in probe_lines for w in words_in(line)} == {PROBE}


def test_held_out_text_is_other_text_over_other_draws():
    train, held = corpus.generate(300, seed=3), corpus.held_out(300, seed=3)
    assert not set(train) & set(held)
    assert {part_of(w) for w in words_in(" ".join(held)) - corpus.fixed_words()} == {CORPUS}


def test_no_dolly_marker_and_no_instruction():
    text = "\n".join(corpus.generate(2000, seed=42) + corpus.held_out(200, seed=42))
    for marker in MARKERS:
        assert marker not in text
    # the task families' instructions never occur as such: the base learns the language only
    for instruction in ("Repeat the word", "Say hello to", "What is the first word",
                        "How many words", "Answer yes or no"):
        assert instruction not in text
