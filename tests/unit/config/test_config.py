"""Config: sections, precedence CLI > file > defaults, unknown keys and wrong types."""
from __future__ import annotations

import pytest

from largebatch.config import (Config, ConfigError, describe, get_key, load_config,
                               parse_override, to_dict)
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


# ---- keys that do not apply to the chosen optimizer / schedule -------------------------------
NOT_APPLICABLE = [
    (["optim.name=lamb", "optim.nesterov=true"], "optim.nesterov=true", "optim.name=lamb"),
    (["optim.name=adamw", "optim.nesterov=true"], "optim.nesterov=true", "optim.name=adamw"),
    (["optim.name=sgd", "optim.betas=[0.8,0.9]"], "optim.betas=[0.8, 0.9]", "optim.name=sgd"),
    (["optim.name=lars", "optim.betas=[0.8,0.9]"], "optim.betas=[0.8, 0.9]", "optim.name=lars"),
    (["optim.name=adamw", "optim.momentum=0.9"], "optim.momentum=0.9", "optim.name=adamw"),
    (["optim.name=lamb", "optim.dampening=0.1"], "optim.dampening=0.1", "optim.name=lamb"),
    (["optim.name=sgd", "optim.eps=0.0001"], "optim.eps=0.0001", "optim.name=sgd"),
    (["optim.name=sgd", "optim.trust_coef=0.02"], "optim.trust_coef=0.02", "optim.name=sgd"),
    (["optim.name=adamw", "optim.trust_coef=0.02"], "optim.trust_coef=0.02", "optim.name=adamw"),
    (["optim.name=lamb", "optim.trust_eps=0.001"], "optim.trust_eps=0.001", "optim.name=lamb"),
    (["optim.name=sgd", "optim.trust_clip=true"], "optim.trust_clip=true", "optim.name=sgd"),
    (["optim.name=lars", "optim.trust_clip=true", "optim.max_trust=10"], "optim.max_trust=10.0",
     "optim.name=lars"),
    (["optim.name=adamw", "optim.always_adapt=true"], "optim.always_adapt=true",
     "optim.name=adamw"),
    (["optim.name=sgd", "optim.adapt_rule=timm"], "optim.adapt_rule=timm", "optim.name=sgd"),
    (["optim.name=lars", "optim.max_grad_norm=0"], "optim.max_grad_norm=0.0", "optim.name=lars"),
    (["optim.name=adamw", "optim.bias_correction=false"], "optim.bias_correction=false",
     "optim.name=adamw"),
    (["optim.name=lars", "optim.grad_averaging=false"], "optim.grad_averaging=false",
     "optim.name=lars"),
    (["optim.name=sgd", "optim.decoupled_decay=true"], "optim.decoupled_decay=true",
     "optim.name=sgd"),
    (["optim.name=adamw", "optim.fused=true"], "optim.fused=true", "optim.name=adamw"),
    (["schedule.name=cosine", "schedule.milestones=[100]"], "schedule.milestones=[100]",
     "schedule.name=cosine"),
    (["schedule.name=poly", "schedule.gamma=0.5"], "schedule.gamma=0.5", "schedule.name=poly"),
    (["schedule.name=cosine", "schedule.power=3"], "schedule.power=3.0", "schedule.name=cosine"),
    (["schedule.name=step", "schedule.milestones=[5]", "schedule.min_lr=0.001"],
     "schedule.min_lr=0.001", "schedule.name=step"),
    (["schedule.name=constant", "schedule.total_steps=100"], "schedule.total_steps=100",
     "schedule.name=constant"),
    (["schedule.name=cosine", "schedule.plateau.patience=3"], "schedule.plateau.patience=3",
     "schedule.name=cosine"),
    (["schedule.plateau.action=grow_batch"], "schedule.plateau.action=grow_batch",
     "schedule.name=constant"),
]


@pytest.mark.parametrize("overrides, key, choice", NOT_APPLICABLE)
def test_key_of_another_optimizer_or_schedule_is_an_error(overrides, key, choice):
    """One line naming the key (with its value) and the chosen optimizer/schedule."""
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    msg = str(exc.value)
    assert msg.startswith(f"{key} does not apply to {choice} (only to ") and "\n" not in msg


@pytest.mark.parametrize("overrides", [
    ["optim.name=lamb", "optim.momentum=0.0", "optim.nesterov=false"],  # explicit defaults
    ["optim.name=lars", "optim.momentum=0.9", "optim.nesterov=true", "optim.trust_clip=true",
     "optim.always_adapt=true", "optim.adapt_rule=timm", "optim.fused=true"],
    ["optim.name=lamb", "optim.betas=[0.8,0.9]", "optim.eps=0.001", "optim.trust_clip=true",
     "optim.max_trust=10", "optim.max_grad_norm=0", "optim.bias_correction=false",
     "optim.grad_averaging=false", "optim.decoupled_decay=true", "optim.always_adapt=true"],
    ["optim.name=sgd", "optim.momentum=0.9", "optim.dampening=0.1"],
    ["schedule.name=step", "schedule.milestones=[10]", "schedule.gamma=0.5"],
    ["schedule.name=poly", "schedule.power=1.5", "schedule.min_lr=0.001",
     "schedule.total_steps=50"],
    ["schedule.name=plateau", "schedule.plateau.patience=2", "schedule.plateau.factor=0.5"],
])
def test_keys_of_the_chosen_optimizer_and_schedule_are_accepted(overrides):
    cfg = load_config(None, overrides)  # no ConfigError, and each value arrived
    for item in overrides:
        key = item.split("=", 1)[0]
        value = parse_override(item)
        for part in key.split("."):
            value = value[part]
        assert get_key(cfg, key) == value, key


