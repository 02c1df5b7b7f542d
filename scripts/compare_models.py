"""The README's SmolLM2 | Gemma-3-270M table: every headline number, measured on one model per run.

For one embedded model (on this TransformerLens's default backend): the scan (32 corpus sequences of
64 tokens, the model's own first-token convention), sink ratios and first-token share with seeded
percentile-bootstrap 95% intervals over sequences, the stable massive channels, key/value norm
ratios and the value-weighted no-op gap over the sink heads, the built-in ``implicit-bias`` and
``no-op`` experiments at their default sizes, and the head classification at its defaults. Writes
``OUT/summary.json`` (every number, with the experiments' own folders beside it) and prints it.

    python scripts/compare_models.py --model gemma-3-270m --out runs/compare/gemma-3-270m
    python scripts/compare_models.py --model smollm2-135m --out runs/compare/smollm2-135m

Gemma-3 has no ``<|endoftext|>`` token: its implicit-bias run replaces the first token by
``<eos>`` in that condition instead (the only override besides the model).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sinkinterp import (
    classify_heads,
    find_massive_activations,
    load_model,
    model_source,
    qkv_geometry,
    sink_scores,
    stable_massive_channels,
    value_weighted_attention,
)
from sinkinterp._io import atomic_write_json
from sinkinterp.data import corpus_tokens, default_first_token
from sinkinterp.experiments import load_spec, run_experiment
from sinkinterp.stats import bootstrap_statistic
from sinkinterp.heads import top_heads
from sinkinterp.models import model_info

# Per model: overrides that make the built-in specs fit its vocabulary.
SPEC_OVERRIDES = {
    "gemma-3-270m": {"implicit-bias": {"conditions.7.first_token": "<eos>",
                                       "conditions.7.name": "first token replaced by <eos>"}},
}


def per_sequence_alpha(model, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha at k = 0 [seq, layer, head] and the first-token share [seq, layer], one sequence at a time."""
    alphas, shares = [], []
    for row in range(tokens.shape[0]):
        report = sink_scores(model, tokens[row : row + 1], progress=False)
        alphas.append(report.alpha_first)
        shares.append(report.first_token_share)
    return torch.stack(alphas), torch.stack(shares)


def scan_numbers(model, tokens) -> dict:
    report = sink_scores(model, tokens, progress=False)
    alpha, share = per_sequence_alpha(model, tokens)
    out = {"n_seqs": tokens.shape[0], "seq_len": tokens.shape[1], "first_token": default_first_token(model)}
    for eps in (0.3, 0.8):
        # Gu et al.'s sink ratio (what SinkReport.sink_ratio reports: each sequence's alpha is
        # thresholded) with its interval over sequences, and the ratio of the mean alpha beside it.
        estimate = bootstrap_statistic(lambda a, eps=eps: (a > eps).double().mean(dim=(1, 2, 3)), alpha)
        assert abs(estimate.value - report.sink_ratio[eps]) < 1e-9
        out[f"sink_ratio_{eps}"] = estimate.to_dict()
        of_mean = bootstrap_statistic(lambda a, eps=eps: (a.mean(dim=1) > eps).double().mean(dim=(1, 2)), alpha)
        assert abs(of_mean.value - report.sink_ratio_of_mean[eps]) < 1e-9
        out[f"sink_ratio_of_mean_{eps}"] = of_mean.to_dict()
    profile = share.mean(dim=0)
    out["first_token_share"] = [round(float(v), 3) for v in profile]
    out["first_token_share_mean"] = bootstrap_statistic(lambda s: s.mean(dim=(1, 2)), share).to_dict()
    low = int(profile.argmin())
    out["first_token_share_min"] = {"layer": low, "value": float(profile[low])}
    out["strongest_heads"] = report.strongest_heads(5).to_dict(orient="records")
    massive = find_massive_activations(model, tokens, progress=False)
    stable = stable_massive_channels(massive, min_fraction=0.5)
    out["massive_channels"] = stable.head(4).to_dict(orient="records")
    sink_heads = report.alpha_first.flatten() > 0.3
    geometry = qkv_geometry(model, tokens, progress=False)[sink_heads.numpy()]
    out["n_sink_heads"] = int(sink_heads.sum())
    out["k_norm_sink_over_other"] = float((geometry.k_sink_norm / geometry.k_other_norm).median())
    out["v_norm_sink_over_other"] = float((geometry.v_sink_norm / geometry.v_other_norm).median())
    out["cos_q_k_sink"] = float(geometry.cos_q_k_sink.mean())
    out["cos_q_k_other"] = float(geometry.cos_q_k_other.mean())
    weighted = value_weighted_attention(model, tokens, progress=False)[sink_heads.numpy()]
    out["attn_sink_share"] = float(weighted.attn_sink_share.mean())
    out["norm_sink_share"] = float(weighted.norm_sink_share.mean())
    return out


