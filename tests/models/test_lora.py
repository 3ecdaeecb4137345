"""dolly.models.lora and the refusals around it, on a tiny GPT-J built here (no training)."""
from __future__ import annotations

import json

import pytest

from dolly.config import Config, load_config
from dolly.errors import ConfigError, DollyError
from dolly.models import lora


def _tiny_gptj():
    from transformers import GPTJConfig, GPTJForCausalLM

    return GPTJForCausalLM(GPTJConfig(vocab_size=64, n_positions=32, n_embd=32, n_layer=2,
                                      n_head=2, rotary_dim=8))


@pytest.mark.parametrize("targets, error", [
    ("q_proj,nonexistent_proj", "config key 'lora_target_modules': 'nonexistent_proj' names no "
                                "module of this model (GPTJForCausalLM)"),
    ("q_proj,lm_head", "config key 'lora_target_modules': 'lm_head' is the model's embedding or "
                       "output layer; adapters go on the blocks' linear layers (the special "
                       "tokens' rows train anyway)"),
    ("wte", "config key 'lora_target_modules': 'wte' is the model's embedding or output layer; "
            "adapters go on the blocks' linear layers (the special tokens' rows train anyway)"),
])
def test_every_target_name_must_name_a_linear_layer_of_the_blocks(targets, error):
    # peft alone trains q_proj only for the first, and the other two fail later or in merging
    with pytest.raises(ConfigError) as e:
        lora.add_adapters(_tiny_gptj(), Config(finetune="lora", lora_target_modules=targets))
    assert str(e.value) == error


def test_named_targets_adapt_exactly_those_layers_and_all_linear_every_block_linear():
    model = lora.add_adapters(_tiny_gptj(), Config(finetune="lora", lora_r=2,
                                                   lora_target_modules="q_proj,fc_in"))
    adapted = sorted(n for n, _ in model.named_modules() if n.endswith(".lora_A"))
    assert [n.split("transformer.")[1] for n in adapted] == [
        "h.0.attn.q_proj.lora_A", "h.0.mlp.fc_in.lora_A",
        "h.1.attn.q_proj.lora_A", "h.1.mlp.fc_in.lora_A"]
    every = lora.add_adapters(_tiny_gptj(), Config(finetune="lora", lora_r=2))
    # q, k, v, out (32 -> 32), fc_in (32 -> 128), fc_out (128 -> 32); r=2: per layer
    # 4 x 2 x 64 + 2 x 2 x 160 = 1,152, and nothing else trains
    assert lora.trainable_counts(every)[0] == 2 * 1152


def test_all_linear_stands_alone():
    with pytest.raises(ConfigError, match="'all-linear' stands alone"):
        load_config(None, {"lora_target_modules": "all-linear,q_proj"})


def test_adapters_start_from_the_same_weights_for_the_same_seed():
    import torch

    a, b = (lora.add_adapters(_tiny_gptj(), Config(finetune="lora", seed=s)) for s in (3, 3))
    c = lora.add_adapters(_tiny_gptj(), Config(finetune="lora", seed=4))

    def first_a(m):
        return next(p for n, p in m.named_parameters() if "lora_A" in n)
    assert torch.equal(first_a(a), first_a(b)) and not torch.equal(first_a(a), first_a(c))


def test_a_missing_local_base_is_one_line_and_never_a_hub_lookup(tmp_path):
    for name in ("tiny-gptj", str(tmp_path / "gone")):
        with pytest.raises(DollyError) as e:
            lora.resolve_base_path({"path": str(tmp_path / "gone"), "name": name, "revision": ""})
        assert str(e.value) == (f"the adapter's base model folder '{tmp_path / 'gone'}' does not "
                                "exist here: copy the base there or log the model with merge=true")


def test_resume_of_another_kind_of_checkpoint_is_refused(tmp_path):
    from dolly.train.launch import _require_same_kind

    full, adapter = tmp_path / "checkpoint-4", tmp_path / "checkpoint-8"
    full.mkdir()
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}))
    with pytest.raises(ConfigError, match="is a full fine-tune's checkpoint; this run trains lora"):
        _require_same_kind(Config(finetune="lora"), full)
    with pytest.raises(ConfigError, match="holds LoRA adapters; this run is finetune=full"):
        _require_same_kind(Config(), adapter)
    with pytest.raises(ConfigError) as e:
        _require_same_kind(Config(finetune="lora", lora_r=8, lora_alpha=8.0,
                                  lora_target_modules="q_proj"), adapter)
    assert str(e.value) == (f"config key 'resume': {adapter} holds adapters of other settings "
                            "(lora_r 4 -> 8; lora_target_modules q_proj,v_proj -> q_proj); set "
                            "them back to continue it")
    _require_same_kind(Config(finetune="lora", lora_r=4, lora_alpha=8.0,
                              lora_target_modules="v_proj,q_proj"), adapter)  # the same: fine


def test_qlora_without_cuda_is_one_line():
    with pytest.raises(ConfigError) as e:
        lora.require_qlora_device(Config(finetune="qlora"), cuda_available=False)
    assert str(e.value) == ("config key 'finetune': qlora loads the base in 4-bit NF4 with "
                            "bitsandbytes, which needs a CUDA GPU and none is visible; use "
                            "finetune=lora on CPU")
    lora.require_qlora_device(Config(finetune="lora"), cuda_available=False)


def test_a_logged_adapter_whose_base_folder_is_gone_fails_in_one_line(tmp_path):
    from mlflow.exceptions import MlflowException

    from dolly.serve.pyfunc import _require_adapter_base

    gone = tmp_path / "base"
    with pytest.raises(MlflowException) as e:
        _require_adapter_base({"local_base_model_path": str(gone)}, {"adapter_base": "tiny-gptj"})
    assert str(e.value).startswith(f"this model is a LoRA adapter on the base tiny-gptj, whose "
                                   f"folder {gone} is gone: put the base's files back there")
    assert "\n" not in str(e.value)
    gone.mkdir()
    (gone / "config.json").write_text("{}")
    _require_adapter_base({"local_base_model_path": str(gone)}, {})  # there: nothing raised
    _require_adapter_base({}, {})  # not an adapter
