"""Tests that need a CUDA device: nccl at world 1 + DDP, bf16 autocast, the loader on the GPU.

All skip (with the reason) on a machine without CUDA; ``benchmarks/gpu_check.sh`` runs them
where a GPU is at hand. Each compares against a reference computed the ordinary way: the
single-process run, the fp32 step, the CPU loader's batches.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from itertools import islice
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from largebatch.config import load_config
from largebatch.data import build_eval_loader, build_train_loader
from largebatch.dist import DistEnv
from largebatch.engines import build_engine
from largebatch.models import build_model
from largebatch.optim import build_optimizer
from tests.conftest import CONFIGS, REPO, cli_env, run_cli, run_torchrun

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (run benchmarks/gpu_check.sh on a "
                                       "GPU machine)")

SEED = str(CONFIGS / "mnist" / "seed.yaml")


def _data_overrides(root: Path) -> list[str]:
    return [f"data.root={root}", "data.download=false", "data.test_subset=1000"]


def test_nccl_world1_process_group(tmp_path):
    """torchrun with one process: largebatch makes an nccl group and reduces CUDA tensors."""
    script = tmp_path / "pg.py"
    script.write_text(textwrap.dedent("""
        import json, sys, torch, torch.distributed as dist
        from largebatch.config import load_config
        from largebatch.dist import detect_launch, pick_device, init_process_group
        from largebatch.engines import build_engine
        denv = detect_launch()
        device = pick_device("cuda", denv.local_rank)
        init_process_group(denv, device, "auto")
        cfg = load_config(None, ["engine.name=ddp", "train.device=cuda"])
        engine = build_engine(cfg, denv, device)
        t = torch.arange(4.0, device=device)
        dist.all_reduce(t)  # a real nccl collective (the engine skips them at world 1)
        dist.barrier()
        sums = engine.reduce_scalars([1.5, 2.0], op="sum")
        print(json.dumps({"init": dist.is_initialized(), "backend": dist.get_backend(),
                          "world": dist.get_world_size(), "t": t.tolist(), "sums": sums,
                          "launcher": denv.launcher}))
        dist.destroy_process_group()
    """))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=1", str(script)], capture_output=True, text=True,
                          timeout=180, env=cli_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"init": True, "backend": "nccl", "world": 1, "t": [0.0, 1.0, 2.0, 3.0],
                   "sums": [1.5, 2.0], "launcher": "torchrun"}


def test_ddp_engine_world1_matches_single_process(mnist_root, tmp_path):
    """DDP over nccl at world 1 trains the same weights as the single engine (real processes)."""
    common = [SEED, *_data_overrides(mnist_root), "train.device=cuda", "train.max_steps=5",
              "train.target_acc=0", "log.progress=false"]
    ddp = run_torchrun(1, "train", *common, "engine.name=ddp", f"log.out_dir={tmp_path / 'ddp'}",
                       timeout=240)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = run_cli("train", *common, "engine.name=single",
                     f"log.out_dir={tmp_path / 'single'}", timeout=240)
    assert single.returncode == 0, single.stderr[-3000:]
    s_ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    s_one = json.loads((tmp_path / "single" / "summary.json").read_text())
    assert (s_ddp["engine"], s_ddp["world_size"], s_ddp["steps"]) == ("ddp", 1, 5)
    assert s_one["engine"] == "single" and s_one["steps"] == 5
    # A one-rank all-reduce sums a single gradient, so the runs differ only by cuDNN's
    # non-deterministic reductions (~1e-7 relative per step); 5 SGD steps at lr 0.02 keep that
    # far below 1e-4, while one skipped or doubled gradient would move weights by ~1e-3.
    w_ddp = torch.load(tmp_path / "ddp" / "model.pt", weights_only=True)["model"]
    w_one = torch.load(tmp_path / "single" / "model.pt", weights_only=True)["model"]
    assert w_ddp.keys() == w_one.keys()
    for k in w_one:
        torch.testing.assert_close(w_ddp[k], w_one[k], rtol=0, atol=1e-4, msg=k)
    assert abs(s_ddp["final_train_loss"] - s_one["final_train_loss"]) < 1e-4


def _engine(precision: str):
    """A single-process engine on cuda:0 holding seed_cnn (seed 1) and its SGD optimizer."""
    cfg = load_config(SEED, [f"train.precision={precision}", "train.device=cuda"])
    device = torch.device("cuda", 0)
    torch.manual_seed(1)
    model = build_model(cfg.model)
    engine = build_engine(cfg, DistEnv("none"), device)
    engine.setup(model, build_optimizer(cfg.optim, model, lr=cfg.optim.lr))
    return engine


def _train_steps(engine, batches) -> tuple[list[float], set, torch.Tensor]:
    """The Trainer's step (engine.autocast forward, engine.backward, engine.step) per batch.

    Returns the losses, the dtypes fc1 produced and the total weight update. Dropout is off
    (eval mode) because CUDA draws its masks with a dtype-dependent vectorisation: one seed
    gives different masks for fp32 and bf16 activations, which would hide the comparison.
    """
    dtypes: set = set()
    hook = engine.model.fc1.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype))
    before = torch.cat([p.detach().flatten() for p in engine.model.parameters()])
    engine.model.eval()
    losses = []
    for x, y in batches:
        with engine.autocast():
            loss = F.nll_loss(engine.model(x), y)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    hook.remove()
    after = torch.cat([p.detach().flatten() for p in engine.model.parameters()])
    return losses, dtypes, after - before


def test_bf16_autocast_step_close_to_fp32(mnist_root):
    """bf16 autocast steps: finite losses and weight updates close to the fp32 steps'."""
    cfg = load_config(SEED, _data_overrides(mnist_root))
    loader = build_train_loader(cfg.data, 600, 0, 1, 1, torch.device("cuda", 0))
    batches = list(islice(iter(loader), 5))
    fp32, dt32, upd32 = _train_steps(_engine("fp32"), batches)
    bf16, dt16, upd16 = _train_steps(_engine("bf16"), batches)
    assert dt32 == {torch.float32} and dt16 == {torch.bfloat16}  # autocast really took effect
    assert all(torch.isfinite(torch.tensor(bf16))) and bool(torch.isfinite(upd16).all())
    # bf16 keeps 8 significant bits (rounding error <= 2^-9 = 0.2% per rounded input/weight);
    # products accumulate in fp32 and log_softmax/nll run in fp32 under autocast, so the loss
    # (~2.3) moves by ~1e-4 relative (seen with CPU bf16). 1% leaves room for GPU kernels and
    # 5 steps of drift, while a wrong scale or lost normalisation changes it far more.
    for a, b in zip(fp32, bf16):
        assert b == pytest.approx(a, rel=1e-2)
    # The weights stay fp32 under autocast; only the gradients carry bf16 rounding, so the
    # 5-step update is the fp32 one up to a small relative error (1.1% seen with CPU bf16).
    # 10% keeps a wide margin, while a missing backward or a gradient off by a factor of 2
    # gives an error of 50-100%.
    assert float(upd32.norm()) > 0
    assert float((upd16 - upd32).norm() / upd32.norm()) < 0.1


