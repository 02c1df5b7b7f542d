"""Head scores and the sink / previous-token / duplicate / induction / recall classification
(docs/design.md §2), with a causal check of the recall and induction labels.

Every score is in [0, 1] and comes from a *scorer*: a registered recipe that names the data it
needs and reduces each layer's attention pattern to per-head sums in a hook (nothing of shape
``[layers, heads, T, T]`` is kept). Scorers that share data share one forward pass.

- ``previous_token``, ``duplicate``, ``induction`` (repeated random tokens ``[x, x]``): the
  attention from query i to its target key (i - 1; i - n; i - n + 1 in the second half), divided
  by the attention the query pays to anything but the first token. The sink takes most of many
  heads' attention, so the raw mean (``*_raw`` columns, the ARENA definition) would call a head
  that does induction whenever it is not resting on the sink a weak one. Queries whose target is
  the first token itself are left out. ``*_mass`` is the mean non-sink attention of the scored
  queries; content labels need it to be at least ``MIN_NON_SINK_MASS`` (0.05).
- ``previous_token_tl``, ``duplicate_tl``, ``induction_tl``: TransformerLens's ``detect_head``
  at its defaults, per sequence, averaged; ``previous_token_text`` on corpus text.
- ``recall`` (Wu et al. 2024): on needle-in-a-haystack prompts, teacher-forced through the
  needle's reproduction, the fraction of reproduction steps whose top-1 attended key is a needle
  position holding the token being produced. ``recall_greedy`` does the same on the model's own
  greedy output, over the prompts it reproduces (ROUGE-1 recall > 0.5, as Wu et al.).
- ``sink``: alpha at the first token, ``mean_{i >= 0} A[i, 0]`` (as :func:`sink_scores`).
- ``distance``: mean attention distance over the non-sink keys, ``(i - j) / (i - 1)`` weighted by
  ``A[i, j]`` for keys j >= 1: 0 = attends to itself, 1 = to the oldest non-sink token.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from sinkinterp._batches import Batch, Reducer, check_bool, check_int, check_seed, stream
from sinkinterp.backends import attention_windows, capabilities, final_logits, is_hooked_transformer
from sinkinterp.data import (
    NeedlePrompts,
    corpus_windows,
    default_first_token,
    needle_prompts,
    repeated_random_tokens,
)
from sinkinterp.errors import SinkInterpError
from sinkinterp.metrics import alpha_at

__all__ = [
    "Scorer",
    "SCORERS",
    "DEFAULT_THRESHOLDS",
    "RepeatedTokens",
    "head_scores",
    "greedy_recall",
    "classify_heads",
    "HeadValidation",
    "validate_heads",
    "top_heads",
    "qk_by_label",
    "ov_copying_scores",
    "logit_attribution",
    "copying_evidence",
]

#: Label -> threshold on its score (docs/design.md §2: induction / previous 0.4 as in ARENA, retrieval
#: 0.1 as Wu et al., sink eps 0.3).
DEFAULT_THRESHOLDS: dict[str, float] = {
    "sink": 0.3,
    "previous-token": 0.4,
    "duplicate": 0.4,
    "induction": 0.4,
    "recall": 0.1,
}


#: A head gets a content label (previous-token, duplicate, induction) only if, on the queries that
#: score it, at least this share of its attention is off the first token (the ``*_mass`` columns).
#: Below it the conditional score divides by almost nothing: a head with 99.98% of its attention on
#: the sink scored 0.02 to 0.91 with the seed, decided by one "awake" sequence in eight.
MIN_NON_SINK_MASS = 0.05


def _head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


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


def _repeated(model, n_seqs: int, half_len: int, seed: int) -> RepeatedTokens:
    """Repeated random tokens after the model's own first token, if it has one (BOS for Gemma-3)."""
    first = default_first_token(model)
    tokens = repeated_random_tokens(model, n_seqs, half_len, seed=seed, first_token=first)
    return RepeatedTokens(tokens, half_len, offset=int(first != "none"))


# --------------------------------------------------------------------------------------------
# Reducers: hooks on hook_pattern that keep per-head sums


class _PatternReducer(Reducer):
    """Per-head running sums of a numerator and a denominator; the score is their ratio."""

    def __init__(self, model):
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


class _TargetReducer(_PatternReducer):
    """Attention from each scored query to one target key, over its non-sink attention."""

    def __init__(self, model, queries: Tensor, targets: Tensor):
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


class _DetectHeadReducer(_PatternReducer):
    """TransformerLens ``detect_head(model, seq, "<kind>_head")`` at its defaults (``error_measure=
    "mul"``, nothing excluded), one sequence at a time: ``sum(A * P) / sum(A)`` over the whole
    [query, key] pattern, with P the detection pattern built from the sequence's tokens; averaged
    over sequences as ``detect_head`` does for a list of prompts. Every query row counts, including
    those with no target (the first half of a repeated sequence), which is why this score is about
    half the ARENA mean on ``[x, x]`` data."""

    def __init__(self, model, kind: str):
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


def _previous_token(model, data: RepeatedTokens) -> _PatternReducer:
    queries = torch.arange(1, data.tokens.shape[1])
    return _TargetReducer(model, queries, queries - 1)


def _previous_token_text(model, data: Tensor) -> _PatternReducer:
    queries = torch.arange(1, data.shape[1])
    return _TargetReducer(model, queries, queries - 1)


def _duplicate(model, data: RepeatedTokens) -> _PatternReducer:
    queries = data.second_half()
    return _TargetReducer(model, queries, queries - data.half_len)


def _induction(model, data: RepeatedTokens) -> _PatternReducer:
    queries = data.second_half()
    return _TargetReducer(model, queries, queries - data.half_len + 1)


class _SinkReducer(_PatternReducer):
    def reduce(self, pattern):
        alpha = alpha_at(pattern, 0, self.window)  # [batch head]: mean over the queries that see key 0
        n = pattern.shape[0]
        return alpha.sum(dim=0), torch.full_like(alpha[0], n), alpha.sum(dim=0), n


class _DistanceReducer(_PatternReducer):
    def __init__(self, model, data: Tensor):
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


