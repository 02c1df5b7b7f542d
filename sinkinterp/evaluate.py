"""Per-sequence loss, KL and accuracy under interventions: what every causal comparison starts from.

>>> clean = evaluate(model, tokens, from_query=16)
>>> masked = evaluate(model, tokens, MaskSinkKey(), metrics=("loss", "kl"), from_query=16)
>>> paired_difference(masked.loss, clean.loss)        # mean difference with a paired 95% interval

Each metric is a mean over the queries i >= ``from_query`` of one sequence (query i predicts token
i + 1), so it has one value per sequence and paired statistics across conditions apply
(:func:`sinkinterp.experiments.paired_difference`, :func:`~sinkinterp.experiments.recovery_fraction`).
The experiment runner computes its numbers the same way (``loss_from`` in a spec is ``from_query``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from sinkinterp._batches import check_int, check_tokens, progress_bar
from sinkinterp._registry import add_entry
from sinkinterp.backends import (
    Model,
    attention_windows,
    final_logits,
    is_hooked_transformer,
)
from sinkinterp.errors import SinkInterpError
from sinkinterp.interventions import Intervention, intervene
from sinkinterp.measure import alpha_at

__all__ = ["evaluate", "Evaluation", "Evaluator", "Metric", "METRICS", "register_metric", "EVALUATE_METRICS",
           "log_probs", "token_metrics", "step_metrics"]


@dataclass(frozen=True)
class Metric:
    """A per-sequence metric of a condition.

    ``compute(logits, targets)`` takes float32 logits ``[batch, query, vocab]`` of the scored
    queries and their next tokens ``[batch, query]``, and returns one number per sequence
    ``[batch]`` (a mean over the queries, so paired statistics apply). The built-in ``loss``,
    ``kl`` and ``accuracy`` are computed by :func:`token_metrics` itself (``compute`` None);
    ``from_alpha`` metrics (the sink ratios) are computed by the experiment runner from the
    first-token attention it records.
    """

    name: str
    compute: Callable[[Tensor, Tensor], Tensor] | None = field(default=None, compare=False)
    description: str = ""
    higher_is_better: bool = False
    """Which way is "damage": up for a loss, down for an accuracy (controls and draws use it)."""
    from_alpha: bool = False


#: Every metric by name: what ``evaluate(metrics=...)`` and a spec's ``metrics:`` accept.
METRICS: dict[str, Metric] = {}


def register_metric(name: str, compute: Callable[[Tensor, Tensor], Tensor], *, description: str = "",
                    higher_is_better: bool = False) -> Metric:
    """Add a per-sequence metric (see :class:`Metric`); a second metric of the same name is refused.

    >>> register_metric("top5", lambda logits, targets: (logits.topk(5).indices == targets[..., None])
    ...                 .any(-1).double().mean(-1), higher_is_better=True)
    """
    if compute is None:
        raise SinkInterpError(f"metric {name!r}: compute must be a function (logits, targets) -> [batch]")
    return add_entry(METRICS, "metric", name, Metric(name, compute, description, bool(higher_is_better)),
                     example="top5", compute=compute, compute_is="a function (logits, targets) -> [batch]")


for _metric in (
    Metric("loss", None, "mean next-token cross-entropy (nats)"),
    Metric("kl", None, "mean KL(clean || intervened) of the next-token distributions"),
    Metric("accuracy", None, "share of queries whose top-1 prediction is the next token", higher_is_better=True),
    Metric("sink_ratio", None, "Gu et al.'s Sink_0^eps: each sequence's alpha thresholded, then averaged",
           from_alpha=True),
    Metric("sink_ratio_of_mean", None, "share of heads whose sequence-averaged alpha passes eps", from_alpha=True),
):
    METRICS[_metric.name] = _metric

#: The metrics :func:`evaluate` computes without registered ones: loss, KL, accuracy.
EVALUATE_METRICS = ("loss", "kl", "accuracy")


@dataclass(frozen=True)
class Evaluation:
    """Per-sequence metrics of one condition: ``values[name]`` is float64 ``[n_seqs]``."""

    values: dict[str, Float[Tensor, " seq"]]
    from_query: int
    interventions: tuple[dict[str, Any], ...]
    """The interventions' records (``Intervention.to_dict``): what was evaluated."""

    def __getattr__(self, name: str) -> Tensor:
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        if name in EVALUATE_METRICS:
            raise SinkInterpError(f"{name!r} was not computed: pass metrics=(..., {name!r}) to evaluate")
        raise AttributeError(name)

    @property
    def n_seqs(self) -> int:
        return len(next(iter(self.values.values())))

    def mean(self) -> dict[str, float]:
        return {name: float(v.mean()) for name, v in self.values.items()}

    def to_frame(self) -> pd.DataFrame:
        """One row per sequence, one column per metric."""
        frame = pd.DataFrame({name: v.numpy() for name, v in self.values.items()})
        frame.index.name = "seq"
        return frame

    def to_dict(self) -> dict[str, Any]:
        return {"from_query": self.from_query, "interventions": list(self.interventions),
                "per_sequence": {name: v.tolist() for name, v in self.values.items()}}

    def __repr__(self) -> str:
        means = ", ".join(f"{name} {value:.4f}" for name, value in self.mean().items())
        kinds = ", ".join(r["type"] for r in self.interventions) or "clean"
        return f"Evaluation({kinds}; {self.n_seqs} seqs, queries >= {self.from_query}; mean {means})"


