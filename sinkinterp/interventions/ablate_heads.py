"""Ablate whole heads (:class:`AblateHeads`), for validating head classes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from jaxtyping import Int
from torch import Tensor

from sinkinterp._batches import check_int, check_tokens
from sinkinterp.backends import Model
from sinkinterp.errors import SinkInterpError
from sinkinterp.interventions.base import (
    FitOption,
    Hook,
    Intervention,
    NumbersLike,
    as_tensor,
    check_mode,
    check_seq,
    frozen_tensor,
    one_of,
    pick,
    refuse_empty,
)
from sinkinterp.interventions.capture import capture
from sinkinterp.sites import check_head_pairs, head_pairs

# --------------------------------------------------------------------------------------------
# 7. Ablate whole heads (for validating head classes)


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
    HEAD_SWEEP: ClassVar[bool] = True
    ARRAY_AXES: ClassVar[dict[str, tuple[str, ...]]] = {"value": ("pair", "d_head")}
    FIT_OPTIONS: ClassVar[dict[str, FitOption]] = {
        "mode": FitOption("'mean' (each head's output averaged over the calibration split)", one_of("mean")),
    }

    heads: Any = ()
    mode: str = "mean"
    from_query: int = 1
    value: NumbersLike = None

    MODES: ClassVar[tuple[str, ...]] = ("zero", "mean")

    def __post_init__(self):
        check_mode("AblateHeads", self.mode, self.MODES)
        pairs = head_pairs("AblateHeads heads", self.heads)
        refuse_empty(self, "heads", pairs, "name at least one (layer, head) pair")
        object.__setattr__(self, "heads", pairs)
        check_int("from_query", self.from_query)
        object.__setattr__(self, "value", frozen_tensor(self, "value"))
        if self.mode == "zero" and self.value is not None:
            raise SinkInterpError("AblateHeads mode 'zero' takes no value")
        if self.mode == "mean" and self.value is None and self.heads:
            raise SinkInterpError(
                "AblateHeads mode 'mean' needs stored means: build it with AblateHeads.fit(model, tokens, heads=...)"
            )

    @classmethod
    def fit(cls, model: Model, tokens: Int[Tensor, "batch pos"], *, heads, from_query: int = 1) -> AblateHeads:
        """Each head's ``z`` averaged over ``tokens`` at positions >= ``from_query``; ``heads="all"``
        is every (layer, head) of the model (to sweep or screen them one by one)."""
        if heads == "all":
            heads = [(layer, head) for layer in range(model.cfg.n_layers) for head in range(model.cfg.n_heads)]
        pairs = check_head_pairs(model, cls(heads=heads, mode="zero").heads)
        check_tokens(model, tokens)
        check_int("from_query", from_query)
        layers = sorted({layer for layer, _ in pairs})
        check_seq(from_query, tokens.shape[1], "AblateHeads.fit from_query")
        z = capture(model, tokens, "attn.hook_z", layers, None, lambda x: x[:, from_query:].mean(dim=(0, 1)))
        value = torch.stack([z[layers.index(layer), head] for layer, head in pairs]) if pairs else None
        return cls(heads=pairs, mode="mean", from_query=from_query, value=value)

    @classmethod
    def fit_spec(cls, model: Model, calibration: Tensor, *, seed: int = 0, draw: int = 0, n_draws: int = 1,
                 fields: dict[str, Any], options: dict[str, Any]) -> AblateHeads:
        if options.get("mode", "mean") != "mean":
            raise SinkInterpError(f"AblateHeads fit mode {options['mode']!r} is not 'mean'")
        return cls.fit(model, calibration, **pick(fields, "heads", "from_query"))

    @classmethod
    def check_record(cls, model: Model, record: dict[str, Any]) -> None:
        if record.get("heads") != "all":  # "all": every head of the model, named by the fit
            check_head_pairs(model, record.get("heads", ()))
        cls.check_model(model, {**record, **(record.get("fit") or {})}, where=record["type"])

    def restrict(self, model: Model, layer: int, head: int | None = None) -> Intervention | None:
        """Its pairs at ``layer`` (and ``head``), with their stored means; None if it names none there."""
        check_head_pairs(model, self.heads)
        keep = [i for i, (l, h) in enumerate(self.heads) if l == layer and (head is None or h == head)]
        if not keep:
            return None
        value = None if self.value is None else tuple(self.value[i] for i in keep)
        return dataclasses.replace(self, heads=tuple(self.heads[i] for i in keep), value=value)

    def hooks(self, model: Model) -> list[Hook]:
        pairs = check_head_pairs(model, self.heads)
        self.check_model(model, vars(self))
        self.check_arrays(model, pair=len(pairs))
        value = None if self.value is None else as_tensor(self.value)
        by_layer: dict[int, list[int]] = {}
        for index, (layer, _) in enumerate(pairs):
            by_layer.setdefault(layer, []).append(index)
        fq = self.from_query
        hooks = []
        for layer, indices in sorted(by_layer.items()):
            heads = [pairs[i][1] for i in indices]

            def ablate(z, hook, heads=heads, indices=indices):
                check_seq(0, z.shape[1], "AblateHeads", fq)
                z = z.clone()
                if value is None:
                    z[:, fq:, heads] = 0
                else:
                    z[:, fq:, heads] = value[indices].to(z)
                return z

            hooks.append((f"blocks.{layer}.attn.hook_z", ablate))
        return hooks


