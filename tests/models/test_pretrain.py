"""The pretrained tiny base: its cache key, the cache, and loading the same base everywhere."""
import dataclasses
import json
import os

import pytest
import torch

from dolly.data import corpus
from dolly.models import pretrain
from dolly.config import Config, fields_where
from dolly.errors import DollyError
from dolly.models.base import load_base_model

from helpers import corpus_tokenizer, fresh_store, tracking_to

SMALL = Config(builtin_records=60, tiny_n_layer=1, tiny_n_embd=32, tiny_n_head=2,
               tiny_rotary_dim=8, tiny_n_positions=64, max_length=64, pretrain_steps=3,
               pretrain_batch_size=2, pretrain_seq_len=16)


@pytest.fixture(scope="module")
def tok():
    return corpus_tokenizer(60, 42, 300)


def test_pretraining_fields_shape_the_base():
    assert {"pretrain_steps", "pretrain_batch_size", "pretrain_seq_len",
            "pretrain_learning_rate", "seed", "tiny_n_layer"} <= set(fields_where(base=True))


def test_key_changes_with_base_fields_only(tok):
    key = pretrain.base_key(SMALL, tok)
    assert len(key) == 20 and key == pretrain.base_key(dataclasses.replace(SMALL), tok)
    for name, value in {"pretrain_steps": 4, "pretrain_learning_rate": 5e-4, "seed": 1,
                        "tiny_n_embd": 64, "pretrain_seq_len": 32}.items():
        assert pretrain.base_key(dataclasses.replace(SMALL, **{name: value}), tok) != key, name
    for name, value in {"learning_rate": 5e-4, "epochs": 1.0, "max_steps": 7,
                        "eval_limit": 3, "output_dir": "elsewhere"}.items():
        assert pretrain.base_key(dataclasses.replace(SMALL, **{name: value}), tok) == key, name
    assert pretrain.base_key(SMALL, corpus_tokenizer(60, 42, 320)) != key  # another tokenizer


def test_cache_builds_once_and_loads_the_same_base(tok, tmp_path, monkeypatch):
    monkeypatch.setenv(pretrain.CACHE_ENV, str(tmp_path))
    with pytest.raises(DollyError, match="is not in .* builds it before starting its ranks"):
        load_base_model(SMALL, tok, pretrain_missing=False)  # a rank never pretrains
    lines = []
    folder = pretrain.ensure_base(SMALL, tok, log=lines.append)
    assert folder == tmp_path / pretrain.base_key(SMALL, tok)
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no temp folder left
    info = json.loads((folder / "base_info.json").read_text())
    assert info["key"] == folder.name and info["steps"] == 3 and info["tokens"] == 3 * 2 * 16
    assert info["perplexity"] < info["random_init_perplexity"]
    stamp = os.stat(folder / "model.safetensors").st_mtime_ns
    assert pretrain.ensure_base(SMALL, tok, log=lines.append) == folder  # reused, not rebuilt
    assert os.stat(folder / "model.safetensors").st_mtime_ns == stamp
    assert sum("pretraining the tiny-gptj base" in line for line in lines) == 1
    assert "held-out corpus perplexity" in lines[-1]
    _check_log_base(folder, info, tmp_path / "store")
    a = load_base_model(SMALL, tok, pretrain_missing=False)
    b = load_base_model(SMALL, tok)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    # the pretraining is deterministic: a second cache gets bit-identical weights
    monkeypatch.setenv(pretrain.CACHE_ENV, str(tmp_path / "again"))
    c = load_base_model(SMALL, tok)
    for (name, x), (_, y) in zip(a.state_dict().items(), c.state_dict().items()):
        assert torch.equal(x, y), name


def _check_log_base(folder, info, store):
    """log_base names the held-out corpus perplexity apart from evaluate's response perplexity."""
    import mlflow

    store.mkdir()
    uri = fresh_store(store)
    with tracking_to(uri), mlflow.start_run() as run:
        pretrain.log_base(folder)
    run = mlflow.MlflowClient(uri).get_run(run.info.run_id)
    assert run.data.metrics == {
        "pretrain/corpus_perplexity": pytest.approx(info["perplexity"]),
        "pretrain/random_init_corpus_perplexity": pytest.approx(info["random_init_perplexity"]),
        "pretrain/unseen_copy_accuracy": pytest.approx(info["unseen_copy_accuracy"])}
    # the copy accuracy at init and at the last step (3 steps: before the first COPY_EVERY)
    history = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id,
                                                          "pretrain/unseen_copy_accuracy")
    assert [(m.step, m.value) for m in history] == [tuple(p) for p in info["unseen_copy_curve"]]
    assert [m.step for m in history] == [0, 3]
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    assert tags == {"base_key": folder.name,
                    "base_corpus_perplexity": f"{info['perplexity']:.3f}",
                    "base_random_init_corpus_perplexity": f"{info['random_init_perplexity']:.1f}",
                    "base_unseen_copy_accuracy": f"{info['unseen_copy_accuracy']:.3f}"}