def test_memory_loader_on_device_returns_cuda_tensors(mnist_root):
    """data.on_device keeps the split on the GPU: CUDA batches equal to the CPU loader's."""
    cfg = load_config(SEED, _data_overrides(mnist_root))
    gpu = build_train_loader(cfg.data, 600, 0, 1, 1, torch.device("cuda", 0))
    cpu = build_train_loader(cfg.data, 600, 0, 1, 1, torch.device("cpu"))
    assert gpu.images.is_cuda and gpu.images.dtype == torch.uint8  # 1 byte/pixel on the device
    gpu.set_epoch(3)
    cpu.set_epoch(3)
    for (xg, yg), (xc, yc) in islice(zip(gpu, cpu), 3):
        assert xg.is_cuda and yg.is_cuda
        assert xg.dtype == torch.float32 and xg.shape == (600, 1, 28, 28)
        assert torch.equal(yg.cpu(), yc)
        # Same index tensor, same IEEE elementwise ops on both devices: at most 1 ulp apart.
        torch.testing.assert_close(xg.cpu(), xc, rtol=0, atol=1e-6)
    xe, ye = next(iter(build_eval_loader(cfg.data, 0, 1, torch.device("cuda", 0))))
    assert xe.is_cuda and ye.is_cuda and len(ye) == 1000


def test_sync_bn_converts_batchnorm_under_ddp(tmp_path):
    """model.sync_bn under the DDP engine on CUDA (nccl, world 1): every BatchNorm becomes a
    SyncBatchNorm holding the same parameters the optimizer steps, and the step equals the
    unconverted model's (at world 1 SyncBatchNorm reduces over this rank's batch only)."""
    import torch.distributed as dist

    from largebatch.engines.ddp import DDPEngine
    from largebatch.models import build_face_backbone

    cfg = load_config(None, ["task.name=face", "data.name=synthetic_faces",
                             "model.name=iresnet18", "model.sync_bn=true"])
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(0)
        model = build_face_backbone(cfg.model, 64)
        plain = build_face_backbone(cfg.model, 64).cuda()
        plain.load_state_dict(model.state_dict())
        bns = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ids = {id(p) for p in model.parameters()}
        engine = DDPEngine(DistEnv("torchrun"), torch.device("cuda", 0))
        wrapped = engine.setup(model, opt)
        inner = wrapped.module
        assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in inner.modules()) == bns > 40
        assert {id(p) for p in inner.parameters()} == ids  # the optimizer's own tensors
        x = torch.randn(8, 3, 112, 112, device="cuda")
        out, ref = wrapped(x), plain(x)
        torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)  # cuDNN may pick other algos
        out.square().mean().backward()
        opt.step()
        assert not inner.features.weight.requires_grad
    finally:
        dist.destroy_process_group()


