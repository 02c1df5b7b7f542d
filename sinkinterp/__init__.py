"""sinkinterp: find out why transformers pour attention onto their first token."""

from sinkinterp._batches import progress_bar as _progress_bar
from sinkinterp.errors import SinkInterpError

_progress_bar()  # the first import of tqdm.auto, quiet: Jupyter without ipywidgets would warn in every notebook
from sinkinterp.evaluate import Evaluation, evaluate
from sinkinterp.stats import paired_difference, recovery_fraction
from sinkinterp.heads import classify_heads, validate_heads
from sinkinterp.interventions import (
    AblateHeads,
    AblateSinkValue,
    ConstantAttentionBias,
    EditMassiveChannels,
    Intervention,
    MaskSinkKey,
    PatchFirstTokenResidual,
    ReplaceSinkKey,
    fit_constant_bias,
    intervene,
)
from sinkinterp.measure import (
    SinkReport,
    find_massive_activations,
    qk_massive_values,
    qkv_geometry,
    sink_scores,
    stable_massive_channels,
    value_weighted_attention,
)
from sinkinterp.models import EMBEDDED_MODEL, ModelSource, load_model, model_source
from sinkinterp import scan as _old_scan_module  # noqa: F401  (first: see below)
from sinkinterp.measure.scan import ScanResult, scan  # rebinds sinkinterp.scan to the function

__all__ = [
    "SinkInterpError",
    "EMBEDDED_MODEL",
    "ModelSource",
    "load_model",
    "model_source",
    "SinkReport",
    "sink_scores",
    "find_massive_activations",
    "stable_massive_channels",
    "qkv_geometry",
    "qk_massive_values",
    "value_weighted_attention",
    "ScanResult",
    "scan",
    "Intervention",
    "MaskSinkKey",
    "AblateSinkValue",
    "ReplaceSinkKey",
    "EditMassiveChannels",
    "PatchFirstTokenResidual",
    "ConstantAttentionBias",
    "AblateHeads",
    "fit_constant_bias",
    "intervene",
    "classify_heads",
    "validate_heads",
    "evaluate",
    "Evaluation",
    "paired_difference",
    "recovery_fraction",
]
__version__ = "0.1.0"
