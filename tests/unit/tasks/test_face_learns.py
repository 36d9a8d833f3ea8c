"""The face pipeline learns: ``torchrun --standalone --nproc_per_node 2 -m largebatch train
configs/face/synthetic_tiny.yaml`` (DDP, and DeepSpeed for the backbone) reaches verification
accuracy >= 0.9 on the held-out synthetic identities and writes it to summary.json and
metrics.jsonl (the face analogue of the MNIST study's proof that the pipeline learns).

Chance is 0.5 (half the pairs are of the same identity) and raw pixels score about 0.89, so
>= 0.9 needs features learned on the training identities that transfer to unseen ones.
"""
from __future__ import annotations

import json

import pytest

from tests.conftest import CONFIGS, cli_env, run_torchrun

TINY = CONFIGS / "face" / "synthetic_tiny.yaml"


@pytest.mark.slow
@pytest.mark.parametrize("engine", ("ddp", "deepspeed"))
def test_synthetic_tiny_reaches_verification_0_9(engine, tmp_path):
    out = tmp_path / "run"
    env = cli_env(TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"))
    proc = run_torchrun(2, "train", str(TINY), f"engine.name={engine}", f"log.out_dir={out}",
                        "log.progress=false", timeout=240, env=env)
    assert proc.returncode == 0, proc
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == engine and summary["world_size"] == 2
    assert summary["stop_reason"] == "epochs" and not summary["diverged"]
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert summary["final_verification_acc"] == evals[-1]["verification_acc"] >= 0.9
    assert evals[0]["verification_acc"] < evals[-1]["verification_acc"]  # it kept learning
