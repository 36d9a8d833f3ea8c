"""Launch detection: torchrun, SLURM (srun steps only), none."""
from __future__ import annotations

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
