"""Exactness of packed rows (dolly/data/packing.py) and of logits only where the loss counts
(dolly/models/labelled_loss.py), fp32, in the manner of torchtune's packing tests:

- each record of a packed row has the loss it has alone (max difference <= 1e-5), for 18
  records including a one-token response, a record of exactly max_length and an eos inside a
  response;
- the labelled-only loss of a packed batch, and of a padded one, equals the model's own loss of
  today's padded batch, and so does every gradient (rtol 1e-4);
- negative controls, each of which must move some record's loss by more than 1e-3: an all-ones
  attention mask, `use_cache=True`, and positions 0..T-1 with no mask;
- the same on a tiny model of each architecture the pipeline supports (tests/families.py).
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPTJConfig, GPTJForCausalLM

from dolly.data.collator import IGNORE_INDEX, CompletionCollator
from dolly.data.packing import PackingCollator
from dolly.models import labelled_loss

pytestmark = pytest.mark.timeout(300)
VOCAB, MAX_LENGTH, EOS, RESP = 300, 64, 299, 298


def records(n_records=18, seed=0):
    """Token-id records (Dolly-style: the token before the response is the response key)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_records):
        n = int(rng.integers(6, 40))
        if k == 0:
            n = MAX_LENGTH                      # a record of exactly max_length
        ids = rng.integers(0, VOCAB - 2, size=n).tolist()
        start = int(rng.integers(2, n - 1))
        if k == 1:
            start = n - 1                       # a one-token response
        if k == 2:
            ids[start + 1] = EOS                # an eos inside the response
        ids[start - 1] = RESP
        out.append({"input_ids": ids, "response_start": start})
    return out


@pytest.fixture(scope="module")
def gptj():
    torch.manual_seed(0)
    cfg = GPTJConfig(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                     rotary_dim=8, bos_token_id=EOS, eos_token_id=EOS)
    model = GPTJForCausalLM(cfg)
    model.config.use_cache = False  # as training sets it (GPT-J's own default is True)
    return model.eval()


def per_record_alone(model, feats, pad):
    """Each record's mean loss over its labelled tokens, computed with the record alone."""
    out = []
    with torch.no_grad():
        for f in feats:
            b = CompletionCollator(pad, None)([f])
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            out.append(F.cross_entropy(logits[0, :-1].float(), b["labels"][0, 1:],
                                       ignore_index=IGNORE_INDEX).item())
    return np.array(out)