class _RecallReducer(_PatternReducer):
    """Teacher-forced retrieval score: per prompt, the share of needle tokens whose reproduction
    step's top-1 key is a needle position holding that token; averaged over prompts."""

    def __init__(self, model, data: NeedlePrompts):
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
        hits = _needle_hits(self.data, rows, top, self.data.tokens[rows, targets])
        per_prompt = torch.zeros(n, top.shape[1], dtype=torch.float64)
        per_prompt.index_add_(0, rows - batch.first_index, hits.double())
        per_prompt /= self.data.needle_len[batch.first_index : batch.first_index + n, None].double()
        count = torch.full((top.shape[1],), float(n), dtype=torch.float64)
        return per_prompt.sum(dim=0), count, per_prompt.sum(dim=0), n


def _needle_hits(data: NeedlePrompts, rows: Tensor, top: Tensor, produced: Tensor) -> Tensor:
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
    make: Callable[[Any, Any], _PatternReducer] = field(repr=False)
    label: str | None = None
    description: str = ""
    has_raw: bool = False


SCORERS: dict[str, Scorer] = {}


def _register(scorer: Scorer) -> Scorer:
    SCORERS[scorer.name] = scorer
    return scorer


_register(Scorer("previous_token", "repeated", _previous_token, "previous-token",
                 "A[i, i-1] over non-sink attention, queries i >= 2", has_raw=True))
_register(Scorer("duplicate", "repeated", _duplicate, "duplicate",
                 "second half: A[i, i-n] over non-sink attention", has_raw=True))
_register(Scorer("induction", "repeated", _induction, "induction",
                 "second half: A[i, i-n+1] over non-sink attention", has_raw=True))
_register(Scorer("previous_token_text", "text", _previous_token_text, None,
                 "A[i, i-1] over non-sink attention on corpus text, queries i >= 2", has_raw=True))
for _kind, _name in (("previous_token", "previous_token"), ("duplicate_token", "duplicate"), ("induction", "induction")):
    _register(Scorer(f"{_name}_tl", "repeated", lambda model, data, kind=_kind: _DetectHeadReducer(model, kind), None,
                     f"TransformerLens detect_head(..., '{_kind}_head') at its defaults, per sequence, averaged"))
_register(Scorer("recall", "needle", _RecallReducer, "recall",
                 "teacher-forced: share of needle tokens copied with the top-1 key on them (Wu et al.)"))
_register(Scorer("sink", "text", lambda model, data: _SinkReducer(model), "sink",
                 "alpha[l, h, 0] = mean_i A[i, 0] on corpus text"))
_register(Scorer("distance", "text", _DistanceReducer, None,
                 "mean (i - j) / (i - 1) over non-sink keys j >= 1, on corpus text"))


def _check_names(names, allowed: Sequence[str], what: str) -> list[str]:
    names = list(names)
    for name in names:
        if name not in allowed:
            raise SinkInterpError(f"unknown {what} {name!r}: allowed {', '.join(allowed)}")
    return names


def head_scores(model, data: dict[str, Any], scorers: Sequence[str] | None = None, *,
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
    names = _check_names(SCORERS if scorers is None else scorers, list(SCORERS), "scorer")
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


# --------------------------------------------------------------------------------------------
# Greedy reproduction of the needle


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _rouge1_recall(reference: str, response: str, exclude: str = "") -> float:
    """Share of the reference's words found in the response (with multiplicity): ROUGE-1 recall.
    ``exclude``: leave out the reference words that also occur in this text (the question), so that
    repeating the question is not counted as reproducing the needle."""
    ref, remaining = _words(reference), _words(response)
    if exclude:
        asked = set(_words(exclude))
        ref = [word for word in ref if word not in asked]
    hits = 0
    for word in ref:
        if word in remaining:
            remaining.remove(word)
            hits += 1
    return hits / max(len(ref), 1)


def _decode_steps(model, prompts: Tensor, n_steps: int, on_pattern: Callable[[int, int, Tensor], None]) -> Tensor:
    """Greedy tokens [batch, n_steps]; ``on_pattern(step, layer, pattern[batch, head, key])``
    sees each step's last-query attention. HookedTransformer uses its key/value cache; other
    models (TransformerBridge) recompute the whole sequence each step."""
    step = {"i": 0}

    def hook(layer: int):
        def keep(pattern, hook):
            on_pattern(step["i"], layer, pattern[:, :, -1, :])

        return keep

    hooks = [(f"blocks.{layer}.attn.hook_pattern", hook(layer)) for layer in range(model.cfg.n_layers)]
    out = []
    with torch.inference_mode(), model.hooks(fwd_hooks=hooks):
        if capabilities(model).kv_cache:
            from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

            cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, prompts.shape[0])
            logits = model(prompts, past_kv_cache=cache)
            for i in range(n_steps):
                nxt = logits[:, -1].argmax(dim=-1)
                out.append(nxt.cpu())
                if i + 1 < n_steps:
                    step["i"] = i + 1
                    logits = model(nxt[:, None], past_kv_cache=cache)
        else:
            sequence = prompts
            for i in range(n_steps):
                step["i"] = i
                nxt = model(sequence)[:, -1].argmax(dim=-1)
                out.append(nxt.cpu())
                sequence = torch.cat([sequence, nxt[:, None]], dim=1)
    return torch.stack(out, dim=1)


