"""Measure attention sinks and massive activations (definitions: docs/design.md §2).

Every measurement streams: hooks reduce each layer's activation to a per-sequence statistic, add it to
running sums and drop it, so memory never holds a ``[layers, heads, T, T]`` cache. Positions are
relative to each row's first real token (left padding needs an ``attention_mask``). Sequences are
averaged with equal weight: first over the positions of one sequence, then over sequences.

- :mod:`~sinkinterp.measure.sinks`: :func:`sink_scores` -> :class:`SinkReport` (alpha[l, h, k], sink
  ratio, first-token share, secondary sinks);
- :mod:`~sinkinterp.measure.massive`: :func:`find_massive_activations` (Sun et al.),
  :func:`stable_massive_channels`, :func:`residual_profile`;
- :mod:`~sinkinterp.measure.geometry`: :func:`qkv_geometry`, q/k/v norms and angles;
- :mod:`~sinkinterp.measure.value_weighted`: :func:`value_weighted_attention`;
- :mod:`~sinkinterp.measure.qk`: :func:`qk_massive_values` (Jin et al.);
- :mod:`~sinkinterp.measure.scan`: :func:`scan`, all of the first two in one pass;
- :mod:`~sinkinterp.measure.formation`: :func:`formation_trace` (which block, component and
  neurons write a massive channel) and :func:`sink_chain` (massive activation -> normalised
  input -> small key/value -> sink, per block);
- :mod:`~sinkinterp.measure.residual_sinks`: :func:`residual_sinks`, fixed dimensions large on
  most tokens, with what the norms do with them.
"""

# In dependency order: common <- sinks, massive, geometry <- value_weighted, qk <- scan;
# massive <- formation; residual_sinks.
from sinkinterp.measure.common import (
    MASSIVE_COLUMNS,
    MEASUREMENTS,
    Measurement,
    alpha_at,
    register_measurement,
    seen_counts,
)
from sinkinterp.measure.formation import (
    CHAIN_LINKS,
    FormationTrace,
    SinkChain,
    formation_trace,
    sink_chain,
    traced_channels,
)
from sinkinterp.measure.geometry import head_frame, qkv_geometry
from sinkinterp.measure.massive import (
    ResidualProfile,
    find_massive_activations,
    massive_entries,
    residual_profile,
    stable_massive_channels,
)
from sinkinterp.measure.qk import QKMassiveValues, qk_massive_values, rotary_pairs
from sinkinterp.measure.residual_sinks import ResidualSinks, read_weights, residual_sinks
from sinkinterp.measure.scan import ScanResult, scan, scan_corpus
from sinkinterp.measure.sinks import BUDGET_PARTS, SinkReport, attention_budget, sink_scores
from sinkinterp.measure.value_weighted import (
    value_weighted_attention,
    value_weighted_measurement,
)

__all__ = [
    "SinkReport", "sink_scores", "attention_budget", "BUDGET_PARTS", "alpha_at", "seen_counts",
    "MASSIVE_COLUMNS", "massive_entries", "find_massive_activations", "stable_massive_channels",
    "ResidualProfile", "residual_profile",
    "head_frame", "qkv_geometry", "value_weighted_attention",
    "QKMassiveValues", "qk_massive_values", "rotary_pairs",
    "ScanResult", "scan", "scan_corpus",
    "ResidualSinks", "residual_sinks", "read_weights",
    "FormationTrace", "formation_trace", "SinkChain", "sink_chain", "CHAIN_LINKS", "traced_channels",
    "MEASUREMENTS", "Measurement", "register_measurement", "value_weighted_measurement",
]