def per_record_packed(model, batch, **call):
    """Each record's mean loss read off a packed batch's full logits (the model's own forward),
    records in row order: a record starts where its position id is 0 (the padding tail of a
    row also starts at 0 but has no labels, so it yields no record)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], **call).logits.float()
    target = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    pos = batch["position_ids"]
    losses = []
    for r in range(pos.shape[0]):
        starts = (pos[r] == 0).nonzero().flatten().tolist() + [pos.shape[1]]
        for a, b in zip(starts, starts[1:]):
            t = target[r, a:b]
            # the last token of a record predicts the next record's start: -100, as it must be
            if (t != IGNORE_INDEX).any():
                losses.append(F.cross_entropy(logits[r, a:b], t, ignore_index=IGNORE_INDEX).item())
    return np.array(losses)


def row_order(batch, feats):
    """The features in the order their records appear in the packed rows."""
    key = {tuple(f["input_ids"]): i for i, f in enumerate(feats)}
    pos, ids = batch["position_ids"], batch["input_ids"]
    order = []
    for r in range(pos.shape[0]):
        starts = (pos[r] == 0).nonzero().flatten().tolist() + [pos.shape[1]]
        for a, b in zip(starts, starts[1:]):
            i = key.get(tuple(ids[r, a:b].tolist()))
            if i is not None:
                order.append(i)
    return order


@pytest.fixture(scope="module")
def packed(gptj):
    feats = records()
    batch = PackingCollator(0, RESP, MAX_LENGTH)(feats)
    for k in ("num_real_tokens", "num_records"):
        batch.pop(k)
    order = row_order(batch, feats)
    assert sorted(order) == list(range(len(feats)))
    return feats, batch, per_record_alone(gptj, [feats[i] for i in order], 0)


def test_the_records_are_the_cases_the_issue_names(packed):
    feats, batch, _ = packed
    assert len(feats) >= 16
    assert len(feats[0]["input_ids"]) == MAX_LENGTH
    assert feats[1]["response_start"] == len(feats[1]["input_ids"]) - 1
    assert EOS in feats[2]["input_ids"][feats[2]["response_start"]:]
    assert batch["input_ids"].shape[0] < len(feats)  # rows really hold several records


def test_each_packed_record_has_its_loss_alone(gptj, packed):
    _, batch, alone = packed
    got = per_record_packed(gptj, batch, position_ids=batch["position_ids"])
    assert len(got) == len(alone)
    assert np.abs(got - alone).max() <= 1e-5


@pytest.mark.parametrize("control", ["all_ones_mask", "use_cache", "no_positions"])
def test_negative_controls_let_records_see_each_other(gptj, packed, control):
    _, batch, alone = packed
    call = {"all_ones_mask": {"position_ids": batch["position_ids"],
                              "attention_mask": torch.ones_like(batch["input_ids"])},
            "use_cache": {"position_ids": batch["position_ids"], "use_cache": True},
            "no_positions": {}}[control]
    got = per_record_packed(gptj, batch, **call)
    assert np.abs(got - alone).max() > 1e-3


def _loss_and_grads(model, batch, num_items=None):
    model.zero_grad(set_to_none=True)
    kw = {} if num_items is None else {"num_items_in_batch": num_items}
    loss = model(**batch, **kw).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_labelled_logits_give_todays_loss_and_gradients(gptj, packed):
    feats, batch, _ = packed
    padded = CompletionCollator(0, RESP)(feats)
    n_items = int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert n_items == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    model = gptj.train()  # dropout is 0 in this config: train mode only enables autograd paths
    try:
        ref_loss, ref_grads = _loss_and_grads(model, padded, torch.tensor(n_items))
        assert labelled_loss.install(model)
        for b in (padded, batch):
            loss, grads = _loss_and_grads(model, b, torch.tensor(n_items))
            assert loss == pytest.approx(ref_loss, rel=1e-4)
            for name, g in ref_grads.items():
                torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-7, msg=name)
        # without the Trainer's count the loss is the mean over the labelled tokens
        assert model(**batch).loss.item() == pytest.approx(ref_loss, rel=1e-4)
    finally:
        labelled_loss.uninstall(model)
        model.eval()


def test_labelled_forward_computes_no_logits_and_generation_is_untouched(gptj):
    feats = records(4, seed=1)
    padded = CompletionCollator(0, RESP)(feats)
    assert labelled_loss.install(gptj) and labelled_loss.install(gptj)  # idempotent
    try:
        out = gptj(**padded)
        assert out.logits is None and out.loss.ndim == 0
        ids = torch.tensor([feats[0]["input_ids"][:5]])
        with torch.no_grad():
            installed = gptj.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True)
    finally:
        labelled_loss.uninstall(gptj)
    with torch.no_grad():
        own = gptj.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True)
    assert installed.tolist() == own.tolist()
    assert not getattr(gptj.forward, "labelled_logits", False)


def test_an_architecture_outside_the_list_keeps_its_own_forward(gptj, monkeypatch):
    monkeypatch.setattr(gptj.config, "model_type", "gemma2")
    assert not labelled_loss.install(gptj)
    assert not getattr(gptj.forward, "labelled_logits", False)


@pytest.mark.parametrize("family", ["gptj", "gpt_neox", "llama", "qwen2", "mistral"])
def test_every_supported_architecture_packs_and_keeps_only_labelled_logits(family,
                                                                           family_folders):
    assert family in labelled_loss.PLAIN_HEAD_TYPES
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(family_folders[family], dtype=torch.float32)
    model.config.use_cache = False
    model.eval()
    vocab = model.get_input_embeddings().weight.shape[0]
    rng = np.random.default_rng(3)
    feats = []
    for n in rng.integers(5, 30, size=10):
        ids = rng.integers(3, vocab, size=int(n)).tolist()
        feats.append({"input_ids": ids, "response_start": int(rng.integers(1, n - 1))})
    pad = 0
    batch = PackingCollator(pad, None, 48)(feats)
    batch.pop("num_real_tokens"), batch.pop("num_records")
    alone = per_record_alone(model, [feats[i] for i in row_order(batch, feats)], pad)
    got = per_record_packed(model, batch, position_ids=batch["position_ids"])
    assert np.abs(got - alone).max() <= 1e-5
    padded = CompletionCollator(pad, None)(feats)
    with torch.no_grad():
        own = model(**padded).loss.item()
        assert labelled_loss.install(model)
        assert model(**padded).loss.item() == pytest.approx(own, rel=1e-5)
        assert model(**batch).loss.item() == pytest.approx(own, rel=1e-5)
    labelled_loss.uninstall(model)