def log_probs(logits: Tensor) -> Tensor:
    """float32 log-probabilities, computed the one way every KL here uses (so clean vs clean is 0)."""
    logits = logits.float()
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


def token_metrics(logits: Tensor, tokens: Tensor, from_query: int, metrics: Iterable[str],
                  clean_logprobs: Tensor | None = None) -> dict[str, Tensor]:
    """Per-sequence means over query positions i >= ``from_query`` (predicting token i + 1).

    ``logits`` covers those queries only ([batch, pos - 1 - from_query, vocab]); ``clean_logprobs``
    likewise, for the KL divergence KL(clean || this run). Means are float64. Loss is
    ``logsumexp(logits) - logit[target]``, so no log-softmax tensor is built unless KL is asked for.
    """
    targets = tokens[:, from_query + 1:]
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    out = {"loss": (lse - logits.gather(-1, targets[..., None])[..., 0]).double().mean(dim=-1)}
    if "accuracy" in metrics:
        out["accuracy"] = (logits.argmax(dim=-1) == targets).double().mean(dim=-1)
    if "kl" in metrics:
        if clean_logprobs is None:
            out["kl"] = torch.zeros(tokens.shape[0], dtype=torch.float64)
        else:
            logprobs = log_probs(logits)
            kl = (clean_logprobs.exp() * (clean_logprobs - logprobs)).sum(dim=-1)
            out["kl"] = kl.double().mean(dim=-1)
    for name in metrics:
        metric = METRICS.get(name)
        if metric is not None and metric.compute is not None:
            value = metric.compute(logits, targets)
            if not isinstance(value, Tensor) or value.shape != (tokens.shape[0],):
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise SinkInterpError(f"metric {name!r} returned {got}; it must return one number per "
                                      f"sequence, shape ({tokens.shape[0]},)")
            out[name] = value.double()
    return {k: v.cpu() for k, v in out.items()}


def _check_metrics(metrics) -> tuple[str, ...]:
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    allowed = [name for name, m in METRICS.items() if not m.from_alpha]
    unknown = [m for m in metrics if m not in allowed]
    if unknown or not metrics:
        raise SinkInterpError(f"metrics {list(metrics)!r}: choose from {', '.join(allowed)}")
    return tuple(dict.fromkeys(("loss", *metrics)))  # loss always, in a fixed order


#: Above this many bytes the clean log-probabilities (for KL) are recomputed per batch, not kept.
CLEAN_CACHE_LIMIT = 2 * 1024**3


