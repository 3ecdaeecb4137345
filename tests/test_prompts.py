import pytest

from dolly import prompts

NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nName a color.\n\n### Response:\nBlue.\n\n### End"
)
WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
    "Translate to French.\n\n### Input:\nHello\n\n### Response:\nBonjour\n\n### End"
)


def test_training_text_is_byte_identical_to_dolly_v1():
    assert prompts.format_record("Name a color.", "", "Blue.") == NO_INPUT
    assert prompts.format_record("Name a color.", None, "Blue.") == NO_INPUT
    assert prompts.format_record("Translate to French.", "Hello", "Bonjour") == WITH_INPUT


def test_generation_prompt_is_dolly_v1_prompt_format():
    assert prompts.format_prompt("Name a color.") == NO_INPUT[: NO_INPUT.index("Blue.")]
    assert prompts.PROMPT_TEMPLATE.format(prompt="Name a color.") == prompts.format_prompt("Name a color.")


def test_special_tokens_and_defaults_are_dollys():
    assert prompts.SPECIAL_TOKENS == ("### End", "### Instruction:", "### Response:\n")
    assert prompts.GENERATION_DEFAULTS["do_sample"] is True
    assert prompts.GENERATION_DEFAULTS["top_p"] == 0.92
    assert prompts.GENERATION_DEFAULTS["top_k"] == 0
    assert prompts.GENERATION_DEFAULTS["max_new_tokens"] == 256


def test_parse_response_returns_only_the_answer():
    generated = prompts.format_prompt("Name a color.") + " Blue. \n\n### End junk after"
    assert prompts.parse_response(generated) == "Blue."
    assert prompts.parse_response("  Red\n\n### End") == "Red"
    assert prompts.parse_response("no end marker ") == "no end marker"


def test_one_rule_picks_the_template_blank_input_means_none():
    for blank in (None, "", " ", "\t", " \n\t "):
        assert not prompts.has_input(blank)
        assert prompts.format_prompt("Name a color.", blank) == NO_INPUT[: NO_INPUT.index("Blue.")]
    assert prompts.has_input(" Hello ")
    assert prompts.format_prompt("Translate to French.", "Hello") == \
        WITH_INPUT[: WITH_INPUT.index("Bonjour")]


def test_prompt_parts_join_to_the_prompt_and_name_the_users_text():
    parts = prompts.prompt_parts("Translate to French.", "Hello")
    assert "".join(t for _, t in parts) == prompts.format_prompt("Translate to French.", "Hello")
    assert [k for k, _ in parts] == ["template", "instruction", "template", "input", "template"]
    assert [t for k, t in parts if k != "template"] == ["Translate to French.", "Hello"]
    parts = prompts.prompt_parts("Name a color.", "  ")
    assert [t for k, t in parts if k != "template"] == ["Name a color."]


# Issue 23, case 3: a field with nothing visible is blank (dotnet/corefx #37817).
@pytest.mark.parametrize("text, blank", [
    ("", True), (" \t\r\n", True), ("\u200b", True), ("\ufeff\u2060", True),
    ("\u200b\u200b\u200b", True), ("\u00a0\u3000\u2028\u0085", True), ("\u00ad\u200d\u034f", True),
    ("\ufe0f\u3164\u2800", True), ("\x00\x07", True),
    ("a", False), ("\u200ba", False), ("\ud800", False), ("\U0001f600", False), ("\u0301", False),
])
def test_is_blank_means_nothing_visible(text, blank):
    assert prompts.is_blank(text) is blank


def test_an_invisible_input_selects_the_no_input_template():
    assert prompts.has_input("\u200b\ufeff") is False
    assert prompts.format_prompt("Say hi.", "\u2060") == prompts.format_prompt("Say hi.")
