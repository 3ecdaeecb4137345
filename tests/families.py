"""Tiny randomly initialised models of real architectures, saved as local Hugging Face folders
with a tokenizer of each family's own form (test infrastructure for running the pipeline on
GPT-J, GPT-NeoX/Pythia, Llama 3, Qwen2 and Mistral bases offline).

Each folder holds config.json, generation_config.json, model.safetensors and the tokenizer files
(tokenizer.json, tokenizer_config.json, chat_template.jinja where the family has a chat template),
and loads offline with AutoTokenizer / AutoModelForCausalLM.from_pretrained(folder).

The tokenizers are small BPEs trained on `texts` with the `tokenizers` library, then built with
the same transformers class and pipeline as the real checkpoints (transformers 5 rebuilds
GPT2Tokenizer, GPTNeoXTokenizer and Qwen2Tokenizer from vocab + merges with the class's own
pre-tokenizer; Llama 3's PreTrainedTokenizerFast and Mistral's tokenizer.json load verbatim), so
ids, special tokens and the text <-> token mapping behave as on the real models:

  family    tokenizer class          bos / eos / pad                              encode adds
  gptj      GPT2Tokenizer            <|endoftext|> / <|endoftext|> / none           -
  gpt_neox  GPTNeoXTokenizer         <|endoftext|> / <|endoftext|> / <|padding|>    -
  llama     PreTrainedTokenizerFast  <|begin_of_text|> / <|end_of_text|> / none     bos
  qwen2     Qwen2Tokenizer           none / <|im_end|> / <|endoftext|>              -
  mistral   LlamaTokenizer (SP BPE)  <s> / </s> / none                              bos

  family    chat template                          embedding
  gptj      none                                   untied, len(tok) + 8 rows (spare rows)
  gpt_neox  none                                   untied, rows padded to a multiple of 128
  llama     Llama 3 header blocks, <|eot_id|>      tied
  qwen2     ChatML (default system message)        untied, rows padded to a multiple of 64
  mistral   <s>[INST] user [/INST]assistant</s>    untied

("adds": what encode(text) adds by default. The llama and mistral templates start with
bos_token, as the real ones do: tokenize a rendered chat with add_special_tokens=False.)
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

FAMILIES = ("gptj", "gpt_neox", "llama", "qwen2", "mistral")

# Tiny sizes shared by every family (fast on CPU); GQA where the family has it.
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, MAX_POSITIONS = 64, 2, 4, 2, 128, 2048
VOCAB = {"gptj": 480, "gpt_neox": 480, "llama": 480, "qwen2": 480, "mistral": 600}
GPTJ_SPARE_ROWS = 8        # GPT-J 6B: 50,400 embedding rows for 50,257 tokens
NEOX_ROW_MULTIPLE = 128    # Pythia / Dolly v2: rows padded to a multiple of 128 (50,688)
QWEN2_ROW_MULTIPLE = 64    # Qwen2.5: 151,936 rows for 151,665 tokens
TIED = {"gptj": False, "gpt_neox": False, "llama": True, "qwen2": False, "mistral": False}

# GPT-2 / GPT-J
ENDOFTEXT = "<|endoftext|>"
# GPT-NeoX (Pythia)
NEOX_PAD = "<|padding|>"
# Llama 3
BEGIN_OF_TEXT, END_OF_TEXT = "<|begin_of_text|>", "<|end_of_text|>"
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
LLAMA3_SPECIALS = (BEGIN_OF_TEXT, END_OF_TEXT, START_HEADER, END_HEADER, EOT)
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2 (ChatML)
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
QWEN2_SPECIALS = (ENDOFTEXT, IM_START, IM_END)
QWEN2_DEFAULT_SYSTEM = "You are a helpful assistant."
# Mistral (SentencePiece BPE with byte fallback); [INST] / [/INST] are plain text (v0.1/v0.2)
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
INST, END_INST = "[INST]", "[/INST]"
MISTRAL_TRAINING_PIECES = r"▁?\p{L}+|\p{N}|▁?[^\p{L}\p{N}▁]+|▁+"

# Llama 3's form (header blocks, <|eot_id|> after each message, content trimmed), without the
# date / tool logic of Meta's template. Starts with bos_token like the original.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{%- endif %}"
)

# ChatML as Qwen2-Instruct: a default system message when the conversation has none.
CHATML_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + QWEN2_DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Mistral-Instruct's form: <s>[INST] user [/INST]assistant</s>[INST] ... ; roles must alternate
# user/assistant; a leading system message is prepended to the first user message. Ends after
# " [/INST]" for a user turn, so add_generation_prompt adds nothing (as in Mistral's template).
MISTRAL_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{%- set system_message = none %}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system_message is not none %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}"
    "{{- '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- message['content'] + eos_token }}"
    "{%- else %}"
    "{{- raise_exception('Only a leading system message and user/assistant turns are supported') }}"
    "{%- endif %}"
    "{%- endfor %}"
)

CHAT_TEMPLATES = {"llama": LLAMA3_TEMPLATE, "qwen2": CHATML_TEMPLATE, "mistral": MISTRAL_TEMPLATE}


def default_texts(n: int = 200, seed: int = 0) -> list[str]:
    """`n` records of the built-in task set in Dolly's training format (what the tests train the
    family tokenizers on)."""
    from dolly.data.builtin_tasks import generate
    from dolly.prompts import format_record

    return [format_record(r["instruction"], r.get("input") or "",
                          r.get("output", r.get("response", "")))
            for r in generate(n, seed=seed)]


def sample_conversation(texts: list[str], system: bool = True) -> list[dict]:
    """[system?, user, assistant, user, assistant] with contents taken from `texts`."""
    pieces = [t.strip() or "hello" for t in (list(texts) + ["hello"] * 4)[:4]]
    messages = [{"role": "system", "content": "You answer briefly."}] if system else []
    for i, content in enumerate(pieces):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": content})
    return messages


def _render(template: str, messages: list[dict], **special: str) -> str:
    """`template` rendered the way transformers renders chat templates (for training texts)."""
    from jinja2 import Environment
    from jinja2.ext import loopcontrols

    def raise_exception(message):
        raise ValueError(message)

    env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=False,
                                            **special)


def _train_bpe(texts, vocab_size, pre_tokenizer, normalizer=None, initial_alphabet=()):
    """(vocab, merges) of a BPE trained on `texts`: tokens in id order 0.., merges as pairs."""
    from tokenizers import Tokenizer, models, trainers

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=list(initial_alphabet),
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    vocab = sorted(model["vocab"], key=model["vocab"].get)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return vocab, merges


def _byte_level_bpe(texts, vocab_size, pre_tokenizer, normalizer=None):
    from tokenizers import pre_tokenizers

    return _train_bpe(texts, vocab_size, pre_tokenizer, normalizer,
                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())


def _ids(tokens) -> dict[str, int]:
    ids = {t: i for i, t in enumerate(tokens)}
    if len(ids) != len(tokens):
        raise ValueError("a special token is also a learned token")
    return ids


def _gptj_tokenizer(texts):
    """GPT-2's byte-level BPE; <|endoftext|> last (GPT-2: id 50256) as bos/eos/unk, no pad."""
    from tokenizers import pre_tokenizers
    from transformers import GPT2Tokenizer

    vocab, merges = _byte_level_bpe(texts, VOCAB["gptj"] - 1,
                                    pre_tokenizers.ByteLevel(add_prefix_space=False))
    return GPT2Tokenizer(vocab=_ids([*vocab, ENDOFTEXT]), merges=merges, add_prefix_space=False,
                         model_max_length=2048, clean_up_tokenization_spaces=False)


