"""Causal interventions on the sink, as values (docs/design.md §3).

Each intervention is a frozen dataclass: it prints, compares, and round-trips through
``to_dict`` / ``Intervention.from_dict`` (JSON or YAML). Statistics it needs (mean values, fitted
biases, patch sources) are computed once by a classmethod from reference tokens and stored as
numbers, so the object can be saved and applied again without the reference data.
``.hooks(model)`` validates it against the model and compiles it to TransformerLens forward hooks
``[(hook_name, fn), ...]``, which work with ``intervene``, ``model.hooks`` and
``model.run_with_hooks``, on HookedTransformer and TransformerBridge alike.

Positions are absolute (no padding). Query head h reads key/value head ``h // group``; per-head
interventions act on scores, pattern or z, so they never touch the other heads of a group,
except :class:`ReplaceSinkKey`, which changes a key and so needs whole groups.
"""

# In dependency order: base (values, checks, the registry, intervene) and capture, then one module per
# family of types (each with its own fit).
from sinkinterp.interventions.ablate_heads import AblateHeads
from sinkinterp.interventions.base import (
    INTERVENTIONS,
    FitOption,
    Hook,
    Intervention,
    SpecContext,
    intervene,
    register_intervention,
)
from sinkinterp.interventions.dimensions import EditResidualDimension
from sinkinterp.interventions.keys import MaskSinkKey, ReplaceSinkKey, WindowAttention
from sinkinterp.interventions.massive import EditMassiveChannels
from sinkinterp.interventions.neurons import AblateNeurons
from sinkinterp.interventions.qk import DisruptQKChannels
from sinkinterp.interventions.residual import PatchFirstTokenResidual, PerSequencePatch
from sinkinterp.interventions.slot import ConstantAttentionBias, fit_constant_bias
from sinkinterp.interventions.standins import KeyValueSlot, OutputGate, softmax_off_by_one
from sinkinterp.interventions.values import AblateSinkValue

__all__ = [
    "Intervention",
    "MaskSinkKey",
    "AblateSinkValue",
    "ReplaceSinkKey",
    "EditMassiveChannels",
    "PatchFirstTokenResidual",
    "PerSequencePatch",
    "ConstantAttentionBias",
    "AblateHeads",
    "AblateNeurons",
    "EditResidualDimension",
    "KeyValueSlot",
    "OutputGate",
    "softmax_off_by_one",
    "WindowAttention",
    "DisruptQKChannels",
    "fit_constant_bias",
    "intervene",
    "INTERVENTIONS",
    "register_intervention",
    "FitOption",
    "SpecContext",
    "Hook",
]
