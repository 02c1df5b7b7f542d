"""Residual sinks (Qiu et al. 2026): fixed residual dimensions that are large on most tokens, not
only on the first, and what the RMS norms do with them (their share of each token's RMS
denominator, and how much the next block reads them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from sinkinterp._batches import Batch, Reducer, check_tokens, stream
from sinkinterp.backends import Model
from sinkinterp.errors import SinkInterpError

COLUMNS = ["layer", "channel", "fraction_of_tokens", "mean_share", "mean_abs", "first_abs", "first_share",
           "attn_read", "mlp_read"]


def read_weights(model: Model, layer: int) -> dict[str, Float[Tensor, " d_model"]]:
    """How strongly block ``layer`` reads each residual dimension after its norms: the norm of
    dimension d's row of the matrices that read the normalised input (W_Q, W_K, W_V for
    ``"attn"``; W_in and W_gate for ``"mlp"``), over the median row norm.

    TransformerLens folds each norm's weight into those matrices, so a row is the *effective*
    weight times the original row: 0 exactly when the norm's effective weight at d is 0 (the
    residual-sink signature). A HookedTransformer loaded with ``fold_ln=False`` keeps the weight
    in the norm; it is multiplied in here, so both give the same number."""
    block = model.blocks[layer]
    attn = torch.cat([w.detach().double().permute(1, 0, 2).flatten(1)
                      for w in (block.attn.W_Q, block.attn.W_K, block.attn.W_V)], dim=1).norm(dim=1)
    mlp_weights = [block.mlp.W_in] + ([block.mlp.W_gate] if getattr(block.mlp, "W_gate", None) is not None else [])
    mlp = torch.cat([w.detach().double() for w in mlp_weights], dim=1).norm(dim=1)
    reads = {"attn": attn * _norm_weight(block, "ln1"), "mlp": mlp * _norm_weight(block, "ln2")}
    return {name: (value / value.median().clamp(min=1e-30)).cpu() for name, value in reads.items()}


def _norm_weight(block, name: str) -> Tensor | float:
    norm = getattr(block, name, None)
    weight = getattr(norm, "w", None)
    # Only an unfolded HookedTransformer norm multiplies by its weight; bridges in compatibility
    # mode keep a placeholder there and read through the folded matrices.
    if type(norm).__name__ in ("RMSNorm", "LayerNorm") and isinstance(weight, Tensor) and \
            type(block).__module__.startswith("transformer_lens.components"):
        return weight.detach().double().abs()
    return 1.0


@dataclass(frozen=True)
class ResidualSinks:
    """The detector's table (one row per (layer, channel) that is a residual sink) and its rule.

    Columns: ``fraction_of_tokens`` (tokens other than the first where the channel holds at
    least ``min_share`` of the token's squared norm, i.e. of its RMS denominator),
    ``mean_share`` and ``mean_abs`` over all tokens after the first, ``first_abs`` / ``first_share`` at the
    first token, and ``attn_read`` / ``mlp_read`` (:func:`read_weights`: 0 means the block's norm
    silences the dimension).
    """

    table: pd.DataFrame
    min_share: float
    min_fraction: float
    n_seqs: int

    @property
    def channels(self) -> tuple[int, ...]:
        """The channels found in any layer, most frequent first."""
        counts = self.table.groupby("channel").layer.count().sort_values(ascending=False, kind="stable")
        return tuple(int(c) for c in counts.index)

    def layers(self, channel: int) -> list[int]:
        return sorted(int(x) for x in self.table[self.table.channel == channel].layer)

    def to_dict(self) -> dict[str, Any]:
        return {"min_share": self.min_share, "min_fraction": self.min_fraction, "n_seqs": self.n_seqs,
                "channels": list(self.channels), "table": self.table.to_dict(orient="records")}

    def summary(self) -> str:
        if self.table.empty:
            return (f"no residual sink: no channel holds >= {self.min_share:.0%} of the squared norm on "
                    f">= {self.min_fraction:.0%} of the tokens in any layer")
        lines = [f"residual sinks (>= {self.min_share:.0%} of the squared norm on >= {self.min_fraction:.0%} "
                 f"of the tokens), {self.n_seqs} sequences:"]
        for channel in self.channels:
            rows = self.table[self.table.channel == channel]
            silenced = [int(r.layer) for r in rows.itertuples() if r.mlp_read == 0]
            lines.append(f"  channel {channel}: layers {_ranges(self.layers(channel))}; share of the squared norm "
                         f"{rows.mean_share.median():.0%}, median |x| {rows.mean_abs.median():.4g}; MLP read "
                         f"exactly 0 in layers {_ranges(silenced) or 'none'}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


def _ranges(layers: list[int]) -> str:
    out, start = [], None
    for i, layer in enumerate(layers):
        if start is None:
            start = layer
        if i + 1 == len(layers) or layers[i + 1] != layer + 1:
            out.append(str(start) if start == layer else f"{start}-{layer}")
            start = None
    return ", ".join(out)


class _ResidualSinkReducer(Reducer):
    def __init__(self, model: Model, min_share: float):
        self.model, self.min_share = model, min_share
        n, d = model.cfg.n_layers, model.cfg.d_model
        self.over = torch.zeros(n, d, dtype=torch.float64)
        self.n_tokens = 0
        self.share = torch.zeros(n, d, dtype=torch.float64)
        self.magnitude = torch.zeros(n, d, dtype=torch.float64)
        self.first_abs = torch.zeros(n, d, dtype=torch.float64)
        self.first_share = torch.zeros(n, d, dtype=torch.float64)
        self.n_seqs = 0

    def begin(self, batch: Batch) -> None:
        super().begin(batch)
        self.n_seqs += batch.tokens.shape[0]
        valid = batch.valid()
        valid[:, 0] = False
        self.others = valid
        self.n_batch_tokens = int(valid.sum())

    def hooks(self):
        return [(f"blocks.{layer}.hook_resid_pre", self._hook(layer)) for layer in range(self.model.cfg.n_layers)]

    def _hook(self, layer: int):
        def reduce(resid, hook) -> None:
            x = self.batch.align(resid.detach(), dims=(1,)).double()
            share = x.pow(2) / x.pow(2).sum(dim=-1, keepdim=True).clamp(min=1e-30)  # [batch pos d]
            others = self.others.to(x.device)
            self.over[layer] += ((share >= self.min_share) & others[..., None]).sum(dim=(0, 1)).cpu()
            self.share[layer] += share[others].sum(dim=0).cpu()
            self.magnitude[layer] += x[others].abs().sum(dim=0).cpu()
            self.first_abs[layer] += x[:, 0].abs().sum(dim=0).cpu()
            self.first_share[layer] += share[:, 0].sum(dim=0).cpu()
            if layer == 0:
                self.n_tokens += self.n_batch_tokens

        return reduce

    def result(self, min_fraction: float) -> ResidualSinks:
        rows = []
        n_tokens = max(self.n_tokens, 1)
        for layer in range(self.model.cfg.n_layers):
            fraction = self.over[layer] / n_tokens
            found = (fraction >= min_fraction).nonzero().flatten().tolist()
            if not found:
                continue
            share, magnitude = self.share[layer] / n_tokens, self.magnitude[layer] / n_tokens
            reads = read_weights(self.model, layer)
            for channel in found:
                rows.append((layer, channel, float(fraction[channel]), float(share[channel]),
                             float(magnitude[channel]), float(self.first_abs[layer, channel] / self.n_seqs),
                             float(self.first_share[layer, channel] / self.n_seqs), float(reads["attn"][channel]),
                             float(reads["mlp"][channel])))
        return ResidualSinks(pd.DataFrame(rows, columns=COLUMNS), self.min_share, min_fraction, self.n_seqs)


def residual_sinks(
    model: Model,
    tokens: Int[Tensor, "*batch pos"],
    *,
    min_share: float | int = 0.1,
    min_fraction: float | int = 0.5,
    attention_mask: Tensor | None = None,
    batch_size: int = 8,
    progress: bool | None = None,
) -> ResidualSinks:
    """Find residual sinks: channels of a block's input (``hook_resid_pre``) that hold at least
    ``min_share`` of the token's squared norm (the RMS denominator every norm divides by) on at
    least ``min_fraction`` of the tokens after the first. A share of 0.1 in d_model = 640 is 64
    times a channel's fair share. See :class:`ResidualSinks` for the table."""
    check_tokens(model, tokens)
    for name, value in (("min_share", min_share), ("min_fraction", min_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise SinkInterpError(f"{name} {value!r} must be a number in (0, 1]")
    if tokens.shape[1] < 2:
        raise SinkInterpError("residual_sinks needs sequences of at least 2 tokens (it looks past the first)")
    reducer = _ResidualSinkReducer(model, float(min_share))
    stream(model, tokens, [reducer], attention_mask=attention_mask, batch_size=batch_size, progress=progress,
           description="residual sinks")
    return reducer.result(float(min_fraction))
