"""Massive values in q and k after rotary (Jin et al. 2025)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from sinkinterp._batches import (
    Batch,
    Reducer,
    check_bool,
    stream,
)
from sinkinterp.backends import Model, require
from sinkinterp.errors import SinkInterpError
from sinkinterp.measure.common import (
    check_positive,
)
from sinkinterp.measure.geometry import head_frame

# --------------------------------------------------------------------------------------------
# Massive values in q and k (Jin et al. 2025)


def rotary_pairs(model: Model) -> Tensor | None:
    """For each of a head's ``d_head`` dimensions, the index of its rotary frequency (0 = the
    fastest rotation; larger = lower frequency), or -1 for dimensions rotary leaves alone.
    None for models without rotary embeddings."""
    cfg = model.cfg
    if getattr(cfg, "positional_embedding_type", None) != "rotary":
        return None
    rotary_dim = getattr(cfg, "rotary_dim", None) or cfg.d_head
    n_pairs = rotary_dim // 2
    dims = torch.arange(cfg.d_head)
    pairs = dims // 2 if getattr(cfg, "rotary_adjacent_pairs", False) else dims % n_pairs
    return torch.where(dims < rotary_dim, pairs, -1)


@dataclass(frozen=True)
class QKMassiveValues:
    """Per (layer, head, dimension) root-mean-square of q and of k over positions i >= 1 and
    sequences, from :func:`qk_massive_values`. ``k_rms`` has one row per key/value head.

    A dimension is *massive* when its RMS exceeds ``ratio`` x the mean RMS of that head's
    dimensions (Jin et al. use 5). With rotary embeddings, a dimension is *low-frequency* when its
    rotary frequency is in the slower half (``pair >= n_pairs / 2``); Jin et al. report that the
    massive q/k values sit there.
    """

    q_rms: Float[Tensor, "layer head d_head"]
    k_rms: Float[Tensor, "layer kv_head d_head"]
    pairs: Int[Tensor, " d_head"] | None
    ratio: float
    rotated: bool
    n_seqs: int

    @property
    def group(self) -> int:
        return self.q_rms.shape[1] // self.k_rms.shape[1]

    def low_frequency(self) -> Tensor | None:
        if self.pairs is None:
            return None
        n_pairs = int(self.pairs.max()) + 1
        return self.pairs >= n_pairs / 2

    def peak_ratio(self, kind: str) -> Tensor:
        """[layer, head] largest dimension RMS over the head's mean dimension RMS."""
        rms = self._rms(kind)
        return rms.max(dim=-1).values / rms.mean(dim=-1).clamp(min=1e-12)

    def massive(self, kind: str) -> Tensor:
        """[layer, head, d_head] bool: the dimensions whose RMS is above ``ratio`` x the head's mean."""
        rms = self._rms(kind)
        return rms > self.ratio * rms.mean(dim=-1, keepdim=True)

    def _rms(self, kind: str) -> Tensor:
        if kind == "q":
            return self.q_rms
        if kind == "k":
            return self.k_rms.repeat_interleave(self.group, dim=1)
        raise SinkInterpError(f"kind must be 'q' or 'k', got {kind!r}")

    def per_head(self) -> pd.DataFrame:
        """One row per (layer, head): for q and k, the peak ratio, the top dimension, the number of
        massive dimensions and the share of them in the low-frequency half (NaN without any)."""
        frame = head_frame(*self.q_rms.shape[:2])
        low = self.low_frequency()
        for kind in ("q", "k"):
            rms, massive = self._rms(kind), self.massive(kind)
            frame[f"{kind}_peak_ratio"] = self.peak_ratio(kind).flatten().numpy()
            frame[f"{kind}_peak_rms"] = rms.max(dim=-1).values.flatten().numpy()
            frame[f"{kind}_top_dim"] = rms.argmax(dim=-1).flatten().numpy()
            count = massive.sum(dim=-1)
            frame[f"{kind}_n_massive"] = count.flatten().numpy()
            if low is None:
                share = torch.full(count.shape, math.nan)
            else:
                in_low = (massive & low).sum(dim=-1).double()
                share = torch.where(count > 0, in_low / count.clamp(min=1), torch.nan)
            frame[f"{kind}_massive_low_freq"] = share.flatten().numpy()
        return frame

    def summary(self) -> dict[str, Any]:
        """Counts over the whole model: massive dimensions in q and k and the low-frequency share."""
        low = self.low_frequency()
        record: dict[str, Any] = {"ratio": self.ratio, "rotated": self.rotated, "n_seqs": self.n_seqs,
                                  "rotary": self.pairs is not None}
        for kind, rms in (("q", self.q_rms), ("k", self.k_rms)):
            massive = rms > self.ratio * rms.mean(dim=-1, keepdim=True)
            record[f"{kind}_n_massive"] = int(massive.sum())
            record[f"{kind}_heads_with_massive"] = int(massive.any(dim=-1).sum())
            if low is not None:
                record[f"{kind}_massive_low_freq_share"] = (
                    float((massive & low).sum() / massive.sum()) if bool(massive.any()) else math.nan
                )
                # Share of all q (k) energy that lies in the low-frequency half, for scale.
                energy = rms.pow(2)
                record[f"{kind}_energy_low_freq_share"] = float(energy[..., low].sum() / energy.sum())
        return record


