"""Where an intervention or measurement acts: layers, heads, kv groups and head labels, resolved
against a model once."""

from __future__ import annotations

from torch import Tensor

from sinkinterp.backends import Model
from sinkinterp.errors import SinkInterpError

# --------------------------------------------------------------------------------------------
# Validation against the model


def n_kv_heads(model: Model) -> int:
    return getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads


def kv_group(model: Model) -> int:
    return model.cfg.n_heads // n_kv_heads(model)


def as_kv(model: Model, x: Tensor) -> Tensor:
    """A ``hook_k``/``hook_v`` activation ``[..., head, d_head]`` with one entry per kv head. After
    ``set_ungroup_grouped_query_attention(True)`` the hook holds each kv head once per query head
    (identical copies): keep the first of each group."""
    return x if x.shape[-2] == n_kv_heads(model) else x[..., :: kv_group(model), :]


def as_query_heads(x: Tensor, n_heads: int) -> Tensor:
    """``[..., kv_head or head, d_head]`` -> one entry per query head (query head h reads kv head h // group)."""
    return x.repeat_interleave(n_heads // x.shape[-2], dim=-2)


def select_indices(label: str, chosen, n: int, unit: str) -> list[int]:
    if chosen is None:
        return list(range(n))
    if isinstance(chosen, int) and not isinstance(chosen, bool):
        chosen = (chosen,)
    if not isinstance(chosen, (list, tuple)):
        raise SinkInterpError(f"{label}s must be a list of integers in 0..{n - 1} (or None for all), got {chosen!r}")
    for value in chosen:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SinkInterpError(f"{label}s must be integers in 0..{n - 1}, got {value!r}")
        if not 0 <= value < n:
            raise SinkInterpError(f"{label} {value} out of range: model has {n} {unit} (0..{n - 1})")
    return list(chosen)


def resolve_layers(model: Model, layers) -> list[int]:
    return select_indices("layer", layers, model.cfg.n_layers, "layers")


def resolve_heads(model: Model, heads) -> list[int]:
    return select_indices("head", heads, model.cfg.n_heads, "heads")


def as_index(chosen: list[int], n: int) -> list[int] | slice:
    """Chosen heads as an index: ``slice(None)`` when all are chosen, so indexing makes a view
    rather than a copy of a [batch, head, query, key] tensor."""
    return slice(None) if chosen == list(range(n)) else chosen


def head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def head_pairs(label: str, heads) -> tuple[tuple[int, int], ...]:
    """``heads`` as a tuple of integer (layer, head) pairs, none repeated (not checked against a model)."""
    pairs = []
    for pair in heads if isinstance(heads, (list, tuple)) else [heads]:
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) for v in pair)):
            raise SinkInterpError(f"{label} must be integer (layer, head) pairs, got {pair!r}")
        pairs.append((pair[0], pair[1]))
    if len(set(pairs)) != len(pairs):
        raise SinkInterpError(f"{label} {heads!r} repeats a head")
    return tuple(pairs)


def check_head_pairs(model: Model, pairs) -> list[tuple[int, int]]:
    chosen = [tuple(pair) for pair in pairs]
    for layer, head in chosen:
        resolve_layers(model, [layer])
        resolve_heads(model, [head])
    return chosen
