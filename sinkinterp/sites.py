"""Where an intervention or measurement acts: layers, heads, kv groups and head labels, resolved
against a model once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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
    """``heads`` as a tuple of integer (layer, head) pairs, none repeated (not checked against a
    model). Accepts pairs, a :class:`Heads` value or a ``{layer: heads}`` mapping."""
    if isinstance(heads, Heads):
        if heads.pairs is None:
            raise SinkInterpError(f"{label}: Heads.all() names no heads until resolved against a model; "
                                  "use heads=None for every head")
        return heads.pairs
    if isinstance(heads, Mapping):
        heads = [(layer, head) for layer, chosen in heads.items()
                 for head in (chosen if isinstance(chosen, (list, tuple)) else [chosen])]
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


# --------------------------------------------------------------------------------------------
# Heads: one value for "which heads", in any of its spellings


#: What a ``heads`` argument accepts: None (all), per-layer head indices (an int or a list of ints),
#: or a :class:`Heads` value, a ``{layer: heads}`` mapping, or (layer, head) pairs.
HeadsLike = Any


def is_head_site(value) -> bool:
    """Whether ``value`` names heads layer by layer (a :class:`Heads`, a ``{layer: heads}``
    mapping, or (layer, head) pairs) rather than per-layer head indices."""
    if isinstance(value, (Heads, Mapping)):
        return True
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(v, (list, tuple)) for v in value))


@dataclass(frozen=True)
class Heads:
    """A set of attention heads, possibly different heads in different layers.

    Every place that takes heads takes one of these spellings, resolved against the model once:

    - ``None`` or ``Heads.all()``: every head of every layer;
    - ``layers=[3, 5], heads=[0, 2]``: the same head indices in each of those layers;
    - ``Heads([(3, 1), (5, 0)])``, ``Heads({3: [1, 2], 5: [0]})``, or the pairs / mapping
      themselves: these heads, layer by layer.

    :meth:`SinkReport.sink_heads` returns one ("the heads with alpha > eps"), which
    :class:`~sinkinterp.interventions.MaskSinkKey` and the other per-head interventions take as
    ``heads=``.
    """

    pairs: tuple[tuple[int, int], ...] | None = None
    """The (layer, head) pairs, sorted; None for every head."""

    def __init__(self, heads=None):
        pairs = None if heads is None else tuple(sorted(head_pairs("Heads", heads)))
        object.__setattr__(self, "pairs", pairs)

    @classmethod
    def all(cls) -> Heads:
        return cls(None)

    @classmethod
    def at(cls, model: Model, layers=None, heads=None) -> Heads:
        """The same head indices (``heads``, None for all) in each of ``layers`` (None for all)."""
        return cls([(layer, head) for layer in resolve_layers(model, layers) for head in resolve_heads(model, heads)])

    def by_layer(self, model: Model) -> dict[int, list[int]]:
        """``{layer: [heads]}`` on ``model``, range-checked; every layer for :meth:`all`."""
        if self.pairs is None:
            return {layer: list(range(model.cfg.n_heads)) for layer in range(model.cfg.n_layers)}
        out: dict[int, list[int]] = {}
        for layer, head in check_head_pairs(model, self.pairs):
            out.setdefault(layer, []).append(head)
        return out

    def labels(self, model: Model) -> list[str]:
        return [head_label(layer, head) for layer, heads in self.by_layer(model).items() for head in heads]

    def kv_heads(self, model: Model) -> dict[int, list[int]]:
        """The key/value heads the chosen query heads read, per layer (query head h reads h // group)."""
        group = kv_group(model)
        return {layer: sorted({h // group for h in heads}) for layer, heads in self.by_layer(model).items()}

    def hook_names(self, model: Model, hook: str = "attn.hook_pattern") -> list[str]:
        return [f"blocks.{layer}.{hook}" for layer in self.by_layer(model)]

    def __len__(self) -> int:
        if self.pairs is None:
            raise SinkInterpError("Heads.all() has no length until resolved: len(heads.by_layer(model)) per layer")
        return len(self.pairs)

    def __iter__(self):
        return iter(self.pairs or ())

    def to_list(self) -> list[list[int]] | None:
        return None if self.pairs is None else [list(pair) for pair in self.pairs]

    def __repr__(self) -> str:
        if self.pairs is None:
            return "Heads.all()"
        shown = ", ".join(head_label(*pair) for pair in self.pairs[:8])
        return f"Heads({len(self.pairs)}: {shown}{', ...' if len(self.pairs) > 8 else ''})"


def selected_heads(model: Model, layers, heads) -> list[tuple[int, list[int]]]:
    """The (layer, heads) an intervention acts on: ``heads`` in any :class:`Heads` spelling (then
    ``layers`` must be None), or per-layer head indices in each of ``layers``."""
    if is_head_site(heads):
        return list(Heads(heads).by_layer(model).items())
    chosen = resolve_heads(model, heads)
    return [(layer, chosen) for layer in resolve_layers(model, layers)]
