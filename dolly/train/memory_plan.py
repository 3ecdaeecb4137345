"""Will this profile fit? GPU and CPU memory of a ZeRO-3 fine-tune, planned before any weight loads.

Per GPU the plan adds three parts (bytes):

- **Model states** (16-bit parameters, gradients, fp32 Adam states, ZeRO-3 partitioned over all
  GPUs): DeepSpeed's own estimator,
  `deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs` (the function behind
  `estimate_zero3_model_states_mem_needs_all_cold`), with the profile's offload settings and
  `zero_init=True` (the Trainer loads under `deepspeed.zero.Init`). It also gives the CPU memory
  per node that offload needs (1.5x buffer factor, DeepSpeed's default).
- **Activations** kept for backward, for one micro-batch `b` of `s` tokens, counted the way
  Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
  section 4.1, eq. 1: `s*b*h*(34 + 5*a*s/h)` bytes per layer of a standard 16-bit block; h =
  hidden size, a = attention heads) count them: every tensor autograd saves, each storage once,
  redone for the three block layouts of Hugging Face transformers below (16-bit bytes per layer;
  I = MLP width, h_kv = key/value heads x head size, q = query heads x head size, h unless the
  config sets head_dim). tests/train/test_memory_plan.py checks each count against the tensors
  autograd actually saves (CPU). On an H200 (CUDA SDPA kernels, bf16; 2026-12-04), a layer of
  Llama-3.1-8B's, Qwen2.5-7B's and Pythia-12B's widths (b=2, s=2048) saved what the counts say,
  padded or not, to within SDPA's 16-byte random state; torch.cuda.memory_allocated grew by the
  count to within 0.05% without padding and up to 2% above it with padding (Llama: a second
  s x s mask per layer).

  * **GPT-J** (`model_type` gptj; eager attention, transformers has no SDPA path for it):
    `56*s*b*h + 6*a*s^2*b`. 56 = residual input 2 + LayerNorm output 2 (shared by attention and
    MLP: GPT-J's block is parallel) + query and key upcast to fp32 8 + value 2 + attention output
    2 + MLP (h -> 4h: fc_in output and the four tensors of `gelu_new`'s tanh formula 32, fc_out
    input 8); 6*a*s^2 = fp32 softmax output 4 + its 16-bit copy 2 (no dropout mask: GPT-J's
    dropout is 0).
  * **Pre-norm sequential block with separate q/k/v/o projections and SDPA attention** (Llama,
    Mistral, Qwen2 and any other model_type but gptj and gpt_neox):
    `s*b*(2*n + 4*q + 4*kv + m) + 2*r + 4*a*s*b` plus, for a padded batch, `2*b*s^2`.
    Each of the two norms n: RMSNorm 8*h (its input upcast to fp32 4, the normalised 16-bit
    tensor 2, the scaled output the next projections read 2) and r = its fp32 1/rms 4*b*s, or
    LayerNorm 4*h (input 2, output 2) and r = its fp32 mean and 1/std 8*b*s. Attention: the
    rotated query 2*q, the attention output 2*q (the o projection reads it as a view: SDPA
    returns it laid out (b, s, a, d)), key and value 2*kv each, SDPA's fp32 log-sum-exp 4*a*s*b
    (flash and memory-efficient kernels keep no s x s scores). kv = h_kv when no token is
    padding (SDPA's `enable_gqa`); with padding transformers repeats K and V to all heads
    (kv = q) and passes a boolean mask that SDPA turns into a 16-bit s x s bias per layer
    (2*b*s^2). MLP m: gated (gate_proj, up_proj, SiLU: Llama's SwiGLU) 8*I: gate output, SiLU
    output, up output, their product; plain (one activation) 4*I: the activation's input and
    output. A per-head RMSNorm of query and key (Qwen3's q_norm,
    k_norm) adds `s*b*6*(q + h_kv)` and its 1/rms. Exact for Llama, Mistral, Qwen2 and Qwen3;
    variants of this layout with fused projections, partial rotary or a parallel block (Phi-3,
    StableLM) came within 6% in a CPU check.
  * **GPT-NeoX** (`model_type` gpt_neox, Pythia; fused query_key_value, partial rotary):
    `s*b*(16*h + 4*I) + 4*a*s*b + 16*b*s` (parallel residual; sequential adds the residual sum
    2*h) plus `2*b*s^2` for a padded batch: layer input 2 (shared by both LayerNorms), the two
    LayerNorm outputs 2+2, query and key (rotary part concatenated back) 2+2, value 2 (a
    contiguous copy), attention output 2 and its (b, s, h) copy the dense projection reads 2, MLP
    4*I (GELU's input and output); LayerNorm statistics 16*b*s, log-sum-exp 4*a*s*b.

  The plan counts a padded batch (the collator pads each micro-batch to its longest record, and
  a micro-batch at the longest length rarely holds records of one length). A model without
  SDPA support in the other layouts is counted with eager attention: K and V at all heads, the
  fp32 softmax output and its 16-bit copy, 6*a*s^2*b. Without recomputation a step keeps `L`
  layers; with gradient checkpointing (Korthikanti et al. section 4, full recomputation) it keeps
  each layer's 16-bit input, `2*s*b*h*L`, plus one layer's activations while that layer is
  recomputed. fp32 training doubles every term (an upper bound: in fp32 RMSNorm's upcast is
  the input itself).
- **Logits**: `b*s*V*10` bytes (V = vocabulary rows): the 16-bit logits (2), the fp32 copy
  transformers' causal-LM loss makes (4) and the fp32 log-softmax cross-entropy keeps (4).

A GPU fits when the sum is at most `(1 - RESERVE_FRACTION)` of its memory: the reserve covers the
CUDA context, NCCL buffers, ZeRO-3's prefetch and reduce buckets beyond DeepSpeed's estimate and
allocator fragmentation (a planning margin, not a measurement).

The model's shape comes from its config.json: a local folder, the Hugging Face cache, the
config.json values of a few public bases shipped in `dolly/train/known_configs/<org>--<name>.json`
(EleutherAI/pythia-12b, meta-llama/Llama-3.1-8B, Qwen/Qwen2.5-7B, mistralai/Mistral-7B-v0.1:
offline, no Hub access needed), for another Hub id of the GPT-J family transformers'
`GPTJConfig()` defaults (GPT-J 6B's), or the tiny_* fields. Sizes are read from the config's
attributes (hidden_size/n_embd, num_hidden_layers/n_layer, num_attention_heads/n_head,
num_key_value_heads, head_dim, intermediate_size/n_inner, else 4*h; use_parallel_residual);
parameters are counted on the meta device, no weights are read, and the built model tells
whether its MLP is gated, its norms RMSNorm and its attention SDPA.
This module imports torch, transformers and DeepSpeed only inside its functions.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from dolly.config import CORPUS_BPE, TINY_BASE_MODEL, TINY_BASES, Config
from dolly.errors import DollyError

GIB = 2**30
RESERVE_FRACTION = 0.10
DEFAULT_GPUS_PER_NODE = 8  # assumed by the plan command when none is visible and none is given
GPTJ_VOCAB_WITH_MARKERS = 50_257 + 3  # GPT-2's BPE + Dolly's three markers (the tiny model's size)
# Hub ids whose config is GPT-J 6B's (offline fallback): the GPT-J family and Dolly v1.
GPTJ_FAMILY = ("gpt-j", "gptj", "dolly-v1-6b")
# config.json values of public bases, `<org>--<name>.json` for Hub id `<org>/<name>` (offline)
KNOWN_CONFIGS = Path(__file__).parent / "known_configs"


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about a causal LM; counts are elements, not bytes.

    The fields after `source` default to GPT-J's block (Dolly v1's architecture): `n_kv_head`,
    `head_dim` and `intermediate` 0 mean n_head, hidden // n_head and 4 * hidden."""

    n_params: int              # distinct parameters (a tied weight counts once)
    largest_layer_params: int  # the largest module's own parameters (DeepSpeed's "largest layer")
    n_layer: int
    hidden: int
    n_head: int
    vocab: int                 # rows of the output embedding (logits per token)
    source: str = ""           # where the shape came from
    block: str = "gptj"        # layout: gptj | neox (GPT-NeoX, Pythia) | prenorm (Llama family)
    n_kv_head: int = 0         # key/value heads (grouped-query attention: fewer than n_head)
    head_dim: int = 0          # channels per attention head
    intermediate: int = 0      # MLP width
    gated_mlp: bool = False    # gate_proj * act(up_proj) (SwiGLU) rather than one activation
    parallel: bool = True      # attention and MLP both read the layer input (GPT-J, Pythia)
    rms_norm: bool = False     # RMSNorm (its input is upcast to fp32) rather than LayerNorm
    sdpa: bool = True          # transformers runs its attention through SDPA (GPT-J: eager)
    qk_norm: bool = False      # RMSNorm on each head's query and key (Qwen3)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden // self.n_head

    @property
    def mlp_width(self) -> int:
        return self.intermediate or 4 * self.hidden

    def describe(self) -> str:
        """One line: sizes, attention heads (key/value heads when fewer), MLP, vocabulary."""
        kv = f" ({self.kv_heads} key/value)" if self.kv_heads != self.n_head else ""
        mlp = "gated " if self.gated_mlp else ""
        return (f"{self.n_params:,} parameters, largest layer {self.largest_layer_params:,}, "
                f"{self.n_layer} layers x {self.hidden} wide, {self.n_head} heads{kv}, "
                f"{mlp}MLP {self.mlp_width:,}, vocabulary {self.vocab:,}")


