"""Label every head (sink, previous-token, duplicate, induction, recall) from its scores."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from sinkinterp._batches import (
    check_bool,
    check_int,
    check_seed,
)
from sinkinterp.backends import Model
from sinkinterp.data import (
    NeedlePrompts,
    corpus_windows,
    default_first_token,
    needle_prompts,
)
from sinkinterp.errors import SinkInterpError
from sinkinterp.heads.recall import greedy_recall
from sinkinterp.heads.scores import SCORERS, check_names, head_scores, make_repeated
from sinkinterp.measure import head_frame, qk_massive_values
from sinkinterp.sites import head_label

#: Label -> threshold on its score (docs/design.md §2: induction / previous 0.4 as in ARENA, retrieval
#: 0.1 as Wu et al., sink eps 0.3).
DEFAULT_THRESHOLDS: dict[str, float] = {
    "sink": 0.3,
    "previous-token": 0.4,
    "duplicate": 0.4,
    "induction": 0.4,
    "recall": 0.1,
}


#: A head gets a content label (previous-token, duplicate, induction) only if, on the queries that
#: score it, at least this share of its attention is off the first token (the ``*_mass`` columns).
#: Below it the conditional score divides by almost nothing: a head with 99.98% of its attention on
#: the sink scored 0.02 to 0.91 with the seed, decided by one "awake" sequence in eight.
MIN_NON_SINK_MASS = 0.05


# --------------------------------------------------------------------------------------------
# Q/K massive values next to the classes, and the classification itself


def check_thresholds(thresholds) -> dict[str, float]:
    merged = dict(DEFAULT_THRESHOLDS)
    if thresholds is None:
        return merged
    if not isinstance(thresholds, dict):
        raise SinkInterpError(f"thresholds must be a dict label -> value, got {type(thresholds).__name__}")
    for label, value in thresholds.items():
        if label not in DEFAULT_THRESHOLDS:
            raise SinkInterpError(f"unknown label {label!r} in thresholds: allowed {', '.join(DEFAULT_THRESHOLDS)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise SinkInterpError(f"threshold for {label!r} is {value!r}: scores are in [0, 1], give a number there")
        merged[label] = float(value)
    return merged


def _check_context_lens(model: Model, context_lens) -> tuple[int, ...]:
    values = (context_lens,) if isinstance(context_lens, int) else tuple(context_lens)
    if not values:
        raise SinkInterpError("context_lens is empty: give at least one needle prompt length, e.g. (256, 512)")
    for value in values:
        check_int("context length", value, 2)
        if value > model.cfg.n_ctx:
            raise SinkInterpError(f"context length {value} exceeds the model's context: n_ctx = {model.cfg.n_ctx}")
    return values


def _labels(row: pd.Series, thresholds: dict[str, float], min_mass: float = MIN_NON_SINK_MASS) -> tuple[str, ...]:
    labels = []
    for scorer in SCORERS.values():
        if scorer.label is not None and scorer.name in row and not pd.isna(row[scorer.name]):
            mass = row.get(f"{scorer.name}_mass")
            if mass is not None and not mass >= min_mass:
                continue  # too little attention off the sink for the conditional score to mean anything
            if row[scorer.name] > thresholds[scorer.label]:
                labels.append(scorer.label)
    return tuple(labels) or ("none",)


def classify_heads(
    model: Model,
    *,
    seed: int = 0,
    thresholds: dict[str, float] | None = None,
    scorers: Sequence[str] | None = None,
    n_seqs: int = 16,
    half_len: int = 64,
    text_len: int = 128,
    context_lens: Sequence[int] | int = (256, 512, 1024),
    n_prompts: int = 6,
    depths: Sequence[float] | float = (0.25, 0.5, 0.75),
    greedy: bool = True,
    qk: bool = True,
    data: dict[str, Any] | None = None,
    min_non_sink_mass: float = MIN_NON_SINK_MASS,
    batch_size: int = 4,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Score and label every head. One row per (layer, head): the scores in [0, 1], raw forms,
    ``recall_greedy``, q/k massive-value columns (``qk=True``), and ``labels`` (a tuple; a head
    may carry several, ``("none",)`` otherwise) at ``thresholds`` (defaults
    :data:`DEFAULT_THRESHOLDS`).

    Content labels (previous-token, duplicate, induction) are given on the conditional score pooled
    over every scored query of every sequence (attention to the target over the attention off the
    first token, a ratio of sums), and only to heads whose mean non-sink mass on those queries
    (``*_mass``) is at least ``min_non_sink_mass``. ``*_raw`` is the ARENA mean and ``*_tl``
    TransformerLens's ``detect_head`` score, for comparison.

    Data (all offline and seeded by ``seed``): ``n_seqs`` repeated random sequences of
    2 x ``half_len`` tokens; ``n_seqs`` corpus windows of ``text_len`` tokens at random offsets;
    ``n_prompts`` needle prompts per context length in ``context_lens`` at needle ``depths``.
    ``data`` replaces any of them with your own: ``{"repeated": RepeatedTokens, "text": tokens,
    "needle": NeedlePrompts or a list of them}``. ``frame.attrs`` records the data, the greedy
    reproduction rate and the thresholds.
    """
    thresholds = check_thresholds(thresholds)
    check_seed(seed)
    check_bool("greedy", greedy)
    check_bool("qk", qk)
    if isinstance(min_non_sink_mass, bool) or not isinstance(min_non_sink_mass, (int, float)) \
            or not 0 <= min_non_sink_mass < 1:
        raise SinkInterpError(f"min_non_sink_mass {min_non_sink_mass!r} must be a number in [0, 1)")
    names = check_names(SCORERS if scorers is None else scorers, list(SCORERS), "scorer")
    for label, value in (("n_seqs", n_seqs), ("half_len", half_len), ("text_len", text_len), ("n_prompts", n_prompts)):
        check_int(label, value, 2 if label != "n_prompts" else 1)
    kinds = {SCORERS[n].data for n in names}
    given = dict(data or {})
    needs_needle = "recall" in names or greedy
    lens = () if ("needle" in given or not needs_needle) else _check_context_lens(model, context_lens)
    unknown = sorted(set(given) - {"repeated", "text", "needle"})
    if unknown:
        raise SinkInterpError(f"unknown data {unknown[0]!r}: give 'repeated', 'text' or 'needle'")
    built: dict[str, Any] = {}
    if "repeated" in kinds:
        built["repeated"] = given.get("repeated") or make_repeated(model, n_seqs, half_len, seed)
    text = None
    if "text" in kinds or qk:
        text = given["text"] if "text" in given else corpus_windows(model, n_seqs, text_len, seed=seed)
    if "text" in kinds:
        built["text"] = text
    scores = head_scores(model, built, [n for n in names if SCORERS[n].data != "needle"],
                         batch_size=batch_size, progress=progress)
    prompts: list[NeedlePrompts] = []
    if "needle" in given:
        prompts = list(given["needle"]) if isinstance(given["needle"], (list, tuple)) else [given["needle"]]
        lens = tuple(p.prompt_len for p in prompts)
    elif needs_needle:
        prompts = [needle_prompts(model, n_prompts, length, depths=depths, seed=seed + i)
                   for i, length in enumerate(lens)]
    attrs: dict[str, Any] = {}
    if "recall" in names:
        per_length = [head_scores(model, {"needle": p}, ["recall"], batch_size=batch_size, progress=progress)["recall"]
                      for p in prompts]
        scores["recall"] = torch.stack(per_length).mean(dim=0)  # every context length weighs the same
        attrs["recall_by_context"] = {str(l): s.tolist() for l, s in zip(lens, per_length)}
    if greedy:
        runs = [greedy_recall(model, p, batch_size=batch_size) for p in prompts]
        # Every reproduced prompt weighs the same, whatever its context length.
        n_total = sum(p.n_prompts for p in prompts)
        for suffix, key in (("", "reproduced"), ("_wu", "reproduced_wu")):
            reproduced = torch.cat([r["per_prompt"][torch.tensor(r[key])] for r in runs])
            total = reproduced.shape[0]
            scores[f"recall_greedy{suffix}"] = reproduced.mean(dim=0) if total else torch.full(reproduced.shape[1:], math.nan)
            attrs[f"greedy_reproduction_rate{suffix}"] = total / n_total
        attrs["greedy"] = {
            str(l): {k: r[k] for k in ("reproduction_rate", "reproduction_rate_wu", "exact_rate", "responses",
                                       "rouge1_recall", "rouge1_recall_wu", "exact", "rule")}
            for l, r in zip(lens, runs)
        }

    frame = head_frame(model.cfg.n_layers, model.cfg.n_heads)
    frame.insert(0, "name", [head_label(l, h) for l, h in zip(frame["layer"], frame["head"])])
    for name, value in scores.items():
        frame[name] = value.flatten().numpy()
    if qk:
        geometry = qk_massive_values(model, text, batch_size=batch_size, progress=progress)
        frame = frame.merge(geometry.per_head(), on=["layer", "head"], how="left")
        attrs["qk"] = geometry.summary()
    frame["labels"] = [_labels(row, thresholds, min_non_sink_mass) for _, row in frame.iterrows()]
    frame.attrs.update(attrs)
    frame.attrs.update({
        "seed": seed,
        "thresholds": thresholds,
        "min_non_sink_mass": float(min_non_sink_mass),
        "label_statistic": "pooled conditional score: sum of target attention / sum of non-sink attention "
                           "over all scored queries; content labels need mean non-sink mass >= min_non_sink_mass",
        "scorers": {n: SCORERS[n].description for n in names},
        "data": {
            "repeated": {"n_seqs": n_seqs, "half_len": half_len, "first_token": default_first_token(model)},
            "text": {"n_seqs": n_seqs, "text_len": text_len, "source": "pydoc_data.topics, seeded offsets",
                     "first_token": default_first_token(model)},
            "needle": [p.to_dict() for p in prompts],
        },
    })
    return frame


