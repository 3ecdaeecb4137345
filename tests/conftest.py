"""Shared fixtures (only fixtures: what tests share besides them is in helpers.py). Each test
builds its own tiny data; e2e tests run the real entry points."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import E2E_EXPERIMENT, FIXTURES, TINY_OVERRIDES, TinyModel, fresh_store, tracking_to


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    """A fresh sqlite tracking store and registry for one test."""
    return fresh_store(tmp_path)


@pytest.fixture
def alpaca_sample() -> Path:
    return FIXTURES / "alpaca_sample.json"


@pytest.fixture(scope="session", autouse=True)
def base_cache(tmp_path_factory) -> Path:
    """One pretrained-base cache (dolly.models.pretrain) for the whole session, in tmp: tests and
    the `mlflow run` processes they start (which inherit the variable) share it, and nothing is
    written to the user's ~/.cache."""
    from dolly.models.pretrain import CACHE_ENV

    folder = tmp_path_factory.mktemp("base_cache")
    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(folder)
    yield folder
    if old is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = old


# --- evaluate / register / serving / Spark e2e: one tiny logged model per session -------------

@pytest.fixture(scope="session")
def family_folders(tmp_path_factory) -> dict[str, Path]:
    """The five tiny model families of tests/families.py (GPT-J, GPT-NeoX, Llama, Qwen2,
    Mistral) as local Hugging Face folders, built once per session."""
    import families

    return families.prepare_families(tmp_path_factory.mktemp("families"),
                                     families.default_texts())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> TinyModel:
    """prepared/ data + the saved tiny base model (left padding, eos = `### End`) logged with
    registry.log_model into a run of experiment E2E_EXPERIMENT (artifacts under tmp)."""
    import mlflow
    from transformers import AutoTokenizer

    from dolly import data, registry, tracking
    from dolly.config import load_config
    from dolly.models.base import load_base_model
    from dolly.tokenizer import add_dolly_tokens
    from dolly.prompts import special_ids

    root = tmp_path_factory.mktemp("tiny_model")
    uri = f"sqlite:///{root}/mlflow.db"
    cfg = load_config(None, TINY_OVERRIDES)
    prepared = data.prepare(cfg, root / "prepared", progress=False)
    # padding_side given at load time is what save_pretrained persists (setting it later is not).
    tok = add_dolly_tokens(AutoTokenizer.from_pretrained(root / "prepared" / "tokenizer",
                                                         padding_side="left"))
    model = load_base_model(cfg, tok)  # the base cfg names (pretrained: from the session cache)
    model.generation_config.eos_token_id = special_ids(tok)[1]
    model.generation_config.pad_token_id = tok.pad_token_id
    final = root / "final"
    model.save_pretrained(final)
    tok.save_pretrained(final)
    with tracking_to(uri):
        client = mlflow.MlflowClient()
        exp = client.create_experiment(E2E_EXPERIMENT, artifact_location=str(root / "artifacts"))
        with mlflow.start_run(experiment_id=exp, run_name="train (test fixture)") as run:
            tracking.log_config(cfg, "train")
            model_uri = registry.log_model(final, cfg)
            mlflow.set_tags({"model_uri": model_uri, "data_hash": prepared.data_hash,
                             "mlflow.project.entryPoint": "train"})
    return TinyModel(root, uri, E2E_EXPERIMENT, root / "prepared", model_uri,
                     run.info.run_id, prepared.data_hash)


@pytest.fixture(scope="session")
def other_model(tiny_model) -> str:
    """A second logged model on tiny_model's data and tokenizer with other weights (seed 7):
    what a retrain gives. Returns its model URI."""
    import mlflow
    from transformers import AutoTokenizer

    from dolly import registry
    from dolly.config import load_config
    from dolly.models.base import load_base_model
    from dolly.tokenizer import add_dolly_tokens
    from dolly.prompts import special_ids

    cfg = load_config(None, {**TINY_OVERRIDES, "seed": 7})
    tok = add_dolly_tokens(AutoTokenizer.from_pretrained(tiny_model.prepared / "tokenizer",
                                                         padding_side="left"))
    model = load_base_model(cfg, tok)  # the base cfg names (pretrained: from the session cache)
    model.generation_config.eos_token_id = special_ids(tok)[1]
    model.generation_config.pad_token_id = tok.pad_token_id
    final = tiny_model.root / "final_seed7"
    model.save_pretrained(final)
    tok.save_pretrained(final)
    client = tiny_model.client()
    exp = client.get_experiment_by_name(tiny_model.experiment).experiment_id
    with tracking_to(tiny_model.tracking_uri), mlflow.start_run(experiment_id=exp,
                                                                run_name="train (seed 7)"):
        return registry.log_model(final, cfg)


@pytest.fixture(scope="session")
def champion(tiny_model) -> str:
    """tiny_model registered as `dolly` and made @champion (a passing gate); returns the version."""
    from dolly import registry
    from dolly.config import load_config

    cfg = load_config(None, TINY_OVERRIDES)
    with tracking_to(tiny_model.tracking_uri):
        eval_run = tiny_model.fake_eval_run(tuned=0.9, base=0.0)
        result = registry.register(
            tiny_model.model_uri, cfg, eval_metrics={"tuned/exact_match": 0.9,
                                                     "base/exact_match": 0.0},
            eval_run=eval_run, data_hash=tiny_model.data_hash, train_run=tiny_model.train_run,
            base_model=cfg.base_model, dataset=cfg.dataset)
    assert result.promoted, result.reason
    return result.version