class Evaluator:
    """The evaluation engine: ``tokens`` run batch by batch under interventions, per-sequence
    metrics out. :func:`evaluate`, the experiment runner and :func:`~sinkinterp.heads.validate_heads`
    all compute their numbers here, so a condition's numbers are the same whichever asks.

    ``metrics``: names in :data:`METRICS` (``from_alpha`` ones are left to the caller, from the
    recorded ``alpha_first``). ``alpha``: also record, per sequence, alpha at the first token of
    every layer and head (``alpha_first`` ``[seq, layer, head]``), read after the interventions.
    The clean log-probabilities that KL needs come from a clean :meth:`run` (kept when they fit in
    ``CLEAN_CACHE_LIMIT`` bytes) or are recomputed batch by batch.
    """

    def __init__(self, model: Model, tokens: Int[Tensor, "batch pos"], *, metrics: Sequence[str] = ("loss",),
                 from_query: int = 0, batch_size: int = 8, alpha: bool = False):
        self.model, self.tokens, self.metrics = model, tokens, tuple(metrics)
        self.from_query, self.batch_size, self.alpha = from_query, batch_size, alpha
        size = tokens.shape[0] * (tokens.shape[1] - 1 - from_query) * model.cfg.d_vocab * 4
        self.keep_clean = "kl" in self.metrics and size <= CLEAN_CACHE_LIMIT
        self.clean_logprobs: dict[int, Tensor] = {}

    def batches(self) -> Iterator[tuple[int, Tensor]]:
        for begin in range(0, self.tokens.shape[0], self.batch_size):
            yield begin, torch.arange(begin, min(begin + self.batch_size, self.tokens.shape[0]))

    def _clean_lp(self, begin: int, batch: Tensor) -> Tensor | None:
        if "kl" not in self.metrics:
            return None
        if begin in self.clean_logprobs:
            return self.clean_logprobs[begin]
        return log_probs(self.model(batch)[:, self.from_query:-1])

    def _alpha_hooks(self, kept: dict[int, Tensor]) -> list:
        """Hooks that keep alpha at k = 0 ([batch head]) per layer, read after the interventions."""
        windows = attention_windows(self.model)

        def keeper(layer: int):
            def keep(pattern, hook):
                kept[layer] = alpha_at(pattern, 0, windows[layer]).cpu()
            return keep

        return [(f"blocks.{l}.attn.hook_pattern", keeper(l)) for l in range(self.model.cfg.n_layers)]

    def run(self, interventions: Sequence = (), *, first_token: Tensor | None = None, clean: bool = False,
            record_alpha: bool | None = None, progress: bool = False) -> dict[str, Tensor]:
        """Per-sequence metrics (float64 ``[n_seqs]``) under ``interventions`` applied together.

        ``interventions`` may include builders (``.build(model, rows)``, such as
        :class:`~sinkinterp.interventions.PerSequencePatch`) made per batch; ``first_token``
        ``[n_seqs]`` replaces each sequence's first token; ``clean=True`` marks the clean run (its
        log-probabilities become the KL reference). ``record_alpha`` (default: the engine's
        ``alpha``) adds ``alpha_first``."""
        out: dict[str, list[Tensor]] = {}
        alpha: list[Tensor] = []
        want_alpha = self.alpha if record_alpha is None else record_alpha
        device = next(self.model.parameters()).device
        batches = list(self.batches())
        with torch.inference_mode():
            for begin, rows in progress_bar()(batches, desc="evaluate", unit="batch", disable=not progress):
                targets = self.tokens[rows].to(device)
                batch = targets
                clean_lp = None if clean else self._clean_lp(begin, batch)
                if first_token is not None:
                    batch = batch.clone()
                    batch[:, 0] = first_token[rows].to(device)
                built = [iv.build(self.model, rows) if hasattr(iv, "build") else iv for iv in interventions]
                kept: dict[int, Tensor] = {}
                with intervene(self.model, *built):
                    logits = self.model.run_with_hooks(
                        batch, return_type="logits", fwd_hooks=self._alpha_hooks(kept) if want_alpha else [])
                if want_alpha:
                    alpha.append(torch.stack([kept[l] for l in range(self.model.cfg.n_layers)], dim=1))
                logits = logits[:, self.from_query:-1]
                if clean and "kl" in self.metrics:
                    clean_lp = log_probs(logits)
                    if self.keep_clean:
                        self.clean_logprobs[begin] = clean_lp
                for name, value in token_metrics(logits, targets, self.from_query, self.metrics, clean_lp).items():
                    out.setdefault(name, []).append(value)
        result = {name: torch.cat(parts) for name, parts in out.items()}
        if want_alpha:
            result["alpha_first"] = torch.cat(alpha)  # [seq layer head]
        return result