def qk_by_label(table: pd.DataFrame) -> pd.DataFrame:
    """Are the big q/k values on recall heads? Per label (a head counts under each of its labels,
    and under ``all``): heads, mean q and k peak ratios, the share of heads with a massive q (k)
    dimension, and the mean low-frequency share of those dimensions."""
    needed = {"labels", "q_peak_ratio", "k_peak_ratio", "q_n_massive", "k_n_massive", "q_massive_low_freq"}
    if not needed <= set(table.columns):
        raise SinkInterpError(f"the table lacks {sorted(needed - set(table.columns))}: classify with qk=True")
    rows = table.explode("labels")
    everyone = table.assign(labels="all")
    grouped = pd.concat([rows, everyone]).groupby("labels", sort=False)
    return grouped.agg(
        n_heads=("name", "size"),
        q_peak_ratio=("q_peak_ratio", "mean"),
        k_peak_ratio=("k_peak_ratio", "mean"),
        q_has_massive=("q_n_massive", lambda x: float((x > 0).mean())),
        k_has_massive=("k_n_massive", lambda x: float((x > 0).mean())),
        q_massive_low_freq=("q_massive_low_freq", "mean"),
    ).reset_index().rename(columns={"labels": "label"})


def top_heads(table: pd.DataFrame, score: str, k: int) -> list[tuple[int, int]]:
    """The ``k`` heads with the largest ``score`` as (layer, head) pairs, best first."""
    if score not in table.columns:
        raise SinkInterpError(f"the table has no score {score!r}; its columns: {', '.join(map(str, table.columns))}")
    n = len(table)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise SinkInterpError(f"k = {k!r} heads: there are {n} heads to choose from, so k must be in 1..{n}")
    ordered = table.sort_values([score, "layer", "head"], ascending=[False, True, True], kind="stable")
    return [(int(l), int(h)) for l, h in zip(ordered["layer"][:k], ordered["head"][:k])]


