from dolly import prompts
from dolly.config import load_config
from dolly.tokenizer import build_tokenizer
from dolly.prompts import special_ids


def test_gptj_tokenizer_offline_matches_gpt2_bpe():
    tok = build_tokenizer(load_config(None, {"tokenizer": "gpt-j"}))
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert len(tok) == 50257 + 3
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"


def test_dolly_markers_are_single_tokens():
    for name in ("gpt-j", "corpus-bpe"):
        tok = build_tokenizer(load_config(None, {"tokenizer": name}), ["some text to learn"] * 5)
        for marker in prompts.SPECIAL_TOKENS:
            assert len(tok(marker, add_special_tokens=False)["input_ids"]) == 1, (name, marker)
        resp, end = special_ids(tok)
        ids = tok(prompts.format_record("Say hi.", "", "hi"), add_special_tokens=False)["input_ids"]
        assert ids.count(resp) == 1 and ids[-1] == end
