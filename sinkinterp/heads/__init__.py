"""Head scores and the sink / previous-token / duplicate / induction / recall classification
(docs/design.md §2), with a causal check of the recall and induction labels.

Every score is in [0, 1] and comes from a *scorer*: a registered recipe that names the data it
needs and reduces each layer's attention pattern to per-head sums in a hook (nothing of shape
``[layers, heads, T, T]`` is kept). Scorers that share data share one forward pass.

- ``previous_token``, ``duplicate``, ``induction`` (repeated random tokens ``[x, x]``): the
  attention from query i to its target key (i - 1; i - n; i - n + 1 in the second half), divided
  by the attention the query pays to anything but the first token. The sink takes most of many
  heads' attention, so the raw mean (``*_raw`` columns, the ARENA definition) would call a head
  that does induction whenever it is not resting on the sink a weak one. Queries whose target is
  the first token itself are left out. ``*_mass`` is the mean non-sink attention of the scored
  queries; content labels need it to be at least ``MIN_NON_SINK_MASS`` (0.05).
- ``previous_token_tl``, ``duplicate_tl``, ``induction_tl``: TransformerLens's ``detect_head``
  at its defaults, per sequence, averaged; ``previous_token_text`` on corpus text.
- ``recall`` (Wu et al. 2024): on needle-in-a-haystack prompts, teacher-forced through the
  needle's reproduction, the fraction of reproduction steps whose top-1 attended key is a needle
  position holding the token being produced. ``recall_greedy`` does the same on the model's own
  greedy output, over the prompts it reproduces (ROUGE-1 recall > 0.5, as Wu et al.).
- ``sink``: alpha at the first token, ``mean_{i >= 0} A[i, 0]`` (as :func:`sink_scores`).
- ``distance``: mean attention distance over the non-sink keys, ``(i - j) / (i - 1)`` weighted by
  ``A[i, j]`` for keys j >= 1: 0 = attends to itself, 1 = to the oldest non-sink token.
"""

from sinkinterp._deprecated import moved_names

# In dependency order: scores (data, reducers, the scorer registry) <- recall <- classify <- copying,
# validate.
from sinkinterp.heads.classify import (
    DEFAULT_THRESHOLDS,
    MIN_NON_SINK_MASS,
    classify_heads,
    qk_by_label,
    top_heads,
)
from sinkinterp.heads.copying import (
    copying_evidence,
    logit_attribution,
    ov_copying_scores,
)
from sinkinterp.heads.recall import greedy_recall
from sinkinterp.heads.scores import (
    SCORERS,
    PatternReducer,
    RepeatedTokens,
    Scorer,
    head_scores,
    register_scorer,
)
from sinkinterp.heads.validate import METRIC_NAMES, HeadValidation, head_sets

__all__ = [
    "Scorer",
    "SCORERS",
    "register_scorer",
    "PatternReducer",
    "DEFAULT_THRESHOLDS",
    "MIN_NON_SINK_MASS",
    "RepeatedTokens",
    "head_scores",
    "greedy_recall",
    "classify_heads",
    "HeadValidation",
    "head_sets",
    "top_heads",
    "qk_by_label",
    "ov_copying_scores",
    "logit_attribution",
    "copying_evidence",
    "METRIC_NAMES",
]

# validate_heads runs experiments, so it lives in the experiments layer now; the old path forwards.
__getattr__, _ = moved_names(__name__, {"validate_heads": "sinkinterp.experiments.validation"})
