"""Bootstrap intervals and the recovery fraction on inputs whose answers are known."""

import math

import pytest
import torch

from sinkinterp import SinkInterpError
from sinkinterp.experiments import bootstrap_mean, paired_difference, recovery_fraction


def test_constant_values_give_a_zero_width_interval():
    estimate = bootstrap_mean([2.5] * 10)
    assert (estimate.value, estimate.low, estimate.high) == (2.5, 2.5, 2.5)


def test_interval_of_a_known_sample_matches_the_normal_approximation():
    values = torch.arange(100, dtype=torch.float64)  # mean 49.5, sd 29.01
    estimate = bootstrap_mean(values, n_resamples=4000, seed=1)
    half_width = 1.96 * float(values.std(correction=0)) / math.sqrt(100)  # 5.69
    assert estimate.value == 49.5
    assert estimate.low == pytest.approx(49.5 - half_width, abs=0.6)
    assert estimate.high == pytest.approx(49.5 + half_width, abs=0.6)
    wider = bootstrap_mean(values, n_resamples=4000, seed=1, confidence=0.99)
    assert wider.low < estimate.low and wider.high > estimate.high


def test_same_seed_same_interval_other_seed_other_draws():
    values = torch.randn(30, generator=torch.Generator().manual_seed(0))
    assert bootstrap_mean(values, seed=3) == bootstrap_mean(values, seed=3)
    assert bootstrap_mean(values, seed=3) != bootstrap_mean(values, seed=4)


def test_paired_difference_removes_the_variation_the_conditions_share():
    base = torch.randn(40, generator=torch.Generator().manual_seed(0)) * 10
    shifted = base + 0.5  # every sequence moves by exactly 0.5
    paired = paired_difference(shifted, base)
    assert (paired.value, paired.low, paired.high) == pytest.approx((0.5, 0.5, 0.5))
    # Unpaired, the same shift would be buried in the between-sequence spread (sd 10).
    assert bootstrap_mean(shifted).high - bootstrap_mean(shifted).low > 4


def test_recovery_fraction_on_known_losses():
    clean, broken = torch.full((8,), 1.0), torch.full((8,), 3.0)
    half = recovery_fraction(clean, broken, torch.full((8,), 2.0))
    assert (half.value, half.low, half.high) == (0.5, 0.5, 0.5)
    assert recovery_fraction(clean, broken, clean).value == 1.0
    assert recovery_fraction(clean, broken, broken).value == 0.0
    assert recovery_fraction(clean, broken, torch.full((8,), 4.0)).value == -0.5
    # Per-sequence noise: the point is the ratio of the means, the interval contains it.
    noise = torch.randn(50, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.1
    estimate = recovery_fraction(1 + noise, 3 + noise, 1.5 + noise * 2)
    assert estimate.value == pytest.approx(float(3 - 1.5 - noise.mean()) / 2, abs=1e-9)
    assert estimate.low < estimate.value < estimate.high


def test_recovery_is_undefined_when_breaking_changes_nothing():
    same = torch.full((5,), 2.0)
    estimate = recovery_fraction(same, same, torch.full((5,), 1.0))
    assert math.isnan(estimate.value) and math.isnan(estimate.low) and str(estimate) == "undefined"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: bootstrap_mean([1.0]), "values has 1 values: a bootstrap needs at least 2 sequences"),
        (lambda: bootstrap_mean([1.0, float("nan")]), "values holds non-finite values"),
        (lambda: bootstrap_mean([1.0, 2.0], confidence=1.0), "confidence 1.0 is outside (0, 1)"),
        (lambda: bootstrap_mean([1.0, 2.0], n_resamples=10), "n_resamples must be an integer in 100..100000"),
        (lambda: paired_difference([1.0, 2.0], [1.0, 2.0, 3.0]), "got values 2, baseline 3"),
        (lambda: recovery_fraction([1.0, 2.0], [1.0, 2.0], [1.0, 2.0, 3.0]), "got clean 2, broken 2, repaired 3"),
    ],
)
def test_bad_input_is_refused(call, message):
    with pytest.raises(SinkInterpError) as error:
        call()
    assert message in str(error.value)
