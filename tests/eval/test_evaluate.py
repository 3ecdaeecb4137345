"""dolly.eval.evaluate: response-only loss, a model's metrics on held-out records, the base config,
the fixed evaluation prefix, model folders."""
import math

import pandas as pd
import pytest
import torch

from helpers import corpus_tokenizer
from dolly import prompts
from dolly.config import Config
from dolly.data.collator import CompletionCollator
from dolly.errors import DollyError
from dolly.eval import evaluate, metrics
from dolly.models.tiny import build_tiny
from dolly.prompts import special_ids

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tok():
    return corpus_tokenizer(100, seed=2, vocab_size=350)


def split(tok, records):
    resp_id, _ = special_ids(tok)
    rows = []
    for ins, inp, resp in records:
        ids = tok(prompts.format_record(ins, inp, resp), add_special_tokens=False)["input_ids"]
        rows.append({"instruction": ins, "input": inp, "response": resp, "input_ids": ids,
                     "response_start": ids.index(resp_id) + 1, "category": "c"})
    return pd.DataFrame(rows)


def test_response_loss_counts_only_response_tokens(tok):
    model = build_tiny(Config(tiny_n_layer=1, tiny_n_embd=32, tiny_n_head=2, tiny_rotary_dim=16,
                              tiny_n_positions=256), tok).eval()
    test = split(tok, [("Greet Kalo.", "", "Hello, Kalo!"), ("Count the words in the input.",
                                                             "ma ko", "two")])
    collator = CompletionCollator(pad_token_id=tok.pad_token_id, response_key_id=special_ids(tok)[0])
    got = evaluate.response_loss(model, test, collator, batch_size=2)
    total, n = 0.0, 0
    for ids, start in zip(test["input_ids"], test["response_start"]):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        lp = torch.log_softmax(logits[:-1].float(), -1)
        for pos in range(start, len(ids)):  # token `pos` is predicted at `pos - 1`
            total -= float(lp[pos - 1, ids[pos]])
            n += 1
    assert got == pytest.approx(total / n, rel=1e-4)


def test_evaluate_model_metrics(tok):
    model = build_tiny(Config(tiny_n_layer=1, tiny_n_embd=32, tiny_n_head=2, tiny_rotary_dim=16,
                              tiny_n_positions=256), tok).eval()
    test = split(tok, [("Greet Kalo.", "", "Hello, Kalo!"), ("Repeat the word bada.", "", "bada"),
                       ("Count the words in the input.", "ma ko", "two")])
    res = evaluate.evaluate_model(model, tok, test, max_new_tokens=4, batch_size=2)
    names = {"eval_loss", "response_perplexity", "exact_match", "rouge_l", "stop_rate",
             "empty_rate", "response_length", "tokens_per_s"}
    assert names <= set(evaluate.METRICS) and names <= set(res.metrics)
    assert all(math.isfinite(res.metrics[k]) for k in names)
    assert res.metrics["response_perplexity"] == pytest.approx(math.exp(res.metrics["eval_loss"]))
    assert "perplexity" not in res.metrics  # one name per measure: not the base's corpus perplexity
    assert len(res.examples) == 3
    assert 0 <= res.metrics["stop_rate"] <= 1 and 0 <= res.metrics["empty_rate"] <= 1
    assert metrics.category_metrics(test, res.examples).keys() == {"exact_match/c",
                                                                      "rouge_l/c"}


def test_base_config_follows_the_train_run():
    cfg = Config()
    params = {"tiny_n_layer": "2", "tiny_n_embd": "64", "tiny_n_head": "4", "seed": "7",
              "learning_rate": "0.5", "base_model": "tiny-gptj"}
    base, changed = evaluate.base_config(cfg, params)
    assert changed == {"tiny_n_layer": 2, "tiny_n_embd": 64, "tiny_n_head": 4, "seed": 7}
    assert base.tiny_n_layer == 2 and base.learning_rate == cfg.learning_rate


def test_select_is_a_fixed_prefix():
    df = pd.DataFrame({"a": range(10)})
    assert list(evaluate.select(df, 3)["a"]) == [0, 1, 2]
    assert len(evaluate.select(df, 0)) == 10


def test_model_folder_layouts(tmp_path):
    mlm = tmp_path / "logged"
    (mlm / "model").mkdir(parents=True)
    (mlm / "model" / "config.json").write_text("{}")
    (mlm / "components" / "tokenizer").mkdir(parents=True)
    (mlm / "components" / "tokenizer" / "tokenizer_config.json").write_text("{}")
    (mlm / "MLmodel").write_text("run_id: abc\nflavors:\n  transformers:\n    model_binary: model\n")
    assert evaluate.model_folder(mlm) == (mlm / "model", mlm / "components" / "tokenizer")
    assert evaluate.logged_run_id(mlm) == "abc"
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    assert evaluate.model_folder(plain) == (plain, plain)
    with pytest.raises(DollyError):
        evaluate.model_folder(tmp_path / "nothing")


def test_unseen_metrics_name_the_probe_overall_and_per_family():
    import pandas as pd

    from dolly.eval.evaluate import unseen_metrics

    records = pd.DataFrame({"category": ["repeat", "greet", "repeat", "first"]})
    answers = pd.DataFrame({"exact_match": [1.0, 0.0, 0.0, 1.0], "rouge_l": [1.0, 0.5, 0.2, 1.0]})
    assert unseen_metrics(records, answers) == {
        "exact_match_unseen": 0.5, "exact_match_unseen/first": 1.0,
        "exact_match_unseen/greet": 0.0, "exact_match_unseen/repeat": 0.5}
