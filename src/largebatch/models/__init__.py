"""Model registry."""
from __future__ import annotations

import torch
from torch import nn

from largebatch.config import ConfigError, ModelConfig
from largebatch.models.faces import TinyFace
from largebatch.models.iresnet import IRESNET_LAYERS, IResNet, iresnet
from largebatch.models.mnist import MLP, SeedCNN

_MODELS = {"seed_cnn": lambda cfg: SeedCNN(), "mlp": lambda cfg: MLP(hidden=cfg.hidden)}

#: ``model.name`` values that are face backbones (``task.name=face``). ``tiny_face`` is the
#: CPU-test scale (any image size, no BatchNorm); the IResNets need 112 x 112 inputs.
FACE_BACKBONES = ("tiny_face", *IRESNET_LAYERS)


def build_face_backbone(cfg: ModelConfig, embedding_size: int) -> nn.Module:
    """The face backbone ``cfg.name`` with an ``embedding_size`` output.

    ``model.dropout`` and ``model.channels_last`` apply to both kinds; ``model.sync_bn`` is
    recorded on the module (``sync_bn`` attribute) for the engine, which converts the
    BatchNorm layers before wrapping (see ``sync_batchnorm``).

    Raises:
        ConfigError: when ``cfg.name`` is not a face backbone.
    """
    if cfg.name == "tiny_face":
        model: nn.Module = TinyFace(embedding_size=embedding_size, width=cfg.hidden // 4 or 1,
                                    dropout=cfg.dropout, channels_last=cfg.channels_last)
    elif cfg.name in IRESNET_LAYERS:
        model = iresnet(cfg.name, embedding_size=embedding_size, dropout=cfg.dropout,
                        channels_last=cfg.channels_last)
    else:
        raise ConfigError(f"model.name={cfg.name!r} is not a face backbone (one of "
                          f"{'|'.join(FACE_BACKBONES)} with task.name=face)")
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
    """Instantiate ``cfg.name`` (validated by the config already)."""
    return _MODELS[cfg.name](cfg)


__all__ = ["FACE_BACKBONES", "IResNet", "TinyFace", "build_face_backbone", "build_model",
           "iresnet", "sync_batchnorm"]