def greedy_recall(model, data: NeedlePrompts, *, extra_steps: int = 4, batch_size: int = 8,
                  success: float = 0.5) -> dict[str, Any]:
    """Let the model answer each prompt greedily and score retrieval as Wu et al.: at every step
    the model produces token w, a head scores a hit if its top-1 key is a needle position holding
    w; per prompt, hits / needle length (at most 1). Generation stops at the first line break
    after some text, or after ``needle_len + extra_steps`` tokens.

    A prompt counts as reproduced when the answer holds more than ``success`` of the needle's *new
    content*: its words that are not in the question (for the default needle and question, the city
    and the number: the name, "The secret code of", "from" and "is" are all in the question, so an
    answer that repeats the question without the number does not pass; both are needed). Wu et al.'s literal rule, ROUGE-1
    recall of all the needle's words, is kept as ``*_wu``; prompts built without questions use it.

    Returns ``score`` [layers, heads] averaged over the prompts reproduced (NaN if none), and
    ``score_wu`` over the prompts Wu's rule passes, plus per prompt the response, both ROUGE-1
    recalls and whether it reproduces the needle exactly.
    """
    if not isinstance(data, NeedlePrompts):
        raise SinkInterpError(f"greedy_recall takes NeedlePrompts (see needle_prompts), got {type(data).__name__}")
    check_int("extra_steps", extra_steps, 0)
    check_int("batch_size", batch_size, 1)
    if isinstance(success, bool) or not isinstance(success, (int, float)) or not 0 <= success < 1:
        raise SinkInterpError(f"success must be a ROUGE-1 recall in [0, 1), got {success!r}")
    if data.prompt_len + int(data.needle_len.max()) + extra_steps > model.cfg.n_ctx:
        raise SinkInterpError(f"prompts of {data.prompt_len} tokens plus {int(data.needle_len.max()) + extra_steps} "
                              f"generated exceed the model's context n_ctx = {model.cfg.n_ctx}: lower extra_steps")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise SinkInterpError("greedy recall decodes the model's answers and needs a tokenizer")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    n_steps = int(data.needle_len.max()) + extra_steps
    per_prompt = torch.zeros(data.n_prompts, n_layers, n_heads, dtype=torch.float64)
    responses, rouge, rouge_wu, exact, lengths = [], [], [], [], []
    for start in range(0, data.n_prompts, batch_size):
        rows = torch.arange(start, min(start + batch_size, data.n_prompts))
        top = torch.zeros(len(rows), n_steps, n_layers, n_heads, dtype=torch.long)

        def on_pattern(step: int, layer: int, pattern: Tensor, top=top) -> None:
            top[:, step, layer] = pattern.argmax(dim=-1).cpu()

        generated = _decode_steps(model, data.prompts[rows], n_steps, on_pattern)
        for local, row in enumerate(rows.tolist()):
            tokens = generated[local].tolist()
            length = _answer_length(tokenizer, tokens)
            text = tokenizer.decode(tokens[:length])
            needle = data.needles[row] if data.needles else tokenizer.decode(data.needle_ids(row))
            responses.append(text)
            lengths.append(length)
            question = data.questions[row] if data.questions else ""
            rouge_wu.append(_rouge1_recall(needle, text))
            rouge.append(_rouge1_recall(needle, text, exclude=question) if question else rouge_wu[-1])
            exact.append(text.strip() == needle.strip())
            produced = generated[local, :length]
            hits = _needle_hits(
                data, torch.full((length,), row), top[local, :length].reshape(length, -1),
                produced,
            ).reshape(length, n_layers, n_heads)
            per_prompt[row] = (hits.sum(dim=0).double() / int(data.needle_len[row])).clamp(max=1)
    def mean_over(passed: Tensor) -> Tensor:
        return per_prompt[passed].mean(dim=0) if bool(passed.any()) else torch.full((n_layers, n_heads), math.nan)

    reproduced = torch.tensor([r > success for r in rouge])
    reproduced_wu = torch.tensor([r > success for r in rouge_wu])
    return {
        "score": mean_over(reproduced).float(),
        "score_wu": mean_over(reproduced_wu).float(),
        "per_prompt": per_prompt.float(),
        "responses": responses,
        "rouge1_recall": rouge,
        "rouge1_recall_wu": rouge_wu,
        "rule": "new content" if data.questions else "Wu et al. (no questions recorded)",
        "exact": exact,
        "reproduced": reproduced.tolist(),
        "reproduced_wu": reproduced_wu.tolist(),
        "reproduction_rate": float(reproduced.double().mean()),
        "reproduction_rate_wu": float(reproduced_wu.double().mean()),
        "exact_rate": float(torch.tensor(exact, dtype=torch.float64).mean()),
    }


def _answer_length(tokenizer, tokens: list[int]) -> int:
    """Tokens up to the first line break that follows some text, or to an end-of-turn token."""
    stops = {tokenizer.eos_token_id, *tokenizer.all_special_ids}
    seen_text = False
    for i, token in enumerate(tokens):
        if token in stops:
            return max(i, 1)
        piece = tokenizer.decode([token])
        if "\n" in piece and seen_text:
            return i
        seen_text = seen_text or bool(piece.strip())
    return len(tokens)


# --------------------------------------------------------------------------------------------
# Q/K massive values next to the classes, and the classification itself


