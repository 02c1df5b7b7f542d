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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from sinkinterp._batches import check_int, check_tokens, progress_bar
from sinkinterp.backends import Model
from sinkinterp.errors import SinkInterpError
from sinkinterp.interventions import Intervention, intervene

__all__ = ["evaluate", "Evaluation", "EVALUATE_METRICS", "log_probs", "token_metrics"]

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
    return {k: v.cpu() for k, v in out.items()}


def _check_metrics(metrics) -> tuple[str, ...]:
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [m for m in metrics if m not in EVALUATE_METRICS]
    if unknown or not metrics:
        raise SinkInterpError(f"metrics {list(metrics)!r}: choose from {', '.join(EVALUATE_METRICS)}")
    return tuple(dict.fromkeys(("loss", *metrics)))  # loss always, in a fixed order


def evaluate(
    model: Model,
    tokens: Int[Tensor, "*batch pos"],
    *interventions,
    metrics: Sequence[str] = ("loss",),
    from_query: int = 0,
    batch_size: int = 8,
    progress: bool | None = None,
) -> Evaluation:
    """Per-sequence ``metrics`` of ``model`` on ``tokens`` with ``interventions`` applied together.

    - ``loss``: mean next-token cross-entropy (nats) over queries i >= ``from_query``;
    - ``kl``: mean KL(clean || intervened) of the next-token distributions there (the clean run is
      computed batch by batch alongside; 0 without interventions);
    - ``accuracy``: the fraction of those queries whose top-1 prediction is the next token.

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
    want_kl = "kl" in metrics and bool(interventions)
    parts: dict[str, list[Tensor]] = {m: [] for m in metrics}
    starts = range(0, tokens.shape[0], batch_size)
    show = len(starts) > 1 if progress is None else progress
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in progress_bar()(starts, desc="evaluate", unit="batch", disable=not show):
            rows = tokens[start:start + batch_size].to(device)
            clean = None
            if want_kl:
                clean = log_probs(model(rows)[:, from_query:-1])
            with intervene(model, *interventions):
                logits = model(rows)[:, from_query:-1]
            values = token_metrics(logits, rows, from_query, metrics, clean)  # kl is 0 without a clean run
            for name in metrics:
                parts[name].append(values[name])
    return Evaluation(values={m: torch.cat(parts[m]) for m in metrics}, from_query=from_query,
                      interventions=tuple(iv.to_dict() for iv in interventions))
