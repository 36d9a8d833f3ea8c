"""YAML has limits (issue 21): a config file over ``MAX_YAML_BYTES`` is refused unread, a
document whose aliases would expand past ``MAX_YAML_NODES`` nodes or ``MAX_YAML_CHARS``
characters is refused before it is expanded (a few hundred bytes of "billion laughs" used to
build a multi-GB error line), nesting past ``MAX_YAML_DEPTH`` is refused before Python's stack
runs out, and every error line the CLI prints is capped. Everything else keeps
``yaml.safe_load``'s semantics."""
from __future__ import annotations

import pytest
import yaml

from largebatch.config import ConfigError, load_config
from largebatch.config.io import (MAX_YAML_BYTES, MAX_YAML_CHARS, MAX_YAML_DEPTH,
                                  MAX_YAML_NODES, parse_override, read_yaml, safe_load)
from tests.conftest import CONFIGS
from tests.unit.data.test_hostile_inputs import assert_refused, run_all


def alias_bomb(levels: int = 9, fan: int = 9) -> str:
    """A config whose ``train.seed`` is ``fan ** levels`` strings once its aliases expand
    (9 ** 9 = 387,420,489: a repr of 2.7 GB), in a few hundred bytes."""
    lines = ["train:", '  seed: [&a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", '
             '"lol"],']
    for level in range(1, levels):
        prev, name = chr(ord("a") + level - 1), chr(ord("a") + level)
        lines.append(f"    &{name} [" + ", ".join([f"*{prev}"] * fan) + "],")
    lines[-1] = lines[-1].rstrip(",") + "]"
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("yaml")
    (d / "bomb.yaml").write_text(alias_bomb())
    assert (d / "bomb.yaml").stat().st_size < 1024
    with open(d / "big.yaml", "w") as f:  # 50 MB of one valid list
        f.write("data:\n  root: [")
        chunk = "1, " * 100_000
        while f.tell() < 50 << 20:
            f.write(chunk)
        f.write("1]\n")
    return run_all({"alias_bomb": ("plan", str(d / "bomb.yaml")),
                    "yaml_50mb": ("plan", str(d / "big.yaml"))})


def test_alias_bomb_is_refused_before_expanding(runs):
    print(runs["alias_bomb"].report())
    assert_refused(runs["alias_bomb"], "bomb.yaml: refused", f"limit of {MAX_YAML_NODES} nodes")


def test_a_50mb_config_is_refused_unread(runs):
    print(runs["yaml_50mb"].report())
    assert_refused(runs["yaml_50mb"], "big.yaml", f"over the {MAX_YAML_BYTES}-byte limit")


@pytest.mark.parametrize("text, message", [
    ("a: &a [*a]", "recursive alias"),
    ("a: " + "[" * 200 + "]" * 200, f"nested deeper than {MAX_YAML_DEPTH} levels"),
    ("a: [" + "1, " * (MAX_YAML_NODES + 10) + "1]", f"more than {MAX_YAML_NODES} nodes"),
    # few nodes, but one long string repeated: the characters count too
    ("a: &a '" + "x" * (1 << 20) + "'\nb: [*a, *a, *a, *a, *a]", f"{MAX_YAML_CHARS} characters"),
])
def test_limits_refuse_before_anything_is_built(text, message):
    with pytest.raises(yaml.YAMLError, match=message):
        safe_load(text)


def test_yaml_semantics_are_kept_within_the_limits():
    text = "base: &b {lr: 0.1, name: sgd}\noptim:\n  <<: *b\n  lr: 1e-3\nlist: [*b, *b]\n"
    assert safe_load(text) == {"base": {"lr": 0.1, "name": "sgd"},
                               "optim": {"lr": 1e-3, "name": "sgd"},
                               "list": [{"lr": 0.1, "name": "sgd"}] * 2}
    assert safe_load("") is None and safe_load("a: [1, 2]") == {"a": [1, 2]}
    with pytest.raises(yaml.YAMLError):  # still no Python objects
        safe_load("a: !!python/object/apply:os.system ['true']")
    assert parse_override("x=[1, 2") == {"x": "[1, 2"}  # malformed: the raw string, as before


def test_file_limits_name_the_file(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * MAX_YAML_BYTES + "\ntrain: {}\n")
    with pytest.raises(ConfigError, match=f"big.yaml: {MAX_YAML_BYTES + 13} bytes, over"):
        read_yaml(big)
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb())
    with pytest.raises(ConfigError, match="bomb.yaml: refused: its aliases expand"):
        load_config(bomb)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"train: \xff\xfe\n")
    with pytest.raises(ConfigError, match="binary.yaml: not UTF-8 text"):
        read_yaml(binary)


def test_an_override_bomb_is_refused():
    bomb = alias_bomb(levels=6, fan=10).replace("\n", " ").replace("train:   seed: ", "")
    with pytest.raises(ConfigError, match="override 'train.seed': refused: its aliases"):
        parse_override("train.seed=" + bomb)


def test_error_lines_quote_a_bounded_repr_and_are_capped(tmp_path, capsys):
    with pytest.raises(ConfigError) as exc:
        load_config(base={"train": {"seed": list(range(100_000))}})
    assert len(str(exc.value)) < 200, str(exc.value)
    assert "train.seed: expected an integer, got [0, 1, 2, 3, 4, 5, 6, 7, ...]" in str(exc.value)
    from largebatch.cli.main import MAX_ERROR_CHARS, main
    config, override = str(CONFIGS / "mnist" / "mlp.yaml"), "train." + "k" * 5000 + "=1"
    with pytest.raises(ConfigError) as exc:
        load_config(config, [override])
    full = str(exc.value)
    with pytest.raises(SystemExit) as exit_:
        main(["plan", config, override])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == (f"largebatch: error: {full[:MAX_ERROR_CHARS]}... "
                                       f"({len(full) - MAX_ERROR_CHARS} more characters)\n")
