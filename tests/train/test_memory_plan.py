"""The memory plan at GPT-J 6B's shape for every shipped GPU profile, with literal figures, and at
the shapes of four other bases (Pythia-12B, Llama-3.1-8B, Qwen2.5-7B, Mistral-7B) whose
config.json values ship in dolly/train/known_configs/.

GPT-J 6B (transformers' GPTJConfig() defaults): 6,050,882,784 parameters; the largest layer is
the untied LM head, 4096 x 50,400 + 50,400 bias = 206,488,800. DeepSpeed's ZeRO-3 estimate per
GPU: 4 x largest layer + 18 (no offload) / 2 (optimizer offload) / 0 (both offloaded) bytes per
parameter / GPUs. Activations (16-bit) per GPT-J layer: s*b*h*56 + 6*a*s^2*b; logits b*s*V*10.
The other layouts' counts are in dolly/train/memory_plan.py's docstring.
"""
from __future__ import annotations

import dataclasses

import pytest

from dolly.train import memory_plan as mp
from dolly.config import load_config
from dolly.errors import DollyError

GIB = 2**30
PROFILES = "configs/gpt-j-6b-{}.yaml"


@pytest.fixture(scope="module")
def gptj6b():
    return mp.model_shape(load_config(PROFILES.format("a100")))


def _plan(name, shape, **overrides):
    return mp.plan_for(load_config(PROFILES.format(name), overrides), shape=shape)


def test_gptj_hub_id_offline_falls_back_to_gpt_j_6b(gptj6b):
    assert gptj6b.n_params == 6_050_882_784
    assert gptj6b.largest_layer_params == 206_488_800
    assert (gptj6b.n_layer, gptj6b.hidden, gptj6b.n_head, gptj6b.vocab) == (28, 4096, 16, 50_400)
    assert "GPTJConfig()" in gptj6b.source


def test_formulas_by_hand(gptj6b):
    s = mp.Setting(micro_batch=8, seq_len=1024, precision="bf16", gradient_checkpointing=True,
                   offload_optimizer=False, offload_params=False, gpus_per_node=8, num_nodes=1)
    # 4 * 206,488,800 + 18 * 6,050,882,784 / 8
    assert mp.model_states(gptj6b, s)[0] == 825_955_200 + 13_614_486_264
    # one layer: 1024*8*4096*56 + 6*16*1024^2*8
    layer = 1_879_048_192 + 805_306_368
    assert mp.layer_activation_bytes(gptj6b, 8, 1024, "bf16") == layer
    assert mp.activation_bytes(gptj6b, 8, 1024, "bf16", False) == 28 * layer
    assert mp.activation_bytes(gptj6b, 8, 1024, "bf16", True) == 2 * 1024 * 8 * 4096 * 28 + layer
    assert mp.logits_bytes(gptj6b, 8, 1024, "bf16") == 8 * 1024 * 50_400 * 10


# profile, GPUs per node -> model states, activations (no ckpt, ckpt), logits, CPU per node,
# need, usable (bytes per GPU unless "per node"), fits
EXPECTED = {
    ("a100", 8): (14_440_441_464, 75_161_927_680, 4_563_402_752, 4_128_768_000, 9_911_462_400,
                  23_132_612_216, 38_654_705_664, True),
    ("a10", 4): (3_851_396_592, 37_580_963_840, 2_281_701_376, 2_064_384_000, 145_221_186_816,
                 8_197_481_968, 21_743_271_936, True),
    ("a10", 8): (2_338_675_896, 37_580_963_840, 2_281_701_376, 2_064_384_000, 145_221_186_816,
                 6_684_761_272, 21_743_271_936, True),
    ("v100", 8): (825_955_200, 18_790_481_920, 1_140_850_688, 1_032_192_000, 163_373_835_168,
                  2_998_997_888, 15_268_608_737, True),
    ("h100", 8): (14_440_441_464, 150_323_855_360, 9_126_805_504, 8_257_536_000, 9_911_462_400,
                  31_824_782_968, 76_922_864_271, True),
}


@pytest.mark.parametrize("name,gpus", list(EXPECTED))
def test_profile_plans(gptj6b, name, gpus):
    plan = _plan(name, gptj6b, num_gpus=gpus)
    states, no_ckpt, ckpt, logits, cpu, need, usable, fits = EXPECTED[(name, gpus)]
    assert (plan.model_states, plan.activations_no_ckpt, plan.activations_ckpt, plan.logits,
            plan.cpu_per_node, plan.need, plan.usable, plan.fits) == EXPECTED[(name, gpus)]
    assert plan.verdict().startswith("verdict: fits: each of the")


def test_dolly_setup_fits_a100_40gb_x8(gptj6b):
    """Dolly v1 trained GPT-J 6B on 8x A100 40GB, micro-batch 8, bf16, checkpointing, no offload."""
    plan = _plan("a100", gptj6b, num_gpus=8)
    s = plan.setting
    assert (s.gpus_per_node, s.micro_batch, s.seq_len, s.precision, s.gradient_checkpointing,
            s.offload_optimizer, s.offload_params) == (8, 8, 1024, "bf16", True, False, False)
    assert plan.gpu_memory == 40 * GIB and plan.fits is True
    assert plan.verdict() == ("verdict: fits: each of the 8 GPUs needs 21.54 GiB of 36.00 GiB "
                              "usable (40.00 GiB less 10% reserve)")


