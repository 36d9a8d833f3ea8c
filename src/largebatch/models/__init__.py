"""Model registry."""
from __future__ import annotations

from torch import nn

from largebatch.config import ModelConfig
from largebatch.models.mnist import MLP, SeedCNN

_MODELS = {"seed_cnn": lambda cfg: SeedCNN(), "mlp": lambda cfg: MLP(hidden=cfg.hidden)}


def build_model(cfg: ModelConfig) -> nn.Module:
    """Instantiate ``cfg.name`` (validated by the config already)."""
    return _MODELS[cfg.name](cfg)
