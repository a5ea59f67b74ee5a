"""Optional dependencies: imported where they are used, with the extra that installs them named."""

from __future__ import annotations

import importlib

__all__ = ["MissingExtraError", "require"]


class MissingExtraError(ImportError, ValueError):
    """An optional package is not installed; the message says which ``pip install`` adds it.

    Also a ValueError, so that callers that report bad input (the CLI) show the message, not a traceback.
    """


def require(module: str, extra: str, purpose: str):
    """Import ``module`` or raise MissingExtraError saying which ``pip install 'fimlora[extra]'`` provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"{purpose} needs the {module.split('.')[0]!r} package, which is not installed; "
            f"install it with: pip install 'fimlora[{extra}]'"
        ) from e