@pytest.mark.parametrize("overrides, fragment", [
    (["optim.dampening=1.5", "optim.momentum=0.9"], "optim.dampening=1.5 must be in [0, 1]"),
    (["optim.dampening=0.1"], "optim.dampening=0.1 has no effect with optim.momentum=0"),
    (["optim.nesterov=true"], "optim.nesterov=true needs optim.momentum > 0 and "
                              "optim.dampening=0 (got optim.momentum=0.0, optim.dampening=0.0)"),
    (["optim.name=lars", "optim.nesterov=true", "optim.momentum=0.9", "optim.dampening=0.1"],
     "optim.nesterov=true needs optim.momentum > 0 and optim.dampening=0"),
    (["optim.name=adamw", "optim.betas=[0.9,1.0]"],
     "optim.betas=[0.9, 1.0] must each be in [0, 1)"),
    (["optim.name=adamw", "optim.betas=[0.9]"], "optim.betas=[0.9] must have two values"),
    (["optim.name=lamb", "optim.eps=-0.1"], "optim.eps=-0.1 must be >= 0"),
    (["optim.name=lars", "optim.trust_coef=-1"], "optim.trust_coef=-1.0 must be >= 0"),
    (["optim.name=lars", "optim.trust_eps=-1"], "optim.trust_eps=-1.0 must be >= 0"),
    (["optim.name=lamb", "optim.max_grad_norm=-1"], "optim.max_grad_norm=-1.0 must be >= 0"),
    (["optim.name=lamb", "optim.trust_clip=true", "optim.max_trust=0"],
     "optim.max_trust=0.0 must be > 0"),
    (["optim.name=lamb", "optim.max_trust=10"],
     "optim.max_trust=10.0 has no effect without optim.trust_clip=true"),
    (["optim.name=lars", "optim.adapt_rule=paper"],
     "optim.adapt_rule='paper' is not one of rank|timm"),
    (["optim.momentum=1.0"], "optim.momentum=1.0 must be in [0, 1)"),
    (["schedule.name=plateau", "schedule.plateau.factor=1"],
     "schedule.plateau.factor=1.0 must be in (0, 1)"),
])
def test_new_optim_values_are_checked(overrides, fragment):
    with pytest.raises(ConfigError) as exc:
        load_config(None, overrides)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


def test_new_optim_keys_are_documented_with_timms_defaults():
    rows = {key: (default, text) for key, default, text in describe()}
    expected = {"optim.dampening": 0.0, "optim.nesterov": False, "optim.eps": None,
                "optim.trust_eps": 1e-8, "optim.trust_coef": 0.001, "optim.max_trust": 1.0,
                "optim.adapt_rule": "rank", "optim.max_grad_norm": 1.0,
                "optim.bias_correction": True, "optim.grad_averaging": True,
                "optim.decoupled_decay": False, "optim.always_adapt": False}
    for key, default in expected.items():
        assert rows[key][0] == default, key
        assert "timm" in rows[key][1] or key in ("optim.nesterov", "optim.max_trust",
                                                 "optim.dampening"), key


def test_config_does_not_import_the_optimizers(tmp_path):
    """Validation lives in config: loading and validating a config imports no optim module
    (the old config -> optim.schedules cycle). A fresh interpreter, so other tests' imports
    do not mask it."""
    import subprocess
    import sys
    code = ("import sys; from largebatch.config import load_config; "
            "load_config(None, ['schedule.name=step', 'schedule.milestones=[3]']); "
            "bad = [m for m in sys.modules if m.startswith('largebatch.optim')]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_exponent_floats_are_numbers_in_files_and_overrides(tmp_path):
    """PyYAML's YAML 1.1 rules read '1e-6' as a string; configs must read it as 1e-6."""
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  name: adamw\n  lr: 3e-4\n")
    cfg = load_config(path, ["optim.eps=1e-6", "optim.weight_decay=5E-2"])
    assert cfg.optim.lr == 0.0003 and cfg.optim.eps == 1e-6 and cfg.optim.weight_decay == 0.05


def test_yaml_tags_are_refused_in_one_line(tmp_path):
    """Python-object tags never construct anything: a one-line error naming the file."""
    path = tmp_path / "evil.yaml"
    path.write_text("optim: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError, match="evil.yaml: invalid YAML"):
        load_config(path)
    assert not (tmp_path / "pwned").exists()


def test_int_or_auto_key_stays_an_int_whatever_union_order_typing_cached():
    """typing caches equal unions (``int | str == str | int``): once ``Optional[str | int]``
    was built anywhere in the process, the config's ``Optional[int | str]`` can come back with
    str first. Whatever the order, 24 must stay the int 24 and 'auto' the string."""
    import typing

    from largebatch.config.io import _coerce
    for union in (typing.Union[str, int, None], typing.Union[int, str, None]):
        assert _coerce(24, union, "batch.micro_size") == 24
        assert isinstance(_coerce(24, union, "batch.micro_size"), int)
        assert _coerce("auto", union, "batch.micro_size") == "auto"
    cfg = load_config(CONFIGS / "mnist" / "seed.yaml",
                      ["batch.global_size=48", "batch.micro_size=24"])
    assert cfg.batch.micro_size == 24 and isinstance(cfg.batch.micro_size, int)
