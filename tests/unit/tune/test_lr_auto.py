"""``optim.lr: auto``: the range test at run start, then training from the original init.

References, independent of the auto path: an explicit run at the suggested LR and warmup, the
``largebatch lr-find`` command on the same config, an uninterrupted run for the resume.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from largebatch.checkpoint import load_checkpoint
from largebatch.dist import DistEnv
from largebatch.train.build import build_run, train

from tests._launch import spawn
from tests.conftest import REPO, assert_same_weights

SEED = str(REPO / "configs/mnist/seed.yaml")
# seed_cnn has dropout: equal weights need the RNG streams restored after the ramp too.
# 960 samples / 96 = 10 steps per epoch; accumulation 2; the ramp (<= 100 steps) cycles epochs.
BASE = ["data.subset=960", "data.test_subset=200", "batch.global_size=96",
        "batch.micro_size=48", "train.epochs=1", "log.progress=false", "train.device=cpu",
        "data.download=false"]
STEPS = 8


def _cfg(root: Path, out: Path, *extra: str):
    from largebatch.config import load_config
    return load_config(SEED, [*BASE, f"data.root={root}", f"log.out_dir={out}", *extra])


def _weights(out: Path) -> dict:
    return load_checkpoint(out / "model.pt")["model"]


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory, mnist_root):
    """One uninterrupted optim.lr=auto run of STEPS steps: (out dir, summary, record)."""
    out = tmp_path_factory.mktemp("auto")
    summary = train(_cfg(mnist_root, out, "optim.lr=auto", f"train.max_steps={STEPS}"))
    return out, summary, summary["plan"]["lr_auto"]


def test_auto_equals_an_explicit_run_at_the_suggestion(auto_run, mnist_root, tmp_path):
    out, summary, rec = auto_run
    assert rec["source"] == "lr_find" and rec["ramp_steps"] >= 20 and rec["global_size"] == 96
    # The suggestion is the finder's own (lr_find.json), recorded in plan.json and summary.json.
    found = json.loads((out / "lr_find.json").read_text())
    assert rec["peak_lr"] == found["suggestions"]["lr"] == min(rec["steepest"], rec["max_stable"])
    assert json.loads((out / "plan.json").read_text())["lr_auto"] == rec
    assert (out / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "config.json").read_text())["optim"]["lr"] == "auto"
    # The config sets no warmup: lr-find's is used (and it is shorter than the 10-step epoch).
    assert rec["warmup_from"] == "lr-find's" and 0 < rec["warmup_steps"] < STEPS
    assert rec["warmup_start_factor"] == found["suggestions"]["warmup_start_factor"]
    plain = tmp_path / "explicit"
    want = train(_cfg(mnist_root, plain, f"optim.lr={rec['peak_lr']!r}",
                      f"train.max_steps={STEPS}", f"schedule.warmup_steps={rec['warmup_steps']}",
                      f"schedule.warmup_start_factor={rec['warmup_start_factor']!r}"))
    # Same init, same data order, same LRs: bit-identical weights (the ramp trained ~100 steps
    # in between, and put everything back).
    assert_same_weights(_weights(plain), _weights(out))
    assert summary["final_train_loss"] == want["final_train_loss"]
    assert summary["final_lr"] == want["final_lr"] == rec["peak_lr"]
    lrs = [json.loads(line).get("lr") for line in (out / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["kind"] == "train"]
    assert len(lrs) == STEPS  # the ramp logged nothing
    assert lrs[0] == pytest.approx(rec["peak_lr"] * rec["warmup_start_factor"], rel=1e-12)


def _mlp_auto(root: str, out: str, *extra: str):
    # mlp has no dropout: 2 ranks (per-rank dropout streams) and 1 process see the same ramp.
    return _cfg(Path(root), Path(out), "optim.lr=auto", "model.name=mlp",
                "checkpoint.resume=never", *extra)


@pytest.fixture(scope="module")
def mlp_one(tmp_path_factory, mnist_root) -> dict:
    """The 1-process optim.lr=auto mlp run, built (the ramp runs at build): its record."""
    run = build_run(_mlp_auto(str(mnist_root), str(tmp_path_factory.mktemp("one"))), quiet=True)
    assert run.plan.accum_steps == 2
    return run.plan.lr_auto


def test_suggestion_is_what_the_lr_find_command_gives(mlp_one, mnist_root, tmp_path, capsys):
    from largebatch.cli import main
    rec = mlp_one
    with pytest.raises(SystemExit) as exc:
        main(["lr-find", SEED, *BASE, f"data.root={mnist_root}", "optim.lr=auto", "--json",
              "model.name=mlp", "--out", str(tmp_path / "lrf"),
              f"log.out_dir={tmp_path / 'run'}"])
    assert exc.value.code == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    s = got["suggestions"]
    assert (s["lr"], s["steepest"], s["max_stable"]) == (rec["peak_lr"], rec["steepest"],
                                                         rec["max_stable"])
    assert s["warmup_steps"] == rec["warmup_steps"] and got["steps"] == rec["ramp_steps"]
    assert f"optim.lr={rec['peak_lr']:.4g}" in got["train_overrides"]  # base 1 x factor 1


def test_resume_does_not_rerun_the_finder_and_ends_identical(auto_run, mnist_root, tmp_path,
                                                             capsys):
    straight, want, rec = auto_run
    cut = tmp_path / "cut"
    first = train(_cfg(mnist_root, cut, "optim.lr=auto", "train.max_steps=4",
                       "checkpoint.every_steps=4"))
    assert first["steps"] == 4 and first["plan"]["lr_auto"] == rec
    (cut / "lr_find.json").unlink()
    capsys.readouterr()
    second = train(_cfg(mnist_root, cut, "optim.lr=auto", f"train.max_steps={STEPS}"))
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "at step 4" in printed
    assert "not run again" in printed and "lr-find suggests" not in printed
    assert not (cut / "lr_find.json").exists()  # the finder did not run
    assert second["steps"] == STEPS and second["plan"]["lr_auto"] == rec
    assert json.loads((cut / "plan.json").read_text())["lr_auto"] == rec
    assert_same_weights(_weights(straight), _weights(cut))
    assert second["final_train_loss"] == want["final_train_loss"]


def _two_ranks(rank: int, world: int, root: str, out: str) -> dict:
    """One rank: build the auto run over DDP (the ramp runs at build) and report its LR."""
    run = build_run(_mlp_auto(root, out, "engine.name=ddp"),
                    DistEnv("torchrun", rank=rank, world_size=world), quiet=True)
    groups = [g["lr"] for opt in run.engine.optimizers for g in opt.param_groups]
    return {"record": run.plan.lr_auto, "groups": groups, "peak": run.trainer.schedule.peak_lr,
            "accum": run.plan.accum_steps}


def test_noise_scale_advice_uses_the_found_lr(mlp_one, mnist_root, tmp_path, capsys):
    """``largebatch noise-scale`` with optim.lr=auto: the LR column is the linear rule applied
    to the range test's peak (the fixture's run of the same config), not to the placeholder."""
    from largebatch.cli import main
    peak = mlp_one["peak_lr"]
    with pytest.raises(SystemExit) as exc:
        main(["noise-scale", SEED, "--steps", "6", "--json", *BASE, f"data.root={mnist_root}",
              "optim.lr=auto", "model.name=mlp", "optim.scale_rule=linear",
              f"log.out_dir={tmp_path / 'run'}"])
    assert exc.value.code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert peak != pytest.approx(1.0) and out["configured"]["lr"] == pytest.approx(peak)
    assert len(out["table"]) >= 2
    for row in out["table"]:  # base batch unset: the configured 96
        assert row["lr"] == pytest.approx(peak * row["global_size"] / 96), row


def test_two_gloo_ranks_agree_and_match_one_process(mlp_one, mnist_root, tmp_path):
    """2 ranks x micro 48 = 1 process's 96 (micro 48 x accum 2): the same ramp up to fp32
    summation order, so the same LRs out of the same discrete ramp; every rank alike."""
    rec = mlp_one
    got = spawn(_two_ranks, 2, str(mnist_root), str(tmp_path / "ddp"), timeout=180)
    assert [g["accum"] for g in got] == [1, 1]
    assert got[0]["record"] == got[1]["record"]
    assert got[0]["groups"] == got[1]["groups"] and len(set(got[0]["groups"])) == 1
    assert got[0]["peak"] == got[1]["peak"] == got[0]["record"]["peak_lr"]
    for key in ("peak_lr", "steepest", "lr_at_min", "warmup_steps", "ramp_steps"):
        assert got[0]["record"][key] == rec[key], key
    first = rec["peak_lr"] * (rec["warmup_start_factor"] if rec["warmup_steps"] else 1.0)
    assert got[0]["groups"][0] == pytest.approx(first, rel=1e-12)


@pytest.mark.parametrize("value, words", [("fast", "optim.lr: expected a number, got 'fast'"),
                                          ("-0.1", "optim.lr=-0.1 must be > 0"),
                                          ("0", "optim.lr=0.0 must be > 0")])
def test_bad_lr_is_one_line_exit_2(capsys, value, words):
    from largebatch.cli import main
    with pytest.raises(SystemExit) as exc:
        main(["train", SEED, f"optim.lr={value}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and words in err[0], err


def test_plan_command_shows_the_pending_auto_lr(capsys, mnist_root):
    from largebatch.cli import main
    with pytest.raises(SystemExit) as exc:
        main(["plan", SEED, f"data.root={mnist_root}", "optim.lr=auto", "optim.scale_rule=linear",
              "optim.base_batch=60", "batch.global_size=240"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    # The placeholder (base 1, so peak 1 x 240 / 60 = 4) is not printed as if it were an LR.
    assert "lr: auto (LR range test at batch 240" in out and "rule linear from batch 60" in out
    assert "peak 4" not in out and "base 1 " not in out and "lr auto: pending" in out


def test_the_ramp_leaves_the_noise_scale_estimate_as_it_was(mnist_root, tmp_path):
    """train.noise_scale: the ramp's ~100 steps feed the B_simple EMAs too; the run must start
    with them as a run without the test does (empty)."""
    run = build_run(_mlp_auto(str(mnist_root), str(tmp_path / "a"), "train.noise_scale=true"),
                    quiet=True)
    plain = build_run(_cfg(mnist_root, tmp_path / "b", "model.name=mlp", "optim.lr=0.05",
                           "train.noise_scale=true", "checkpoint.resume=never"), quiet=True)
    assert run.trainer.noise.kind == "micro" and run.plan.lr_auto["ramp_steps"] >= 20
    assert run.trainer.noise.state_dict() == plain.trainer.noise.state_dict()
    assert run.trainer.noise.metrics == plain.trainer.noise.metrics == {}
