"""Peak memory and time of sink_scores vs run_with_cache of every hook_pattern vs a plain forward,
on the embedded model at T = 1024, measured in one run.

Targets (issue 3): sink_scores' memory above a plain forward <= 20% of what the full pattern
cache adds above a plain forward; sink_scores' time <= 1.2 x a plain forward.

Memory is the process's peak resident set (VmHWM) during the call minus the resident set just
before it; writing 5 to /proc/self/clear_refs resets the peak between calls (Linux). glibc's
dynamic mmap threshold is pinned (after the timings), so freed tensors go back to the OS and the resident set
follows live memory. All three calls skip the unembedding (return_type=None), so they differ only
in what the hooks keep.
"""

import argparse
import ctypes
import gc
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from sinkinterp import load_model
from sinkinterp.data import corpus_tokens
from sinkinterp.measure import sink_scores

MEMORY_TARGET = 0.20
TIME_TARGET = 1.2
_M_MMAP_THRESHOLD = -3


def pin_mmap_threshold(nbytes: int = 1 << 20) -> None:
    ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, nbytes)


def resident_mib(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) / 1024


def timed_peak(fn):
    """Seconds ``fn()`` took, the MiB by which the resident set peaked above its level at the start,
    and what ``fn`` returned."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    start_mib = resident_mib("VmRSS")
    start = time.perf_counter()
    value = fn()
    elapsed = time.perf_counter() - start
    return elapsed, resident_mib("VmHWM") - start_mib, value


def peak_above_start(fn) -> float:
    """MiB by which the resident set peaked above its level at the start of ``fn()``."""
    _, peak, result = timed_peak(fn)
    del result
    gc.collect()
    return peak


def seconds(fn) -> float:
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    del result
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--n-seqs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per method (median)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = load_model()
    tokens = corpus_tokens(model, args.n_seqs, args.seq_len)
    is_pattern = lambda name: name.endswith("hook_pattern")  # noqa: E731

    def plain():
        with torch.inference_mode():
            return model(tokens, return_type=None)

    def scores():
        return sink_scores(model, tokens, batch_size=args.n_seqs, progress=False)

    def cached():
        with torch.inference_mode():
            return model.run_with_cache(tokens, names_filter=is_pattern, return_type=None)

    methods = {"plain forward": plain, "sink_scores": scores, "run_with_cache(hook_pattern)": cached}
    for fn in methods.values():  # warm-up: first calls allocate caches and workspaces
        seconds(fn)
    times = {name: [] for name in methods}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits every method alike
        for name, fn in methods.items():
            times[name].append(seconds(fn))
    median = {name: statistics.median(values) for name, values in times.items()}
    # Memory after timing: the pinned threshold makes every large tensor a fresh mmap, which keeps
    # the resident set honest but adds page faults that would slow all three timings alike.
    pin_mmap_threshold()
    memory = {name: peak_above_start(fn) for name, fn in methods.items()}

    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    cache_mib = n_layers * args.n_seqs * n_heads * args.seq_len**2 * 4 / 2**20
    print(f"embedded model, {args.n_seqs} x {args.seq_len} tokens, {torch.get_num_threads()} threads")
    print(f"a full pattern cache is {n_layers} x {n_heads} x {args.seq_len}^2 floats = {cache_mib:,.0f} MiB")
    print(f"{'method':<30} {'peak above start':>17} {'time (median of ' + str(args.repeats) + ')':>20}")
    for name in methods:
        print(f"{name:<30} {memory[name]:>13,.0f} MiB {median[name]:>18.2f} s")

    plain_mib = memory["plain forward"]
    memory_ratio = (memory["sink_scores"] - plain_mib) / (memory["run_with_cache(hook_pattern)"] - plain_mib)
    time_ratio = median["sink_scores"] / median["plain forward"]
    print(f"sink_scores memory overhead / pattern-cache overhead  {memory_ratio:6.3f}  (target <= {MEMORY_TARGET})")
    print(f"sink_scores time / plain forward time                 {time_ratio:6.3f}  (target <= {TIME_TARGET})")
    print(f"run_with_cache time / plain forward time              {median['run_with_cache(hook_pattern)'] / median['plain forward']:6.3f}")
    ok = memory_ratio <= MEMORY_TARGET and time_ratio <= TIME_TARGET
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
