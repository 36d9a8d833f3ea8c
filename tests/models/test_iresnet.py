"""IResNet backbones: sizes against a closed-form count, the fp32 neck under bf16 autocast,
channels-last against NCHW, a real r18 train step through the face task, and the config errors
(model.name, face.image_size, model.dropout, model.sync_bn on CPU through the CLI)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from largebatch.config import ConfigError, load_config
from largebatch.dist import DistEnv
from largebatch.engines.single import SingleEngine
from largebatch.models import build_face_backbone, sync_batchnorm
from largebatch.models.iresnet import IRESNET_LAYERS, IResNet, iresnet
from largebatch.optim import build_optimizer
from largebatch.tasks.face import FaceTask
from tests.conftest import run_cli

#: The stage depths as the arcface papers and insightface's arcface_torch list them.
LAYERS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3),
          200: (6, 26, 60, 6)}
# The real topology at 112 x 112 with narrow stages. Not 8 input channels: torch 2.14.1's
# oneDNN backward of a 1x1 stride-2 channels-last conv with 8 input channels segfaults on CPU.
NARROW = dict(widths=(16, 16, 32, 32))
FACE = ["task.name=face", "data.name=synthetic_faces"]


def closed_form_params(layers, d=512, widths=(64, 128, 256, 512), side=7) -> int:
    """Parameters from the layer shapes: conv k*k*cin*cout (no bias), BN 2c, PReLU c, FC."""
    bn = lambda c: 2 * c  # noqa: E731 (scale + shift)
    total = 9 * 3 * widths[0] + bn(widths[0]) + widths[0]  # stem conv3x3, BN, PReLU
    cin = widths[0]
    for blocks, w in zip(layers, widths):
        for i in range(blocks):
            c = cin if i == 0 else w
            total += bn(c) + 9 * c * w + bn(w) + w + 9 * w * w + bn(w)
            if i == 0:  # every stage starts with stride 2: a 1x1 projection + BN
                total += c * w + bn(w)
        cin = w
    return total + bn(cin) + cin * side * side * d + d + bn(d)  # BN2d, FC, BatchNorm1d


@pytest.mark.parametrize("depth", sorted(LAYERS))
def test_parameter_count_matches_closed_form(depth):
    with torch.device("meta"):  # counted, never allocated (r200: 119M parameters)
        model = iresnet(f"iresnet{depth}")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == closed_form_params(LAYERS[depth])
    assert trainable == total - 512  # the embedding BN's scale is frozen at 1
    # 2 convs per block + stem + FC = the name (r200's 98 blocks make 198: named loosely)
    assert 2 * sum(LAYERS[depth]) + 2 == (198 if depth == 200 else depth)
    published = {50: 43.6, 100: 65.2}  # arcface_torch's model zoo, d = 512 (millions)
    if depth in published:
        assert round(total / 1e6, 1) == published[depth]


def test_output_shapes_and_init():
    model = IResNet(IRESNET_LAYERS["iresnet18"], embedding_size=64, **NARROW)
    assert model(torch.randn(2, 3, 112, 112)).shape == (2, 64)
    assert model.fc.in_features == 32 * 7 * 7
    small = IResNet((1, 1, 1, 1), embedding_size=16, widths=(4, 4, 8, 8), input_size=32)
    assert small(torch.randn(3, 3, 32, 32)).shape == (3, 16)  # 32 -> 16 -> 8 -> 4 -> 2
    assert small.fc.in_features == 8 * 2 * 2
    convs = torch.cat([m.weight.detach().flatten() for m in iresnet("iresnet18").modules()
                       if isinstance(m, nn.Conv2d)])
    assert abs(float(convs.std()) - 0.1) < 2e-3 and abs(float(convs.mean())) < 1e-3


def test_neck_runs_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = IResNet(IRESNET_LAYERS["iresnet18"], embedding_size=32, **NARROW).train()
    x = torch.randn(6, 3, 112, 112)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = model(x)
        body = model.body(x)
    assert body.dtype == torch.bfloat16 and emb.dtype == torch.float32
    # Reference: the FC and a batch-statistics BN written out in fp32 on the bf16 body output.
    fc = body.float().flatten(1) @ model.fc.weight.T + model.fc.bias
    mean, var = fc.mean(0), fc.var(0, unbiased=False)
    ref = (fc - mean) / torch.sqrt(var + 1e-5) + model.features.bias
    torch.testing.assert_close(emb, ref, rtol=1e-5, atol=1e-5)
    # The test can tell: the same neck with a bf16 FC is off by far more.
    fc16 = F.linear(body.flatten(1), model.fc.weight.bfloat16(), model.fc.bias.bfloat16()).float()
    bf16_neck = (fc16 - fc16.mean(0)) / torch.sqrt(fc16.var(0, unbiased=False) + 1e-5)
    assert float((bf16_neck - ref).detach().abs().max()) > 1e-3


@pytest.mark.parametrize("train", [True, False])
def test_channels_last_equals_nchw(train):
    torch.manual_seed(0)
    nchw = IResNet(IRESNET_LAYERS["iresnet18"], embedding_size=32, **NARROW)
    last = IResNet(IRESNET_LAYERS["iresnet18"], embedding_size=32, channels_last=True, **NARROW)
    last.load_state_dict(nchw.state_dict())
    assert last.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not nchw.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    last.layer1.register_forward_hook(
        lambda m, i, o: seen.append(i[0].is_contiguous(memory_format=torch.channels_last)))
    x, g = torch.randn(4, 3, 112, 112), torch.randn(4, 32)
    outs = []
    for model in (nchw, last):
        model.train(train)
        if not train:  # eval statistics of a real batch, not the 0/1 defaults
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_var.fill_(1e4)
        out = model(x)
        (out * g).sum().backward()
        outs.append(out)
    assert seen == [True]
    scale = float(outs[0].detach().abs().max())
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5 * max(scale, 1.0))
    # Gradients by relative norm: torch's channels-last BatchNorm backward sums in another
    # order (measured: 3e-6 relative per BN at 112 x 112 vs 5e-8 NCHW), which the 18 blocks
    # amplify to ~1e-3 at the stem; a wrong layout (a permuted gradient) would be O(1). The
    # 1e-4 floor: the shifts of BNs followed by a batch-statistics BN have a true gradient of 0
    # (1e-14 in fp64), so both layouts give noise there (~3e-5).
    grads = {n: p.grad for n, p in nchw.named_parameters() if p.grad is not None}
    assert len(grads) == len([p for p in last.parameters() if p.grad is not None]) > 50
    for name, p in last.named_parameters():
        if name in grads:
            err = float((p.grad - grads[name]).norm())
            assert err <= 5e-3 * float(grads[name].norm()) + 1e-4, (name, err)


def test_iresnet18_train_step_through_the_face_task():
    """Real r18 at 112 x 112, batch 4: backbone + Partial FC, forward, backward, both steps."""
    cfg = load_config(None, FACE + ["model.name=iresnet18", "face.image_size=112",
                                    "face.num_classes=8", "optim.lr=0.05", "train.seed=0"])
    torch.manual_seed(0)
    task = FaceTask(cfg)
    parts = task.build()
    model, head = parts.model, parts.sharded[0]
    opt = build_optimizer(cfg.optim, model, lr=0.05)
    head_opt = task.sharded_optimizer(head, lr=0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(4, 3, 112, 112), torch.tensor([0, 1, 2, 3])
    task.begin_window([y])
    loss = task.loss(model, x, y)
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable)
    assert model.features.weight.grad is None
    opt.step()
    head_opt.step()
    assert torch.isfinite(loss) and float(loss) > 0
    changed = [n for n, p in trainable if not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(trainable)
    assert torch.equal(model.features.weight, torch.ones(32))  # frozen scale stays 1


def test_build_errors_name_the_keys():
    with pytest.raises(ConfigError, match=r"face.image_size=16 .*model.name=iresnet50"):
        FaceTask(load_config(None, FACE + ["model.name=iresnet50"])).build()
    with pytest.raises(ConfigError, match=r"model.name='seed_cnn' is not a face backbone"):
        FaceTask(load_config(None, FACE + ["model.name=seed_cnn"])).build()
    for bad in ("1.0", "-0.1"):
        with pytest.raises(ConfigError, match=rf"model.dropout={float(bad)} must be in \[0, 1\)"):
            load_config(None, FACE + [f"model.dropout={bad}"])


def test_dropout_reaches_both_backbones():
    for name in ("tiny_face", "iresnet18"):
        cfg = load_config(None, FACE + [f"model.name={name}", "model.dropout=0.4"])
        ps = [m.p for m in build_face_backbone(cfg.model, 32).modules()
              if isinstance(m, nn.Dropout)]
        assert ps == [0.4], name


def test_sync_bn_is_a_no_op_in_one_process_and_an_error_on_cpu():
    cfg = load_config(None, FACE + ["model.name=iresnet18", "model.sync_bn=true"])
    model = build_face_backbone(cfg.model, 32)
    engine = SingleEngine(DistEnv("none"), torch.device("cpu"))
    engine.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in engine.model.modules())
    with pytest.raises(ConfigError, match="model.sync_bn=true needs CUDA"):
        sync_batchnorm(model, torch.device("cpu"))
    plain = build_face_backbone(load_config(None, FACE + ["model.name=iresnet18"]).model, 32)
    assert sync_batchnorm(plain, torch.device("cpu")) is plain  # not asked: untouched


def test_sync_bn_on_cpu_is_one_line_exit_2(tmp_path):
    """Under DDP (the DeepSpeed engine calls the same check before ``deepspeed.initialize``)."""
    proc = run_cli("train", "configs/face/synthetic_tiny.yaml", "engine.name=ddp",
                   "model.sync_bn=true", "train.device=cpu", f"log.out_dir={tmp_path}",
                   timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "largebatch: error: model.sync_bn=true needs CUDA (torch has no CPU SyncBatchNorm)"]