@dataclass(frozen=True)
class Setting:
    """The knobs the plan depends on (one per config field of the same meaning)."""

    micro_batch: int           # per_device_batch_size
    seq_len: int               # tokens of the longest record (max_length, or the data's longest)
    precision: str             # bf16, fp16 or fp32
    gradient_checkpointing: bool
    offload_optimizer: bool
    offload_params: bool
    gpus_per_node: int
    num_nodes: int
    gradient_accumulation_steps: int = 1

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.num_nodes


@dataclass
class MemoryPlan:
    """The figures of one plan (bytes per GPU unless named per node) and its verdict."""

    shape: ModelShape
    setting: Setting
    gpu_memory: int | None       # bytes of one GPU; None = unknown (no verdict)
    model_states: int            # per GPU (DeepSpeed's estimate)
    cpu_per_node: int            # CPU memory per node (DeepSpeed's estimate)
    activations: int             # per GPU, with the setting's checkpointing choice
    activations_no_ckpt: int
    activations_ckpt: int
    logits: int
    fixes: list[str] = field(default_factory=list)  # -P changes that make it fit (cheapest first)
    notes: list[str] = field(default_factory=list)
    # "GPU", or "CPU rank": a CPU profile on a machine without GPUs, whose ranks share this
    # machine's memory (gpu_memory is then one rank's share)
    device: str = "GPU"

    @property
    def need(self) -> int:
        return self.model_states + self.activations + self.logits

    @property
    def usable(self) -> int | None:
        return None if self.gpu_memory is None else int(self.gpu_memory * (1 - RESERVE_FRACTION))

    @property
    def fits(self) -> bool | None:
        return None if self.usable is None else self.need <= self.usable

    def verdict(self) -> str:
        s = self.setting
        if self.fits is None:
            return "verdict: no GPU memory known (pass -P gpu_memory_gb=G)"
        if self.device != "GPU":
            head = (f"each of the {s.world} CPU ranks needs {_gib(self.need)} of "
                    f"{_gib(self.usable)} usable (its share of this machine's "
                    f"{_gib(self.gpu_memory * s.gpus_per_node)}, less {RESERVE_FRACTION:.0%} reserve)")
        else:
            head = (f"each of the {s.world} GPUs needs {_gib(self.need)} of {_gib(self.usable)} "
                    f"usable ({_gib(self.gpu_memory)} less {RESERVE_FRACTION:.0%} reserve)")
        if self.fits:
            return f"verdict: fits: {head}"
        turn = "; or ".join(self.fixes) if self.fixes else (
            "no single change fits: combine gradient checkpointing, a smaller micro-batch and "
            "offload, or use GPUs with more memory")
        return f"verdict: does not fit: {head}; turn: {turn}"

    def lines(self) -> list[str]:
        s, m = self.setting, self.shape
        offload = ("optimizer+params" if s.offload_optimizer and s.offload_params else
                   "optimizer" if s.offload_optimizer else "params" if s.offload_params else "none")
        ckpt = "on" if s.gradient_checkpointing else "off"
        per = "GPU" if self.device == "GPU" else "CPU rank"
        return [
            f"model: {m.source}: {m.describe()}",
            f"setup: {s.num_nodes} node(s) x {s.gpus_per_node} {per}(s), {s.precision}, "
            f"micro-batch {s.micro_batch} x {s.seq_len} tokens, gradient checkpointing {ckpt}, "
            f"offload {offload}",
            f"model states per {per} (DeepSpeed ZeRO-3 estimate): {_gib(self.model_states)}",
            f"activations per {per}: {_gib(self.activations_no_ckpt)} without gradient "
            f"checkpointing, {_gib(self.activations_ckpt)} with it (after Korthikanti et al. "
            f"2022); "
            f"logits and loss {_gib(self.logits)}",
            f"CPU memory per node (DeepSpeed estimate, offload {offload}): {_gib(self.cpu_per_node)}",
            *[f"note: {n}" for n in self.notes],
            self.verdict(),
        ]


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GIB:.2f} GiB"


