"""DDP engine: exactly one gradient all-reduce per optimizer step, counted by a comm hook."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from largebatch.config import load_config
from largebatch.dist import DistEnv
from tests.conftest import CONFIGS, free_port


def _count_allreduces(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from largebatch.run import build_run
    cfg = load_config(CONFIGS / "mnist" / "mlp.yaml",
                      [f"data.root={root}", "data.download=false", "data.subset=4800",
                       "batch.global_size=480", "batch.micro_size=60", "train.max_steps=6",
                       f"log.out_dir={out}", "log.progress=false"])
    run = build_run(cfg, DistEnv("torchrun", rank=rank, world_size=world), quiet=True)
    calls = {"n": 0}

    def counting_allreduce(state, bucket):
        calls["n"] += 1
        fut = dist.all_reduce(bucket.buffer().div_(world), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    run.engine.model.register_comm_hook(None, counting_allreduce)
    summary = run.trainer.fit()
    n_buckets = len(run.engine.model.reducer._get_zeros_like_grad_buckets())
    torch.save({"calls": calls["n"], "steps": summary["steps"], "buckets": n_buckets,
                "accum": run.plan.accum_steps}, f"{out}/count{rank}.pt")
    dist.destroy_process_group()


def test_one_allreduce_per_optimizer_step_with_accum_4(tmp_path, mnist_root):
    mp.start_processes(_count_allreduces, args=(2, free_port(), str(mnist_root), str(tmp_path)),
                       nprocs=2, start_method="spawn")
    for rank in range(2):
        got = torch.load(tmp_path / f"count{rank}.pt", weights_only=True)
        assert got["accum"] == 4 and got["steps"] == 6
        # 4 micro-batches per step, but gradients cross the wire once per step (per bucket)
        assert got["calls"] == got["steps"] * got["buckets"] == 6, got
