"""Per-sequence statistics with seeded percentile-bootstrap confidence intervals.

Experiments compare conditions on the *same* evaluation sequences, so every interval that
involves two or more conditions resamples sequence indices once and applies them to all of them
(a paired bootstrap): the variation between sequences, which all conditions share, cancels.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from sinkinterp._batches import check_seed
from sinkinterp.errors import SinkInterpError

#: Most bootstrap resamples: each resample holds a row of n sequence indices (int64) and values.
MAX_RESAMPLES = 100_000

__all__ = ["Estimate", "bootstrap_mean", "bootstrap_statistic", "paired_difference", "recovery_fraction"]


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap interval ``[low, high]`` at ``confidence``."""

    value: float
    low: float
    high: float
    confidence: float = 0.95

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high, "confidence": self.confidence}

    def __str__(self) -> str:
        if math.isnan(self.value):
            return "undefined"
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"


def _as_float64(values, name: str) -> Tensor:
    try:
        return torch.as_tensor(values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise SinkInterpError(f"{name} must be numbers (a list or tensor), got {type(values).__name__}") from None


def _check(values, name: str) -> Tensor:
    x = _as_float64(values, name)
    if x.dim() != 1:
        raise SinkInterpError(f"{name} must hold one number per sequence (1-D), got shape {tuple(x.shape)}")
    if x.numel() < 2:
        raise SinkInterpError(f"{name} has {x.numel()} values: a bootstrap needs at least 2 sequences")
    if not bool(torch.isfinite(x).all()):
        raise SinkInterpError(f"{name} holds non-finite values")
    return x


def check_bootstrap_options(n_resamples: int, confidence: float) -> None:
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or not 100 <= n_resamples <= MAX_RESAMPLES:
        raise SinkInterpError(f"n_resamples must be an integer in 100..{MAX_RESAMPLES}, got {n_resamples!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise SinkInterpError(f"confidence {confidence!r} is outside (0, 1)")


def _resample(n: int, n_resamples: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(check_seed(seed))
    return torch.randint(n, (n_resamples, n), generator=generator)


def _interval(point: float, draws: Tensor, confidence: float) -> Estimate:
    alpha = (1 - confidence) / 2
    finite = draws[torch.isfinite(draws)]
    if math.isnan(point) or finite.numel() == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), confidence)
    low, high = torch.quantile(finite, torch.tensor([alpha, 1 - alpha], dtype=finite.dtype)).tolist()
    return Estimate(point, low, high, confidence)


def _paired(*arrays: tuple[str, object]) -> list[Tensor]:
    tensors = [_check(values, name) for name, values in arrays]
    lengths = {t.numel() for t in tensors}
    if len(lengths) != 1:
        sizes = ", ".join(f"{name} {t.numel()}" for (name, _), t in zip(arrays, tensors))
        raise SinkInterpError(f"paired statistics need one value per sequence in each condition, got {sizes}")
    return tensors


def bootstrap_mean(values: Float[Tensor, " seq"] | list, *, n_resamples: int = 2000,
                   confidence: float = 0.95, seed: int = 0) -> Estimate:
    """Mean over sequences with a percentile-bootstrap interval (seeded)."""
    check_bootstrap_options(n_resamples, confidence)
    x = _check(values, "values")
    draws = x[_resample(x.numel(), n_resamples, seed)].mean(dim=1)
    return _interval(float(x.mean()), draws, confidence)


def paired_difference(values, baseline, *, n_resamples: int = 2000, confidence: float = 0.95,
                      seed: int = 0) -> Estimate:
    """``mean(values) - mean(baseline)`` over the same sequences, with a paired interval."""
    check_bootstrap_options(n_resamples, confidence)
    x, base = _paired(("values", values), ("baseline", baseline))
    diff = x - base
    draws = diff[_resample(diff.numel(), n_resamples, seed)].mean(dim=1)
    return _interval(float(diff.mean()), draws, confidence)


def recovery_fraction(clean, broken, repaired, *, n_resamples: int = 2000, confidence: float = 0.95,
                      seed: int = 0, min_gap: float = 1e-9) -> Estimate:
    """``(loss_broken - loss_repaired) / (loss_broken - loss_clean)`` with a paired interval.

    1 means the repair restores the clean loss, 0 that it does nothing, below 0 that it makes
    things worse. Undefined (NaN) when breaking changes the mean loss by less than ``min_gap``;
    resamples whose gap is that small are left out of the interval.
    """
    check_bootstrap_options(n_resamples, confidence)
    if isinstance(min_gap, bool) or not isinstance(min_gap, (int, float)) or not 0 <= min_gap < math.inf:
        raise SinkInterpError(f"min_gap must be a number >= 0, got {min_gap!r}")
    c, b, r = _paired(("clean", clean), ("broken", broken), ("repaired", repaired))

    def ratio(c_mean: Tensor, b_mean: Tensor, r_mean: Tensor) -> Tensor:
        gap = b_mean - c_mean
        return torch.where(gap.abs() > min_gap, (b_mean - r_mean) / gap, torch.nan)

    index = _resample(c.numel(), n_resamples, seed)
    draws = ratio(c[index].mean(1), b[index].mean(1), r[index].mean(1))
    point = float(ratio(c.mean(), b.mean(), r.mean()))
    return _interval(point, draws, confidence)


def bootstrap_statistic(statistic: Callable[..., Tensor], *arrays, n_resamples: int = 2000,
                        confidence: float = 0.95, seed: int = 0) -> Estimate:
    """Any statistic of per-sequence arrays (dim 0 = sequence), resampling the same sequences in
    all of them. ``statistic`` gets the arrays with a leading resample dimension, [R, n, ...],
    and returns [R]; the point estimate is the statistic of the data itself (R = 1)."""
    check_bootstrap_options(n_resamples, confidence)
    if not callable(statistic):
        raise SinkInterpError(f"statistic must be a function of the resampled arrays, got {statistic!r}")
    tensors = [_as_float64(a, f"array {i}") for i, a in enumerate(arrays)]
    for i, t in enumerate(tensors):
        if not bool(torch.isfinite(t).all()):
            raise SinkInterpError(f"array {i} holds non-finite values")
    sizes = {t.shape[0] if t.dim() else 0 for t in tensors}
    if len(sizes) != 1:
        raise SinkInterpError(f"bootstrap_statistic needs one row per sequence in every array, got sizes {sorted(sizes)}")
    n = sizes.pop()
    if n < 2:
        raise SinkInterpError(f"a bootstrap needs at least 2 sequences, got {n}")
    point = statistic(*[t[None] for t in tensors])
    if not isinstance(point, Tensor) or tuple(point.shape) != (1,):
        shape = tuple(point.shape) if isinstance(point, Tensor) else type(point).__name__
        raise SinkInterpError(f"statistic must return one number per resample, shape [R]; for R = 1 it returned {shape}")
    point = float(point[0])
    index = _resample(n, n_resamples, seed)
    draws = statistic(*[t[index] for t in tensors]).to(torch.float64)
    return _interval(point, draws, confidence)
