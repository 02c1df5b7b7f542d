"""The one rule every registry follows (interventions, metrics, measurements, head scorers): a
name is an identifier, taken once; a second entry of the same name is refused, not swapped in."""

from __future__ import annotations

from typing import Any

from sinkinterp.errors import SinkInterpError

__all__ = ["add_entry"]


def add_entry(registry: dict[str, Any], kind: str, name: str, entry: Any, *, example: str,
              compute: Any = None, compute_is: str = "a function") -> Any:
    """``registry[name] = entry`` after checking the name and, if given, that ``compute`` is callable."""
    if not isinstance(name, str) or not name.isidentifier():
        raise SinkInterpError(f"a {kind} name is an identifier such as {example!r}, got {name!r}")
    if name in registry:
        raise SinkInterpError(f"a {kind} named {name!r} is already registered: give yours another name")
    if compute is not None and not callable(compute):
        raise SinkInterpError(f"{kind} {name!r}: compute must be {compute_is}")
    registry[name] = entry
    return entry
