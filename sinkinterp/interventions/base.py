"""The intervention base class, its frozen-value helpers and checks, and :func:`intervene`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from sinkinterp.backends import Model, require
from sinkinterp.errors import SinkInterpError
from sinkinterp.sites import Heads, is_head_site, resolve_heads, resolve_layers

# --------------------------------------------------------------------------------------------
# Values: nested tuples of floats (hashable, comparable, JSON-ready) <-> tensors


def freeze(value):
    if isinstance(value, Tensor):
        value = value.detach().cpu().double().tolist()
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    return value


#: Largest magnitude a stored value may have (about float32's range): beyond it, activations overflow.
LARGEST = 1e30


def frozen_tensor(owner, name: str, *, minus_inf: bool = False):
    """``owner.<name>`` frozen to nested tuples, refusing anything but finite numbers in it (a NaN
    or inf stored in an intervention would reach the logits and then results.json as bare NaN).
    ``minus_inf``: -inf is allowed too (a slot logit of -inf is a head without a slot)."""
    value = freeze(getattr(owner, name))

    def check(leaf):
        if isinstance(leaf, tuple):
            for item in leaf:
                check(item)
        elif (isinstance(leaf, bool) or not isinstance(leaf, (int, float))
              or not ((math.isfinite(leaf) and abs(leaf) <= LARGEST) or (minus_inf and leaf == -math.inf))):
            allowed = "finite numbers or -inf" if minus_inf else "finite numbers"
            raise SinkInterpError(f"{type(owner).__name__} {name} holds {leaf!r}: only {allowed} of magnitude at "
                                  f"most {LARGEST:g} are allowed (larger ones overflow float32 activations)")

    if value is not None:
        check(value)
    return value


def thaw(value):
    if isinstance(value, tuple):
        return [thaw(v) for v in value]
    return value


def shape_of(value) -> tuple[int, ...]:
    shape = []
    while isinstance(value, tuple):
        shape.append(len(value))
        value = value[0] if value else None
    return tuple(shape)


def as_tensor(value, device=None) -> Tensor:
    return torch.tensor(thaw(value), dtype=torch.float32, device=device)


def check_position(model: Model, position: int) -> None:
    if not 0 <= position < model.cfg.n_ctx:
        raise SinkInterpError(f"position {position} out of range: model context is 0..{model.cfg.n_ctx - 1}")


def check_seq(position: int, n_pos: int, what: str, from_query: int | None = None) -> None:
    if position >= n_pos:
        raise SinkInterpError(f"{what} position {position} is beyond this input's {n_pos} positions")
    if from_query is not None and from_query >= n_pos:
        raise SinkInterpError(
            f"{what} from_query {from_query} is beyond this input's {n_pos} positions: it would act on no "
            f"query and leave the output exactly clean; use from_query < {n_pos} or longer inputs")




def ints_or_none(label: str, values) -> tuple[int, ...] | None:
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


def check_mode(cls_name: str, mode: str, allowed: Sequence[str]) -> None:
    if mode not in allowed:
        raise SinkInterpError(f"{cls_name} mode {mode!r} is not one of {', '.join(map(repr, allowed))}")


def check_from_query(from_query, position: int) -> None:
    if isinstance(from_query, bool) or not isinstance(from_query, int) or from_query <= position:
        raise SinkInterpError(
            f"from_query {from_query!r} must be an integer > position {position}: the sink's own row "
            "(and the rows before it) must stay untouched"
        )


Hook = tuple[str, Callable]
# Field types users fill in loosely (lists, tuples, tensors); __post_init__ validates and freezes
# them into tuples, with a SinkInterpError naming the bad value.
IntsLike = Any
NumbersLike = Any
#: Every intervention type by name: what specs, ``Intervention.from_dict`` and the CLI accept.
#: Subclasses register themselves when they are defined (:func:`register_intervention`).
INTERVENTIONS: dict[str, type[Intervention]] = {}


def register_intervention(cls: type[Intervention]) -> type[Intervention]:
    """Register ``cls`` under its class name; refuse a second, different type of the same name.

    Defining a subclass of :class:`Intervention` calls this; defining the same class again (a
    re-run notebook cell: same module and qualified name) replaces the old definition.
    """
    if not (isinstance(cls, type) and issubclass(cls, Intervention)):
        raise SinkInterpError(f"register_intervention takes an Intervention subclass, got {cls!r}")
    old = INTERVENTIONS.get(cls.__name__)
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise SinkInterpError(f"an intervention type named {cls.__name__!r} is already registered "
                              f"({old.__module__}.{old.__qualname__}): give {cls.__module__}.{cls.__qualname__} "
                              "another name")
    INTERVENTIONS[cls.__name__] = cls
    return cls


@dataclass(frozen=True)
class FitOption:
    """One option of a spec's ``fit:`` block: what it allows (for messages) and a check of a value."""

    allowed: str
    check: Callable[[Any], bool] = field(default=lambda value: True, compare=False)


