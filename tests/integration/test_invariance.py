"""Same global batch, any layout, same parameters (accelerate's test_sync, end to end).

Real runs through ``largebatch.train.build.train`` (the trainer, its plan and engine, as the
CLI runs them): world 2 is two processes over gloo, one ``tests._launch.spawn`` launch that
trains every world-2 layout in turn (start-up paid once, not once per layout); world 1 runs in
this process, on one thread like the ranks. The reference is a plain single-process loop fed each whole global batch (no
accumulation, no DDP).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from largebatch.checkpoint import load_checkpoint
from largebatch.data import load_mnist_tensors, shard_indices
from largebatch.config import DataConfig
from largebatch.data.mnist import normalize_uint8
from largebatch.models.mnist import MLP
from tests._launch import spawn
from tests.conftest import CONFIGS, one_thread

TOL = 1e-5  # fp32 sums in another order (per-micro-batch partial sums, gloo all-reduce)
# name -> (world, micro, accum, subset, steps); accum None: derived from the other two.
FOUR_LAYOUTS = {"w1_m240": (1, 240, None, 2400, 10), "w1_m60_a4": (1, 60, 4, 2400, 10),
                "w2_m60_a2": (2, 60, 2, 2400, 10), "w2_m120_a1": (2, 120, 1, 2400, 10)}
# 1000 samples at global 240: four full windows, then one of 40 (20 per rank).
SHORT_LAST = {"w1": (1, 60, None, 1000, 5), "w2": (2, 60, None, 1000, 5)}
LAYOUTS = {**FOUR_LAYOUTS, **{f"short_{k}": v for k, v in SHORT_LAST.items()}}


def _train(root: str, out: Path, world: int, rank: int, micro: int, accum, subset: int,
           steps: int) -> None:
    from largebatch.config import load_config
    from largebatch.dist import DistEnv
    from largebatch.train.build import train
    overrides = [f"data.root={root}", "data.download=false", f"data.subset={subset}",
                 "batch.global_size=240", f"batch.micro_size={micro}",
                 f"train.max_steps={steps}", f"log.out_dir={out}", "log.progress=false"]
    if accum is not None:  # all three given: must agree with the world size
        overrides.append(f"batch.accum_steps={accum}")
    denv = (DistEnv("torchrun", rank=rank, world_size=world, local_rank=rank) if world > 1
            else DistEnv("none"))
    train(load_config(CONFIGS / "mnist" / "mlp.yaml", overrides), denv, quiet=True)


def _world_two(rank: int, world: int, root: str, out: str) -> None:
    for name, (w, micro, accum, subset, steps) in LAYOUTS.items():
        if w == world:
            _train(root, Path(out) / name, world, rank, micro, accum, subset, steps)


@pytest.fixture(scope="module")
def trained(mnist_root, tmp_path_factory) -> Path:
    """Every layout's run, once per module; returns the folder holding one run per name."""
    out = tmp_path_factory.mktemp("invariance")
    spawn(_world_two, 2, str(mnist_root), str(out), timeout=300)
    with one_thread():
        for name, (world, micro, accum, subset, steps) in LAYOUTS.items():
            if world == 1:
                _train(str(mnist_root), out / name, 1, 0, micro, accum, subset, steps)
    return out


def _params(trained: Path, name: str) -> dict:
    return load_checkpoint(trained / name / "model.pt")["model"]


def _reference(root, subset, steps, global_size=240):
    """Plain loop: one optimizer step per whole global batch, in the sampler's order."""
    images, labels = load_mnist_tensors(DataConfig(root=str(root), download=False,
                                                   subset=subset), train=True)
    torch.manual_seed(1)
    model = MLP(hidden=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    order = shard_indices(len(labels), 0, 1, seed=1, epoch=0)
    for step in range(steps):
        idx = order[step * global_size:(step + 1) * global_size]
        loss = F.nll_loss(model(normalize_uint8(images[idx])), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.state_dict()


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_four_layouts_match_the_global_batch_reference(trained, mnist_root):
    ref = _reference(mnist_root, 2400, 10)
    for name in FOUR_LAYOUTS:
        diff = _max_diff(_params(trained, name), ref)
        assert diff <= TOL, f"{name}: max abs diff {diff:.3g} > {TOL}"
    # and the runs really trained: parameters moved far beyond the tolerance
    torch.manual_seed(1)
    init = MLP(hidden=64).state_dict()
    assert _max_diff(ref, init) > 1e-2


def test_short_last_window_is_exact(trained, mnist_root):
    """1000 samples at global 240: four full windows, then one of 40 (20 per rank)."""
    ref = _reference(mnist_root, 1000, 5)
    for name in SHORT_LAST:
        diff = _max_diff(_params(trained, f"short_{name}"), ref)
        assert diff <= TOL, f"{name}: max abs diff {diff:.3g} > {TOL}"
