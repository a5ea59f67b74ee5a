"""Optional dependencies: imported where they are used, with the extra that installs them named."""

from __future__ import annotations

import importlib

__all__ = ["require"]


def require(module: str, extra: str, purpose: str):
    """Import ``module`` or raise an ImportError saying which ``pip install 'fimlora[extra]'`` provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{purpose} needs the {module.split('.')[0]!r} package, which is not installed; "
            f"install it with: pip install 'fimlora[{extra}]'"
        ) from e
