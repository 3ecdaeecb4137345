"""Packed GPT-J rows on GPUs: attention through a variable-length (varlen) flash kernel that keeps
each record of a packed row apart.

A packed batch (dolly.data.packing) lays several records end to end in one row; each record's
`position_ids` restart at 0 and the batch has no attention mask. With eager attention,
transformers 5.17's `masking_utils.find_packed_sequence_indices` reads the restarts and builds a
block-diagonal causal mask, so records stay apart, but eager attention materialises a
`(batch, heads, seq, seq)` fp32 score tensor per layer. GPT-J's only other attention in
transformers 5.17 is `flash_attention_2` (`GPTJFlashAttention2` in
transformers/models/gptj/modeling_gptj.py), which calls `_flash_attention_forward` without
`position_ids`: a packed row is then one causal sequence and its records attend to each other.

`VarlenGPTJAttention` is a subclass of transformers' `GPTJAttention` (the eager class) that keeps
its projections and rotary embedding and replaces only the attention core (`_attn`): the queries,
keys and values of all rows are flattened to `(batch * seq, heads, head_dim)` and sent through a
varlen kernel with the segment boundaries `cu_seqlens` read from `position_ids`: every position 0
starts a segment, and so does every row (`segments`). Each segment attends causally to itself
only, which is exactly the block-diagonal mask eager attention builds for packed rows. A right-
padded batch with plain 0..T-1 positions is one segment per row: causal attention never looks
ahead, so a real token never sees the padding after it and the real positions' outputs equal
eager's (the padding's own outputs differ; they carry no label).

Exactness guard: the mask eager attention would have used (transformers' 4-D additive mask, which
GPT-J's model still builds, since its config keeps `_attn_implementation="eager"`) is compared, on
the rows of real queries (those allowed to attend to themselves), with the segments' block-causal
mask; where they differ (left padding with plain positions, a custom mask) the layer runs the
eager parent instead. The comparison and the segments are computed once per model forward (all
layers receive the same `position_ids` and mask objects) and cost one host sync.

Falls back to the eager parent (exact, slower) also with a cache (`layer_past`: generation with
`use_cache=True`), without `position_ids`, when attention weights are asked for
(`output_attentions`) and in training with attention dropout (`attn_pdrop` > 0: the kernels here
run without dropout; GPT-J's configs have 0).

Kernels (`find_kernel`, tried in this order, each probed with a tiny forward and backward at the
model's head size): `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10's flash-attention
varlen op; causal via `window_size=(-1, 0)`), then flash-attn's `flash_attn_varlen_func`
(`causal=True`). Both need CUDA and fp16/bf16 inputs: query, key and value that arrive in fp32
(an fp32 model, or layer norms upcast by peft) are cast to the autocast dtype when autocast is on,
else to bf16, and the output is cast back to the value's dtype (so an fp32 model gets bf16
attention arithmetic on this path). A kernel passed to `enable(kernel=...)` (tests: a reference
kernel on CPU) gets the tensors in their own dtype. The scale is 1/sqrt(head_dim), GPT-J's
`scale_attn`.

`calls()` counts the varlen kernel calls made by attention layers since the process started (one
per layer per forward, recomputation included): a non-zero difference proves the kernel ran.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from transformers.models.gptj.modeling_gptj import GPTJAttention

from dolly.models.labelled_loss import inner_model

# kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale, window_size) -> output:
# varlen_attn's signature; query/key/value and output (total_tokens, heads, head_dim)
KernelFn = Callable[..., torch.Tensor]
CAUSAL = (-1, 0)  # varlen_attn's window_size for causal attention (torch.nn.attention.varlen)
HALF = (torch.float16, torch.bfloat16)

_calls = 0


@dataclass(frozen=True)
class Kernel:
    """A varlen attention kernel: its name (`torch.varlen_attn`, `flash_attn_varlen_func`, or the
    injected callable's), the callable with varlen_attn's signature, and whether it takes fp16 /
    bf16 inputs only (the CUDA kernels)."""

    name: str
    fn: KernelFn
    half_only: bool = True


def calls() -> int:
    """Varlen kernel calls made by `VarlenGPTJAttention` layers in this process so far."""
    return _calls


def segments(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The segments of the flattened rows of `position_ids: (batch, seq) int` as
    `(cu_seqlens: (segments + 1,) int32, longest segment's length)`: a segment starts at every
    position 0 and at the start of every row. E.g. [[0, 1, 2, 0, 1, 0]] -> [0, 3, 5, 6], 3.
    One host sync (the boundaries' count and the longest length)."""
    batch, seq = position_ids.shape
    starts = position_ids == 0
    starts[:, 0] = True
    flat = starts.reshape(-1).nonzero().squeeze(1)
    total = torch.tensor([batch * seq], device=flat.device, dtype=flat.dtype)
    cu = torch.cat([flat, total]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max().item())


def _segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seq) int64: the index of each token's segment within its row."""
    starts = (position_ids == 0).long()
    starts[:, 0] = 1
    return starts.cumsum(1)


