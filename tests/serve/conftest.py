"""Fixtures of the serving tests (tests/serve): a real tiny pipeline wrapped in DollyPyfunc."""
import pytest
import torch

from helpers import SMALLEST, same_model
from dolly import prompts
from dolly.serve.pyfunc import DollyPyfunc


@pytest.fixture(scope="module")
def wrapped():
    """MLflow's own transformers pyfunc over a real tiny pipeline (64-token context), wrapped."""
    import transformers
    from mlflow.transformers import _TransformersWrapper

    from dolly.config import load_config
    from dolly.models.tiny import build_tiny
    from dolly.tokenizer import build_tokenizer

    cfg = load_config(None, SMALLEST)
    tok = build_tokenizer(cfg, [])
    tok.padding_side = "left"
    torch.manual_seed(0)
    pipe = transformers.pipeline("text-generation", model=build_tiny(cfg, tok), tokenizer=tok)
    inner = _TransformersWrapper(pipe, {}, {"return_full_text": False, "batch_size": 2},
                                 prompts.PROMPT_TEMPLATE)
    return DollyPyfunc(inner, {})


@pytest.fixture(scope="module")
def lively(wrapped):
    """`wrapped` with its weights scaled 6x: a random model whose answers differ from prompt to
    prompt (the unscaled one answers nearly every prompt alike), so a mix-up would show."""
    import copy

    import transformers

    model = copy.deepcopy(wrapped.pipeline.model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6.0)
    pipe = transformers.pipeline("text-generation", model=model,
                                 tokenizer=wrapped.pipeline.tokenizer)
    return same_model(type("W", (), {"pipeline": pipe})(), 0)
