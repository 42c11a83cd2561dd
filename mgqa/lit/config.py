"""Hydra ConfigStore registrations: the typed schemas behind ``conf/``."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from mgqa.model.config import ModelConfig


def register_configs() -> None:
    """Register ``model_schema`` (the ``ModelConfig`` dataclass): presets in ``conf/model/`` extend it
    (``- /model_schema@_here_``), so every model default lives in one place and unknown or mistyped keys
    fail at composition. A top-level entry, not one of the ``model`` group, so that it is not a choosable
    preset (``model=schema``)."""
    ConfigStore.instance().store(name="model_schema", node=ModelConfig)
