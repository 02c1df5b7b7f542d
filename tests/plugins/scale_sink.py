"""A user-defined intervention, written outside sinkinterp: scale the attention paid to the first
token (without renormalising), with a fit that picks the factor from calibration data.

Nothing in sinkinterp names this type: subclassing ``Intervention`` registers it, its class
attributes tell specs, sweeps and the runner what it stores and how it is fitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from sinkinterp import sink_scores
from sinkinterp.interventions import FitOption, Intervention
from sinkinterp.interventions.base import is_number
from sinkinterp.sites import resolve_layers


@dataclass(frozen=True, repr=False)
class ScaleSinkAttention(Intervention):
    """Multiply ``A[i, 0]`` by ``factor`` for queries i >= ``from_query`` in ``layers``."""

    NEEDS: ClassVar[tuple[str, ...]] = ("attn.hook_pattern",)
    FIT_OPTIONS: ClassVar[dict[str, FitOption]] = {
        "target": FitOption("a number in (0, 1]: the mean first-token attention to scale down to", is_number(0, 1)),
    }

    factor: float = 0.5
    layers: Any = None
    from_query: int = 1

    @classmethod
    def fit_spec(cls, model, calibration, *, seed=0, draw=0, n_draws=1, fields, options):
        alpha = float(sink_scores(model, calibration, progress=False).alpha[..., 0].mean())
        return cls(**{**fields, "factor": min(1.0, options["target"] / alpha)})

    def hooks(self, model):
        self.check_model(model, vars(self))

        def scale(pattern, hook):
            pattern = pattern.clone()
            pattern[:, :, self.from_query:, 0] *= self.factor
            return pattern

        return [(f"blocks.{layer}.attn.hook_pattern", scale) for layer in resolve_layers(model, self.layers)]


def expected_pattern_change(pattern: torch.Tensor, factor: float, from_query: int) -> torch.Tensor:
    """What the hook does, for the test to compare against."""
    out = pattern.clone()
    out[:, :, from_query:, 0] *= factor
    return out