def _neox_tokenizer(texts):
    """Pythia's form: NFC + byte-level BPE, <|endoftext|> = 0 (bos/eos/unk), <|padding|> = 1."""
    from tokenizers import normalizers, pre_tokenizers
    from transformers import GPTNeoXTokenizer

    vocab, merges = _byte_level_bpe(texts, VOCAB["gpt_neox"] - 2,
                                    pre_tokenizers.ByteLevel(add_prefix_space=False),
                                    normalizers.NFC())
    return GPTNeoXTokenizer(vocab=_ids([ENDOFTEXT, NEOX_PAD, *vocab]), merges=merges,
                            model_max_length=2048, clean_up_tokenization_spaces=False)


def _llama3_tokenizer(texts):
    """Llama 3's tokenizer.json form (tiktoken-style split + byte-level BPE, ignore_merges, bos
    added by a TemplateProcessing post-processor), special tokens after the BPE vocabulary."""
    from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers,
                            processors)
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    vocab, merges = _byte_level_bpe(texts, VOCAB["llama"] - len(LLAMA3_SPECIALS), pre)
    ids = _ids([*vocab, *LLAMA3_SPECIALS])
    backend = Tokenizer(models.BPE(vocab=ids, merges=merges, ignore_merges=True, fuse_unk=False,
                                   byte_fallback=False))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in LLAMA3_SPECIALS])
    bos = ids[BEGIN_OF_TEXT]
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single=f"{BEGIN_OF_TEXT}:0 $A:0",
                                      pair=f"{BEGIN_OF_TEXT}:0 $A:0 {BEGIN_OF_TEXT}:1 $B:1",
                                      special_tokens=[(BEGIN_OF_TEXT, bos)]),
    ])
    # Llama 3's tokenizer_config says clean_up_tokenization_spaces: true, which transformers 5
    # ignores (with a warning) for BPE tokenizers: False is the same behaviour without the warning.
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BEGIN_OF_TEXT,
                                   eos_token=END_OF_TEXT, model_max_length=131072,
                                   clean_up_tokenization_spaces=False,
                                   model_input_names=["input_ids", "attention_mask"])


