"""registry.log_model on a real (tiny) saved model, into a sqlite store."""
import pytest

from helpers import SMALLEST, fresh_store, tracking_to


@pytest.mark.timeout(300)
def test_log_model_names_the_model_after_its_base_and_keeps_flavor_noise_out(tmp_path, capfd):
    import mlflow

    from dolly import registry
    from dolly.config import load_config
    from dolly.models.tiny import build_tiny
    from dolly.tokenizer import add_dolly_tokens, gptj_offline

    cfg = load_config(None, SMALLEST)
    tok = add_dolly_tokens(gptj_offline())
    folder = tmp_path / "final"
    build_tiny(cfg, tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    uri = fresh_store(tmp_path)
    with tracking_to(uri), mlflow.start_run() as run:
        model_uri = registry.log_model(folder, cfg)
    with tracking_to(uri):
        model = mlflow.get_logged_model(model_uri.removeprefix("models:/"))
    assert (model.name, model.source_run_id) == ("dolly-tiny-gptj", run.info.run_id)
    # MLflow's flavor warns that a local folder has no Hub card or licence: the project writes both
    err = capfd.readouterr().err
    assert "could not be retrieved from the hub" not in err
    assert "Unable to find license information" not in err
