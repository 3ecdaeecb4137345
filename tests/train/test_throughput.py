"""Throughput figures: peak FLOP/s lookup, FLOPs per token, MFU, interval accounting."""
import time

import pytest

from helpers import FakeClock
from dolly.train import throughput as tp

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA A100-SXM4-40GB", "bf16", 312e12),
    ("NVIDIA A100 80GB PCIe", "fp32", 19.5e12),
    ("NVIDIA A10", "bf16", 125e12),
    ("Tesla V100-SXM2-16GB", "fp16", 125e12),
    ("Tesla V100-SXM2-16GB", "bf16", None),   # V100 has no bf16
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
    ("NVIDIA H100 PCIe", "bf16", 756e12),
    ("NVIDIA H200", "bf16", 989e12),
    ("NVIDIA A10G", "bf16", None),            # not A10, not in the table
    ("cpu", "fp32", None),
])
def test_peak_flops(name, precision, peak):
    assert tp.peak_flops(name, precision) == peak


def test_flops_and_mfu():
    # GPT-J 6B: ~6.05e9 matmul params, 28 layers, 4096 wide, 1,024-token context
    per_token = tp.flops_per_token(6_050_000_000, 28, 4096, 1024)
    assert per_token == pytest.approx(6 * 6.05e9 + 12 * 28 * 4096 * 1024)
    # Dolly's "30 minutes on 8x A100": ~410 tokens/s per GPU -> about 5% MFU
    m = tp.mfu(410 * 8, per_token, 312e12, 8)
    assert 0.04 < m < 0.06
    assert tp.mfu(1000, per_token, None, 2) is None


def test_summarize_interval():
    out = tp.summarize(900, 1000, 10, 2.0, matmul_params=1_000_000, n_layer=2, width=64,
                       peak_per_device=1e12, n_devices=2)
    assert out["train_tokens_per_second"] == 450
    assert out["padding_efficiency"] == 0.9
    per_token = 6e6 + 12 * 2 * 64 * 100
    assert out["mfu"] == pytest.approx(450 * per_token / 2e12)
    assert "mfu" not in tp.summarize(1, 1, 1, 1.0, matmul_params=1, n_layer=1, width=1,
                                     peak_per_device=None, n_devices=1)


def test_counter_excludes_paused_time():
    clock = FakeClock()
    c = tp.TokenCounter(clock=clock)
    c.add(10, 16, 2)
    with c.pause():
        clock.advance(0.2)  # an evaluation or a checkpoint write: not training time
    real, computed, seqs, secs = c.take()
    assert (real, computed, seqs) == (10, 16, 2)
    assert secs < 0.15
    clock.advance(0.5)  # training time counts
    with c.pause():
        clock.advance(0.2)
    zeros = c.take()
    assert zeros[:3] == (0, 0, 0)
    assert zeros[3] == pytest.approx(0.5)
    assert tp.TokenCounter().clock is time.perf_counter  # what training measures with


def test_frozen_weights_cost_four_flops_a_token_not_six():
    # LoRA on GPT-J 6B's matmul weights: all frozen but 33,030,144 adapter parameters
    n, adapters = 6_050_000_000, 33_030_144
    per_token = tp.flops_per_token(n + adapters, 28, 4096, 1024,
                                   frozen_matmul_params=n)
    assert per_token == 6 * adapters + 4 * n + 12 * 28 * 4096 * 1024
    assert tp.flops_per_token(n, 28, 4096, 1024, 0) == 6 * n + 12 * 28 * 4096 * 1024


def test_param_numel_counts_a_4bit_weight_by_its_shape():
    import types

    import torch

    from dolly.train.trainer import param_numel

    packed = torch.nn.Parameter(torch.zeros(8192, 1, dtype=torch.uint8), requires_grad=False)
    packed.quant_state = types.SimpleNamespace(shape=torch.Size([128, 128]))  # 2 weights a byte
    assert param_numel(packed) == 16384
    assert param_numel(torch.nn.Parameter(torch.zeros(3, 5))) == 15