def pick(fields: dict[str, Any], *names: str) -> dict[str, Any]:
    """The record's own values for these fields, to pass on to a fit."""
    return {name: fields[name] for name in names if name in fields}


def is_int(low: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def is_number(low: float | int, high: float | int, open_low: bool = True) -> Callable[[Any], bool]:
    return lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)
                      and (low < v if open_low else low <= v) and v <= high)


def one_of(*allowed) -> Callable[[Any], bool]:
    return lambda v: any(v == a and type(v) is type(a) for a in allowed)


@dataclass(frozen=True)
class SpecContext:
    """Where a spec record sits, for the checks a type makes when the spec is read."""

    where: str
    """The record's path, e.g. ``spec.conditions[2] ('slot').interventions[0]``."""
    condition: str
    """The condition's path (``spec.conditions[2] ('slot')``)."""
    n_calibration: int
    draws: int
    fail: Callable[[str, str], None]
    """``fail(path, message)`` raises the spec error."""


# --------------------------------------------------------------------------------------------
# The base class


@dataclass(frozen=True)
class Intervention:
    """Base class: a value that compiles to forward hooks.

    A subclass describes itself, so that specs, sweeps and the runner need no per-type code:

    - ``NEEDS``: what the model's hook points must do (``backends.require``);
    - ``ARRAY_AXES``: each stored array's axes, outermost first (``"layer"`` over the chosen
      layers, ``"head"`` over the chosen heads, ``"kv_head"``, ``"d_head"``, ``"d_model"``, and
      free axes such as ``"rows"``): shapes are checked and sweeps restrict arrays from it;
    - ``HEAD_SWEEP``: whether a sweep may restrict it to one head;
    - ``FIT_OPTIONS`` and :meth:`fit_spec`: what a spec's ``fit:`` block may say and how the
      runner fits it on the calibration split (an empty ``FIT_OPTIONS``: it takes no ``fit:``);
    - ``NEEDS_FIT``: stored arrays that only a fit makes (a spec record must then say ``fit:``);
    - :meth:`check_spec` and :meth:`check_record`: its checks when a spec is read, and against the
      model before any forward pass.

    Subclasses register by class name (:func:`register_intervention`).
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        register_intervention(cls)

    #: What the model's hook points must do for this intervention (see ``backends.require``).
    NEEDS: ClassVar[tuple[str, ...]] = ()
    ARRAY_AXES: ClassVar[dict[str, tuple[str, ...]]] = {}
    HEAD_SWEEP: ClassVar[bool] = False
    FIT_OPTIONS: ClassVar[dict[str, FitOption]] = {}
    NEEDS_FIT: ClassVar[bool] = False
    #: Words a spec may give for ``layers`` instead of layer numbers (resolved by the fit).
    LAYER_WORDS: ClassVar[tuple[str, ...]] = ()

    # ---- fitting from a spec

    @classmethod
    def fit_spec(cls, model: Model, calibration: Tensor, *, seed: int = 0, draw: int = 0, n_draws: int = 1,
                 fields: dict[str, Any], options: dict[str, Any]) -> Intervention:
        """The intervention a spec record describes (``fields``, plus its ``fit:`` block
        ``options``), fitted on ``calibration``; random choices are draw ``draw`` of ``n_draws``
        under ``seed``. Types with ``FIT_OPTIONS`` override this."""
        raise SinkInterpError(f"{cls.__name__} cannot be fitted from a spec (it has no fit options)")

    @classmethod
    def fit_is_random(cls, options: dict[str, Any]) -> bool:
        """Whether a fit with these options makes a seeded random choice (so draws differ)."""
        return False

    @classmethod
    def fit_needs_calibration(cls, options: dict[str, Any]) -> bool:
        """Whether a fit with these options reads the calibration split."""
        return True

    @classmethod
    def check_spec(cls, fields: dict[str, Any], options: dict[str, Any] | None, context: SpecContext) -> None:
        """Checks of a spec record beyond its fields' and fit options' own (no model needed)."""
        layers = fields.get("layers")
        if isinstance(layers, str) and layers not in cls.LAYER_WORDS:
            words = f" or one of {', '.join(map(repr, cls.LAYER_WORDS))}" if cls.LAYER_WORDS else ""
            context.fail(f"{context.where}.layers", f"{layers!r}: give layer numbers{words}")

    @classmethod
    def check_record(cls, model: Model, record: dict[str, Any]) -> None:
        """Everything a spec record asks of ``model``, checked before any forward pass."""
        layers = record.get("layers")
        if not isinstance(layers, str):  # a word such as 'first' is resolved by the fit
            resolve_layers(model, layers)
        if "heads" in record:
            resolve_heads(model, record.get("heads"))
        cls.check_model(model, {**record, **(record.get("fit") or {})}, where=record["type"])

    # ---- stored arrays

    def check_arrays(self, model: Model, **sizes: int) -> None:
        """Each stored array (``ARRAY_AXES``) has the shape its axes give: ``sizes`` names the
        selection axes (``layer=3, head=2``); ``d_head`` / ``d_model`` come from the model; other
        axes are free."""
        known = {"d_head": model.cfg.d_head, "d_model": model.cfg.d_model, **sizes}
        for name, axes in self.ARRAY_AXES.items():
            value = getattr(self, name)
            if value is None or isinstance(value, (int, float)) or value == ():
                continue
            got = shape_of(value)
            expected = tuple(known.get(axis, axis) for axis in axes)
            if len(got) != len(expected) or any(isinstance(e, int) and g != e for g, e in zip(got, expected)):
                shown = "(" + ", ".join(map(str, expected)) + ")"
                raise SinkInterpError(f"{type(self).__name__} {name} has shape {got}, expected {shown}")

    def restrict(self, model: Model, layer: int, head: int | None = None) -> Intervention | None:
        """This intervention at one layer (and one head), its stored arrays sliced along their
        ``"layer"`` and ``"head"`` axes; None if it does not act there."""
        kind = type(self).__name__
        if not hasattr(self, "layers"):
            raise SinkInterpError(f"{kind} has no layers to sweep over")
        if is_head_site(getattr(self, "heads", None)):  # (layer, head) pairs: no stored arrays to slice
            pairs = [pair for pair in self.heads if pair[0] == layer and (head is None or pair[1] == head)]
            if head is not None and not self.HEAD_SWEEP:
                raise SinkInterpError(f"a head sweep cannot restrict {kind} to one head")
            return dataclasses.replace(self, heads=tuple(pairs)) if pairs else None
        layers = resolve_layers(model, self.layers)
        if layer not in layers:
            return None
        changes: dict[str, Any] = {"layers": (layer,)}
        slices = {"layer": layers.index(layer)}
        if head is not None:
            if not self.HEAD_SWEEP:
                sweepable = sorted(name for name, cls in INTERVENTIONS.items() if cls.HEAD_SWEEP)
                raise SinkInterpError(f"a head sweep cannot restrict {kind} to one head: "
                                      f"sweep 'layers' instead (heads can be swept for {', '.join(sweepable)})")
            heads = resolve_heads(model, self.heads)
            if head not in heads:
                return None
            changes["heads"] = (head,)
            slices["head"] = heads.index(head)
        for name, axes in self.ARRAY_AXES.items():
            value = getattr(self, name)
            if not (isinstance(value, tuple) and value):
                continue
            for depth, axis in enumerate(axes):
                if axis in slices:
                    value = _take(value, depth, slices[axis])
            changes[name] = value
        return dataclasses.replace(self, **changes)

    @classmethod
    def needs(cls, fields: dict[str, Any]) -> tuple[str, ...]:
        """The capabilities an intervention with these fields needs (a record or ``vars(self)``)."""
        return cls.NEEDS

    @classmethod
    def check_model(cls, model: Model, fields: dict[str, Any], *, where: str | None = None) -> None:
        """Refuse, before any forward pass, a model whose hook points cannot carry this intervention."""
        require(model, *cls.needs(fields), needed_by=where or cls.__name__)

    def hooks(self, model: Model) -> list[Hook]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        record = {"type": type(self).__name__}
        for f in dataclasses.fields(self):
            record[f.name] = thaw(getattr(self, f.name))
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
            shape = shape_of(value)
            if len(shape) >= 2 or (len(shape) == 1 and shape[0] > 8):
                text = f"<{'x'.join(map(str, shape))} numbers>"
            else:
                text = repr(value)
            parts.append(f"{f.name}={text}")
        return f"{type(self).__name__}({', '.join(parts)})"


def _take(value: tuple, depth: int, index: int) -> tuple:
    """Nested tuples with axis ``depth`` cut to its entry ``index`` (kept as an axis of length 1)."""
    if depth == 0:
        return (value[index],)
    return tuple(_take(row, depth - 1, index) for row in value)


class RandomControl:
    """Mixin of the types with a matched random control (``random_control(model, tokens, seed=,
    pool=)``): a spec's ``fit: {control: random, pool: n}`` turns the fitted value into its control,
    drawn with seed + draw."""

    CONTROL_OPTIONS: ClassVar[dict[str, FitOption]] = {
        "control": FitOption("'random' or null", one_of("random", None)),
        "pool": FitOption("int", is_int(1)),
    }
    #: The control's default pool (candidates per chosen unit).
    CONTROL_POOL: ClassVar[int] = 10

    @classmethod
    def fit_is_random(cls, options: dict[str, Any]) -> bool:
        return options.get("control") == "random"

    def controlled(self, model: Model, calibration: Tensor, *, seed: int, options: dict[str, Any]):
        """This value, or its random control when the fit options ask for one."""
        if options.get("control") == "random":
            return self.random_control(model, calibration, seed=seed, pool=options.get("pool", self.CONTROL_POOL))
        return self


def refuse_head_site(owner, why: str) -> None:
    """Types with arrays stored per [layer][head] take the same heads in every layer."""
    if is_head_site(getattr(owner, "heads", None)):
        raise SinkInterpError(f"{type(owner).__name__} takes layers= and heads= (the same heads in every layer): "
                              f"{why}; use one intervention per layer for different heads")


def refuse_empty(owner, name: str, values, hint: str = "name at least one") -> None:
    """An intervention with nothing to act on would return the clean output without a word."""
    if values is not None and len(values) == 0:
        raise SinkInterpError(f"{type(owner).__name__} {name} is empty: it would act nowhere and leave the output "
                              f"exactly clean; {hint}")


def norm_common(self, *, heads: bool = True) -> None:
    """Validate and freeze ``layers`` and ``heads``: per-layer head indices, or ``heads`` in a
    :class:`~sinkinterp.sites.Heads` spelling (pairs, a mapping, a ``Heads``), stored as sorted
    (layer, head) pairs with ``layers`` None."""
    if heads and is_head_site(self.heads):
        if self.layers is not None:
            raise SinkInterpError(f"{type(self).__name__}: heads {self.heads!r} already names its layers; "
                                  "leave layers=None")
        pairs = Heads(self.heads).pairs
        refuse_empty(self, "heads", pairs, "name at least one (layer, head) pair")
        object.__setattr__(self, "heads", pairs)
        return
    names = ("layers", "heads") if heads else ("layers",)
    for name in names:
        values = ints_or_none(name, getattr(self, name))
        refuse_empty(self, name, values, "name at least one, or None for all")
        object.__setattr__(self, name, values)


# --------------------------------------------------------------------------------------------
# Applying interventions


@contextmanager
def intervene(model: Model, *interventions) -> Iterator:
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