def _check_thresholds(thresholds) -> dict[str, float]:
    merged = dict(DEFAULT_THRESHOLDS)
    if thresholds is None:
        return merged
    if not isinstance(thresholds, dict):
        raise SinkInterpError(f"thresholds must be a dict label -> value, got {type(thresholds).__name__}")
    for label, value in thresholds.items():
        if label not in DEFAULT_THRESHOLDS:
            raise SinkInterpError(f"unknown label {label!r} in thresholds: allowed {', '.join(DEFAULT_THRESHOLDS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise SinkInterpError(f"threshold for {label!r} is {value!r}: scores are in [0, 1], give a number there")
        merged[label] = float(value)
    return merged


def _check_context_lens(model, context_lens) -> tuple[int, ...]:
    values = (context_lens,) if isinstance(context_lens, int) else tuple(context_lens)
    if not values:
        raise SinkInterpError("context_lens is empty: give at least one needle prompt length, e.g. (256, 512)")
    for value in values:
        check_int("context length", value, 2)
        if value > model.cfg.n_ctx:
            raise SinkInterpError(f"context length {value} exceeds the model's context: n_ctx = {model.cfg.n_ctx}")
    return values


def _labels(row: pd.Series, thresholds: dict[str, float], min_mass: float = MIN_NON_SINK_MASS) -> tuple[str, ...]:
    labels = []
    for scorer in SCORERS.values():
        if scorer.label is not None and scorer.name in row and not pd.isna(row[scorer.name]):
            mass = row.get(f"{scorer.name}_mass")
            if mass is not None and not mass >= min_mass:
                continue  # too little attention off the sink for the conditional score to mean anything
            if row[scorer.name] > thresholds[scorer.label]:
                labels.append(scorer.label)
    return tuple(labels) or ("none",)


def classify_heads(
    model,
    *,
    seed: int = 0,
    thresholds: dict[str, float] | None = None,
    scorers: Sequence[str] | None = None,
    n_seqs: int = 16,
    half_len: int = 64,
    text_len: int = 128,
    context_lens: Sequence[int] | int = (256, 512, 1024),
    n_prompts: int = 6,
    depths: Sequence[float] | float = (0.25, 0.5, 0.75),
    greedy: bool = True,
    qk: bool = True,
    data: dict[str, Any] | None = None,
    min_non_sink_mass: float = MIN_NON_SINK_MASS,
    batch_size: int = 4,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Score and label every head. One row per (layer, head): the scores in [0, 1], raw forms,
    ``recall_greedy``, q/k massive-value columns (``qk=True``), and ``labels`` (a tuple; a head
    may carry several, ``("none",)`` otherwise) at ``thresholds`` (defaults
    :data:`DEFAULT_THRESHOLDS`).

    Content labels (previous-token, duplicate, induction) are given on the conditional score pooled
    over every scored query of every sequence (attention to the target over the attention off the
    first token, a ratio of sums), and only to heads whose mean non-sink mass on those queries
    (``*_mass``) is at least ``min_non_sink_mass``. ``*_raw`` is the ARENA mean and ``*_tl``
    TransformerLens's ``detect_head`` score, for comparison.

    Data (all offline and seeded by ``seed``): ``n_seqs`` repeated random sequences of
    2 x ``half_len`` tokens; ``n_seqs`` corpus windows of ``text_len`` tokens at random offsets;
    ``n_prompts`` needle prompts per context length in ``context_lens`` at needle ``depths``.
    ``data`` replaces any of them with your own: ``{"repeated": RepeatedTokens, "text": tokens,
    "needle": NeedlePrompts or a list of them}``. ``frame.attrs`` records the data, the greedy
    reproduction rate and the thresholds.
    """
    from sinkinterp.metrics import head_frame, qk_massive_values

    thresholds = _check_thresholds(thresholds)
    check_seed(seed)
    check_bool("greedy", greedy)
    check_bool("qk", qk)
    if isinstance(min_non_sink_mass, bool) or not isinstance(min_non_sink_mass, (int, float)) \
            or not 0 <= min_non_sink_mass < 1:
        raise SinkInterpError(f"min_non_sink_mass {min_non_sink_mass!r} must be a number in [0, 1)")
    names = _check_names(SCORERS if scorers is None else scorers, list(SCORERS), "scorer")
    for label, value in (("n_seqs", n_seqs), ("half_len", half_len), ("text_len", text_len), ("n_prompts", n_prompts)):
        check_int(label, value, 2 if label != "n_prompts" else 1)
    kinds = {SCORERS[n].data for n in names}
    given = dict(data or {})
    needs_needle = "recall" in names or greedy
    lens = () if ("needle" in given or not needs_needle) else _check_context_lens(model, context_lens)
    unknown = sorted(set(given) - {"repeated", "text", "needle"})
    if unknown:
        raise SinkInterpError(f"unknown data {unknown[0]!r}: give 'repeated', 'text' or 'needle'")
    built: dict[str, Any] = {}
    if "repeated" in kinds:
        built["repeated"] = given.get("repeated") or _repeated(model, n_seqs, half_len, seed)
    text = None
    if "text" in kinds or qk:
        text = given["text"] if "text" in given else corpus_windows(model, n_seqs, text_len, seed=seed)
    if "text" in kinds:
        built["text"] = text
    scores = head_scores(model, built, [n for n in names if SCORERS[n].data != "needle"],
                         batch_size=batch_size, progress=progress)
    prompts: list[NeedlePrompts] = []
    if "needle" in given:
        prompts = list(given["needle"]) if isinstance(given["needle"], (list, tuple)) else [given["needle"]]
        lens = tuple(p.prompt_len for p in prompts)
    elif needs_needle:
        prompts = [needle_prompts(model, n_prompts, length, depths=depths, seed=seed + i)
                   for i, length in enumerate(lens)]
    attrs: dict[str, Any] = {}
    if "recall" in names:
        per_length = [head_scores(model, {"needle": p}, ["recall"], batch_size=batch_size, progress=progress)["recall"]
                      for p in prompts]
        scores["recall"] = torch.stack(per_length).mean(dim=0)  # every context length weighs the same
        attrs["recall_by_context"] = {str(l): s.tolist() for l, s in zip(lens, per_length)}
    if greedy:
        runs = [greedy_recall(model, p, batch_size=batch_size) for p in prompts]
        # Every reproduced prompt weighs the same, whatever its context length.
        n_total = sum(p.n_prompts for p in prompts)
        for suffix, key in (("", "reproduced"), ("_wu", "reproduced_wu")):
            reproduced = torch.cat([r["per_prompt"][torch.tensor(r[key])] for r in runs])
            total = reproduced.shape[0]
            scores[f"recall_greedy{suffix}"] = reproduced.mean(dim=0) if total else torch.full(reproduced.shape[1:], math.nan)
            attrs[f"greedy_reproduction_rate{suffix}"] = total / n_total
        attrs["greedy"] = {
            str(l): {k: r[k] for k in ("reproduction_rate", "reproduction_rate_wu", "exact_rate", "responses",
                                       "rouge1_recall", "rouge1_recall_wu", "exact", "rule")}
            for l, r in zip(lens, runs)
        }

    frame = head_frame(model.cfg.n_layers, model.cfg.n_heads)
    frame.insert(0, "name", [_head_name(l, h) for l, h in zip(frame["layer"], frame["head"])])
    for name, value in scores.items():
        frame[name] = value.flatten().numpy()
    if qk:
        geometry = qk_massive_values(model, text, batch_size=batch_size, progress=progress)
        frame = frame.merge(geometry.per_head(), on=["layer", "head"], how="left")
        attrs["qk"] = geometry.summary()
    frame["labels"] = [_labels(row, thresholds, min_non_sink_mass) for _, row in frame.iterrows()]
    frame.attrs.update(attrs)
    frame.attrs.update({
        "seed": seed,
        "thresholds": thresholds,
        "min_non_sink_mass": float(min_non_sink_mass),
        "label_statistic": "pooled conditional score: sum of target attention / sum of non-sink attention "
                           "over all scored queries; content labels need mean non-sink mass >= min_non_sink_mass",
        "scorers": {n: SCORERS[n].description for n in names},
        "data": {
            "repeated": {"n_seqs": n_seqs, "half_len": half_len, "first_token": default_first_token(model)},
            "text": {"n_seqs": n_seqs, "text_len": text_len, "source": "pydoc_data.topics, seeded offsets",
                     "first_token": default_first_token(model)},
            "needle": [p.to_dict() for p in prompts],
        },
    })
    return frame


def qk_by_label(table: pd.DataFrame) -> pd.DataFrame:
    """Are the big q/k values on recall heads? Per label (a head counts under each of its labels,
    and under ``all``): heads, mean q and k peak ratios, the share of heads with a massive q (k)
    dimension, and the mean low-frequency share of those dimensions."""
    needed = {"labels", "q_peak_ratio", "k_peak_ratio", "q_n_massive", "k_n_massive", "q_massive_low_freq"}
    if not needed <= set(table.columns):
        raise SinkInterpError(f"the table lacks {sorted(needed - set(table.columns))}: classify with qk=True")
    rows = table.explode("labels")
    everyone = table.assign(labels="all")
    grouped = pd.concat([rows, everyone]).groupby("labels", sort=False)
    return grouped.agg(
        n_heads=("name", "size"),
        q_peak_ratio=("q_peak_ratio", "mean"),
        k_peak_ratio=("k_peak_ratio", "mean"),
        q_has_massive=("q_n_massive", lambda x: float((x > 0).mean())),
        k_has_massive=("k_n_massive", lambda x: float((x > 0).mean())),
        q_massive_low_freq=("q_massive_low_freq", "mean"),
    ).reset_index().rename(columns={"labels": "label"})


def top_heads(table: pd.DataFrame, score: str, k: int) -> list[tuple[int, int]]:
    """The ``k`` heads with the largest ``score`` as (layer, head) pairs, best first."""
    if score not in table.columns:
        raise SinkInterpError(f"the table has no score {score!r}; its columns: {', '.join(map(str, table.columns))}")
    n = len(table)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise SinkInterpError(f"k = {k!r} heads: there are {n} heads to choose from, so k must be in 1..{n}")
    ordered = table.sort_values([score, "layer", "head"], ascending=[False, True, True], kind="stable")
    return [(int(l), int(h)) for l, h in zip(ordered["layer"][:k], ordered["head"][:k])]


# --------------------------------------------------------------------------------------------
# Circuit evidence for copying heads: the OV circuit and direct logit attribution


def _norm_weight(module) -> Tensor | None:
    """The elementwise weight a norm applies, or None where it was folded away (HookedTransformer
    with ``fold_ln``: ``LNPre`` / ``RMSNormPre`` have none)."""
    weight = getattr(module, "w", None)
    return weight.detach() if isinstance(weight, Tensor) else None


def _head_ov(model, layer: int, head: int) -> tuple[Tensor, Tensor]:
    """``W_V`` [d_model d_head] (with the block's input-norm weight folded in) and ``W_O``
    [d_head d_model] of query head ``head``; its value weights are its kv group's."""
    attn = model.blocks[layer].attn
    w_v, w_o = attn.W_V.detach(), attn.W_O.detach()
    kv = head if w_v.shape[0] == model.cfg.n_heads else head // (model.cfg.n_heads // w_v.shape[0])
    w_v = w_v[kv].double()
    ln1 = _norm_weight(model.blocks[layer].ln1)
    if ln1 is not None:
        w_v = ln1.double()[:, None] * w_v
    return w_v, w_o[head].double()


def _unembed(model) -> Tensor:
    """``W_U`` [d_model vocab] with the final norm's weight folded in."""
    w_u = model.W_U.detach().double()
    final = _norm_weight(model.ln_final)
    return w_u if final is None else final.double()[:, None] * w_u


def _check_heads(model, heads) -> list[tuple[int, int]]:
    """Every head for None, else the (layer, head) pairs checked against the model."""
    from sinkinterp.interventions import _head_pairs, _pairs

    if heads is None:
        return [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    pairs = _pairs("heads", heads)
    if not pairs:
        raise SinkInterpError("heads is empty: name at least one (layer, head) pair, or None for all")
    return _head_pairs(model, pairs)


def ov_copying_scores(model, heads=None, *, n_tokens: int = 200, seed: int = 0) -> pd.DataFrame:
    """How much each head's OV circuit copies: the token-to-logit map ``W_E W_V W_O W_U``
    (Elhage et al. 2021) read directly from the weights, norm weights folded in, norm scales and
    everything between embedding and head ignored (a first-order, layer-0 view for later heads).

    ``ov_eigen``: the sum of its eigenvalues over the sum of their absolute values, in [-1, 1]
    (+1: a pure copying map, -1: anti-copying, ~0: neither); computed from the d_head x d_head
    matrix ``W_O W_U W_E W_V``, which has the same non-zero eigenvalues. ``ov_top1`` / ``ov_top5``:
    the share of ``n_tokens`` seeded non-special tokens whose own logit is the largest (in the top
    5) of the vocabulary in their row of the map (ARENA's "full OV circuit" test); chance is
    1 / vocab and 5 / vocab.
    """
    check_int("n_tokens", n_tokens, 1)
    check_seed(seed)
    chosen = _check_heads(model, heads)
    from sinkinterp.data import _allowed_ids

    allowed = _allowed_ids(model)
    generator = torch.Generator().manual_seed(seed)
    sample = allowed[torch.randperm(len(allowed), generator=generator)[: min(n_tokens, len(allowed))]]
    w_e = model.W_E.detach().double()
    w_u = _unembed(model)
    ue = w_u @ w_e  # [d_model d_model]: unembed after embed, summed over the vocabulary
    rows = []
    with torch.no_grad():
        for layer, head in chosen:
            w_v, w_o = _head_ov(model, layer, head)
            eigen = torch.linalg.eigvals(w_o @ ue @ w_v)
            circuit = (w_e[sample] @ w_v) @ (w_o @ w_u)  # [tokens vocab]
            own = circuit.gather(1, sample[:, None])
            rank = (circuit > own).sum(dim=1)  # how many logits beat the token's own
            rows.append({"layer": layer, "head": head,
                         "ov_eigen": float(eigen.real.sum() / eigen.abs().sum().clamp(min=1e-30)),
                         "ov_top1": float((rank == 0).double().mean()),
                         "ov_top5": float((rank < 5).double().mean())})
    frame = pd.DataFrame(rows)
    frame.attrs.update(n_tokens=len(sample), seed=seed)
    return frame


def logit_attribution(model, tokens: Int[Tensor, "batch pos"], rows: Tensor, queries: Tensor, targets: Tensor,
                      *, batch_size: int = 4) -> Tensor:
    """Direct logit attribution per step and head: ``[steps, layers, heads]``, each head's output
    at (row, query) (``z W_O``) through the final norm, with the norm's scale as measured in that
    forward pass (the linearisation everyone uses), onto the unembedding of ``tokens[row, target]``
    minus the mean unembedding (the logit's move against the average token). Adding the other
    components' terms would give the logit; a head's term is its direct effect only (what later
    layers do with its output is not counted)."""
    n_layers = model.cfg.n_layers
    centre = getattr(model.cfg, "normalization_type", "RMS") in ("LN", "LNPre")
    w_u = _unembed(model).float()
    w_u = w_u - w_u.mean(dim=1, keepdim=True)
    out = torch.zeros(len(rows), n_layers, model.cfg.n_heads)
    device = next(model.parameters()).device
    w_o = [model.blocks[l].attn.W_O.detach().float() for l in range(n_layers)]
    for start in range(0, tokens.shape[0], batch_size):
        chosen = torch.nonzero((rows >= start) & (rows < start + batch_size), as_tuple=True)[0]
        if not len(chosen):
            continue
        r, q = (rows[chosen] - start).to(device), queries[chosen].to(device)
        kept: dict[str, Tensor] = {}

        def keep(x: Tensor, hook) -> None:
            kept[hook.name] = x[r, q].detach().float()

        hooks = [(f"blocks.{l}.attn.hook_z", keep) for l in range(n_layers)] + [("ln_final.hook_scale", keep)]
        with torch.inference_mode(), model.hooks(fwd_hooks=hooks):
            model(tokens[start : start + batch_size].to(device), return_type=None)
        scale = kept["ln_final.hook_scale"]  # [steps 1]
        direction = w_u[:, tokens[rows[chosen], targets[chosen]].to(device)].T  # [steps d_model]
        for layer in range(n_layers):
            written = torch.einsum("shd,hdm->shm", kept[f"blocks.{layer}.attn.hook_z"], w_o[layer])
            if centre:
                written = written - written.mean(dim=-1, keepdim=True)
            out[chosen, layer] = torch.einsum("shm,sm->sh", written / scale[:, None], direction).cpu()
    return out


def copying_evidence(model, table: pd.DataFrame | None = None, *, k: int = 5, seed: int = 0, n_seqs: int = 16,
                     half_len: int = 64, n_prompts: int = 8, context_len: int = 512, n_tokens: int = 200,
                     batch_size: int = 4) -> pd.DataFrame:
    """Weights-and-activations evidence that heads copy, for every head: the OV copying scores
    (:func:`ov_copying_scores`) and the mean direct logit attribution to the correct next token
    on held-out data (seeds ``seed + 1000`` on, as :func:`validate_heads`): ``dla_induction`` on
    the second half of repeated random tokens, ``dla_needle`` on the teacher-forced reproduction
    of the needle (``n_prompts`` prompts of ``context_len`` tokens; 0 skips it, for models without a
    tokenizer). With ``table`` (from :func:`classify_heads`), ``role`` marks the top-``k``
    induction and recall heads, so they can be compared with the rest (``attrs["by_role"]``:
    medians per role). A copying head should have a positive OV eigenvalue score and a positive
    direct effect on the token it copies; attention alone shows neither.
    """
    check_int("k", k, 1)
    check_seed(seed)
    check_int("n_prompts", n_prompts, 0)
    top: dict[str, set] = {"induction": set(), "recall": set()}
    if table is not None:  # checked before any forward pass
        if not isinstance(table, pd.DataFrame):
            raise SinkInterpError(f"table must be the DataFrame from classify_heads or None, got {type(table).__name__}")
        for label in ("recall", "induction"):
            if label not in table.columns:
                raise SinkInterpError(f"the table has no {label!r} score: classify with that scorer first")
        top = {label: set(top_heads(table, label, k)) for label in top}
    frame = ov_copying_scores(model, n_tokens=n_tokens, seed=seed)
    eval_seed = seed + 1000

    def per_head(values: Tensor, step_rows: Tensor, n: int) -> list[float]:
        """Mean over steps within each sequence, then over sequences, per (layer, head) row of frame."""
        sums = torch.zeros(n, *values.shape[1:]).index_add_(0, step_rows, values)
        means = sums / torch.bincount(step_rows, minlength=n).clamp(min=1)[:, None, None]
        return [float(means[:, l, h].mean()) for l, h in zip(frame["layer"], frame["head"])]

    repeated = _repeated(model, n_seqs, half_len, eval_seed)
    steps = repeated.induction_steps()
    frame["dla_induction"] = per_head(logit_attribution(model, repeated.tokens, *steps, batch_size=batch_size),
                                      steps[0], n_seqs)
    data: dict[str, Any] = {"repeated": {"n_seqs": n_seqs, "half_len": half_len, "seed": eval_seed}}
    columns = ["ov_eigen", "ov_top1", "dla_induction"]
    if n_prompts:
        needle = needle_prompts(model, n_prompts, context_len, seed=eval_seed)
        steps = needle.answer_steps()
        frame["dla_needle"] = per_head(logit_attribution(model, needle.tokens, *steps, batch_size=batch_size),
                                       steps[0], n_prompts)
        data["needle"] = needle.to_dict()
        columns.append("dla_needle")
    frame["role"] = ["+".join(label for label in ("induction", "recall") if (int(l), int(h)) in top[label]) or "other"
                     for l, h in zip(frame["layer"], frame["head"])]
    frame.attrs.update(
        k=k, seed=seed, n_tokens=n_tokens, data=data,
        by_role=frame.groupby("role")[columns].median().reset_index().to_dict(orient="records"),
    )
    return frame


# --------------------------------------------------------------------------------------------
# Causal validation: ablate the top recall heads, the top induction heads, and random heads


def _step_metrics(model, tokens: Tensor, rows: Tensor, queries: Tensor, targets: Tensor, *,
                  interventions=(), batch_size: int = 4) -> dict[str, Tensor]:
    """Per-row mean next-token loss and top-1 accuracy at the steps (row, query) predicting
    ``tokens[row, target]``. Only those queries are unembedded (where the model can stop before
    its unembedding)."""
    from sinkinterp.interventions import intervene

    n = tokens.shape[0]
    loss = torch.zeros(n, dtype=torch.float64)
    accuracy = torch.zeros(n, dtype=torch.float64)
    count = torch.bincount(rows, minlength=n).double()
    device = next(model.parameters()).device
    with torch.inference_mode(), intervene(model, *interventions):
        for start in range(0, n, batch_size):
            chosen = (rows >= start) & (rows < start + batch_size)
            r, q, t = rows[chosen], queries[chosen], targets[chosen]
            batch = tokens[start : start + batch_size].to(device)
            if is_hooked_transformer(model):
                resid = model(batch, stop_at_layer=model.cfg.n_layers)
                logits = final_logits(model, resid[(r - start).to(device), q.to(device)][None])[0]
            else:
                logits = model(batch)[(r - start).to(device), q.to(device)]
            logits = logits.float()
            want = tokens[r, t].to(device)
            step_loss = torch.logsumexp(logits, dim=-1) - logits.gather(-1, want[:, None])[:, 0]
            loss.index_add_(0, r, step_loss.double().cpu())
            accuracy.index_add_(0, r, (logits.argmax(dim=-1) == want).double().cpu())
    return {"loss": loss / count, "accuracy": accuracy / count}


def _task_metrics(model, needle: NeedlePrompts, repeated: RepeatedTokens, interventions, batch_size: int
                  ) -> dict[str, Tensor]:
    rows, queries, targets = needle.answer_steps()
    out = _step_metrics(model, needle.tokens, rows, queries, targets, interventions=interventions,
                        batch_size=batch_size)
    induction = _step_metrics(model, repeated.tokens, *repeated.induction_steps(), interventions=interventions,
                              batch_size=batch_size)
    return {"needle_loss": out["loss"], "needle_accuracy": out["accuracy"], "induction_loss": induction["loss"]}


METRIC_NAMES = ("needle_loss", "needle_accuracy", "induction_loss")


@dataclass(frozen=True)
class HeadValidation:
    """Result of :func:`validate_heads`. ``conditions`` maps a condition to its ablated heads;
    ``per_seq[condition][metric]`` holds per-prompt (needle) or per-sequence (induction) values;
    the random condition is the mean over ``n_random`` draws, each also kept as ``random-<i>``;
    with ``per_head``, each head of the two sets ablated alone is ``alone-L<l>H<h>``."""

    k: int
    ablation: str
    sets: str
    conditions: dict[str, tuple[tuple[int, int], ...]]
    per_seq: dict[str, dict[str, list[float]]]
    n_resamples: int
    seed: int
    data: dict[str, Any]
    match: str = "none"  # how the random sets were drawn: 'layer' (matched to the induction set) or 'none'

    def estimates(self) -> pd.DataFrame:
        """Per condition and metric: mean with CI, and the paired difference to clean with CI."""
        from sinkinterp.experiments.stats import bootstrap_mean, paired_difference

        rows = []
        for condition, metrics in self.per_seq.items():
            for metric, values in metrics.items():
                value = bootstrap_mean(values, n_resamples=self.n_resamples, seed=self.seed)
                row = {"condition": condition, "metric": metric, "value": value.value, "low": value.low,
                       "high": value.high}
                if condition != "clean":
                    delta = paired_difference(values, self.per_seq["clean"][metric],
                                              n_resamples=self.n_resamples, seed=self.seed)
                    row.update(delta=delta.value, delta_low=delta.low, delta_high=delta.high)
                rows.append(row)
        return pd.DataFrame(rows)

    def dissociation(self) -> dict[str, Any]:
        """The double dissociation: on the needle task, recall ablation hurts more than induction
        ablation (and than random); on repeated tokens, induction ablation hurts more than recall
        ablation (and than random). Differences of deltas are paired over the same sequences."""
        from sinkinterp.experiments.stats import paired_difference

        def gap(metric: str, a: str, b: str) -> dict[str, float]:
            est = paired_difference(self.per_seq[a][metric], self.per_seq[b][metric],
                                    n_resamples=self.n_resamples, seed=self.seed)
            return est.to_dict()

        if set(self.conditions["recall"]) == set(self.conditions["induction"]):
            # Identical sets: every recall - induction gap is exactly 0 by construction, not evidence.
            return {"testable": False, "holds": None,
                    "why": f"the top {self.k} recall and induction heads are the same heads; try sets='exclusive' "
                           "or another k"}
        record = {
            "testable": True,
            "needle_loss: recall - induction": gap("needle_loss", "recall", "induction"),
            "needle_loss: recall - random": gap("needle_loss", "recall", "random"),
            "induction_loss: induction - recall": gap("induction_loss", "induction", "recall"),
            "induction_loss: induction - random": gap("induction_loss", "induction", "random"),
        }
        record["holds"] = bool(record["needle_loss: recall - induction"]["low"] > 0
                               and record["induction_loss: induction - recall"]["low"] > 0)
        return record

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "ablation": self.ablation,
            "sets": self.sets,
            "conditions": {name: [list(p) for p in heads] for name, heads in self.conditions.items()},
            "estimates": self.estimates().to_dict(orient="records"),
            "dissociation": self.dissociation(),
            "per_seq": self.per_seq,
            "n_resamples": self.n_resamples,
            "seed": self.seed,
            "match": self.match,
            "data": self.data,
        }

    def __str__(self) -> str:
        frame = self.estimates()
        lines = [f"Causal validation: {self.ablation}-ablate k={self.k} heads per condition ({self.sets} sets; "
                 f"random sets {'layer-matched to the induction set' if self.match == 'layer' else 'unmatched'}) "
                 f"(95% paired bootstrap CIs, {self.n_resamples} resamples)"]
        for condition in [c for c in self.per_seq if not c.startswith(("random-", "alone-"))]:
            heads = ", ".join(_head_name(*p) for p in self.conditions.get(condition, ()))
            lines.append(f"  {condition}{f' [{heads}]' if heads else ''}")
            for row in frame[frame.condition == condition].itertuples():
                text = f"    {row.metric:<16} {row.value:.3f} [{row.low:.3f}, {row.high:.3f}]"
                if condition != "clean":
                    text += f"   delta {row.delta:+.3f} [{row.delta_low:+.3f}, {row.delta_high:+.3f}]"
                lines.append(text)
        alone = [c for c in self.per_seq if c.startswith("alone-")]
        if alone:
            lines.append("  one head at a time (delta vs clean):")
            for condition in alone:
                rows = frame[frame.condition == condition].set_index("metric")
                cells = "   ".join(f"{m} {rows.loc[m, 'delta']:+.3f} [{rows.loc[m, 'delta_low']:+.3f}, "
                                   f"{rows.loc[m, 'delta_high']:+.3f}]" for m in ("needle_loss", "induction_loss"))
                lines.append(f"    {condition[len('alone-'):]:<8} {cells}")
        diss = self.dissociation()
        if not diss["testable"]:
            lines.append(f"  double dissociation: not testable ({diss['why']})")
            return "\n".join(lines)
        lines.append(f"  double dissociation: {'holds' if diss['holds'] else 'does not hold'}")
        for key, value in diss.items():
            if key not in ("holds", "testable"):
                lines.append(f"    {key:<38} {value['value']:+.3f} [{value['low']:+.3f}, {value['high']:+.3f}]")
        return "\n".join(lines)


def _layer_matched(pool: list[tuple[int, int]], reference: list[tuple[int, int]], rng: random.Random
                   ) -> tuple[tuple[int, int], ...]:
    """One random head from ``pool`` per reference head, in the same layer where one is left, else in
    the nearest layer that has one (ties: the lower layer)."""
    left = list(pool)
    chosen = []
    for layer, _ in reference:
        nearest = min(abs(l - layer) for l, _ in left)
        candidates = [p for p in left if abs(p[0] - layer) == nearest]
        candidates = [p for p in candidates if p[0] == min(c[0] for c in candidates)]
        pick = rng.choice(candidates)
        chosen.append(pick)
        left.remove(pick)
    return tuple(sorted(chosen))


def validate_heads(
    model,
    table: pd.DataFrame,
    *,
    k: int = 5,
    n_random: int = 5,
    ablation: str = "mean",
    sets: str = "top",
    seed: int = 0,
    n_prompts: int = 16,
    context_len: int = 512,
    n_seqs: int = 16,
    half_len: int = 64,
    n_reference: int = 16,
    batch_size: int = 4,
    n_resamples: int = 2000,
    per_head: bool = False,
    match: str = "layer",
) -> HeadValidation:
    """Ablate the top-``k`` recall heads, the top-``k`` induction heads and ``n_random`` seeded
    draws of ``k`` other heads (none of either top set); measure the needle reproduction loss and
    accuracy (teacher-forced) and the induction loss on repeated random tokens (second half).
    With ``per_head``, also each head of the two sets alone (one-head-at-a-time ablation, as in
    ARENA: a set's effect can be one head's, or need several together).
    ``match="layer"`` (default) draws each random set layer-matched to the induction set: for each of
    its heads, a random other head of the same layer (the nearest layer with one left, if none);
    ``"none"`` draws ``k`` heads uniformly from the rest.

    ``sets="exclusive"`` takes the top-``k`` recall heads among those *not* labelled induction and
    the top-``k`` induction heads among those not labelled recall: when the two scores pick the
    same heads (copying on repeated tokens and copying a needle look alike), only the exclusive
    sets can dissociate. The data are held out from the classification: seeds ``seed + 1000`` on. ``ablation``:
    ``"mean"`` (default) replaces each head's output at queries i >= 1 by its mean over
    ``n_reference`` corpus windows, so only what the head reads from its input is removed;
    ``"zero"`` also removes the constant it writes, which for a sink-dominated head is the sink's
    value, known to cost loss by itself.
    """
    from sinkinterp.experiments.stats import _check_options
    from sinkinterp.interventions import AblateHeads

    if not isinstance(table, pd.DataFrame):
        raise SinkInterpError(f"validate_heads takes the table from classify_heads, got {type(table).__name__}")
    check_seed(seed)
    _check_options(n_resamples, 0.95)
    if ablation not in ("mean", "zero"):
        raise SinkInterpError(f"ablation {ablation!r} is not one of 'mean', 'zero'")
    for label in ("recall", "induction"):
        if label not in table.columns:
            raise SinkInterpError(f"the table has no {label!r} score: classify with that scorer first")
    check_int("n_random", n_random, 1)
    check_bool("per_head", per_head)
    if match not in ("layer", "none"):
        raise SinkInterpError(f"match {match!r} is not one of 'layer', 'none'")
    if sets not in ("top", "exclusive"):
        raise SinkInterpError(f"sets {sets!r} is not one of 'top', 'exclusive'")
    everyone = [(int(l), int(h)) for l, h in zip(table["layer"], table["head"])]
    if sets == "top":
        recall, induction = top_heads(table, "recall", k), top_heads(table, "induction", k)
    else:
        thresholds = _check_thresholds(table.attrs.get("thresholds"))
        recall = top_heads(table[table["induction"] <= thresholds["induction"]], "recall", k)
        induction = top_heads(table[table["recall"] <= thresholds["recall"]], "induction", k)
    pool = [p for p in everyone if p not in set(recall) | set(induction)]
    if len(pool) < k:
        raise SinkInterpError(f"k = {k}: only {len(pool)} heads are outside the top recall and induction sets, "
                              f"too few for a random draw of {k}")
    if match == "none":
        draws = [tuple(sorted(random.Random(seed * 1000 + i).sample(pool, k))) for i in range(n_random)]
    else:
        draws = [_layer_matched(pool, induction, random.Random(seed * 1000 + i)) for i in range(n_random)]

    eval_seed = seed + 1000
    needle = needle_prompts(model, n_prompts, context_len, seed=eval_seed)
    repeated = _repeated(model, n_seqs, half_len, eval_seed)
    means = None
    if ablation == "mean":
        reference = corpus_windows(model, n_reference, 128, seed=eval_seed)
        means = AblateHeads.fit(model, reference, heads=everyone)

    def ablate(heads) -> list:
        if means is None:
            return [AblateHeads(heads=heads, mode="zero")]
        index = [everyone.index(p) for p in heads]
        return [AblateHeads(heads=heads, mode="mean", value=[means.value[i] for i in index])]

    conditions = {"clean": (), "recall": tuple(recall), "induction": tuple(induction)}
    conditions.update({f"random-{i}": draw for i, draw in enumerate(draws)})
    if per_head:
        conditions.update({f"alone-{_head_name(*pair)}": (pair,) for pair in dict.fromkeys(recall + induction)})
    per_seq: dict[str, dict[str, list[float]]] = {}
    for name, heads in conditions.items():
        metrics = _task_metrics(model, needle, repeated, ablate(heads) if heads else [], batch_size)
        per_seq[name] = {m: metrics[m].tolist() for m in METRIC_NAMES}
    per_seq["random"] = {
        m: torch.tensor([per_seq[f"random-{i}"][m] for i in range(n_random)]).mean(dim=0).tolist()
        for m in METRIC_NAMES
    }
    return HeadValidation(
        k=k, ablation=ablation, sets=sets, conditions=conditions, per_seq=per_seq, n_resamples=n_resamples, seed=seed,
        match=match, data={"needle": needle.to_dict(), "repeated": {"n_seqs": n_seqs, "half_len": half_len, "seed": eval_seed},
              "reference": None if means is None else {"n_seqs": n_reference, "seq_len": 128, "seed": eval_seed}},
    )
