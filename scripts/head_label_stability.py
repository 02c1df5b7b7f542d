"""How stable are the head labels across seeds, with and without the non-sink-mass floor?

Runs the repeated-token and text scorers of ``classify_heads`` for several seeds (no needle
prompts, no greedy decoding) and prints, per floor: how many heads carry the same label set under
every seed, the heads whose labels change, and one named head's scores per seed.

    python scripts/head_label_stability.py --seeds 0 1 2 --head L18H8
"""

from __future__ import annotations

import argparse
import time

import sinkinterp
from sinkinterp._io import atomic_write_json
from sinkinterp.heads import DEFAULT_THRESHOLDS, MIN_NON_SINK_MASS, classify_heads
from sinkinterp.heads.classify import _labels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--head", default="L18H8")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    model = sinkinterp.load_model(args.model)
    tables = {}
    for seed in args.seeds:
        start = time.perf_counter()
        tables[seed] = classify_heads(model, seed=seed, greedy=False, qk=False, progress=False,
                                      scorers=["previous_token", "duplicate", "induction", "sink",
                                               "previous_token_tl", "duplicate_tl", "induction_tl"])
        print(f"seed {seed}: {time.perf_counter() - start:.0f} s")
    out = {"model": args.model, "seeds": args.seeds, "floors": {}}
    for floor in (0.0, MIN_NON_SINK_MASS):
        labels = {seed: [_labels(row, DEFAULT_THRESHOLDS, floor) for _, row in t.iterrows()] for seed, t in tables.items()}
        names = tables[args.seeds[0]]["name"].tolist()
        changing = [n for i, n in enumerate(names) if len({labels[s][i] for s in args.seeds}) > 1]
        counts = {s: {lab: sum(lab in ls for ls in labels[s]) for lab in ("previous-token", "duplicate", "induction")}
                  for s in args.seeds}
        out["floors"][str(floor)] = {"stable_heads": len(names) - len(changing), "n_heads": len(names),
                                     "changing": changing, "label_counts": counts}
        print(f"\nfloor {floor:g}: {len(names) - len(changing)} of {len(names)} heads keep their labels under "
              f"seeds {args.seeds}; changing: {', '.join(changing) or 'none'}")
        for s in args.seeds:
            print(f"  seed {s}: {counts[s]}")
    print(f"\n{args.head} per seed:")
    cols = ["induction", "induction_raw", "induction_tl", "induction_mass", "previous_token", "sink"]
    out["head"] = {}
    for seed, t in tables.items():
        row = t.set_index("name").loc[args.head]
        out["head"][seed] = {c: float(row[c]) for c in cols} | {"labels": list(row["labels"])}
        print(f"  seed {seed}: " + ", ".join(f"{c} {row[c]:.4f}" for c in cols) + f"; labels {row['labels']}")
    if args.json:
        atomic_write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
