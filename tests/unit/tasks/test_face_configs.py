"""The reference face configs: ours (``configs/face/NAME.yaml``, the large-batch recipe) and
arcface_torch's recipe (``configs/face/arcface_torch/NAME.yaml``).

* Each passes ``largebatch plan`` (no data needed: ``data.num_samples``) with the batch
  arithmetic and the FC memory per rank equal to closed-form values (insightface's class split:
  the first ``C mod N`` ranks hold one extra class; fp32 rows of d floats; SGD momentum; r < 1:
  the window's sampled copy and its gradient, plus the dense gradient without sparse updates).
* Every value the tables of docs/FACE.md ("Reference configs") state, in both columns, equals
  the YAML's: the tables are parsed here, so the doc and the configs cannot drift apart.
* The arcface_torch configs' LR equals, at every one of their optimizer steps, arcface_torch's
  ``PolynomialLRWarmup`` as ``train_v2.py`` steps it, re-implemented below from its definition.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from types import SimpleNamespace

import pytest

from largebatch.cli import main
from largebatch.config import Config, load_config
from largebatch.optim.schedules import build_schedule
from largebatch.plan import BatchPlan, make_plan
from tests.conftest import CONFIGS, REPO

FACE_DOC = REPO / "docs" / "FACE.md"
FAMILIES = {"ours": CONFIGS / "face", "arcface_torch": CONFIGS / "face" / "arcface_torch"}
# name -> (identities, images, sample_rate)
REFERENCE = {"ms1mv3_r50": (93_431, 5_179_510, 1.0),
             "glint360k_r100": (360_232, 17_091_657, 1.0),
             "webface42m_r100_pfc02": (2_059_906, 42_474_557, 0.2)}
# family -> (global batch, peak LR, world sizes the plan is checked at)
BATCH = {"ours": (8192, 0.8, (8, 64)), "arcface_torch": (1024, 0.1, (8,))}


def _plan(capsys, *argv: str) -> str:
    """``largebatch plan ...`` in this process (what the CLI prints); exit code 0 asserted."""
    with pytest.raises(SystemExit) as done:
        main(["plan", *argv])
    captured = capsys.readouterr()
    assert done.value.code == 0, captured.err
    return captured.out


def _load(family: str, name: str) -> tuple[Config, BatchPlan]:
    """The config and its plan on 8 GPUs (the world size the doc's step counts are for)."""
    cfg = load_config(FAMILIES[family] / f"{name}.yaml")
    return cfg, make_plan(cfg, 8, cfg.data.num_samples)


@pytest.mark.parametrize("family, name, world", [
    (family, name, world) for family in sorted(FAMILIES) for name in sorted(REFERENCE)
    for world in BATCH[family][2]])
def test_reference_config_plans_with_closed_form_fc_memory(family, name, world, capsys):
    classes, images, rate = REFERENCE[name]
    batch, peak, _ = BATCH[family]
    out = _plan(capsys, str(FAMILIES[family] / f"{name}.yaml"), "--world-size", str(world),
                "--json")
    plan = json.loads(out.strip().splitlines()[-1])
    assert plan["global_size"] == batch and plan["micro_size"] == 128
    assert plan["accum_steps"] == batch // (128 * world)
    assert plan["dataset_size"] == images
    assert plan["steps_per_epoch"] == images // batch  # drop_last
    assert plan["peak_lr"] == pytest.approx(peak)
    head = plan["face_head"]
    local = -(-classes // world)
    row = 512 * 4
    assert head["num_local"] == local
    assert head["weight_bytes"] == local * row
    assert head["optimizer_bytes"] == local * row  # SGD momentum of every row
    sample = local if rate == 1.0 else math.ceil(rate * local)
    assert head["num_sample"] == sample
    sparse = family == "ours"  # the arcface_torch config updates every row, like upstream
    dense = local * row if rate == 1.0 else 2 * sample * row + (0 if sparse else local * row)
    assert head["grad_bytes"] == dense
    assert head["logits_elements"] == 128 * world * sample


def test_plan_text_names_the_fc_memory_per_rank(capsys):
    out = _plan(capsys, str(CONFIGS / "face" / "glint360k_r100.yaml"), "--world-size", "8")
    assert "fc memory per rank: weights 87.95 MiB" in out  # 45029 x 512 x 4 B


# ---- the doc's tables against the YAML files ---------------------------------------------------
def doc_tables() -> dict[str, dict[str, dict[str, str]]]:
    """The tables of docs/FACE.md's "Reference configs" section: config name -> value ->
    {'arcface_torch': cell, 'ours': cell} (the header's first cell names the config)."""
    text = FACE_DOC.read_text()
    start = text.index("\n## Reference configs")
    section = text[start:text.index("\n## ", start + 1)]
    tables: dict[str, dict[str, dict[str, str]]] = {}
    rows: list[list[str]] = []
    for line in section.splitlines() + [""]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if rows:
            assert rows[0][1].startswith("arcface_torch") and rows[0][2] == "ours", rows[0]
            tables[rows[0][0].strip("`")] = {r[0]: {"arcface_torch": r[1], "ours": r[2]}
                                             for r in rows[2:]}
            rows = []
    return tables


def _match(pattern: str, cell: str) -> tuple[str, ...]:
    found = re.fullmatch(pattern, cell)
    assert found, f"table cell {cell!r} does not read as {pattern!r}"
    return found.groups()


def _margin(cell: str, cfg: Config, plan: BatchPlan) -> None:
    name, m1, m2, m3, s = _match(r"(ArcFace|CosFace) \(([\d.]+), ([\d.]+), ([\d.]+)\), s (\d+)",
                                 cell)
    f = cfg.face
    assert f.margin == name.lower()
    # insightface's margin_list (m1, m2, m3): ArcFace uses m2 only, CosFace m3 only
    triple = {"arcface": (1.0, f.m2, 0.0), "cosface": (1.0, 0.0, f.m3)}[f.margin]
    assert triple == (float(m1), float(m2), float(m3)) and f.s == float(s)


def _lr(cell: str, cfg: Config, plan: BatchPlan) -> None:
    lr, batch = _match(r"([\d.]+) at (\d+)", cell)
    assert plan.peak_lr == pytest.approx(float(lr), rel=1e-12)
    assert plan.global_size == int(batch)


def _warmup(cell: str, cfg: Config, plan: BatchPlan) -> None:
    epochs, start = _match(r"(\d+) epochs?(?: from ([\d.]+) x peak)?", cell)
    s = cfg.schedule
    assert s.warmup_epochs == float(epochs) and s.warmup_steps == 0
    assert plan.warmup_steps == int(epochs) * plan.steps_per_epoch
    assert s.warmup_start_factor == float(start or 0.0)


def _schedule(cell: str, cfg: Config, plan: BatchPlan) -> None:
    power, floor = _match(r"poly power ([\d.]+) to ([\d.]+)", cell)
    s = cfg.schedule
    assert (s.name, s.power, s.min_lr, s.total_steps) == ("poly", float(power), float(floor), 0)


def _steps(cell: str, cfg: Config, plan: BatchPlan) -> None:
    total, per_epoch, epochs = (int(x.replace(",", "")) for x in
                                _match(r"([\d,]+) = ([\d,]+) x (\d+)", cell))
    assert total == per_epoch * epochs and plan.steps_per_epoch == per_epoch
    assert plan.planned_steps(cfg.train.epochs, cfg.train.max_steps) == total


def _decay(cell: str, cfg: Config, plan: BatchPlan) -> None:
    (wd,) = _match(r"([\d.e-]+) on all parameters", cell)
    assert cfg.optim.weight_decay == float(wd) and cfg.optim.exclude_1d is False


def _sample_rate(cell: str, cfg: Config, plan: BatchPlan) -> None:
    rate, update = _match(r"([\d.]+)(?:, [\w ]+ \((dense|sparse)\))?", cell)
    assert cfg.face.sample_rate == float(rate)
    if update:  # r < 1: whether unsampled head rows move
        assert cfg.face.sparse_update == (update == "sparse")


def _batch(cell: str, cfg: Config, plan: BatchPlan) -> None:
    batch, per_gpu = _match(r"(\d+) \((\d+) per GPU\)", cell)
    assert plan.global_size == int(batch) and cfg.batch.micro_size == int(per_gpu)


def _clip(cell: str, cfg: Config, plan: BatchPlan) -> None:
    # the scope (upstream: the backbone's norm; largebatch: one global norm) is the doc's word
    clip, _scope = _match(r"([\d.]+) \((backbone only|backbone and head)\)", cell)
    assert cfg.optim.grad_clip == float(clip)


def _equal(get: Callable[[Config], object], parse: Callable[[str], object]):
    def check(cell: str, cfg: Config, plan: BatchPlan) -> None:
        assert get(cfg) == parse(cell), cell
    return check


CHECKS = {
    "margin (m1, m2, m3), s": _margin,
    "LR at global batch": _lr,
    "warmup": _warmup,
    "epochs": _equal(lambda c: c.train.epochs, float),
    "LR schedule": _schedule,
    "optimizer steps, 8 GPUs": _steps,
    "weight decay": _decay,
    "momentum": _equal(lambda c: c.optim.momentum, float),
    "optimizer": _equal(lambda c: c.optim.name, str.lower),
    "sample rate": _sample_rate,
    "embedding size": _equal(lambda c: c.face.embedding_size, int),
    "precision": _equal(lambda c: c.train.precision, str),
    "global batch (per GPU)": _batch,
    "gradient clipping": _clip,
}


def test_the_doc_has_a_table_per_config_with_every_value():
    tables = doc_tables()
    assert sorted(tables) == sorted(REFERENCE)
    for name, rows in tables.items():
        assert list(rows) == list(CHECKS), name


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_every_value_the_doc_states_is_the_yaml_value(name, family):
    cfg, plan = _load(family, name)
    for value, cells in doc_tables()[name].items():
        CHECKS[value](cells[family], cfg, plan)


# ---- arcface_torch's schedule, step by step ----------------------------------------------------
def polynomial_lr_warmup(lr: float, warmup: int, total: int, steps: int,
                         power: float = 1.0) -> list[float]:
    """The LR of optimizer steps 0 .. steps-1 under arcface_torch's ``PolynomialLRWarmup``,
    re-implemented from its definition (deepinsight/insightface ab27f4d6,
    recognition/arcface_torch/lr_scheduler.py ``get_lr``; train_v2.py builds it with
    ``warmup_iters=W, total_iters=T`` and the default power 1.0, and calls ``step()`` after each
    optimizer step, so step k runs at ``last_epoch = k``). torch's scheduler calls ``get_lr`` once
    in its constructor (k = 0), which returns the optimizer's LR unchanged; so does every k > T.
    Warmup is ``lr * k / W``; after it each step multiplies the previous LR by the ratio of
    consecutive ``(1 - (k - W) / (T - W)) ** power``, as upstream does (not the closed form)."""
    out, current = [], lr
    for k in range(steps):
        if 0 < k <= warmup:
            current = lr * k / warmup
        elif warmup < k <= total:
            ratio = (1.0 - (k - warmup) / (total - warmup)) / \
                (1.0 - (k - 1 - warmup) / (total - warmup))
            current = current * ratio ** power
        out.append(current)
    return out


# arcface_torch/configs/{ms1mv3_r50,glint360k_r100,wf42m_pfc02_r100}.py (d9cb10e6) on 8 GPUs:
# (config.lr, config.batch_size x world size, config.warmup_epoch, config.num_epoch)
UPSTREAM = {name: (0.1, 128 * 8, 0, 20) for name in REFERENCE}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_arcface_torch_config_follows_upstream_schedule_at_every_step(name):
    lr, batch, warmup_epoch, num_epoch = UPSTREAM[name]
    cfg, plan = _load("arcface_torch", name)
    per_epoch = REFERENCE[name][1] // batch  # train_v2.py: num_image // total_batch_size
    warmup, total = per_epoch * warmup_epoch, per_epoch * num_epoch
    assert plan.planned_steps(cfg.train.epochs) == total and plan.warmup_steps == warmup
    groups = SimpleNamespace(param_groups=[{"lr": 0.0}])
    sched = build_schedule(groups, cfg.schedule, plan, total)
    ours = [sched.base_lr(k) for k in range(total + 3)]
    ref = polynomial_lr_warmup(lr, warmup, total, total + 3)
    # upstream's running product drifts from the closed form by ~1e-13 relative over 8e5 steps
    # (pytest.approx over 8e5 floats would take seconds: one pass, the worst step named)
    err = [abs(a - b) - 1e-10 * abs(b) for a, b in zip(ours, ref)]
    worst = max(range(len(err)), key=err.__getitem__)
    assert err[worst] <= 1e-15, (worst, ours[worst], ref[worst])
    assert ours[0] == lr and ours[total:] == [0.0] * 3
    sched.step()
    assert groups.param_groups[0]["lr"] == ours[1]  # what step() applies is base_lr


def test_upstream_warmup_differs_only_at_step_zero():
    """With a warmup (upstream's 16/32-GPU WebFace42M files; none of the three here) largebatch's
    poly with warmup_start_factor 0 equals PolynomialLRWarmup at every step but the first, where
    upstream runs at the full LR (see docs/FACE.md)."""
    cfg = load_config(FAMILIES["arcface_torch"] / "ms1mv3_r50.yaml",
                      ["schedule.warmup_steps=3", "schedule.total_steps=10"])
    plan = make_plan(cfg, 8, cfg.data.num_samples)
    sched = build_schedule(SimpleNamespace(param_groups=[{"lr": 0.0}]), cfg.schedule, plan, 10)
    ours = [sched.base_lr(k) for k in range(13)]
    ref = polynomial_lr_warmup(0.1, 3, 10, 13)
    assert ours[1:] == pytest.approx(ref[1:], rel=1e-12, abs=1e-15)
    assert (ours[0], ref[0]) == (0.0, 0.1)
    assert ref[:5] == pytest.approx([0.1, 0.1 / 3, 0.2 / 3, 0.1, 0.1 * 6 / 7], rel=1e-12)
