"""IResNet backbones: sizes against a closed-form count, the fp32 neck under bf16 autocast,
channels-last against NCHW, a real r18 train step through the face task, and the config errors
(model.name, face.image_size, model.dropout, model.sync_bn on CPU through the CLI)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from largebatch.config import ConfigError, load_config
from largebatch.dist import DistEnv
from largebatch.engines.single import SingleEngine
from largebatch.models import build_face_backbone, sync_batchnorm
from largebatch.models.iresnet import IRESNET_LAYERS, IResNet, iresnet
from largebatch.optim import build_optimizer
from largebatch.tasks.face import FaceTask
from tests.conftest import one_thread, run_cli

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


#: float32's unit roundoff.
U32 = 2.0 ** -24


def gamma(n: int) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: a float32 sum of ``n`` terms, in ANY order (any
    blocking, SIMD width, thread split), is within ``gamma_n * sum |terms|`` of the exact sum
    (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., section 3.1)."""
    return n * U32 / (1 - n * U32)


def rounding_bound(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on the float32 rounding error of ``module``'s output ``y`` from its
    (exact) input ``x``, whatever the kernel's summation order: a conv/FC output element is a
    dot product of ``n`` = fan-in terms, within ``gamma_n (|W| * |x|)``; a batch-statistics BN
    takes a mean and a variance over ``m = N H W`` values (within ``gamma_m`` of their sums of
    magnitudes), which move ``y = w (x - mu) r + b`` (``r = 1 / sqrt(var + eps)``) by at most
    ``|w| r (d_mu + |x - mu| d_var r^2 / 2)``; every elementwise step (BN's affine, PReLU,
    the residual add) adds a few ulps: ``4 u |y|``."""
    bound = 4 * U32 * y.abs()
    if isinstance(module, nn.Conv2d):
        n = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        bound = bound + gamma(n) * F.conv2d(x.abs(), module.weight.abs(), None, module.stride,
                                            module.padding, module.dilation, module.groups)
    elif isinstance(module, nn.Linear):
        bound = bound + gamma(module.in_features + 1) * F.linear(x.abs(), module.weight.abs(),
                                                                 module.bias.abs())
    elif isinstance(module, _BatchNorm) and module.training:
        dims = [0] + list(range(2, x.dim()))
        m = x.numel() // x.shape[1]
        mu = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        r = (var + module.eps).rsqrt()
        w = module.weight.abs().view(1, -1, *[1] * (x.dim() - 2))
        d_mu, d_var = gamma(m) * x.abs().mean(dims, keepdim=True), gamma(m + 2) * var
        bound = bound + w * r * (d_mu + (x - mu).abs() * d_var * r ** 2 / 2)
    return bound


def float32_tolerance(ref: nn.Module, x: torch.Tensor, draws: int = 3) -> float:
    """How far a correct float32 forward of ``ref`` (a float64 model) on ``x`` may be from the
    float64 one, by linearised error propagation: the float64 forward is re-run with every
    conv/FC/BN/PReLU output perturbed by its ``rounding_bound`` (the worst case of any order)
    times random signs, and the output's deviation measured; the tolerance is twice the largest
    of ``draws`` such deviations. The per-operation magnitudes are rigorous; the propagation is
    the first-order one of tiny perturbations through this very network (its depth, fan-ins and
    BatchNorm gains, measured rather than guessed), with random signs: float32's errors are not
    aligned with the network's Jacobian, and are typically ~sqrt(n) u, not the n u used here,
    so the true error sits orders of magnitude below. (A sign-free worst case is no use: it
    multiplies |W|-gains of ~10 per layer over 18 layers.)"""
    gen = torch.Generator().manual_seed(0)

    def perturb(module, inputs, out):
        sign = torch.randint(0, 2, out.shape, generator=gen, dtype=out.dtype) * 2 - 1
        return out + sign * rounding_bound(module, inputs[0], out)

    with torch.no_grad():
        exact = ref(x)
        hooks = [m.register_forward_hook(perturb) for m in ref.modules()
                 if isinstance(m, (nn.Conv2d, nn.Linear, _BatchNorm, nn.PReLU))]
        try:
            deviation = max(float((ref(x) - exact).abs().max()) for _ in range(draws))
        finally:
            for h in hooks:
                h.remove()
    return 2 * deviation


#: The channels-last test's input side: the r18 topology (every stage, block and BN) at 56 x 56
#: (stages 56 -> 28 -> 14 -> 7 -> 4) instead of 112: a quarter of the work, most of it the
#: float64 reference's five forwards, for the same argument (the bound below is derived for
#: whatever input it is given; the measured numbers in the test are at this size).
CL_SIDE = 56


@pytest.mark.parametrize("train", [True, False])
def test_channels_last_equals_nchw(train):
    torch.manual_seed(0)
    size = dict(embedding_size=32, input_size=CL_SIDE, **NARROW)
    nchw = IResNet(IRESNET_LAYERS["iresnet18"], **size)
    x, g = torch.randn(4, 3, CL_SIDE, CL_SIDE), torch.randn(4, 32)
    if not train:  # eval statistics of a real batch (constant ones would wash the input out)
        with torch.no_grad():
            for m in nchw.modules():
                if isinstance(m, _BatchNorm):
                    m.momentum = None  # cumulative average: this batch's statistics
            nchw.train()(torch.randn(8, 3, CL_SIDE, CL_SIDE))
    last = IResNet(IRESNET_LAYERS["iresnet18"], channels_last=True, **size)
    last.load_state_dict(nchw.state_dict())
    ref = copy.deepcopy(nchw).double().train(train)  # the same weights and statistics
    assert last.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not nchw.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    last.layer1.register_forward_hook(
        lambda m, i, o: seen.append(i[0].is_contiguous(memory_format=torch.channels_last)))
    outs = []
    for model in (nchw, last):
        model.train(train)
        out = model(x)
        (out * g).sum().backward()
        outs.append(out.detach().double())
    assert seen == [True]
    # The two layouts run different kernels (other summation orders), so they agree only up to
    # float32 rounding accumulated through the depth: each is held to its distance from the
    # float64 model, within the propagated float32 bound, and so the two are within twice it.
    # A wrong layout is off by O(output scale), far outside. Measured at 56 x 56 (train /
    # eval): scale 1.7 / 4.6, tolerance 0.024 / 0.0038, both layouts' errors <= 8e-6 / 3e-6;
    # the channels-last model fed a transposed input: 3.1 / 5.7 (at 112 x 112: tolerance
    # 0.13 / 0.022, transposed 3.4 / 7.2).
    # The float64 reference bounds, it is not tested: its own summation order is irrelevant,
    # and on one thread it runs up to 10x faster on the shared cores than on two.
    with torch.no_grad(), one_thread():
        exact = ref(x.double())
    with one_thread():
        tol = float32_tolerance(ref, x.double())
    assert tol < 0.2 * float(exact.abs().max())  # tight enough to see an O(1) error
    for name, out in zip(("nchw", "channels_last"), outs):
        err = float((out - exact).abs().max())
        assert err <= tol, (name, err, tol)
    assert float((outs[1] - outs[0]).abs().max()) <= 2 * tol
    # Gradients by relative norm: torch's channels-last BatchNorm backward sums in another
    # order, which the 18 blocks amplify on the way to the stem (measured at 56 x 56: <= 4e-5
    # relative on every gradient of norm > 1e-3; earlier, at 112 x 112 on another build, ~1e-3
    # at the stem); a wrong layout (a permuted gradient) is O(1) (measured 1.4 at the stem).
    # The 1e-4 floor: the shifts of BNs followed by a batch-statistics BN have a true gradient
    # of 0 (1e-14 in fp64), so both layouts give noise there (measured <= 3e-5).
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
    assert torch.equal(model.features.weight, torch.ones_like(model.features.weight))  # frozen: 1


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
