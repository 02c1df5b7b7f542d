"""Reproducible hypothesis experiments: specs, the runner, reports, and their statistics."""

from sinkinterp.experiments.bos import BosTest, bos_test
from sinkinterp.experiments.disruption import QKDisruptionTest, qk_disruption_test
from sinkinterp.experiments.formation import (
    ChainEffects,
    FormationTest,
    ResidualSinkTest,
    formation_test,
    residual_sink_test,
)
from sinkinterp.experiments.runner import run_experiment
from sinkinterp.experiments.screening import Screen, agreement, screen, spearman, sweep_table
from sinkinterp.experiments.spec import (
    BootstrapSpec,
    ConditionSpec,
    Criterion,
    DataSpec,
    ExperimentSpec,
    builtin_specs,
    load_spec,
)
from sinkinterp.experiments.validation import validate_heads, validation_specs
from sinkinterp.stats import (
    Estimate,
    bootstrap_mean,
    bootstrap_statistic,
    paired_difference,
    recovery_fraction,
)

__all__ = [
    "ExperimentSpec", "DataSpec", "ConditionSpec", "Criterion", "BootstrapSpec", "load_spec", "builtin_specs",
    "run_experiment", "Estimate", "bootstrap_mean", "bootstrap_statistic", "paired_difference",
    "recovery_fraction", "validate_heads", "validation_specs", "FormationTest", "formation_test",
    "ChainEffects", "ResidualSinkTest", "residual_sink_test", "BosTest", "bos_test",
    "QKDisruptionTest", "qk_disruption_test", "Screen", "screen", "agreement", "spearman", "sweep_table",
]
