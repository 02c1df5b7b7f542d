"""Dump many of sinkinterp's numbers to JSON, to check that a refactor moves none of them.

    python scripts/pin_numbers.py out.json              # tiny models only (seconds)
    python scripts/pin_numbers.py out.json --smollm2    # and the embedded model (about 3 minutes)
    python scripts/pin_numbers.py new.json --compare old.json

Everything here goes through the public API (old import paths included, on purpose: they must keep
working). Comparison is exact: a refactor that changes no arithmetic changes no bit.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

warnings.simplefilter("ignore", DeprecationWarning)

import sinkinterp as si  # noqa: E402
from sinkinterp.experiments import ExperimentSpec, run_experiment  # noqa: E402
from sinkinterp.tiny import tiny_gpt2, tiny_llama  # noqa: E402

OUT: dict = {}


def plain(value):
    if isinstance(value, pd.DataFrame):
        return {str(c): plain(value[c].tolist()) for c in value.columns}
    if isinstance(value, pd.Series):
        return plain(value.tolist())
    if isinstance(value, torch.Tensor):
        return plain(value.detach().cpu().double().tolist())
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items() if k not in ("created", "seconds", "versions", "host",
                                                                          "command", "out", "git", "python")}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, (np.floating, np.integer)):
        return plain(value.item())
    if isinstance(value, (int, str, bool)) or value is None:
        return value
    return repr(value)


def record(name, value):
    OUT[name] = plain(value)


def run_spec(label, spec, model):
    with tempfile.TemporaryDirectory() as folder:
        run_experiment(spec, Path(folder) / "run", model=model, log=lambda *_: None)
        results = json.loads((Path(folder) / "run" / "results.json").read_text())
    results.pop("provenance", None)
    record(f"{label}/experiment", results)


TINY_SPEC = {
    "name": "tiny", "model": "tiny-llama",
    "data": {"source": "random", "seq_len": 32, "n_seqs": 6, "n_calibration": 3, "batch_size": 4},
    "loss_from": 8, "eps": 0.05, "metrics": ["loss", "kl", "accuracy", "sink_ratio"],
    "measurements": ["value_weighted"], "bootstrap": {"n_resamples": 200},
    "conditions": [
        {"name": "mask", "interventions": [{"type": "MaskSinkKey", "from_query": 8}]},
        {"name": "slot", "repairs": "mask",
         "interventions": [{"type": "ConstantAttentionBias", "from_query": 8, "fit": {"method": "gradient", "steps": 3}}]},
        {"name": "other first", "interventions": [{"type": "PatchFirstTokenResidual", "fit": {"source": "other"}}]},
        {"name": "random first", "first_token": "random"},
        {"name": "control", "control_for": "mask",
         "interventions": [{"type": "MaskSinkKey", "from_query": 8, "fit": {"position": "random"}}]},
        {"name": "massive", "interventions": [{"type": "EditMassiveChannels", "channels": [3], "mode": "mean",
                                                "layers": "all", "fit": {"control": "random"}}]},
        {"name": "value sweep", "sweep": "heads",
         "interventions": [{"type": "AblateSinkValue", "from_query": 8, "fit": {"mode": "mean"}}]},
        {"name": "key sweep", "sweep": "layers", "interventions": [{"type": "ReplaceSinkKey", "fit": {}}]},
        {"name": "heads", "interventions": [{"type": "AblateHeads", "heads": [[0, 1], [1, 2]], "from_query": 8, "fit": {}}]},
    ],
    "criteria": [
        {"hypothesis": "h", "kind": "recovers", "condition": "slot", "threshold": 0.8},
        {"hypothesis": "h", "kind": "exceeds_control", "condition": "mask", "threshold": 0.0},
        {"hypothesis": "g", "kind": "measurement_above", "measurement": "no_op_gap", "threshold": 0.0},
    ],
}


def measure_all(label, model, tokens, from_query):
    report = si.sink_scores(model, tokens)
    record(f"{label}/alpha", report.alpha)
    record(f"{label}/sink_ratio", report.sink_ratio)
    record(f"{label}/massive", si.find_massive_activations(model, tokens, min_abs=1.0, min_ratio=3.0))
    record(f"{label}/geometry", si.qkv_geometry(model, tokens))
    record(f"{label}/value_weighted", si.value_weighted_attention(model, tokens))
    qk = si.qk_massive_values(model, tokens)
    record(f"{label}/qk", {k: getattr(qk, k) for k in vars(qk)} if hasattr(qk, "__dict__") else repr(qk))
    result = si.scan(model, tokens, min_abs=1.0, min_ratio=3.0)
    record(f"{label}/scan", result.to_dict() if hasattr(result, "to_dict") else repr(result))
    calib, held = tokens[: len(tokens) // 2], tokens[len(tokens) // 2:]
    interventions = {
        "mask": si.MaskSinkKey(from_query=from_query),
        "value_zero": si.AblateSinkValue(mode="zero", from_query=from_query),
        "value_mean": si.AblateSinkValue.fit(model, calib, mode="mean", from_query=from_query),
        "key": si.ReplaceSinkKey.fit(model, calib),
        "massive": si.EditMassiveChannels.fit(model, calib, channels=[1, 2], layers="all"),
        "patch": si.PatchFirstTokenResidual.fit(model, "mean", reference=calib),
        "slot": si.fit_constant_bias(model, calib, from_query=from_query),
        "slot_gradient": si.fit_constant_bias(model, calib, from_query=from_query, method="gradient", steps=3),
        "heads": si.AblateHeads.fit(model, calib, heads=[(0, 0), (1, 1)], from_query=from_query),
    }
    for name, iv in interventions.items():
        record(f"{label}/intervention/{name}", iv.to_dict())
        extra = (interventions["mask"],) if name.startswith("slot") else ()
        record(f"{label}/evaluate/{name}", si.evaluate(model, held, *extra, iv, metrics=("loss", "kl", "accuracy"),
                                                      from_query=from_query).to_dict())


def new_spellings(value):
    """An experiment record from before the spec renames (loss_from -> from_query, a condition's
    first_token -> replace_first_token), in the new spelling: the numbers are what is compared.
    The spec's fingerprint (a hash of its canonical JSON) is left out: renaming a key changes it."""
    if isinstance(value, dict) and isinstance(value.get("spec"), dict):
        value = {k: v for k, v in value.items() if k != "fingerprint"}
        spec = dict(value["spec"])
        if "loss_from" in spec:
            spec["from_query"] = spec.pop("loss_from")
        spec["conditions"] = [{("replace_first_token" if k == "first_token" else k): v for k, v in c.items()}
                              for c in spec.get("conditions", [])]
        value = {**value, "spec": spec}
    return value


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--smollm2", action="store_true")
    parser.add_argument("--validate", action="store_true",
                        help="only the head classes and their causal validation on SmolLM2 (a minute or two)")
    parser.add_argument("--compare")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.validate:
        model = si.load_model()
        table = si.classify_heads(model, n_seqs=4, half_len=16, text_len=32, context_lens=(128,), n_prompts=2,
                                  depths=(0.5,), batch_size=2, progress=False)
        record("smollm2/heads", table)
        for ablation in ("mean", "zero"):
            validation = si.validate_heads(model, table, k=2, n_random=2, ablation=ablation, n_prompts=4,
                                           context_len=128, n_seqs=4, half_len=16, n_reference=4, batch_size=2,
                                           n_resamples=200, per_head=True)
            record(f"smollm2/validate/{ablation}", validation.to_dict())
    for label, builder in (() if args.validate else (("tiny-llama", tiny_llama), ("tiny-gpt2", tiny_gpt2))):
        model = builder()
        tokens = torch.randint(0, model.cfg.d_vocab, (8, 24), generator=torch.Generator().manual_seed(1))
        measure_all(label, model, tokens, 4)
        run_spec(label, ExperimentSpec.from_dict({**TINY_SPEC, "model": label}), model)
    if args.smollm2 and not args.validate:
        from sinkinterp.data import corpus_tokens

        model = si.load_model()
        tokens = corpus_tokens(model, n_seqs=8, seq_len=64)
        measure_all("smollm2", model, tokens, 16)
        record("smollm2/heads", si.classify_heads(model, n_seqs=4, half_len=16, text_len=32, context_lens=(128,),
                                                   n_prompts=2, depths=(0.5,), batch_size=2, progress=False))
        spec = {**TINY_SPEC, "model": "smollm2", "eps": 0.3, "loss_from": 16,
                "data": {"source": "corpus", "seq_len": 64, "n_seqs": 8, "n_calibration": 4, "batch_size": 4}}
        run_spec("smollm2", ExperimentSpec.from_dict(spec), model)
    Path(args.out).write_text(json.dumps(OUT, indent=1, sort_keys=True))
    print(f"{len(OUT)} items -> {args.out}")
    if args.compare:
        old = {k: new_spellings(v) for k, v in json.loads(Path(args.compare).read_text()).items()}
        new = {k: new_spellings(v) for k, v in OUT.items()}
        moved = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        for k in moved:
            print("MOVED:", k)
        print(f"{len(moved)} of {len(old)} items moved")
        sys.exit(1 if moved else 0)


if __name__ == "__main__":
    main()
