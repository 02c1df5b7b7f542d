"""Long contexts on the embedded model: the scan at T = 2048, 4096 and 8192 against a plain forward
at the same T (time, and peak memory above the start), measured in one run; and the sink against
length: alpha at the first token, the first-token share and the value-weighted sink share as T grows.

Targets at T = 8192: the scan's memory above a plain forward <= 20% of what a full pattern cache
would add (layers x heads x T^2 float32: 72 GiB for SmolLM2, more than this machine has, so it is
computed, not run; at T = 2048 run_with_cache of every hook_pattern is run too, to check the figure),
and the scan's time <= 1.2 x a plain forward.

Every length cuts the same text: the offline corpus's documents joined by blank lines
(``sampling="consecutive"``), its first ``--tokens`` tokens as ``--tokens / T`` rows of T tokens,
each starting with the model's own first token. Memory is the process's peak resident set (VmHWM)
above its level at the start of the call (benchmarks/scan_memory.py has the method); glibc's mmap
threshold is pinned for the whole run, so both the plain forward and the scan are timed with freed
memory going back to the OS (their ratio is fair; their absolute times include those page faults).

    python benchmarks/long_context.py [--lengths 2048,4096,8192] [--tokens 16384] [--json out.json]
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from scan_memory import pin_mmap_threshold, timed_peak  # noqa: E402

from sinkinterp import load_model, model_source  # noqa: E402
from sinkinterp.data import corpus_tokens  # noqa: E402
from sinkinterp.measure import scan, value_weighted_attention  # noqa: E402

MEMORY_TARGET = 0.20
TIME_TARGET = 1.2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--lengths", default="256,512,1024,2048,4096,8192",
                        help="the curve's lengths; the scan is timed against a plain forward at those >= 2048")
    parser.add_argument("--tokens", type=int, default=16384, help="text tokens cut at every length")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed calls per method at each timed length (median time, largest peak)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    pin_mmap_threshold()  # freed tensors go back to the OS, so the resident set follows live memory
    model = load_model(args.model)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    print(f"{args.model}, backend {model_source(model).backend}, {torch.get_num_threads()} threads; "
          f"{args.tokens} corpus tokens at every length", flush=True)
    out = {"model": args.model, "backend": model_source(model).backend, "tokens": args.tokens, "lengths": {}}
    ok = True
    lengths = [int(T) for T in args.lengths.split(",")]
    for T in lengths:
        tokens = corpus_tokens(model, args.tokens // T, T, sampling="consecutive")
        row: dict = {"n_seqs": tokens.shape[0]}

        def plain(tokens=tokens):
            with torch.inference_mode():
                for i in range(tokens.shape[0]):
                    model(tokens[i:i + 1], return_type=None)

        def scanned(tokens=tokens):
            return scan(model, tokens, batch_size=1, progress=False)

        result = None
        if T >= 2048:
            model(tokens[:1, :64])  # warm-up
            measured = {"plain": [], "scan": []}
            for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
                for name, fn in (("plain", plain), ("scan", scanned)):
                    seconds, peak, value = timed_peak(fn)
                    measured[name].append((seconds, peak))
                    if name == "scan":
                        result = value
                    del value
            cache_mib = n_layers * n_heads * T * T * 4 / 2**20  # one sequence at a time
            row.update({f"{name}_s": statistics.median(s for s, _ in v) for name, v in measured.items()},
                       **{f"{name}_peak_mib": max(m for _, m in v) for name, v in measured.items()},
                       pattern_cache_mib=cache_mib)
            memory = {name: row[f"{name}_peak_mib"] for name in measured}
            if T == 2048:
                def cached(tokens=tokens):
                    with torch.inference_mode():
                        return model.run_with_cache(tokens[:1], names_filter=lambda n: n.endswith("hook_pattern"),
                                                    return_type=None)
                row["run_with_cache_peak_mib"] = timed_peak(cached)[1]
                row["run_with_cache_added_mib"] = row["run_with_cache_peak_mib"] - memory["plain"]
            row["memory_ratio"] = (memory["scan"] - memory["plain"]) / cache_mib
            row["time_ratio"] = row["scan_s"] / row["plain_s"]
            print(f"T = {T:5d} ({tokens.shape[0]} rows): plain forward {row['plain_s']:6.1f} s, peak +{memory['plain']:,.0f} MiB; "
                  f"scan {row['scan_s']:6.1f} s, peak +{memory['scan']:,.0f} MiB; full pattern cache would add "
                  f"{cache_mib:,.0f} MiB" + (f" (measured at this T: {row['run_with_cache_added_mib']:,.0f} MiB)"
                                             if T == 2048 else ""))
            print(f"           scan memory overhead / pattern cache {row['memory_ratio']:.4f} (target <= "
                  f"{MEMORY_TARGET}), scan time / plain forward {row['time_ratio']:.3f} (target <= {TIME_TARGET})",
                  flush=True)
            if T == max(lengths):
                ok &= row["memory_ratio"] <= MEMORY_TARGET and row["time_ratio"] <= TIME_TARGET
        if result is None:
            result = scanned()
        alpha0 = result.sinks.alpha[:, :, 0]  # [layer head]
        share = result.sinks.first_token_share  # per layer
        row["value_weighted_s"], _, weighted = timed_peak(
            lambda: value_weighted_attention(model, tokens, batch_size=1, progress=False))
        row.update({
            "alpha0_mean": float(alpha0.mean()), "alpha0_max": float(alpha0.max()),
            "sink_ratio": {str(e): float(v) for e, v in result.sinks.sink_ratio.items()},
            "first_token_share_mean": float(share.mean()), "first_token_share_max": float(share.max()),
            "first_token_share_max_layer": int(share.argmax()),
            "first_token_share": share.tolist(),
            "norm_sink_share_mean": float(weighted["norm_sink_share"].mean()),
            "attn_sink_share_mean": float(weighted["attn_sink_share"].mean()),
            "n_massive": int(len(result.massive)),
            "n_massive_per_seq": len(result.massive) / tokens.shape[0],
            "massive_channels": sorted(int(c) for c in result.massive["channel"].unique()),
            "massive_positions": sorted(int(p) for p in result.massive["position"].unique()),
        })
        print(f"T = {T:5d}: alpha at the first token, mean over heads {row['alpha0_mean']:.3f} (max {row['alpha0_max']:.3f}); "
              f"first-token share mean {row['first_token_share_mean']:.3f}, max {row['first_token_share_max']:.3f} "
              f"(L{row['first_token_share_max_layer']}); value-weighted sink share {row['norm_sink_share_mean']:.3f} "
              f"(attention {row['attn_sink_share_mean']:.3f}); {row['n_massive_per_seq']:.1f} massive activations per sequence (channels "
              f"{row['massive_channels']}, positions {row['massive_positions'][:8]})", flush=True)
        out["lengths"][T] = row
    print("PASS" if ok else "FAIL")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
