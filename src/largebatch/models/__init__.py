"""Model registry."""
from __future__ import annotations

from torch import nn

from largebatch.config import ModelConfig
from largebatch.models.faces import TinyFace
from largebatch.models.mnist import MLP, SeedCNN

_MODELS = {"seed_cnn": lambda cfg: SeedCNN(), "mlp": lambda cfg: MLP(hidden=cfg.hidden)}


def build_face_backbone(cfg: ModelConfig, embedding_size: int) -> nn.Module:
    """The face backbone ``cfg.name`` with an ``embedding_size`` output."""
    return TinyFace(embedding_size=embedding_size, width=cfg.hidden // 4 or 1)


def build_model(cfg: ModelConfig) -> nn.Module:
    """Instantiate ``cfg.name`` (validated by the config already)."""
    return _MODELS[cfg.name](cfg)
