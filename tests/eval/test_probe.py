"""The unseen-word probe: its words occur in no text the model or its tokenizer trained on."""
import pandas as pd
import pytest

from dolly.config import load_config
from dolly.data import builtin_tasks, prepare
from dolly.data.words import words_in
from dolly.errors import DollyError
from dolly.eval import probe
from dolly.models import pretraining_texts
from dolly.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def default_prepared(tmp_path_factory):
    """The shipped default profile's prepared/ folder, as data_prep writes it."""
    cfg = load_config("configs/tiny.yaml", {})
    out = tmp_path_factory.mktemp("prepared")
    prepare(cfg, out, progress=False)
    return cfg, out


def test_probe_words_occur_in_no_training_pretraining_or_tokenizer_text(default_prepared):
    cfg, prepared = default_prepared
    tok = load_tokenizer(str(prepared / "tokenizer"))
    # Every text, collected here independently of dolly.eval.probe:
    # - fine-tuning text, which is also what the corpus BPE learned from: the training split of
    #   the generated records, in Dolly's format (data_prep learns the BPE from these texts)
    train = pd.read_parquet(prepared / "train.parquet")
    records = builtin_tasks.generate(cfg.builtin_records, cfg.seed)
    assert len(train) == len(records) - 300
    trained = set().union(*(words_in(t) for t in train["text"]))
    # - pretraining text: the paragraphs and read-back lines the base reads, for this tokenizer
    paragraphs, lines = pretraining_texts(cfg, tok)
    assert len(paragraphs) > 1000 and len(lines) > 1000
    trained |= set().union(*(words_in(t) for t in paragraphs + lines))
    assert len(trained) > 10000

    records = probe.probe_records(cfg.seed, probe.trained_words(prepared, cfg, tok))
    assert len(records) == probe.PROBE_RECORDS
    assert records["category"].value_counts().to_dict() == {
        family: 50 for family in builtin_tasks.FAMILIES}
    words = set().union(*(probe.task_words(r) for r in records.rename(
        columns={"response": "output"}).to_dict("records")))
    assert len(words) > 500
    assert words & trained == set()
    # nor in the test split: the probe is another set of words again
    test = pd.read_parquet(prepared / "test.parquet")
    assert words & set().union(*(words_in(t) for t in test["text"])) == set()


def test_the_check_catches_a_trained_word(monkeypatch):
    """probe_records checks, not assumes: a record with a trained word is refused."""
    trained = {"kaki"}
    monkeypatch.setattr(builtin_tasks, "generate", lambda n, seed, part, avoid: [
        {"instruction": "Repeat the word kaki.", "input": "", "output": "kaki",
         "category": "repeat"}])
    with pytest.raises(DollyError, match="the unseen-word probe holds 1 trained words, e.g. "
                                         r"\['kaki'\]"):
        probe.probe_records(42, trained)


def test_trained_words_read_every_record_and_the_rejected_ones(tmp_path):
    from helpers import prepare as prepare_file, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "Name a colour.", "response": "Crimson"},
        {"instruction": "Say zobra.", "input": "quelp", "response": "zobra"},
        {"instruction": "Say nothing.", "response": ""},  # rejected: blank_response
    ])
    prepare_file(tmp_path, data)
    cfg = load_config(None, {"pretrain_steps": 0})  # a random base: no pretraining text
    words = probe.trained_words(tmp_path / "prepared", cfg, tok=None)
    assert {"crimson", "zobra", "quelp", "nothing", "colour"} <= words
    assert probe.applies({"dataset": "builtin"}) and not probe.applies({"dataset": str(data)})
