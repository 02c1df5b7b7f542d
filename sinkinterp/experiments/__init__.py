"""Reproducible hypothesis experiments (issue 5). So far: the statistics every report uses."""

from sinkinterp.experiments.stats import Estimate, bootstrap_mean, paired_difference, recovery_fraction

__all__ = ["Estimate", "bootstrap_mean", "paired_difference", "recovery_fraction"]