# --------------------------------------------------------------------------- the formulas -----

def model_states(shape: ModelShape, s: Setting) -> tuple[int, int]:
    """(bytes per GPU, CPU bytes per node) of ZeRO-3 model states, from DeepSpeed's estimator.

    Raises DollyError when DeepSpeed is not installed.
    """
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    except ImportError:
        raise DollyError("the memory plan needs DeepSpeed (pip install deepspeed)") from None
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        total_params=shape.n_params, largest_layer_params=shape.largest_layer_params,
        num_gpus_per_node=s.gpus_per_node, num_nodes=s.num_nodes,
        cpu_offload=s.offload_optimizer, cpu_offload_params=s.offload_params, zero_init=True)
    return int(gpu), int(cpu)


def layer_activation_bytes(shape: ModelShape, b: int, s: int, precision: str,
                           padded: bool = True) -> int:
    """Bytes one layer keeps for backward for `b` sequences of `s` tokens (the counts of the
    module docstring, after Korthikanti et al. 2022 section 4.1; x2 in fp32).

    GPT-J: 56*s*b*h + 6*a*s^2*b. Pre-norm (Llama family, SDPA):
    s*b*(2*n + 4*q + 4*kv + m) + 2*r + 4*a*s*b (+ 2*b*s^2 padded). GPT-NeoX (SDPA):
    s*b*(16*h + 4*I) + 16*b*s + 4*a*s*b (+ 2*h*s*b sequential, + 2*b*s^2 padded).
    `padded`: the micro-batch holds padding (an attention mask), as the plan assumes."""
    scale = 2 if precision == "fp32" else 1
    h, a, tokens = shape.hidden, shape.n_head, s * b
    if shape.block == "gptj":
        return scale * (56 * tokens * h + 6 * a * s * s * b)
    q = a * shape.head_size
    # K and V at their own heads only when SDPA gets no mask (enable_gqa); else repeated to a
    # (transformers' repeat_kv)
    kv = shape.kv_heads * shape.head_size if shape.sdpa and not padded else q
    if shape.sdpa:  # fp32 log-sum-exp, and the 16-bit s x s bias SDPA makes of a boolean mask
        attention = 4 * a * tokens + (2 * b * s * s if padded else 0)
    else:  # eager: the fp32 softmax output and its 16-bit copy
        attention = 6 * a * s * s * b
    if shape.block == "neox":
        residual = 0 if shape.parallel else 2 * h  # the sum the second LayerNorm reads
        per_token = 16 * h + residual + 4 * shape.mlp_width
        return scale * (tokens * per_token + 16 * tokens + attention)
    norm, stats = (8 * h, 4 * tokens) if shape.rms_norm else (4 * h, 8 * tokens)
    mlp = (8 if shape.gated_mlp else 4) * shape.mlp_width
    if shape.qk_norm:  # fp32 input 4 + normalised 2 per query/key channel, 1/rms per head
        own_kv = shape.kv_heads * shape.head_size
        attention += tokens * (6 * (q + own_kv) + 4 * (a + shape.kv_heads))
    return scale * (tokens * (2 * norm + 4 * q + 4 * kv + mlp) + 2 * stats + attention)


