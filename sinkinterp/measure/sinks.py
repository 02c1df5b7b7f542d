"""Sink scores (Gu et al.): alpha[l, h, k], the sink ratio, the first-token share and secondary sinks,
streamed (no attention cache)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from sinkinterp._batches import (
    Batch,
    Reducer,
    check_eps,
    check_int,
    check_tokens,
    stream,
)
from sinkinterp.backends import Model, attention_windows
from sinkinterp.errors import SinkInterpError
from sinkinterp.measure.common import (
    seen_counts,
    token_text,
)
from sinkinterp.sites import Heads, head_label

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

    def sink_heads(self, eps: float = 0.3, position: int = 0) -> Heads:
        """The heads whose alpha at ``position`` (averaged over sequences) is above ``eps``, as a
        :class:`~sinkinterp.sites.Heads` value that per-head interventions take as ``heads=``:
        ``MaskSinkKey(heads=report.sink_heads(0.3))`` masks exactly those heads, layer by layer."""
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise SinkInterpError(f"eps {eps!r} must be a number in (0, 1)")
        alpha = self.alpha[:, :, self._position(position)]
        return Heads([(int(l), int(h)) for l, h in zip(*torch.nonzero(alpha > eps, as_tuple=True))])

    def strongest_heads(self, n: int = 10, position: int = 0) -> pd.DataFrame:
        """The ``n`` heads with the largest alpha at ``position``."""
        check_int("n", n, 1)
        values = self.alpha[:, :, self._position(position)]
        order = values.flatten().argsort(descending=True)[:n]
        rows = [
            (int(i) // self.n_heads, int(i) % self.n_heads, float(values.flatten()[i])) for i in order
        ]
        frame = pd.DataFrame(rows, columns=["layer", "head", "alpha"])
        frame.insert(0, "name", [head_label(l, h) for l, h, _ in rows])
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


class SinkReducer(Reducer):
    def __init__(self, model: Model, n_pos: int, eps: tuple[float, ...], min_queries: int):
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
            # The row sums accumulate in at least float32 without a copy of the pattern (a float64
            # copy cost a quarter of a plain forward at T = 2048); pairwise summation keeps their
            # error near 1e-7 at T = 8192, far below any learned sink's missing mass.
            row_sums = p[:, :, 1:].sum(dim=-1, dtype=torch.promote_types(p.dtype, torch.float32)).double()
            missing = ((1 - row_sums) * real).sum(dim=-1) / real.sum(dim=-1).clamp(min=1)
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
                (batch.first_index + seq, k, token_id, token_text(self.model, token_id),
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
    model: Model,
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
    reducer = SinkReducer(model, tokens.shape[1], eps, min_queries)
    stream(model, tokens, [reducer], attention_mask=attention_mask, batch_size=batch_size,
           progress=progress, description="sink scores")
    return reducer.report(eps)




# --------------------------------------------------------------------------------------------
# Where the attention goes once a sink is replaced


class _BudgetReducer(Reducer):
    def __init__(self, model: Model, from_query: int):
        self.model, self.from_query = model, from_query
        n = model.cfg.n_layers
        self.sums = {name: torch.zeros(n, dtype=torch.float64) for name in BUDGET_PARTS}
        self.n_seqs = 0

    def begin(self, batch: Batch) -> None:
        super().begin(batch)
        if batch.padded:
            raise SinkInterpError("attention_budget takes unpadded tokens")
        self.n_seqs += batch.tokens.shape[0]

    def hooks(self):
        return [(f"blocks.{layer}.attn.hook_pattern", self._hook(layer)) for layer in range(self.model.cfg.n_layers)]

    def _hook(self, layer: int):
        def reduce(pattern, hook) -> None:
            rows = pattern.detach()[:, :, self.from_query:].double()  # [batch head query key]
            self.sums["first_share"][layer] += float(rows[..., 0].mean(dim=(1, 2)).sum())
            self.sums["slot_share"][layer] += float((1 - rows.sum(dim=-1)).mean(dim=(1, 2)).sum())
            # The key that gains the most: the largest per-head mean column over the other keys.
            columns = rows[..., 1:].mean(dim=2)  # [batch head key]
            self.sums["top_other_share"][layer] += float(columns.max(dim=-1).values.mean(dim=1).sum())

        return reduce


BUDGET_PARTS = ("first_share", "slot_share", "top_other_share")


def attention_budget(model: Model, tokens: Int[Tensor, "batch pos"], *, from_query: int = 16, batch_size: int = 8,
                     progress: bool | None = None) -> pd.DataFrame:
    """Per layer, where the attention of queries i >= ``from_query`` goes, averaged over heads,
    those queries and sequences: ``first_share`` (the first token), ``slot_share`` (what the
    pattern no longer sums to: the mass a slot stand-in took, 0 without one) and
    ``top_other_share`` (the one other key with the largest mean attention in each head: a new
    sink forming elsewhere shows here). Run it inside :func:`~sinkinterp.intervene` to read a
    stand-in's pattern."""
    check_tokens(model, tokens)
    from_query = check_int("from_query", from_query)
    if from_query >= tokens.shape[1]:
        raise SinkInterpError(f"from_query {from_query} leaves no query in sequences of {tokens.shape[1]} tokens")
    reducer = _BudgetReducer(model, from_query)
    stream(model, tokens, [reducer], batch_size=batch_size, progress=progress, description="attention budget")
    frame = pd.DataFrame({name: (values / reducer.n_seqs).numpy() for name, values in reducer.sums.items()})
    frame.insert(0, "layer", range(model.cfg.n_layers))
    return frame
