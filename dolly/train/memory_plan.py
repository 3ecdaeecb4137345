"""Will this profile fit? GPU and CPU memory of a ZeRO-3 fine-tune (or of LoRA / QLoRA adapters
trained data-parallel), planned before any weight loads.

Per GPU the plan of `finetune=full` adds three parts (bytes; `finetune=lora|qlora` below):

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

**LoRA and QLoRA** (`finetune=lora|qlora`; Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models"; Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs") train
plain data parallel (DDP, no DeepSpeed, no offload): every GPU holds the whole frozen base. The
adapted layers are `lora_target_modules`' linear layers: `all-linear` is every nn.Linear (and
Conv1D) of the model but the LM head (peft's rule), other names match a module path equal to the
name or ending in `.name` (peft's match); each adapted layer (in x out) trains A (r x in) and
B (out x r), `r*(in+out)` parameters. Per GPU:

- **Frozen base**: lora, every parameter in 16 bits (2 bytes; fp32 4). qlora: the linear layers
  but the LM head (those transformers' bitsandbytes integration quantizes) in 4-bit NF4 with
  double quantization, `n/2` bytes plus one 8-bit absmax per 64 weights plus one fp32 constant
  per 256 absmax values (4 + 8/64 + 32/(64*256) = 4.127 bits per weight: QLoRA section 3,
  "Double Quantization"; bitsandbytes' blocksizes 64 and 256); every other parameter
  (embeddings, LM head, norms, biases) in fp32: peft 0.21.2's prepare_model_for_kbit_training,
  which the qlora path calls, casts every 16-bit parameter that is not 4-bit to fp32.
- **Adapters**: 16 bytes per trainable parameter (fp32 weights: get_peft_model's default
  `autocast_adapter_dtype=True`, which dolly keeps, upcasts bf16/fp16 adapter weights to fp32;
  fp32 gradients; AdamW's two fp32 moments), 4 more for DDP's gradient buckets when there is more
  than one rank (a flat copy of the gradients), and 2 more in a 16-bit run for the 16-bit copies
  autocast makes of them (without DeepSpeed the Trainer runs bf16/fp16 through accelerate, which
  wraps the forward in torch.autocast).
- **Activations**: the block counts above, less what a frozen base does not keep and plus the
  LoRA path. A frozen linear layer keeps none of its input (autograd keeps a matmul's input only
  for its weight's gradient; bitsandbytes' MatMul4Bit keeps only the packed weight), so the
  layer-norm outputs, the MLP activation's output and GPT-J's / GPT-NeoX's attention output are
  no longer kept for the projections (SDPA still keeps its own output), nor the normalised tensor
  an RMSNorm (and Qwen3's per-head q/k norms) keeps for its weight. Each adapted layer adds the
  r-wide tensor lora_B reads (2*r bytes per token) and the input lora_A reads: in a 16-bit run
  peft casts the layer's input to the fp32 adapter's dtype and autocast casts it back to 16 bits
  for lora_A's matmul, a fresh copy per adapted layer (2*in bytes per token, not shared with the
  base layer nor with the other projections reading the same tensor); in fp32 lora_A keeps the
  tensor the base layer read (4*width once per tensor). `lora_dropout` > 0 adds its mask per
  adapted layer (1 byte per input element on CUDA, PyTorch's fused kernel's bool mask; 4 on CPU,
  an fp32 noise tensor), and in fp32 lora_A then keeps the dropout's output (4*in) instead.
  Checkpointing keeps each layer's input as for full fine-tuning, plus the largest layer.
  tests/train/test_memory_plan.py checks the difference to full fine-tuning per layer against the
  tensors autograd keeps in peft models on CPU (bf16 under CPU autocast, and fp32): GPT-J,
  Llama (SDPA and eager), Qwen3 and GPT-NeoX, all-linear and named subsets, with and without
  dropout, equal to the byte. Not checked: CUDA autocast runs some ops in fp32 that CPU
  autocast leaves in bf16 (layer_norm, softmax, pow: GPT-J's and GPT-NeoX's norms, GPT-J's
  gelu_new), which changes the base counts (derived without autocast, as DeepSpeed runs) of a
  16-bit LoRA run on GPUs.
  qlora (not checked here: bitsandbytes' 4-bit layers need CUDA): the embedding in fp32 makes the
  residual stream fp32 and bitsandbytes' Linear4bit returns its output in its input's dtype, so
  the plan counts each block at its fp32 count (an upper bound) with the 16-bit LoRA path, and
  fp32 layer inputs under checkpointing (4*s*b*h*L).
- **Logits** as above.

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
The built model also lists its linear layers (what lora/qlora adapt and qlora quantizes).
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
    # (module path, in, out) of every linear layer but the LM head, as the built model names
    # them; () = the layout's own (`block_linears`)
    linears: tuple[tuple[str, int, int], ...] = ()

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden // self.n_head

    @property
    def mlp_width(self) -> int:
        return self.intermediate or 4 * self.hidden

    def block_linears(self) -> tuple[tuple[str, int, int], ...]:
        """(module path, in, out) of every linear layer but the LM head: the built model's
        (`linears`), else the layout's, `layers.<i>.<name>`: GPT-J q_proj, k_proj, v_proj,
        out_proj, fc_in, fc_out; GPT-NeoX query_key_value, dense, dense_h_to_4h, dense_4h_to_h;
        pre-norm q_proj, k_proj, v_proj, o_proj, gate_proj (gated MLP), up_proj, down_proj."""
        if self.linears:
            return self.linears
        h, q, kv, i = (self.hidden, self.n_head * self.head_size,
                       self.kv_heads * self.head_size, self.mlp_width)
        if self.block == "gptj":
            block = [("q_proj", h, h), ("k_proj", h, h), ("v_proj", h, h), ("out_proj", h, h),
                     ("fc_in", h, i), ("fc_out", i, h)]
        elif self.block == "neox":
            block = [("query_key_value", h, 3 * h), ("dense", h, h), ("dense_h_to_4h", h, i),
                     ("dense_4h_to_h", i, h)]
        else:
            block = [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h),
                     *([("gate_proj", h, i)] if self.gated_mlp else []), ("up_proj", h, i),
                     ("down_proj", i, h)]
        return tuple((f"layers.{n}.{name}", fan_in, fan_out) for n in range(self.n_layer)
                     for name, fan_in, fan_out in block)

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
    finetune: str = "full"     # full (DeepSpeed ZeRO-3) | lora | qlora (peft adapters, DDP)
    lora_r: int = 16
    lora_targets: str = "all-linear"  # lora_target_modules
    lora_dropout: float = 0.0
    on_cpu: bool = False       # CPU ranks (dropout keeps a noise tensor, not CUDA's bool mask)

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.num_nodes

    @property
    def adapters(self) -> bool:
        return self.finetune != "full"


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
    # finetune lora / qlora (model_states is then their sum): the frozen base on every GPU, the
    # adapters' weights, gradients, AdamW states (and DDP buckets), their parameters and layers
    base_weights: int = 0
    adapter_states: int = 0
    adapter_params: int = 0
    adapted_layers: int = 0

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
            "offload, or use GPUs with more memory") if not s.adapters else (
            "no single change fits: combine gradient checkpointing, a smaller micro-batch and "
            "finetune=qlora, train every weight with finetune=full (ZeRO-3 partitions it "
            "across GPUs), or use GPUs with more memory")
        return f"verdict: does not fit: {head}; turn: {turn}"

    def lines(self) -> list[str]:
        s, m = self.setting, self.shape
        offload = ("optimizer+params" if s.offload_optimizer and s.offload_params else
                   "optimizer" if s.offload_optimizer else "params" if s.offload_params else "none")
        ckpt = "on" if s.gradient_checkpointing else "off"
        per = "GPU" if self.device == "GPU" else "CPU rank"
        activations = (f"activations per {per}: {_gib(self.activations_no_ckpt)} without gradient "
                       f"checkpointing, {_gib(self.activations_ckpt)} with it (after Korthikanti "
                       f"et al. 2022{'; frozen base, LoRA path' if s.adapters else ''}); "
                       f"logits and loss {_gib(self.logits)}")
        setup = (f"setup: {s.num_nodes} node(s) x {s.gpus_per_node} {per}(s), {s.precision}, "
                 f"micro-batch {s.micro_batch} x {s.seq_len} tokens, gradient checkpointing {ckpt}")
        if not s.adapters:
            return [
                f"model: {m.source}: {m.describe()}",
                f"{setup}, offload {offload}, finetune full (every weight, DeepSpeed ZeRO-3)",
                f"model states per {per} (DeepSpeed ZeRO-3 estimate): {_gib(self.model_states)}",
                activations,
                f"CPU memory per node (DeepSpeed estimate, offload {offload}): "
                f"{_gib(self.cpu_per_node)}",
                *[f"note: {n}" for n in self.notes],
                self.verdict(),
            ]
        base = ("16-bit" if s.precision != "fp32" else "fp32") if s.finetune == "lora" else (
            "4-bit NF4 linear layers with double-quantized constants; embeddings, LM head, "
            "norms and biases fp32, as peft's prepare_model_for_kbit_training leaves them")
        kept = "weights, gradients, AdamW moments" + (
            ", DDP gradient buckets" if s.world > 1 else "") + (
            ", 16-bit autocast copies" if s.precision != "fp32" else "")
        return [
            f"model: {m.source}: {m.describe()}",
            f"{setup}, finetune {s.finetune} (LoRA r={s.lora_r} on {self.adapted_layers} linear "
            f"layers, {s.lora_targets}; plain data parallel: every {per} holds the whole frozen "
            "base; no DeepSpeed, no offload)",
            f"frozen base per {per} ({base}): {_gib(self.base_weights)}",
            f"adapters per {per}: {self.adapter_params:,} trainable parameters, fp32 ({kept}): "
            f"{_gib(self.adapter_states)}",
            activations,
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


# ------------------------------------------------------------------ LoRA and QLoRA adapters ---

# The tensor each linear layer of a block reads, by the layer's last name: the layer norm's output
# (norm; norm1, norm2 of a block with two), the attention output (attn) or the MLP activation's
# output (act). A frozen layer saves none of them for backward; a name not listed is planned as
# reading a tensor of its own.
_READS = {
    "gptj": {"q_proj": "norm", "k_proj": "norm", "v_proj": "norm", "fc_in": "norm",
             "out_proj": "attn", "fc_out": "act"},
    "prenorm": {"q_proj": "norm1", "k_proj": "norm1", "v_proj": "norm1", "qkv_proj": "norm1",
                "o_proj": "attn", "gate_proj": "norm2", "up_proj": "norm2",
                "gate_up_proj": "norm2", "down_proj": "act"},
    "neox": {"query_key_value": "norm1", "dense": "attn", "dense_h_to_4h": "norm2",
             "dense_4h_to_h": "act"},
}
NF4_BLOCK = 64     # weights per fp32 absmax (bitsandbytes' 4-bit blocksize; QLoRA section 3)
NF4_BLOCK2 = 256   # absmax values per second-level fp32 constant (double quantization)


def _group_width(shape: ModelShape, group: str) -> int:
    return {"attn": shape.n_head * shape.head_size, "act": shape.mlp_width}.get(group,
                                                                               shape.hidden)


def _kept_anyway(shape: ModelShape, group: str) -> bool:
    """SDPA keeps its output for backward: the o projection's input is saved frozen or not."""
    return shape.block == "prenorm" and group == "attn" and shape.sdpa


