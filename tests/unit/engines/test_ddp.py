"""DDP engine: exactly one gradient all-reduce per optimizer step, counted by a comm hook."""
from __future__ import annotations

import torch.distributed as dist

from largebatch.config import load_config
from largebatch.dist import DistEnv
from tests._launch import spawn
from tests.conftest import CONFIGS


def _count_allreduces(rank: int, world: int, root: str, out: str) -> dict[str, int]:
    from largebatch.train.build import build_run
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
    return {"calls": calls["n"], "steps": summary["steps"], "buckets": n_buckets,
            "accum": run.plan.accum_steps}


def test_one_allreduce_per_optimizer_step_with_accum_4(tmp_path, mnist_root):
    counts = spawn(_count_allreduces, 2, str(mnist_root), str(tmp_path), timeout=180)
    for rank in range(2):
        got = counts[rank]
        assert got["accum"] == 4 and got["steps"] == 6
        # 4 micro-batches per step, but gradients cross the wire once per step (per bucket)
        assert got["calls"] == got["steps"] * got["buckets"] == 6, got
