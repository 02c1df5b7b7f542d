"""The README's intervention table: next-token loss on the embedded model under each intervention.

8 corpus windows of 256 tokens are evaluated; statistics are fitted on the next 8 (disjoint:
seeded windows within documents, seed 0).
Every number comes from ``sinkinterp.evaluate`` (per-sequence means, then their mean), over all
queries and over queries i >= 16.

    python scripts/intervention_table.py [--json OUT]
"""

from __future__ import annotations

import argparse

import sinkinterp
from sinkinterp._io import atomic_write_json
from sinkinterp import (AblateSinkValue, ConstantAttentionBias, EditMassiveChannels, MaskSinkKey,
                        PatchFirstTokenResidual, ReplaceSinkKey, evaluate, fit_constant_bias)
from sinkinterp.data import corpus_tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--json")
    args = parser.parse_args()
    model = sinkinterp.load_model(args.model)
    reference, evaluation = corpus_tokens(model, 16, 256)[8:], corpus_tokens(model, 8, 256)
    first = EditMassiveChannels.fit(model, reference)
    every = EditMassiveChannels.fit(model, reference, layers="all")
    rows = {
        "clean": [],
        "MaskSinkKey()": [MaskSinkKey()],
        "slot, moments": [fit_constant_bias(model, reference, method="moments")],
        "slot, gradient (30 steps, lr 0.01, no validation: the last step)": [
            fit_constant_bias(model, reference, method="gradient")],
        "slot, gradient (fit on 6, stopped on 2 held-out calibration sequences)": [
            fit_constant_bias(model, reference[:6], method="gradient", validation=reference[6:])],
        "ConstantAttentionBias(logit=0.0), no value": [ConstantAttentionBias(logit=0.0)],
        "AblateSinkValue() zero": [AblateSinkValue()],
        "AblateSinkValue mean": [AblateSinkValue.fit(model, reference, mode="mean")],
        "ReplaceSinkKey mean_other": [ReplaceSinkKey.fit(model, reference)],
        "ReplaceSinkKey patch": [ReplaceSinkKey.fit(model, reference[:1], mode="patch")],
        f"EditMassiveChannels zero, layer {first.layers[0]} only (fit default)": [first],
        "EditMassiveChannels mean, first layer": [EditMassiveChannels.fit(model, reference, mode="mean")],
        "EditMassiveChannels random control, first layer": [first.random_control(model, reference, seed=0)],
        "EditMassiveChannels zero, every layer": [every],
        "EditMassiveChannels mean, every layer": [EditMassiveChannels.fit(model, reference, layers="all", mode="mean")],
        "EditMassiveChannels random control, every layer": [every.random_control(model, reference, seed=0)],
        "PatchFirstTokenResidual mean": [PatchFirstTokenResidual.fit(model, "mean", reference=reference)],
        "PatchFirstTokenResidual <|endoftext|>": [PatchFirstTokenResidual.fit(model, "<|endoftext|>")],
    }
    table = {}
    for name, interventions in rows.items():
        all_queries = evaluate(model, evaluation, *interventions).mean()["loss"]
        late = evaluate(model, evaluation, *interventions, from_query=16).mean()["loss"]
        table[name] = {"loss": round(all_queries, 3), "loss_from_16": round(late, 3)}
        print(f"| {name} | {all_queries:.3f} | {late:.3f} |", flush=True)
    table["channels"] = {"first": list(first.channels), "first_layer": list(first.layers)}
    if args.json:
        atomic_write_json(args.json, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
