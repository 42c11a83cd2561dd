"""Hydra ConfigStore registrations: the typed schemas behind ``conf/``."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from mgqa.model.config import ModelConfig


def register_configs() -> None:
    """Register ``model/schema`` (the ``ModelConfig`` dataclass): presets in ``conf/model/`` extend it,
    so every model default lives in one place and unknown or mistyped keys fail at composition."""
    ConfigStore.instance().store(group="model", name="schema", node=ModelConfig)
