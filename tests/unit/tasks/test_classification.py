"""The classification task drives the trainer exactly like the classic MNIST loop.

Regression of the Task refactor: the seed recipe (SeedCNN with dropout, SGD lr 0.02 momentum
0.5, batch 60) trained by ``largebatch train`` ends with weights BIT-identical to a plain
torchvision + torch loop written here (DataLoader + ToTensor + Normalize + DistributedSampler
order, F.nll_loss, torch.optim.SGD), seeded the way a run is (model init from train.seed, then
the rank's dropout stream), so nothing the task interface does changes what is computed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from largebatch.checkpoint import load_checkpoint
from largebatch.config import load_config
from largebatch.dist import rank_seed
from largebatch.models.mnist import SeedCNN
from largebatch.tasks import build_task
from tests.conftest import CONFIGS, run_cli

STEPS = 40


def _plain_loop(root, steps: int, seed: int = 1) -> dict[str, torch.Tensor]:
    from torch.utils.data import DataLoader, DistributedSampler
    from torchvision import datasets, transforms
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    ds = datasets.MNIST(str(root), train=True, download=False, transform=tf)
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=seed)
    torch.manual_seed(seed)
    model = SeedCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.5)
    # The iterator draws its base seed from the global RNG: create it before the run's
    # dropout stream on rank 0 is seeded, so the masks are the run's.
    batches = iter(DataLoader(ds, batch_size=60, sampler=sampler))
    torch.manual_seed(rank_seed(seed, 0))
    model.train()
    for _ in range(steps):
        x, y = next(batches)
        loss = F.nll_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.state_dict()


def test_seed_recipe_weights_bit_identical_to_a_plain_loop(tmp_path, mnist_root):
    out = tmp_path / "run"
    proc = run_cli("train", "configs/mnist/seed.yaml", f"data.root={mnist_root}",
                   "data.download=false", f"train.max_steps={STEPS}", f"log.out_dir={out}",
                   "log.progress=false", "checkpoint.resume=never")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = load_checkpoint(out / "model.pt")["model"]
    # Bit-equality needs the run's thread count too (cli_env: OMP_NUM_THREADS=1): a conv
    # backward summed by another number of threads rounds differently.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = _plain_loop(mnist_root, STEPS)
    finally:
        torch.set_num_threads(threads)
    assert ours.keys() == ref.keys()
    diffs = {k: (ours[k] - ref[k]).abs().max().item() for k in ref}
    assert all(torch.equal(ours[k], ref[k]) for k in ref), diffs
    # ...and the loop really trained (a wrong seed or order would not be bit-equal anyway).
    assert max(diffs.values()) == 0.0
    assert any(not torch.equal(ref[k], SeedCNN().state_dict()[k]) for k in ref)


def test_metrics_and_their_directions():
    task = build_task(load_config(CONFIGS / "mnist" / "seed.yaml"))
    assert [(m.name, m.mode) for m in task.metrics] == [("val_acc", "max"), ("val_loss", "min")]
    assert task.primary_metric().name == "val_acc"
    assert task.metric("val_loss", "k").better(0.1, 0.2)
    assert task.micro_weight(15, 60) == 0.25


def test_unknown_target_or_plateau_metric_is_one_line_error(tmp_path, mnist_root):
    base = ["train", "configs/mnist/seed.yaml", f"data.root={mnist_root}", "data.download=false",
            "train.max_steps=1", f"log.out_dir={tmp_path}", "checkpoint.resume=never"]
    proc = run_cli(*base, "train.target_metric=verification_acc")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "largebatch: error: train.target_metric='verification_acc' is not a metric of task "
        "classification (val_acc|val_loss)"]
    proc = run_cli(*base, "schedule.name=plateau", "schedule.plateau.metric=val_acc")
    assert proc.returncode == 2 and "schedule.plateau.mode=min but val_acc is better when " \
        "larger" in proc.stderr and "Traceback" not in proc.stderr
