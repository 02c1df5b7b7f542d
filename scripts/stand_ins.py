"""The README's stand-in table: the built-in ``stand-ins`` spec on one model, plus where each
stand-in puts the attention afterwards and (for the gates) the mean gate value.

Runs (or resumes) ``sinkinterp run stand-ins --model M --out OUT``, then rebuilds the spec's
held-out evaluation split and, under each condition's fitted interventions (read back from
results.json), measures ``attention_budget`` (first-token share, slot share, the largest other
key's share; means over layers) and ``OutputGate.mean_gate``. Writes OUT/stand_ins_summary.json.

    python scripts/stand_ins.py --model smollm2-135m --out runs/stand-ins-smollm2 [--set data.n_seqs=8 ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

import sinkinterp
from sinkinterp._io import atomic_write_json
from sinkinterp.data import corpus_documents, corpus_tokens
from sinkinterp.experiments import load_spec, run_experiment
from sinkinterp.interventions import Intervention, OutputGate, intervene
from sinkinterp.measure import attention_budget


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec key, as `sinkinterp run --set` (e.g. data.n_seqs=8)")
    args = parser.parse_args()
    out = Path(args.out)
    overrides = {"model": args.model}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    spec = load_spec("stand-ins", overrides=overrides)
    model = sinkinterp.load_model(args.model)
    results = run_experiment(spec, out, model=model, resume=(out / "results.json").exists() or out.exists())
    data = spec.data
    tokens = corpus_tokens(model, data.n_calibration + data.n_seqs, data.seq_len, text=corpus_documents(),
                           first_token=data.first_token, seed=data.seed, sampling=data.sampling)
    evaluation = tokens[data.n_calibration:]
    clean = attention_budget(model, evaluation, from_query=spec.from_query, progress=False)
    rows = [{"condition": "clean", **{k: float(clean[k].mean()) for k in ("first_share", "slot_share",
                                                                           "top_other_share")}}]
    for entry in results["conditions"]:
        interventions = [Intervention.from_dict(record) for record in entry["interventions"]]
        with intervene(model, *interventions):
            budget = attention_budget(model, evaluation, from_query=spec.from_query, progress=False)
        row = {"condition": entry["name"], "loss_delta": entry["metrics"]["loss"]["delta"],
               **{k: float(budget[k].mean()) for k in ("first_share", "slot_share", "top_other_share")}}
        if "recovery" in entry:
            row["recovery"] = entry["recovery"]["loss"]
            row["beats_clean"] = entry["recovery"]["beats_clean"]
        gates = [iv for iv in interventions if isinstance(iv, OutputGate)]
        if gates:
            row["mean_gate"] = float(gates[0].mean_gate(model, evaluation).mean())
        fit_log = entry["interventions"][-1].get("fit_log")
        if fit_log:
            row["kept_step"], row["steps_run"] = fit_log["kept_step"], fit_log["steps_run"]
        rows.append(row)
    atomic_write_json(out / "stand_ins_summary.json", {"model": args.model, "overrides": overrides, "rows": rows})
    print(f"| condition ({args.model}) | Δ loss [95% CI] | recovery [95% CI] | first-token share | slot share | "
          "largest other key | mean gate |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        delta = row.get("loss_delta")
        rec = row.get("recovery")
        print(f"| {row['condition']} | "
              + (f"{delta['value']:+.3f} [{delta['low']:+.3f}, {delta['high']:+.3f}]" if delta else "")
              + " | " + (f"{rec['value']:.2f} [{rec['low']:.2f}, {rec['high']:.2f}]" if rec else "")
              + f" | {row['first_share']:.3f} | {row['slot_share']:.3f} | {row['top_other_share']:.3f} | "
              + (f"{row['mean_gate']:.3f}" if "mean_gate" in row else "") + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
