"""Launch detection: torchrun, SLURM (srun steps only), none; per-rank seeds."""
from __future__ import annotations

import json
import os

from largebatch.dist import detect_launch, expand_nodelist


def test_no_launcher_is_single_process():
    d = detect_launch({})
    assert (d.launcher, d.rank, d.world_size, d.is_distributed) == ("none", 0, 1, False)


def test_torchrun_env():
    d = detect_launch({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                       "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "1234"})
    assert (d.launcher, d.rank, d.world_size, d.local_rank) == ("torchrun", 3, 8, 1)
    assert (d.master_addr, d.master_port) == ("10.1.2.3", 1234)


def test_torchrun_wins_over_slurm():
    env = {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}
    assert detect_launch(env).launcher == "torchrun"


def test_srun_step():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
           "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_JOB_ID": "4242"}
    d = detect_launch(env)
    assert (d.launcher, d.rank, d.world_size, d.local_rank) == ("slurm", 5, 8, 1)
    assert d.master_addr in ("gpu007",)
    assert d.master_port == 15000 + 4242


def test_batch_script_without_srun_is_one_process():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1"}
    assert detect_launch(env).world_size == 1


def test_nodelist_expansion():
    assert expand_nodelist("node[01-03,7],gpu5") == ["node01", "node02", "node03", "node7",
                                                     "gpu5"]
    assert expand_nodelist("a1,b[9-10]") == ["a1", "b9", "b10"]


# ---- per-rank seeds -------------------------------------------------------------------------
def test_rank_seeds_do_not_collide_where_the_offset_rule_did():
    from largebatch.dist import rank_seed
    # seed + 1000 * rank gave 1001 for both pairs
    assert rank_seed(1, 1) != rank_seed(1001, 0)
    # numpy's SeedSequence([seed, rank]) pads 32-bit words: these two pairs share its stream
    assert rank_seed(2**32 + 5, 0) != rank_seed(5, 1)
    pairs = [(s, r) for s in range(-10, 3000) for r in range(64)]
    seeds = {rank_seed(s, r) for s, r in pairs}
    assert len(seeds) == len(pairs)  # 192,640 pairs, 192,640 seeds
    assert all(0 <= s < 2**63 for s in seeds)  # what torch.manual_seed accepts


def test_rank_seed_streams_are_deterministic_across_processes():
    """Same (seed, rank), same dropout stream: in this process and in a fresh one (another
    PYTHONHASHSEED, so a seed built on Python's salted hash() would differ)."""
    import subprocess
    import sys

    import torch

    from largebatch.dist import rank_seed, seed_everything
    code = ("import torch; from largebatch.dist import rank_seed, seed_everything; "
            "seed_everything(rank_seed(7, 3)); print(torch.rand(4).tolist())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True, timeout=120).stdout
    seed_everything(rank_seed(7, 3))
    here = torch.rand(4)
    assert json.loads(out.strip()) == here.tolist()
    seed_everything(rank_seed(7, 2))
    assert not torch.equal(torch.rand(4), here)  # another rank: another stream
