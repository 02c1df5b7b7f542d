"""What every measurement shares: the massive-activation columns, per-query weights, and the
sink score of one key (alpha)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sinkinterp._batches import (
    Batch,
)
from sinkinterp._registry import add_entry
from sinkinterp.backends import Model
from sinkinterp.errors import SinkInterpError

MASSIVE_COLUMNS = ["layer", "seq", "position", "channel", "value", "ratio_to_median", "token"]


#: The largest float64 copy of part of an attention pattern that a reducer makes at once. A whole
#: [batch, head, T, T] pattern in float64 is 4.8 GB for SmolLM2's 9 heads at T = 8192 (twice the
#: pattern the forward already holds), so reductions that need float64 go through blocks of queries.
QUERY_BLOCK_BYTES = 256 * 2**20


def query_blocks(pattern: Tensor, max_bytes: int | None = None):
    """Slices of the query axis (dim 2) of ``pattern`` [batch head query key] whose float64 copy
    stays under ``max_bytes`` (default :data:`QUERY_BLOCK_BYTES`; at least one query each)."""
    max_bytes = QUERY_BLOCK_BYTES if max_bytes is None else max_bytes
    batch, heads, n_queries, n_keys = pattern.shape
    step = max(1, max_bytes // max(1, batch * heads * n_keys * 8))
    return [slice(start, min(start + step, n_queries)) for start in range(0, n_queries, step)]


def token_text(model: Model, token_id: int) -> str:
    tokenizer = getattr(model, "tokenizer", None)
    return str(token_id) if tokenizer is None else tokenizer.decode([token_id])




def check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise SinkInterpError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def query_weights(batch: Batch, device, window: int | None = None) -> Float[Tensor, "batch pos"]:
    """Weights that average over a row's real queries i >= 1 (each row sums to 1); with a sliding
    ``window``, over the queries 1 <= i < window that can still see the first token."""
    valid = batch.valid().to(device)
    valid[:, 0] = False
    if window is not None:
        valid[:, window:] = False
    return valid.double() / valid.sum(dim=1).clamp(min=1).double()[:, None]


def seen_counts(lengths: Tensor, n_pos: int, window: int | None) -> Int[Tensor, "batch key"]:
    """How many real queries of each row can see key k: i in k..length-1, and i - k < window."""
    keys = torch.arange(n_pos, device=lengths.device)
    last = lengths[:, None] if window is None else torch.minimum(lengths[:, None], keys + window)
    return (last - keys).clamp(min=0)


def alpha_at(pattern: Float[Tensor, "batch head query key"], key: int, window: int | None = None
             ) -> Float[Tensor, "batch head"]:
    """Gu et al.'s sink score of one key on one unpadded batch: the mean of ``pattern[..., key]``
    over the queries that can see it (i >= key, and i - key < window in a sliding-window layer)."""
    n_pos = pattern.shape[-1]
    count = seen_counts(torch.tensor([n_pos]), n_pos, window)[0, key].clamp(min=1)
    return pattern[..., key].double().sum(dim=-1) / count




# --------------------------------------------------------------------------------------------
# The measurement registry: quantities an experiment measures on its evaluation tokens


@dataclass(frozen=True)
class Measurement:
    """A measurement an experiment spec can ask for (``measurements: [name]``).

    ``compute(model, tokens, *, alpha_first, eps)`` gets the evaluation tokens, the clean run's
    alpha at the first token ``[seq, layer, head]`` and the spec's ``eps``, and returns a dict
    whose ``"per_sequence"`` maps each quantity to one number per sequence (criteria of kind
    ``measurement_above`` name a quantity); anything else in the dict is saved as it is.
    """

    name: str
    compute: Callable[..., dict[str, Any]] = field(compare=False)
    description: str = ""


#: Every measurement by name: what a spec's ``measurements:`` accepts.
MEASUREMENTS: dict[str, Measurement] = {}


def register_measurement(name: str, compute: Callable[..., dict[str, Any]], *, description: str = "") -> Measurement:
    """Add a measurement (see :class:`Measurement`); a second one of the same name is refused."""
    if compute is None:
        raise SinkInterpError(f"measurement {name!r}: compute must be a function")
    return add_entry(MEASUREMENTS, "measurement", name, Measurement(name, compute, description),
                     example="value_weighted", compute=compute)