def test_no_fit_names_the_knobs(gptj6b):
    plan = _plan("a100", gptj6b, num_gpus=8, gradient_checkpointing=False)
    assert plan.fits is False
    assert plan.fixes == ["-P gradient_checkpointing=true",
                          "-P per_device_batch_size=2 -P gradient_accumulation_steps=4"]
    assert "does not fit: each of the 8 GPUs needs 87.29 GiB of 36.00 GiB" in plan.verdict()
    # the shipped H100 profile without checkpointing: a micro-batch of 4 at most, even on an H200
    h100 = _plan("h100", gptj6b, num_gpus=8, gradient_checkpointing=False)
    assert h100.fits is False and round(h100.need / GIB, 2) == 161.14
    assert h100.fixes == ["-P gradient_checkpointing=true",
                          "-P per_device_batch_size=4 -P gradient_accumulation_steps=4"]
    h200 = _plan("h100", gptj6b, num_gpus=8, gradient_checkpointing=False, gpu_memory_gb=140.4)
    assert h200.fixes[1] == "-P per_device_batch_size=8 -P gradient_accumulation_steps=2"


def test_more_gpus_is_a_knob_when_states_dominate(gptj6b):
    # one A10 cannot hold GPT-J 6B's states without offload; 2 nodes of 4 can
    plan = _plan("a10", gptj6b, num_gpus=4, offload_optimizer=False, per_device_batch_size=1)
    assert plan.fits is False
    assert plan.fixes == ["-P offload_optimizer=true",
                          "-P offload_optimizer=true -P offload_params=true",
                          "-P num_nodes=2 (more GPUs: 8)"]


def test_choose_picks_the_largest_micro_batch(gptj6b):
    s = mp.setting_of(load_config(PROFILES.format("h100")), 1)
    # one H200 (the GPU check): the whole 6B's states (101 GiB) leave room for a micro-batch of
    # 2 x 1024 tokens without checkpointing (< 4,096 tokens) or 16 with it: 16 with checkpointing
    on_h200 = mp.choose(gptj6b, s, int(140.4 * GIB))
    assert (on_h200.micro_batch, on_h200.gradient_checkpointing) == (16, True)
    roomy = mp.choose(gptj6b, dataclasses.replace(s, seq_len=256), 400 * GIB)
    assert (roomy.micro_batch, roomy.gradient_checkpointing) == (64, False)
    tight = mp.choose(gptj6b, s, int(16 * GIB))
    assert tight is None  # a whole 6B on one 16 GiB GPU without offload


def test_require_fit_raises_one_line(gptj6b, monkeypatch):
    monkeypatch.setattr(mp, "model_shape", lambda cfg: gptj6b)
    cfg = load_config(PROFILES.format("a100"), {"gradient_checkpointing": False})
    with pytest.raises(DollyError) as e:
        mp.require_fit(cfg, gpus_per_node=8)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("memory plan: does not fit: each of the 8 GPUs needs 87.29 GiB")
    assert "-P gradient_checkpointing=true" in msg and "-P plan_check=false" in msg
    # the longest prepared record, not max_length, when the train step knows it
    assert mp.require_fit(cfg, gpus_per_node=8, seq_len=256).fits is True
    warned = mp.require_fit(dataclasses.replace(cfg, plan_check=False), gpus_per_node=8)
    assert warned.fits is False


def test_tiny_profile_and_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(mp, "visible_gpu", lambda: (0, 0))
    tiny = mp.plan_for(load_config(None))
    assert tiny.shape.source.startswith("tiny-gptj")
    assert tiny.shape.vocab == 1024 and tiny.shape.n_layer == 4
    assert tiny.device == "CPU rank"  # planned as the train step runs it here: CPU ranks
    on_gpus = mp.plan_for(load_config(None, {"num_gpus": 1}))
    assert on_gpus.fits is None and "gpu_memory_gb" in on_gpus.verdict()
    from transformers import GPTJConfig

    GPTJConfig(vocab_size=50_400, n_embd=64, n_layer=2, n_head=4, rotary_dim=16).save_pretrained(
        tmp_path)
    local = mp.plan_for(load_config(None, {"base_model": str(tmp_path), "tokenizer": ""}))
    assert local.shape.source == f"{tmp_path}/config.json"
    assert local.shape.vocab == 50_400 and local.shape.largest_layer_params == 64 * 50_400 + 50_400


def test_unknown_model_offline_is_one_line(tmp_path):
    with pytest.raises(DollyError, match="has no config.json"):
        mp.plan_for(load_config(None, {"base_model": str(tmp_path), "tokenizer": ""}))


def test_train_check_uses_the_gpu_it_runs_on(gptj6b, monkeypatch):
    """The profile says 40 GiB; on an 80 GiB A100 the train step's check plans for 80."""
    monkeypatch.setattr(mp, "model_shape", lambda cfg: gptj6b)
    monkeypatch.setattr(mp, "visible_gpu", lambda: (8, 80 * GIB))
    cfg = load_config(PROFILES.format("a100"), {"gradient_checkpointing": False,
                                                 "per_device_batch_size": 4})
    on_40 = mp.plan_for(cfg, 8)  # the plan command: the profile's card
    assert on_40.gpu_memory == 40 * GIB and on_40.fits is False
    plan = mp.require_fit(cfg, gpus_per_node=8)
    assert plan.gpu_memory == 80 * GIB and plan.fits is True


