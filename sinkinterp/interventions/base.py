"""The intervention base class, its frozen-value helpers and checks, and :func:`intervene`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from sinkinterp.backends import Model, require
from sinkinterp.errors import SinkInterpError

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


def check_shape(label: str, value, expected: tuple[int, ...]) -> None:
    got = shape_of(value)
    if got != expected:
        raise SinkInterpError(f"{label} has shape {got}, expected {expected}")


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
INTERVENTIONS: dict[str, type[Intervention]] = {}





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


def refuse_empty(owner, name: str, values, hint: str = "name at least one") -> None:
    """An intervention with nothing to act on would return the clean output without a word."""
    if values is not None and len(values) == 0:
        raise SinkInterpError(f"{type(owner).__name__} {name} is empty: it would act nowhere and leave the output "
                              f"exactly clean; {hint}")


def norm_common(self, *, heads: bool = True) -> None:
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