def masks_agree(attention_mask: torch.Tensor | None, position_ids: torch.Tensor) -> bool:
    """Whether the segments' block-causal mask equals `attention_mask` (transformers' 4-D mask,
    `(batch, 1, seq, seq)`, additive float with 0 where attention is allowed, or boolean True
    where allowed) on every query row that may attend to itself (real tokens; padding queries'
    outputs carry no label). True without a mask. One host sync."""
    if attention_mask is None:
        return True
    if attention_mask.dim() != 4 or attention_mask.shape[1] != 1:
        return False
    batch, seq = position_ids.shape
    if attention_mask.shape[-2:] != (seq, seq) or attention_mask.shape[0] not in (1, batch):
        return False
    seg = _segment_ids(position_ids).to(attention_mask.device)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=seg.device).tril()
    differ = torch.zeros((), dtype=torch.bool, device=seg.device)
    for r in range(batch):  # a row at a time: three (seq, seq) bool tensors at most
        m = attention_mask[min(r, attention_mask.shape[0] - 1), 0]
        allowed = m if m.dtype == torch.bool else m == 0                  # (seq, seq)
        ours = (seg[r, :, None] == seg[r, None, :]) & causal
        real = allowed.diagonal()                                         # (seq,) real queries
        differ |= ((ours != allowed) & real[:, None]).any()
    return not bool(differ.item())


def _version(t: torch.Tensor | None) -> int | None:
    """The tensor's in-place change counter (a tensor changed in place counts as new); None for
    no tensor and for inference-mode tensors, which keep no counter."""
    if t is None or t.is_inference():
        return None
    return t._version


class _Plan:
    """The segments of one model forward, shared by its layers: keyed on the identity of the
    `position_ids` and mask tensors every layer receives (weak references: nothing kept alive)."""

    def __init__(self):
        self.key: tuple = ()
        self.value: tuple[torch.Tensor, int] | None = None

    def get(self, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            batch: int) -> tuple[torch.Tensor, int] | None:
        versions = (_version(position_ids), _version(attention_mask), batch)
        refs = self.key
        if (refs and refs[0]() is position_ids and refs[2] == versions
                and (refs[1] is None if attention_mask is None else refs[1]() is attention_mask)):
            return self.value
        rows = position_ids.expand(batch, -1)  # GPT-J's default position_ids are (1, seq)
        self.value = segments(rows) if masks_agree(attention_mask, rows) else None
        self.key = (weakref.ref(position_ids),
                    None if attention_mask is None else weakref.ref(attention_mask), versions)
        return self.value


_plan = _Plan()


class VarlenGPTJAttention(GPTJAttention):
    """GPT-J attention whose core runs a varlen kernel over the segments of `position_ids` (see
    the module docstring). Made by `enable` (which sets `varlen_kernel`), never constructed."""

    varlen_kernel: Kernel

    def forward(self, hidden_states, layer_past=None, attention_mask=None, position_ids=None,
                use_cache=False, output_attentions=False, **kwargs):
        """GPTJAttention.forward's arguments and result (`(attn_output: (batch, seq, hidden),
        attn_weights)`); attn_weights is None on the varlen path."""
        plan = None
        if (layer_past is None and position_ids is not None and not output_attentions
                and not (self.training and self.attn_dropout.p > 0)):
            plan = _plan.get(position_ids, attention_mask, hidden_states.shape[0])
        self._varlen_segments = plan
        try:
            return super().forward(hidden_states, layer_past=layer_past,
                                   attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=use_cache, output_attentions=output_attentions,
                                   **kwargs)
        finally:
            self._varlen_segments = None

    def _attn(self, query, key, value, attention_mask=None):
        """query, key, value: `(batch, heads, seq, head_dim)`; returns `((batch, heads, seq,
        head_dim) in value's dtype, None)` on the varlen path, else the eager parent's result."""
        plan = getattr(self, "_varlen_segments", None)
        if plan is None or key.shape[-2] != query.shape[-2]:
            return super()._attn(query, key, value, attention_mask)
        global _calls
        cu, longest = plan
        batch, heads, seq, dim = query.shape
        kernel = self.varlen_kernel
        dtype = value.dtype
        work = query.dtype
        if kernel.half_only and work not in HALF:
            device = query.device.type
            work = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                    else torch.bfloat16)

        def flat(t):  # (batch, heads, seq, dim) -> (batch * seq, heads, dim)
            return t.to(work).transpose(1, 2).reshape(batch * seq, heads, dim)

        cu = cu.to(query.device)
        out = kernel.fn(flat(query), flat(key), flat(value), cu, cu, longest, longest,
                        scale=1.0 / self.scale_attn, window_size=CAUSAL)
        _calls += 1
        return out.reshape(batch, seq, heads, dim).transpose(1, 2).to(dtype), None


