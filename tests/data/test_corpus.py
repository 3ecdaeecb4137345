"""The built-in pretraining corpus: seeded running text over the lexicon, no Dolly markers."""
from dolly.data import corpus
from dolly.data.builtin_tasks import lexicon
from dolly.prompts import END_KEY, INPUT_KEY, INSTRUCTION_KEY, INTRO_NO_INPUT, RESPONSE_KEY

MARKERS = ("###", END_KEY, INSTRUCTION_KEY, INPUT_KEY, RESPONSE_KEY, INTRO_NO_INPUT[:20],
           "<|endoftext|>")


def test_generate_is_seeded_and_literal():
    assert corpus.generate(1, seed=7, lexicon_size=20) == [
        "The list keve numi bebu kuze rare has five words (5 in all); it starts with keve. lema "
        "chanted: rape kuze dedu mazu dudi rape, rape kuze dedu mazu dudi rape. dure chanted: "
        "lema dure kuni dure lapa mazu lapa, lema dure kuni dure lapa mazu lapa, lema dure kuni "
        "dure lapa mazu lapa. dure sang rare numi dedu, and everyone sang rare numi dedu again. "
        "dure waited for lema all day."]
    assert corpus.generate(50, seed=7) == corpus.generate(50, seed=7)
    assert corpus.generate(50, seed=7) != corpus.generate(50, seed=8)
    # a longer corpus starts with the shorter one: more steps read more of the same text
    assert corpus.generate(80, seed=7)[:50] == corpus.generate(50, seed=7)


def test_held_out_text_is_other_text_over_the_same_words():
    train, held = corpus.generate(300, seed=3), corpus.held_out(300, seed=3)
    assert not set(train) & set(held)
    words = set(lexicon(400, 3))
    used = {w.strip(".,;:!()") for p in held for w in p.split()}
    assert len(used & words) > 350 and len(used - words) < 70  # the lexicon + connecting words


def test_no_dolly_marker_and_no_instruction():
    text = "\n".join(corpus.generate(2000, seed=42) + corpus.held_out(200, seed=42))
    for marker in MARKERS:
        assert marker not in text
    # the task families' instructions never occur as such: the base learns the language only
    for instruction in ("Repeat the word", "Say hello to", "What is the first word",
                        "How many words", "Answer yes or no"):
        assert instruction not in text
