"""Shared pieces of the face-task tests: configs, a 2-rank session, a plain reference loop.

The session (launched by ``tests._launch.spawn``) trains real runs through
``largebatch.train.build.build_run`` on gloo ranks and saves, per run, the backbone, every
rank's head shard (with its class range) and the logged training records. The reference is a
plain single-process loop written without largebatch's head, engine or trainer: the full class
matrix, F.normalize/F.linear, the margin as torch ops (tests/unit/face/_reference.py),
F.cross_entropy, torch.optim.SGD, clip_grad_norm_.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from largebatch.config import load_config
from largebatch.data.faces import SyntheticFaceLoader
from largebatch.dist import DistEnv, seed_everything
from largebatch.face.shards import init_rows
from largebatch.models import build_face_backbone
from tests.conftest import CONFIGS
from tests.unit.face._reference import margin_logits

TINY = CONFIGS / "face" / "synthetic_tiny.yaml"
# C = 101: uneven shards over 2 ranks (51 + 50); global 40 = 20 x 2 ranks; 5 steps.
BASE = ["face.num_classes=101", "face.embedding_size=16", "face.samples_per_class=4",
        "face.eval_identities=10", "face.eval_pairs=40", "face.margin=arcface", "face.s=64",
        "face.m2=0.5", "face.noise=0.5", "face.image_size=8", "model.hidden=32",
        "batch.global_size=40", "batch.accum_steps=1", "batch.micro_size=null",
        "optim.lr=0.001", "optim.momentum=0.9", "optim.weight_decay=0.0005",
        "train.max_steps=5", "train.epochs=1", "log.progress=false",
        "checkpoint.resume=never", "face.sample_rate=1.0",
        # the plain loop is SGD at a constant, unscaled LR (the tiny config trains with AdamW)
        "optim.name=sgd", "optim.scale_rule=none", "schedule.name=constant",
        "schedule.warmup_steps=0", "face.long_tail=0"]


def overrides(*extra: str) -> list[str]:
    return BASE + list(extra)


def save_run(run, summary: dict, out: Path, rank: int) -> None:
    """Backbone, this rank's head shard and the logged records of a finished run."""
    state = run.engine.state_dict()
    head = run.engine.sharded.modules[0]
    torch.save({"model": state["model"], "head": head.weight.detach().clone(),
                "class_start": head.class_start, "summary": summary,
                "engine": run.engine.name},
               out / f"rank{rank}.pt")


def session(rank: int, world: int, out: str, runs: dict[str, list[str]]) -> None:
    """Train every run of ``runs`` (name -> overrides; ``{out}`` = the session folder), in
    order, on this rank: a ``tests._launch.spawn`` function (the gloo group, the torchrun
    variables and one thread are the launcher's)."""
    from largebatch.train.build import build_run
    denv = DistEnv("torchrun", rank=rank, world_size=world, local_rank=rank)
    for name, extra in runs.items():
        where = Path(out) / name
        cfg = load_config(TINY, [e.format(out=out) for e in extra] + [f"log.out_dir={where}"])
        run = build_run(cfg, denv, quiet=True)
        summary = run.trainer.fit()
        save_run(run, summary, where, rank)
        run.logger.close(summary)


def load_run(path: Path, world: int) -> dict:
    """Backbone, the full head (shards concatenated in class order) and the train records."""
    parts = sorted((torch.load(path / f"rank{r}.pt", weights_only=True) for r in range(world)),
                   key=lambda p: p["class_start"])
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return {"model": parts[0]["model"], "head": torch.cat([p["head"] for p in parts]),
            "engine": parts[0]["engine"],
            "train": [r for r in records if r["kind"] == "train"],
            "eval": [r for r in records if r["kind"] == "eval"]}


def max_diff(a: dict, b: dict) -> float:
    """Largest |a - b| over the backbone and the full head."""
    d = max(float((a["model"][k] - b["model"][k]).abs().max()) for k in a["model"])
    return max(d, float((a["head"] - b["head"]).abs().max()))


def reference(extra: list[str], steps: int = 5) -> dict:
    """The plain full-softmax loop on the global batches (one process, no largebatch head)."""
    cfg = load_config(TINY, overrides(*extra))
    f, o = cfg.face, cfg.optim
    seed_everything(cfg.train.seed)  # as build_run does before building the parts
    backbone = build_face_backbone(cfg.model, f.embedding_size)
    # the head's documented init (N(0, 0.01^2), world-size independent), full matrix
    head = torch.nn.Parameter(init_rows(0, f.num_classes, f.embedding_size, cfg.train.seed,
                                        0.01))
    params = list(backbone.parameters()) + [head]
    opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    loader = SyntheticFaceLoader(cfg, cfg.batch.global_size, 0, 1, cfg.train.seed, "cpu")
    losses, norms = [], []
    for _, (x, y) in zip(range(steps), loader):
        cos = F.linear(F.normalize(backbone(x), dim=1), F.normalize(head, dim=1))
        loss = F.cross_entropy(margin_logits(cos, y, "arc"), y)
        opt.zero_grad()
        loss.backward()
        if o.grad_clip > 0:
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, o.grad_clip)))
        else:
            norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in params])))
        opt.step()
        losses.append(float(loss.detach()))
    return {"model": {k: v.detach() for k, v in backbone.state_dict().items()},
            "head": head.detach(), "losses": losses, "norms": norms}