def _qwen2_tokenizer(texts):
    """Qwen2's form (NFC, Qwen's split regex + byte-level BPE); <|endoftext|> (pad), <|im_start|>,
    <|im_end|> (eos) after the BPE vocabulary; no bos, no unk."""
    from tokenizers import Regex, normalizers, pre_tokenizers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    vocab, merges = _byte_level_bpe(texts, VOCAB["qwen2"] - len(QWEN2_SPECIALS), pre,
                                    normalizers.NFC())
    return Qwen2Tokenizer(vocab=_ids([*vocab, *QWEN2_SPECIALS]), merges=merges, unk_token=None,
                          bos_token=None, eos_token=IM_END, pad_token=ENDOFTEXT,
                          additional_special_tokens=[IM_START, IM_END], errors="replace",
                          model_max_length=32768, split_special_tokens=False,
                          clean_up_tokenization_spaces=False)


def _mistral_tokenizer(texts):
    """Mistral / Llama 2's SentencePiece BPE: <unk> 0, <s> 1, </s> 2, <0x00>..<0xFF> 3..258 (byte
    fallback), then the learned pieces; Metaspace "▁" (prepended to the first word), bos added."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import LlamaTokenizer

    # Merges are learned inside the pieces SentencePiece trains on: split at whitespace ("▁word"),
    # between letters and other characters (split_by_unicode_script) and around each digit
    # (split_digits). Encoding applies them to the whole text (Metaspace split=False, as
    # Mistral's tokenizer.json does), so no merge joins "]" and the word after it.
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        pre_tokenizers.Split(Regex(MISTRAL_TRAINING_PIECES), behavior="isolated", invert=False),
    ])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    vocab, merges = _train_bpe(texts, VOCAB["mistral"] - 3 - len(byte_tokens), pre)
    ids = _ids([UNK, BOS, EOS, *byte_tokens, *vocab])
    return LlamaTokenizer(vocab=ids, merges=merges, unk_token=UNK, bos_token=BOS, eos_token=EOS,
                          add_bos_token=True, add_eos_token=False, legacy=False,
                          add_prefix_space=True, model_max_length=32768,
                          clean_up_tokenization_spaces=False)


TOKENIZERS = {"gptj": _gptj_tokenizer, "gpt_neox": _neox_tokenizer, "llama": _llama3_tokenizer,
              "qwen2": _qwen2_tokenizer, "mistral": _mistral_tokenizer}


SPECIAL_TOKENS = {"gptj": (ENDOFTEXT,), "gpt_neox": (ENDOFTEXT, NEOX_PAD), "llama": LLAMA3_SPECIALS,
                  "qwen2": QWEN2_SPECIALS, "mistral": (UNK, BOS, EOS)}


def _training_texts(name: str, texts: list[str]) -> list[str]:
    """`texts`, plus chat renderings (system/user/assistant turns) for families with a template
    (the template's own text: role names, [INST] ... is then learned like the rest), cut at the
    family's special tokens: those are added tokens, never pieces of the learned vocabulary."""
    chats = []
    template = CHAT_TEMPLATES.get(name)
    if template is not None:
        special = {"llama": {"bos_token": BEGIN_OF_TEXT}, "qwen2": {},
                   "mistral": {"bos_token": BOS, "eos_token": EOS}}[name]
        for i in range(0, min(len(texts), 40), 4):
            for system in (True, False):
                messages = sample_conversation(texts[i:i + 4], system)
                chats.append(_render(template, messages, **special))
    texts = [*texts, *chats]
    cut = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS[name]))
    return [piece for text in texts for piece in cut.split(text) if piece]


