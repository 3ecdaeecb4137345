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
  hidden size, a = attention heads) count them, redone for Hugging Face's GPT-J block (eager
  attention; it has no SDPA path): `56*s*b*h + 6*a*s^2*b` bytes per layer. 56 = residual input 2
  + LayerNorm output 2 (shared by attention and MLP: GPT-J's block is parallel) + query and key
  upcast to fp32 8 + value 2 + attention output 2 + MLP (h -> 4h: fc_in output and the four
  tensors of `gelu_new`'s tanh formula 32, fc_out input 8); 6*a*s^2 = fp32 softmax output 4 + its
  16-bit copy 2 (no dropout mask: GPT-J's dropout is 0). tests/train/test_memory_plan.py checks this
  against the tensors autograd actually saves. Without recomputation a step keeps `L` layers;
  with gradient checkpointing (Korthikanti et al. section 4, full recomputation) it keeps each
  layer's 16-bit input, `2*s*b*h*L`, plus one layer's activations while that layer is
  recomputed. fp32 training doubles every term.
- **Logits**: `b*s*V*10` bytes (V = vocabulary rows): the 16-bit logits (2), the fp32 copy
  transformers' causal-LM loss makes (4) and the fp32 log-softmax cross-entropy keeps (4).

A GPU fits when the sum is at most `(1 - RESERVE_FRACTION)` of its memory: the reserve covers the
CUDA context, NCCL buffers, ZeRO-3's prefetch and reduce buckets beyond DeepSpeed's estimate and
allocator fragmentation (a planning margin, not a measurement).

The model's shape comes from its config.json (a local folder, the Hugging Face cache, or, for a
Hub id of the GPT-J family when offline, transformers' `GPTJConfig()` defaults, which are GPT-J
6B's) or from the tiny_* fields; parameters are counted on the meta device: no weights are read.
This module imports torch, transformers and DeepSpeed only inside its functions.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from dolly.config import CORPUS_BPE, TINY_BASE_MODEL, Config
from dolly.errors import DollyError

GIB = 2**30
RESERVE_FRACTION = 0.10
DEFAULT_GPUS_PER_NODE = 8  # assumed by the plan command when none is visible and none is given
GPTJ_VOCAB_WITH_MARKERS = 50_257 + 3  # GPT-2's BPE + Dolly's three markers (the tiny model's size)
# Hub ids whose config is GPT-J 6B's (offline fallback): the GPT-J family and Dolly v1.
GPTJ_FAMILY = ("gpt-j", "gptj", "dolly-v1-6b")


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about a causal LM; counts are elements, not bytes."""

    n_params: int              # distinct parameters (a tied weight counts once)
    largest_layer_params: int  # the largest module's own parameters (DeepSpeed's "largest layer")
    n_layer: int
    hidden: int
    n_head: int
    vocab: int                 # rows of the output embedding (logits per token)
    source: str = ""           # where the shape came from


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
        head = (f"each of the {s.world} GPUs needs {_gib(self.need)} of {_gib(self.usable)} usable "
                f"({_gib(self.gpu_memory)} less {RESERVE_FRACTION:.0%} reserve)")
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
        return [
            f"model: {m.source}: {m.n_params:,} parameters, largest layer "
            f"{m.largest_layer_params:,}, {m.n_layer} layers x {m.hidden} wide, {m.n_head} heads, "
            f"vocabulary {m.vocab:,}",
            f"setup: {s.num_nodes} node(s) x {s.gpus_per_node} GPU(s), {s.precision}, micro-batch "
            f"{s.micro_batch} x {s.seq_len} tokens, gradient checkpointing {ckpt}, offload {offload}",
            f"model states per GPU (DeepSpeed ZeRO-3 estimate): {_gib(self.model_states)}",
            f"activations per GPU: {_gib(self.activations_no_ckpt)} without gradient "
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


def layer_activation_bytes(shape: ModelShape, b: int, s: int, precision: str) -> int:
    """Bytes one GPT-J layer keeps for backward: 56*s*b*h + 6*a*s^2*b (x2 in fp32); see above."""
    scale = 2 if precision == "fp32" else 1
    return scale * (56 * s * b * shape.hidden + 6 * shape.n_head * s * s * b)


def activation_bytes(shape: ModelShape, b: int, s: int, precision: str,
                     checkpointing: bool) -> int:
    """Activation bytes per GPU for a micro-batch of `b` sequences of `s` tokens."""
    layer = layer_activation_bytes(shape, b, s, precision)
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
    if any(k in name.lower() for k in GPTJ_FAMILY):
        return GPTJConfig(), f"{name} (offline: GPT-J 6B's shape, transformers' GPTJConfig())"
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=cfg.trust_remote_code), \
            f"{name} (config.json from the Hub)"
    except Exception as e:
        raise DollyError(f"cannot read the config of base_model '{name}': "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def shape_of(config, source: str = "") -> ModelShape:
    """Count a config's parameters on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    distinct = {id(p): p.numel() for p in model.parameters()}
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    out = model.get_output_embeddings()
    vocab = out.weight.shape[0] if out is not None else config.vocab_size
    return ModelShape(sum(distinct.values()), largest, int(config.num_hidden_layers),
                      int(config.hidden_size), int(config.num_attention_heads), int(vocab), source)


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