def adapted_layers(shape: ModelShape, targets: str) -> tuple[tuple[str, int, int], ...]:
    """(module path, in, out) of the linear layers `lora_target_modules` adapts: every linear
    layer but the LM head for `all-linear` (peft's rule), else those whose path is a name or ends
    with `.name` (peft's match). Raises DollyError when the names match no linear layer."""
    linears = shape.block_linears()
    if targets.strip() == "all-linear":
        return linears
    names = [t.strip() for t in targets.split(",") if t.strip()]
    out = tuple(layer for layer in linears
                if any(layer[0] == n or layer[0].endswith("." + n) for n in names))
    if not out:
        own = sorted({path.rsplit(".", 1)[-1] for path, _, _ in linears})
        raise DollyError(f"config key 'lora_target_modules': {targets!r} names no linear layer "
                         f"of {shape.source or 'the model'} (its linear layers: {', '.join(own)})")
    return out


def adapter_param_count(layers, r: int) -> int:
    """Trainable LoRA parameters: A (r x in) and B (out x r) per adapted layer, r*(in+out)."""
    return sum(r * (fan_in + fan_out) for _, fan_in, fan_out in layers)


def nf4_bytes(n: int) -> int:
    """Bytes of `n` weights in bitsandbytes' 4-bit NF4 with double quantization: two weights per
    byte, one 8-bit absmax per 64 weights and one fp32 constant per 256 absmax values
    (4 + 8/64 + 32/(64*256) = 4.127 bits per weight; Dettmers et al. 2023, section 3)."""
    blocks = -(-n // NF4_BLOCK)
    return -(-n // 2) + blocks + 4 * -(-blocks // NF4_BLOCK2)


def base_weight_bytes(shape: ModelShape, finetune: str, precision: str) -> int:
    """The frozen base on each GPU: every parameter in 16 bits (fp32: 4 bytes) for lora; for qlora
    the linear layers but the LM head in NF4 (`nf4_bytes`) and every other parameter
    (embeddings, LM head, norms, biases) in fp32, as peft's prepare_model_for_kbit_training
    leaves them."""
    if finetune != "qlora":
        return shape.n_params * (4 if precision == "fp32" else 2)
    quantized = [fan_in * fan_out for _, fan_in, fan_out in shape.block_linears()]
    return sum(nf4_bytes(n) for n in quantized) + 4 * (shape.n_params - sum(quantized))


def adapter_state_bytes(params: int, precision: str, world: int) -> int:
    """The adapters' fp32 weights (peft upcasts them), gradients and AdamW moments: 16 bytes per
    parameter; DDP's gradient buckets (world > 1) 4 more; in a 16-bit run the 16-bit copies of
    the weights autocast makes for the forward pass, 2 more."""
    return params * (16 + (4 if world > 1 else 0) + (2 if precision != "fp32" else 0))


def _block_index(path: str) -> int | None:
    """The block a module path belongs to: its first numeric component (`model.layers.3.mlp`)."""
    return next((int(p) for p in path.split(".") if p.isdigit()), None)


def adapter_layer_bytes(shape: ModelShape, b: int, s: int, precision: str, block_linears,
                        adapted, r: int, dropout: float = 0.0, qlora: bool = False,
                        padded: bool = True, on_cpu: bool = False) -> int:
    """Bytes one block keeps for backward when its base is frozen and `adapted` (of its
    `block_linears`, (path, in, out) each) carry LoRA adapters of rank `r`; see the module
    docstring. qlora: the block's own count in fp32 (an upper bound). `on_cpu`: dropout keeps
    an fp32 noise tensor (4 bytes per element) instead of CUDA's bool mask (1)."""
    tokens = b * s
    e = 4 if qlora or precision == "fp32" else 2
    base = layer_activation_bytes(shape, b, s, "fp32" if qlora else precision, padded)
    leaf = lambda path: path.rsplit(".", 1)[-1]  # noqa: E731
    reads = _READS.get(shape.block, {})
    groups = {reads[leaf(p)] for p, _, _ in block_linears if leaf(p) in reads}
    removed = sum(_group_width(shape, g) for g in groups if not _kept_anyway(shape, g))
    if shape.block == "prenorm" and shape.rms_norm:  # the normalised tensors of both RMSNorms
        removed += 2 * shape.hidden
    if shape.qk_norm:  # the normalised query and key of the per-head RMSNorms
        removed += shape.n_head * shape.head_size + shape.kv_heads * shape.head_size
    mask = (4 if on_cpu else 1) if dropout else 0
    if qlora or precision != "fp32":  # autocast: lora_A reads a 16-bit copy of its own
        added = sum((2 + mask) * fan_in + 2 * r for _, fan_in, _ in adapted)
    else:  # fp32: lora_A saves the very tensor the base layer read (dropout: its own output)
        shared = set() if dropout else {
            reads[leaf(p)] for p, _, _ in adapted
            if leaf(p) in reads and not _kept_anyway(shape, reads[leaf(p)])}
        added = sum(4 * _group_width(shape, g) for g in shared)
        for path, fan_in, _ in adapted:
            added += 4 * r + ((4 + mask) * fan_in if dropout else 4 * fan_in
                              if leaf(path) not in reads else 0)
    return base - e * tokens * removed + tokens * added


def adapter_activation_bytes(shape: ModelShape, s: Setting, checkpointing: bool,
                             padded: bool = True) -> int:
    """Activation bytes per GPU of a lora/qlora step: every block as `adapter_layer_bytes`
    counts it without checkpointing; with it each block's input (16-bit; fp32 for qlora, whose
    embedding peft upcasts) plus the largest block."""
    qlora = s.finetune == "qlora"
    blocks: dict[int | None, list] = {}
    adapted: dict[int | None, list] = {}
    for layer in shape.block_linears():
        blocks.setdefault(_block_index(layer[0]), []).append(layer)
    for layer in adapted_layers(shape, s.lora_targets):
        adapted.setdefault(_block_index(layer[0]), []).append(layer)
    per = [adapter_layer_bytes(shape, s.micro_batch, s.seq_len, s.precision, blocks.get(i, []),
                               adapted.get(i, []), s.lora_r, s.lora_dropout, qlora, padded,
                               s.on_cpu)
           for i in range(shape.n_layer)]
    if not checkpointing:
        return sum(per)
    kept = 4 if qlora or s.precision == "fp32" else 2
    return kept * s.seq_len * s.micro_batch * shape.hidden * shape.n_layer + max(per)


def _adapter_plan(shape: ModelShape, s: Setting, gpu_memory: int | None,
                  notes: list[str]) -> MemoryPlan:
    layers = adapted_layers(shape, s.lora_targets)
    params = adapter_param_count(layers, s.lora_r)
    base = base_weight_bytes(shape, s.finetune, s.precision)
    states = adapter_state_bytes(params, s.precision, s.world)
    no_ckpt = adapter_activation_bytes(shape, s, False)
    ckpt = adapter_activation_bytes(shape, s, True)
    plan = MemoryPlan(shape, s, gpu_memory, base + states, 0,
                      ckpt if s.gradient_checkpointing else no_ckpt, no_ckpt, ckpt,
                      logits_bytes(shape, s.micro_batch, s.seq_len, s.precision), notes=notes,
                      base_weights=base, adapter_states=states, adapter_params=params,
                      adapted_layers=len(layers))
    if s.offload_optimizer or s.offload_params:
        plan.notes.append("offload_optimizer / offload_params are ZeRO-3 settings: adapters "
                          "train without DeepSpeed, so they are ignored")
    return plan


def make_plan(shape: ModelShape, s: Setting, gpu_memory: int | None,
              notes: list[str] | None = None, suggest: bool = True) -> MemoryPlan:
    """The plan of `shape` under setting `s` on GPUs of `gpu_memory` bytes (None = unknown)."""
    if s.adapters:
        plan = _adapter_plan(shape, s, gpu_memory, list(notes or []))
        if suggest and plan.fits is False:
            plan.fixes = _adapter_fixes(shape, s, gpu_memory, plan)
        return plan
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


def _cheap_fixes(shape: ModelShape, s: Setting, gpu_memory: int) -> list[str]:
    """The fixes that keep the setup: gradient checkpointing, then a smaller micro-batch (each
    alone)."""
    out = []
    if not s.gradient_checkpointing and _fits(
            shape, dataclasses.replace(s, gradient_checkpointing=True), gpu_memory):
        out.append("-P gradient_checkpointing=true")
    smaller = _smaller_batch(shape, s, gpu_memory)
    if smaller:
        out.append(smaller)
    return out


def _fixes(shape: ModelShape, s: Setting, gpu_memory: int) -> list[str]:
    """Single changes that make the plan fit, cheapest in throughput first."""
    out = _cheap_fixes(shape, s, gpu_memory)
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


def _smaller_batch(shape: ModelShape, s: Setting, gpu_memory: int) -> str | None:
    """`-P per_device_batch_size=b` (and the accumulation steps that keep the batch) for the
    largest halved micro-batch that fits, else None."""
    b = s.micro_batch // 2
    while b >= 1:
        if _fits(shape, dataclasses.replace(s, micro_batch=b), gpu_memory):
            gas = s.gradient_accumulation_steps * s.micro_batch / b
            keep = (f" -P gradient_accumulation_steps={int(gas)}" if gas.is_integer() else "")
            return f"-P per_device_batch_size={b}{keep}"
        b //= 2
    return None


def _fit_with(shape: ModelShape, s: Setting, gpu_memory: int) -> Setting | None:
    """`s` if it fits, else with gradient checkpointing, else that with the largest halved
    micro-batch that fits (None when a micro-batch of 1 does not)."""
    for setting in (s, dataclasses.replace(s, gradient_checkpointing=True)):
        if _fits(shape, setting, gpu_memory):
            return setting
    b = s.micro_batch // 2
    while b >= 1:
        setting = dataclasses.replace(s, gradient_checkpointing=True, micro_batch=b)
        if _fits(shape, setting, gpu_memory):
            return setting
        b //= 2
    return None


def _changes(old: Setting, new: Setting) -> str:
    """The -P overrides that turn setting `old` into `new` (accumulation steps keep the batch)."""
    out = [f"-P finetune={new.finetune}"] if new.finetune != old.finetune else []
    if new.gradient_checkpointing and not old.gradient_checkpointing:
        out.append("-P gradient_checkpointing=true")
    if new.micro_batch != old.micro_batch:
        gas = old.gradient_accumulation_steps * old.micro_batch / new.micro_batch
        out.append(f"-P per_device_batch_size={new.micro_batch}" + (
            f" -P gradient_accumulation_steps={int(gas)}" if gas.is_integer() else ""))
    if new.gpus_per_node != old.gpus_per_node:
        out.append(f"-P num_gpus={new.gpus_per_node}")
    if new.num_nodes != old.num_nodes:
        out.append(f"-P num_nodes={new.num_nodes}")
    return " ".join(out)


def _adapter_fixes(shape: ModelShape, s: Setting, gpu_memory: int,
                   plan: MemoryPlan) -> list[str]:
    """Changes that make a lora/qlora plan fit: checkpointing, a smaller micro-batch, then (lora)
    the base in 4-bit, then, when the frozen base alone is over the GPU, every weight trained
    with ZeRO-3, which partitions it across GPUs (each with the checkpointing and micro-batch it
    needs)."""
    out = _cheap_fixes(shape, s, gpu_memory)
    if not out:  # neither alone: both together
        both = _fit_with(shape, s, gpu_memory)
        if both is not None:
            out.append(_changes(s, both))
    if s.finetune == "lora":
        q = _fit_with(shape, dataclasses.replace(s, finetune="qlora"), gpu_memory)
        if q is not None:
            out.append(f"{_changes(s, q)} (the base in 4-bit NF4: "
                       f"{_gib(base_weight_bytes(shape, 'qlora', s.precision))} instead of "
                       f"{_gib(plan.base_weights)})")
    if plan.base_weights >= int(gpu_memory * (1 - RESERVE_FRACTION)):
        gpus = sorted({s.gpus_per_node, *(g for g in (2, 4, 8) if g > s.gpus_per_node)})
        tries = [(g, s.num_nodes) for g in gpus] + [
            (gpus[-1], n) for n in range(s.num_nodes + 1, 4 * s.num_nodes + 1)]
        for g, n in tries:
            try:
                full = _fit_with(shape, dataclasses.replace(s, finetune="full", gpus_per_node=g,
                                                            num_nodes=n), gpu_memory)
            except DollyError:  # no DeepSpeed here to estimate ZeRO-3's model states
                break
            if full is not None:
                out.append(f"{_changes(s, full)} (every weight, DeepSpeed ZeRO-3 partitions "
                           f"them across {g * n} GPUs: the frozen {s.finetune} base alone, "
                           f"{_gib(plan.base_weights)}, is over one GPU)")
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
    linears = tuple(  # nn.Linear (and GPT-2's Conv1D, weight in x out) but the LM head
        (name, m.in_features, m.out_features) if isinstance(m, torch.nn.Linear)
        else (name, m.weight.shape[0], m.nf)
        for name, m in model.named_modules()
        if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") and m is not out)
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
        qk_norm="q_norm" in names and "k_norm" in names, linears=linears)


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
                   gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                   finetune=cfg.finetune, lora_r=cfg.lora_r,
                   lora_targets=cfg.lora_target_modules.strip(), lora_dropout=cfg.lora_dropout)


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
        setting = _dc.replace(setting_of(cfg, ranks, seq_len), precision="fp32", on_cpu=True)
        plan = make_plan(shape, setting, host_memory() // ranks, [
            f"no GPU visible and none planned for: {ranks} CPU ranks (cpu_ranks) in fp32 on "
            "this machine, as the train step runs them (-P num_gpus=N -P gpu_memory_gb=G plans "
            "GPUs instead)"], suggest=False)
        plan.device = "CPU rank"
        if cfg.finetune == "qlora":
            plan.notes.append("finetune=qlora needs a CUDA GPU (bitsandbytes' 4-bit kernels): "
                              "the train step refuses it on CPU ranks")
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
    elif (not cfg.adapters and plan.cpu_per_node > host_memory()
          and (cfg.offload_optimizer or cfg.offload_params)):
        problem = (f"does not fit: offload needs {_gib(plan.cpu_per_node)} of CPU memory per node, "
                   f"this node has {_gib(host_memory())}; turn: more nodes (-P num_nodes=N) or "
                   "less offload")
    if problem:
        message = f"memory plan: {problem} (-P plan_check=false to try anyway)"
        if cfg.plan_check:
            raise DollyError(message)
        print(f"warning: {message}", flush=True)
    return plan