def test_a_race_keeps_one_whole_base(tok, tmp_path, monkeypatch):
    monkeypatch.setenv(pretrain.CACHE_ENV, str(tmp_path))
    first = pretrain.ensure_base(SMALL, tok, log=lambda _: None)
    # Another process put the base in place while this one pretrained: this one's first look
    # found nothing, its rename then fails, and the base already there is kept and used.
    real, looks = pretrain.cached_base, []

    def first_look_misses(cfg, t):
        looks.append(1)
        return None if len(looks) == 1 else real(cfg, t)

    monkeypatch.setattr(pretrain, "cached_base", first_look_misses)
    assert pretrain.ensure_base(SMALL, tok, log=lambda _: None) == first
    assert len(looks) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]  # temp folder removed


def test_zero_steps_is_the_random_base(tok, tmp_path, monkeypatch):
    monkeypatch.setenv(pretrain.CACHE_ENV, str(tmp_path))
    cfg = dataclasses.replace(SMALL, pretrain_steps=0)
    assert pretrain.ensure_base(cfg, tok) is None and not pretrain.is_pretrained_tiny(cfg)
    assert list(tmp_path.iterdir()) == []


def test_read_back_lines_are_packed_whole_with_padding_masked(tok):
    lines = ["ka ;ka", "zobo lu ;zobo lu", "mi ;mi", "strimperwaxle zobo ;strimperwaxle zobo"]
    ids, labels = pretrain._line_rows(tok, lines, 16)
    sep = tok("\n\n", add_special_tokens=False)["input_ids"]
    # a line longer than a row is cut to the row
    encs = [(tok(line, add_special_tokens=False)["input_ids"] + sep)[:16] for line in lines]
    assert max(len(tok(line, add_special_tokens=False)["input_ids"]) for line in lines) > 16
    rows, row = [], []
    for enc in encs:  # the packing rule, written out: a line that does not fit starts a row
        if len(row) + len(enc) > 16:
            rows.append(row)
            row = []
        row = row + enc
    rows.append(row)
    assert ids.shape == (len(rows), 16) and ids.dtype == torch.int64
    for i, row in enumerate(rows):
        assert ids[i, :len(row)].tolist() == row == labels[i, :len(row)].tolist()
        assert labels[i, len(row):].tolist() == [-100] * (16 - len(row))
        assert ids[i, len(row):].tolist() == [tok.eos_token_id] * (16 - len(row))


class _Copier(torch.nn.Module):
    """Predicts the true next token everywhere (`right`) or token 0 (not `right`)."""

    def __init__(self, right: bool):
        super().__init__()
        self.right = right

    def forward(self, input_ids):
        from types import SimpleNamespace

        logits = torch.zeros(*input_ids.shape, 500)
        nxt = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1) if self.right \
            else torch.zeros_like(input_ids)
        logits.scatter_(2, nxt.unsqueeze(-1), 1.0)
        return SimpleNamespace(logits=logits)


def test_copy_accuracy_scores_the_copied_half_only(tok):
    lines = ["kela zu ;kela zu", "mopi ;mopi"]
    assert pretrain.copy_accuracy(_Copier(True), tok, lines) == 1.0
    assert pretrain.copy_accuracy(_Copier(False), tok, lines) == 0.0
    cfg = dataclasses.replace(SMALL, seed=3)
    unseen = pretrain.unseen_copy_lines(cfg, 4)
    assert len(unseen) == 4 and all(len(line.split(";")[0].split()) == 1 for line in unseen)


def test_pretraining_texts_are_just_enough_for_the_steps(tok):
    cfg = dataclasses.replace(SMALL, pretrain_steps=40)
    paragraphs, lines = pretrain.pretraining_texts(cfg, tok)
    stream = pretrain._token_stream(tok, paragraphs)
    need = cfg.pretrain_steps * cfg.pretrain_batch_size * cfg.pretrain_seq_len
    assert len(paragraphs) > 1
    assert len(stream) >= need > len(pretrain._token_stream(tok, paragraphs[:-1]))
    assert paragraphs == corpus.generate(len(paragraphs), cfg.seed)
    assert lines == corpus.read_back_lines(len(lines), cfg.seed)
    # the read-back lines fill every read-back step's rows
    rows, _ = pretrain._line_rows(tok, lines, cfg.pretrain_seq_len)
    assert len(rows) >= (cfg.pretrain_steps + 1) // 2 * pretrain.READ_BACK_ROWS
