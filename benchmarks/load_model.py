"""Cold vs warm load of the embedded model, measured in one run.

Cold: an empty weight cache, so the GGUF is read, dequantised, converted and folded.
Warm: the cache written by the cold load. Target: warm <= 0.3 x cold.
Imports are done before timing, so both figures are the load itself.
"""

import os
import statistics
import sys
import tempfile
import time

import torch  # noqa: F401  (imported before timing)
import transformer_lens  # noqa: F401
import transformers  # noqa: F401

from sinkinterp import load_model

TARGET = 0.3


def timed(**kwargs) -> float:
    start = time.perf_counter()
    model = load_model(**kwargs)
    elapsed = time.perf_counter() - start
    del model
    return elapsed


def main() -> int:
    with tempfile.TemporaryDirectory() as cache:
        os.environ["SINKINTERP_CACHE"] = cache
        cold = timed()
        warm = statistics.median(timed() for _ in range(3))
        warm_bridge = statistics.median(timed(backend="bridge") for _ in range(2))
    ratio = warm / cold
    print(f"cold load (no cache)        {cold:7.2f} s")
    print(f"warm load (cache, median 3) {warm:7.2f} s")
    print(f"warm/cold ratio             {ratio:7.3f}  (target <= {TARGET})")
    print(f"warm bridge load (median 2) {warm_bridge:7.2f} s")
    ok = ratio <= TARGET
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