_DS_FP16_HEAD = '''
import json, math, sys
import torch
from largebatch.config import load_config
from largebatch.train.build import build_run

TINY, OUT, USER = sys.argv[1], sys.argv[2], sys.argv[3]
BASE = ["engine.name=deepspeed", "train.device=cuda", "train.max_steps=4", "train.epochs=1",
        "optim.name=sgd", "optim.lr=0.05", "optim.momentum=0", "optim.weight_decay=0",
        "optim.scale_rule=none", "schedule.name=constant", "schedule.warmup_steps=0",
        "face.eval_identities=10", "face.eval_pairs=40", "log.progress=false",
        "checkpoint.resume=never"]


def run(stage, precision):
    extra = [f"engine.zero_stage={stage}", f"train.precision={precision}",
             f"log.out_dir={OUT}/z{stage}{precision}"]
    if precision == "fp16":  # start at 2^10, halve on every overflow (no hysteresis)
        extra.append(f"engine.deepspeed_config={USER}")
    r = build_run(load_config(TINY, BASE + extra), quiet=True)
    engine, fp16 = r.engine, precision == "fp16"
    head = engine.sharded.modules[0]
    seen = {"backward": 0}

    def backbone_inf(grad):  # the 3rd window's backbone gradient overflows: DeepSpeed skips
        seen["backward"] += 1
        return torch.full_like(grad, math.inf) if fp16 and seen["backward"] == 3 else grad

    next(engine.unwrapped().parameters()).register_hook(backbone_inf)
    real, calls = engine.step, []

    def step(compute_norm=False):
        k = len(calls) + 1
        if fp16 and k == 5:  # the 5th window's head gradient overflows: largebatch skips
            head.window_grad()[1].view(-1)[0] = math.inf
        scale = float(engine.optimizer.loss_scale) if fp16 else 1.0
        h0 = head.weight.detach().clone()
        w0 = {n: v.detach().clone() for n, v in engine.unwrapped().state_dict().items()}
        norm, applied = real(compute_norm)
        w1 = engine.unwrapped().state_dict()
        calls.append({"applied": applied, "head": head.weight.detach().clone(), "h0": h0,
                      "scale": [scale, float(engine.optimizer.loss_scale) if fp16 else 1.0],
                      "backbone_moved": any(not torch.equal(w0[n], w1[n]) for n in w0)})
        return norm, applied

    engine.step = step
    r.logger.close(r.trainer.fit())
    return calls


out = {}
for stage in (0, 1):
    c32, c16 = run(stage, "fp32"), run(stage, "fp16")
    # windows 1 and 2 are the same in both runs: the head's change over them
    d32, d16 = (c[1]["head"] - c[0]["h0"] for c in (c32, c16))
    out[stage] = {"applied": [c["applied"] for c in c16], "scales": [c["scale"] for c in c16],
                  "head_moved": [not torch.equal(c["h0"], c["head"]) for c in c16],
                  "backbone_moved": [c["backbone_moved"] for c in c16],
                  "head_rel": float((d16 - d32).norm() / d32.norm())}
print(json.dumps(out))
'''


def test_deepspeed_fp16_head_unscaled_and_skipped_with_the_backbone(tmp_path):
    """DeepSpeed fp16 (ZeRO 0 and 1) with the Partial FC head, one GPU: the head's gradients
    are unscaled by DeepSpeed's loss scale (over two steps on the same windows the head moves
    as in the fp32 run: a head left scaled would move 2^10 times as far); the head stays put
    when DeepSpeed skips its own overflow (an inf in a backbone gradient); an inf in the
    head's gradient skips the backbone too and lowers DeepSpeed's scale once."""
    user = tmp_path / "ds_fp16.json"
    user.write_text(json.dumps({"fp16": {"initial_scale_power": 10, "hysteresis": 1}}))
    script = tmp_path / "ds_fp16_head.py"
    script.write_text(_DS_FP16_HEAD)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=1", str(script), str(CONFIGS / "face" /
                           "synthetic_tiny.yaml"), str(tmp_path), str(user)],
                          capture_output=True, text=True, timeout=300, env=cli_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for stage, got in out.items():
        assert got["applied"] == [True, True, False, True, False, True], stage
        assert got["scales"] == [[1024.0, 1024.0]] * 2 + [[1024.0, 512.0], [512.0, 512.0],
                                                          [512.0, 256.0], [256.0, 256.0]], stage
        assert got["head_moved"] == got["applied"] and not any(
            moved for moved, applied in zip(got["backbone_moved"], got["applied"])
            if not applied), stage
        # fp16 rounding of two SGD steps' gradients (~1e-3, as on CPU); a scaled head: ~10^3
        assert got["head_rel"] <= 2e-2, stage
