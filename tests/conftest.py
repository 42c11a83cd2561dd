"""Shared test set-up: interpreter mode for Triton on CPU, Hydra composition helpers."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

# Triton kernels run in its interpreter on CPU tensors; must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Configs name data paths relative to the repository root, as `python train.py` does."""
    monkeypatch.chdir(ROOT)


@pytest.fixture
def eager_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile with Dynamo's eager backend: Dynamo's tracing is what can break, and this checks
    it without Inductor's minute of compiling. Dynamo's counters start from zero."""
    import torch._dynamo

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


def compose(*overrides: str):
    """The real conf/train.yaml composed with ``overrides`` (as `python train.py` would)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from mgqa.lit.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


TINY = (
    "debug=fast",
    "trainer.enable_progress_bar=false",
    "sample.max_new_tokens=20",
)