def activation_bytes(shape: ModelShape, b: int, s: int, precision: str,
                     checkpointing: bool, padded: bool = True) -> int:
    """Activation bytes per GPU for a micro-batch of `b` sequences of `s` tokens: `L` layers
    without checkpointing, else each layer's 16-bit input (2*s*b*h*L) plus one layer."""
    layer = layer_activation_bytes(shape, b, s, precision, padded)
    if not checkpointing:
        return shape.n_layer * layer
    scale = 2 if precision == "fp32" else 1
    return scale * 2 * s * b * shape.hidden * shape.n_layer + layer


def logits_bytes(shape: ModelShape, b: int, s: int, precision: str) -> int:
    """16-bit logits + their fp32 copy + fp32 log-softmax: b*s*V*10 bytes (b*s*V*12 in fp32)."""
    return b * s * shape.vocab * ((4 if precision == "fp32" else 2) + 8)


def make_plan(shape: ModelShape, s: Setting, gpu_memory: int | None,
              notes: list[str] | None = None, suggest: bool = True) -> MemoryPlan:
    """The plan of `shape` under setting `s` on GPUs of `gpu_memory` bytes (None = unknown)."""
    states, cpu = model_states(shape, s)
    no_ckpt = activation_bytes(shape, s.micro_batch, s.seq_len, s.precision, False)
    ckpt = activation_bytes(shape, s.micro_batch, s.seq_len, s.precision, True)
    plan = MemoryPlan(shape, s, gpu_memory, states, cpu, ckpt if s.gradient_checkpointing
                      else no_ckpt, no_ckpt, ckpt, logits_bytes(shape, s.micro_batch, s.seq_len,
                                                                s.precision), notes=list(notes or []))
    if s.offload_params and not s.offload_optimizer:
        plan.notes.append("DeepSpeed's estimator counts parameter offload only together with "
                          "optimizer offload: planned as no offload")
    if suggest and plan.fits is False:
        plan.fixes = _fixes(shape, s, gpu_memory)
    return plan