def step_metrics(model: Model, tokens: Tensor, rows: Tensor, queries: Tensor, targets: Tensor, *,
                 interventions: Sequence = (), batch_size: int = 4) -> dict[str, Tensor]:
    """Per-row mean next-token ``loss`` and top-1 ``accuracy`` at chosen steps: step k is query
    ``queries[k]`` of row ``rows[k]`` predicting ``tokens[rows[k], targets[k]]`` (a needle's answer,
    an induction target), rather than every query from ``from_query`` on. Only those queries are
    unembedded (where the model can stop before its unembedding). The engine behind
    ``evaluate(..., steps=...)`` and the head validation."""
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


def evaluate(
    model: Model,
    tokens: Int[Tensor, "*batch pos"],
    *interventions,
    metrics: Sequence[str] = ("loss",),
    from_query: int = 0,
    batch_size: int = 8,
    progress: bool | None = None,
    steps: tuple[Tensor, Tensor, Tensor] | None = None,
) -> Evaluation:
    """Per-sequence ``metrics`` of ``model`` on ``tokens`` with ``interventions`` applied together.

    - ``loss``: mean next-token cross-entropy (nats) over queries i >= ``from_query``;
    - ``kl``: mean KL(clean || intervened) of the next-token distributions there (the clean run is
      computed batch by batch alongside; 0 without interventions);
    - ``accuracy``: the fraction of those queries whose top-1 prediction is the next token.

    ``steps=(rows, queries, targets)`` scores chosen steps instead (see :func:`step_metrics`):
    loss and accuracy only, one mean per row over its steps.

    ``tokens`` are unpadded rows of equal length. ``from_query`` must leave at least one
    prediction (``from_query <= seq_len - 2``); an intervention that would act on no query of
    these inputs is refused rather than returning the clean numbers.
    """
    check_tokens(model, tokens)
    metrics = _check_metrics(metrics)
    check_int("batch_size", batch_size, 1)
    n_pos = tokens.shape[1]
    if isinstance(from_query, bool) or not isinstance(from_query, int) or not 0 <= from_query <= n_pos - 2:
        raise SinkInterpError(f"from_query {from_query!r} leaves no prediction in sequences of {n_pos} tokens: "
                              f"use 0..{n_pos - 2} (query i predicts token i + 1)")
    for intervention in interventions:
        if not isinstance(intervention, Intervention):
            raise SinkInterpError(f"evaluate takes Intervention values after the tokens, got "
                                  f"{type(intervention).__name__}")
    if steps is not None:
        other = sorted(set(metrics) - {"loss", "accuracy"})
        if other:
            raise SinkInterpError(f"evaluate(steps=...) computes loss and accuracy, not {other}")
        rows, queries, targets = steps
        values = step_metrics(model, tokens, rows, queries, targets, interventions=interventions, batch_size=batch_size)
        return Evaluation(values={m: values[m] for m in metrics}, from_query=from_query,
                          interventions=tuple(iv.to_dict() for iv in interventions))
    n_batches = -(-tokens.shape[0] // batch_size)
    show = n_batches > 1 if progress is None else progress
    engine = Evaluator(model, tokens, metrics=metrics, from_query=from_query, batch_size=batch_size)
    values = engine.run(interventions, clean=not interventions, progress=show)
    return Evaluation(values={m: values[m] for m in metrics}, from_query=from_query,
                      interventions=tuple(iv.to_dict() for iv in interventions))
