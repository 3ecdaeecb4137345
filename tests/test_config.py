import pytest

from conftest import ROOT
from dolly import cli
from dolly.config import Config, load_config
from dolly.errors import ConfigError

PROFILES = sorted((ROOT / "configs").glob("*.yaml"))


def test_the_profiles_are_all_there():
    # the parametrized test below would pass with no profile at all
    assert {"gpt-j-6b-a10", "gpt-j-6b-a100", "gpt-j-6b-h100", "gpt-j-6b-v100",
            "tiny"} <= {p.stem for p in PROFILES}


def test_default_profile_is_the_dataclass_defaults():
    cfg = load_config(ROOT / "configs/tiny.yaml")
    assert cfg.to_dict() == {**Config().to_dict(), "profile": "tiny"}


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
