"""Measure attention sinks and massive activations (definitions: docs/design.md §2).

Every metric streams: hooks reduce each layer's activation to a per-sequence statistic, add it to
running sums and drop it, so memory never holds a ``[layers, heads, T, T]`` cache. Positions are
relative to each row's first real token (left padding needs an ``attention_mask``). Sequences are
averaged with equal weight: first over the positions of one sequence, then over sequences.

- :func:`sink_scores` -> :class:`SinkReport`: alpha[l, h, k], sink ratio, first-token share,
  secondary sinks.
- :func:`find_massive_activations` -> DataFrame of Sun et al.'s massive activations;
  :func:`stable_massive_channels` summarises it.
- :func:`qkv_geometry`: q/k/v norms and angles, sink vs the other positions.
- :func:`value_weighted_attention`: attention share vs ``||A v W_O||`` share of the sink.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from sinkinterp._batches import Batch, Reducer, check_bool, check_eps, check_int, check_tokens, stream
from sinkinterp.backends import attention_windows, require, visible
from sinkinterp.errors import SinkInterpError

__all__ = [
    "SinkReport",
    "sink_scores",
    "massive_entries",
    "find_massive_activations",
    "stable_massive_channels",
    "ResidualProfile",
    "residual_profile",
    "qkv_geometry",
    "value_weighted_attention",
    "QKMassiveValues",
    "qk_massive_values",
    "rotary_pairs",
    "MASSIVE_COLUMNS",
]

MASSIVE_COLUMNS = ["layer", "seq", "position", "channel", "value", "ratio_to_median", "token"]


def _token_text(model, token_id: int) -> str:
    tokenizer = getattr(model, "tokenizer", None)
    return str(token_id) if tokenizer is None else tokenizer.decode([token_id])


def _head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise SinkInterpError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _query_weights(batch: Batch, device, window: int | None = None) -> Float[Tensor, "batch pos"]:
    """Weights that average over a row's real queries i >= 1 (each row sums to 1); with a sliding
    ``window``, over the queries 1 <= i < window that can still see the first token."""
    valid = batch.valid().to(device)
    valid[:, 0] = False
    if window is not None:
        valid[:, window:] = False
    return valid.double() / valid.sum(dim=1).clamp(min=1).double()[:, None]


def seen_counts(lengths: Tensor, n_pos: int, window: int | None) -> Int[Tensor, "batch key"]:
    """How many real queries of each row can see key k: i in k..length-1, and i - k < window."""
    keys = torch.arange(n_pos, device=lengths.device)
    last = lengths[:, None] if window is None else torch.minimum(lengths[:, None], keys + window)
    return (last - keys).clamp(min=0)


def alpha_at(pattern: Float[Tensor, "batch head query key"], key: int, window: int | None = None
             ) -> Float[Tensor, "batch head"]:
    """Gu et al.'s sink score of one key on one unpadded batch: the mean of ``pattern[..., key]``
    over the queries that can see it (i >= key, and i - key < window in a sliding-window layer)."""
    n_pos = pattern.shape[-1]
    count = seen_counts(torch.tensor([n_pos]), n_pos, window)[0, key].clamp(min=1)
    return pattern[..., key].double().sum(dim=-1) / count


# --------------------------------------------------------------------------------------------
# Sink scores


@dataclass(frozen=True)
class SinkReport:
    """Sink scores of every head at every key position, from :func:`sink_scores`.

    ``alpha[l, h, k]`` is Gu et al.'s sink score: the attention that key position k receives,
    averaged over the queries i >= k that can see it (in a sliding-window layer of window w, only
    i < k + w), then over sequences (positions relative to each row's first real token).
    ``first_token_share[l]`` averages ``A[l, h, i, 0]`` over heads and the queries i >= 1 that can
    see the first token, so it is not inflated by query 0 attending to itself nor deflated by
    queries past a sliding window.
    """

    alpha: Float[Tensor, "layer head pos"]
    first_token_share_heads: Float[Tensor, "layer head"]
    eps: tuple[float, ...]
    n_seqs: int
    seq_len: int
    n_seqs_at: Int[Tensor, " pos"]
    """How many sequences have each relative position (fewer than n_seqs only with padding)."""
    secondary_sinks: pd.DataFrame = field(repr=False)
    """Per sequence: positions k > 0 whose alpha in that sequence exceeds ``min(eps)`` in some head."""
    min_queries: int = 8
    n_above: dict[float, Int[Tensor, "layer head pos"]] = field(default_factory=dict, repr=False)
    """Per eps: in how many sequences alpha_s[l, h, k] > eps (Gu et al.'s per-sequence count).
    Counted only where k is seen by at least ``min_queries`` queries of that sequence (k = 0 always)."""
    n_counted_at: Int[Tensor, " pos"] | None = None
    """How many sequences each position was counted in for :attr:`n_above`."""
    learned_sink_share: Float[Tensor, "layer head"] | None = None
    """Mean over queries i >= 1 of ``1 - sum_j A[i, j]``: attention that goes to no token. A learned
    sink logit (gpt-oss) takes part in the softmax but has no key, so its share never appears in
    ``hook_pattern`` (nor in alpha); it is ~0 (rounding) for ordinary softmax attention."""

    @property
    def n_layers(self) -> int:
        return self.alpha.shape[0]

    @property
    def n_heads(self) -> int:
        return self.alpha.shape[1]

    @property
    def alpha_first(self) -> Float[Tensor, "layer head"]:
        return self.alpha[:, :, 0]

    @property
    def first_token_share(self) -> Float[Tensor, " layer"]:
        return self.first_token_share_heads.mean(dim=1)

    @property
    def sink_ratio(self) -> dict[float, float]:
        """Gu et al.'s ``Sink_0^eps`` for each eps: threshold each sequence's alpha at k = 0, then
        average the indicator over sequences, layers and heads. It does not drift with the number of
        sequences; :attr:`sink_ratio_of_mean` (the threshold applied to the averaged alpha) does."""
        return {eps: self.sink_ratio_at(0, eps) for eps in self.eps}

    @property
    def sink_ratio_of_mean(self) -> dict[float, float]:
        """The share of heads whose sequence-averaged alpha at k = 0 exceeds eps (not Gu et al.'s
        rule: it moves towards 0 or 1 as sequences are added, because averaging removes spread)."""
        return {eps: self.sink_ratio_of_mean_at(0, eps) for eps in self.eps}

    def _position(self, position: int) -> int:
        if isinstance(position, bool) or not isinstance(position, int) or not 0 <= position < self.seq_len:
            raise SinkInterpError(f"position {position!r} out of range: scores cover 0..{self.seq_len - 1}")
        return position

    def _eps(self, eps: float) -> float:
        value = check_eps(eps)[0]
        if value not in self.n_above:
            allowed = ", ".join(f"{e:g}" for e in self.n_above)
            raise SinkInterpError(
                f"eps {eps!r} was not counted per sequence: this report counted eps in ({allowed}); "
                f"pass it to sink_scores(eps=...), or use sink_ratio_of_mean_at for any eps")
        return value

    def head_sink_frequency(self, eps: float, position: int = 0) -> Float[Tensor, "layer head"]:
        """Per head: the fraction of sequences in which alpha_s[l, h, position] > eps."""
        position, eps = self._position(position), self._eps(eps)
        counted = int(self.n_counted_at[position])
        if counted == 0:
            raise SinkInterpError(
                f"position {position} is seen by fewer than min_queries={self.min_queries} queries in every "
                f"sequence: its alpha is mostly self-attention; lower min_queries in sink_scores to count it")
        return self.n_above[eps][:, :, position].double() / counted

    def sink_ratio_at(self, position: int, eps: float) -> float:
        """Gu et al.'s ``Sink_k^eps`` at key ``position``: mean over sequences, layers and heads of
        ``1[alpha_s[l, h, k] > eps]``, over the sequences in which k is seen by at least
        ``min_queries`` queries (k = 0 always counts)."""
        return float(self.head_sink_frequency(eps, position).mean())

    def sink_ratio_profile(self, eps: float) -> pd.Series:
        """``Sink_k^eps`` at every position k (NaN where too few queries see k)."""
        eps = self._eps(eps)
        counted = self.n_counted_at.double()
        values = self.n_above[eps].double().mean(dim=(0, 1)) / counted.clamp(min=1)
        values = torch.where(counted > 0, values, torch.nan)
        return pd.Series(values.numpy(), index=pd.RangeIndex(self.seq_len, name="position"), name=f"sink_{eps:g}")

    def sink_ratio_of_mean_at(self, position: int, eps: float) -> float:
        """The share of heads whose sequence-averaged alpha at ``position`` exceeds eps (any eps)."""
        return float((self.alpha[:, :, self._position(position)] > check_eps(eps)[0]).double().mean())

    def strongest_heads(self, n: int = 10, position: int = 0) -> pd.DataFrame:
        """The ``n`` heads with the largest alpha at ``position``."""
        check_int("n", n, 1)
        values = self.alpha[:, :, self._position(position)]
        order = values.flatten().argsort(descending=True)[:n]
        rows = [
            (int(i) // self.n_heads, int(i) % self.n_heads, float(values.flatten()[i])) for i in order
        ]
        frame = pd.DataFrame(rows, columns=["layer", "head", "alpha"])
        frame.insert(0, "name", [_head_name(l, h) for l, h, _ in rows])
        return frame

    def secondary_positions(self) -> pd.DataFrame:
        """Relative positions k > 0 whose sequence-averaged alpha exceeds ``min(eps)`` in some head.

        Meaningful when inputs share a structure (a template, a fixed delimiter); with free text,
        delimiters sit at different positions and :attr:`secondary_sinks` (per sequence) finds them.
        Positions seen by fewer than ``min_queries`` queries are left out: their alpha averages
        too few rows (the last position's alpha is its self-attention).
        """
        eps = min(self.eps)
        rows = []
        for k in range(1, self.seq_len - self.min_queries + 1):
            values = self.alpha[:, :, k]
            above = values > eps
            if bool(above.any()):
                flat = int(values.flatten().argmax())
                layer, head = divmod(flat, self.n_heads)
                rows.append((k, int(above.sum()), float(values.max()), layer, head))
        return pd.DataFrame(rows, columns=["position", "n_heads", "max_alpha", "layer", "head"])

    def secondary_tokens(self) -> pd.DataFrame:
        """Which tokens are secondary sinks, and how often (from :attr:`secondary_sinks`)."""
        frame = self.secondary_sinks
        if frame.empty:
            return pd.DataFrame(columns=["token", "count", "n_seqs", "mean_max_alpha", "median_position"])
        grouped = frame.groupby("token", sort=False).agg(
            count=("seq", "size"), n_seqs=("seq", "nunique"), mean_max_alpha=("max_alpha", "mean"),
            median_position=("position", "median"),
        )
        return grouped.sort_values(["count", "mean_max_alpha"], ascending=False).reset_index()

    def to_frame(self) -> pd.DataFrame:
        """Tidy table: one row per (layer, head, position) with alpha and the sequence count."""
        layers, heads, positions = torch.meshgrid(
            torch.arange(self.n_layers), torch.arange(self.n_heads), torch.arange(self.seq_len), indexing="ij"
        )
        return pd.DataFrame(
            {
                "layer": layers.flatten().numpy(),
                "head": heads.flatten().numpy(),
                "position": positions.flatten().numpy(),
                "alpha": self.alpha.flatten().numpy(),
                "n_seqs": self.n_seqs_at[positions.flatten()].numpy(),
            }
        )

    def to_dict(self, *, include_alpha: bool = False) -> dict[str, Any]:
        """JSON-ready values; ``include_alpha`` adds alpha at every position ([layers][heads][pos])."""
        record: dict[str, Any] = {
            "n_seqs": self.n_seqs,
            "seq_len": self.seq_len,
            "eps": list(self.eps),
            "alpha_first": self.alpha_first.tolist(),
            "sink_ratio": {str(eps): value for eps, value in self.sink_ratio.items()},
            "sink_ratio_definition": "Gu et al.: mean over sequences, layers, heads of 1[alpha_s[l,h,0] > eps]",
            "sink_ratio_of_mean": {str(eps): value for eps, value in self.sink_ratio_of_mean.items()},
            "first_token_share": self.first_token_share.tolist(),
            "first_token_share_heads": self.first_token_share_heads.tolist(),
            "learned_sink_share": None if self.learned_sink_share is None else self.learned_sink_share.mean(dim=1).tolist(),
            "secondary_sinks": {
                "eps": min(self.eps),
                "min_queries": self.min_queries,
                "positions": self.secondary_positions().to_dict(orient="records"),
                "tokens": self.secondary_tokens().to_dict(orient="records"),
                "occurrences": self.secondary_sinks.to_dict(orient="records"),
            },
        }
        if include_alpha:
            record["alpha"] = self.alpha.tolist()
        return record

    def __repr__(self) -> str:
        ratios = ", ".join(f"eps={eps:g}: {value:.3f}" for eps, value in self.sink_ratio.items())
        shares = " ".join(f"{v:.2f}" for v in self.first_token_share.tolist())
        heads = ", ".join(f"{r.name} {r.alpha:.2f}" for r in self.strongest_heads(5).itertuples())
        tokens = self.secondary_tokens().head(3)
        secondary = ", ".join(f"{r.token!r} x{r.count}" for r in tokens.itertuples()) or "none"
        return (
            f"SinkReport({self.n_seqs} seqs x {self.seq_len} positions, "
            f"{self.n_layers} layers x {self.n_heads} heads)\n"
            f"  sink ratio (Gu et al., per sequence, alpha at k=0 > eps): {ratios}\n"
            f"  first-token share by layer: {shares}\n"
            f"  strongest sink heads: {heads}\n"
            f"  secondary sinks (eps={min(self.eps):g}): {len(self.secondary_sinks)} in all; {secondary}"
        )


class _SinkReducer(Reducer):
    def __init__(self, model, n_pos: int, eps: tuple[float, ...], min_queries: int):
        n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
        self.model, self.n_pos, self.eps, self.eps_min, self.min_queries = model, n_pos, eps, min(eps), min_queries
        self.above_counts = {e: torch.zeros(n_layers, n_heads, n_pos, dtype=torch.long) for e in eps}
        self.n_counted_at = torch.zeros(n_pos, dtype=torch.long)
        self.windows = attention_windows(model)
        self.alpha_sum = torch.zeros(n_layers, n_heads, n_pos, dtype=torch.float64)
        self.share_sum = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        self.missing_sum = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        self.n_seqs_at = torch.zeros(n_pos, dtype=torch.long)
        self.n_seqs = 0
        self._secondary: list[pd.DataFrame] = []

    def begin(self, batch: Batch) -> None:
        if self.n_seqs:
            self._finish_batch()
        super().begin(batch)
        self.n_seqs += batch.tokens.shape[0]
        self.n_seqs_at += batch.valid().sum(dim=0)
        self.n_counted_at += self._counted(batch).sum(dim=0)
        b = batch.tokens.shape[0]
        # Running max over every (layer, head) of the per-sequence alpha, for secondary sinks.
        self.best = torch.full((b, self.n_pos), -1.0, dtype=torch.float64)
        self.best_head = torch.zeros(b, self.n_pos, dtype=torch.long)
        self.n_above = torch.zeros(b, self.n_pos, dtype=torch.long)

    def _counted(self, batch: Batch, window: int | None = None) -> Tensor:
        """[batch key]: positions counted for the per-sequence sink ratio: real positions seen by at
        least ``min_queries`` queries, and k = 0 always (Gu et al.'s Sink_0 has no floor)."""
        lengths = batch.lengths
        n_queries = seen_counts(lengths, self.n_pos, window)
        counted = (n_queries >= self.min_queries) & batch.valid()
        counted[:, 0] = lengths > 0
        return counted

    def hooks(self):
        return [(f"blocks.{layer}.attn.hook_pattern", self._hook(layer)) for layer in range(self.model.cfg.n_layers)]

    def _hook(self, layer: int):
        def reduce(pattern: Float[Tensor, "batch head query key"], hook) -> None:
            batch = self.batch
            p = batch.align(pattern, dims=(2, 3))
            lengths = batch.lengths.to(p.device)
            positions = torch.arange(self.n_pos, device=p.device)
            # Queries that can see key k in each row: i in k..length-1 (the pattern is causal), and
            # in a sliding-window layer only i < k + window; the others hold exact zeros.
            n_queries = seen_counts(lengths, self.n_pos, self.windows[layer])
            alpha = p.sum(dim=2).double() / n_queries.clamp(min=1)[:, None, :]  # [batch head key]
            self.alpha_sum[layer] += alpha.sum(dim=0).cpu()
            share = p[:, :, 1:, 0].sum(dim=-1).double() / (n_queries[:, :1] - 1).clamp(min=1)
            self.share_sum[layer] += share.sum(dim=0).cpu()
            real = batch.valid().to(p.device)[:, None, 1:]  # [batch 1 query]: real queries i >= 1
            missing = ((1 - p[:, :, 1:].double().sum(dim=-1)) * real).sum(dim=-1) / real.sum(dim=-1).clamp(min=1)
            self.missing_sum[layer] += missing.sum(dim=0).cpu()
            counted = self._counted(batch).to(p.device)[:, None, :]  # [batch 1 key]
            for e in self.eps:
                self.above_counts[e][layer] += ((alpha > e) & counted).sum(dim=0).cpu()

            eligible = (positions >= 1) & (n_queries >= self.min_queries)  # [batch key]
            self.n_above += ((alpha > self.eps_min) & eligible[:, None, :]).sum(dim=1).cpu()
            top, head = alpha.masked_fill(~eligible[:, None, :], -1.0).max(dim=1)
            better = top.cpu() > self.best
            self.best = torch.where(better, top.cpu(), self.best)
            self.best_head = torch.where(better, layer * self.model.cfg.n_heads + head.cpu(), self.best_head)

        return reduce

    def _finish_batch(self) -> None:
        batch = self.batch
        tokens = batch.relative_tokens()
        rows = []
        for seq, k in (self.n_above > 0).nonzero().tolist():
            layer, head = divmod(int(self.best_head[seq, k]), self.model.cfg.n_heads)
            token_id = int(tokens[seq, k])
            rows.append(
                (batch.first_index + seq, k, token_id, _token_text(self.model, token_id),
                 int(self.n_above[seq, k]), float(self.best[seq, k]), layer, head)
            )
        self._secondary.append(
            pd.DataFrame(rows, columns=["seq", "position", "token_id", "token", "n_heads", "max_alpha", "layer", "head"])
        )

    def report(self, eps: tuple[float, ...]) -> SinkReport:
        self._finish_batch()
        counts = self.n_seqs_at.double()
        alpha = torch.where(counts > 0, self.alpha_sum / counts.clamp(min=1), torch.nan)
        # Typed explicitly: a mini-batch without secondary sinks contributes an untyped empty frame.
        secondary = pd.concat(self._secondary, ignore_index=True).astype(
            {"seq": "int64", "position": "int64", "token_id": "int64", "n_heads": "int64", "max_alpha": "float64",
             "layer": "int64", "head": "int64", "token": str})
        return SinkReport(
            alpha=alpha,
            first_token_share_heads=self.share_sum / self.n_seqs,
            eps=eps,
            n_seqs=self.n_seqs,
            seq_len=self.n_pos,
            n_seqs_at=self.n_seqs_at,
            secondary_sinks=secondary,
            min_queries=self.min_queries,
            n_above=self.above_counts,
            n_counted_at=self.n_counted_at,
            learned_sink_share=self.missing_sum / self.n_seqs,
        )


def sink_scores(
    model,
    tokens: Int[Tensor, "*batch pos"],
    *,
    eps=(0.3, 0.8),
    attention_mask: Tensor | None = None,
    batch_size: int = 8,
    min_queries: int = 8,
    progress: bool | None = None,
) -> SinkReport:
    """Sink scores of every head and key position, streamed in mini-batches of ``batch_size``.

    ``eps``: thresholds for the sink ratio (Gu et al. use 0.3 at T = 64; Barbero et al. 0.8).
    Secondary sinks use ``min(eps)`` and only positions seen by at least ``min_queries`` queries.
    ``attention_mask`` (1 = token, 0 = pad) is required for padded batches.
    """
    eps = check_eps(eps)
    check_int("min_queries", min_queries, 1)
    check_tokens(model, tokens)
    reducer = _SinkReducer(model, tokens.shape[1], eps, min_queries)
    stream(model, tokens, [reducer], attention_mask=attention_mask, batch_size=batch_size,
           progress=progress, description="sink scores")
    return reducer.report(eps)


# --------------------------------------------------------------------------------------------
# Massive activations


def massive_entries(
    hidden: Float[Tensor, "pos d_model"], *, min_abs: float | int = 100.0, min_ratio: float | int = 1000.0
) -> tuple[Int[Tensor, "n 2"], Float[Tensor, " n"], float]:
    """Sun et al.'s rule on one sequence's hidden state: ``|x| > min_abs`` and
    ``|x| >= min_ratio * median(|x|)``, the median over all positions and channels.

    Returns the (position, channel) index of each entry, its value, and the median.
    """
    magnitude = hidden.abs()
    median = float(magnitude.flatten().median())
    found = (magnitude > min_abs) & (magnitude >= min_ratio * median)
    where = found.nonzero()
    return where, hidden[found], median


class _MassiveReducer(Reducer):
    def __init__(self, model, min_abs: float, min_ratio: float):
        self.model, self.min_abs, self.min_ratio = model, min_abs, min_ratio
        self.rows: list[tuple] = []
        self.n_seqs = 0

    def begin(self, batch: Batch) -> None:
        super().begin(batch)
        self.n_seqs += batch.tokens.shape[0]
        self.tokens = batch.relative_tokens()

    def hooks(self):
        return [(f"blocks.{layer}.hook_resid_post", self._hook(layer)) for layer in range(self.model.cfg.n_layers)]

    def _hook(self, layer: int):
        def detect(resid: Float[Tensor, "batch pos d_model"], hook) -> None:
            batch = self.batch
            resid = batch.align(resid, dims=(1,))
            for row in range(resid.shape[0]):
                length = int(batch.lengths[row])
                where, values, median = massive_entries(
                    resid[row, :length].float(), min_abs=self.min_abs, min_ratio=self.min_ratio
                )
                for (position, channel), value in zip(where.tolist(), values.tolist()):
                    token_id = int(self.tokens[row, position])
                    self.rows.append(
                        (layer, batch.first_index + row, position, channel, value,
                         abs(value) / median if median > 0 else float("inf"),
                         _token_text(self.model, token_id))
                    )

        return detect

    def frame(self) -> pd.DataFrame:
        # Sorted, so the frame does not depend on the mini-batch size.
        frame = pd.DataFrame(self.rows, columns=MASSIVE_COLUMNS)
        frame = frame.sort_values(["seq", "layer", "position", "channel"], ignore_index=True)
        frame.attrs.update(n_seqs=self.n_seqs, min_abs=self.min_abs, min_ratio=self.min_ratio)
        return frame


def find_massive_activations(
    model,
    tokens: Int[Tensor, "*batch pos"],
    *,
    min_abs: float | int = 100.0,
    min_ratio: float | int = 1000.0,
    attention_mask: Tensor | None = None,
    batch_size: int = 8,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Massive activations in the residual stream after each block (``hook_resid_post``).

    One row per entry: layer, seq, position (relative to the first real token), channel, value,
    ratio_to_median (|value| over the median |x| of that layer's hidden state for that sequence),
    token. ``frame.attrs`` records n_seqs, min_abs and min_ratio;
    :func:`stable_massive_channels` summarises the frame.
    """
    reducer = _massive_reducer(model, min_abs, min_ratio)
    stream(model, tokens, [reducer], attention_mask=attention_mask, batch_size=batch_size,
           progress=progress, description="massive activations")
    return reducer.frame()


def _massive_reducer(model, min_abs, min_ratio) -> _MassiveReducer:
    return _MassiveReducer(model, _check_positive("min_abs", min_abs), _check_positive("min_ratio", min_ratio))


def stable_massive_channels(activations: pd.DataFrame, *, min_fraction: float = 0.0) -> pd.DataFrame:
    """Summary per (channel, position role): where massive activations recur across inputs.

    role is ``"first token"`` (relative position 0) or ``"other"``. Columns: first and last layer
    where the pair occurs in any sequence and how many layers; ``core_first_layer`` /
    ``core_last_layer``, the same over the layers where it occurs in at least half of the
    sequences (None if no layer does), so that one odd sequence does not stretch the range; the
    fraction of sequences with the pair in some layer; the largest |value|, the median value, and
    the most frequent token. Rows with ``fraction_of_seqs`` below ``min_fraction`` are dropped;
    sorted by fraction, then by magnitude.
    """
    columns = ["channel", "role", "first_layer", "last_layer", "n_layers", "core_first_layer",
               "core_last_layer", "fraction_of_seqs", "max_abs", "median_value", "top_token"]
    if not isinstance(activations, pd.DataFrame):
        raise SinkInterpError(f"stable_massive_channels takes the frame from find_massive_activations, "
                              f"got {type(activations).__name__}")
    if isinstance(min_fraction, bool) or not isinstance(min_fraction, (int, float)) or not 0 <= min_fraction <= 1:
        raise SinkInterpError(f"min_fraction {min_fraction!r} must be a number in [0, 1]")
    missing = [c for c in MASSIVE_COLUMNS if c not in activations.columns]
    if missing:
        raise SinkInterpError(f"activations lacks columns {missing}: pass the frame from find_massive_activations")
    if "n_seqs" not in activations.attrs:
        raise SinkInterpError(
            "activations has no attrs['n_seqs']: pass the frame returned by find_massive_activations"
        )
    n_seqs = activations.attrs["n_seqs"]
    if isinstance(n_seqs, bool) or not isinstance(n_seqs, int) or n_seqs < 1:
        raise SinkInterpError(f"activations.attrs['n_seqs'] must be a positive integer, got {n_seqs!r}")
    if activations.empty:
        return pd.DataFrame(columns=columns)
    frame = activations.assign(role=activations["position"].eq(0).map({True: "first token", False: "other"}))
    rows = []
    for (channel, role), group in frame.groupby(["channel", "role"], sort=False):
        per_layer = group.groupby("layer").seq.nunique() / n_seqs
        core = per_layer[per_layer >= 0.5].index
        rows.append(
            (int(channel), role, int(group.layer.min()), int(group.layer.max()), group.layer.nunique(),
             int(core.min()) if len(core) else None, int(core.max()) if len(core) else None,
             group.seq.nunique() / n_seqs, float(group.value.abs().max()), float(group.value.median()),
             Counter(group.token).most_common(1)[0][0])
        )
    summary = pd.DataFrame(rows, columns=columns)
    summary = summary[summary.fraction_of_seqs >= min_fraction]
    return summary.sort_values(["fraction_of_seqs", "max_abs"], ascending=False, ignore_index=True)


@dataclass(frozen=True)
class ResidualProfile:
    """Magnitudes of the residual stream after each block, as Sun et al. plot them.

    ``top[l, j]`` is the (j+1)-th largest |x| over all positions and channels of layer l's
    hidden state and ``median[l]`` its median |x|, each averaged over sequences; ``sink[l, c]`` is
    |x| of channel c at the first real token (relative position 0) and ``other[l, c]`` the mean
    |x| of channel c over the other positions, both averaged over sequences.
    """

    top: Float[Tensor, "layer k"]
    median: Float[Tensor, " layer"]
    sink: Float[Tensor, "layer d_model"]
    other: Float[Tensor, "layer d_model"]
    n_seqs: int

    @property
    def peak_layer(self) -> int:
        """The layer whose largest |x| is largest."""
        return int(self.top[:, 0].argmax())

    def sink_channels(self, layer: int | None = None, n: int = 5) -> pd.DataFrame:
        """The ``n`` channels with the largest |x| at the first token in ``layer`` (default: the
        peak layer), with their mean |x| at the other positions and the ratio of the two."""
        layer = self.peak_layer if layer is None else check_int("layer", layer)
        check_int("n", n, 1)
        if not 0 <= layer < self.sink.shape[0]:
            raise SinkInterpError(f"layer {layer} out of range: the profile covers 0..{self.sink.shape[0] - 1}")
        values, channels = self.sink[layer].topk(min(n, self.sink.shape[1]))
        other = self.other[layer, channels]
        return pd.DataFrame({"channel": channels.numpy(), "sink_abs": values.numpy(), "other_abs": other.numpy(),
                             "ratio": (values / other.clamp(min=1e-12)).numpy()})

    def to_dict(self) -> dict[str, Any]:
        return {"n_seqs": self.n_seqs, "top_abs": self.top.tolist(), "median_abs": self.median.tolist(),
                "peak_layer": self.peak_layer,
                "sink_channels": self.sink_channels().to_dict(orient="records")}


class _ProfileReducer(Reducer):
    def __init__(self, model, k: int):
        self.model, self.k = model, k
        n_layers, d_model = model.cfg.n_layers, model.cfg.d_model
        self.top = torch.zeros(n_layers, k, dtype=torch.float64)
        self.median = torch.zeros(n_layers, dtype=torch.float64)
        self.sink = torch.zeros(n_layers, d_model, dtype=torch.float64)
        self.other = torch.zeros(n_layers, d_model, dtype=torch.float64)
        self.n_seqs = 0

    def begin(self, batch: Batch) -> None:
        super().begin(batch)
        self.n_seqs += batch.tokens.shape[0]

    def hooks(self):
        return [(f"blocks.{layer}.hook_resid_post", self._hook(layer)) for layer in range(self.model.cfg.n_layers)]

    def _hook(self, layer: int):
        def reduce(resid: Float[Tensor, "batch pos d_model"], hook) -> None:
            resid = self.batch.align(resid, dims=(1,))
            for row in range(resid.shape[0]):
                magnitude = resid[row, : int(self.batch.lengths[row])].detach().double().abs()
                flat = magnitude.flatten()
                self.top[layer] += flat.topk(min(self.k, flat.numel())).values.cpu()
                self.median[layer] += float(flat.median())
                self.sink[layer] += magnitude[0].cpu()
                if magnitude.shape[0] > 1:
                    self.other[layer] += magnitude[1:].mean(dim=0).cpu()

        return reduce

    def profile(self) -> ResidualProfile:
        n = max(self.n_seqs, 1)
        return ResidualProfile(self.top / n, self.median / n, self.sink / n, self.other / n, self.n_seqs)


def residual_profile(
    model,
    tokens: Int[Tensor, "*batch pos"],
    *,
    k: int = 3,
    attention_mask: Tensor | None = None,
    batch_size: int = 8,
    progress: bool | None = None,
) -> ResidualProfile:
    """The ``k`` largest and the median |x| of each block's output, and the channel profile at the
    first token against the other positions (Sun et al., Figs. 1-2): see :class:`ResidualProfile`."""
    check_int("k", k, 1)
    check_tokens(model, tokens)
    if k > tokens.shape[1] * model.cfg.d_model:
        raise SinkInterpError(f"k = {k} exceeds the {tokens.shape[1]} x {model.cfg.d_model} values of one block's "
                              "output per sequence")
    reducer = _ProfileReducer(model, k)
    stream(model, tokens, [reducer], attention_mask=attention_mask, batch_size=batch_size,
           progress=progress, description="residual profile")
    return reducer.profile()


# --------------------------------------------------------------------------------------------
# Query/key/value geometry


def head_frame(n_layers: int, n_heads: int) -> pd.DataFrame:
    """One row per head, ``layer`` and ``head`` columns, in (layer, head) order: what per-head
    tensors ``[layers, heads]`` flatten to."""
    return pd.DataFrame({"layer": [l for l in range(n_layers) for _ in range(n_heads)],
                         "head": [h for _ in range(n_layers) for h in range(n_heads)]})


def _kv_group(model) -> int:
    n_kv = getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads
    return model.cfg.n_heads // n_kv


def _per_query_head(x: Tensor, n_heads: int) -> Tensor:
    """A key/value activation [batch pos head d] with one entry per query head: grouped (one per kv
    head, repeated) or already ungrouped (``set_ungroup_grouped_query_attention(True)``)."""
    return x.repeat_interleave(n_heads // x.shape[2], dim=2)


class _PerHeadReducer(Reducer):
    """Sums of per-sequence statistics per (layer, head), read out as a DataFrame of means."""

    STATS: tuple[str, ...] = ()

    def __init__(self, model):
        self.model, self.group = model, _kv_group(model)
        shape = (model.cfg.n_layers, model.cfg.n_heads)
        self.sums = {name: torch.zeros(shape, dtype=torch.float64) for name in self.STATS}
        self.n_seqs = 0

    def begin(self, batch: Batch) -> None:
        super().begin(batch)
        self.n_seqs += batch.tokens.shape[0]

    def add(self, layer: int, stats: dict[str, Tensor]) -> None:
        """Add per-sequence values ``[batch head]`` of each statistic."""
        for name, value in stats.items():
            self.sums[name][layer] += value.sum(dim=0).cpu()

    def frame(self) -> pd.DataFrame:
        frame = head_frame(self.model.cfg.n_layers, self.model.cfg.n_heads)
        frame["kv_head"] = frame["head"] // self.group
        for name in self.STATS:
            frame[name] = (self.sums[name] / self.n_seqs).flatten().numpy()
        return frame


def _measure(reducer: _PerHeadReducer, model, tokens, description: str, **kwargs) -> pd.DataFrame:
    stream(model, tokens, [reducer], description=description, **kwargs)
    return reducer.frame()


class _GeometryReducer(_PerHeadReducer):
    STATS = ("q_norm", "k_sink_norm", "k_other_norm", "v_sink_norm", "v_other_norm",
             "cos_q_k_sink", "cos_q_k_other", "logit_sink", "logit_other")

    def __init__(self, model):
        super().__init__(model)
        # The logits compare rotated queries and keys: read those, and refuse a model that lists the
        # rotary hooks without firing them rather than mix unrotated angles with rotated logits.
        rotary = "blocks.0.attn.hook_rot_q" in model.hook_dict
        require(model, "scores", *(["rotary_hooks"] if rotary else []), needed_by="qkv_geometry")
        self.q_hook, self.k_hook = ("hook_rot_q", "hook_rot_k") if rotary else ("hook_q", "hook_k")
        self.windows = attention_windows(model)
        self.stash: dict[str, Tensor] = {}

    def hooks(self):
        hooks = []
        for layer in range(self.model.cfg.n_layers):
            for key, name in (("q", self.q_hook), ("k", self.k_hook), ("v", "hook_v")):
                hooks.append((f"blocks.{layer}.attn.{name}", self._keep(key)))
            hooks.append((f"blocks.{layer}.attn.hook_attn_scores", self._hook(layer)))
        return hooks

    def _keep(self, key: str):
        def keep(x: Float[Tensor, "batch pos head d_head"], hook) -> None:
            self.stash[key] = self.batch.align(x, dims=(1,))

        return keep

    def _hook(self, layer: int):
        # hook_attn_scores fires after q, k (rotated) and v of the same layer: all are stashed.
        def reduce(scores: Float[Tensor, "batch head query key"], hook) -> None:
            q = self.stash.pop("q").double()
            k, v = (_per_query_head(self.stash.pop(name).double(), q.shape[2]) for name in ("k", "v"))
            scores = self.batch.align(scores, dims=(2, 3)).double()
            n_pos = q.shape[1]
            window = self.windows[layer]
            weights = _query_weights(self.batch, q.device)  # mean over positions 1..len-1
            seeing = _query_weights(self.batch, q.device, window)  # ... that can see the sink
            q_norm, k_norm, v_norm = (x.norm(dim=-1) for x in (q, k, v))  # [batch pos head]
            stats = {
                "q_norm": torch.einsum("bph,bp->bh", q_norm, weights),
                "k_sink_norm": k_norm[:, 0],
                "k_other_norm": torch.einsum("bph,bp->bh", k_norm, weights),
                "v_sink_norm": v_norm[:, 0],
                "v_other_norm": torch.einsum("bph,bp->bh", v_norm, weights),
            }
            cos = torch.einsum(
                "bihd,bjhd->bhij", q / q_norm.clamp(min=1e-12)[..., None], k / k_norm.clamp(min=1e-12)[..., None]
            )
            stats["cos_q_k_sink"] = torch.einsum("bhi,bi->bh", cos[..., 0], seeing)
            # Masked (unseen) entries hold -inf: zero them before weighting (their weight is 0).
            stats["logit_sink"] = torch.einsum("bhi,bi->bh", scores[..., 0].masked_fill(seeing[:, None] == 0, 0), seeing)
            # Pairs 1 <= j <= i < length that the query can see: every non-sink key it attends over.
            positions = torch.arange(n_pos, device=q.device)
            valid = self.batch.valid().to(q.device)
            pairs = visible(n_pos, window, q.device) & (positions[None, :] >= 1)
            pairs = pairs[None] & valid[:, :, None] & valid[:, None, :]  # [batch i j]
            n_pairs = pairs.sum(dim=(1, 2)).double()[:, None]
            pairs = pairs[:, None]
            stats["cos_q_k_other"] = torch.where(pairs, cos, 0).sum(dim=(-1, -2)) / n_pairs
            stats["logit_other"] = torch.where(pairs, scores, 0).sum(dim=(-1, -2)) / n_pairs
            self.add(layer, stats)

        return reduce


def qkv_geometry(
    model,
    tokens: Int[Tensor, "*batch pos"],
    *,
    attention_mask: Tensor | None = None,
    batch_size: int = 8,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Per (layer, head): is the sink chosen by the norm of its key or by its angle to the queries?

    Columns: ``kv_head`` (query head h reads kv head h // group); mean norms of q_i (i >= 1), of
    the sink's k and v (relative position 0) and of the other positions' k and v; mean
    ``cos(q_i, k_sink)`` over queries i >= 1 and ``cos(q_i, k_j)`` over pairs 1 <= j <= i; the
    attention logits (``hook_attn_scores``, scale included) on the same sets. Rotary models use
    the rotated q and k, which is what the logit sees (rotation keeps norms).
    """
    return _measure(_GeometryReducer(model), model, tokens, "q/k/v geometry",
                    attention_mask=attention_mask, batch_size=batch_size, progress=progress)


# --------------------------------------------------------------------------------------------
# Value-weighted attention


class _ValueWeightedReducer(_PerHeadReducer):
    STATS = ("attn_sink_share", "norm_sink_share", "value_out_norm_sink", "value_out_norm_other")

    def __init__(self, model):
        super().__init__(model)
        # Per-layer W_O [head d_head d_model], read once (TransformerBridge exposes it per block too).
        self.W_O = [model.blocks[layer].attn.W_O.detach() for layer in range(model.cfg.n_layers)]
        self.windows = attention_windows(model)
        self.value_norm: Tensor | None = None

    def hooks(self):
        hooks = []
        for layer in range(self.model.cfg.n_layers):
            hooks.append((f"blocks.{layer}.attn.hook_v", self._values(layer)))
            hooks.append((f"blocks.{layer}.attn.hook_pattern", self._hook(layer)))
        return hooks

    def _values(self, layer: int):
        def keep(v: Float[Tensor, "batch pos kv_head d_head"], hook) -> None:
            v = _per_query_head(self.batch.align(v, dims=(1,)), self.model.cfg.n_heads)
            out = torch.einsum("bphd,hdm->bphm", v, self.W_O[layer].to(v.dtype))
            self.value_norm = out.norm(dim=-1).double().transpose(1, 2)  # [batch head pos]

        return keep

    def _hook(self, layer: int):
        def reduce(pattern: Float[Tensor, "batch head query key"], hook) -> None:
            f, self.value_norm = self.value_norm, None
            a = self.batch.align(pattern, dims=(2, 3)).double()
            weights = _query_weights(self.batch, a.device)
            seeing = _query_weights(self.batch, a.device, self.windows[layer])  # queries that see the sink
            # ||A[i,j] v_j W_O|| = A[i,j] ||v_j W_O|| since A[i,j] >= 0.
            total = torch.einsum("bhij,bhj->bhi", a, f)
            sink = a[..., 0] * f[..., :1]
            stats = {
                "attn_sink_share": torch.einsum("bhi,bi->bh", a[..., 0], seeing),
                "norm_sink_share": torch.einsum("bhi,bi->bh", sink / total.clamp(min=1e-30), seeing),
                "value_out_norm_sink": f[..., 0],
                "value_out_norm_other": torch.einsum("bhj,bj->bh", f, weights),
            }
            self.add(layer, stats)

        return reduce

    def frame(self) -> pd.DataFrame:
        frame = super().frame()
        frame["no_op_gap"] = frame["attn_sink_share"] - frame["norm_sink_share"]
        return frame


def value_weighted_attention(
    model,
    tokens: Int[Tensor, "*batch pos"],
    *,
    attention_mask: Tensor | None = None,
    batch_size: int = 8,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Per (layer, head): attention share of the sink vs its share of the value-weighted norm.

    For queries i >= 1 (Kobayashi et al. 2020): ``attn_sink_share`` = mean A[i, 0];
    ``norm_sink_share`` = mean of ``||A[i,0] v_0 W_O|| / sum_j ||A[i,j] v_j W_O||`` (per head,
    without the output bias, which does not depend on attention). ``no_op_gap`` is their
    difference: a head that attends to the sink but writes little from it has a large gap.
    Also the mean ``||v W_O||`` of the sink and of the other positions.
    """
    return _measure(_ValueWeightedReducer(model), model, tokens, "value-weighted attention",
                    attention_mask=attention_mask, batch_size=batch_size, progress=progress)


# --------------------------------------------------------------------------------------------
# Massive values in q and k (Jin et al. 2025)


def rotary_pairs(model) -> Tensor | None:
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
    def __init__(self, model, rotated: bool):
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
    model,
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
    ratio = _check_positive("ratio", ratio)
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
