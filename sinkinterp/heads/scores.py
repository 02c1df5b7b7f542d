"""Head scores: the data scorers read, the streamed pattern reducers, and the scorer registry."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sinkinterp._batches import (
    Batch,
    Reducer,
    check_int,
    stream,
)
from sinkinterp._registry import add_entry
from sinkinterp.backends import (
    Model,
    attention_windows,
)
from sinkinterp.data import (
    NeedlePrompts,
    default_first_token,
    repeated_random_tokens,
)
from sinkinterp.errors import SinkInterpError
from sinkinterp.measure import alpha_at

# --------------------------------------------------------------------------------------------
# Data the scorers read


@dataclass(frozen=True)
class RepeatedTokens:
    """``[first?, x_1..x_n, x_1..x_n]``: the second copy of x starts at ``offset + half_len``."""

    tokens: Int[Tensor, "n_seqs pos"]
    half_len: int
    offset: int = 0  # 1 when a first token (BOS) precedes the two halves

    def __post_init__(self):
        if not isinstance(self.tokens, Tensor) or self.tokens.ndim != 2:
            raise SinkInterpError(f"RepeatedTokens.tokens must be a 2-D tensor [n_seqs, pos], got {type(self.tokens).__name__}")
        check_int("half_len", self.half_len, 1)
        check_int("offset", self.offset, 0)
        if self.tokens.shape[1] != self.offset + 2 * self.half_len:
            raise SinkInterpError(
                f"repeated tokens have {self.tokens.shape[1]} positions, expected offset {self.offset} + "
                f"2 x half_len {self.half_len}"
            )
        first = self.tokens[:, self.offset : self.offset + self.half_len]
        second = self.tokens[:, self.offset + self.half_len :]
        if not torch.equal(first, second):
            raise SinkInterpError("repeated tokens: the second half does not repeat the first")

    def second_half(self) -> Int[Tensor, " n"]:
        return torch.arange(self.offset + self.half_len, self.offset + 2 * self.half_len)

    def induction_steps(self) -> tuple[Tensor, Tensor, Tensor]:
        """Flat (row, query, target) of the induction steps: second-half queries that have seen the
        current token before, predicting the token that followed it the first time."""
        second = self.second_half()[:-1]
        rows = torch.arange(self.tokens.shape[0]).repeat_interleave(len(second))
        queries = second.repeat(self.tokens.shape[0])
        return rows, queries, queries + 1


def make_repeated(model: Model, n_seqs: int, half_len: int, seed: int) -> RepeatedTokens:
    """Repeated random tokens after the model's own first token, if it has one (BOS for Gemma-3)."""
    first = default_first_token(model)
    tokens = repeated_random_tokens(model, n_seqs, half_len, seed=seed, first_token=first)
    return RepeatedTokens(tokens, half_len, offset=int(first != "none"))


# --------------------------------------------------------------------------------------------
# Reducers: hooks on hook_pattern that keep per-head sums


