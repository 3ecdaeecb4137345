"""Logits only where the loss counts: the training forward of a causal LM that sends only the
hidden states of labelled positions through the LM head.

A causal LM's loss at position t is the cross-entropy of `lm_head(h_t)` against token t+1, and
only positions whose next token carries a label (-100 elsewhere) count. The model's own forward
computes `batch x seq x vocab` logits first (GPT-J: 50,400 rows; in the tiny benchmark model the
LM head is about 80% of the FLOPs, and on GPUs the fp32 logits are the largest activation), then
throws away the prompt's. `install` replaces the forward of one model instance so that, when
`labels` are given, it runs the decoder, gathers the N labelled positions of every row, and
computes `lm_head` and the loss on those `(N, hidden)` states only. The loss is the same sum of
per-token cross-entropies (in fp32, as transformers' `ForCausalLMLoss` upcasts) divided by
`num_items_in_batch` when the Trainer passes it, else by N: equal to the model's own loss up to
float rounding (tests/models/test_labelled_loss.py). Without labels (generation, evaluation
by generation) the model's own forward runs unchanged.

The decoder is called with `use_cache=False` and the caller's `attention_mask` and
`position_ids` as given: a packed batch (dolly.data.packing) has no mask and restarting positions.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from dolly.data.collator import IGNORE_INDEX

# Causal LMs whose forward computes logits as exactly `get_output_embeddings()(last hidden
# state)`, nothing after it (no soft-capping, no logit scale), and whose attention masks come
# from transformers' create_causal_mask (so packed rows with restarting positions stay apart
# with eager and sdpa attention). Read from transformers 5.17's modeling files; each is tested
# with a tiny model in tests/models/test_labelled_loss.py (those in tests/families.py).
PLAIN_HEAD_TYPES = frozenset({"gptj", "gpt_neox", "llama", "qwen2", "mistral"})


def inner_model(model):
    """The transformers PreTrainedModel inside a peft wrapper (or `model` itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) and hasattr(model, "peft_config") else model


def supported(model) -> bool:
    """True when `install` computes this model's loss (its type is in PLAIN_HEAD_TYPES)."""
    return getattr(inner_model(model).config, "model_type", None) in PLAIN_HEAD_TYPES


def labelled_forward(model, original: Callable) -> Callable:
    """The replacement forward of `model` (a transformers causal LM; `original` its own bound
    forward). Takes `input_ids: (batch, seq) int64`, `labels: (batch, seq) int64`, optional
    `attention_mask`/`position_ids: (batch, seq) int64` and `num_items_in_batch`; returns a
    CausalLMOutputWithPast whose `loss` is a 0-dim tensor and whose `logits` are None."""

    def forward(input_ids=None, attention_mask=None, position_ids=None, labels=None,
                num_items_in_batch=None, inputs_embeds=None, **kwargs: Any):
        if labels is None or kwargs.get("past_key_values") is not None:
            return original(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids, labels=labels,
                            inputs_embeds=inputs_embeds, **kwargs)
        out = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids, inputs_embeds=inputs_embeds,
                               use_cache=False)
        hidden = out.last_hidden_state                          # (batch, seq, hidden)
        target = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).to(hidden.device)
        keep = target != IGNORE_INDEX                           # (batch, seq) bool
        logits = model.get_output_embeddings()(hidden[keep]).float()  # (N, vocab)
        loss = F.cross_entropy(logits, target[keep], reduction="sum")
        if num_items_in_batch is None:
            loss = loss / keep.sum()
        else:
            loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
        return CausalLMOutputWithPast(loss=loss, logits=None)

    forward.labelled_logits = True
    return forward


def install(model) -> bool:
    """Make `model` (a causal LM, or a peft model around one) compute its training loss from
    the labelled positions only. Returns False (and changes nothing) for a model type outside
    PLAIN_HEAD_TYPES, whose own forward then stays in use; True when installed or already so.
    The weights, `state_dict` and `save_pretrained` are untouched; `uninstall` restores."""
    inner = inner_model(model)
    if getattr(inner.forward, "labelled_logits", False):
        return True
    if not supported(model):
        return False
    inner.forward = labelled_forward(inner, inner.forward)
    return True


def uninstall(model) -> None:
    """Undo `install` (the model's own forward again)."""
    inner = inner_model(model)
    if getattr(inner.forward, "labelled_logits", False):
        del inner.forward
