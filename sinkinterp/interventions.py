"""Causal interventions on the sink, as values (docs/design.md §3).

Each intervention is a frozen dataclass: it prints, compares, and round-trips through
``to_dict`` / ``Intervention.from_dict`` (JSON or YAML). Statistics it needs (mean values, fitted
biases, patch sources) are computed once by a classmethod from reference tokens and stored as
numbers, so the object can be saved and applied again without the reference data.
``.hooks(model)`` validates it against the model and compiles it to TransformerLens forward hooks
``[(hook_name, fn), ...]``, which work with ``intervene``, ``model.hooks`` and
``model.run_with_hooks``, on HookedTransformer and TransformerBridge alike.

Positions are absolute (no padding). Query head h reads key/value head ``h // group``; per-head
interventions act on scores, pattern or z, so they never touch the other heads of a group,
except :class:`ReplaceSinkKey`, which changes a key and so needs whole groups.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from jaxtyping import Int
from torch import Tensor

from sinkinterp._batches import check_bool, check_int, check_seed, check_tokens
from sinkinterp.backends import attention_windows, require
from sinkinterp.errors import SinkInterpError

__all__ = [
    "Intervention",
    "MaskSinkKey",
    "AblateSinkValue",
    "ReplaceSinkKey",
    "EditMassiveChannels",
    "PatchFirstTokenResidual",
    "ConstantAttentionBias",
    "AblateHeads",
    "fit_constant_bias",
    "intervene",
    "INTERVENTIONS",
]

Hook = tuple[str, Callable]
# Field types users fill in loosely (lists, tuples, tensors); __post_init__ validates and freezes
# them into tuples, with a SinkInterpError naming the bad value.
IntsLike = Any
NumbersLike = Any
INTERVENTIONS: dict[str, type[Intervention]] = {}


# --------------------------------------------------------------------------------------------
# Values: nested tuples of floats (hashable, comparable, JSON-ready) <-> tensors


def _freeze(value):
    if isinstance(value, Tensor):
        value = value.detach().cpu().double().tolist()
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


#: Largest magnitude a stored value may have (about float32's range): beyond it, activations overflow.
_LARGEST = 1e30


def _frozen(owner, name: str, *, minus_inf: bool = False):
    """``owner.<name>`` frozen to nested tuples, refusing anything but finite numbers in it (a NaN
    or inf stored in an intervention would reach the logits and then results.json as bare NaN).
    ``minus_inf``: -inf is allowed too (a slot logit of -inf is a head without a slot)."""
    value = _freeze(getattr(owner, name))

    def check(leaf):
        if isinstance(leaf, tuple):
            for item in leaf:
                check(item)
        elif (isinstance(leaf, bool) or not isinstance(leaf, (int, float))
              or not ((math.isfinite(leaf) and abs(leaf) <= _LARGEST) or (minus_inf and leaf == -math.inf))):
            allowed = "finite numbers or -inf" if minus_inf else "finite numbers"
            raise SinkInterpError(f"{type(owner).__name__} {name} holds {leaf!r}: only {allowed} of magnitude at "
                                  f"most {_LARGEST:g} are allowed (larger ones overflow float32 activations)")

    if value is not None:
        check(value)
    return value


def _thaw(value):
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _shape(value) -> tuple[int, ...]:
    shape = []
    while isinstance(value, tuple):
        shape.append(len(value))
        value = value[0] if value else None
    return tuple(shape)


def _tensor(value, device=None) -> Tensor:
    return torch.tensor(_thaw(value), dtype=torch.float32, device=device)


# --------------------------------------------------------------------------------------------
# Validation against the model


def _n_kv(model) -> int:
    return getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads


def _group(model) -> int:
    return model.cfg.n_heads // _n_kv(model)


def _as_kv(model, x: Tensor) -> Tensor:
    """A ``hook_k``/``hook_v`` activation ``[..., head, d_head]`` with one entry per kv head. After
    ``set_ungroup_grouped_query_attention(True)`` the hook holds each kv head once per query head
    (identical copies): keep the first of each group."""
    return x if x.shape[-2] == _n_kv(model) else x[..., :: _group(model), :]


def _as_query_heads(x: Tensor, n_heads: int) -> Tensor:
    """``[..., kv_head or head, d_head]`` -> one entry per query head (query head h reads kv head h // group)."""
    return x.repeat_interleave(n_heads // x.shape[-2], dim=-2)


def _select(label: str, chosen, n: int, unit: str) -> list[int]:
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


def _layers(model, layers) -> list[int]:
    return _select("layer", layers, model.cfg.n_layers, "layers")


def _heads(model, heads) -> list[int]:
    return _select("head", heads, model.cfg.n_heads, "heads")


def _index(chosen: list[int], n: int) -> list[int] | slice:
    """Chosen heads as an index: ``slice(None)`` when all are chosen, so indexing makes a view
    rather than a copy of a [batch, head, query, key] tensor."""
    return slice(None) if chosen == list(range(n)) else chosen


def _check_position(model, position: int) -> None:
    if not 0 <= position < model.cfg.n_ctx:
        raise SinkInterpError(f"position {position} out of range: model context is 0..{model.cfg.n_ctx - 1}")


def _check_seq(position: int, n_pos: int, what: str, from_query: int | None = None) -> None:
    if position >= n_pos:
        raise SinkInterpError(f"{what} position {position} is beyond this input's {n_pos} positions")
    if from_query is not None and from_query >= n_pos:
        raise SinkInterpError(
            f"{what} from_query {from_query} is beyond this input's {n_pos} positions: it would act on no "
            f"query and leave the output exactly clean; use from_query < {n_pos} or longer inputs")


def _check_shape(label: str, value, expected: tuple[int, ...]) -> None:
    got = _shape(value)
    if got != expected:
        raise SinkInterpError(f"{label} has shape {got}, expected {expected}")


def _ints(label: str, values) -> tuple[int, ...] | None:
    if values is None:
        return None
    if isinstance(values, int) and not isinstance(values, bool):
        values = (values,)
    if not isinstance(values, (list, tuple)):
        raise SinkInterpError(f"{label} must be a list of integers (or None), got {values!r}")
    values = tuple(values)
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SinkInterpError(f"{label} must be integers, got {value!r}")
    if len(set(values)) != len(values):
        raise SinkInterpError(f"{label} {values} repeats an entry")
    return values


def _check_mode(cls_name: str, mode: str, allowed: Sequence[str]) -> None:
    if mode not in allowed:
        raise SinkInterpError(f"{cls_name} mode {mode!r} is not one of {', '.join(map(repr, allowed))}")


def _check_from_query(from_query, position: int) -> None:
    if isinstance(from_query, bool) or not isinstance(from_query, int) or from_query <= position:
        raise SinkInterpError(
            f"from_query {from_query!r} must be an integer > position {position}: the sink's own row "
            "(and the rows before it) must stay untouched"
        )


# --------------------------------------------------------------------------------------------
# The base class


@dataclass(frozen=True)
class Intervention:
    """Base class: a value that compiles to forward hooks. Subclasses register by name."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        INTERVENTIONS[cls.__name__] = cls

    #: What the model's hook points must do for this intervention (see ``backends.require``).
    NEEDS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def needs(cls, fields: dict[str, Any]) -> tuple[str, ...]:
        """The capabilities an intervention with these fields needs (a record or ``vars(self)``)."""
        return cls.NEEDS

    @classmethod
    def check_model(cls, model, fields: dict[str, Any], *, where: str | None = None) -> None:
        """Refuse, before any forward pass, a model whose hook points cannot carry this intervention."""
        require(model, *cls.needs(fields), needed_by=where or cls.__name__)

    def hooks(self, model) -> list[Hook]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        record = {"type": type(self).__name__}
        for f in dataclasses.fields(self):
            record[f.name] = _thaw(getattr(self, f.name))
        return record

    @staticmethod
    def from_dict(record: dict[str, Any]) -> Intervention:
        if not isinstance(record, dict) or "type" not in record:
            raise SinkInterpError(f"an intervention record is a dict with a 'type' key, got {record!r}")
        name = record["type"]
        if not isinstance(name, str):
            raise SinkInterpError(f"an intervention's 'type' is a name such as 'MaskSinkKey', got {name!r}")
        cls = INTERVENTIONS.get(name)
        if cls is None:
            allowed = ", ".join(sorted(INTERVENTIONS))
            raise SinkInterpError(f"unknown intervention {name!r}: use one of {allowed}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - fields - {"type"})
        if unknown:
            raise SinkInterpError(f"{name} has no field {unknown[0]!r}: its fields are {', '.join(sorted(fields))}")
        return cls(**{k: v for k, v in record.items() if k != "type"})

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            shape = _shape(value)
            if len(shape) >= 2 or (len(shape) == 1 and shape[0] > 8):
                text = f"<{'x'.join(map(str, shape))} numbers>"
            else:
                text = repr(value)
            parts.append(f"{f.name}={text}")
        return f"{type(self).__name__}({', '.join(parts)})"


def _refuse_empty(owner, name: str, values, hint: str = "name at least one") -> None:
    """An intervention with nothing to act on would return the clean output without a word."""
    if values is not None and len(values) == 0:
        raise SinkInterpError(f"{type(owner).__name__} {name} is empty: it would act nowhere and leave the output "
                              f"exactly clean; {hint}")


def _norm_common(self, *, heads: bool = True) -> None:
    names = ("layers", "heads") if heads else ("layers",)
    for name in names:
        values = _ints(name, getattr(self, name))
        _refuse_empty(self, name, values, "name at least one, or None for all")
        object.__setattr__(self, name, values)


# --------------------------------------------------------------------------------------------
# 1. Mask the sink's key


def _key_masker(heads: list[int], n_heads: int, position: int, from_query: int) -> Callable[[Tensor], Tensor]:
    """A function that sets the score of key ``position`` to -inf for ``heads`` and queries
    i >= from_query (out of place). The [head, query, key] mask is built once per length and
    device and shared by every layer."""
    masks: dict[tuple[int, str], Tensor] = {}

    def apply(scores: Tensor) -> Tensor:
        n_pos = scores.shape[-1]
        key = (n_pos, str(scores.device))
        if key not in masks:
            mask = torch.zeros(n_heads, n_pos, n_pos, dtype=torch.bool, device=scores.device)
            mask[heads, from_query:, position] = True
            masks[key] = mask
        return scores.masked_fill(masks[key], float("-inf"))

    return apply


@dataclass(frozen=True, repr=False)
class MaskSinkKey(Intervention):
    """Remove key ``position`` before the softmax for queries i >= ``from_query`` (they renormalise
    over the other keys). Rows i < from_query keep the sink, so position 1 does not turn into a
    new sink (docs/design.md §3.1)."""

    NEEDS: ClassVar[tuple[str, ...]] = ("attn.hook_attn_scores",)

    layers: IntsLike = None
    heads: IntsLike = None
    position: int = 0
    from_query: int = 16

    def __post_init__(self):
        _norm_common(self)
        check_int("position", self.position)
        _check_from_query(self.from_query, self.position)

    def hooks(self, model) -> list[Hook]:
        layers, heads = _layers(model, self.layers), _heads(model, self.heads)
        _check_position(model, self.position)
        self.check_model(model, vars(self))
        remove = _key_masker(heads, model.cfg.n_heads, self.position, self.from_query)

        def mask(scores, hook):
            _check_seq(self.position, scores.shape[-1], "MaskSinkKey", self.from_query)
            return remove(scores)

        return [(f"blocks.{layer}.attn.hook_attn_scores", mask) for layer in layers]


# --------------------------------------------------------------------------------------------
# 2. Ablate the sink's value contribution


@dataclass(frozen=True, repr=False)
class AblateSinkValue(Intervention):
    """Remove (``"zero"``) or replace (``"mean"``, ``"patch"``) the sink's value contribution
    ``A[i, position] * v_position`` to queries i >= ``from_query``, without renormalising.

    Acts on ``hook_z``, so the sink's own row, its residual stream and its key stay untouched
    (zeroing ``hook_v`` would change them: docs/design.md §3.2). ``value`` holds the replacement per
    selected layer and head ([layers][heads][d_head]), from :meth:`fit`.
    """

    NEEDS: ClassVar[tuple[str, ...]] = ("reads:attn.hook_v", "reads:attn.hook_pattern", "attn.hook_z", "order")

    layers: IntsLike = None
    heads: IntsLike = None
    position: int = 0
    mode: str = "zero"
    from_query: int = 1
    value: NumbersLike = None

    MODES: ClassVar[tuple[str, ...]] = ("zero", "mean", "patch")

    def __post_init__(self):
        _norm_common(self)
        _check_mode("AblateSinkValue", self.mode, self.MODES)
        check_int("position", self.position)
        _check_from_query(self.from_query, self.position)
        object.__setattr__(self, "value", _frozen(self, "value"))
        if self.mode == "zero" and self.value is not None:
            raise SinkInterpError("AblateSinkValue mode 'zero' takes no value")
        if self.mode != "zero" and self.value is None:
            raise SinkInterpError(
                f"AblateSinkValue mode {self.mode!r} needs stored values: build it with "
                f"AblateSinkValue.fit(model, tokens, mode={self.mode!r}, ...)"
            )

    @classmethod
    def fit(cls, model, tokens: Int[Tensor, "batch pos"], *, mode: str = "mean", layers=None, heads=None,
            position: int = 0, from_query: int = 1) -> AblateSinkValue:
        """``"mean"``: the sink's value averaged over ``tokens``; ``"patch"``: the sink value of
        ``tokens`` (one sequence, another input)."""
        _check_mode("AblateSinkValue.fit", mode, ("mean", "patch"))
        check_tokens(model, tokens)
        check_int("position", position)
        _check_seq(position, tokens.shape[1], "reference")
        if mode == "patch" and tokens.shape[0] != 1:
            raise SinkInterpError(f"mode 'patch' takes one source sequence, got {tokens.shape[0]}")
        selected_layers, selected_heads = _layers(model, _ints("layers", layers)), _heads(model, _ints("heads", heads))
        values = _as_kv(model, _capture(model, tokens, "attn.hook_v", selected_layers, position))  # [layer batch kv d]
        per_head = _as_query_heads(values.mean(dim=1), model.cfg.n_heads)[:, selected_heads]
        return cls(layers=layers, heads=heads, position=position, mode=mode, from_query=from_query, value=per_head)

    def hooks(self, model) -> list[Hook]:
        layers, heads = _layers(model, self.layers), _heads(model, self.heads)
        _check_position(model, self.position)
        if self.value is not None:
            _check_shape("AblateSinkValue value", self.value, (len(layers), len(heads), model.cfg.d_head))
        self.check_model(model, vars(self))
        n_heads, p, fq = model.cfg.n_heads, self.position, self.from_query
        value = None if self.value is None else _tensor(self.value)
        hooks = []
        for index, layer in enumerate(layers):
            state: dict[str, Tensor] = {}

            def keep_v(v, hook, state=state):
                _check_seq(p, v.shape[1], "AblateSinkValue", fq)
                state["v"] = v[:, p]  # [batch kv d_head]

            def keep_a(pattern, hook, state=state):
                state["a"] = pattern[:, heads, fq:, p]  # [batch heads query]

            def edit_z(z, hook, state=state, index=index):
                v_sink = _as_query_heads(state.pop("v"), n_heads)[:, heads]  # [batch heads d]
                a = state.pop("a")
                target = torch.zeros_like(v_sink) if value is None else value[index].to(z)[None].expand_as(v_sink)
                delta = a[..., None] * (target - v_sink)[:, :, None, :]  # [batch heads query d]
                return _add_at(z, delta.transpose(1, 2), fq, heads)

            hooks += [(f"blocks.{layer}.attn.hook_v", keep_v), (f"blocks.{layer}.attn.hook_pattern", keep_a),
                      (f"blocks.{layer}.attn.hook_z", edit_z)]
        return hooks


def _add_at(z: Tensor, delta: Tensor, from_query: int, heads: list[int] | slice) -> Tensor:
    """``z`` [batch pos head d] plus ``delta`` [batch pos-from_query len(heads) d] on those rows/heads."""
    z = z.clone()
    z[:, from_query:, heads] += delta.to(z.dtype)
    return z


def _capture(model, tokens: Tensor, hook: str, layers: list[int], position: int | None,
             select: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """A clean run's activation at ``blocks.{l}.{hook}`` for each layer: at ``position`` (batch
    first, so ``x[:, position]``), or reduced by ``select`` inside the hook so that only what is
    needed is kept (a full attention-score cache of every layer would not fit in memory)."""
    if position is not None:
        _check_seq(position, tokens.shape[1], "reference")
        select = lambda x: x[:, position]  # noqa: E731
    return _capture_all(model, tokens, layers, {hook: select})[hook]


def _capture_all(model, tokens: Tensor, layers: list[int],
                 selects: dict[str, Callable[[Tensor], Tensor] | None]) -> dict[str, Tensor]:
    """Several hooks' selections in one clean forward: {hook: [layer, ...]}."""
    check_tokens(model, tokens)
    kept: dict[tuple[str, int], Tensor] = {}

    def keeper(hook_name: str, layer: int):
        select = selects[hook_name]

        def keep(x, hook):
            kept[hook_name, layer] = (x if select is None else select(x)).detach().float().cpu()

        return keep

    hooks = [(f"blocks.{layer}.{name}", keeper(name, layer)) for name in selects for layer in layers]
    with torch.inference_mode():
        model.run_with_hooks(tokens, fwd_hooks=hooks, return_type=None)
    return {name: torch.stack([kept[name, layer] for layer in layers]) for name in selects}


# --------------------------------------------------------------------------------------------
# 3. Replace the sink's key


@dataclass(frozen=True, repr=False)
class ReplaceSinkKey(Intervention):
    """Keep the sink's slot but give it another key: the mean key of the other positions
    (``"mean_other"``) or another input's sink key (``"patch"``), before rotary embedding.

    Keys are shared by the query heads of a kv group, so ``heads`` must be whole groups.
    ``key`` holds the new key per selected layer and kv head ([layers][kv_heads][d_head]).
    """

    NEEDS: ClassVar[tuple[str, ...]] = ("attn.hook_k",)

    key: NumbersLike = ()
    layers: IntsLike = None
    heads: IntsLike = None
    position: int = 0
    mode: str = "mean_other"

    MODES: ClassVar[tuple[str, ...]] = ("mean_other", "patch")

    def __post_init__(self):
        _norm_common(self)
        _check_mode("ReplaceSinkKey", self.mode, self.MODES)
        check_int("position", self.position)
        object.__setattr__(self, "key", _frozen(self, "key"))

    @classmethod
    def fit(cls, model, tokens: Int[Tensor, "batch pos"], *, mode: str = "mean_other", layers=None,
            heads=None, position: int = 0) -> ReplaceSinkKey:
        """``"mean_other"``: keys of every other position of ``tokens``, averaged; ``"patch"``: the
        key at ``position`` of ``tokens`` (one sequence, another input)."""
        _check_mode("ReplaceSinkKey", mode, cls.MODES)
        check_tokens(model, tokens)
        check_int("position", position)
        _check_seq(position, tokens.shape[1], "reference")
        selected_layers = _layers(model, _ints("layers", layers))
        kv_heads = _kv_heads(model, _heads(model, _ints("heads", heads)), heads)
        if mode == "patch":
            if tokens.shape[0] != 1:
                raise SinkInterpError(f"mode 'patch' takes one source sequence, got {tokens.shape[0]}")
            keys = _capture(model, tokens, "attn.hook_k", selected_layers, position)[:, 0]
        else:
            others = [j for j in range(tokens.shape[1]) if j != position]
            keys = _capture(model, tokens, "attn.hook_k", selected_layers, None, lambda k: k[:, others].mean(dim=1))
            keys = keys.mean(dim=1)  # [layer kv d]: mean over sequences of the mean over positions
        keys = _as_kv(model, keys)
        return cls(key=keys[:, kv_heads], layers=layers, heads=heads, position=position, mode=mode)

    def hooks(self, model) -> list[Hook]:
        layers = _layers(model, self.layers)
        kv_heads = _kv_heads(model, _heads(model, self.heads), self.heads)
        _check_position(model, self.position)
        _check_shape("ReplaceSinkKey key", self.key, (len(layers), len(kv_heads), model.cfg.d_head))
        self.check_model(model, vars(self))
        key, p, group = _tensor(self.key), self.position, _group(model)
        hooks = []
        for index, layer in enumerate(layers):
            def replace(k, hook, index=index):
                _check_seq(p, k.shape[1], "ReplaceSinkKey")
                k = k.clone()
                if k.shape[2] == model.cfg.n_heads and group > 1:
                    # Ungrouped GQA: each kv head appears once per query head of its group.
                    members = [kv * group + g for kv in kv_heads for g in range(group)]
                    k[:, p, members] = key[index].to(k).repeat_interleave(group, dim=0)
                else:
                    k[:, p, kv_heads] = key[index].to(k)
                return k

            hooks.append((f"blocks.{layer}.attn.hook_k", replace))
        return hooks


def _kv_heads(model, heads: list[int], asked) -> list[int]:
    """The kv heads behind query ``heads``; refuse a selection that splits a group."""
    group = _group(model)
    kv_heads = sorted({h // group for h in heads})
    for kv in kv_heads:
        members = list(range(kv * group, (kv + 1) * group))
        if not set(members) <= set(heads):
            raise SinkInterpError(
                f"heads {tuple(asked)} split kv group {kv} (query heads {members}): keys are shared by "
                f"groups of {group} query heads, so a key intervention needs whole groups or heads=None"
            )
    return kv_heads


# --------------------------------------------------------------------------------------------
# 4. Edit massive channels


@dataclass(frozen=True, repr=False)
class EditMassiveChannels(Intervention):
    """Set residual-stream ``channels`` at ``positions`` after the chosen blocks (``hook_resid_post``)
    to zero, to their reference mean (``values``: [layers][slots][channels], one mean per edited
    position), or scale them by ``factor``.

    ``largest_other=True`` also edits, in each sequence and layer, the one position outside
    ``positions`` where these channels are largest in magnitude (Sun et al. edit the starting token
    and the other token that carries massive activations, a first "." or "\n"); its mean is the
    last slot of ``values``.

    ``channels=None`` stands for the stable channels the detector finds: resolve it with
    :meth:`fit`, which by default edits one layer, the first where the channels are massive (as
    Sun et al.); ``layers=None`` on the constructor means every layer, a different, milder
    experiment (the edit is undone and redone at each layer instead of propagating).
    :meth:`random_control` edits as many random non-massive channels of comparable typical
    magnitude instead.
    """

    NEEDS: ClassVar[tuple[str, ...]] = ("hook_resid_post",)

    channels: IntsLike = None
    positions: IntsLike = (0,)
    layers: IntsLike = None
    mode: str = "zero"
    factor: NumbersLike = None
    values: NumbersLike = None
    largest_other: bool = False

    MODES: ClassVar[tuple[str, ...]] = ("zero", "mean", "scale")

    def __post_init__(self):
        object.__setattr__(self, "channels", _ints("channels", self.channels))
        object.__setattr__(self, "positions", _ints("positions", self.positions))
        for position in self.positions or ():
            check_int("EditMassiveChannels position", position)
        _norm_common(self, heads=False)
        _check_mode("EditMassiveChannels", self.mode, self.MODES)
        object.__setattr__(self, "values", _frozen(self, "values"))
        check_bool("EditMassiveChannels largest_other", self.largest_other)
        for name in ("channels", "positions"):
            _refuse_empty(self, name, getattr(self, name))
        if (self.mode == "scale") != (self.factor is not None):
            raise SinkInterpError("EditMassiveChannels takes factor with mode 'scale' and only then")
        if self.mode == "scale":
            if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)) or not math.isfinite(self.factor):
                raise SinkInterpError(f"factor must be a finite number, got {self.factor!r}")
            object.__setattr__(self, "factor", float(self.factor))
        if (self.mode == "mean") != (self.values is not None):
            raise SinkInterpError(
                "EditMassiveChannels mode 'mean' needs stored values (build it with "
                "EditMassiveChannels.fit(model, tokens, mode='mean')), and other modes take none"
            )

    @property
    def n_slots(self) -> int:
        """Edited positions per sequence: ``positions`` plus the largest other one if asked."""
        return len(self.positions) + int(self.largest_other)

    @classmethod
    def fit(cls, model, tokens: Int[Tensor, "batch pos"], *, channels=None, positions=(0,), layers="first",
            mode: str = "zero", factor: float | None = None, min_fraction: float = 0.5,
            largest_other: bool = False) -> EditMassiveChannels:
        """Resolve ``channels=None`` to the detector's stable channels at these positions (found in
        at least ``min_fraction`` of the sequences of ``tokens``), ``layers="first"`` to the first
        layer where those channels are massive at those positions in at least ``min_fraction`` of
        the sequences (``"all"``: every layer), and for ``"mean"`` store each edited position's own
        reference mean of each channel after each selected block."""
        from sinkinterp.metrics import find_massive_activations, stable_massive_channels

        check_tokens(model, tokens)
        check_bool("largest_other", largest_other)
        positions = _ints("positions", positions)
        for position in positions or ():
            check_int("position", position)
            _check_seq(position, tokens.shape[1], "reference")
        if channels is not None:
            _select("channel", _ints("channels", channels), model.cfg.d_model, "residual channels")
        if not isinstance(min_fraction, (int, float)) or isinstance(min_fraction, bool) or not 0 < min_fraction <= 1:
            raise SinkInterpError(f"min_fraction {min_fraction!r} must be a number in (0, 1]")
        found = None
        if channels is None or layers == "first":
            found = find_massive_activations(model, tokens, progress=False)
            found = found[found.position.isin(positions or ())]
            found.attrs["n_seqs"] = tokens.shape[0]
        if channels is None:
            stable = stable_massive_channels(found, min_fraction=min_fraction)
            channels = tuple(sorted(int(c) for c in stable.channel.unique()))
            if not channels:
                raise SinkInterpError(
                    f"no massive channel at positions {positions} in at least {min_fraction:.0%} of the "
                    "reference sequences: pass channels explicitly"
                )
        channels = _ints("channels", channels)
        if isinstance(layers, str):
            if layers == "all":
                layers = None
            elif layers == "first":
                ours = found[found.channel.isin(channels)]
                share = ours.groupby("layer").seq.nunique() / tokens.shape[0]
                common = share[share >= min_fraction].index
                if not len(common):
                    raise SinkInterpError(
                        f"channels {channels} are not massive at positions {positions} in at least "
                        f"{min_fraction:.0%} of the reference sequences in any layer: pass layers explicitly")
                layers = (int(common.min()),)
            else:
                raise SinkInterpError(f"EditMassiveChannels.fit layers {layers!r}: use 'first', 'all' or layer numbers")
        values = None
        if mode == "mean":
            values = _channel_means(model, tokens, _layers(model, _ints("layers", layers)), positions, channels,
                                    largest_other)
        return cls(channels=channels, positions=positions, layers=layers, mode=mode, factor=factor, values=values,
                   largest_other=largest_other)

    def random_control(self, model, tokens: Int[Tensor, "batch pos"], *, seed: int = 0,
                       pool: int = 10) -> EditMassiveChannels:
        """The same edit on ``len(channels)`` random channels that are never massive in ``tokens``
        and whose typical magnitude is closest to the edited channels'. Typical magnitude is the
        median |x| at the *other* positions (at the edited ones a massive channel has no
        non-massive peer by definition), per edited layer, then the median over those layers.
        Drawn (seeded) from the ``pool`` x n channels nearest in log magnitude to the edited
        channels' median."""
        from sinkinterp.metrics import find_massive_activations

        if self.channels is None:
            raise SinkInterpError("random_control needs resolved channels: call fit(model, tokens) first")
        layers = _layers(model, self.layers)
        massive = set(find_massive_activations(model, tokens, progress=False).channel.tolist()) | set(self.channels)
        others = [p for p in range(tokens.shape[1]) if p not in self.positions]
        if not others:
            raise SinkInterpError("random_control needs reference tokens longer than the edited positions")
        per_layer = _capture(model, tokens, "hook_resid_post", layers, None,
                             lambda x: x[:, others].abs().flatten(0, 1).median(dim=0).values)  # [layer d_model]
        typical = per_layer.median(dim=0).values
        target = typical[list(self.channels)].median().clamp(min=1e-12).log()
        candidates = [c for c in range(model.cfg.d_model) if c not in massive]
        candidates.sort(key=lambda c: abs(float(typical[c].clamp(min=1e-12).log() - target)))
        check_int("pool", pool, 1)
        chosen = tuple(sorted(random.Random(check_seed(seed)).sample(candidates[: pool * len(self.channels)], len(self.channels))))
        values = None
        if self.mode == "mean":
            values = _channel_means(model, tokens, layers, self.positions, chosen, self.largest_other)
        return dataclasses.replace(self, channels=chosen, values=values)

    def hooks(self, model) -> list[Hook]:
        if self.channels is None:
            raise SinkInterpError(
                "EditMassiveChannels channels=None: resolve the stable channels with "
                "EditMassiveChannels.fit(model, reference_tokens, ...)"
            )
        layers = _layers(model, self.layers)
        _select("channel", self.channels, model.cfg.d_model, "residual channels")
        self.check_model(model, vars(self))
        for position in self.positions:
            _check_position(model, position)
        if self.values is not None:
            _check_shape("EditMassiveChannels values", self.values, (len(layers), self.n_slots, len(self.channels)))
        values = None if self.values is None else _tensor(self.values)
        positions, channels = list(self.positions), list(self.channels)
        hooks = []
        for index, layer in enumerate(layers):
            def edit(x, hook, index=index):
                _check_seq(max(positions), x.shape[1], "EditMassiveChannels")
                slots = _edited_slots(x, positions, channels, self.largest_other)  # [batch slot]
                cols = torch.tensor(channels, device=x.device)
                rows = torch.arange(x.shape[0], device=x.device)[:, None, None]
                where = (rows, slots[:, :, None], cols[None, None, :])
                x = x.clone()
                if self.mode == "zero":
                    x[where] = 0
                elif self.mode == "scale":
                    x[where] = x[where] * self.factor
                else:
                    x[where] = values[index].to(x)[None].expand(x.shape[0], -1, -1)
                return x

            hooks.append((f"blocks.{layer}.hook_resid_post", edit))
        return hooks


def _edited_slots(x: Tensor, positions: list[int], channels: list[int], largest_other: bool) -> Tensor:
    """[batch, slot] positions to edit in each row: ``positions``, then (``largest_other``) the
    position outside them where ``max_c |x[row, p, c]|`` over ``channels`` is largest."""
    fixed = torch.tensor(positions, device=x.device).expand(x.shape[0], -1)
    if not largest_other:
        return fixed
    size = x[:, :, channels].abs().amax(dim=-1)  # [batch pos]
    size[:, positions] = -1
    return torch.cat([fixed, size.argmax(dim=1, keepdim=True)], dim=1)


def _channel_means(model, tokens, layers: list[int], positions, channels, largest_other: bool = False) -> Tensor:
    """[layer, slot, channel]: each edited slot's own mean over the reference sequences."""
    cols = list(channels)

    def select(x):
        slots = _edited_slots(x, list(positions), cols, largest_other)  # [batch slot]
        picked = x[torch.arange(x.shape[0])[:, None], slots]  # [batch slot d_model]
        return picked[:, :, cols]

    resid = _capture(model, tokens, "hook_resid_post", layers, None, select)  # [layer batch slot channel]
    return resid.mean(dim=1)


# --------------------------------------------------------------------------------------------
# 5. Patch the first token's residual stream

_RESID_HOOKS = ("resid_pre", "resid_mid", "resid_post")


@dataclass(frozen=True, repr=False)
class PatchFirstTokenResidual(Intervention):
    """Replace the residual stream at ``position`` (``hook_resid_pre`` by default) of the chosen
    layers with stored vectors: ``source`` is [layers][rows][d_model], one row (broadcast to every
    sequence) or one row per sequence of the batch (aligned). Build it with :meth:`fit`."""

    @classmethod
    def needs(cls, fields: dict[str, Any]) -> tuple[str, ...]:
        return (f"hook_{fields.get('hook', 'resid_pre')}",)

    source: NumbersLike = ()
    layers: IntsLike = None
    hook: str = "resid_pre"
    position: int = 0
    description: str = ""

    def __post_init__(self):
        _norm_common(self, heads=False)
        if self.hook not in _RESID_HOOKS:
            raise SinkInterpError(f"hook {self.hook!r} is not one of {', '.join(map(repr, _RESID_HOOKS))}")
        check_int("position", self.position)
        object.__setattr__(self, "source", _frozen(self, "source"))

    @classmethod
    def fit(cls, model, source, *, reference: Tensor | None = None, layers=None, hook: str = "resid_pre",
            position: int = 0) -> PatchFirstTokenResidual:
        """``source``: token ids [rows, pos] (their own residual at ``position``); ``"mean"`` (the mean
        over ``reference`` tokens); or a token (string or id) that replaces the first token: position
        0's residual depends on that token alone, so it is read from a one-token run."""
        from sinkinterp.data import resolve_token

        if hook not in _RESID_HOOKS:
            raise SinkInterpError(f"hook {hook!r} is not one of {', '.join(map(repr, _RESID_HOOKS))}")
        selected = _layers(model, _ints("layers", layers))
        check_int("position", position)
        if isinstance(source, Tensor):
            check_tokens(model, source)
            tokens, description = source, f"tokens ({source.shape[0]} rows)"
        elif isinstance(source, str) and source == "mean":
            if reference is None:
                raise SinkInterpError("source 'mean' needs reference tokens: pass reference=...")
            check_tokens(model, reference)
            tokens, description = reference, f"mean over {reference.shape[0]} reference sequences"
        elif isinstance(source, (str, int)) and not isinstance(source, bool):
            if position != 0:
                raise SinkInterpError(f"a replacement first token patches position 0, not {position}")
            token_id = resolve_token(model, source)
            tokens, description = torch.tensor([[token_id, token_id]]), f"first token {source!r} (id {token_id})"
        else:
            raise SinkInterpError(
                f"patch source must be token ids [rows, pos], 'mean', or a token, got {type(source).__name__}"
            )
        residual = _capture(model, tokens, f"hook_{hook}", selected, position)  # [layer rows d_model]
        if not isinstance(source, Tensor) and source == "mean":
            residual = residual.mean(dim=1, keepdim=True)
        return cls(source=residual, layers=layers, hook=hook, position=position, description=description)

    def hooks(self, model) -> list[Hook]:
        layers = _layers(model, self.layers)
        _check_position(model, self.position)
        self.check_model(model, vars(self))
        shape = _shape(self.source)
        if len(shape) != 3 or shape[0] != len(layers) or shape[2] != model.cfg.d_model:
            raise SinkInterpError(
                f"patch source has shape {shape}, expected ({len(layers)}, rows, {model.cfg.d_model})"
            )
        source, p = _tensor(self.source), self.position
        hooks = []
        for index, layer in enumerate(layers):
            def patch(x, hook, index=index):
                _check_seq(p, x.shape[1], "PatchFirstTokenResidual")
                rows = source.shape[1]
                if rows not in (1, x.shape[0]):
                    raise SinkInterpError(
                        f"patch source has {rows} rows but the batch has {x.shape[0]}: pass one sequence "
                        "(broadcast) or a batch aligned with the input"
                    )
                x = x.clone()
                x[:, p] = source[index].to(x).expand(x.shape[0], -1)
                return x

            hooks.append((f"blocks.{layer}.hook_{self.hook}", patch))
        return hooks


# --------------------------------------------------------------------------------------------
# 6. Constant attention bias: an explicit sink slot


# The slot reads the real logits (for the log-sum-exp), rescales the pattern and adds to z.
_SLOT_NEEDS = ("scores", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "order")


@dataclass(frozen=True, repr=False)
class ConstantAttentionBias(Intervention):
    """A virtual key/value slot per head, the same for every input (docs/design.md §3.6).

    Softmax over ``[scores, logit]`` equals the pattern times ``keep_i = sigmoid(LSE_i - logit)``
    plus a slot of weight ``1 - keep_i`` whose value ``value`` is added to z. Applied to queries
    i >= ``from_query`` only; with ``replace_sink`` the real key ``position`` is masked for those
    queries, so the slot stands in for the sink. ``logit``: a number or [layers][heads];
    ``value``: None (zero, a pure key bias) or [layers][heads][d_head] (selected layers/heads).
    """

    NEEDS: ClassVar[tuple[str, ...]] = _SLOT_NEEDS

    logit: NumbersLike = 0.0
    value: NumbersLike = None
    layers: IntsLike = None
    heads: IntsLike = None
    replace_sink: bool = True
    position: int = 0
    from_query: int = 16
    method: str = "given"
    # How a gradient fit went (losses per step, the step kept, the split sizes); not compared.
    fit_log: Any = field(default=None, compare=False)

    def __post_init__(self):
        _norm_common(self)
        check_bool("replace_sink", self.replace_sink)
        if self.fit_log is not None and not isinstance(self.fit_log, dict):
            raise SinkInterpError(f"fit_log is a dict written by fit_constant_bias, or None, got {self.fit_log!r}")
        if self.method not in ("given", "moments", "gradient"):
            raise SinkInterpError(f"ConstantAttentionBias method {self.method!r} is not one of 'given', 'moments', "
                                  "'gradient' (it records where the numbers came from)")
        check_int("position", self.position)
        _check_from_query(self.from_query, self.position)
        logit = _frozen(self, "logit", minus_inf=True)
        if isinstance(logit, int):
            logit = float(logit)
        if not isinstance(logit, (float, tuple)):
            raise SinkInterpError(f"logit must be a number or [layers][heads] numbers, got {self.logit!r}")
        object.__setattr__(self, "logit", logit)
        object.__setattr__(self, "value", _frozen(self, "value"))

    def _tensors(self, model) -> tuple[list[int], list[int], Tensor, Tensor | None]:
        layers, heads = _layers(model, self.layers), _heads(model, self.heads)
        _check_position(model, self.position)
        if isinstance(self.logit, tuple):
            _check_shape("ConstantAttentionBias logit", self.logit, (len(layers), len(heads)))
            logit = _tensor(self.logit)
        else:
            logit = torch.full((len(layers), len(heads)), self.logit)
        value = None
        if self.value is not None:
            _check_shape("ConstantAttentionBias value", self.value, (len(layers), len(heads), model.cfg.d_head))
            value = _tensor(self.value)
        return layers, heads, logit, value

    def hooks(self, model) -> list[Hook]:
        layers, heads, logit, value = self._tensors(model)
        self.check_model(model, vars(self))
        return _bias_hooks(model, layers, heads, logit, value, self.replace_sink, self.position, self.from_query)




def _bias_hooks(model, layers, heads, logit: Tensor, value: Tensor | None, replace_sink: bool,
                position: int, from_query: int) -> list[Hook]:
    """Hooks of a constant slot; ``logit`` [layers heads] and ``value`` [layers heads d_head] may
    require grad (``fit_constant_bias`` optimises them through these same hooks).

    In a sliding-window layer the slot acts only on the queries that can see ``position``: it
    stands in for the sink where there is one, and queries past the window never had it."""
    n_heads, fq = model.cfg.n_heads, from_query
    windows = attention_windows(model)
    remove = _key_masker(heads, n_heads, position, fq)
    heads = _index(heads, n_heads)
    hooks = []
    for index, layer in enumerate(layers):
        state: dict[str, Tensor] = {}

        def on_scores(scores, hook, state=state):
            _check_seq(position, scores.shape[-1], "ConstantAttentionBias", fq)
            if replace_sink:
                scores = remove(scores)
            state["scores"] = scores
            return scores

        def on_pattern(pattern, hook, state=state, index=index, window=windows[layer]):
            # keep_i = sigmoid(LSE_i - logit), with LSE_i the log-sum-exp of row i's scores. Read
            # it off the diagonal, LSE_i = s_ii - log A_ii (the query's own key is never masked),
            # instead of a second pass over the scores; rows whose A_ii is too small for that to be
            # accurate get an exact logsumexp.
            scores = state.pop("scores")[:, heads, fq:]  # [batch heads query key]
            own_score = scores.diagonal(offset=fq, dim1=-2, dim2=-1)
            own_weight = pattern[:, heads, fq:].diagonal(offset=fq, dim1=-2, dim2=-1)
            lse = own_score - own_weight.log()
            tiny = own_weight < 1e-20
            if bool(tiny.any()):
                lse = torch.where(tiny, scores.logsumexp(dim=-1), lse)
            keep = torch.sigmoid(lse - logit[index].to(lse)[None, :, None])
            if window is not None:
                unseen = torch.arange(fq, pattern.shape[-1], device=keep.device) - position >= window
                keep = keep.masked_fill(unseen, 1.0)
            state["keep"] = keep
            scale = torch.ones(pattern.shape[:3], dtype=pattern.dtype, device=pattern.device)
            scale[:, heads, fq:] = keep.to(pattern.dtype)
            return pattern * scale[..., None]

        def on_z(z, hook, state=state, index=index):
            keep = state.pop("keep")
            if value is None:
                return z
            slot = (1 - keep)[..., None] * value[index].to(z)[None, :, None, :]  # [batch heads query d]
            return _add_at(z, slot.transpose(1, 2), fq, heads)

        hooks += [(f"blocks.{layer}.attn.hook_attn_scores", on_scores),
                  (f"blocks.{layer}.attn.hook_pattern", on_pattern),
                  (f"blocks.{layer}.attn.hook_z", on_z)]
    return hooks


def fit_constant_bias(
    model,
    tokens: Int[Tensor, "batch pos"],
    *,
    method: str = "moments",
    layers=None,
    heads=None,
    position: int = 0,
    from_query: int = 16,
    with_value: bool = True,
    steps: int = 30,
    lr: float = 0.01,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = False,
    history: list | None = None,
    validation: Tensor | None = None,
    patience: int = 5,
) -> ConstantAttentionBias:
    """A :class:`ConstantAttentionBias` (``replace_sink=True``) fitted on calibration ``tokens``.

    ``"moments"``: the slot's logit is the mean attention logit of the sink (``hook_attn_scores`` at
    key ``position``) over queries i >= from_query and sequences (this is the sink's log-odds
    against the other keys plus their log-sum-exp), and its value the mean sink value.
    ``"gradient"``: starting from the moments, logit and value are optimised with Adam (``steps``,
    ``lr``, mini-batches of ``batch_size``, seeded) to minimise next-token loss on queries
    i >= from_query, with the model frozen. With ``validation`` tokens (sequences not in
    ``tokens``), the loss on them is measured before the first step and after each one; the
    parameters with the lowest validation loss are kept (step 0 is the moments), and the fit stops
    after ``patience`` steps without improvement. Without them the last step is kept, which
    over-fits small calibration sets: score the result on held-out tokens either way.
    ``history``, if given a list, receives each step's mini-batch loss; the returned slot's
    ``fit_log`` holds both loss curves and the step kept. ``progress`` shows a bar.
    """
    if history is not None and not isinstance(history, list):
        raise SinkInterpError(f"history must be a list (it receives each step's loss) or None, got {history!r}")
    history = [] if history is None else history
    if method not in ("moments", "gradient"):
        raise SinkInterpError(f"fit_constant_bias method {method!r} is not one of 'moments', 'gradient'")
    check_bool("with_value", with_value)
    if method == "gradient":
        check_int("steps", steps, 1)
        check_int("batch_size", batch_size, 1)
        check_seed(seed)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr <= 10:
            raise SinkInterpError(f"lr must be a number in (0, 10], got {lr!r}")
        check_int("patience", patience, 1)
        if validation is not None:
            check_tokens(model, validation)
            if validation.shape[1] <= from_query + 1:
                raise SinkInterpError(f"validation tokens have {validation.shape[1]} positions: from_query "
                                      f"{from_query} leaves no query to score")
    elif validation is not None:
        raise SinkInterpError("validation tokens stop a gradient fit early: method 'moments' takes none")
    check_tokens(model, tokens)
    _check_from_query(from_query, position)
    if tokens.shape[1] <= from_query + 1:
        raise SinkInterpError(
            f"calibration tokens have {tokens.shape[1]} positions: from_query {from_query} leaves no "
            "query to fit on; use longer sequences"
        )
    selected_layers, selected_heads = _layers(model, _ints("layers", layers)), _heads(model, _ints("heads", heads))
    _check_seq(position, tokens.shape[1], "reference")
    require(model, *_SLOT_NEEDS, needed_by="fit_constant_bias")
    kept = _capture_all(model, tokens, selected_layers, {
        "attn.hook_attn_scores": lambda x: x[:, selected_heads, from_query:, position],  # [batch head query]
        "attn.hook_v": lambda x: x[:, position],  # [batch kv d_head]
    })
    logit = _mean_sink_logit(kept["attn.hook_attn_scores"], [attention_windows(model)[l] for l in selected_layers],
                             position, from_query)
    value = None
    if with_value:
        value = _as_query_heads(_as_kv(model, kept["attn.hook_v"]).mean(dim=1), model.cfg.n_heads)[:, selected_heads]
    fit_log = None
    if method == "gradient":
        logit, value, fit_log = _fit_by_gradient(model, tokens, validation, selected_layers, selected_heads, logit,
                                                 value, position, from_query, steps, lr, batch_size, seed, patience,
                                                 progress, history)
    return ConstantAttentionBias(logit=logit, value=value, layers=layers, heads=heads, replace_sink=True,
                                 position=position, from_query=from_query, method=method, fit_log=fit_log)


def _mean_sink_logit(scores: Tensor, windows: list[int | None], position: int, from_query: int) -> Tensor:
    """[layer head]: the sink's logit averaged over sequences and the queries i >= from_query that
    can see it. In a sliding-window layer the others hold -inf (masked); where no such query sees
    the sink the slot never acts (it is applied to visible queries only) and its logit is 0."""
    rows = []
    for layer_scores, window in zip(scores, windows):  # [batch head query]
        query = torch.arange(from_query, from_query + layer_scores.shape[-1])
        seen = torch.ones_like(query, dtype=torch.bool) if window is None else query - position < window
        if bool(seen.any()):
            rows.append(layer_scores[..., seen].mean(dim=(0, 2)))
        else:
            rows.append(torch.zeros(layer_scores.shape[1]))
    return torch.stack(rows)


def _fit_by_gradient(model, tokens, validation, layers, heads, logit, value, position, from_query, steps, lr,
                     batch_size, seed, patience, progress, history):
    """Adam on the slot's logit (and value) with the model frozen; see :func:`fit_constant_bias`.
    Returns the kept logit, value and the fit log."""
    device = next(model.parameters()).device
    logit = logit.clone().to(device).requires_grad_(True)
    params = [logit]
    if value is not None:
        value = value.clone().to(device).requires_grad_(True)
        params.append(value)
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    from sinkinterp._batches import progress_bar

    tqdm = progress_bar()

    def loss_of(batch: Tensor) -> Tensor:
        with model.hooks(fwd_hooks=hooks):
            logits = model(batch, return_type="logits")
        return torch.nn.functional.cross_entropy(
            logits[:, from_query:-1].flatten(0, 1).float(), batch[:, from_query + 1 :].flatten(), reduction="sum"
        ) / (batch.shape[0] * (batch.shape[1] - 1 - from_query))

    def validation_loss() -> float:
        with torch.no_grad():
            parts = [float(loss_of(validation[b : b + batch_size].to(device))) * len(validation[b : b + batch_size])
                     for b in range(0, validation.shape[0], batch_size)]
        return sum(parts) / validation.shape[0]

    def snapshot():
        return logit.detach().cpu().clone(), None if value is None else value.detach().cpu().clone()

    trained: list[float] = []  # this fit's steps (``history`` may already hold a caller's)
    validated: list[float] = []
    try:
        hooks = _bias_hooks(model, layers, heads, logit, value, True, position, from_query)
        best, best_step = snapshot(), 0
        if validation is not None:
            validated.append(validation_loss())
        bar = tqdm(range(steps), desc="fit constant bias", unit="step", disable=not progress)
        for step in bar:
            rows = torch.randperm(tokens.shape[0], generator=generator)[:batch_size]
            loss = loss_of(tokens[rows].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            trained.append(float(loss.detach()))
            history.append(trained[-1])
            if validation is None:
                bar.set_postfix(loss=f"{trained[-1]:.4f}")
                continue
            validated.append(validation_loss())
            if validated[-1] < validated[best_step]:
                best, best_step = snapshot(), step + 1
            bar.set_postfix(loss=f"{trained[-1]:.4f}", validation=f"{validated[-1]:.4f}")
            if step + 1 - best_step >= patience:
                break
        if validation is None:  # no split to choose by: the last step
            best, best_step = snapshot(), len(trained)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    log = {"steps_run": len(trained), "max_steps": steps, "kept_step": best_step, "train_loss": trained,
           "n_train": int(tokens.shape[0]),
           "n_validation": 0 if validation is None else int(validation.shape[0]),
           "validation_loss": validated, "patience": patience if validation is not None else None,
           "stopped_early": validation is not None and len(trained) < steps}
    return best[0], best[1], log


# --------------------------------------------------------------------------------------------
# 7. Ablate whole heads (for validating head classes)


def _pairs(label: str, heads) -> tuple[tuple[int, int], ...]:
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


def _head_pairs(model, pairs) -> list[tuple[int, int]]:
    chosen = [tuple(pair) for pair in pairs]
    for layer, head in chosen:
        _layers(model, [layer])
        _heads(model, [head])
    return chosen


@dataclass(frozen=True, repr=False)
class AblateHeads(Intervention):
    """Replace the output ``z`` of chosen (layer, head) pairs at queries i >= ``from_query`` by zero
    (``"zero"``) or by the head's mean output over reference text (``"mean"``, from :meth:`fit`).

    Mean ablation removes what a head computes from its input and keeps the constant it adds on
    average; zeroing also removes that constant (for a sink head, mostly the sink's value), which
    the no-op experiment shows costs loss on its own. ``from_query = 1`` leaves the first token's
    row alone, so the sink and its massive activations still form. ``heads``: ((layer, head), ...);
    ``value``: [len(heads)][d_head] for ``"mean"``.
    """

    NEEDS: ClassVar[tuple[str, ...]] = ("attn.hook_z",)

    heads: Any = ()
    mode: str = "mean"
    from_query: int = 1
    value: NumbersLike = None

    MODES: ClassVar[tuple[str, ...]] = ("zero", "mean")

    def __post_init__(self):
        _check_mode("AblateHeads", self.mode, self.MODES)
        pairs = _pairs("AblateHeads heads", self.heads)
        _refuse_empty(self, "heads", pairs, "name at least one (layer, head) pair")
        object.__setattr__(self, "heads", pairs)
        check_int("from_query", self.from_query)
        object.__setattr__(self, "value", _frozen(self, "value"))
        if self.mode == "zero" and self.value is not None:
            raise SinkInterpError("AblateHeads mode 'zero' takes no value")
        if self.mode == "mean" and self.value is None and self.heads:
            raise SinkInterpError(
                "AblateHeads mode 'mean' needs stored means: build it with AblateHeads.fit(model, tokens, heads=...)"
            )

    @classmethod
    def fit(cls, model, tokens: Int[Tensor, "batch pos"], *, heads, from_query: int = 1) -> AblateHeads:
        """Each head's ``z`` averaged over ``tokens`` at positions >= ``from_query``."""
        pairs = _head_pairs(model, cls(heads=heads, mode="zero").heads)
        check_tokens(model, tokens)
        check_int("from_query", from_query)
        layers = sorted({layer for layer, _ in pairs})
        _check_seq(from_query, tokens.shape[1], "AblateHeads.fit from_query")
        z = _capture(model, tokens, "attn.hook_z", layers, None, lambda x: x[:, from_query:].mean(dim=(0, 1)))
        value = torch.stack([z[layers.index(layer), head] for layer, head in pairs]) if pairs else None
        return cls(heads=pairs, mode="mean", from_query=from_query, value=value)

    def hooks(self, model) -> list[Hook]:
        pairs = _head_pairs(model, self.heads)
        self.check_model(model, vars(self))
        if self.value is not None:
            _check_shape("AblateHeads value", self.value, (len(pairs), model.cfg.d_head))
        value = None if self.value is None else _tensor(self.value)
        by_layer: dict[int, list[int]] = {}
        for index, (layer, _) in enumerate(pairs):
            by_layer.setdefault(layer, []).append(index)
        fq = self.from_query
        hooks = []
        for layer, indices in sorted(by_layer.items()):
            heads = [pairs[i][1] for i in indices]

            def ablate(z, hook, heads=heads, indices=indices):
                _check_seq(0, z.shape[1], "AblateHeads", fq)
                z = z.clone()
                if value is None:
                    z[:, fq:, heads] = 0
                else:
                    z[:, fq:, heads] = value[indices].to(z)
                return z

            hooks.append((f"blocks.{layer}.attn.hook_z", ablate))
        return hooks


# --------------------------------------------------------------------------------------------
# Applying interventions


@contextmanager
def intervene(model, *interventions) -> Iterator:
    """Apply ``interventions`` together (in this order at any shared hook point) inside the block.

    Removes exactly the hooks it added on exit, also when the body raises; hooks the caller
    attached before stay. Every intervention is validated against the model before any hook is
    attached.
    """
    hooks: list[Hook] = []
    for intervention in interventions:
        if not isinstance(intervention, Intervention):
            raise SinkInterpError(
                f"intervene takes Intervention values, got {type(intervention).__name__}: "
                f"use one of {', '.join(sorted(INTERVENTIONS))}"
            )
        hooks.extend(intervention.hooks(model))
    with model.hooks(fwd_hooks=hooks):
        yield model
