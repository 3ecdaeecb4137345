"""dolly.registry.card: the data and base licences, the model card, the licence note; and the
name the logged model gets (dolly.registry.package)."""
import dataclasses

from dolly import registry
from dolly.config import Config
from dolly.registry.card import PROJECT_DATA
from dolly.registry.package import logged_model_name


def test_data_licence():
    assert registry.data_licence("tatsu-lab/alpaca") == "CC BY-NC 4.0"
    assert registry.data_licence("data/alpaca_data.json") == "CC BY-NC 4.0"
    assert registry.data_licence("databricks/databricks-dolly-15k") == "CC BY-SA 3.0"
    assert registry.data_licence("builtin") == PROJECT_DATA
    assert registry.data_licence("my.jsonl").startswith("unknown")


def test_merge_licences():
    assert registry.merge_licences(None, "CC BY-NC 4.0") == "CC BY-NC 4.0"
    both = registry.merge_licences("CC BY-NC 4.0", PROJECT_DATA)
    assert "CC BY-NC 4.0" in both and PROJECT_DATA in both
    assert registry.merge_licences(both, "CC BY-NC 4.0") == both


def test_model_card():
    card = registry.model_card(
        name="dolly", version="4", base_model="EleutherAI/gpt-j-6b", dataset="tatsu-lab/alpaca",
        data_hash="abcdef0123456789", licence="CC BY-NC 4.0", train_run="t1", eval_run="e1",
        primary_metric="exact_match",
        metrics={"base/exact_match": 0.01, "tuned/exact_match": 0.6, "base/rouge_l": 0.1,
                 "tuned/rouge_l": 0.7, "eval_records": 200})
    assert card.splitlines()[0] == "# Model card: dolly, version 4 (fine-tuned from EleutherAI/gpt-j-6b)"
    assert "not Databricks' Dolly model" in card and "by task family" not in card
    assert ("The base is EleutherAI/gpt-j-6b, EleutherAI's GPT-J 6B, pretrained on the Pile (no "
            "instruction tuning).") in card
    for text in ("EleutherAI/gpt-j-6b", "tatsu-lab/alpaca", "CC BY-NC 4.0",
                 "abcdef012345", "| exact_match (gate) | 0.01 | 0.6 |", "200 records", "t1", "e1"):
        assert text in card


def test_model_card_says_what_the_base_is_and_shows_families():
    card = registry.model_card(
        name="dolly", version="1", base_model="tiny-gptj", dataset="builtin", data_hash="ab",
        licence=PROJECT_DATA, train_run="t", eval_run="e", primary_metric="exact_match",
        metrics={"base/exact_match": 0.0, "tuned/exact_match": 0.6,
                 "base/exact_match/first": 0.0, "tuned/exact_match/first": 0.925,
                 "tuned/exact_match/count_digit": 1.0, "tuned/rouge_l/first": 0.9},
        pretrain_steps=400)
    assert ("The base is a tiny GPT-J pretrained offline on a built-in corpus of running text "
            "(no instruction format). Base vs tuned therefore shows what Dolly showed: a short "
            "instruction fine-tune teaches a pretrained language model to follow instructions; "
            "the base continues the prompt as text and does not answer instructions in the "
            "trained prompt format.") in card
    assert "\n- Base model: tiny-gptj\n" in card
    assert ("Exact match by task family:\n\n| family | base | tuned |\n|---|---|---|\n"
            "| count&#95;digit | n/a | 1 |\n| first | 0 | 0.925 |\n") in card
    assert "randomly initialised" not in card


def test_model_card_says_when_the_tiny_base_is_randomly_initialised():
    card = registry.model_card(
        name="dolly", version="1", base_model="tiny-gptj", dataset="builtin", data_hash="ab",
        licence=PROJECT_DATA, train_run="t", eval_run="e", primary_metric="exact_match",
        metrics={"base/exact_match": 0.0, "tuned/exact_match": 0.6}, pretrain_steps=0)
    assert "**The base is a randomly initialised tiny-gptj** (`pretrain_steps=0`)" in card
    assert "pretrained offline" not in card


def test_license_note_names_both_licences_and_no_link():
    note = registry.license_note("EleutherAI/gpt-j-6b", "tatsu-lab/alpaca")
    assert "Apache-2.0 (EleutherAI's GPT-J 6B)" in note and "CC BY-NC 4.0" in note
    assert "http" not in registry.license_note("outputs/train/final", "my.jsonl")


def test_the_logged_model_is_named_after_its_base():
    def name(base_model: str) -> str:
        return logged_model_name(dataclasses.replace(Config(), base_model=base_model))

    assert name("tiny-gptj") == "dolly-tiny-gptj"
    assert name("EleutherAI/gpt-j-6b") == "dolly-gpt-j-6b"
    assert name("/models/gpt-j-6b/") == "dolly-gpt-j-6b"
    # MLflow refuses / : . % " ' in a logged model's name
    assert name("/data/gpt-j.v1.5 (fp16)") == "dolly-gpt-j-v1-5-fp16"
    assert name("...") == "dolly-model"
