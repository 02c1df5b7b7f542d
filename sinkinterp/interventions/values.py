"""Ablate the sink's value contribution (:class:`AblateSinkValue`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Int
from torch import Tensor

from sinkinterp._batches import check_int, check_tokens
from sinkinterp.backends import Model
from sinkinterp.errors import SinkInterpError
from sinkinterp.interventions.base import (
    Hook,
    Intervention,
    IntsLike,
    NumbersLike,
    as_tensor,
    check_from_query,
    check_mode,
    check_position,
    check_seq,
    check_shape,
    frozen_tensor,
    ints_or_none,
    norm_common,
)
from sinkinterp.interventions.capture import add_at, capture
from sinkinterp.sites import as_kv, as_query_heads, resolve_heads, resolve_layers

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
        norm_common(self)
        check_mode("AblateSinkValue", self.mode, self.MODES)
        check_int("position", self.position)
        check_from_query(self.from_query, self.position)
        object.__setattr__(self, "value", frozen_tensor(self, "value"))
        if self.mode == "zero" and self.value is not None:
            raise SinkInterpError("AblateSinkValue mode 'zero' takes no value")
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

    def hooks(self, model: Model) -> list[Hook]:
        layers, heads = resolve_layers(model, self.layers), resolve_heads(model, self.heads)
        check_position(model, self.position)
        if self.value is not None:
            check_shape("AblateSinkValue value", self.value, (len(layers), len(heads), model.cfg.d_head))
        self.check_model(model, vars(self))
        n_heads, p, fq = model.cfg.n_heads, self.position, self.from_query
        value = None if self.value is None else as_tensor(self.value)
        hooks = []
        for index, layer in enumerate(layers):
            state: dict[str, Tensor] = {}

            def keep_v(v, hook, state=state):
                check_seq(p, v.shape[1], "AblateSinkValue", fq)
                state["v"] = v[:, p]  # [batch kv d_head]

            def keep_a(pattern, hook, state=state):
                state["a"] = pattern[:, heads, fq:, p]  # [batch heads query]

            def edit_z(z, hook, state=state, index=index):
                v_sink = as_query_heads(state.pop("v"), n_heads)[:, heads]  # [batch heads d]
                a = state.pop("a")
                target = torch.zeros_like(v_sink) if value is None else value[index].to(z)[None].expand_as(v_sink)
                delta = a[..., None] * (target - v_sink)[:, :, None, :]  # [batch heads query d]
                return add_at(z, delta.transpose(1, 2), fq, heads)

            hooks += [(f"blocks.{layer}.attn.hook_v", keep_v), (f"blocks.{layer}.attn.hook_pattern", keep_a),
                      (f"blocks.{layer}.attn.hook_z", edit_z)]
        return hooks


