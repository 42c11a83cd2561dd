"""Hydra ConfigStore registrations: the typed schemas behind ``conf/``."""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from mgqa.model.config import ModelConfig


def register_configs() -> None:
    """Register ``model_schema`` (the ``ModelConfig`` dataclass): presets in ``conf/model/`` extend it
    (``- /model_schema@_here_``), so every model default lives in one place and unknown or mistyped keys
    fail at composition. A top-level entry, not one of the ``model`` group, so that it is not a choosable
    preset (``model=schema``)."""
    ConfigStore.instance().store(name="model_schema", node=ModelConfig)
    # `${mgqa.repo_root:}` in conf/paths/default.yaml: paths that don't depend on the launch directory.
    OmegaConf.register_new_resolver("mgqa.repo_root", repo_root, replace=True)


def repo_root() -> str:
    """The repository: the directory above the app's primary conf/ (as Hydra found it next to train.py),
    else the one above the mgqa package (a source checkout)."""
    from hydra.core.hydra_config import HydraConfig  # noqa: PLC0415

    if HydraConfig.initialized():
        for source in HydraConfig.get().runtime.config_sources:
            if source.provider == "main" and source.schema == "file":
                return str(Path(source.path).resolve().parent)
    return str(Path(__file__).resolve().parents[2])
