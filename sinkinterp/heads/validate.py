"""Causal validation of the head classes: ablate the top recall, top induction and random heads."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pandas as pd

from sinkinterp._batches import (
    check_bool,
    check_int,
    check_seed,
)
from sinkinterp.errors import SinkInterpError
from sinkinterp.heads.classify import check_thresholds, top_heads
from sinkinterp.sites import head_label
from sinkinterp.stats import bootstrap_mean, paired_difference

# --------------------------------------------------------------------------------------------
# Causal validation: ablate the top recall heads, the top induction heads, and random heads


METRIC_NAMES = ("needle_loss", "needle_accuracy", "induction_loss")


@dataclass(frozen=True)
class HeadValidation:
    """Result of :func:`validate_heads`. ``conditions`` maps a condition to its ablated heads;
    ``per_seq[condition][metric]`` holds per-prompt (needle) or per-sequence (induction) values;
    the random condition is the mean over ``n_random`` draws, each also kept as ``random-<i>``;
    with ``per_head``, each head of the two sets ablated alone is ``alone-L<l>H<h>``."""

    k: int
    ablation: str
    sets: str
    conditions: dict[str, tuple[tuple[int, int], ...]]
    per_seq: dict[str, dict[str, list[float]]]
    n_resamples: int
    seed: int
    data: dict[str, Any]
    match: str = "none"  # how the random sets were drawn: 'layer' (matched to the induction set) or 'none'

    def estimates(self) -> pd.DataFrame:
        """Per condition and metric: mean with CI, and the paired difference to clean with CI."""
        rows = []
        for condition, metrics in self.per_seq.items():
            for metric, values in metrics.items():
                value = bootstrap_mean(values, n_resamples=self.n_resamples, seed=self.seed)
                row = {"condition": condition, "metric": metric, "value": value.value, "low": value.low,
                       "high": value.high}
                if condition != "clean":
                    delta = paired_difference(values, self.per_seq["clean"][metric],
                                              n_resamples=self.n_resamples, seed=self.seed)
                    row.update(delta=delta.value, delta_low=delta.low, delta_high=delta.high)
                rows.append(row)
        return pd.DataFrame(rows)

    def dissociation(self) -> dict[str, Any]:
        """The double dissociation: on the needle task, recall ablation hurts more than induction
        ablation (and than random); on repeated tokens, induction ablation hurts more than recall
        ablation (and than random). Differences of deltas are paired over the same sequences."""
        def gap(metric: str, a: str, b: str) -> dict[str, float]:
            est = paired_difference(self.per_seq[a][metric], self.per_seq[b][metric],
                                    n_resamples=self.n_resamples, seed=self.seed)
            return est.to_dict()

        if set(self.conditions["recall"]) == set(self.conditions["induction"]):
            # Identical sets: every recall - induction gap is exactly 0 by construction, not evidence.
            return {"testable": False, "holds": None,
                    "why": f"the top {self.k} recall and induction heads are the same heads; try sets='exclusive' "
                           "or another k"}
        record = {
            "testable": True,
            "needle_loss: recall - induction": gap("needle_loss", "recall", "induction"),
            "needle_loss: recall - random": gap("needle_loss", "recall", "random"),
            "induction_loss: induction - recall": gap("induction_loss", "induction", "recall"),
            "induction_loss: induction - random": gap("induction_loss", "induction", "random"),
        }
        record["holds"] = bool(record["needle_loss: recall - induction"]["low"] > 0
                               and record["induction_loss: induction - recall"]["low"] > 0)
        return record

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "ablation": self.ablation,
            "sets": self.sets,
            "conditions": {name: [list(p) for p in heads] for name, heads in self.conditions.items()},
            "estimates": self.estimates().to_dict(orient="records"),
            "dissociation": self.dissociation(),
            "per_seq": self.per_seq,
            "n_resamples": self.n_resamples,
            "seed": self.seed,
            "match": self.match,
            "data": self.data,
        }

    def __str__(self) -> str:
        frame = self.estimates()
        lines = [f"Causal validation: {self.ablation}-ablate k={self.k} heads per condition ({self.sets} sets; "
                 f"random sets {'layer-matched to the induction set' if self.match == 'layer' else 'unmatched'}) "
                 f"(95% paired bootstrap CIs, {self.n_resamples} resamples)"]
        for condition in [c for c in self.per_seq if not c.startswith(("random-", "alone-"))]:
            heads = ", ".join(head_label(*p) for p in self.conditions.get(condition, ()))
            lines.append(f"  {condition}{f' [{heads}]' if heads else ''}")
            for row in frame[frame.condition == condition].itertuples():
                text = f"    {row.metric:<16} {row.value:.3f} [{row.low:.3f}, {row.high:.3f}]"
                if condition != "clean":
                    text += f"   delta {row.delta:+.3f} [{row.delta_low:+.3f}, {row.delta_high:+.3f}]"
                lines.append(text)
        alone = [c for c in self.per_seq if c.startswith("alone-")]
        if alone:
            lines.append("  one head at a time (delta vs clean):")
            for condition in alone:
                rows = frame[frame.condition == condition].set_index("metric")
                cells = "   ".join(f"{m} {rows.loc[m, 'delta']:+.3f} [{rows.loc[m, 'delta_low']:+.3f}, "
                                   f"{rows.loc[m, 'delta_high']:+.3f}]" for m in ("needle_loss", "induction_loss"))
                lines.append(f"    {condition[len('alone-'):]:<8} {cells}")
        diss = self.dissociation()
        if not diss["testable"]:
            lines.append(f"  double dissociation: not testable ({diss['why']})")
            return "\n".join(lines)
        lines.append(f"  double dissociation: {'holds' if diss['holds'] else 'does not hold'}")
        for key, value in diss.items():
            if key not in ("holds", "testable"):
                lines.append(f"    {key:<38} {value['value']:+.3f} [{value['low']:+.3f}, {value['high']:+.3f}]")
        return "\n".join(lines)


def _layer_matched(pool: list[tuple[int, int]], reference: list[tuple[int, int]], rng: random.Random
                   ) -> tuple[tuple[int, int], ...]:
    """One random head from ``pool`` per reference head, in the same layer where one is left, else in
    the nearest layer that has one (ties: the lower layer)."""
    left = list(pool)
    chosen = []
    for layer, _ in reference:
        nearest = min(abs(l - layer) for l, _ in left)
        candidates = [p for p in left if abs(p[0] - layer) == nearest]
        candidates = [p for p in candidates if p[0] == min(c[0] for c in candidates)]
        pick = rng.choice(candidates)
        chosen.append(pick)
        left.remove(pick)
    return tuple(sorted(chosen))


def head_sets(table: pd.DataFrame, *, k: int, n_random: int, sets: str, seed: int, match: str,
              per_head: bool = False) -> dict[str, tuple[tuple[int, int], ...]]:
    """The heads each validation condition ablates, by condition name: ``recall`` and ``induction``
    (the top ``k`` by score, or by score among the heads without the other label for
    ``sets="exclusive"``), ``random-i`` (``n_random`` seeded draws of ``k`` other heads, layer-matched
    to the induction set for ``match="layer"``), and with ``per_head`` each head of the two sets
    alone (``alone-L{l}H{h}``)."""
    if not isinstance(table, pd.DataFrame):
        raise SinkInterpError(f"validate_heads takes the table from classify_heads, got {type(table).__name__}")
    check_seed(seed)
    for label in ("recall", "induction"):
        if label not in table.columns:
            raise SinkInterpError(f"the table has no {label!r} score: classify with that scorer first")
    check_int("n_random", n_random, 1)
    check_bool("per_head", per_head)
    if match not in ("layer", "none"):
        raise SinkInterpError(f"match {match!r} is not one of 'layer', 'none'")
    if sets not in ("top", "exclusive"):
        raise SinkInterpError(f"sets {sets!r} is not one of 'top', 'exclusive'")
    everyone = [(int(l), int(h)) for l, h in zip(table["layer"], table["head"])]
    if sets == "top":
        recall, induction = top_heads(table, "recall", k), top_heads(table, "induction", k)
    else:
        thresholds = check_thresholds(table.attrs.get("thresholds"))
        recall = top_heads(table[table["induction"] <= thresholds["induction"]], "recall", k)
        induction = top_heads(table[table["recall"] <= thresholds["recall"]], "induction", k)
    pool = [p for p in everyone if p not in set(recall) | set(induction)]
    if len(pool) < k:
        raise SinkInterpError(f"k = {k}: only {len(pool)} heads are outside the top recall and induction sets, "
                              f"too few for a random draw of {k}")
    if match == "none":
        draws = [tuple(sorted(random.Random(seed * 1000 + i).sample(pool, k))) for i in range(n_random)]
    else:
        draws = [_layer_matched(pool, induction, random.Random(seed * 1000 + i)) for i in range(n_random)]
    conditions = {"recall": tuple(recall), "induction": tuple(induction)}
    conditions.update({f"random-{i}": draw for i, draw in enumerate(draws)})
    if per_head:
        conditions.update({f"alone-{head_label(*pair)}": (pair,) for pair in dict.fromkeys(recall + induction)})
    return conditions
