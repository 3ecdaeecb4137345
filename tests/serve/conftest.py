"""Fixtures of the serving tests (tests/serve): a real tiny pipeline wrapped in DollyPyfunc."""
import pytest
import torch

from helpers import SMALLEST
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