def experiment_numbers(model, name: str, out: Path) -> dict:
    overrides = {"model": model_source(model).name, **SPEC_OVERRIDES.get(model_source(model).name, {}).get(name, {})}
    spec = load_spec(name, overrides)
    results = run_experiment(spec, out / name, model=model, resume=(out / name).exists(), log=lambda *a: None)
    conditions = {}
    for condition in results["conditions"]:
        if "sweep" in condition:
            worst = max(condition["sweep"]["variants"], key=lambda v: v["loss"]["delta"]["value"])
            conditions[condition["name"]] = {"largest_layer_delta": {"layer": worst["layer"], **worst["loss"]["delta"]}}
            continue
        record = {"delta_loss": condition["metrics"]["loss"]["delta"]}
        if "recovery" in condition:
            record["recovery"] = condition["recovery"]["loss"]
        if "control" in condition:
            record["excess_over_control"] = condition["control"]["excess_loss"]
        conditions[condition["name"]] = record
    return {"clean_loss": results["clean"]["metrics"]["loss"], "conditions": conditions,
            "measurements": {k: {kk: vv for kk, vv in v.items() if kk not in ("per_sequence", "per_head", "sink_heads")}
                             for k, v in (results.get("measurements") or {}).items()},
            "verdicts": [{k: v.get(k) for k in ("hypothesis", "verdict")} for v in results["verdicts"]],
            "seconds": results["provenance"].get("seconds")}


def head_numbers(model, out: Path) -> dict:
    table = classify_heads(model, progress=False)
    table.drop(columns=["labels"]).assign(labels=table["labels"].map(list)).to_json(out / "heads.json", orient="records")
    counts = {}
    for labels in table["labels"]:
        for label in labels:
            counts[label] = counts.get(label, 0) + 1

    def top(score):
        rows = table.set_index(["layer", "head"])
        return [{"head": f"L{l}H{h}", score: round(float(rows.loc[(l, h), score]), 3)} for l, h in top_heads(table, score, 5)]

    return {"counts": counts, "induction": top("induction"), "recall": top("recall"),
            "greedy_reproduction_rate": table.attrs.get("greedy_reproduction_rate")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--skip", nargs="*", default=[], choices=["scan", "implicit-bias", "no-op", "heads"])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    summary_path = args.out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    model = load_model(args.model, backend=args.backend)
    summary["model"] = model_info(model)
    timings = summary.setdefault("seconds", {})
    steps = [("scan", lambda: scan_numbers(model, corpus_tokens(model, 32, 64))),
             ("implicit-bias", lambda: experiment_numbers(model, "implicit-bias", args.out)),
             ("no-op", lambda: experiment_numbers(model, "no-op", args.out)),
             ("heads", lambda: head_numbers(model, args.out))]
    for name, step in steps:
        if name in args.skip:
            continue
        start = time.perf_counter()
        summary[name] = step()
        timings[name] = round(time.perf_counter() - start, 1)
        atomic_write_json(summary_path, summary)
        print(f"{name}: {timings[name]} s", flush=True)
    print(json.dumps({k: v for k, v in summary.items() if k != "model"}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
