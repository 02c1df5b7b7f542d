"""Paper results reproduced on one model, for the README's table next to the papers' numbers:

- Sun et al. 2024: the massive channels set to zero / to their mean at the first layer where they
  are massive (one layer, as the paper), with the matched random-channel control;
- Barbero et al. 2025: the same text with and without the BOS token in front (``bos_test``);
- StreamingLLM (Xiao et al. 2024): the built-in ``window-attention`` spec (window 256 at T = 2048,
  0 / 1 / 2 / 4 initial tokens kept);
- Jin et al. 2025: the top-1 and top-2 rotated q/k channels of every head replaced by their mean,
  against the lowest channels, on 40 passkey prompts (contextual) and the built-in facts, bare and
  behind as much filler (parametric) (``qk_disruption_test``).

    python scripts/reproductions.py --model smollm2-135m --out runs/reproductions-smollm2 [--skip-window] [--only-jin]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import sinkinterp
from sinkinterp._io import atomic_write_json
from sinkinterp.data import corpus_tokens
from sinkinterp.experiments import bos_test, load_spec, qk_disruption_test, run_experiment
from sinkinterp.interventions import EditMassiveChannels
from sinkinterp.measure import formation_trace
from sinkinterp.stats import bootstrap_mean, paired_difference


def sun_et_al(model) -> dict:
    """The detector's channels edited at one layer: the first where they are massive (Sun et al.),
    and the step-up block of the largest one (the formation trace), where they differ."""
    tokens = corpus_tokens(model, 16, 256, seed=0)
    reference, evaluation = tokens[:8], tokens[8:]
    zero = EditMassiveChannels.fit(model, reference)
    mean = EditMassiveChannels.fit(model, reference, mode="mean")
    control = zero.random_control(model, reference, seed=0)
    step = formation_trace(model, reference).step_layer()  # of the largest stable channel
    edits = [("zero", zero), ("mean", mean), ("random control (zero)", control)]
    if (step,) != tuple(zero.layers):
        at_step = EditMassiveChannels.fit(model, reference, channels=zero.channels, layers=(step,))
        at_step_mean = EditMassiveChannels.fit(model, reference, channels=zero.channels, layers=(step,), mode="mean")
        edits += [(f"zero at the step-up block {step}", at_step), (f"mean at the step-up block {step}", at_step_mean),
                  (f"random control (zero) at block {step}", at_step.random_control(model, reference, seed=0))]
    clean = sinkinterp.evaluate(model, evaluation).values["loss"]
    rows = {"clean": {"loss": bootstrap_mean(clean).to_dict()}}
    for name, edit in edits:
        loss = sinkinterp.evaluate(model, evaluation, edit).values["loss"]
        rows[name] = {"loss": bootstrap_mean(loss).to_dict(), "delta": paired_difference(loss, clean).to_dict(),
                      "channels": list(edit.channels), "layers": list(edit.layers)}
    return rows


def jin_et_al(model) -> dict:
    """Massive-value disruption at top-1 and top-2 channels per head (1000 resamples)."""
    record = {}
    for top_k in (1, 2):
        result = qk_disruption_test(model, top_k=top_k, n_passkey=40, n_resamples=1000, progress=False)
        print(result.summary())
        record[f"top_{top_k}"] = result.to_dict()
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", required=True)
    parser.add_argument("--skip-window", action="store_true", help="leave out the T = 2048 window table")
    parser.add_argument("--only-sun", action="store_true", help="only the Sun et al. edits")
    parser.add_argument("--only-jin", action="store_true", help="only the Jin et al. disruption")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = sinkinterp.load_model(args.model)
    record: dict = {"model": args.model, "seconds": {}}
    if args.only_jin:
        start = time.perf_counter()
        record["jin"] = jin_et_al(model)
        record["seconds"]["jin"] = time.perf_counter() - start
        atomic_write_json(out / "jin.json", record)
        return 0
    start = time.perf_counter()
    record["sun"] = sun_et_al(model)
    record["seconds"]["sun"] = time.perf_counter() - start
    for name, row in record["sun"].items():
        extra = f" delta {row['delta']['value']:+.3f} [{row['delta']['low']:+.3f}, {row['delta']['high']:+.3f}]" \
            if "delta" in row else ""
        print(f"Sun et al. {name}: loss {row['loss']['value']:.3f}{extra} {row.get('channels', '')} {row.get('layers', '')}")
    if args.only_sun:
        atomic_write_json(out / "sun.json", record)
        return 0
    start = time.perf_counter()
    bos = bos_test(model, progress=False)
    record["barbero"] = bos.to_dict()
    record["seconds"]["barbero"] = time.perf_counter() - start
    print(bos.summary())
    if not args.skip_window:
        start = time.perf_counter()
        spec = load_spec("window-attention", overrides={"model": args.model})
        results = run_experiment(spec, out / "window-attention", model=model, resume=(out / "window-attention").exists())
        record["window"] = {c["name"]: c["metrics"]["loss"] for c in results["conditions"]}
        record["window"]["clean"] = results["clean"]["metrics"]["loss"] if "clean" in results else None
        record["seconds"]["window"] = time.perf_counter() - start
        for name, loss in record["window"].items():
            if loss:
                print(f"window attention {name}: {loss}")
    start = time.perf_counter()
    record["jin"] = jin_et_al(model)
    record["seconds"]["jin"] = time.perf_counter() - start
    atomic_write_json(out / "reproductions.json", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
