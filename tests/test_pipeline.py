"""dolly.pipeline: what a step's reuse key depends on, and the summary of a finished pipeline."""
from types import SimpleNamespace

from dolly import pipeline
from dolly.config import load_config


def _key(name, cfg, **inputs):
    return pipeline.step_key(name, {"config": "configs/tiny.yaml", **inputs}, cfg, "abc", "builtin")


def test_step_key_tracks_what_a_step_depends_on():
    cfg = load_config(None, {})
    faster = load_config(None, {"learning_rate": 0.01})
    more = load_config(None, {"builtin_records": 500})
    assert _key("data_prep", cfg) == _key("data_prep", faster)  # training settings: data reused
    assert _key("data_prep", cfg) != _key("data_prep", more)
    assert _key("train", cfg) != _key("train", faster)
    assert _key("train", cfg, prepared="runs:/a/prepared") != _key("train", cfg,
                                                                   prepared="runs:/b/prepared")
    assert pipeline.step_key("data_prep", {}, cfg, "abc", "builtin") != \
        pipeline.step_key("data_prep", {}, cfg, "abd", "builtin")  # another code version
    assert pipeline.step_key("data_prep", {}, cfg, "abc", "builtin") != \
        pipeline.step_key("data_prep", {}, cfg, "abc", "files:0f")  # another dataset
    assert pipeline.step_key("train", {}, cfg, "abc", "builtin") == \
        pipeline.step_key("train", {}, cfg, "abc", "files:0f")  # train reads data via its URI
    # evaluation and registry settings do not retrain; each redoes its own step and later ones
    fewer = load_config(None, {"eval_limit": 5})
    renamed = load_config(None, {"model_name": "other"})
    assert _key("train", cfg) == _key("train", fewer) == _key("train", renamed)
    assert _key("evaluate", cfg) != _key("evaluate", fewer)
    assert _key("evaluate", cfg) == _key("evaluate", renamed)
    assert _key("register", cfg) != _key("register", renamed)
    # batch scoring's Spark master does not touch any pipeline step
    spark = load_config(None, {"spark_master": "local[2]"})
    assert [_key(s, cfg) for s in pipeline.STEPS] == [_key(s, spark) for s in pipeline.STEPS]
    # an override counts by its value, however it was given; the profile's name not at all
    assert _key("train", faster) == _key("train", faster, learning_rate="0.01")
    renamed_profile = load_config(None, {"profile": "mine"})
    assert _key("train", cfg) == _key("train", renamed_profile)


def test_input_fingerprint_hashes_file_names_and_bytes(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text('{"instruction": "x", "output": "y"}\n')
    first = pipeline.input_fingerprint(load_config(None, {"dataset": str(a)}))
    assert first.startswith("files:") and len(first) == len("files:") + 64
    a.write_text('{"instruction": "x", "output": "z"}\n')
    assert pipeline.input_fingerprint(load_config(None, {"dataset": str(a)})) != first
    assert pipeline.input_fingerprint(load_config(None, {})) == "builtin"
    hub = load_config(None, {"dataset": "tatsu-lab/alpaca", "dataset_split": "train[:10]"})
    assert pipeline.input_fingerprint(hub) == "hub:tatsu-lab/alpaca[train[:10]]"


def _run(run_id, metrics=None, tags=None):
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id),
                           data=SimpleNamespace(metrics=metrics or {}, tags=tags or {}))


def test_summary_lists_metrics_verdict_and_reuse():
    runs = {"data_prep": _run("d1", tags={"data_hash": "h"}), "train": _run("t1"),
            "evaluate": _run("e1", {"base/exact_match": 0.0, "tuned/exact_match": 0.5,
                                    "base/rouge_l": 0.1, "tuned/rouge_l": 0.6,
                                    "tuned/exact_match/first": 0.925,
                                    "tuned/exact_match/count_digit": 1.0,
                                    "base/exact_match/first": 0.0,
                                    "base/exact_match/count_digit": 0.05,
                                    "tuned/rouge_l/first": 0.97,
                                    "base/exact_match_unseen": 0.0,
                                    "tuned/exact_match_unseen": 0.875,
                                    "tuned/exact_match_unseen/first": 0.75,
                                    "base/exact_match_unseen/first": 0.0}),
            "register": _run("r1", tags={"registered_model": "dolly", "registered_version": "3",
                                         "promoted": "true", "gate_reason": "better"})}
    reused = {"data_prep": True, "train": True, "evaluate": False, "register": False}
    metrics, tags, lines = pipeline.summary(load_config(None, {}), runs, reused, "models:/m-1")
    assert metrics == {"base/exact_match": 0.0, "base/rouge_l": 0.1, "tuned/exact_match": 0.5,
                       "tuned/rouge_l": 0.6, "tuned/exact_match/first": 0.925,
                       "tuned/exact_match/count_digit": 1.0, "base/exact_match/first": 0.0,
                       "base/exact_match/count_digit": 0.05, "registered_version": 3.0,
                       "base/exact_match_unseen": 0.0, "tuned/exact_match_unseen": 0.875,
                       "tuned/exact_match_unseen/first": 0.75,
                       "base/exact_match_unseen/first": 0.0,
                       "promoted": 1.0, "steps_reused": 2.0}
    assert tags["steps_reused"] == "data_prep,train" and tags["data_hash"] == "h"
    assert lines == [
        "main: summary",
        "  data_prep  run d1  (reused)",
        "  train      run t1  (reused)",
        "  evaluate   run e1",
        "  register   run r1",
        "  exact_match 0 -> 0.5, rouge_l 0.1 -> 0.6, exact_match_unseen 0 -> 0.875  (base -> tuned)",
        "  tuned exact match by family: count_digit 1.00, first 0.93",
        "  base exact match by family: count_digit 0.05, first 0.00",
        "  tuned exact match unseen by family: first 0.75 (unseen words)",
        "  base exact match unseen by family: first 0.00 (unseen words)",
        "  registered dolly v3: promoted to @champion; gate on exact_match",
    ]


def test_summary_without_families_has_no_family_line():
    runs = {"data_prep": _run("d1"), "train": _run("t1"),
            "evaluate": _run("e1", {"base/exact_match": 0.0, "tuned/exact_match": 0.5}),
            "register": _run("r1", tags={"registered_version": "1", "promoted": "false",
                                         "gate_reason": "worse"})}
    reused = dict.fromkeys(runs, False)
    _, _, lines = pipeline.summary(load_config(None, {}), runs, reused, "models:/m-1")
    assert not any("by family" in line for line in lines)


def test_description_puts_the_figures_first_and_links_every_step():
    lines = ["main: summary", "  data_prep  run d1  (reused)", "  evaluate   run e1",
             "  exact_match 0 -> 0.5  (base -> tuned)",
             "  tuned exact match by family: first 0.93", "  registered dolly v3: promoted"]
    runs = {n: SimpleNamespace(info=SimpleNamespace(run_id=f"{n[0]}1", run_name=f"{n} tiny",
                                                    experiment_id="7"))
            for n in ("data_prep", "evaluate")}
    text = pipeline.description(lines, runs, {"data_prep": True, "evaluate": False})
    assert text == "\n".join([
        "```", "main: summary", "  exact_match 0 -> 0.5  (base -> tuned)",
        "  tuned exact match by family: first 0.93", "  registered dolly v3: promoted", "```",
        "", "Step runs:",
        "- data_prep: [data_prep tiny](#/experiments/7/runs/d1) (reused)",
        "- evaluate: [evaluate tiny](#/experiments/7/runs/e1): base and tuned answers side by "
        "side, by family"])