@pytest.mark.parametrize("h,a,s,b", [(512, 16, 64, 4), (256, 4, 256, 2)])
def test_layer_formula_is_what_autograd_saves(h, a, s, b):
    """The plan's bytes per GPT-J layer (56*s*b*h + 6*a*s^2*b in bf16) against the tensors
    autograd keeps for backward in transformers' GPT-J: a 2-layer minus a 1-layer model."""
    import torch
    from transformers import GPTJConfig, GPTJForCausalLM

    def saved_bytes(n_layer: int) -> int:
        torch.manual_seed(0)
        model = GPTJForCausalLM(GPTJConfig(
            vocab_size=1000, n_embd=h, n_layer=n_layer, n_head=a, rotary_dim=16,
            n_positions=1024, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
            pad_token_id=0)).to(torch.bfloat16).train()
        return _saved_bytes(model, b, s, padded=False)

    shape = mp.ModelShape(0, 0, 1, h, a, 1000)
    per_layer = saved_bytes(2) - saved_bytes(1)
    assert per_layer == pytest.approx(mp.layer_activation_bytes(shape, b, s, "bf16"), rel=0.01)


def test_no_single_knob_says_so(gptj6b):
    # one 16 GiB V100, micro-batch 8 without checkpointing: no single change is enough
    plan = _plan("v100", gptj6b, num_gpus=1, gradient_checkpointing=False, offload_params=False,
                 offload_optimizer=False, per_device_batch_size=8)
    assert plan.fits is False
    assert plan.fixes == []
    assert plan.verdict().endswith("turn: no single change fits: combine gradient checkpointing, "
                                   "a smaller micro-batch and offload, or use GPUs with more "
                                   "memory")


def test_offload_needs_the_host_memory(gptj6b, monkeypatch):
    monkeypatch.setattr(mp, "model_shape", lambda cfg: gptj6b)
    monkeypatch.setattr(mp, "visible_gpu", lambda: (4, int(22.5 * GIB)))
    monkeypatch.setattr(mp, "host_memory", lambda: 64 * GIB)
    cfg = load_config(PROFILES.format("a10"))
    with pytest.raises(DollyError) as e:
        mp.require_fit(cfg, gpus_per_node=4)
    assert str(e.value) == (
        "memory plan: does not fit: offload needs 135.25 GiB of CPU memory per node, this node "
        "has 64.00 GiB; turn: more nodes (-P num_nodes=N) or less offload "
        "(-P plan_check=false to try anyway)")
    monkeypatch.setattr(mp, "host_memory", lambda: 256 * GIB)
    assert mp.require_fit(cfg, gpus_per_node=4).fits is True


# ------------------------------------------ bases other than GPT-J: Pythia, Llama, Qwen2, Mistral

# Hub id -> parameters (counted on the meta device from the shipped config.json values; the model
# cards' totals), largest layer (the embedding or the untied LM head: vocab x hidden), layers,
# hidden, heads, key/value heads, MLP width, gated MLP, vocabulary
KNOWN = {
    "EleutherAI/pythia-12b": (11_846_072_320, 50_688 * 5120, 36, 5120, 40, 40, 20_480, False,
                              50_688),
    "meta-llama/Llama-3.1-8B": (8_030_261_248, 128_256 * 4096, 32, 4096, 32, 8, 14_336, True,
                                128_256),
    "Qwen/Qwen2.5-7B": (7_615_616_512, 152_064 * 3584, 28, 3584, 28, 4, 18_944, True, 152_064),
    "mistralai/Mistral-7B-v0.1": (7_241_732_096, 32_000 * 4096, 32, 4096, 32, 8, 14_336, True,
                                  32_000),
}


@pytest.fixture(scope="module")
def known_shapes():
    return {hub: mp.model_shape(load_config(None, {"base_model": hub, "tokenizer": ""}))
            for hub in KNOWN}


@pytest.mark.parametrize("hub", list(KNOWN))
def test_known_bases_offline(known_shapes, hub):
    """Not in the Hugging Face cache, offline (HF_HUB_OFFLINE=1): the shipped config.json values."""
    shape = known_shapes[hub]
    assert (shape.n_params, shape.largest_layer_params, shape.n_layer, shape.hidden, shape.n_head,
            shape.kv_heads, shape.mlp_width, shape.gated_mlp, shape.vocab) == KNOWN[hub]
    assert shape.source == f"{hub} (config.json values shipped in dolly/train/known_configs/)"
    assert shape.head_size == 128 and shape.sdpa
    neox = hub.startswith("EleutherAI/")
    assert (shape.block, shape.parallel, shape.rms_norm) == (
        ("neox", True, False) if neox else ("prenorm", False, True))
    # matched without regard to case, as the Hub matches ids
    assert mp.known_config(hub.upper()).to_dict() == mp.known_config(hub).to_dict()


