import pytest

from helpers import ROOT
from dolly import cli
from dolly.config import Config, load_config
from dolly.errors import ConfigError

PROFILES = sorted((ROOT / "configs").glob("*.yaml"))


def test_the_profiles_are_all_there():
    # the parametrized test below would pass with no profile at all
    assert {"gpt-j-6b-a10", "gpt-j-6b-a100", "gpt-j-6b-h100", "gpt-j-6b-v100",
            "tiny"} <= {p.stem for p in PROFILES}


def test_default_profile_is_the_dataclass_defaults_but_300_held_out_and_lora_lr():
    cfg = load_config(ROOT / "configs/tiny.yaml")
    assert cfg.to_dict() == {**Config().to_dict(), "profile": "tiny",
                             "test_size": 0.05, "lora_learning_rate": 3e-3}
    assert cfg.batching == "packed"  # the dataclass default, which the profile also states
    assert cfg.peak_learning_rate == 1e-3
    lora = load_config(ROOT / "configs/tiny.yaml", {"finetune": "lora"})
    assert (lora.peak_learning_rate, lora.adapters) == (3e-3, True)
    # without a profile's value (the dataclass default 0), adapters train at 10 x learning_rate
    assert Config(finetune="qlora", learning_rate=2e-4).peak_learning_rate == pytest.approx(2e-3)
    assert round(cfg.builtin_records * cfg.test_size) == 300


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_loads(profile):
    cfg = load_config(profile)
    assert cfg.profile == profile.stem


def test_gpu_profiles_follow_dolly():
    a100 = load_config(ROOT / "configs/gpt-j-6b-a100.yaml")
    assert (a100.base_model, a100.precision, a100.per_device_batch_size) == ("EleutherAI/gpt-j-6b", "bf16", 8)
    assert load_config(ROOT / "configs/gpt-j-6b-a10.yaml").offload_optimizer is True
    v100 = load_config(ROOT / "configs/gpt-j-6b-v100.yaml")
    assert (v100.precision, v100.offload_optimizer, v100.offload_params) == ("fp16", True, True)


def test_overrides_are_typed():
    cfg, inputs = cli.parse(
        ["--config", str(ROOT / "configs/tiny.yaml"), "--max_length", "128", "--test_size", "50",
         "--gradient_checkpointing", "true", "--learning_rate=2e-4", "--prepared", "runs:/x/prepared"],
        {"prepared": None})
    assert (cfg.max_length, cfg.test_size, cfg.gradient_checkpointing, cfg.learning_rate) == (128, 50.0, True, 2e-4)
    assert inputs == {"prepared": "runs:/x/prepared"}


@pytest.mark.parametrize("argv, message", [
    (["--no_such_key", "1"], "unknown config key 'no_such_key'"),
    (["--max_length", "lots"], "config key 'max_length': 'lots' is not a valid int"),
    (["--max_length", "4"], "config key 'max_length': 4 must be >= 16"),
    (["--too_long", "explode"], "config key 'too_long': 'explode' is not one of drop, truncate"),
    (["--gradient_checkpointing", "maybe"], "config key 'gradient_checkpointing': 'maybe' is not a valid bool"),
    (["--test_size", "2.5"], "config key 'test_size': 2.5 must be a fraction"),
    (["--config", "configs/nope.yaml"], "config file 'configs/nope.yaml' does not exist"),
])
def test_bad_overrides_give_one_line_errors(argv, message):
    with pytest.raises(ConfigError) as e:
        cli.parse(argv, {})
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_required_step_input():
    with pytest.raises(ConfigError, match="parameter 'prepared' is required"):
        cli.parse([], {"prepared": None})


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, {"seed": 7})
    path = cfg.save(tmp_path / "config.yaml")
    assert load_config(path).to_dict() == {**cfg.to_dict(), "profile": "tiny"}


def test_conda_env_matches_requirements():
    import yaml

    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    reqs = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    assert sorted(pip) == sorted(reqs)


def test_every_field_is_classified():
    """Each field declares the steps that read it; a new field cannot be left out of reuse."""
    from dolly.config import FIELDS, STEPS

    for name, f in FIELDS.items():
        assert set(f.metadata["steps"]) <= set(STEPS), name
        assert isinstance(f.metadata["checkpoint"], bool) and isinstance(f.metadata["base"], bool)
        assert f.metadata["help"].strip(), name


def test_derived_field_lists():
    from dolly.config import fields_where

    assert fields_where(step="data_prep") == (
        "dataset", "dataset_split", "columns", "builtin_records", "max_length", "too_long",
        "test_size", "seed", "base_model", "tokenizer", "prompt_format", "tokenizer_vocab_size")
    assert fields_where(checkpoint=True) == (
        "seed", "base_model", "tokenizer", "prompt_format", "tiny_n_layer", "tiny_n_embd", "tiny_n_head",
        "tiny_rotary_dim", "tiny_n_positions", "tiny_tie_embeddings", "pretrain_steps",
        "pretrain_batch_size", "pretrain_seq_len", "pretrain_learning_rate",
        "finetune", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
        "lora_learning_rate", "per_device_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler", "warmup_steps",
        "weight_decay", "adam_beta1", "adam_beta2", "max_grad_norm", "batching",
        "length_group_batches")
    assert fields_where(base=True) == (
        "seed", "base_model", "tiny_n_layer", "tiny_n_embd", "tiny_n_head", "tiny_rotary_dim",
        "tiny_n_positions", "tiny_tie_embeddings", "trust_remote_code", "pretrain_steps",
        "pretrain_batch_size", "pretrain_seq_len", "pretrain_learning_rate")
    assert fields_where(step="register") == tuple(
        n for n in fields_where()
        if n not in ("profile", "experiment_name", "spark_master", "gpu_memory_gb", "plan_check",
                     "launcher"))
    assert "eval_limit" not in fields_where(step="train")
    assert fields_where(step="batch_score") == ("model_name", "champion_alias", "spark_master")


