"""Rank agreement at start: ranks that would run different experiments stop before any step,
each with the same one line naming the keys that differ and every rank's value."""
from __future__ import annotations

import sys
import time
from pathlib import Path


from largebatch.errors import ConfigError
from largebatch.train.agreement import (LOCAL_KEYS, check_ranks_agree, disagreement,
                                        file_fingerprint, run_facts)
from tests._launch import spawn
from tests.conftest import CONFIGS, cli_env, _run

CONFIG = {"optim": {"lr": 0.1, "name": "sgd"}, "data": {"root": "/a", "num_workers": 2},
          "train": {"seed": 1, "device": "auto"}}
PLAN = {"global_size": 120, "micro_size": 60}


def test_facts_leave_out_where_each_node_reads_but_not_what(tmp_path: Path) -> None:
    mine = run_facts(CONFIG, PLAN, 60000)
    other = run_facts({**CONFIG, "data": {"root": "/b", "num_workers": 8},
                       "train": {"seed": 1, "device": "cuda"}}, PLAN, 60000)
    assert mine == other  # node-local paths and loader workers may differ
    assert {"data.root", "data.num_workers", "train.device"} <= set(LOCAL_KEYS)
    assert run_facts(CONFIG, PLAN, 59999)["data.size"] != mine["data.size"]
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"x" * 100)
    b.write_bytes(b"x" * 99 + b"y")  # same size, other content
    assert file_fingerprint(a) != file_fingerprint(b)
    assert file_fingerprint(tmp_path / "nope") == "missing"


def test_the_line_names_each_differing_key_with_every_ranks_value() -> None:
    facts = [run_facts(CONFIG, PLAN, 60000),
             run_facts({**CONFIG, "optim": {"lr": 0.2, "name": "sgd"}}, PLAN, 60000)]
    line = disagreement(facts)
    assert "config.optim.lr (rank 0: 0.1, rank 1: 0.2)" in line
    assert "\n" not in line and "config.optim.name" not in line


def _check(rank: int, world: int, lr_per_rank: bool) -> str:
    lr = 0.1 * (rank + 1) if lr_per_rank else 0.1
    facts = run_facts({**CONFIG, "optim": {"lr": lr, "name": "sgd"}}, PLAN, 60000)
    try:
        check_ranks_agree(facts)
    except ConfigError as exc:
        return str(exc)
    return ""


def test_two_ranks_agree_in_one_collective_or_both_say_why() -> None:
    assert spawn(_check, 2, False) == ["", ""]
    lines = spawn(_check, 2, True)
    assert lines[0] == lines[1] and "config.optim.lr (rank 0: 0.1, rank 1: 0.2)" in lines[0]


def test_torchrun_with_a_per_rank_override_stops_every_rank_in_one_line(mnist_root: Path,
                                                                        tmp_path: Path) -> None:
    """Two ranks launched with different optim.lr (a per-rank override, as two nodes with
    different copies of a file would be): both print the same line and exit 2 before any
    step; nothing is trained, no worker is left behind."""
    script = (f"exec {sys.executable} -m largebatch train {CONFIGS / 'mnist' / 'mlp.yaml'} "
              f"data.root={mnist_root} data.download=false data.subset=600 "
              f"batch.global_size=120 log.out_dir={tmp_path / 'run'} "
              f"optim.lr=0.0$((RANK + 1)) checkpoint.dir={tmp_path / 'ck'}$RANK")
    t0 = time.monotonic()
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node=2", "--no-python", "bash", "-c", script], 120, cli_env())
    assert proc.returncode != 0, proc
    errors = [l for l in proc.stderr.splitlines() if l.startswith("largebatch: error:")]
    assert len(errors) == 2 and errors[0] == errors[1], proc
    assert "config.optim.lr (rank 0: 0.01, rank 1: 0.02)" in errors[0]
    # each rank would write its shards to another folder: a set no resume could assemble
    assert f'checkpoint.folder (rank 0: {tmp_path / "ck"}0, rank 1:' in errors[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # no step was taken
    assert time.monotonic() - t0 < 60
    import psutil
    left = [p.pid for p in psutil.process_iter(["cmdline"])
            if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert left == []  # no worker outlives the launcher
