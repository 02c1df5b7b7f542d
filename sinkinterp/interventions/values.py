"""Ablate the sink's value contribution (:class:`AblateSinkValue`)."""

from __future__ import annotations

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
    IntsLike,
    NumbersLike,
    as_tensor,
    check_from_query,
    check_mode,
    check_position,
    check_seq,
    frozen_tensor,
    ints_or_none,
    norm_common,
    one_of,
    pick,
)
from sinkinterp.interventions.capture import add_at, capture
from sinkinterp.sites import (
    as_kv,
    as_query_heads,
    is_head_site,
    resolve_heads,
    resolve_layers,
    selected_heads,
)

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
    ARRAY_AXES: ClassVar[dict[str, tuple[str, ...]]] = {"value": ("layer", "head", "d_head")}
    HEAD_SWEEP: ClassVar[bool] = True
    FIT_OPTIONS: ClassVar[dict[str, FitOption]] = {
        "mode": FitOption("'mean' (over calibration) or 'patch' (first calibration sequence)", one_of("mean", "patch")),
    }

    layers: IntsLike = None
    heads: IntsLike = None
    position: int = 0
    mode: str = "zero"
    from_query: int = 1
    value: NumbersLike = None

    MODES: ClassVar[tuple[str, ...]] = ("zero", "mean", "patch")

    def __post_init__(self):
        norm_common(self)
        check_mode("AblateSinkValue", self.mode, self.MODES)
        check_int("position", self.position)
        check_from_query(self.from_query, self.position)
        object.__setattr__(self, "value", frozen_tensor(self, "value"))
        if self.mode == "zero" and self.value is not None:
            raise SinkInterpError("AblateSinkValue mode 'zero' takes no value")
        if self.mode != "zero" and is_head_site(self.heads):
            raise SinkInterpError(f"AblateSinkValue mode {self.mode!r} stores [layers][heads] values: give layers= "
                                  "and heads= (the same heads in every layer), or one intervention per layer")
        if self.mode != "zero" and self.value is None:
            raise SinkInterpError(
                f"AblateSinkValue mode {self.mode!r} needs stored values: build it with "
                f"AblateSinkValue.fit(model, tokens, mode={self.mode!r}, ...)"
            )

    @classmethod
    def fit(cls, model: Model, tokens: Int[Tensor, "batch pos"], *, mode: str = "mean", layers=None, heads=None,
            position: int = 0, from_query: int = 1) -> AblateSinkValue:
        """``"mean"``: the sink's value averaged over ``tokens``; ``"patch"``: the sink value of
        ``tokens`` (one sequence, another input)."""
        check_mode("AblateSinkValue.fit", mode, ("mean", "patch"))
        check_tokens(model, tokens)
        check_int("position", position)
        check_seq(position, tokens.shape[1], "reference")
        if mode == "patch" and tokens.shape[0] != 1:
            raise SinkInterpError(f"mode 'patch' takes one source sequence, got {tokens.shape[0]}")
        selected_layers, selected_heads = resolve_layers(model, ints_or_none("layers", layers)), resolve_heads(model, ints_or_none("heads", heads))
        values = as_kv(model, capture(model, tokens, "attn.hook_v", selected_layers, position))  # [layer batch kv d]
        per_head = as_query_heads(values.mean(dim=1), model.cfg.n_heads)[:, selected_heads]
        return cls(layers=layers, heads=heads, position=position, mode=mode, from_query=from_query, value=per_head)

    @classmethod
    def fit_spec(cls, model: Model, calibration: Tensor, *, seed: int = 0, draw: int = 0, n_draws: int = 1,
                 fields: dict[str, Any], options: dict[str, Any]) -> AblateSinkValue:
        mode = options.get("mode", "mean")
        source = calibration if mode == "mean" else calibration[:1]
        return cls.fit(model, source, mode=mode, **pick(fields, "layers", "heads", "position", "from_query"))

    def hooks(self, model: Model) -> list[Hook]:
        sites = selected_heads(model, self.layers, self.heads)
        check_position(model, self.position)
        if self.value is not None:
            self.check_arrays(model, layer=len(sites), head=len(sites[0][1]))
        self.check_model(model, vars(self))
        n_heads, p, fq = model.cfg.n_heads, self.position, self.from_query
        value = None if self.value is None else as_tensor(self.value)
        hooks = []
        for index, (layer, heads) in enumerate(sites):
            state: dict[str, Tensor] = {}

            def keep_v(v, hook, state=state):
                check_seq(p, v.shape[1], "AblateSinkValue", fq)
                state["v"] = v[:, p]  # [batch kv d_head]

            def keep_a(pattern, hook, state=state, heads=heads):
                state["a"] = pattern[:, heads, fq:, p]  # [batch heads query]

            def edit_z(z, hook, state=state, index=index, heads=heads):
                v_sink = as_query_heads(state.pop("v"), n_heads)[:, heads]  # [batch heads d]
                a = state.pop("a")
                target = torch.zeros_like(v_sink) if value is None else value[index].to(z)[None].expand_as(v_sink)
                delta = a[..., None] * (target - v_sink)[:, :, None, :]  # [batch heads query d]
                return add_at(z, delta.transpose(1, 2), fq, heads)

            hooks += [(f"blocks.{layer}.attn.hook_v", keep_v), (f"blocks.{layer}.attn.hook_pattern", keep_a),
                      (f"blocks.{layer}.attn.hook_z", edit_z)]
        return hooks


