"""Loading a base model from a local folder (as from the Hub, which tests cannot reach): safe
defaults, safetensors only, Dolly's tokens fit."""
import pytest

from helpers import SMALLEST as SMALL
from dolly.config import load_config
from dolly.errors import DollyError
from dolly.models.tiny import build_tiny
from dolly.models.base import load_base_model


@pytest.fixture(scope="module")
def tok():
    from dolly.tokenizer import build_tokenizer

    return build_tokenizer(load_config(None, SMALL), [])


def test_remote_code_is_off_unless_asked():
    assert load_config(None, {}).trust_remote_code is False
    for profile in ("configs/gpt-j-6b-a100.yaml", "configs/gpt-j-6b-h100.yaml"):
        assert load_config(profile, {}).trust_remote_code is False


def test_base_model_loads_from_safetensors(tmp_path, tok):
    build_tiny(load_config(None, SMALL), tok).save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    model = load_base_model(load_config(None, {**SMALL, "base_model": str(tmp_path / "m")}), tok)
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)


def test_pickled_weights_are_refused_with_one_line(tmp_path, tok):
    import torch

    # a checkpoint as older tools wrote it: config + a pickled state dict (unpickling can run code)
    model = build_tiny(load_config(None, SMALL), tok)
    model.config.save_pretrained(tmp_path / "m")
    torch.save(model.state_dict(), tmp_path / "m" / "pytorch_model.bin")
    cfg = load_config(None, {**SMALL, "base_model": str(tmp_path / "m")})
    with pytest.raises(DollyError, match=f"cannot load base model '{tmp_path / 'm'}'") as e:
        load_base_model(cfg, tok)
    assert "\n" not in str(e.value)