def _torch_varlen() -> KernelFn:
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def _flash_attn_varlen() -> KernelFn:
    from flash_attn import flash_attn_varlen_func

    def fn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
           window_size=(-1, -1)):
        return flash_attn_varlen_func(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
                                      softmax_scale=scale, causal=tuple(window_size) == CAUSAL)

    return fn


CANDIDATES = (("torch.varlen_attn", _torch_varlen), ("flash_attn_varlen_func", _flash_attn_varlen))


def _probe(fn: KernelFn, head_dim: int, heads: int = 2) -> None:
    """One forward and backward of `fn` on CUDA in bf16: two segments (3 and 5 tokens)."""
    q, k, v = (torch.randn(8, heads, head_dim, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, 3, 8], device="cuda", dtype=torch.int32)
    out = fn(q, k, v, cu, cu, 5, 5, scale=1.0 / math.sqrt(head_dim), window_size=CAUSAL)
    out.float().sum().backward()
    torch.cuda.synchronize()


def find_kernel(head_dim: int = 256) -> Kernel:
    """The first varlen kernel of CANDIDATES that imports and runs a forward and backward in bf16
    at `head_dim` (GPT-J 6B: 256) on the current CUDA device. Raises LookupError with the
    reasons when none does (no CUDA, neither installed, or both fail on this GPU)."""
    if not torch.cuda.is_available():
        raise LookupError("no CUDA device (the varlen kernels are CUDA-only)")
    reasons = []
    for name, load in CANDIDATES:
        try:
            fn = load()
            _probe(fn, head_dim)
        except Exception as e:  # noqa: BLE001 (missing, or not built for this GPU / head size)
            first = str(e).splitlines()[0] if str(e) else ""
            reasons.append(f"{name}: {type(e).__name__}: {first}"[:300])
            continue
        return Kernel(name, fn, half_only=True)
    raise LookupError("no varlen kernel runs here: " + "; ".join(reasons))


def _attention_layers(model) -> list[GPTJAttention] | None:
    """The blocks' attention modules of a GPT-J model (peft-wrapped too), or None when the model
    is not a GPT-J or an attention is not the eager class (or this module's)."""
    inner = inner_model(model)
    if getattr(inner.config, "model_type", None) != "gptj":
        return None
    layers = [m for m in inner.modules() if isinstance(m, GPTJAttention)]
    if not layers or any(type(m) not in (GPTJAttention, VarlenGPTJAttention) for m in layers):
        return None
    return layers


def enable(model, kernel: KernelFn | None = None) -> str | None:
    """Run the attention of `model` (a GPT-J causal LM with eager attention, or a peft model
    around one) through a varlen kernel. `kernel`: a callable with varlen_attn's signature, used
    as given (any device and dtype); default `find_kernel` at the model's head size. Returns the
    kernel's name (`torch.varlen_attn`, `flash_attn_varlen_func`, or the callable's __name__), or
    None, changing nothing, when the model is not such a GPT-J or no kernel is available (CPU).
    Weights, state_dict and save_pretrained are untouched; `disable` restores eager attention."""
    layers = _attention_layers(model)
    if layers is None:
        return None
    if kernel is None:
        try:
            chosen = find_kernel(layers[0].head_dim)
        except LookupError:
            return None
    else:
        chosen = Kernel(getattr(kernel, "__name__", type(kernel).__name__), kernel,
                        half_only=False)
    for layer in layers:
        layer.__class__ = VarlenGPTJAttention
        layer.varlen_kernel = chosen
    return chosen.name


def disable(model) -> bool:
    """Undo `enable`: eager GPT-J attention again. True when some layer was changed."""
    layers = _attention_layers(model) or []
    changed = False
    for layer in layers:
        if type(layer) is VarlenGPTJAttention:
            layer.__class__ = GPTJAttention
            del layer.varlen_kernel
            changed = True
    return changed


def enabled(model) -> str | None:
    """The name of the varlen kernel `model`'s attention runs through, or None."""
    layers = _attention_layers(model) or []
    if layers and all(type(m) is VarlenGPTJAttention for m in layers):
        return layers[0].varlen_kernel.name
    return None