# b=8 records of s=2048 tokens, bf16 -> one layer without padding, one layer of a padded batch
# (what the plan counts), L layers without checkpointing, checkpointing, logits (bytes per GPU)
KNOWN_BYTES = {
    # 16384 tokens x (16*5120 + 4*20480) + 16*16384 LayerNorm stats + 4*40*16384 log-sum-exp;
    # padded + 2*8*2048^2 (the 16-bit s x s bias of each layer's SDPA)
    "EleutherAI/pythia-12b": (2_687_238_144, 2_754_347_008, 99_156_492_288, 8_794_144_768,
                              8_304_721_920),
    # 16384 x (20*4096 + 4*1024 + 8*14336) + 8*16384 (1/rms) + 4*32*16384; padded: K and V at
    # all 32 heads (+4*16384*3072) and the s x s bias
    "meta-llama/Llama-3.1-8B": (3_290_562_560, 3_558_998_016, 113_887_936_512, 7_853_965_312,
                                21_013_463_040),
    "Qwen/Qwen2.5-7B": (3_692_953_600, 3_961_389_056, 110_918_893_568, 7_249_723_392,
                        24_914_165_760),
    "mistralai/Mistral-7B-v0.1": (3_290_562_560, 3_558_998_016, 113_887_936_512, 7_853_965_312,
                                  5_242_880_000),
}


@pytest.mark.parametrize("hub", list(KNOWN_BYTES))
def test_known_bases_bytes(known_shapes, hub):
    shape, (plain, padded, no_ckpt, ckpt, logits) = known_shapes[hub], KNOWN_BYTES[hub]
    b, s = 8, 2048
    assert mp.layer_activation_bytes(shape, b, s, "bf16", padded=False) == plain
    assert mp.layer_activation_bytes(shape, b, s, "bf16") == padded
    assert mp.activation_bytes(shape, b, s, "bf16", False) == shape.n_layer * padded == no_ckpt
    assert mp.activation_bytes(shape, b, s, "bf16", True) == 2 * s * b * shape.hidden * \
        shape.n_layer + padded == ckpt
    assert mp.logits_bytes(shape, b, s, "bf16") == b * s * shape.vocab * 10 == logits
    assert mp.layer_activation_bytes(shape, b, s, "fp32") == 2 * padded


def test_layer_counts_by_hand(known_shapes):
    llama = known_shapes["meta-llama/Llama-3.1-8B"]
    tokens = 8 * 2048
    assert KNOWN_BYTES["meta-llama/Llama-3.1-8B"][0] == (
        tokens * (20 * 4096 + 4 * 1024 + 8 * 14_336) + 8 * tokens + 4 * 32 * tokens)
    assert KNOWN_BYTES["meta-llama/Llama-3.1-8B"][1] - KNOWN_BYTES["meta-llama/Llama-3.1-8B"][0] \
        == 4 * tokens * (4096 - 1024) + 2 * 8 * 2048**2
    assert KNOWN_BYTES["EleutherAI/pythia-12b"][0] == (
        tokens * (16 * 5120 + 4 * 20_480) + 16 * tokens + 4 * 40 * tokens)
    # a sequential GPT-NeoX block keeps the residual sum the second LayerNorm reads
    seq = dataclasses.replace(known_shapes["EleutherAI/pythia-12b"], parallel=False)
    assert mp.layer_activation_bytes(seq, 8, 2048, "bf16", padded=False) == \
        KNOWN_BYTES["EleutherAI/pythia-12b"][0] + 2 * tokens * 5120
    # multi-head attention: padding adds only the s x s bias
    mha = dataclasses.replace(llama, n_kv_head=32)
    assert mp.layer_activation_bytes(mha, 8, 2048, "bf16") - mp.layer_activation_bytes(
        mha, 8, 2048, "bf16", padded=False) == 2 * 8 * 2048**2


# profile -> model states, activations (no ckpt, ckpt), logits, CPU per node, need, usable (bytes
# per GPU unless "per node"), fits; 8 GPUs per node
NEW_PROFILES = {
    # Dolly v2: Pythia-12B, micro-batch 3 x 2048 tokens, checkpointing, 8x A100 40GB
    "configs/dolly-v2-12b.yaml": (27_691_752_960, 37_183_684_608, 3_297_804_288, 3_114_270_720,
                                  12_457_082_880, 34_103_827_968, 38_654_705_664, True),
    # Llama-3.1-8B: micro-batch 8 x 2048 tokens, checkpointing, 8x H100 80GB
    "configs/llama-3.1-8b-h100.yaml": (20_169_434_112, 113_887_936_512, 7_853_965_312,
                                       21_013_463_040, 25_216_155_648, 49_036_862_464,
                                       76_922_864_271, True),
}


@pytest.mark.parametrize("profile", list(NEW_PROFILES))
def test_new_profiles_fit(profile):
    plan = mp.plan_for(load_config(profile), 8)
    assert (plan.model_states, plan.activations_no_ckpt, plan.activations_ckpt, plan.logits,
            plan.cpu_per_node, plan.need, plan.usable, plan.fits) == NEW_PROFILES[profile]
    assert plan.verdict().startswith("verdict: fits: each of the 8 GPUs")


def test_dolly_v2_micro_batch_6_needs_more_than_a100_40gb():
    """Dolly v2's own micro-batch of 6 at Pythia's 2048 positions: over a 40GB A100's 36 GiB
    (why the profile runs 3 x 2 accumulation steps); it fits an 80GB A100."""
    cfg = {"per_device_batch_size": 6, "gradient_accumulation_steps": 1}
    plan = mp.plan_for(load_config("configs/dolly-v2-12b.yaml", cfg), 8)
    assert plan.fits is False and round(plan.need / GIB, 2) == 37.73
    assert plan.fixes[0] == "-P per_device_batch_size=3 -P gradient_accumulation_steps=2"
    big = mp.plan_for(load_config("configs/dolly-v2-12b.yaml", {**cfg, "gpu_memory_gb": 80}), 8)
    assert big.fits is True


