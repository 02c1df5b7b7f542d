"""Old import paths kept working for a release: a module ``__getattr__`` that warns with the new path."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["moved_names", "renamed_option"]


def moved_names(old: str, new: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for module ``old`` whose names now live elsewhere:
    ``new[name]`` is the module that defines ``name``. Each access warns once per call site."""

    def __getattr__(name: str) -> Any:
        if name not in new:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(f"{old}.{name} moved to {new[name]}.{name}; the old path goes away in the next release",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new[name]), name)

    def __dir__() -> list[str]:
        return sorted(new)

    return __getattr__, __dir__


def renamed_option(owner: str, old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that ``owner``'s option ``old`` is now spelt ``new``."""
    warnings.warn(f"{owner}: {old!r} is now spelt {new!r}; the old name goes away in the next release",
                  DeprecationWarning, stacklevel=stacklevel)
