"""Registry rules: licence, model card, the promotion gate and alias races (sqlite registry)."""
import threading

import mlflow
import pytest

from dolly import registry

pytestmark = pytest.mark.timeout(120)


def test_data_licence():
    assert registry.data_licence("tatsu-lab/alpaca") == "CC BY-NC 4.0"
    assert registry.data_licence("data/alpaca_data.json") == "CC BY-NC 4.0"
    assert registry.data_licence("databricks/databricks-dolly-15k") == "CC BY-SA 3.0"
    assert registry.data_licence("builtin") == registry.PROJECT_DATA
    assert registry.data_licence("my.jsonl").startswith("unknown")


def test_merge_licences():
    assert registry.merge_licences(None, "CC BY-NC 4.0") == "CC BY-NC 4.0"
    both = registry.merge_licences("CC BY-NC 4.0", registry.PROJECT_DATA)
    assert "CC BY-NC 4.0" in both and registry.PROJECT_DATA in both
    assert registry.merge_licences(both, "CC BY-NC 4.0") == both


@pytest.mark.parametrize("tuned, base, champ, promote, why", [
    (0.8, 0.0, None, True, "no champion"),
    (0.0, 0.0, None, False, "does not beat base"),
    (0.1, 0.2, None, False, "does not beat base"),
    (0.5, 0.0, ("3", 0.8), False, "worse than champion v3"),
    (0.8, 0.0, ("3", 0.8), True, "not worse than champion v3"),
    (0.9, 0.0, ("3", None), True, "no recorded"),
    (None, 0.0, None, False, "lacks"),
])
def test_gate_decision(tuned, base, champ, promote, why):
    ok, reason = registry.gate_decision("exact_match", tuned, base, champ)
    assert ok is promote and why in reason


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
        licence=registry.PROJECT_DATA, train_run="t", eval_run="e", primary_metric="exact_match",
        metrics={"base/exact_match": 0.0, "tuned/exact_match": 0.6,
                 "base/exact_match/first": 0.0, "tuned/exact_match/first": 0.925,
                 "tuned/exact_match/count_digit": 1.0, "tuned/rouge_l/first": 0.9},
        pretrain_steps=400)
    assert ("The base is a tiny GPT-J pretrained offline on a built-in corpus of running text "
            "(no instruction format). Base vs tuned therefore shows what Dolly showed: a short "
            "instruction fine-tune teaches a pretrained language model to follow instructions; "
            "the base continues the prompt as text and does not answer Dolly-format "
            "instructions.") in card
    assert "\n- Base model: tiny-gptj\n" in card
    assert ("Exact match by task family:\n\n| family | base | tuned |\n|---|---|---|\n"
            "| count&#95;digit | n/a | 1 |\n| first | 0 | 0.925 |\n") in card
    assert "randomly initialised" not in card


def test_model_card_says_when_the_tiny_base_is_randomly_initialised():
    card = registry.model_card(
        name="dolly", version="1", base_model="tiny-gptj", dataset="builtin", data_hash="ab",
        licence=registry.PROJECT_DATA, train_run="t", eval_run="e", primary_metric="exact_match",
        metrics={"base/exact_match": 0.0, "tuned/exact_match": 0.6}, pretrain_steps=0)
    assert "**The base is a randomly initialised tiny GPT-J** (`pretrain_steps=0`)" in card
    assert "pretrained offline" not in card


def test_license_note_names_both_licences_and_no_link():
    note = registry.license_note("EleutherAI/gpt-j-6b", "tatsu-lab/alpaca")
    assert "Apache-2.0 (EleutherAI's GPT-J 6B)" in note and "CC BY-NC 4.0" in note
    assert "http" not in registry.license_note("outputs/train/final", "my.jsonl")


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """One sqlite registry for the module (creating one costs seconds); a model name per test."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('registry')}/mlflow.db"
    return mlflow.MlflowClient(uri)


@pytest.fixture
def name(request):
    return "m-" + request.node.name.replace("[", "-").replace("]", "")


def versions(client, name, scores):
    """Registered versions (no artifacts needed) carrying tuned/exact_match tags."""
    client.create_registered_model(name)
    out = []
    for s in scores:
        mv = client.create_model_version(name, source="file:///nowhere",
                                         tags={"tuned/exact_match": str(s)})
        out.append(str(mv.version))
    return out


def test_promote_sets_alias(client, name):
    (v1,) = versions(client, name, [0.5])
    ok, holder = registry.promote(client, name, "champion", v1, 0.5, "exact_match", settle_s=0.01)
    assert ok and holder == v1
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1


def test_promote_gives_way_to_better_champion(client, name):
    v1, v2 = versions(client, name, [0.9, 0.5])
    client.set_registered_model_alias(name, "champion", v1)
    ok, holder = registry.promote(client, name, "champion", v2, 0.5, "exact_match", settle_s=0.01)
    assert not ok and holder == v1
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1


@pytest.mark.parametrize("scores, winner", [([0.9, 0.5], 0), ([0.5, 0.9], 1), ([0.7, 0.7], 1)])
def test_concurrent_promotions_agree_on_one_champion(client, name, scores, winner):
    vs = versions(client, name, scores)
    results = {}
    barrier = threading.Barrier(len(vs))

    def go(v, s):
        barrier.wait()
        results[v] = registry.promote(client, name, "champion", v, s, "exact_match", settle_s=0.2)

    threads = [threading.Thread(target=go, args=(v, s)) for v, s in zip(vs, scores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    champion = str(client.get_model_version_by_alias(name, "champion").version)
    assert champion == vs[winner]  # best score; a tie goes to the newer version
    assert [results[v][0] for v in vs] == [v == champion for v in vs]
