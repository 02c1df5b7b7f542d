"""Test tiers: unit tests on tiny random models (milliseconds); integration tests on the embedded
SmolLM2 (one session-scoped load from the weight cache; the first run converts the GGUF, ~1 min)."""

import os

# Tests never touch the hub: anything that tries fails at once instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from sinkinterp import load_model
from sinkinterp.data import corpus_tokens


@pytest.fixture(scope="session")
def smollm2():
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_bridge():
    return load_model("smollm2-135m", backend="bridge")


@pytest.fixture(scope="session")
def smollm2_hf(smollm2):
    """The transformers model read from the same cache, with eager attention (the reference)."""
    from transformers import LlamaForCausalLM

    from sinkinterp import model_source

    hf = LlamaForCausalLM.from_pretrained(
        model_source(smollm2).cache_dir, dtype=torch.float32, attn_implementation="eager"
    )
    return hf.eval()


@pytest.fixture(scope="session")
def corpus_batch(smollm2):
    """Two sequences of 160 real tokens from the offline corpus (320 tokens in all)."""
    return corpus_tokens(smollm2, 2, 160)
