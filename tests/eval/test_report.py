"""dolly.eval.report: safe Markdown table cells, which records the comparison shows, its Markdown."""
import pandas as pd
import pytest

from dolly.eval import report

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("value, cell", [
    ("Hello, kado!", "Hello, kado!"),
    ("a | b", "a &#124; b"),
    ("use `rm -rf`", "use &#96;rm -rf&#96;"),
    ("line one\nline two", "line one ↵ line two"),
    ("a\r\nb\rc", "a ↵ b ↵ c"),
    ("<script>alert('x')</script>", "&#60;script&#62;alert('x')&#60;/script&#62;"),
    ("<img src=x onerror=alert(1)>", "&#60;img src=x onerror=alert(1)&#62;"),
    ("&amp; &#124;", "&#38;amp; &#38;#124;"),
    ("**bold** _it_ ~~gone~~", "&#42;&#42;bold&#42;&#42; &#95;it&#95; &#126;&#126;gone&#126;&#126;"),
    ("[x](javascript:alert(1))", "&#91;x&#93;(javascript&#58;alert(1))"),
    ("![i](http://h/i.png)", "!&#91;i&#93;(http&#58;//h/i.png)"),
    ("\\| escaped", "&#92;&#124; escaped"),
    ("@someone :smile:", "&#64;someone &#58;smile&#58;"),
    ("tab\there\x00nul", "tab here nul"),
    ("  padded  ", "padded"),
    ("", "*(empty)*"),
    ("   \n ", "*(empty)*"),
    (None, "*(empty)*"),
    (float("nan"), "*(empty)*"),
    (3, "3"),
])
def test_md_cell_shows_text_literally(value, cell):
    assert report.md_cell(value) == cell


def test_md_cell_truncates_before_escaping():
    assert report.md_cell("abcdefghij", width=5) == "abcd…"
    assert report.md_cell("abcdefghij", width=10) == "abcdefghij"
    # the cut falls before the `|`: no half character reference
    assert report.md_cell("abcd|efgh", width=5) == "abcd…"
    assert report.md_cell("ab|cdefgh", width=5) == "ab&#124;c…"


def _table():
    """Seven evaluated records of three families (one without a category), in evaluated order."""
    return pd.DataFrame({
        "instruction": ["Repeat the word kado.", "How many words?", "Greet sami.",
                        "Repeat the word bilu.", "How many words?", "Repeat the word tore.",
                        "Say a|b"],
        "input": ["", "ka bo", "", "", "ka bo du", "", "x"],
        "reference": ["kado", "2", "Hello, sami!", "bilu", "3", "tore", "a|b"],
        "category": ["repeat", "count_digit", "greet", "repeat", "count_digit", "repeat", None],
        "base_response": ["the kado of", "", "sami sami", "bilu", "<b>2</b>", "x", "`a`"],
        "tuned_response": ["kado", "2", "Hello, sami!", "bilu", "4", "tore", "a|b"],
        "base_exact_match": [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0],
        "tuned_exact_match": [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0],
    })


def test_pick_examples_takes_each_familys_first_records_in_order():
    picked = report.pick_examples(_table(), per_family=2)
    assert list(picked) == ["(no category)", "count_digit", "greet", "repeat"]
    assert {f: list(rows.index) for f, rows in picked.items()} == {
        "(no category)": [6], "count_digit": [1, 4], "greet": [2], "repeat": [0, 3]}
    assert report.pick_examples(_table().drop(columns="category"), 1)["(no category)"].index[0] == 0


def test_comparison_markdown():
    text = report.comparison_markdown(_table(), "EleutherAI/gpt-j-6b", per_family=2, width=12)
    assert text == "\n".join([
        "**Exact match, base → tuned**, 7 held-out records: **all 0.14 → 0.86** · "
        "(no category) 0.00 → 1.00 · count&#95;digit 0.00 → 0.50 · greet 0.00 → 1.00 · "
        "repeat 0.33 → 1.00",
        "",
        "The base is EleutherAI/gpt-j-6b, EleutherAI's GPT-J 6B, pretrained on the Pile (no "
        "instruction tuning). Base vs tuned therefore shows what Dolly showed: a short "
        "instruction fine-tune teaches a pretrained language model to follow instructions; the "
        "base continues the prompt as text and does not answer instructions in the trained "
        "prompt format. "
        "Greedy decoding; exact match ignores case, spacing and trailing punctuation; ✓ / ✗: "
        "exact match. Every evaluated record is in the artifact `eval_examples.json`, and with "
        "its scores in this run's two nested evaluation runs, base and tuned (Evaluation runs "
        "page: tick both, then Compare).",
        "",
        "**(no category): 0.00 → 1.00** (the first 1 of 1 records)",
        "",
        "| instruction | input | reference | base answer | tuned answer |",
        "|---|---|---|---|---|",
        "| Say a&#124;b | x | a&#124;b | &#96;a&#96; ✗ | a&#124;b ✓ |",
        "",
        "**count&#95;digit: 0.00 → 0.50** (the first 2 of 2 records)",
        "",
        "| instruction | input | reference | base answer | tuned answer |",
        "|---|---|---|---|---|",
        "| How many wo… | ka bo | 2 | *(empty)* ✗ | 2 ✓ |",
        "| How many wo… | ka bo du | 3 | &#60;b&#62;2&#60;/b&#62; ✗ | 4 ✗ |",
        "",
        "**greet: 0.00 → 1.00** (the first 1 of 1 records)",
        "",
        "| instruction | input | reference | base answer | tuned answer |",
        "|---|---|---|---|---|",
        "| Greet sami. | *(empty)* | Hello, sami! | sami sami ✗ | Hello, sami! ✓ |",
        "",
        "**repeat: 0.33 → 1.00** (the first 2 of 3 records)",
        "",
        "| instruction | input | reference | base answer | tuned answer |",
        "|---|---|---|---|---|",
        "| Repeat the… | *(empty)* | kado | the kado of ✗ | kado ✓ |",
        "| Repeat the… | *(empty)* | bilu | bilu ✓ | bilu ✓ |",
    ])