def _fits(shape: ModelShape, s: Setting, gpu_memory: int) -> bool:
    return bool(make_plan(shape, s, gpu_memory, suggest=False).fits)


def _fixes(shape: ModelShape, s: Setting, gpu_memory: int) -> list[str]:
    """Single changes that make the plan fit, cheapest in throughput first."""
    out = []
    if not s.gradient_checkpointing and _fits(
            shape, dataclasses.replace(s, gradient_checkpointing=True), gpu_memory):
        out.append("-P gradient_checkpointing=true")
    b = s.micro_batch // 2
    while b >= 1:
        if _fits(shape, dataclasses.replace(s, micro_batch=b), gpu_memory):
            gas = s.gradient_accumulation_steps * s.micro_batch / b
            keep = (f" -P gradient_accumulation_steps={int(gas)}" if gas.is_integer() else "")
            out.append(f"-P per_device_batch_size={b}{keep}")
            break
        b //= 2
    if not s.offload_optimizer and _fits(
            shape, dataclasses.replace(s, offload_optimizer=True), gpu_memory):
        out.append("-P offload_optimizer=true")
    if not (s.offload_optimizer and s.offload_params) and _fits(
            shape, dataclasses.replace(s, offload_optimizer=True, offload_params=True), gpu_memory):
        out.append("-P offload_optimizer=true -P offload_params=true")
    for nodes in range(s.num_nodes + 1, 4 * s.num_nodes + 1):
        if _fits(shape, dataclasses.replace(s, num_nodes=nodes), gpu_memory):
            out.append(f"-P num_nodes={nodes} (more GPUs: {nodes * s.gpus_per_node})")
            break
    return out


