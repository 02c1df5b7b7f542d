"""Interventions on the sink's key: mask it (:class:`MaskSinkKey`) or replace it (:class:`ReplaceSinkKey`)."""

from __future__ import annotations

from collections.abc import Callable
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
from sinkinterp.interventions.capture import capture
from sinkinterp.sites import as_kv, kv_group, resolve_heads, resolve_layers

# --------------------------------------------------------------------------------------------
# 1. Mask the sink's key


def key_masker(heads: list[int], n_heads: int, position: int, from_query: int) -> Callable[[Tensor], Tensor]:
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
        norm_common(self)
        check_int("position", self.position)
        check_from_query(self.from_query, self.position)

    def hooks(self, model: Model) -> list[Hook]:
        layers, heads = resolve_layers(model, self.layers), resolve_heads(model, self.heads)
        check_position(model, self.position)
        self.check_model(model, vars(self))
        remove = key_masker(heads, model.cfg.n_heads, self.position, self.from_query)

        def mask(scores, hook):
            check_seq(self.position, scores.shape[-1], "MaskSinkKey", self.from_query)
            return remove(scores)

        return [(f"blocks.{layer}.attn.hook_attn_scores", mask) for layer in layers]


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
        norm_common(self)
        check_mode("ReplaceSinkKey", self.mode, self.MODES)
        check_int("position", self.position)
        object.__setattr__(self, "key", frozen_tensor(self, "key"))

    @classmethod
    def fit(cls, model: Model, tokens: Int[Tensor, "batch pos"], *, mode: str = "mean_other", layers=None,
            heads=None, position: int = 0) -> ReplaceSinkKey:
        """``"mean_other"``: keys of every other position of ``tokens``, averaged; ``"patch"``: the
        key at ``position`` of ``tokens`` (one sequence, another input)."""
        check_mode("ReplaceSinkKey", mode, cls.MODES)
        check_tokens(model, tokens)
        check_int("position", position)
        check_seq(position, tokens.shape[1], "reference")
        selected_layers = resolve_layers(model, ints_or_none("layers", layers))
        kv_heads = _kv_heads(model, resolve_heads(model, ints_or_none("heads", heads)), heads)
        if mode == "patch":
            if tokens.shape[0] != 1:
                raise SinkInterpError(f"mode 'patch' takes one source sequence, got {tokens.shape[0]}")
            keys = capture(model, tokens, "attn.hook_k", selected_layers, position)[:, 0]
        else:
            others = [j for j in range(tokens.shape[1]) if j != position]
            keys = capture(model, tokens, "attn.hook_k", selected_layers, None, lambda k: k[:, others].mean(dim=1))
            keys = keys.mean(dim=1)  # [layer kv d]: mean over sequences of the mean over positions
        keys = as_kv(model, keys)
        return cls(key=keys[:, kv_heads], layers=layers, heads=heads, position=position, mode=mode)

    def hooks(self, model: Model) -> list[Hook]:
        layers = resolve_layers(model, self.layers)
        kv_heads = _kv_heads(model, resolve_heads(model, self.heads), self.heads)
        check_position(model, self.position)
        check_shape("ReplaceSinkKey key", self.key, (len(layers), len(kv_heads), model.cfg.d_head))
        self.check_model(model, vars(self))
        key, p, group = as_tensor(self.key), self.position, kv_group(model)
        hooks = []
        for index, layer in enumerate(layers):
            def replace(k, hook, index=index):
                check_seq(p, k.shape[1], "ReplaceSinkKey")
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


def _kv_heads(model: Model, heads: list[int], asked) -> list[int]:
    """The kv heads behind query ``heads``; refuse a selection that splits a group."""
    group = kv_group(model)
    kv_heads = sorted({h // group for h in heads})
    for kv in kv_heads:
        members = list(range(kv * group, (kv + 1) * group))
        if not set(members) <= set(heads):
            raise SinkInterpError(
                f"heads {tuple(asked)} split kv group {kv} (query heads {members}): keys are shared by "
                f"groups of {group} query heads, so a key intervention needs whole groups or heads=None"
            )
    return kv_heads


