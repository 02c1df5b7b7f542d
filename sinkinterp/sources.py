"""Where a loaded model came from (its ModelSource), attached to the model object."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch

from sinkinterp import backends
from sinkinterp.errors import SinkInterpError

__all__ = ["ModelSource", "model_source", "attach_source"]


_SOURCE_ATTR = "sinkinterp_source"


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a loaded model came from; stored on the model, copied into every result's provenance."""

    name: str
    """What was asked for: ``"smollm2-135m"``, ``"gemma-3-270m"``, a GGUF path, or a TransformerLens name."""
    origin: Literal["gguf", "transformer_lens", "config"]
    backend: str
    dtype: str
    prepend_bos: bool
    """The BOS policy: whether ``first_token="default"`` (and ``model.to_tokens``) prepends ``bos_token``."""
    bos_token: str | None = None
    path: str | None = None
    """The GGUF file (the first part, for a model shipped in parts), or None for hub models and configs."""
    sha256: str | None = None
    """sha256 of the GGUF file (None for hub models and configs)."""
    converter_version: int | None = None
    cache_dir: str | None = None
    transformer_lens: str = ".".join(map(str, backends.TL_VERSION))

    @property
    def bos_policy(self) -> str:
        if self.prepend_bos:
            return f"prepend {self.bos_token!r}"
        return "none (no token is prepended)"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "bos_policy": self.bos_policy}


def model_source(model: torch.nn.Module) -> ModelSource:
    """The :class:`ModelSource` of a model loaded (or built) by sinkinterp."""
    source = getattr(model, _SOURCE_ATTR, None)
    if source is None:
        raise SinkInterpError(
            f"{type(model).__name__} carries no sinkinterp provenance: load it with "
            "sinkinterp.load_model(...) or a builder from sinkinterp.tiny, or attach one with "
            "sinkinterp.models.attach_source(model, ModelSource(...))"
        )
    return source


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def attach_source(model: torch.nn.Module, source: ModelSource) -> None:
    """Record ``source`` on ``model`` (for models built outside :func:`load_model`)."""
    # object.__setattr__ bypasses nn.Module's and TransformerBridge's attribute routing.
    object.__setattr__(model, _SOURCE_ATTR, source)
