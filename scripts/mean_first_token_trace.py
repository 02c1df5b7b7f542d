"""Where does "first-token residual set to its mean, every layer" cost its loss? One layer at a time.

Notebook 02's split (24 corpus sequences of 128 tokens: the mean is fitted on the first 8 and the
loss measured on the other 16, queries i >= 16). Patches position 0's ``hook_resid_pre`` with the
mean over the calibration sequences at every layer, at each single layer, and at every layer but
the first; then the every-layer patch with means over other calibration sets: 4 or 8 sequences
drawn (seeded) from 24 further corpus sequences, disjoint from the evaluation ones.

    python scripts/mean_first_token_trace.py [--json OUT]
"""

from __future__ import annotations

import argparse
import random

import sinkinterp
from sinkinterp import PatchFirstTokenResidual, evaluate, paired_difference
from sinkinterp._io import atomic_write_json
from sinkinterp.data import corpus_tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json")
    args = parser.parse_args()
    model = sinkinterp.load_model()
    tokens = corpus_tokens(model, n_seqs=48, seq_len=128)
    reference, evaluation, pool = tokens[:8], tokens[8:24], tokens[24:]
    assert (tokens[:24] == corpus_tokens(model, n_seqs=24, seq_len=128)).all()  # notebook 02's tokens
    clean = evaluate(model, evaluation, from_query=16).loss

    def effect(source, layers=None):
        patch = PatchFirstTokenResidual.fit(model, "mean", reference=source, layers=layers)
        diff = paired_difference(evaluate(model, evaluation, patch, from_query=16).loss, clean)
        return {"value": round(diff.value, 4), "low": round(diff.low, 4), "high": round(diff.high, 4)}

    out = {"every layer": effect(reference), "layers 1-29": effect(reference, list(range(1, model.cfg.n_layers)))}
    print(f"every layer: {out['every layer']}\nlayers 1-29: {out['layers 1-29']}", flush=True)
    out["single layer"] = {}
    for layer in range(model.cfg.n_layers):
        out["single layer"][layer] = effect(reference, [layer])
        print(f"layer {layer}: {out['single layer'][layer]}", flush=True)
    out["calibration subsets"] = []
    for seed in range(6):
        for size in (4, 8):
            rows = sorted(random.Random(seed).sample(range(24), size))
            value = effect(pool[rows])
            out["calibration subsets"].append({"seed": seed, "size": size, "rows": rows, **value})
            print(f"subset {rows}: {value}", flush=True)
    if args.json:
        atomic_write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
