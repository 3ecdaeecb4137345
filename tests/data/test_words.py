"""The open vocabulary: generated words, three disjoint parts of the word space."""
from collections import Counter

import pytest

from dolly.data.words import CORPUS, DATASET, PROBE, WordSource, part_of, words_in


def test_words_in_is_lowercase_letter_runs():
    assert words_in("Hello, Tobi! 3 ways_to go; naïve café") == {
        "hello", "tobi", "ways", "to", "go", "naïve", "café"}
    assert words_in("kela Strinder zu ;kela Strinder zu") == {"kela", "strinder", "zu"}


def test_every_word_has_one_part_fixed_by_its_hash():
    assert [part_of(w) for w in ("kaki", "lomu", "river", "tobi", "Mo", "zabo")] == [
        PROBE, DATASET, PROBE, CORPUS, DATASET, PROBE]
    assert part_of("Tobi") == part_of("tobi") == part_of("TOBI")


def test_a_source_gives_words_of_its_part_only_seeded():
    assert [WordSource(1, DATASET).word() for _ in range(1)] == ["whoathish"]
    source = WordSource(1, DATASET)
    assert [source.word() for _ in range(12)] == [
        "whoathish", "Crastish", "vubi", "frart", "vomuse", "nagotu", "bonizafe", "faro", "fu",
        "misezofu", "si", "Mala"]
    for part in (DATASET, CORPUS, PROBE):
        source = WordSource(3, part)
        assert {part_of(source.word()) for _ in range(500)} == {part}


def test_the_generator_is_open_mixed_and_fresh_words_never_repeat():
    source = WordSource(7, DATASET)
    words = [source.fresh() for _ in range(5000)]
    assert len({w.lower() for w in words}) == 5000  # case-insensitively distinct
    capitalised = sum(w[0].isupper() for w in words) / len(words)
    assert 0.10 < capitalised < 0.20
    lengths = Counter(len(w) for w in words)
    assert min(lengths) == 2 and max(lengths) >= 8  # any syllable count
    assert any(w.endswith(("ing", "er", "le")) for w in words)  # English-looking ones too


def test_avoided_words_are_never_given():
    avoid = {w.lower() for w in (WordSource(5, PROBE).word() for _ in range(50))}
    source = WordSource(5, PROBE, avoid=avoid)
    assert not {source.word().lower() for _ in range(2000)} & avoid


def test_an_unknown_part_is_an_error():
    with pytest.raises(ValueError, match="part must be one of"):
        WordSource(1, "lexicon")
