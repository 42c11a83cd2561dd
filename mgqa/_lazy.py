"""Package attributes imported on first use (PEP 562): importing a package stays cheap, so that a
command-line script can check its options before torch and Lightning load."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_attributes(package: str, module_of: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports each name from its module in ``module_of``."""

    def __getattr__(name: str) -> Any:
        if name in module_of:
            return getattr(importlib.import_module(module_of[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
