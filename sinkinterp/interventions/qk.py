"""Jin et al.'s massive-value disruption (2025): in the rotated query and key of every head, the
channels with the largest norm over the sequence replaced by their mean over the sequence, or, as
the control, the channels with the smallest norm."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from sinkinterp._batches import check_bool, check_int
from sinkinterp.backends import Model
from sinkinterp.errors import SinkInterpError
from sinkinterp.interventions.base import (
    Hook,
    Intervention,
    IntsLike,
    norm_common,
)
from sinkinterp.sites import resolve_layers

__all__ = ["DisruptQKChannels", "disrupt_channels"]


def disrupt_channels(x: Float[Tensor, "batch pos head d_head"], top_k: int, select: str) -> Tensor:
    """``x`` with, per sequence and head, the ``top_k`` channels of largest (``select="massive"``)
    or smallest (``"lowest"``) L2 norm over positions set to their mean over positions (out of place)."""
    norms = x.double().norm(dim=1)  # [batch head d_head]
    chosen = norms.topk(top_k, dim=-1, largest=select == "massive").indices  # [batch head k]
    mask = torch.zeros_like(norms, dtype=torch.bool).scatter_(-1, chosen, True)[:, None]  # [batch 1 head d_head]
    mean = x.mean(dim=1, keepdim=True).expand_as(x)
    return torch.where(mask, mean, x)


@dataclass(frozen=True, repr=False)
class DisruptQKChannels(Intervention):
    """After rotary (``hook_rot_q`` / ``hook_rot_k``; ``rotated=False``: before it, ``hook_q`` /
    ``hook_k``, where Jin et al.'s released code edits), in each head of ``layers`` and each sequence,
    the ``top_k`` channels whose norm over the sequence's positions is largest (``select="massive"``,
    Jin et al.'s massive values) or smallest (``"lowest"``, their control) are replaced by that
    channel's mean over the positions, in the queries and/or keys (``kinds``).

    The channels and means are the forward's own (per sequence, as in the paper, which runs one
    prompt at a time), so nothing is fitted; a padded batch would count its padding, so give it
    unpadded sequences of one length. Keys shared by a kv group are edited once per kv head.
    """

    NEEDS: ClassVar[tuple[str, ...]] = ("rotary_hooks",)
    SELECTIONS: ClassVar[tuple[str, ...]] = ("massive", "lowest")
    KINDS: ClassVar[tuple[str, ...]] = ("q", "k")

    top_k: int = 1
    select: str = "massive"
    kinds: Sequence[str] = ("q", "k")
    layers: IntsLike = None
    rotated: bool = True

    def __post_init__(self):
        norm_common(self, heads=False)
        check_int("top_k", self.top_k, 1)
        if self.select not in self.SELECTIONS:
            raise SinkInterpError(f"DisruptQKChannels select {self.select!r} is not one of 'massive', 'lowest'")
        kinds = (self.kinds,) if isinstance(self.kinds, str) else self.kinds
        if not isinstance(kinds, (tuple, list)) or not kinds or any(k not in self.KINDS for k in kinds):
            raise SinkInterpError(f"DisruptQKChannels kinds must name 'q' and/or 'k', got {self.kinds!r}")
        object.__setattr__(self, "kinds", tuple(dict.fromkeys(kinds)))
        check_bool("rotated", self.rotated)

    @classmethod
    def needs(cls, fields) -> tuple[str, ...]:
        return cls.NEEDS if fields.get("rotated", True) else ()

    def hooks(self, model: Model) -> list[Hook]:
        layers = resolve_layers(model, self.layers)
        self.check_model(model, vars(self))
        if self.top_k > model.cfg.d_head:
            raise SinkInterpError(f"DisruptQKChannels top_k {self.top_k} exceeds d_head {model.cfg.d_head}")

        def edit(x, hook):
            return disrupt_channels(x, self.top_k, self.select)

        site = "hook_rot_" if self.rotated else "hook_"
        return [(f"blocks.{layer}.attn.{site}{kind}", edit) for layer in layers for kind in self.kinds]
