"""dolly.eval.metrics: exact match after normalisation, ROUGE-L, per-family means."""
import pandas as pd
import pytest

from dolly.eval import metrics


@pytest.mark.parametrize("pred, ref, same", [
    ("Hello, Kalo!", "hello, kalo", True),
    ("  two  ", "Two.", True),
    ("ba  da\nko", "ba da ko", True),
    ("bada", "bado", False),
    ("", "x", False),
    ("Hello Kalo", "Hello, Kalo", False),  # inner punctuation still counts
])
def test_exact_match_normalisation(pred, ref, same):
    assert metrics.exact_match(pred, ref) == float(same)


def test_rouge_l():
    assert metrics.rouge_l("ma ko li", "ma ko li") == pytest.approx(1.0)
    assert metrics.rouge_l("li ko ma", "ma ko li") == pytest.approx(1 / 3)
    assert metrics.rouge_l("", "ma") == 0.0
    assert metrics.rouge_l("!!!", "ma") == 0.0


def test_category_metrics_are_means_per_family():
    test = pd.DataFrame({"category": ["first", "repeat", "first", None, "", "a&b", "first"]})
    ex = pd.DataFrame({"exact_match": [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0],
                       "rouge_l": [1.0, 0.5, 0.25, 1.0, 1.0, 0.0, 1.0]})
    assert metrics.category_metrics(test, ex) == {
        "exact_match/a_b": 1.0, "exact_match/first": 2 / 3, "exact_match/repeat": 0.0,
        "rouge_l/a_b": 0.0, "rouge_l/first": 0.75, "rouge_l/repeat": 0.5}
    assert metrics.category_metrics(test.drop(columns="category"), ex) == {}
