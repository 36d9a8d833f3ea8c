"""The reference face configs at real scale: each passes ``largebatch plan`` for 8 and 64 GPUs
(no data needed: ``data.num_samples``) with the batch arithmetic and the FC memory per rank
equal to closed-form values (insightface's class split: the first ``C mod N`` ranks hold one
extra class; fp32 rows of d floats; SGD momentum; r < 1: the window's sampled copy and its
gradient)."""
from __future__ import annotations

import json
import math

import pytest

from largebatch.cli import main
from tests.conftest import CONFIGS


def _plan(capsys, *argv: str) -> str:
    """``largebatch plan ...`` in this process (what the CLI prints); exit code 0 asserted."""
    with pytest.raises(SystemExit) as done:
        main(["plan", *argv])
    captured = capsys.readouterr()
    assert done.value.code == 0, captured.err
    return captured.out

# name -> (identities, images, sample_rate)
REFERENCE = {"ms1mv3_r50": (93_431, 5_179_510, 1.0),
             "glint360k_r100": (360_232, 17_091_657, 1.0),
             "webface42m_r100_pfc02": (2_059_906, 42_474_557, 0.2)}


@pytest.mark.parametrize("world", [8, 64])
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_config_plans_with_closed_form_fc_memory(name, world, capsys):
    classes, images, rate = REFERENCE[name]
    out = _plan(capsys, str(CONFIGS / "face" / f"{name}.yaml"), "--world-size", str(world),
                "--json")
    plan = json.loads(out.strip().splitlines()[-1])
    assert plan["global_size"] == 8192 and plan["micro_size"] == 128
    assert plan["accum_steps"] == 8192 // (128 * world)
    assert plan["dataset_size"] == images
    assert plan["steps_per_epoch"] == images // 8192  # drop_last
    assert plan["peak_lr"] == pytest.approx(0.1 * 8192 / 1024)
    head = plan["face_head"]
    local = -(-classes // world)
    row = 512 * 4
    assert head["num_local"] == local
    assert head["weight_bytes"] == local * row
    assert head["optimizer_bytes"] == local * row  # SGD momentum of every row
    sample = local if rate == 1.0 else math.ceil(rate * local)
    assert head["num_sample"] == sample
    assert head["grad_bytes"] == (local * row if rate == 1.0 else 2 * sample * row)
    assert head["logits_elements"] == 128 * world * sample


def test_plan_text_names_the_fc_memory_per_rank(capsys):
    out = _plan(capsys, str(CONFIGS / "face" / "glint360k_r100.yaml"), "--world-size", "8")
    assert "fc memory per rank: weights 87.95 MiB" in out  # 45029 x 512 x 4 B
