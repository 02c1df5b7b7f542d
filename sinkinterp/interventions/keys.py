"""Interventions on the sink's key: mask it (:class:`MaskSinkKey`) or replace it (:class:`ReplaceSinkKey`)."""

from __future__ import annotations

import random
from collections.abc import Callable
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
    SpecContext,
    as_tensor,
    check_from_query,
    check_mode,
    check_position,
    check_seq,
    frozen_tensor,
    ints_or_none,
    is_int,
    norm_common,
    one_of,
    pick,
    refuse_head_site,
)
from sinkinterp.interventions.capture import capture
from sinkinterp.sites import (
    as_kv,
    kv_group,
    resolve_heads,
    resolve_layers,
    selected_heads,
)

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
    HEAD_SWEEP: ClassVar[bool] = True
    FIT_OPTIONS: ClassVar[dict[str, FitOption]] = {
        "position": FitOption("'random': a seeded random key position in [low, from_query)", one_of("random")),
        "low": FitOption("int", is_int(0)),
    }

    layers: IntsLike = None
    heads: IntsLike = None
    position: int = 0
    from_query: int = 16

    def __post_init__(self):
        norm_common(self)
        check_int("position", self.position)
        check_from_query(self.from_query, self.position)

    @classmethod
    def fit_spec(cls, model: Model, calibration: Tensor, *, seed: int = 0, draw: int = 0, n_draws: int = 1,
                 fields: dict[str, Any], options: dict[str, Any]) -> MaskSinkKey:
        """A control: the mask moved to a seeded random key position in [low, from_query), distinct
        across the ``n_draws`` draws."""
        from_query, low = fields.get("from_query", 16), options.get("low", 1)
        if options.get("position") != "random" or not 0 <= low < from_query:
            raise SinkInterpError(f"MaskSinkKey fit needs position: random and 0 <= low < from_query, got {options}")
        positions = random.Random(seed).sample(range(low, from_query), n_draws)  # distinct across draws
        return cls(**{**fields, "position": positions[draw]})

    @classmethod
    def fit_is_random(cls, options: dict[str, Any]) -> bool:
        return options.get("position") == "random"

    @classmethod
    def fit_needs_calibration(cls, options: dict[str, Any]) -> bool:
        return False

    @classmethod
    def check_spec(cls, fields: dict[str, Any], options: dict[str, Any] | None, context: SpecContext) -> None:
        super().check_spec(fields, options, context)
        if options is not None and options.get("position") == "random":
            low, high = options.get("low", 1), fields.get("from_query", 16)
            if context.draws > high - low:
                context.fail(f"{context.condition}.draws", f"{context.draws} draws of distinct key positions in "
                             f"{low}..{high - 1}: at most {max(high - low, 0)}")

    def hooks(self, model: Model) -> list[Hook]:
        sites = selected_heads(model, self.layers, self.heads)
        check_position(model, self.position)
        self.check_model(model, vars(self))
        maskers: dict[tuple[int, ...], Callable[[Tensor], Tensor]] = {}  # layers with the same heads share one
        hooks = []
        for layer, heads in sites:
            key = tuple(heads)
            if key not in maskers:
                maskers[key] = key_masker(heads, model.cfg.n_heads, self.position, self.from_query)

            def mask(scores, hook, remove=maskers[key]):
                check_seq(self.position, scores.shape[-1], "MaskSinkKey", self.from_query)
                return remove(scores)

            hooks.append((f"blocks.{layer}.attn.hook_attn_scores", mask))
        return hooks


@dataclass(frozen=True, repr=False)
class WindowAttention(Intervention):
    """StreamingLLM's window attention: each query i sees only the keys of the last ``window``
    positions (``i - j < window``) plus the first ``n_initial`` positions (the attention sinks that
    StreamingLLM keeps in its cache). ``n_initial=0`` is plain window attention, which evicts the
    sink once the sequence is longer than the window. Applied at ``hook_attn_scores`` (keys set to
    -inf) in every chosen layer; a layer's own sliding window still applies as well."""

    NEEDS: ClassVar[tuple[str, ...]] = ("attn.hook_attn_scores",)

    window: int = 256
    n_initial: int = 4
    layers: IntsLike = None

    def __post_init__(self):
        norm_common(self, heads=False)
        check_int("window", self.window, 1)
        check_int("n_initial", self.n_initial)

    def hooks(self, model: Model) -> list[Hook]:
        layers = resolve_layers(model, self.layers)
        self.check_model(model, vars(self))
        masks: dict[tuple[int, str], Tensor] = {}

        def mask(scores, hook):
            n_pos = scores.shape[-1]
            key = (n_pos, str(scores.device))
            if key not in masks:
                query = torch.arange(n_pos, device=scores.device)[:, None]
                keys = torch.arange(n_pos, device=scores.device)[None, :]
                masks[key] = (query - keys >= self.window) & (keys >= self.n_initial)
            return scores.masked_fill(masks[key], float("-inf"))

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
    ARRAY_AXES: ClassVar[dict[str, tuple[str, ...]]] = {"key": ("layer", "kv_head", "d_head")}
    NEEDS_FIT: ClassVar[bool] = True
    FIT_OPTIONS: ClassVar[dict[str, FitOption]] = {
        "mode": FitOption("'mean_other' or 'patch' (first calibration sequence)", one_of("mean_other", "patch")),
    }

    key: NumbersLike = ()
    layers: IntsLike = None
    heads: IntsLike = None
    position: int = 0
    mode: str = "mean_other"

    MODES: ClassVar[tuple[str, ...]] = ("mean_other", "patch")

    def __post_init__(self):
        refuse_head_site(self, "its key is stored per [layer][kv head]")
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

    @classmethod
    def fit_spec(cls, model: Model, calibration: Tensor, *, seed: int = 0, draw: int = 0, n_draws: int = 1,
                 fields: dict[str, Any], options: dict[str, Any]) -> ReplaceSinkKey:
        mode = options.get("mode", "mean_other")
        source = calibration if mode == "mean_other" else calibration[:1]
        return cls.fit(model, source, mode=mode, **pick(fields, "layers", "heads", "position"))

    def hooks(self, model: Model) -> list[Hook]:
        layers = resolve_layers(model, self.layers)
        kv_heads = _kv_heads(model, resolve_heads(model, self.heads), self.heads)
        check_position(model, self.position)
        if self.key == ():
            raise SinkInterpError("ReplaceSinkKey has no key: build it with ReplaceSinkKey.fit(model, tokens, ...) "
                                  "(in a spec, give it a fit: block)")
        self.check_arrays(model, layer=len(layers), kv_head=len(kv_heads))
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


