"""The one exception type sinkinterp raises for bad input or an unusable environment."""

from __future__ import annotations

__all__ = ["SinkInterpError"]


class SinkInterpError(ValueError):
    """Bad input or an unusable environment.

    Messages name the offending value and what was expected or what to do, e.g.
    ``"backend 'jax' is not supported: use 'hooked' or 'bridge'"``. Subclasses ``ValueError``
    so callers that already catch ``ValueError`` keep working.
    """