class PatternReducer(Reducer):
    """Per-head running sums of a numerator and a denominator; the score is their ratio."""

    def __init__(self, model: Model):
        self.model = model
        n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
        self.num = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        self.den = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        self.raw = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        self.n_raw = 0
        self.n_scored = 0  # scored queries (all sequences), for the mean non-sink mass
        self.window: int | None = None  # the current layer's sliding window, while its hook runs

    def hooks(self):
        return [(f"blocks.{layer}.attn.hook_pattern", self._hook(layer)) for layer in range(self.model.cfg.n_layers)]

    def _hook(self, layer: int):
        def reduce(pattern: Float[Tensor, "batch head query key"], hook) -> None:
            self.window = attention_windows(self.model)[layer]
            num, den, raw, n_raw = self.reduce(pattern.double())
            self.num[layer] += num.cpu()
            self.den[layer] += den.cpu()
            self.raw[layer] += raw.cpu()
            if layer == 0:
                self.n_raw += n_raw
                self.n_scored += self.scored_queries(pattern)

        return reduce

    def scored_queries(self, pattern: Tensor) -> int:
        return 0

    def reduce(self, pattern: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        raise NotImplementedError

    def scores(self) -> dict[str, Tensor]:
        score = torch.where(self.den > 0, self.num / self.den.clamp(min=1e-300), torch.nan)
        out = {"score": score.clamp(0, 1), "raw": self.raw / max(self.n_raw, 1)}
        if self.n_scored:
            out["mass"] = self.den / self.n_scored  # mean non-sink attention of the scored queries
        return out


class _TargetReducer(PatternReducer):
    """Attention from each scored query to one target key, over its non-sink attention."""

    def __init__(self, model: Model, queries: Tensor, targets: Tensor):
        super().__init__(model)
        keep = targets >= 1  # a target at the first token would measure the sink, not the pattern
        self.queries, self.targets = queries[keep], targets[keep]
        if self.queries.numel() == 0:
            raise SinkInterpError("no query has a target key after the first token: the sequences are too short")

    def reduce(self, pattern):
        q, t = self.queries.to(pattern.device), self.targets.to(pattern.device)
        hit = pattern[:, :, q, t]  # [batch head n]
        rest = 1 - pattern[:, :, q, 0]
        return hit.sum(dim=(0, 2)), rest.sum(dim=(0, 2)), hit.mean(dim=2).sum(dim=0), pattern.shape[0]

    def scored_queries(self, pattern: Tensor) -> int:
        return pattern.shape[0] * self.queries.numel()


class _DetectHeadReducer(PatternReducer):
    """TransformerLens ``detect_head(model, seq, "<kind>_head")`` at its defaults (``error_measure=
    "mul"``, nothing excluded), one sequence at a time: ``sum(A * P) / sum(A)`` over the whole
    [query, key] pattern, with P the detection pattern built from the sequence's tokens; averaged
    over sequences as ``detect_head`` does for a list of prompts. Every query row counts, including
    those with no target (the first half of a repeated sequence), which is why this score is about
    half the ARENA mean on ``[x, x]`` data."""

    def __init__(self, model: Model, kind: str):
        super().__init__(model)
        self.kind = kind

    def _detection(self, tokens: Tensor) -> Tensor:
        n = tokens.shape[1]
        i = torch.arange(n)[:, None]
        j = torch.arange(n)[None, :]
        if self.kind == "previous_token":
            return (j == i - 1).expand(tokens.shape[0], n, n).double()
        same = (tokens[:, :, None] == tokens[:, None, :]) & (j < i)  # duplicate: an earlier equal token
        if self.kind == "duplicate_token":
            return same.double()
        shifted = torch.zeros_like(same)
        shifted[:, :, 1:] = same[:, :, :-1]  # induction: the key right after an earlier copy
        return (shifted & (j <= i)).double()

    def reduce(self, pattern):
        detection = self._detection(self.batch.tokens).to(pattern.device)[:, None]  # [batch 1 q k]
        per_seq = (pattern * detection).sum(dim=(2, 3)) / pattern.sum(dim=(2, 3))  # [batch head]
        n = pattern.shape[0]
        return per_seq.sum(dim=0), torch.full_like(per_seq[0], n), per_seq.sum(dim=0), n


def _previous_token(model: Model, data: RepeatedTokens) -> PatternReducer:
    queries = torch.arange(1, data.tokens.shape[1])
    return _TargetReducer(model, queries, queries - 1)


def _previous_token_text(model: Model, data: Tensor) -> PatternReducer:
    queries = torch.arange(1, data.shape[1])
    return _TargetReducer(model, queries, queries - 1)


def _duplicate(model: Model, data: RepeatedTokens) -> PatternReducer:
    queries = data.second_half()
    return _TargetReducer(model, queries, queries - data.half_len)


def _induction(model: Model, data: RepeatedTokens) -> PatternReducer:
    queries = data.second_half()
    return _TargetReducer(model, queries, queries - data.half_len + 1)


class _SinkReducer(PatternReducer):
    def reduce(self, pattern):
        alpha = alpha_at(pattern, 0, self.window)  # [batch head]: mean over the queries that see key 0
        n = pattern.shape[0]
        return alpha.sum(dim=0), torch.full_like(alpha[0], n), alpha.sum(dim=0), n


class _DistanceReducer(PatternReducer):
    def __init__(self, model: Model, data: Tensor):
        super().__init__(model)
        n_pos = data.shape[1]
        if n_pos < 3:
            raise SinkInterpError("mean attention distance needs sequences of at least 3 tokens")
        i = torch.arange(n_pos, dtype=torch.float64)[:, None]
        j = torch.arange(n_pos, dtype=torch.float64)[None, :]
        weight = ((i - j) / (i - 1).clamp(min=1)).masked_fill((j < 1) | (j > i) | (i < 2), 0)
        self.weight = weight  # [query key]
        self.support = ((j >= 1) & (j <= i) & (i >= 2)).double()

    def reduce(self, pattern):
        weight, support = self.weight.to(pattern.device), self.support.to(pattern.device)
        num = (pattern * weight).sum(dim=(2, 3))
        den = (pattern * support).sum(dim=(2, 3))
        raw = num / den.clamp(min=1e-300)
        return num.sum(dim=0), den.sum(dim=0), raw.sum(dim=0), pattern.shape[0]


class _RecallReducer(PatternReducer):
    """Teacher-forced retrieval score: per prompt, the share of needle tokens whose reproduction
    step's top-1 key is a needle position holding that token; averaged over prompts."""

    def __init__(self, model: Model, data: NeedlePrompts):
        super().__init__(model)
        self.data = data
        self.rows, self.queries, self.targets = data.answer_steps()

    def reduce(self, pattern):
        batch: Batch = self.batch
        n = pattern.shape[0]
        chosen = (self.rows >= batch.first_index) & (self.rows < batch.first_index + n)
        rows, queries, targets = self.rows[chosen], self.queries[chosen], self.targets[chosen]
        local = (rows - batch.first_index).to(pattern.device)
        top = pattern[local, :, queries.to(pattern.device), :].argmax(dim=-1).cpu()  # [steps head]
        hits = needle_hits(self.data, rows, top, self.data.tokens[rows, targets])
        per_prompt = torch.zeros(n, top.shape[1], dtype=torch.float64)
        per_prompt.index_add_(0, rows - batch.first_index, hits.double())
        per_prompt /= self.data.needle_len[batch.first_index : batch.first_index + n, None].double()
        count = torch.full((top.shape[1],), float(n), dtype=torch.float64)
        return per_prompt.sum(dim=0), count, per_prompt.sum(dim=0), n


def needle_hits(data: NeedlePrompts, rows: Tensor, top: Tensor, produced: Tensor) -> Tensor:
    """``top`` [steps, head] key indices: is each inside its row's needle and holding ``produced``?"""
    start = data.needle_start[rows][:, None]
    inside = (top >= start) & (top < start + data.needle_len[rows][:, None])
    held = data.tokens[rows[:, None], top.clamp(max=data.prompt_len - 1)]  # keys past the prompt are never needle
    return inside & (held == produced[:, None])


# --------------------------------------------------------------------------------------------
# The scorer registry


@dataclass(frozen=True)
class Scorer:
    """A head score: which data it reads (``"repeated"``, ``"text"`` or ``"needle"``), how it
    reduces patterns (``make(model, data) -> reducer``) and the label it gives above a threshold."""

    name: str
    data: str
    make: Callable[[Any, Any], PatternReducer] = field(repr=False)
    label: str | None = None
    description: str = ""
    has_raw: bool = False


#: Every head score by name: what ``classify_heads(scorers=...)`` and ``head_scores`` accept.
SCORERS: dict[str, Scorer] = {}


def register_scorer(scorer: Scorer) -> Scorer:
    """Add a head score. Its ``make(model, data)`` returns a :class:`PatternReducer` that reduces
    each layer's pattern to per-head sums; its ``data`` is one of ``"repeated"``, ``"text"``,
    ``"needle"``. A second scorer of the same name is refused."""
    if not isinstance(scorer, Scorer):
        raise SinkInterpError(f"register_scorer takes a Scorer, got {type(scorer).__name__}")
    if scorer.data not in SCORER_DATA:
        raise SinkInterpError(f"scorer {scorer.name!r} reads data {scorer.data!r}: use one of {', '.join(SCORER_DATA)}")
    return add_entry(SCORERS, "head scorer", scorer.name, scorer, example="induction")


#: The data sets a scorer can read.
SCORER_DATA = ("repeated", "text", "needle")


register_scorer(Scorer("previous_token", "repeated", _previous_token, "previous-token",
                 "A[i, i-1] over non-sink attention, queries i >= 2", has_raw=True))
register_scorer(Scorer("duplicate", "repeated", _duplicate, "duplicate",
                 "second half: A[i, i-n] over non-sink attention", has_raw=True))
register_scorer(Scorer("induction", "repeated", _induction, "induction",
                 "second half: A[i, i-n+1] over non-sink attention", has_raw=True))
register_scorer(Scorer("previous_token_text", "text", _previous_token_text, None,
                 "A[i, i-1] over non-sink attention on corpus text, queries i >= 2", has_raw=True))
for _kind, _name in (("previous_token", "previous_token"), ("duplicate_token", "duplicate"), ("induction", "induction")):
    register_scorer(Scorer(f"{_name}_tl", "repeated", lambda model, data, kind=_kind: _DetectHeadReducer(model, kind), None,
                     f"TransformerLens detect_head(..., '{_kind}_head') at its defaults, per sequence, averaged"))
register_scorer(Scorer("recall", "needle", _RecallReducer, "recall",
                 "teacher-forced: share of needle tokens copied with the top-1 key on them (Wu et al.)"))
register_scorer(Scorer("sink", "text", lambda model, data: _SinkReducer(model), "sink",
                 "alpha[l, h, 0] = mean_i A[i, 0] on corpus text"))
register_scorer(Scorer("distance", "text", _DistanceReducer, None,
                 "mean (i - j) / (i - 1) over non-sink keys j >= 1, on corpus text"))


def check_names(names, allowed: Sequence[str], what: str) -> list[str]:
    names = list(names)
    for name in names:
        if name not in allowed:
            raise SinkInterpError(f"unknown {what} {name!r}: allowed {', '.join(allowed)}")
    return names


def head_scores(model: Model, data: dict[str, Any], scorers: Sequence[str] | None = None, *,
                batch_size: int = 8, progress: bool | None = None) -> dict[str, Tensor]:
    """Run the scorers on ``data`` (``{"repeated": RepeatedTokens, "text": tokens, "needle":
    NeedlePrompts}``, only what the scorers need), one forward pass per data set.

    Returns ``{name: [layers, heads]}`` and ``{name + "_raw": ...}`` for scorers with a raw form.
    """
    if isinstance(scorers, str):
        raise SinkInterpError(f"scorers must be a list of scorer names, got the string {scorers!r}: use [{scorers!r}]")
    if not isinstance(data, dict):
        raise SinkInterpError(f"data must be a dict such as {{'repeated': RepeatedTokens, 'text': tokens}}, "
                              f"got {type(data).__name__}")
    names = check_names(SCORERS if scorers is None else scorers, list(SCORERS), "scorer")
    if not names:
        raise SinkInterpError(f"scorers is empty: name at least one of {', '.join(SCORERS)}")
    results: dict[str, Tensor] = {}
    for kind in ("repeated", "text", "needle"):
        chosen = [SCORERS[n] for n in names if SCORERS[n].data == kind]
        if not chosen:
            continue
        if kind not in data:
            raise SinkInterpError(f"scorer {chosen[0].name!r} needs {kind!r} data; got {', '.join(data) or 'none'}")
        value = data[kind]
        wanted = {"repeated": RepeatedTokens, "needle": NeedlePrompts}.get(kind)
        if wanted is not None and not isinstance(value, wanted):
            raise SinkInterpError(f"data[{kind!r}] must be {wanted.__name__}, got {type(value).__name__}")
        tokens = value.tokens if isinstance(value, (RepeatedTokens, NeedlePrompts)) else value
        reducers = [scorer.make(model, value) for scorer in chosen]
        stream(model, tokens, reducers, batch_size=batch_size, progress=progress, description=f"{kind} scores")
        for scorer, reducer in zip(chosen, reducers):
            out = reducer.scores()
            results[scorer.name] = out["score"].float()
            if scorer.has_raw:
                results[f"{scorer.name}_raw"] = out["raw"].float()
            if "mass" in out:
                results[f"{scorer.name}_mass"] = out["mass"].float()
    return results


