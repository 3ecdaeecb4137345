"""Completion-only labels: exactly the response tokens and `### End` are learned; padding is found
by record length, never by comparing ids with the pad id (pad == eos for GPT-J)."""
import pytest
import torch

from dolly import prompts
from dolly.data import prepared
from dolly.data.collator import IGNORE_INDEX, CompletionCollator
from dolly.tokenizer import add_dolly_tokens, gptj_offline
from dolly.prompts import special_ids

pytestmark = pytest.mark.timeout(60)
X = IGNORE_INDEX

# GPT-J's tokenizer (GPT-2 BPE + Dolly's markers): fixed ids, so the lists below are literal.
EOS = PAD = 50256
END = 50257        # "### End"
RESP = 50259       # "### Response:\n"


@pytest.fixture(scope="module")
def gptj():
    tok = add_dolly_tokens(gptj_offline())
    assert special_ids(tok) == (RESP, END) and tok.pad_token_id == tok.eos_token_id == PAD
    return tok


def encode(tok, instruction, input, response):
    ids, _, starts, _ = prepared.tokenize(tok, [prompts.format_record(instruction, input, response)],
                                   256, "drop")
    return {"input_ids": ids[0], "response_start": starts[0]}


def test_labels_with_and_without_input(gptj):
    no_input = encode(gptj, "Name the capital of France.", None, "Paris")
    with_input = encode(gptj, "Add the numbers.", "2 and 3", "5")
    batch = CompletionCollator(PAD, RESP)([no_input, with_input])

    # no input: 29 prompt tokens (the last is the response key), "Paris", "\n\n", "### End",
    # then 16 pad positions up to the longer record.
    assert batch["labels"][0].tolist() == [X] * 29 + [40313, 628, END] + [X] * 16
    # with input: 45 prompt tokens, "5", "\n\n", "### End"; the longest record, no padding.
    assert batch["labels"][1].tolist() == [X] * 45 + [20, 628, END]
    assert batch["input_ids"][0, 28].item() == RESP and batch["input_ids"][1, 44].item() == RESP
    assert batch["attention_mask"].tolist() == [[1] * 32 + [0] * 16, [1] * 48]
    assert batch["input_ids"][0, 32:].tolist() == [PAD] * 16


def test_eos_inside_a_record_keeps_its_label(gptj):
    rec = encode(gptj, "Repeat the marker.", None, "<|endoftext|> ok")
    start = rec["response_start"]
    assert rec["input_ids"][start] == EOS  # the pad id occurs among the real tokens
    short = encode(gptj, "Say hi.", None, "hi")
    batch = CompletionCollator(PAD, RESP)([short, rec])
    n = len(rec["input_ids"])
    assert batch["labels"][1, start].item() == EOS
    assert batch["labels"][1].tolist() == [X] * start + list(rec["input_ids"][start:])
    assert batch["attention_mask"][1].tolist() == [1] * n
    # the short record's padding (the same id) is masked and unlabelled
    m = len(short["input_ids"])
    assert batch["attention_mask"][0].tolist() == [1] * m + [0] * (n - m)
    assert batch["labels"][0, m:].tolist() == [X] * (n - m)


def test_literal_ids_and_pad_to_multiple():
    # pad id 0 also appears inside the response of the first record (pad == eos)
    feats = [{"input_ids": [5, 6, 9, 0, 7, 3], "response_start": 3},
             {"input_ids": [5, 9, 8], "response_start": 2}]
    batch = CompletionCollator(pad_token_id=0, response_key_id=9, pad_to_multiple_of=4)(feats)
    assert batch["input_ids"].tolist() == [[5, 6, 9, 0, 7, 3, 0, 0], [5, 9, 8, 0, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[X, X, X, 0, 7, 3, X, X], [X, X, 8, X, X, X, X, X]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_response_start_must_follow_the_response_key():
    with pytest.raises(ValueError, match="response-key"):
        CompletionCollator(0, 9)([{"input_ids": [5, 6, 9, 7], "response_start": 2}])