class _QKReducer(Reducer):
    def __init__(self, model: Model, rotated: bool):
        self.model = model
        cfg = model.cfg
        n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
        self.q_sq = torch.zeros(cfg.n_layers, cfg.n_heads, cfg.d_head, dtype=torch.float64)
        self.k_sq = torch.zeros(cfg.n_layers, n_kv, cfg.d_head, dtype=torch.float64)
        self.count = 0
        self.n_seqs = 0
        names = ("hook_rot_q", "hook_rot_k") if rotated else ("hook_q", "hook_k")
        self.names = dict(zip(("q", "k"), names))

    def begin(self, batch: Batch) -> None:
        super().begin(batch)
        self.n_seqs += batch.tokens.shape[0]
        valid = batch.valid()
        valid[:, 0] = False  # the first token's own q and k are the sink's, not the head's typical ones
        self.valid = valid
        self.count += int(valid.sum())

    def hooks(self):
        return [(f"blocks.{layer}.attn.{self.names[kind]}", self._hook(layer, kind))
                for layer in range(self.model.cfg.n_layers) for kind in ("q", "k")]

    def _hook(self, layer: int, kind: str):
        target = self.q_sq if kind == "q" else self.k_sq

        def reduce(x: Float[Tensor, "batch pos head d_head"], hook) -> None:
            x = self.batch.align(x, dims=[1]).double()
            if x.shape[2] != target.shape[1]:  # ungrouped keys: one identical copy per query head
                x = x[:, :, :: x.shape[2] // target.shape[1]]
            weight = self.valid.to(x.device).double()[:, :, None, None]
            target[layer] += (x.pow(2) * weight).sum(dim=(0, 1)).cpu()

        return reduce


def qk_massive_values(
    model: Model,
    tokens: Int[Tensor, "*batch pos"],
    *,
    ratio: float | int = 5.0,
    rotated: bool = False,
    attention_mask: Tensor | None = None,
    batch_size: int = 8,
    progress: bool | None = None,
) -> QKMassiveValues:
    """Jin et al.'s massive values: per head and dimension, the RMS of q and of k over positions
    i >= 1 of ``tokens``. ``rotated=False`` reads q and k before the rotary embedding (a rotation
    mixes each frequency pair's two dimensions, so per-dimension sizes are defined before it)."""
    ratio = check_positive("ratio", ratio)
    check_bool("rotated", rotated)
    if rotated and "blocks.0.attn.hook_rot_q" not in model.hook_dict:
        raise SinkInterpError("rotated=True needs a rotary model (hook_rot_q); this model has none")
    if rotated:
        require(model, "rotary_hooks", needed_by="qk_massive_values(rotated=True)")
    reducer = _QKReducer(model, rotated)
    stream(model, tokens, [reducer], attention_mask=attention_mask, batch_size=batch_size,
           progress=progress, description="q/k massive values")
    count = max(reducer.count, 1)
    return QKMassiveValues(
        q_rms=(reducer.q_sq / count).sqrt().float(),
        k_rms=(reducer.k_sq / count).sqrt().float(),
        pairs=rotary_pairs(model),
        ratio=ratio,
        rotated=rotated,
        n_seqs=reducer.n_seqs,
    )
