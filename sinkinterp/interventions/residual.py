"""Patch the first token's residual stream (:class:`PatchFirstTokenResidual`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from sinkinterp._batches import check_int, check_tokens
from sinkinterp.backends import Model
from sinkinterp.data import resolve_token
from sinkinterp.errors import SinkInterpError
from sinkinterp.interventions.base import (
    FitOption,
    Hook,
    Intervention,
    IntsLike,
    NumbersLike,
    SpecContext,
    as_tensor,
    check_position,
    check_seq,
    frozen_tensor,
    ints_or_none,
    is_int,
    norm_common,
    pick,
)
from sinkinterp.interventions.capture import capture
from sinkinterp.sites import resolve_layers

# --------------------------------------------------------------------------------------------
# 5. Patch the first token's residual stream

_RESID_HOOKS = ("resid_pre", "resid_mid", "resid_post")


@dataclass(frozen=True, repr=False)
class PatchFirstTokenResidual(Intervention):
    """Replace the residual stream at ``position`` (``hook_resid_pre`` by default) of the chosen
    layers with stored vectors: ``source`` is [layers][rows][d_model], one row (broadcast to every
    sequence) or one row per sequence of the batch (aligned). Build it with :meth:`fit`."""

    ARRAY_AXES: ClassVar[dict[str, tuple[str, ...]]] = {"source": ("layer", "rows", "d_model")}
    NEEDS_FIT: ClassVar[bool] = True
    FIT_OPTIONS: ClassVar[dict[str, FitOption]] = {
        "source": FitOption("'mean', 'other' (each sequence gets another input's), or a token",
                            lambda v: isinstance(v, (str, int)) and not isinstance(v, bool)),
        "from_layer": FitOption("int: patch layers from_layer.. of the model (instead of layers)", is_int(0)),
    }

    @classmethod
    def needs(cls, fields: dict[str, Any]) -> tuple[str, ...]:
        return (f"hook_{fields.get('hook', 'resid_pre')}",)

    source: NumbersLike = ()
    layers: IntsLike = None
    hook: str = "resid_pre"
    position: int = 0
    description: str = ""

    def __post_init__(self):
        norm_common(self, heads=False)
        if self.hook not in _RESID_HOOKS:
            raise SinkInterpError(f"hook {self.hook!r} is not one of {', '.join(map(repr, _RESID_HOOKS))}")
        check_int("position", self.position)
        object.__setattr__(self, "source", frozen_tensor(self, "source"))

    @classmethod
    def fit(cls, model: Model, source, *, reference: Tensor | None = None, layers=None, hook: str = "resid_pre",
            position: int = 0) -> PatchFirstTokenResidual:
        """``source``: token ids [rows, pos] (their own residual at ``position``); ``"mean"`` (the mean
        over ``reference`` tokens); or a token (string or id) that replaces the first token: position
        0's residual depends on that token alone, so it is read from a one-token run."""
        if hook not in _RESID_HOOKS:
            raise SinkInterpError(f"hook {hook!r} is not one of {', '.join(map(repr, _RESID_HOOKS))}")
        selected = resolve_layers(model, ints_or_none("layers", layers))
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
        residual = capture(model, tokens, f"hook_{hook}", selected, position)  # [layer rows d_model]
        if not isinstance(source, Tensor) and source == "mean":
            residual = residual.mean(dim=1, keepdim=True)
        return cls(source=residual, layers=layers, hook=hook, position=position, description=description)

    @classmethod
    def fit_spec(cls, model: Model, calibration: Tensor, *, seed: int = 0, draw: int = 0, n_draws: int = 1,
                 fields: dict[str, Any], options: dict[str, Any]) -> PatchFirstTokenResidual | PerSequencePatch:
        """``source``: ``"mean"`` (over the calibration split), ``"other"`` (each evaluation sequence
        gets calibration sequence ``row % n_calibration``'s), or a token; ``from_layer``: layers
        from_layer..n_layers-1 of this model."""
        source = options.get("source", "mean")
        if "from_layer" in options:
            fields = {**fields, "layers": list(range(options["from_layer"], model.cfg.n_layers))}
        if source == "other":
            return PerSequencePatch(fields, calibration)
        given = pick(fields, "layers", "hook", "position")
        if source == "mean":
            return cls.fit(model, "mean", reference=calibration, **given)
        return cls.fit(model, source, **given)

    @classmethod
    def fit_needs_calibration(cls, options: dict[str, Any]) -> bool:
        return options.get("source", "mean") in ("mean", "other")

    @classmethod
    def check_spec(cls, fields: dict[str, Any], options: dict[str, Any] | None, context: SpecContext) -> None:
        super().check_spec(fields, options, context)
        if options is not None and "from_layer" in options and "layers" in fields:
            context.fail(f"{context.where}.fit.from_layer", "give layers or fit.from_layer, not both")

    @classmethod
    def check_record(cls, model: Model, record: dict[str, Any]) -> None:
        fit = record.get("fit") or {}
        if fit.get("source") not in (None, "mean", "other"):
            resolve_token(model, fit["source"])
        from_layer = fit.get("from_layer")
        if from_layer is not None and from_layer >= model.cfg.n_layers:
            raise SinkInterpError(f"fit from_layer {from_layer}: the model has {model.cfg.n_layers} layers "
                                  f"(0..{model.cfg.n_layers - 1})")
        super().check_record(model, record)

    def hooks(self, model: Model) -> list[Hook]:
        layers = resolve_layers(model, self.layers)
        check_position(model, self.position)
        self.check_model(model, vars(self))
        if self.source == ():
            raise SinkInterpError("PatchFirstTokenResidual has no source: build it with PatchFirstTokenResidual.fit("
                                  "model, source, ...) (in a spec, give it a fit: block)")
        self.check_arrays(model, layer=len(layers))
        source, p = as_tensor(self.source), self.position
        hooks = []
        for index, layer in enumerate(layers):
            def patch(x, hook, index=index):
                check_seq(p, x.shape[1], "PatchFirstTokenResidual")
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


class PerSequencePatch:
    """A :class:`PatchFirstTokenResidual` built per evaluation mini-batch: each sequence gets
    another input's first-token residual (calibration sequence ``row % n_calibration``). The
    evaluation engine calls :meth:`build` with each batch's row indices."""

    def __init__(self, fields: dict[str, Any], calibration: Tensor):
        self.fields, self.calibration = fields, calibration

    def build(self, model: Model, rows: Tensor) -> PatchFirstTokenResidual:
        source = self.calibration[rows % self.calibration.shape[0], :2]
        return PatchFirstTokenResidual.fit(model, source, layers=self.fields.get("layers"),
                                           hook=self.fields.get("hook", "resid_pre"))

    def to_dict(self) -> dict[str, Any]:
        return {**self.fields, "fit": {"source": "other"},
                "resolved": "per sequence: calibration sequence (row % n_calibration)'s first-token residual"}
