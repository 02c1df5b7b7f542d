"""Cold vs warm load of an embedded model, measured in one run, on this TransformerLens.

Cold: an empty weight cache, so the GGUF is read (assembled from its parts, for Gemma-3),
dequantised, converted and, for a HookedTransformer, folded. Warm: the cache written by the cold
load. Target: warm <= 0.3 x cold. Imports are done before timing, so both figures are the load.

    python benchmarks/load_model.py [--model smollm2-135m|gemma-3-270m] [--backend auto|hooked|bridge]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch  # noqa: F401  (imported before timing)
import transformer_lens  # noqa: F401
import transformers  # noqa: F401

from sinkinterp import load_model, model_source
from sinkinterp.backends import TL_VERSION

TARGET = 0.3


def timed(**kwargs) -> tuple[float, str]:
    start = time.perf_counter()
    model = load_model(**kwargs)
    elapsed = time.perf_counter() - start
    backend = model_source(model).backend
    del model
    return elapsed, backend


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["SINKINTERP_CACHE"] = cache
        cold, backend = timed(name=args.model, backend=args.backend)
        warm = statistics.median(timed(name=args.model, backend=args.backend)[0] for _ in range(3))
    ratio = warm / cold
    print(f"{args.model}, backend {backend}, TransformerLens {'.'.join(map(str, TL_VERSION))}")
    print(f"cold load (no cache)        {cold:7.2f} s")
    print(f"warm load (cache, median 3) {warm:7.2f} s")
    print(f"warm/cold ratio             {ratio:7.3f}  (target <= {TARGET})")
    ok = ratio <= TARGET
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
