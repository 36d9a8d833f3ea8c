"""Models: every ``model.name`` is registered here, with whether it is a face backbone."""
from __future__ import annotations

import torch
from torch import nn

from largebatch.config import ConfigError, ModelConfig
from largebatch.models.faces import TinyFace
from largebatch.models.iresnet import IRESNET_LAYERS, IResNet, iresnet
from largebatch.models.mnist import MLP, SeedCNN
from largebatch.registry import MODELS

# Classifiers (``task.name=classification``) build from the model section; face backbones
# (``face=True``) also take the embedding size. ``tiny_face`` is the CPU-test scale (any image
# size, no BatchNorm); the IResNets need 112 x 112 inputs.
MODELS.register("seed_cnn", lambda cfg: SeedCNN())
MODELS.register("mlp", lambda cfg: MLP(hidden=cfg.hidden))
MODELS.register("tiny_face", lambda cfg, embedding_size: TinyFace(
    embedding_size=embedding_size, width=cfg.hidden // 4 or 1, dropout=cfg.dropout,
    channels_last=cfg.channels_last), face=True)
for _name in IRESNET_LAYERS:
    MODELS.register(_name, lambda cfg, embedding_size, _name=_name: iresnet(
        _name, embedding_size=embedding_size, dropout=cfg.dropout,
        channels_last=cfg.channels_last), face=True)


def face_backbones() -> tuple[str, ...]:
    """The registered ``model.name`` values that are face backbones."""
    return tuple(n for n in MODELS.names() if MODELS.trait(n, "face", False))


def build_face_backbone(cfg: ModelConfig, embedding_size: int) -> nn.Module:
    """The face backbone ``cfg.name`` with an ``embedding_size`` output.

    ``model.dropout`` and ``model.channels_last`` apply to both kinds; ``model.sync_bn`` is
    recorded on the module (``sync_bn`` attribute) for the engine, which converts the
    BatchNorm layers before wrapping (see ``sync_batchnorm``).

    Raises:
        ConfigError: when ``cfg.name`` is not a face backbone.
    """
    if not MODELS.trait(cfg.name, "face", False):
        raise ConfigError(f"model.name={cfg.name!r} is not a face backbone (one of "
                          f"{'|'.join(face_backbones())} with task.name=face)")
    model = MODELS.get(cfg.name)(cfg, embedding_size)
    model.sync_bn = cfg.sync_bn
    return model


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Convert the BatchNorm layers to SyncBatchNorm when the model asks for it
    (``model.sync_bn``); the DDP and DeepSpeed engines call it before wrapping.

    The parameters stay the same objects (``convert_sync_batchnorm`` re-attaches them), so an
    optimizer built on the model before still steps them. The single engine never calls it:
    one process's batch statistics are already the global ones (an explicit no-op).

    Raises:
        ConfigError: when asked for on a non-CUDA device.
    """
    if not getattr(model, "sync_bn", False):
        return model
    if device.type != "cuda":
        raise ConfigError("model.sync_bn=true needs CUDA (torch has no CPU SyncBatchNorm)")
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def build_model(cfg: ModelConfig) -> nn.Module:
    """Instantiate the classifier ``cfg.name``.

    Raises:
        ConfigError: an unknown name, or a face backbone (it needs ``task.name=face``).
    """
    if MODELS.trait(cfg.name, "face", False):
        raise ConfigError(f"model.name={cfg.name!r} is a face backbone: use task.name=face")
    return MODELS.get(cfg.name)(cfg)


__all__ = ["face_backbones", "IResNet", "TinyFace", "build_face_backbone", "build_model",
           "iresnet", "sync_batchnorm"]
