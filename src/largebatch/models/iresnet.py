"""IResNet: the "improved" pre-activation ResNets of insightface's arcface_torch.

Architecture (as arcface_torch's ``backbones/iresnet.py`` defines it, re-written here):

- stem: conv3x3(3 -> 64, stride 1) - BN - PReLU, on a 112 x 112 x 3 face crop;
- four stages of ``IBasicBlock`` with 64, 128, 256, 512 channels, each stage starting with a
  stride-2 block (112 -> 56 -> 28 -> 14 -> 7); blocks per stage: r18 [2, 2, 2, 2],
  r34 [3, 4, 6, 3], r50 [3, 4, 14, 3], r100 [3, 13, 30, 3], r200 [6, 26, 60, 6];
- an ``IBasicBlock`` is BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus the identity or,
  where the shape changes, conv1x1(stride) - BN;
- the neck: BN2d - dropout - flatten - FC(512 * 7 * 7 -> d) - BatchNorm1d whose scale is fixed
  at 1 (not trained; insightface's ``features``), so the embedding is only centred and shifted.

Precision: the body runs under the caller's autocast (the engine wraps the whole forward), but
the FC and the final BatchNorm1d run in fp32 (the weights' dtype) with autocast switched off, as
the reference does (it leaves its FC outside its autocast block). The FC is a 25,088-long dot
product per output whose result is the embedding itself: in bf16 (8-bit mantissa) it keeps
~3 significant digits, and the margin softmax multiplies cosines by s = 64, so a 1e-3 error in
a cosine is a 0.06 error in a logit; the BatchNorm1d's batch statistics would also be taken
from rounded values. The FC is ~1 % of the r50's FLOPs, so fp32 there costs little.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

#: Blocks per stage of each depth (arcface_torch's iresnet18 ... iresnet200).
IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2), "iresnet34": (3, 4, 6, 3), "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3), "iresnet200": (6, 26, 60, 6)}


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus the (projected) identity.

    Args:
        cin: input channels.
        cout: output channels.
        stride: of the second convolution (and of the projection).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = _conv3x3(cin, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = _conv3x3(cout, cout, stride)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, cin, h, w)`` -> ``(n, cout, h / stride, w / stride)``."""
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


def _out_size(size: int, stages: int) -> int:
    """Spatial size after ``stages`` stride-2 3x3 convolutions with padding 1 (ceil(n / 2))."""
    for _ in range(stages):
        size = (size + 1) // 2
    return size


class IResNet(nn.Module):
    """The arcface IResNet (see the module docstring).

    Args:
        layers: blocks in each of the four stages.
        embedding_size: output dimension ``d`` (512 at real scale).
        dropout: dropout probability before the FC (arcface: 0; 0.4 for small datasets).
        widths: channels of the four stages (the stem has ``widths[0]``); the reference's
            (64, 128, 256, 512) by default, narrower ones only for fast tests.
        input_size: side of the square input (112 for the reference's 7 x 7 final map).
        zero_init_residual: start each block's last BN scale at 0, so every block begins as
            the identity (Goyal et al.'s large-batch trick; off by default as in the
            reference, whose own switch zeroes the middle BN instead).
        channels_last: keep the convolutions' weights, and convert every input, to the
            channels-last memory format (faster on tensor cores with bf16/fp16).
    """

    def __init__(self, layers: Sequence[int], embedding_size: int = 512, dropout: float = 0.0,
                 widths: Sequence[int] = (64, 128, 256, 512), input_size: int = 112,
                 zero_init_residual: bool = False, channels_last: bool = False) -> None:
        super().__init__()
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"IResNet: 4 stages expected, got layers={list(layers)}, "
                             f"widths={list(widths)}")
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = nn.PReLU(widths[0])
        cin, stages = widths[0], []
        for blocks, cout in zip(layers, widths):
            stage = [IBasicBlock(cin, cout, stride=2)]
            stage += [IBasicBlock(cout, cout) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(cin * _out_size(input_size, 4) ** 2, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        self._init_weights(zero_init_residual)
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    def _init_weights(self, zero_init_residual: bool) -> None:
        """The reference's init: conv N(0, 0.1), BN scale 1 and shift 0, FC torch's default;
        the embedding BN's scale fixed at 1 and frozen."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            if zero_init_residual and isinstance(m, IBasicBlock):
                nn.init.zeros_(m.bn3.weight)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, stages, BN2d and dropout: ``(n, 3, H, W)`` -> ``(n, 512, 7, 7)``, in the
        caller's autocast dtype."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.dropout(self.bn2(x))

    def neck(self, x: torch.Tensor) -> torch.Tensor:
        """Flatten, FC and the embedding BN in the parameters' own dtype whatever autocast is
        active: fp32 for the usual fp32 weights under bf16/fp16 autocast (see the module
        docstring for why). Only where the weights themselves are low precision (DeepSpeed's
        bf16 mode casts the whole module, keeping fp32 masters in its optimizer) does it run
        in that dtype. Flatten follows the logical (c, h, w) order, so a channels-last map
        gives the same FC input as an NCHW one."""
        with torch.autocast(x.device.type, enabled=False):
            return self.features(self.fc(torch.flatten(x, 1).to(self.fc.weight.dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, 3, 112, 112)`` face crops -> ``(n, d)`` fp32 embeddings."""
        return self.neck(self.body(x))


def iresnet(name: str, embedding_size: int = 512, **kwargs: object) -> IResNet:
    """The IResNet of depth ``name`` ('iresnet18' ... 'iresnet200'); ``kwargs`` go to
    ``IResNet``."""
    if name not in IRESNET_LAYERS:
        raise ValueError(f"unknown IResNet {name!r} (one of {'|'.join(IRESNET_LAYERS)})")
    return IResNet(IRESNET_LAYERS[name], embedding_size=embedding_size, **kwargs)