def test_comparison_lists_at_most_max_families():
    text = report.comparison_markdown(_table(), "tiny-gptj", per_family=1, max_families=2)
    assert text.splitlines()[0] == (
        "**Exact match, base → tuned**, 7 held-out records: **all 0.14 → 0.86** · "
        "(no category) 0.00 → 1.00 · count&#95;digit 0.00 → 0.50 · 2 more families in the "
        "metrics base/exact&#95;match/&#60;family&#62;")
    assert text.count("| instruction |") == 2 and "**greet" not in text


def test_comparison_says_what_the_tiny_base_is():
    text = report.comparison_markdown(_table(), "tiny-gptj", per_family=0)
    assert ("The base is a tiny GPT-J pretrained offline on a built-in corpus of running text "
            "(no instruction format).") in text
    assert "| instruction |" not in text  # no examples asked for: only the figures


def test_what_it_shows_claims_dolly_s_effect_only_for_known_pretrained_bases():
    assert report.what_it_shows("/models/my-llm") == (
        "The base is /models/my-llm (as loaded from the Hugging Face Hub or its folder). Base vs "
        "tuned shows what this instruction fine-tune adds to that base.")
    assert "what Dolly showed" in report.what_it_shows("/models/gpt-j-6b")


def test_run_description_fits_a_tag():
    long = _table()
    long["base_response"] = ["|" * 500] * len(long)  # each `|` is 6 characters escaped
    full = report.comparison_markdown(long, "tiny-gptj")
    assert len(full) > 2500
    assert report.run_description(long, "tiny-gptj") == full  # fits 7,500 as it is
    fitted = report.run_description(long, "tiny-gptj", limit=2500)
    assert fitted == report.comparison_markdown(long, "tiny-gptj", per_family=1, width=24)
    assert len(fitted) <= 2500
    only_families = report.run_description(long, "tiny-gptj", limit=1000)
    assert only_families == report.comparison_markdown(long, "tiny-gptj", per_family=0)
    assert report.run_description(long, "tiny-gptj", limit=100) == full[:99] + "…"


def test_family_line():
    metrics = {"tuned/exact_match/first": 0.925, "tuned/exact_match/count_digit": 1.0,
               "base/exact_match/first": 0.0, "tuned/exact_match": 0.9,
               "tuned/rouge_l/first": 0.5}
    assert report.family_line(metrics, "tuned") == (
        "tuned exact match by family: count_digit 1.00, first 0.93")
    assert report.family_line(metrics, "base") == "base exact match by family: first 0.00"
    assert report.family_line({"tuned/exact_match": 0.9}, "tuned") == ""


def test_by_family_reads_one_model_and_metric_in_family_order():
    metrics = {"tuned/exact_match/first": 0.925, "tuned/exact_match/count_digit": 1.0,
               "base/exact_match/first": 0.0, "tuned/exact_match": 0.9,
               "tuned/rouge_l/first": 0.5}
    assert list(report.by_family(metrics, "tuned").items()) == [("count_digit", 1.0),
                                                                ("first", 0.925)]
    assert report.by_family(metrics, "tuned", "rouge_l") == {"first": 0.5}
    assert report.by_family(metrics, "base") == {"first": 0.0}
    assert report.by_family({"tuned/exact_match": 0.9}, "tuned") == {}


def test_comparison_shows_the_unseen_word_probe_second():
    unseen = pd.DataFrame({
        "instruction": ["Repeat the word kaki.", "Greet Zabo.", "Repeat the word rona."],
        "input": ["", "", ""], "reference": ["kaki", "Hello, Zabo!", "rona"],
        "category": ["repeat", "greet", "repeat"],
        "base_response": ["kaki kaki", "Zabo", "x"], "tuned_response": ["kaki", "Hello, Zabo!", "ro"],
        "base_exact_match": [0.0, 0.0, 0.0], "tuned_exact_match": [1.0, 1.0, 0.0],
    })
    text = report.comparison_markdown(_table(), "tiny-gptj", per_family=1, width=30, unseen=unseen,
                                      checked="the fine-tuning texts")
    lines = text.splitlines()
    assert lines[1:3] == [
        "", "**Unseen words, base → tuned**, 3 probe records whose words occur nowhere in the "
            "fine-tuning texts: **all 0.00 → 0.67** · greet 0.00 → 1.00 · repeat 0.00 → 0.50"]
    start = lines.index("**Unseen words** (the first record of each family; all in the artifact "
                        "`probe_examples.json`)")
    assert lines[start + 2:start + 6] == [
        "| instruction | input | reference | base answer | tuned answer |", "|---|---|---|---|---|",
        "| Greet Zabo. | *(empty)* | Hello, Zabo! | Zabo ✗ | Hello, Zabo! ✓ |",
        "| Repeat the word kaki. | *(empty)* | kaki | kaki kaki ✗ | kaki ✓ |"]
    # without the probe, the description is as before
    assert "Unseen" not in report.comparison_markdown(_table(), "tiny-gptj")
