"""sinkinterp: find out why transformers pour attention onto their first token.

``import sinkinterp as si`` gives everything the tutorials use. The package is layered; each layer
imports only from the layers above it in this list (a test checks it):

1. core: ``errors``, ``backends`` (TransformerLens 3.x / 4.x), ``models`` and ``tiny`` (loading),
   ``data`` (tokens), ``sites`` (layers, heads, kv groups), ``stats``, ``provenance``;
2. ``measure``: sink scores, massive activations, geometry, value-weighted attention, the scan;
3. ``interventions``: the causal edits, one module per family;
4. ``evaluate``: per-sequence loss / KL / accuracy under interventions (the one evaluation engine);
5. ``heads``: head scores, classes and their causal validation;
6. ``views`` and ``figures``;
7. ``experiments``: specs, the runner and its reports, the head validation; then ``cli``.
"""

# ruff: noqa: I001  (the imports below are in layer order, on purpose)

from sinkinterp._batches import progress_bar as _progress_bar
from sinkinterp.errors import SinkInterpError

_progress_bar()  # the first import of tqdm.auto, quiet: Jupyter without ipywidgets would warn in every notebook

# 1. core
from sinkinterp.backends import Model
from sinkinterp.models import EMBEDDED_MODEL, ModelSource, load_model, model_source
from sinkinterp.data import corpus_tokens, fact_prompts, needle_prompts, passkey_prompts, random_tokens, repeated_random_tokens
from sinkinterp.sites import Heads
from sinkinterp.stats import Estimate, bootstrap_mean, paired_difference, recovery_fraction

# 2. measure. The old module sinkinterp.scan (a deprecated alias) is imported first so that a later
# ``from sinkinterp.scan import ...`` cannot rebind ``sinkinterp.scan``, the function, to it.
from sinkinterp import scan as _old_scan_module  # noqa: F401
from sinkinterp.measure import (
    FormationTrace,
    ResidualProfile,
    ResidualSinks,
    SinkChain,
    ScanResult,
    SinkReport,
    attention_budget,
    find_massive_activations,
    formation_trace,
    qk_massive_values,
    qkv_geometry,
    register_measurement,
    residual_profile,
    residual_sinks,
    scan,
    sink_chain,
    sink_scores,
    stable_massive_channels,
    value_weighted_attention,
)

# 3. interventions
from sinkinterp.interventions import (
    INTERVENTIONS,
    AblateHeads,
    AblateNeurons,
    AblateSinkValue,
    ConstantAttentionBias,
    EditMassiveChannels,
    EditResidualDimension,
    Intervention,
    KeyValueSlot,
    MaskSinkKey,
    OutputGate,
    PatchFirstTokenResidual,
    ReplaceSinkKey,
    WindowAttention,
    DisruptQKChannels,
    fit_constant_bias,
    intervene,
    softmax_off_by_one,
)

# 4. evaluate
from sinkinterp.evaluate import METRICS, Evaluation, evaluate, register_metric

# 5. heads
from sinkinterp.heads import SCORERS, classify_heads, copying_evidence, qk_by_label, register_scorer, top_heads

# 6. views and figures
from sinkinterp.figures import (
    plot_alpha_heatmap,
    plot_first_token_share,
    plot_head_classes,
    plot_intervention_effects,
    plot_massive_activations,
    plot_qkv_norms,
)
from sinkinterp.views import attention_view, compare_view

# 7. experiments
from sinkinterp.experiments import (
    BosTest,
    ExperimentSpec,
    FormationTest,
    ResidualSinkTest,
    bos_test,
    builtin_specs,
    formation_test,
    residual_sink_test,
    qk_disruption_test,
    QKDisruptionTest,
    load_spec,
    run_experiment,
    Screen,
    screen,
    validate_heads,
)

__all__ = [
    "SinkInterpError",
    # core
    "Model", "EMBEDDED_MODEL", "ModelSource", "load_model", "model_source",
    "corpus_tokens", "random_tokens", "repeated_random_tokens", "needle_prompts", "passkey_prompts", "fact_prompts", "Heads",
    "Estimate", "bootstrap_mean", "paired_difference", "recovery_fraction",
    # measure
    "SinkReport", "sink_scores", "find_massive_activations", "stable_massive_channels", "ResidualProfile",
    "residual_profile", "qkv_geometry", "qk_massive_values", "value_weighted_attention", "ScanResult", "scan",
    "register_measurement", "FormationTrace", "formation_trace", "SinkChain", "sink_chain",
    "ResidualSinks", "residual_sinks", "attention_budget",
    # interventions
    "Intervention", "INTERVENTIONS", "MaskSinkKey", "AblateSinkValue", "ReplaceSinkKey", "EditMassiveChannels",
    "PatchFirstTokenResidual", "ConstantAttentionBias", "AblateHeads", "AblateNeurons", "EditResidualDimension", "KeyValueSlot", "OutputGate", "softmax_off_by_one",
    "WindowAttention", "DisruptQKChannels", "fit_constant_bias", "intervene",
    # evaluate
    "evaluate", "Evaluation", "METRICS", "register_metric",
    # heads
    "classify_heads", "copying_evidence", "qk_by_label", "top_heads", "SCORERS", "register_scorer",
    # views and figures
    "attention_view", "compare_view", "plot_first_token_share", "plot_alpha_heatmap", "plot_massive_activations",
    "plot_qkv_norms", "plot_intervention_effects", "plot_head_classes",
    # experiments
    "ExperimentSpec", "load_spec", "builtin_specs", "run_experiment", "validate_heads",
    "FormationTest", "formation_test", "ResidualSinkTest", "residual_sink_test",
    "BosTest", "bos_test", "QKDisruptionTest", "qk_disruption_test", "Screen", "screen",
]
__version__ = "0.1.0"