def test_strings_round_trip_every_value():
    cfg = load_config(None, {"learning_rate": "1e-3", "test_size": "0.1", "epochs": 1 / 3,
                             "gradient_checkpointing": "yes", "columns": "instruction=q",
                             "seed": "7"})
    text = cfg.to_strings()
    assert all(isinstance(v, str) for v in text.values())
    assert Config.from_strings(text) == cfg
    changed = cfg.to_strings(changed_from=Config())
    assert changed == {"columns": "instruction=q", "seed": "7",
                       "epochs": repr(1 / 3), "gradient_checkpointing": "True",
                       "lora_learning_rate": "0.003"}
    assert Config.from_strings(changed) == cfg


@pytest.mark.parametrize("value", ["flase", "", "2", "None", "truee"])
def test_unparseable_bool_is_an_error(value):
    from dolly.config import parse_bool

    with pytest.raises(ConfigError, match=f"parameter 'reuse': {value!r} is not a valid bool"):
        parse_bool(value, "reuse", "parameter")


@pytest.mark.parametrize("value, expected", [("TRUE", True), (" on", True), ("0", False),
                                             ("No", False), (True, True)])
def test_bool_spellings(value, expected):
    from dolly.config import parse_bool

    assert parse_bool(value, "reuse") is expected


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError) as e:
        cli.parse(["--learning_rat", "1"], {})
    assert str(e.value).startswith("unknown config key 'learning_rat'; did you mean 'learning_rate'?")
    with pytest.raises(ConfigError) as e:
        cli.parse(["--modle_uri", "x"], {"model_uri": ""})
    assert "did you mean 'model_uri'?" in str(e.value)
    with pytest.raises(ConfigError) as e:
        cli.parse(["--zzz", "1"], {})
    assert "did you mean" not in str(e.value)


def test_parse_args_keeps_profile_and_raw_overrides():
    args = cli.parse_args(["--config", str(ROOT / "configs/tiny.yaml"), "--learning-rate", "1e-3",
                           "--reuse", "false"], {"reuse": "true"})
    assert args.profile == str(ROOT / "configs/tiny.yaml")
    assert args.overrides == {"learning_rate": "1e-3"}
    assert args.inputs == {"reuse": "false"}
    assert args.cfg.learning_rate == 1e-3


def test_docs_list_every_key():
    """docs/configuration.md's table is generated from Config (python -m steps.config --format
    markdown)."""
    from dolly.config import FIELDS
    from dolly.config_docs import markdown_table

    readme = (ROOT / "docs" / "configuration.md").read_text()
    start, end = "<!-- config-table:start -->\n", "\n<!-- config-table:end -->"
    table = readme[readme.index(start) + len(start):readme.index(end)]
    assert table == markdown_table()
    assert [ln.split("`")[1] for ln in table.splitlines()[2:]] == list(FIELDS)


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "  "],
     "config key 'dataset': '  ' must not be empty (builtin, a Hub id, or a file or folder)"),
    (["--seed", "-1"], "config key 'seed': -1 must be >= 0"),
    (["--epochs", "inf"], "config key 'epochs': inf must be finite"),
    (["--max_grad_norm", "inf"], "config key 'max_grad_norm': inf must be finite"),
    (["--master_port", "99999"], "config key 'master_port': 99999 must be a TCP port (1-65535)"),
    (["--champion_alias", ""], "config key 'champion_alias': '' must not be empty"),
])
def test_values_that_would_fail_later_fail_now(argv, message):
    with pytest.raises(ConfigError) as e:
        cli.parse(argv, {})
    assert str(e.value) == message


def test_a_profile_that_is_a_folder_or_not_utf8_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"is a folder, not a YAML file$"):
        load_config(tmp_path)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\x89PNG\r\n\xff\xfe")
    with pytest.raises(ConfigError, match=r"bin.yaml' is not UTF-8 text \(byte 0\)$"):
        load_config(binary)
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbfseed: 7\n")
    assert load_config(bom).seed == 7


def test_config_entry_point_shows_values_as_typed_and_every_reader(capsys):
    # Issue 24: `builtin_records (int) = '3000'` and `launcher ... read by: -` misled.
    from steps import config as config_step

    config_step.main(["--builtin_records", "1500", "--key", "builtin_records"])
    assert capsys.readouterr().out.splitlines()[2:4] == [
        "builtin_records (int) = 1500 (default 6000)",
        "  read by: data_prep, train, evaluate, register"]
    config_step.main(["--key", "launcher"])
    assert capsys.readouterr().out.splitlines()[2:5] == [
        "launcher (str) = 'deepspeed'", "  choices: deepspeed, spark", "  read by: train"]


def test_read_by_lists_the_fields_an_entry_point_reads_in_declaration_order():
    from dolly.config import read_by

    assert read_by("batch_score") == ("experiment_name", "model_name", "champion_alias",
                                      "spark_master")
    assert read_by("data_prep") == ("dataset", "dataset_split", "columns", "builtin_records",
                                    "max_length", "too_long", "test_size", "seed", "base_model",
                                    "tokenizer", "prompt_format", "tokenizer_vocab_size",
                                    "experiment_name")
    assert "launcher" in read_by("train") and "learning_rate" not in read_by("data_prep")
