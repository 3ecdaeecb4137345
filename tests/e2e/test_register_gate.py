"""The promotion gate compares like with like: one evaluation set, and weights registered once."""
import pytest

pytestmark = pytest.mark.timeout(600)


def _register(tiny, model_uri, eval_run, name):
    proc = tiny.mlflow_run("register", {"model_uri": model_uri, "eval_run": eval_run,
                                        "model_name": name})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_identical_weights_are_not_registered_twice(tiny_model):
    name = "dolly_same_weights"
    first = tiny_model.fake_eval_run(0.6, 0.0, eval_set="set-300")
    _register(tiny_model, tiny_model.model_uri, first, name)
    client = tiny_model.client()
    v1 = client.get_model_version(name, "1")
    assert len(v1.tags) <= 8, v1.tags
    assert set(v1.tags) == {"data_hash", "train_run_id", "eval_run_id", "eval_set",
                            "weights_sha256", "tuned/exact_match", "promoted", "gate_reason"}
    assert client.get_registered_model(name).description.startswith(f"# {name}: an instruction")
    # the same weights evaluated on 50 records score higher: still not a new version
    again = tiny_model.fake_eval_run(0.64, 0.0, eval_set="set-50", eval_limit=50)
    proc = _register(tiny_model, tiny_model.model_uri, again, name)
    assert [str(v.version) for v in client.search_model_versions(f"name='{name}'")] == ["1"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert f"register: {name} v1 already holds these weights" in proc.stdout
    run = client.search_runs([client.get_experiment_by_name(tiny_model.experiment).experiment_id],
                             f"params.model_name = '{name}'",
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    assert run.data.tags["gate_reason"] == ("identical weights are already v1: not registered "
                                            "again, @champion left alone")
    assert run.data.metrics["duplicate_weights"] == 1.0


def test_better_candidate_on_another_set_is_compared_on_one_set(tiny_model, other_model):
    """The champion's 0.9 was measured on another set; re-evaluated on the candidate's records
    (the untrained fixture model answers none of them) it scores 0.0, so 0.5 wins."""
    from dolly import data
    from dolly.digests import eval_set_digest
    from dolly.eval import evaluate

    name = "dolly_sets"
    champ_eval = tiny_model.fake_eval_run(0.9, 0.0, eval_set="another-set")
    _register(tiny_model, tiny_model.model_uri, champ_eval, name)
    client = tiny_model.client()
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"

    _, test, _ = data.load_prepared(tiny_model.prepared)
    eval_set = eval_set_digest(tiny_model.data_hash, evaluate.select(test, 8))
    cand_eval = tiny_model.fake_eval_run(0.5, 0.0, model_uri=other_model, eval_set=eval_set,
                                         eval_limit=8)
    proc = _register(tiny_model, other_model, cand_eval, name)
    assert "register: champion v1 was evaluated on another set: evaluating it on this one " \
           "(8 records)" in proc.stdout
    assert str(client.get_model_version_by_alias(name, "champion").version) == "2", proc.stdout[-1500:]
    reason = client.get_model_version(name, "2").tags["gate_reason"]
    assert reason == ("tuned exact_match 0.5 beats base 0 and is not worse than champion v1 (0) "
                      "(champion v1 re-evaluated on this set: exact_match 0, was 0.9 on set "
                      "another-set)")
