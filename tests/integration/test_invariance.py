"""Same global batch, any layout, same parameters (accelerate's test_sync, end to end).

Real runs: world 2 is two processes over gloo under torchrun. The reference is a plain
single-process loop fed each whole global batch (no accumulation, no DDP).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from largebatch.checkpoint import load_checkpoint
from largebatch.data import load_mnist_tensors, shard_indices
from largebatch.config import DataConfig
from largebatch.data.mnist import normalize_uint8
from largebatch.models.mnist import MLP
from tests.conftest import run_cli, run_torchrun

TOL = 1e-5  # fp32 sums in another order (per-micro-batch partial sums, gloo all-reduce)


def _train(tmp_path, name, world, micro, accum, subset, steps, root):
    out = tmp_path / name
    args = ["train", "configs/mnist/mlp.yaml", f"data.root={root}", "data.download=false",
            f"data.subset={subset}", "batch.global_size=240", f"batch.micro_size={micro}",
            f"train.max_steps={steps}", f"log.out_dir={out}", "log.progress=false"]
    if accum is not None:  # all three given: must agree with the world size
        args.append(f"batch.accum_steps={accum}")
    proc = run_torchrun(world, *args) if world > 1 else run_cli(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_checkpoint(out / "model.pt")["model"]


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


def test_four_layouts_match_the_global_batch_reference(tmp_path, mnist_root):
    ref = _reference(mnist_root, 2400, 10)
    layouts = {"w1_m240": (1, 240, None), "w1_m60_a4": (1, 60, 4),
               "w2_m60_a2": (2, 60, 2), "w2_m120_a1": (2, 120, 1)}
    for name, (world, micro, accum) in layouts.items():
        params = _train(tmp_path, name, world, micro, accum, 2400, 10, mnist_root)
        diff = _max_diff(params, ref)
        assert diff <= TOL, f"{name}: max abs diff {diff:.3g} > {TOL}"
    # and the runs really trained: parameters moved far beyond the tolerance
    torch.manual_seed(1)
    init = MLP(hidden=64).state_dict()
    assert _max_diff(ref, init) > 1e-2


def test_short_last_window_is_exact(tmp_path, mnist_root):
    """1000 samples at global 240: four full windows, then one of 40 (20 per rank)."""
    ref = _reference(mnist_root, 1000, 5)
    for name, world in (("w1", 1), ("w2", 2)):
        params = _train(tmp_path, name, world, 60, None, 1000, 5, mnist_root)
        diff = _max_diff(params, ref)
        assert diff <= TOL, f"{name}: max abs diff {diff:.3g} > {TOL}"
