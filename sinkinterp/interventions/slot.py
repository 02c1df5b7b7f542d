"""A constant attention bias: an explicit sink slot (:class:`ConstantAttentionBias`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from sinkinterp._batches import check_bool, check_int
from sinkinterp.backends import Model, attention_windows
from sinkinterp.errors import SinkInterpError
from sinkinterp.interventions.base import (
    Hook,
    Intervention,
    IntsLike,
    NumbersLike,
    as_tensor,
    check_from_query,
    check_position,
    check_seq,
    check_shape,
    frozen_tensor,
    norm_common,
)
from sinkinterp.interventions.capture import add_at
from sinkinterp.interventions.keys import key_masker
from sinkinterp.sites import as_index, resolve_heads, resolve_layers

# --------------------------------------------------------------------------------------------
# 6. Constant attention bias: an explicit sink slot


# The slot reads the real logits (for the log-sum-exp), rescales the pattern and adds to z.
SLOT_NEEDS = ("scores", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "order")


@dataclass(frozen=True, repr=False)
class ConstantAttentionBias(Intervention):
    """A virtual key/value slot per head, the same for every input (docs/design.md §3.6).

    Softmax over ``[scores, logit]`` equals the pattern times ``keep_i = sigmoid(LSE_i - logit)``
    plus a slot of weight ``1 - keep_i`` whose value ``value`` is added to z. Applied to queries
    i >= ``from_query`` only; with ``replace_sink`` the real key ``position`` is masked for those
    queries, so the slot stands in for the sink. ``logit``: a number or [layers][heads];
    ``value``: None (zero, a pure key bias) or [layers][heads][d_head] (selected layers/heads).
    """

    NEEDS: ClassVar[tuple[str, ...]] = SLOT_NEEDS

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
        norm_common(self)
        check_bool("replace_sink", self.replace_sink)
        if self.fit_log is not None and not isinstance(self.fit_log, dict):
            raise SinkInterpError(f"fit_log is a dict written by fit_constant_bias, or None, got {self.fit_log!r}")
        if self.method not in ("given", "moments", "gradient"):
            raise SinkInterpError(f"ConstantAttentionBias method {self.method!r} is not one of 'given', 'moments', "
                                  "'gradient' (it records where the numbers came from)")
        check_int("position", self.position)
        check_from_query(self.from_query, self.position)
        logit = frozen_tensor(self, "logit", minus_inf=True)
        if isinstance(logit, int):
            logit = float(logit)
        if not isinstance(logit, (float, tuple)):
            raise SinkInterpError(f"logit must be a number or [layers][heads] numbers, got {self.logit!r}")
        object.__setattr__(self, "logit", logit)
        object.__setattr__(self, "value", frozen_tensor(self, "value"))

    def _tensors(self, model: Model) -> tuple[list[int], list[int], Tensor, Tensor | None]:
        layers, heads = resolve_layers(model, self.layers), resolve_heads(model, self.heads)
        check_position(model, self.position)
        if isinstance(self.logit, tuple):
            check_shape("ConstantAttentionBias logit", self.logit, (len(layers), len(heads)))
            logit = as_tensor(self.logit)
        else:
            logit = torch.full((len(layers), len(heads)), self.logit)
        value = None
        if self.value is not None:
            check_shape("ConstantAttentionBias value", self.value, (len(layers), len(heads), model.cfg.d_head))
            value = as_tensor(self.value)
        return layers, heads, logit, value

    def hooks(self, model: Model) -> list[Hook]:
        layers, heads, logit, value = self._tensors(model)
        self.check_model(model, vars(self))
        return bias_hooks(model, layers, heads, logit, value, self.replace_sink, self.position, self.from_query)




def bias_hooks(model: Model, layers, heads, logit: Tensor, value: Tensor | None, replace_sink: bool,
                position: int, from_query: int) -> list[Hook]:
    """Hooks of a constant slot; ``logit`` [layers heads] and ``value`` [layers heads d_head] may
    require grad (``fit_constant_bias`` optimises them through these same hooks).

    In a sliding-window layer the slot acts only on the queries that can see ``position``: it
    stands in for the sink where there is one, and queries past the window never had it."""
    n_heads, fq = model.cfg.n_heads, from_query
    windows = attention_windows(model)
    remove = key_masker(heads, n_heads, position, fq)
    heads = as_index(heads, n_heads)
    hooks = []
    for index, layer in enumerate(layers):
        state: dict[str, Tensor] = {}

        def on_scores(scores, hook, state=state):
            check_seq(position, scores.shape[-1], "ConstantAttentionBias", fq)
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
            return add_at(z, slot.transpose(1, 2), fq, heads)

        hooks += [(f"blocks.{layer}.attn.hook_attn_scores", on_scores),
                  (f"blocks.{layer}.attn.hook_pattern", on_pattern),
                  (f"blocks.{layer}.attn.hook_z", on_z)]
    return hooks


