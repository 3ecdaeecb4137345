"""Loss on every assistant turn and its end-of-turn token, and on nothing else: label masks as
literal lists for a Llama-3-style template, a ChatML template (Qwen2's), Mistral's [INST] form and
Dolly's format, computed from the rendered text (dolly.prompts spans -> dolly.data.prepared
offsets -> dolly.data.collator labels)."""
import pytest
from transformers import AutoTokenizer

from dolly import prompts
from dolly.data.collator import IGNORE_INDEX, CompletionCollator
from dolly.data.prepared import tokenize
from dolly.tokenizer import for_format, gptj_offline

CONVERSATION = [{"role": "user", "content": "My name is Ada."},
                {"role": "assistant", "content": "Hi, Ada!"},
                {"role": "user", "content": "What is my name?"},
                {"role": "assistant", "content": "Ada"}]
MASKS = {
    "llama": [0] * 22 + [1] * 9 + [0] * 18 + [1] * 4,
    "qwen2": [0] * 37 + [1] * 9 + [0] * 18 + [1] * 4 + [0],
    "mistral": [0] * 18 + [1] * 8 + [0] * 15 + [1] * 3,
}
END_OF_TURN = {"llama": "<|eot_id|>", "qwen2": "<|im_end|>", "mistral": "</s>"}
STOPS = {"llama": ["<|end_of_text|>", "<|eot_id|>"], "qwen2": ["<|im_end|>"], "mistral": ["</s>"]}


def _mask(tok, fmt, text, spans):
    ids, labels, starts, _ = tokenize(tok, [text], 256, "drop", [spans], fmt)
    key = prompts.special_ids(tok)[0] if fmt.name == "dolly" else None
    batch = CompletionCollator(tok.pad_token_id, key)(
        [{"input_ids": ids[0], "response_start": starts[0], "label_spans": labels[0]}])
    return ids[0], starts[0], [int(x != IGNORE_INDEX) for x in batch["labels"][0].tolist()]


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_chat_label_mask_is_every_answer_and_its_end_of_turn(family, family_folders):
    tok = for_format(AutoTokenizer.from_pretrained(family_folders[family]), "chat_template")
    fmt = prompts.get_format("chat_template", tok)
    text, spans = fmt.render(None, None, None, CONVERSATION)
    ids, start, mask = _mask(tok, fmt, text, spans)
    assert mask == MASKS[family]
    labelled = [i for i, m in zip(ids, mask) if m]
    eot = END_OF_TURN[family]
    assert tok.decode(labelled) == f"Hi, Ada!{eot}Ada{eot}"
    # what the served model generates from: the same ids as training's up to the last answer
    assert ids[:start] == tok(fmt.prompt(messages=CONVERSATION[:-1]),
                              add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(fmt.stop_ids(tok)) == STOPS[family]


def test_dolly_label_mask_is_the_response_and_end_key():
    tok = for_format(gptj_offline(), "dolly")
    fmt = prompts.get_format("dolly", tok)
    text, spans = fmt.render("Say hi to Ada.", None, "Hi, Ada!")
    ids, start, mask = _mask(tok, fmt, text, spans)
    assert mask == [0] * 28 + [1] * 6
    assert ids[start:] == [17250, 11, 47395, 0, 628, 50257]  # "Hi, Ada!", "\n\n", "### End"
    assert ids[start - 1] == prompts.special_ids(tok)[0]


def test_a_pad_token_equal_to_eos_keeps_the_eos_label(family_folders):
    # Llama 3 has no pad token: pad = eos (<|end_of_text|>); an answer ending in eos keeps it
    tok = for_format(AutoTokenizer.from_pretrained(family_folders["llama"]), "chat_template")
    assert tok.pad_token == tok.eos_token == "<|end_of_text|>"
    eos = tok.eos_token_id
    batch = CompletionCollator(tok.pad_token_id, None)(
        [{"input_ids": [5, 6, 7, eos], "response_start": 2, "label_spans": [2, 4]},
         {"input_ids": [5, 6], "response_start": 1, "label_spans": [1, 2]}])
    assert batch["labels"].tolist() == [[-100, -100, 7, eos], [-100, 6, -100, -100]]


def test_a_base_without_a_template_gets_chatml_and_its_two_tokens(family_folders):
    tok = AutoTokenizer.from_pretrained(family_folders["gpt_neox"])
    before = len(tok)
    tok = for_format(tok, "chat_template")
    assert len(tok) == before + 2 and tok.chat_template == prompts.CHATML_TEMPLATE
    assert prompts.get_format("chat_template", tok).end_of_turn() == "<|im_end|>"
    # auto: a tokenizer with a template uses it, one without gets Dolly's format
    assert prompts.resolve_format("auto", AutoTokenizer.from_pretrained(
        family_folders["qwen2"])) == "chat_template"
    assert prompts.resolve_format("auto", AutoTokenizer.from_pretrained(
        family_folders["gpt_neox"])) == "dolly"
