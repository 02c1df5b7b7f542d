"""A full per-head sink-value ablation sweep (``AblateSinkValue`` zero, every (layer, head)) on
the embedded model: the experiments' fast sweep vs the naive loop (one full forward per head),
measured in one run. Target: >= 2x faster, same per-sequence losses within 1e-4.

The fast sweep caches the clean ``hook_resid_pre`` of every layer once per mini-batch, starts each
head's variant at its layer (``start_at_layer``), stacks the heads of one layer along the batch,
and unembeds only the scored queries. Both sides compute the same per-sequence metrics (loss over
queries i >= --loss-from) with the same function.
"""

import argparse
import time

import torch

from sinkinterp import load_model
from sinkinterp.data import corpus_tokens
from sinkinterp.experiments.sweep import fast_sweep, naive_sweep, sweep_variants
from sinkinterp.interventions import AblateSinkValue

TARGET = 2.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-seqs", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--loss-from", type=int, default=16)
    parser.add_argument("--max-rows", type=int, default=36, help="rows per stacked forward in the fast sweep")
    args = parser.parse_args()

    torch.set_num_threads(torch.get_num_threads())
    model = load_model()
    tokens = corpus_tokens(model, args.n_seqs, args.seq_len)
    variants = sweep_variants(model, [AblateSinkValue(from_query=1)], "heads")
    metrics = ("loss",)  # what an experiment's sweep reports: the per-head loss effect
    print(f"per-head sweep: {len(variants)} variants on {args.n_seqs} x {args.seq_len} corpus tokens, "
          f"{torch.get_num_threads()} threads")

    model(tokens[:1, :8])  # warm-up
    start = time.perf_counter()
    fast = fast_sweep(model, tokens, variants, loss_from=args.loss_from, metrics=metrics,
                      batch_size=args.n_seqs, max_rows=args.max_rows)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    naive = naive_sweep(model, tokens, variants, loss_from=args.loss_from, metrics=metrics, batch_size=args.n_seqs)
    naive_s = time.perf_counter() - start

    diff = max(float((f[k] - n[k]).abs().max()) for f, n in zip(fast, naive) for k in metrics)
    worst = max(range(len(variants)), key=lambda i: float(naive[i]["loss"].mean()))
    print(f"naive loop: {naive_s:7.1f} s  ({naive_s / len(variants):.2f} s per head)")
    print(f"fast sweep: {fast_s:7.1f} s  ({fast_s / len(variants):.2f} s per head)")
    print(f"speed-up: {naive_s / fast_s:.2f} x (target >= {TARGET} x)")
    print(f"max |fast - naive| over per-sequence losses: {diff:.2e} (must be <= 1e-4)")
    print(f"most harmful head: L{variants[worst].layer}H{variants[worst].head}, "
          f"loss {float(naive[worst]['loss'].mean()):.4f}")
    ok = diff <= 1e-4 and naive_s / fast_s >= TARGET
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
