"""Training efficiency figures: non-pad tokens per second, padding efficiency and MFU.

MFU (model FLOPs utilisation, PaLM appendix B) = FLOPs the model needs for the real tokens per
second / the devices' peak FLOP/s. A token costs about 6 FLOPs per matmul parameter in forward
and backward, plus 12 * layers * width * context for attention scores. The input embedding is a
lookup and is not counted; recomputation (gradient checkpointing) and padding are overhead, so
they lower MFU rather than raise it.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Callable

# Dense peak FLOP/s per device (NVIDIA datasheets, no sparsity). fp32 is plain FP32 (PyTorch does
# not use TF32 for matmuls unless asked to). Most specific names first: "H100 PCIe" before "H100".
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    (r"\bH200\b", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    (r"\bH100\b.*\bPCIe\b", {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12}),
    (r"\bH100\b", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    (r"\bA100\b", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    (r"\bA10\b", {"bf16": 125e12, "fp16": 125e12, "fp32": 31.2e12}),
    (r"\bV100\b", {"fp16": 125e12, "fp32": 15.7e12}),
]


def peak_flops(device_name: str, precision: str) -> float | None:
    """Peak FLOP/s of one device for `precision` (bf16/fp16/fp32), or None when unknown."""
    for pattern, table in PEAK_FLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return table.get(precision)
    return None


def flops_per_token(matmul_params: int, n_layer: int, width: int, context: float,
                    frozen_matmul_params: int = 0) -> float:
    """Training FLOPs (forward + backward) of one token at a mean context of `context` tokens:
    6 per trained matmul weight (forward 2, the input's gradient 2, the weight's gradient 2) and
    4 per frozen one (no weight gradient: LoRA's base, of the `matmul_params`), plus attention's
    12 x layers x width x context (Kaplan et al. 2020, table 1, forward 2 N + 2 n_layer n_ctx
    d_model, backward twice that)."""
    trained = matmul_params - frozen_matmul_params
    return 6.0 * trained + 4.0 * frozen_matmul_params + 12.0 * n_layer * width * context


def mfu(tokens_per_s: float, per_token: float, peak_per_device: float | None,
        n_devices: int) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s (tokens/s x FLOPs per token) over the devices'
    peak (PaLM's definition, Chowdhery et al. 2022, appendix B); None without a known peak."""
    if not peak_per_device or n_devices < 1:
        return None
    return tokens_per_s * per_token / (peak_per_device * n_devices)


@dataclass
class TokenCounter:
    """Real and computed tokens of the batches seen since the last `take()`, and the time spent.

    Time inside `pause()` blocks (evaluation, checkpoint writes) is not training time. `clock`:
    the time in seconds (`time.perf_counter`; a test passes one it advances by hand).
    """

    real: int = 0
    computed: int = 0
    sequences: int = 0
    _since: float | None = None  # None: now, by `clock`
    _paused: float = 0.0
    clock: Callable[[], float] = field(default=time.perf_counter, kw_only=True, repr=False,
                                       compare=False)

    def __post_init__(self) -> None:
        if self._since is None:
            self._since = self.clock()

    def add(self, real: int, computed: int, sequences: int) -> None:
        """Count one batch: `real` non-padding tokens, `computed` tokens (padding included) and
        `sequences` rows; ints or 0-dim int64 tensors (a tensor is added as is, so the count
        costs no device synchronisation until the total is read)."""
        self.real += real
        self.computed += computed
        self.sequences += sequences

    def pause(self) -> "_Pause":
        return _Pause(self)

    def take(self) -> tuple[int, int, int, float]:
        """(real, computed, sequences, training seconds) since the last call; then reset."""
        now = self.clock()
        out = (self.real, self.computed, self.sequences, max(now - self._since - self._paused, 1e-9))
        self.real = self.computed = self.sequences = 0
        self._since, self._paused = now, 0.0
        return out


class _Pause:
    def __init__(self, counter: TokenCounter):
        self.counter = counter

    def __enter__(self):
        self.t0 = self.counter.clock()

    def __exit__(self, *exc):
        self.counter._paused += self.counter.clock() - self.t0
        return False


def summarize(real: int, computed: int, sequences: int, seconds: float, *, matmul_params: int,
              n_layer: int, width: int, peak_per_device: float | None, n_devices: int,
              frozen_matmul_params: int = 0) -> dict:
    """The metrics of one logging interval, summed over all ranks (`frozen_matmul_params`: the
    part of `matmul_params` that does not train, see flops_per_token)."""
    out = {
        "train_tokens_per_second": real / seconds,
        "padding_efficiency": real / computed if computed else 1.0,
    }
    context = computed / sequences if sequences else 0.0
    per_token = flops_per_token(matmul_params, n_layer, width, context, frozen_matmul_params)
    out["model_tflops_per_second"] = out["train_tokens_per_second"] * per_token / 1e12
    m = mfu(out["train_tokens_per_second"], per_token, peak_per_device, n_devices)
    if m is not None:
        out["mfu"] = m
    return out
