"""The causal check of the head classes, as ordinary experiments: each ablated head set is a
condition of an :class:`~sinkinterp.experiments.ExperimentSpec` run by the experiment runner.

Two specs share the conditions: one on held-out needle prompts (scored at the answer tokens, teacher
forced: ``needle_loss``, ``needle_accuracy``), one on held-out repeated random tokens (scored at the
induction targets: ``induction_loss``). Mean ablation fits each set's means on corpus windows (the
calibration split, ``data.calibration: corpus_windows``).
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch

from sinkinterp.backends import Model
from sinkinterp.errors import SinkInterpError
from sinkinterp.experiments.runner import run_experiment
from sinkinterp.experiments.spec import ExperimentSpec
from sinkinterp.heads.validate import METRIC_NAMES, HeadValidation, head_sets
from sinkinterp.stats import check_bootstrap_options

__all__ = ["validate_heads", "validation_specs"]

#: Tokens per corpus window the mean ablation is fitted on.
REFERENCE_LEN = 128


def validation_specs(model: Model, conditions: dict[str, tuple[tuple[int, int], ...]], *, ablation: str,
                     seed: int, n_prompts: int, context_len: int, n_seqs: int, half_len: int, n_reference: int,
                     batch_size: int, n_resamples: int) -> dict[str, ExperimentSpec]:
    """The two experiments (``"needle"``, ``"induction"``) that ablate each head set of
    ``conditions`` (name -> (layer, head) pairs) on held-out data (seed ``seed + 1000``)."""
    if ablation not in ("mean", "zero"):
        raise SinkInterpError(f"ablation {ablation!r} is not one of 'mean', 'zero'")
    eval_seed = seed + 1000
    records = []
    for name, heads in conditions.items():
        ablate = {"type": "AblateHeads", "heads": [list(pair) for pair in heads]}
        ablate.update({"fit": {"mode": "mean"}} if ablation == "mean" else {"mode": "zero"})
        records.append({"name": name, "interventions": [ablate]})
    calibration = {"n_calibration": n_reference if ablation == "mean" else 0, "calibration": "corpus_windows",
                   "calibration_seq_len": REFERENCE_LEN, "seed": eval_seed, "batch_size": batch_size}
    common = {"model": getattr(model.cfg, "model_name", "model"), "seed": seed, "from_query": 0,
              "bootstrap": {"n_resamples": n_resamples}, "conditions": records}
    return {
        "needle": ExperimentSpec.from_dict({
            **common, "name": "head validation: needle", "metrics": ["loss", "accuracy"],
            "data": {"source": "needle", "seq_len": context_len, "n_seqs": n_prompts, **calibration}}),
        "induction": ExperimentSpec.from_dict({
            **common, "name": "head validation: induction", "metrics": ["loss"],
            "data": {"source": "repeated", "seq_len": 2 * half_len, "n_seqs": n_seqs, **calibration}}),
    }


def validate_heads(
    model: Model,
    table: pd.DataFrame,
    *,
    k: int = 5,
    n_random: int = 5,
    ablation: str = "mean",
    sets: str = "top",
    seed: int = 0,
    n_prompts: int = 16,
    context_len: int = 512,
    n_seqs: int = 16,
    half_len: int = 64,
    n_reference: int = 16,
    batch_size: int = 4,
    n_resamples: int = 2000,
    per_head: bool = False,
    match: str = "layer",
) -> HeadValidation:
    """Ablate the top-``k`` recall heads, the top-``k`` induction heads and ``n_random`` seeded
    draws of ``k`` other heads (none of either top set); measure the needle reproduction loss and
    accuracy (teacher-forced) and the induction loss on repeated random tokens (second half).
    With ``per_head``, also each head of the two sets alone (one-head-at-a-time ablation, as in
    ARENA: a set's effect can be one head's, or need several together).
    ``match="layer"`` (default) draws each random set layer-matched to the induction set: for each of
    its heads, a random other head of the same layer (the nearest layer with one left, if none);
    ``"none"`` draws ``k`` heads uniformly from the rest.

    ``sets="exclusive"`` takes the top-``k`` recall heads among those *not* labelled induction and
    the top-``k`` induction heads among those not labelled recall: when the two scores pick the
    same heads (copying on repeated tokens and copying a needle look alike), only the exclusive
    sets can dissociate. The data are held out from the classification: seeds ``seed + 1000`` on.
    ``ablation``: ``"mean"`` (default) replaces each head's output at queries i >= 1 by its mean over
    ``n_reference`` corpus windows, so only what the head reads from its input is removed;
    ``"zero"`` also removes the constant it writes, which for a sink-dominated head is the sink's
    value, known to cost loss by itself.

    Each set is a condition of two ordinary experiments (:func:`validation_specs`), run by
    :func:`~sinkinterp.experiments.run_experiment`; the result gathers their per-sequence numbers.
    """
    check_bootstrap_options(n_resamples, 0.95)
    conditions = head_sets(table, k=k, n_random=n_random, sets=sets, seed=seed, match=match, per_head=per_head)
    specs = validation_specs(model, conditions, ablation=ablation, seed=seed, n_prompts=n_prompts,
                             context_len=context_len, n_seqs=n_seqs, half_len=half_len, n_reference=n_reference,
                             batch_size=batch_size, n_resamples=n_resamples)
    results = {task: run_experiment(spec, model=model, progress=False, log=lambda *_: None)
               for task, spec in specs.items()}

    def per_sequence(task: str, name: str) -> dict[str, list[float]]:
        if name == "clean":
            return results[task]["clean"]["per_sequence"]
        return next(c["per_sequence"] for c in results[task]["conditions"] if c["name"] == name)

    per_seq: dict[str, dict[str, list[float]]] = {}
    for name in ("clean", *conditions):
        needle, induction = per_sequence("needle", name), per_sequence("induction", name)
        per_seq[name] = {"needle_loss": needle["loss"], "needle_accuracy": needle["accuracy"],
                         "induction_loss": induction["loss"]}
    per_seq["random"] = {
        m: torch.tensor([per_seq[f"random-{i}"][m] for i in range(n_random)]).mean(dim=0).tolist()
        for m in METRIC_NAMES
    }
    eval_seed = seed + 1000
    data: dict[str, Any] = {
        "needle": results["needle"]["provenance"]["data"]["needle"],
        "repeated": {"n_seqs": n_seqs, "half_len": half_len, "seed": eval_seed},
        "reference": None if ablation == "zero" else {"n_seqs": n_reference, "seq_len": REFERENCE_LEN,
                                                      "seed": eval_seed},
    }
    return HeadValidation(k=k, ablation=ablation, sets=sets, conditions={"clean": (), **conditions},
                          per_seq=per_seq, n_resamples=n_resamples, seed=seed, match=match, data=data)