def test_tiny_llama_plan():
    plan = mp.plan_for(load_config(None, {"base_model": "tiny-llama"}))
    shape = plan.shape
    assert shape.source == "tiny-llama (tiny_* fields)"
    assert (shape.block, shape.gated_mlp, shape.rms_norm, shape.n_layer, shape.hidden,
            shape.vocab) == ("prenorm", True, True, 4, 256, 1024)


def _saved_bytes(model, b: int, s: int, padded: bool) -> int:
    """Bytes of the tensors autograd keeps for backward in `model`'s forward pass with labels:
    each storage once, weights (and a CPU matmul's transposed copy of one) left out. `padded`:
    the first record's last quarter is padding (an attention mask with zeros)."""
    import torch

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_shapes = {tuple(p.shape) for p in model.parameters()} | {
        tuple(p.shape[::-1]) for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in weights and tuple(t.shape) not in weight_shapes:
            storages[st.data_ptr()] = st.nbytes()
        return t

    ids = torch.randint(3, model.config.vocab_size, (b, s))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, s - s // 4:] = 0
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=mask, labels=ids)
    return sum(storages.values())


# model_type, config fields (sizes chosen so that no activation has a weight's shape: b*s, 128
# or 256 below, is no weight's dimension), attention implementation
TINY_LAYOUTS = {
    "llama gqa": ("llama", dict(hidden_size=192, num_attention_heads=6, num_key_value_heads=2,
                                intermediate_size=512), "sdpa"),
    "llama eager": ("llama", dict(hidden_size=192, num_attention_heads=6, num_key_value_heads=2,
                                  intermediate_size=512), "eager"),
    "qwen3 qk-norm": ("qwen3", dict(hidden_size=192, num_attention_heads=6, num_key_value_heads=2,
                                    head_dim=40, intermediate_size=512), "sdpa"),
    "gpt-neox parallel": ("gpt_neox", dict(hidden_size=192, num_attention_heads=6,
                                           intermediate_size=768, rotary_pct=0.25,
                                           use_parallel_residual=True), "sdpa"),
    "gpt-neox sequential": ("gpt_neox", dict(hidden_size=192, num_attention_heads=6,
                                             intermediate_size=768, rotary_pct=0.25,
                                             use_parallel_residual=False), "sdpa"),
}


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("layout", list(TINY_LAYOUTS))
def test_layout_counts_are_what_autograd_saves(layout, padded):
    """The plan's bytes per layer of the pre-norm (Llama family) and GPT-NeoX blocks against the
    tensors autograd keeps in transformers' models (CPU, bf16): a 2-layer minus a 1-layer model,
    with and without padding, for two micro-batch shapes. The same counts held to the byte on an
    H200 with CUDA's SDPA kernels (the module docstring). Within 1%: on CPU LayerNorm keeps its
    statistics in bf16, CUDA in fp32 (16*b*s bytes in the plan)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, fields, attn = TINY_LAYOUTS[layout]
    common = dict(vocab_size=1000, max_position_embeddings=512, tie_word_embeddings=False,
                  pad_token_id=0, bos_token_id=0, eos_token_id=0, **fields)
    configs = [AutoConfig.for_model(model_type, num_hidden_layers=n, **common) for n in (1, 2)]
    torch.manual_seed(0)
    models = [AutoModelForCausalLM.from_config(c, attn_implementation=attn).to(torch.bfloat16)
              for c in configs]
    shape = dataclasses.replace(mp.shape_of(configs[1]), sdpa=attn == "sdpa")
    for b, s in ((4, 32), (2, 128)):
        per_layer = (_saved_bytes(models[1], b, s, padded)
                     - _saved_bytes(models[0], b, s, padded))
        assert per_layer == pytest.approx(
            mp.layer_activation_bytes(shape, b, s, "bf16", padded=padded), rel=0.01)


def test_a_cpu_profile_is_planned_on_this_machines_memory(monkeypatch):
    from dolly.config import load_config
    from dolly.train import memory_plan as mp

    monkeypatch.setattr(mp, "visible_gpu", lambda: (0, 0))
    monkeypatch.setattr(mp, "host_memory", lambda: 16 * mp.GIB)
    for profile in ("configs/tiny.yaml", "configs/tiny-chat.yaml"):
        plan = mp.plan_for(load_config(profile))
        assert plan.device == "CPU rank" and plan.setting.precision == "fp32"
        assert plan.setting.gpus_per_node == 2 and plan.gpu_memory == 8 * mp.GIB
        assert plan.verdict().startswith("verdict: fits: each of the 2 CPU ranks needs ")
        assert plan.verdict().endswith(" of 7.20 GiB usable (its share of this machine's "
                                       "16.00 GiB, less 10% reserve)")
        assert plan.lines()[1].startswith("setup: 1 node(s) x 2 CPU rank(s), fp32, micro-batch 16")
    # a GPU profile on the same machine is still planned for its GPUs
    assert mp.plan_for(load_config("configs/gpt-j-6b-a100.yaml")).device == "GPU"


# ---------------------------------------------------------------- finetune = lora | qlora ------

def test_adapter_parameters_by_hand(gptj6b, known_shapes):
    """r*(in+out) per adapted linear layer (A: r x in, B: out x r), all-linear = every linear
    layer of the blocks (the LM head is not adapted)."""
    layers = mp.adapted_layers(gptj6b, "all-linear")
    assert len(layers) == 28 * 6
    # GPT-J 6B, r=16: 28 layers x (4 x 16 x (4096+4096) [q, k, v, out_proj]
    #                              + 16 x (4096+16384) [fc_in] + 16 x (16384+4096) [fc_out])
    #               = 28 x (524,288 + 327,680 + 327,680) = 28 x 1,179,648
    assert mp.adapter_param_count(layers, 16) == 33_030_144
    # Llama-3.1-8B, r=16: 32 x 16 x ((4096+4096) [q] + 2 x (4096+1024) [k, v: 8 key/value heads]
    #                                + (4096+4096) [o] + 3 x (4096+14336) [gate, up, down])
    llama = known_shapes["meta-llama/Llama-3.1-8B"]
    assert mp.adapter_param_count(mp.adapted_layers(llama, "all-linear"), 16) == \
        32 * 16 * (8192 + 2 * 5120 + 8192 + 3 * 18_432) == 41_943_040
    # named layers only (peft's match: the module path is the name or ends with .name)
    qv = mp.adapted_layers(gptj6b, "q_proj, v_proj")
    assert len(qv) == 56 and mp.adapter_param_count(qv, 8) == 28 * 2 * 8 * 8192
    with pytest.raises(DollyError, match="names no linear layer of EleutherAI/gpt-j-6b"):
        mp.adapted_layers(gptj6b, "query_key_value")


@pytest.mark.parametrize("hub", ["EleutherAI/gpt-j-6b", *KNOWN])
def test_the_layouts_linear_layers_are_the_models(gptj6b, known_shapes, hub):
    """ModelShape.block_linears' layout mapping (for a shape built by hand) names the same
    linear layers, with the same shapes, as the model built from the config."""
    shape = gptj6b if hub.startswith("EleutherAI/gpt-j") else known_shapes[hub]
    built = sorted((p.rsplit(".", 1)[-1], i, o) for p, i, o in shape.linears)
    by_layout = sorted((p.rsplit(".", 1)[-1], i, o)
                       for p, i, o in dataclasses.replace(shape, linears=()).block_linears())
    assert built == by_layout and len(built) == shape.n_layer * (
        6 if hub.startswith("EleutherAI/gpt-j") else 4 if "pythia" in hub else 7)


def test_base_bytes_by_hand(gptj6b):
    # lora: the 16-bit base on every GPU
    assert mp.base_weight_bytes(gptj6b, "lora", "bf16") == 2 * 6_050_882_784 == 12_101_765_568
    # qlora, per layer: 4 linear layers of 4096 x 4096 (16,777,216 weights: 8,388,608 bytes of
    # 4-bit pairs + 262,144 8-bit absmax + 4 x 1,024 fp32 second-level constants = 8,654,848)
    # and 2 of 4096 x 16,384 (67,108,864: 33,554,432 + 1,048,576 + 4 x 4,096 = 34,619,392)
    assert mp.nf4_bytes(16_777_216) == 8_654_848 and mp.nf4_bytes(67_108_864) == 34_619_392
    # = 4.127 bits per weight (Dettmers et al. 2023: 4 + 8/64 + 32/(64*256))
    assert mp.nf4_bytes(67_108_864) * 8 / 67_108_864 == 4 + 8 / 64 + 32 / (64 * 256)
    quantized = 28 * (4 * 8_654_848 + 2 * 34_619_392)  # 2,908,028,928
    # every other parameter in fp32 (peft's prepare_model_for_kbit_training): the embedding
    # 50,400 x 4096, the LM head 4096 x 50,400 + 50,400 bias, 29 LayerNorms (one per parallel
    # block and the final one; weight + bias), fc_in and fc_out biases: 6,050,882,784 - 28 x
    # 201,326,592 weights = 413,738,208
    rest = 50_400 * 4096 + (4096 * 50_400 + 50_400) + 29 * 2 * 4096 + 28 * (16_384 + 4096)
    assert rest == 6_050_882_784 - 28 * 201_326_592 == 413_738_208
    assert mp.base_weight_bytes(gptj6b, "qlora", "bf16") == quantized + 4 * rest \
        == 4_562_981_760


def test_adapter_states_by_hand():
    # fp32 weights 4 + gradients 4 + AdamW moments 8, DDP buckets 4 (> 1 rank), autocast's
    # 16-bit copies 2 (16-bit runs)
    assert mp.adapter_state_bytes(33_030_144, "bf16", 1) == 18 * 33_030_144
    assert mp.adapter_state_bytes(33_030_144, "bf16", 8) == 22 * 33_030_144
    assert mp.adapter_state_bytes(33_030_144, "fp32", 2) == 20 * 33_030_144


def test_lora_layer_by_hand(gptj6b):
    """GPT-J, bf16, b=4, s=1024, r=16, all-linear: the full-fine-tuning layer (56*s*b*h +
    6*a*s^2*b) less the tensors only the frozen projections kept (LayerNorm output h, attention
    output h, fc_out's input 4h: 2 bytes each) plus, per adapted layer, lora_A's 16-bit copy of
    its input (q, k, v, out_proj, fc_in read h, fc_out 4h) and lora_B's r-wide input."""
    tokens, h = 4 * 1024, 4096
    block = [layer for layer in gptj6b.block_linears() if mp._block_index(layer[0]) == 0]
    full = 56 * tokens * h + 6 * 16 * 1024**2 * 4
    assert mp.layer_activation_bytes(gptj6b, 4, 1024, "bf16") == full == 1_342_177_280
    lora = full - 2 * tokens * (h + h + 4 * h) + tokens * (5 * 2 * h + 2 * 4 * h + 6 * 2 * 16)
    assert mp.adapter_layer_bytes(gptj6b, 4, 1024, "bf16", block, block, 16) == lora \
        == 1_443_627_008


# GPT-J 6B on the A10 profile (micro-batch 4 x 1024, bf16, checkpointing; its optimizer offload is
# ignored) -> frozen base, adapter states, activations (no ckpt, ckpt), logits, need, fits
ADAPTER_PLANS = {
    ("lora", 1): (12_101_765_568, 594_542_592, 40_421_556_224, 2_383_151_104, 2_064_384_000,
                  17_143_843_264, True),
    ("lora", 4): (12_101_765_568, 726_663_168, 40_421_556_224, 2_383_151_104, 2_064_384_000,
                  17_275_963_840, True),
    ("qlora", 1): (4_562_981_760, 594_542_592, 72_365_375_488, 4_463_525_888, 2_064_384_000,
                   11_685_434_240, True),
}


@pytest.mark.parametrize("finetune,gpus", list(ADAPTER_PLANS))
def test_adapter_plans_gptj6b_on_a10(gptj6b, finetune, gpus):
    plan = _plan("a10", gptj6b, num_gpus=gpus, finetune=finetune)
    assert (plan.base_weights, plan.adapter_states, plan.activations_no_ckpt,
            plan.activations_ckpt, plan.logits, plan.need, plan.fits) == \
        ADAPTER_PLANS[(finetune, gpus)]
    assert plan.model_states == plan.base_weights + plan.adapter_states
    assert plan.adapter_params == 33_030_144 and plan.adapted_layers == 168
    # checkpointing: each layer's 16-bit input (fp32 for qlora: peft upcasts the embedding) + one
    kept = 2 if finetune == "lora" else 4
    assert plan.activations_ckpt - kept * 4 * 1024 * 4096 * 28 == \
        plan.activations_no_ckpt // 28
    lines = plan.lines()
    assert lines[1].startswith("setup: 1 node(s) x ") and (
        f"finetune {finetune} (LoRA r=16 on 168 linear layers, all-linear; plain data parallel: "
        "every GPU holds the whole frozen base; no DeepSpeed, no offload)") in lines[1]
    assert lines[2].startswith("frozen base per GPU (")
    assert lines[3].startswith("adapters per GPU: 33,030,144 trainable parameters, fp32 (")
    assert any("offload_optimizer / offload_params are ZeRO-3 settings" in n for n in plan.notes)
    assert plan.verdict().startswith("verdict: fits: ")


def test_full_report_names_its_finetune(gptj6b):
    assert _plan("a100", gptj6b, num_gpus=8).lines()[1].endswith(
        "offload none, finetune full (every weight, DeepSpeed ZeRO-3)")


def test_a_lora_base_over_the_gpu_turns_to_qlora_or_zero3(known_shapes):
    """Llama-3.1-8B's 16-bit base (14.96 GiB) is over a 16 GiB GPU's 14.40 usable: the plan
    turns to its 4-bit base, or to ZeRO-3, which partitions every weight across GPUs."""
    cfg = load_config("configs/llama-3.1-8b-h100.yaml",
                      {"finetune": "lora", "num_gpus": 8, "gpu_memory_gb": 16})
    plan = mp.plan_for(cfg, shape=known_shapes["meta-llama/Llama-3.1-8B"])
    assert plan.fits is False and plan.base_weights == 2 * 8_030_261_248
    assert plan.fixes == [
        "-P finetune=qlora -P per_device_batch_size=1 -P gradient_accumulation_steps=8 (the base "
        "in 4-bit NF4: 7.27 GiB instead of 14.96 GiB)",
        "-P finetune=full -P per_device_batch_size=1 -P gradient_accumulation_steps=8 "
        "-P num_nodes=2 (every weight, DeepSpeed ZeRO-3 partitions them across 16 GPUs: the "
        "frozen lora base alone, 14.96 GiB, is over one GPU)"]
    # a base that fits: the usual knobs first, qlora after them
    roomy = mp.plan_for(load_config("configs/llama-3.1-8b-h100.yaml", {
        "finetune": "lora", "num_gpus": 1, "gpu_memory_gb": 22.5,
        "gradient_checkpointing": False}), shape=known_shapes["meta-llama/Llama-3.1-8B"])
    assert roomy.fixes == [
        "-P gradient_checkpointing=true -P per_device_batch_size=1 "
        "-P gradient_accumulation_steps=8",
        "-P finetune=qlora -P gradient_checkpointing=true -P per_device_batch_size=2 "
        "-P gradient_accumulation_steps=4 (the base in 4-bit NF4: 7.27 GiB instead of 14.96 GiB)"]


def test_require_fit_with_adapters_needs_no_offload_memory(gptj6b, monkeypatch):
    """Adapters train without DeepSpeed: the profile's optimizer offload asks no host memory."""
    monkeypatch.setattr(mp, "model_shape", lambda cfg: gptj6b)
    monkeypatch.setattr(mp, "visible_gpu", lambda: (1, int(22.5 * GIB)))
    monkeypatch.setattr(mp, "host_memory", lambda: 16 * GIB)
    cfg = load_config(PROFILES.format("a10"), {"finetune": "lora"})
    assert mp.require_fit(cfg, gpus_per_node=1).fits is True
    chosen = mp.choose(gptj6b, mp.setting_of(cfg, 1), int(22.5 * GIB))
    assert chosen.finetune == "lora" and chosen.gradient_checkpointing


def _tiny(model_type: str, n_layer: int, dtype=None):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, fields, attn = TINY_ADAPTED[model_type]
    common = dict(vocab_size=1000, tie_word_embeddings=False, pad_token_id=0, bos_token_id=0,
                  eos_token_id=0, **fields)
    if model_type == "gptj":
        config = AutoConfig.for_model("gptj", n_layer=n_layer, n_positions=512, rotary_dim=16,
                                      **common)
    else:
        config = AutoConfig.for_model(model_type, num_hidden_layers=n_layer,
                                      max_position_embeddings=512, **common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return (model.to(dtype) if dtype is not None else model), config


def _with_adapters(model, targets: str, r: int, dropout: float = 0.0):
    """`model` as dolly.models.lora.add_adapters wraps it (peft's defaults, input grads on)."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=dropout, bias="none", task_type="CAUSAL_LM",
        target_modules="all-linear" if targets == "all-linear" else targets.split(",")))
    peft_model.enable_input_require_grads()
    return peft_model


# name -> model_type, config fields, attention (sizes as TINY_LAYOUTS: no activation has a
# weight's shape), the named targets of the subset case
TINY_ADAPTED = {"gptj": ("gptj", dict(n_embd=192, n_head=6), None),
                **{name: TINY_LAYOUTS[layout] for name, layout in (
                    ("llama", "llama gqa"), ("llama eager", "llama eager"),
                    ("qwen3", "qwen3 qk-norm"), ("gpt-neox", "gpt-neox parallel"))}}
SUBSETS = {"gptj": "q_proj,v_proj", "llama": "q_proj,v_proj", "llama eager": "o_proj,down_proj",
           "qwen3": "k_proj,up_proj", "gpt-neox": "dense,dense_h_to_4h"}


@pytest.mark.parametrize("name", ["gptj", "llama"])
@pytest.mark.parametrize("targets", ["all-linear", "subset"])
def test_adapter_count_is_peft_trainable_count(name, targets):
    """The plan's trainable parameters = peft's on a real tiny model (CPU), all-linear or named."""
    model, config = _tiny(name, 2)
    targets = SUBSETS[name] if targets == "subset" else targets
    trainable = sum(p.numel() for p in _with_adapters(model, targets, 8).parameters()
                    if p.requires_grad)
    layers = mp.adapted_layers(mp.shape_of(config), targets)
    assert trainable == mp.adapter_param_count(layers, 8)
    assert len(layers) == 2 * (len(targets.split(",")) if targets != "all-linear" else
                               {"gptj": 6, "llama": 7}[name])


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("targets", ["all-linear", "subset"])
@pytest.mark.parametrize("name", list(TINY_ADAPTED))
def test_lora_layer_is_what_autograd_saves(name, targets, precision, dropout):
    """What a frozen block with adapters keeps for backward, less what the same block keeps when
    every weight trains (a 2-layer minus a 1-layer model each, padded batch), against the plan's
    difference (adapter_layer_bytes - layer_activation_bytes): equal to the byte on CPU, fp32,
    and bf16 under CPU autocast with peft's fp32 adapters (how the Trainer runs bf16 without
    DeepSpeed). On CPU dropout keeps an fp32 noise tensor (on_cpu)."""
    import contextlib

    import torch

    targets = SUBSETS[name] if targets == "subset" else targets
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())

    def per_layer(adapters: bool) -> int:
        saved = []
        for n_layer in (1, 2):
            model, _ = _tiny(name, n_layer, dtype)
            if adapters:
                model = _with_adapters(model, targets, 8, dropout)
            with autocast:
                torch.manual_seed(1)
                saved.append(_saved_bytes(model.train(), 2, 128, padded=True))
        return saved[1] - saved[0]

    _, config = _tiny(name, 2)
    shape = dataclasses.replace(mp.shape_of(config), sdpa=TINY_ADAPTED[name][2] != "eager")
    block = [layer for layer in shape.block_linears() if mp._block_index(layer[0]) == 1]
    adapted = [layer for layer in mp.adapted_layers(shape, targets)
               if mp._block_index(layer[0]) == 1]
    planned = mp.adapter_layer_bytes(shape, 2, 128, precision, block, adapted, 8, dropout,
                                     on_cpu=True) - mp.layer_activation_bytes(shape, 2, 128,
                                                                              precision)
    assert per_layer(True) - per_layer(False) == planned