def choose(shape: ModelShape, s: Setting, gpu_memory: int, largest: int = 64,
           enough_tokens: int = 4096) -> Setting | None:
    """The setting to train `shape` with on GPUs of `gpu_memory` bytes (offload as in `s`): the
    largest power-of-two micro-batch (<= `largest`) without gradient checkpointing when it holds
    at least `enough_tokens` tokens (micro-batch x seq_len; enough to keep a 4096-wide model's
    matmuls large, an assumption bench/gpu_check.py measures), else the largest with
    checkpointing if that is larger. None when a micro-batch of 1 does not fit."""
    best = {}
    for ckpt in (False, True):
        b = largest
        while b >= 1 and not _fits(shape, dataclasses.replace(
                s, micro_batch=b, gradient_checkpointing=ckpt), gpu_memory):
            b //= 2
        best[ckpt] = b
    if best[True] < 1:
        return None
    ckpt = best[False] * s.seq_len < enough_tokens and best[True] > best[False]
    return dataclasses.replace(s, micro_batch=best[ckpt], gradient_checkpointing=ckpt)


# -------------------------------------------------------------------------- the model shape ---

def model_config(cfg: Config):
    """(transformers config, where it came from) for `cfg.base_model`, reading no weights.

    Raises DollyError when the config cannot be found.
    """
    from transformers import AutoConfig, GPTJConfig

    name = cfg.base_model
    if name == TINY_BASE_MODEL:
        vocab = cfg.tokenizer_vocab_size if cfg.tokenizer == CORPUS_BPE else GPTJ_VOCAB_WITH_MARKERS
        return GPTJConfig(vocab_size=vocab, n_positions=cfg.tiny_n_positions,
                          n_embd=cfg.tiny_n_embd, n_layer=cfg.tiny_n_layer,
                          n_head=cfg.tiny_n_head, rotary_dim=cfg.tiny_rotary_dim,
                          tie_word_embeddings=cfg.tiny_tie_embeddings, bos_token_id=None,
                          eos_token_id=None), "tiny-gptj (tiny_* fields)"
    if name in TINY_BASES:  # the other tiny bases (tiny-llama): the config dolly.models.tiny builds
        from dolly.models.tiny import tiny_config

        vocab = cfg.tokenizer_vocab_size if cfg.tokenizer == CORPUS_BPE else GPTJ_VOCAB_WITH_MARKERS
        return tiny_config(cfg, _Vocabulary(vocab)), f"{name} (tiny_* fields)"
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise DollyError(f"base_model '{name}' has no config.json")
        return AutoConfig.from_pretrained(name, trust_remote_code=cfg.trust_remote_code), \
            f"{name}/config.json"
    try:  # the Hugging Face cache first: no network
        return AutoConfig.from_pretrained(name, local_files_only=True,
                                          trust_remote_code=cfg.trust_remote_code), \
            f"{name} (config.json from the Hugging Face cache)"
    except Exception:
        pass
    known = known_config(name)
    if known is not None:
        return known, f"{name} (config.json values shipped in dolly/train/{KNOWN_CONFIGS.name}/)"
    if any(k in name.lower() for k in GPTJ_FAMILY):
        return GPTJConfig(), f"{name} (offline: GPT-J 6B's shape, transformers' GPTJConfig())"
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=cfg.trust_remote_code), \
            f"{name} (config.json from the Hub)"
    except Exception as e:
        raise DollyError(f"cannot read the config of base_model '{name}': "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


class _Vocabulary:
    """What dolly.models.tiny.tiny_config reads of a tokenizer: its size (no special ids)."""

    bos_token_id = eos_token_id = pad_token_id = None

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def known_config(hub_id: str):
    """The transformers config of a Hub id whose config.json values ship with dolly
    (known_configs/<org>--<name>.json, matched without regard to case), else None."""
    from transformers import AutoConfig

    wanted = hub_id.strip("/").replace("/", "--").lower() + ".json"
    for path in sorted(KNOWN_CONFIGS.glob("*.json")):
        if path.name.lower() == wanted:
            fields = {k: v for k, v in json.loads(path.read_text()).items()
                      if not k.startswith("_")}
            return AutoConfig.for_model(fields.pop("model_type"), **fields)
    return None


def _attr(config, *names: str, default=None):
    """The first of `names` the config sets (configs name one size differently)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def shape_of(config, source: str = "") -> ModelShape:
    """Count a config's parameters on the meta device (no memory, no weights) and read the sizes
    the activation count needs from its attributes (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    distinct = {id(p): p.numel() for p in model.parameters()}
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    out = model.get_output_embeddings()
    vocab = out.weight.shape[0] if out is not None else config.vocab_size
    hidden = int(_attr(config, "hidden_size", "n_embd"))
    n_head = int(_attr(config, "num_attention_heads", "n_head"))
    model_type = getattr(config, "model_type", "")
    block = {"gptj": "gptj", "gpt_neox": "neox"}.get(model_type, "prenorm")
    names = [name.rsplit(".", 1)[-1] for name, _ in model.named_modules()]
    return ModelShape(
        sum(distinct.values()), largest, int(_attr(config, "num_hidden_layers", "n_layer")),
        hidden, n_head, int(vocab), source, block=block,
        n_kv_head=int(_attr(config, "num_key_value_heads", default=n_head)),
        head_dim=int(_attr(config, "head_dim", default=hidden // n_head)),
        intermediate=int(_attr(config, "intermediate_size", "n_inner", default=4 * hidden)),
        gated_mlp=any(n in ("gate_proj", "gate_up_proj") for n in names),
        parallel=bool(getattr(config, "use_parallel_residual", block == "gptj")),
        rms_norm=any(type(m).__name__.endswith("RMSNorm") for m in model.modules()),
        sdpa=model.config._attn_implementation == "sdpa",
        qk_norm="q_norm" in names and "k_norm" in names)


def model_shape(cfg: Config) -> ModelShape:
    """The shape of the profile's model, from its config.json (no weights) or the tiny_* fields."""
    config, source = model_config(cfg)
    return shape_of(config, source)


# ------------------------------------------------------------------------- from the config ----

def visible_gpu() -> tuple[int, int]:
    """(visible GPUs, bytes of the first one's memory); (0, 0) without CUDA."""
    try:
        import torch
    except ImportError:
        return 0, 0
    if not torch.cuda.is_available():
        return 0, 0
    return torch.cuda.device_count(), int(torch.cuda.get_device_properties(0).total_memory)


def setting_of(cfg: Config, gpus_per_node: int, seq_len: int | None = None) -> Setting:
    """The profile's training setting (micro-batch, sequence length in tokens, precision,
    checkpointing, offload) for `gpus_per_node` ranks per node."""
    precision = "bf16" if cfg.precision == "auto" else cfg.precision
    return Setting(micro_batch=cfg.per_device_batch_size, seq_len=seq_len or cfg.max_length,
                   precision=precision, gradient_checkpointing=cfg.gradient_checkpointing,
                   offload_optimizer=cfg.offload_optimizer, offload_params=cfg.offload_params,
                   gpus_per_node=gpus_per_node, num_nodes=cfg.num_nodes,
                   gradient_accumulation_steps=cfg.gradient_accumulation_steps)


def plan_for(cfg: Config, gpus_per_node: int | None = None, seq_len: int | None = None,
             shape: ModelShape | None = None, prefer_visible: bool = False) -> MemoryPlan:
    """The plan of `cfg`: GPUs per node from the argument, `num_gpus`, the visible GPUs or 8;
    GPU memory from `gpu_memory_gb` or the visible GPU (the visible GPU first with
    `prefer_visible`); `seq_len` defaults to `max_length`."""
    notes = []
    visible, visible_bytes = visible_gpu()
    if (gpus_per_node is None and not visible and cfg.num_gpus <= 0 and cfg.gpu_memory_gb <= 0
            and cfg.precision in ("auto", "fp32")):
        # A CPU profile (the tiny ones) on a machine without GPUs: the train step runs
        # cpu_ranks fp32 processes on this machine, which share its memory.
        import dataclasses as _dc

        ranks = cfg.cpu_ranks
        shape = shape or model_shape(cfg)
        setting = _dc.replace(setting_of(cfg, ranks, seq_len), precision="fp32")
        plan = make_plan(shape, setting, host_memory() // ranks, [
            f"no GPU visible and none planned for: {ranks} CPU ranks (cpu_ranks) in fp32 on "
            "this machine, as the train step runs them (-P num_gpus=N -P gpu_memory_gb=G plans "
            "GPUs instead)"], suggest=False)
        plan.device = "CPU rank"
        return plan
    if gpus_per_node is None:
        if cfg.num_gpus > 0:
            gpus_per_node = cfg.num_gpus
        elif visible:
            gpus_per_node = visible
        else:
            gpus_per_node = DEFAULT_GPUS_PER_NODE
            notes.append(f"no GPU visible: planned for {gpus_per_node} GPUs per node "
                         "(-P num_gpus=N to change)")
    if visible_bytes and (prefer_visible or cfg.gpu_memory_gb <= 0):
        gpu_memory = visible_bytes
    elif cfg.gpu_memory_gb > 0:
        gpu_memory = int(cfg.gpu_memory_gb * GIB)
    else:
        gpu_memory = None
    if cfg.precision == "auto":
        notes.append("precision auto: planned as bf16 (fp16 needs the same memory)")
    if seq_len is None:
        notes.append(f"sequence length = max_length {cfg.max_length} (the longest batch a "
                     "length-grouped run can meet)")
    shape = shape or model_shape(cfg)
    if shape.block != "gptj" and shape.sdpa:
        notes.append("activations of a micro-batch with padding: SDPA gets a mask (an s x s "
                     "bias per layer; key/value repeated to all heads)")
    return make_plan(shape, setting_of(cfg, gpus_per_node, seq_len), gpu_memory, notes)


def host_memory() -> int:
    """Bytes of this machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def require_fit(cfg: Config, gpus_per_node: int, seq_len: int | None = None) -> MemoryPlan:
    """Run the plan on a GPU machine before any weight loads; raise a one-line DollyError when
    it cannot fit on the visible GPU (or its offload does not fit this node's memory).

    `gpus_per_node`: the ranks this node starts; `seq_len`: the longest prepared record
    (prepared summary `token_lengths.max`), default `max_length`. The GPU's memory is the
    visible GPU's (the profile's `gpu_memory_gb` only where none is visible). `plan_check=false`
    turns the error into a printed warning. Returns the plan.
    """
    plan = plan_for(cfg, gpus_per_node, seq_len, prefer_visible=True)
    problem = None
    if plan.fits is False:
        problem = plan.verdict().removeprefix("verdict: ")
    elif plan.cpu_per_node > host_memory() and (cfg.offload_optimizer or cfg.offload_params):
        problem = (f"does not fit: offload needs {_gib(plan.cpu_per_node)} of CPU memory per node, "
                   f"this node has {_gib(host_memory())}; turn: more nodes (-P num_nodes=N) or "
                   "less offload")
    if problem:
        message = f"memory plan: {problem} (-P plan_check=false to try anyway)"
        if cfg.plan_check:
            raise DollyError(message)
        print(f"warning: {message}", flush=True)
    return plan
