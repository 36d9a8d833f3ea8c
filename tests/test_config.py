"""Config: sections, precedence CLI > file > defaults, unknown keys and wrong types."""
from __future__ import annotations

import pytest

from largebatch.config import (Config, ConfigError, describe, load_config, parse_override,
                               to_dict)
from tests.conftest import CONFIGS

REQUIRED_KEYS = ["data.root", "batch.global_size", "batch.micro_size", "batch.accum_steps",
                 "model.name", "optim.name", "optim.lr", "optim.momentum", "train.epochs",
                 "train.max_steps", "train.seed", "train.target_acc", "engine.name",
                 "log.out_dir", "log.wandb.mode"]


def test_public_keys_exist_and_are_documented():
    rows = {key: text for key, _, text in describe()}
    for key in REQUIRED_KEYS:
        assert key in rows, key
        assert rows[key], f"{key} has no docstring"


def test_seed_recipe_values():
    cfg = load_config(CONFIGS / "mnist" / "seed.yaml")
    assert (cfg.model.name, cfg.optim.name, cfg.optim.lr, cfg.optim.momentum) == \
        ("seed_cnn", "sgd", 0.02, 0.5)
    assert (cfg.batch.global_size, cfg.train.target_acc) == (60, 0.98)


def test_precedence_cli_over_file_over_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.5\n  momentum: 0.9\n")
    cfg = load_config(path, ["optim.lr=0.25"])
    assert cfg.optim.lr == 0.25          # CLI wins over the file
    assert cfg.optim.momentum == 0.9     # file wins over the default
    assert cfg.optim.weight_decay == Config().optim.weight_decay  # default
    assert isinstance(cfg.optim.lr, float)


def test_override_parsing_types():
    assert parse_override("batch.global_size=4096") == {"batch": {"global_size": 4096}}
    assert parse_override("study.batch_sizes=[1,6]") == {"study": {"batch_sizes": [1, 6]}}
    assert parse_override("log.wandb.mode=offline") == {"log": {"wandb": {"mode": "offline"}}}


@pytest.mark.parametrize("override, fragment", [
    (["optim.lrr=0.1"], "unknown config key 'optim.lrr'"),
    (["nope.x=1"], "unknown config key 'nope'"),
    (["optim.lr=abc"], "optim.lr: expected a number, got 'abc'"),
    (["batch.global_size=1.5"], "batch.global_size: expected an integer, got 1.5"),
    (["train.stop_at_target=3"], "train.stop_at_target: expected true/false"),
    (["engine.name=horovod"], "engine.name='horovod' is not one of"),
    (["log.wandb.mode=maybe"], "log.wandb.mode='maybe' is not one of"),
    (["optim.lr=-1"], "optim.lr=-1.0 must be > 0"),
    (["train.target_acc=1.5"], "train.target_acc=1.5 must be in [0, 1]"),
    (["optim"], "is not of the form key=value"),
])
def test_bad_values_are_one_line_errors_naming_the_key(override, fragment):
    with pytest.raises(ConfigError) as exc:
        load_config(CONFIGS / "mnist" / "seed.yaml", override)
    assert fragment in str(exc.value)
    assert "\n" not in str(exc.value)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("optim: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(evil)


def test_round_trip_to_dict():
    cfg = load_config(CONFIGS / "mnist" / "seed.yaml", ["study.batch_sizes=[6,60]"])
    again = load_config(None, base=to_dict(cfg))
    assert again == cfg