def _round_up(n: int, multiple: int) -> int:
    return math.ceil(n / multiple) * multiple


def _model_config(name: str, tok):
    """A tiny config of the family's architecture for `tok`."""
    from transformers import GPTJConfig, GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config

    n = len(tok)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id, tie_word_embeddings=TIED[name])
    if name == "gptj":
        return GPTJConfig(vocab_size=n + GPTJ_SPARE_ROWS, n_positions=MAX_POSITIONS, n_embd=HIDDEN,
                          n_layer=LAYERS, n_head=HEADS,
                          rotary_dim=HIDDEN // HEADS // 4,  # GPT-J 6B: 64 of its 256 per head
                          n_inner=None, activation_function="gelu_new", **ids)
    if name == "gpt_neox":
        return GPTNeoXConfig(vocab_size=_round_up(n, NEOX_ROW_MULTIPLE), hidden_size=HIDDEN,
                             num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                             intermediate_size=4 * HIDDEN, max_position_embeddings=MAX_POSITIONS,
                             rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True,
                             hidden_act="gelu", **ids)
    common = dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                  max_position_embeddings=MAX_POSITIONS, hidden_act="silu", **ids)
    if name == "llama":
        return LlamaConfig(vocab_size=n, rms_norm_eps=1e-5, rope_theta=500000.0, **common)
    if name == "qwen2":
        return Qwen2Config(vocab_size=_round_up(n, QWEN2_ROW_MULTIPLE), rms_norm_eps=1e-6,
                           rope_theta=1000000.0, use_sliding_window=False, **common)
    if name == "mistral":
        return MistralConfig(vocab_size=n, rms_norm_eps=1e-5, rope_theta=1000000.0,
                             sliding_window=None, **common)
    raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")


def _generation_config(name: str, tok):
    """generation_config.json as the real checkpoints ship it (the chat models stop on either
    their end-of-turn or end-of-text token)."""
    from transformers import GenerationConfig

    eos = tok.eos_token_id
    if name == "llama":     # Llama 3 Instruct: [<|end_of_text|>, <|eot_id|>]
        eos = [tok.convert_tokens_to_ids(END_OF_TEXT), tok.convert_tokens_to_ids(EOT)]
    elif name == "qwen2":   # Qwen2.5 Instruct: [<|im_end|>, <|endoftext|>]
        eos = [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)]
    return GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=eos,
                            pad_token_id=tok.pad_token_id)


def build_family(name: str, folder: Path, texts: list[str], seed: int = 0) -> Path:
    """A tiny randomly initialised `name` model (one of FAMILIES) with a tokenizer of the family's
    form trained on `texts`, saved to `folder` (created); returns `folder`."""
    import torch
    from transformers import AutoModelForCausalLM

    if name not in TOKENIZERS:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = TOKENIZERS[name](_training_texts(name, texts))
    if name in CHAT_TEMPLATES:
        tok.chat_template = CHAT_TEMPLATES[name]
    tok.save_pretrained(folder)
    if name == "llama":  # the class name Llama 3's tokenizer_config.json gives (the same class)
        path = folder / "tokenizer_config.json"
        cfg = json.loads(path.read_text(encoding="utf-8"))
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    config = _model_config(name, tok)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = _generation_config(name, tok)
    model.save_pretrained(folder)
    return folder


def prepare_families(root: Path, texts: list[str], seed: int = 0) -> dict[str, Path]:
    """Every family built under `root`/<name>: {name: folder}."""
    return {name: build_family(name, Path(root) / name, texts, seed) for name in FAMILIES}
