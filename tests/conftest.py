"""Test tiers: unit tests on tiny random models (milliseconds); integration tests on the embedded
models (one session-scoped load each from the weight cache; the first run converts the GGUF).

``make test`` runs the whole suite on TransformerLens 4.x (TransformerBridge only), then the tests
marked ``backend`` again on TransformerLens 3.9, where ``backend="auto"`` is HookedTransformer and
the bridge is loaded beside it. Tests that compare the two backends run in that second pass.
"""

import os

# Tests never touch the hub: anything that tries fails at once instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from sinkinterp import load_model, model_source
from sinkinterp.backends import HOOKED_AVAILABLE
from sinkinterp.data import corpus_tokens

#: For tests that compare HookedTransformer with TransformerBridge: they need TransformerLens < 4.
both_backends = pytest.mark.skipif(
    not HOOKED_AVAILABLE,
    reason="compares HookedTransformer with TransformerBridge, which needs TransformerLens < 4: "
    "it runs in make test's TransformerLens 3.9 pass",
)


def _hf(model):
    """The transformers model read from the same cache, with eager attention (the reference)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        model_source(model).cache_dir, dtype=torch.float32, attn_implementation="eager"
    )
    return hf.eval()


def _embedded_fixtures(name: str, prefix: str):
    """Session fixtures ``prefix`` (backend='auto': HookedTransformer on TransformerLens 3.x,
    TransformerBridge on 4.x), ``prefix_bridge`` (the same object where auto is the bridge) and
    ``prefix_hf`` for the embedded model ``name``."""

    @pytest.fixture(scope="session")
    def model():
        return load_model(name)

    @pytest.fixture(scope="session")
    def bridge(request):
        default = request.getfixturevalue(prefix)
        return default if model_source(default).backend == "bridge" else load_model(name, backend="bridge")

    @pytest.fixture(scope="session")
    def hf(request):
        return _hf(request.getfixturevalue(prefix))

    return model, bridge, hf


smollm2, smollm2_bridge, smollm2_hf = _embedded_fixtures("smollm2-135m", "smollm2")
gemma, gemma_bridge, gemma_hf = _embedded_fixtures("gemma-3-270m", "gemma")


@pytest.fixture
def session_smollm2(smollm2, monkeypatch):
    """The CLI's model load answered by the session's SmolLM2, for the tests of what the commands do
    with a model (argument errors, outputs): each would otherwise pay a fresh load (~8 s). Loading
    itself is tested by test_info_prints_and_writes_json, the demo and tests/test_models.py."""
    import sinkinterp.cli as cli

    def load(name, backend="auto", **kwargs):
        assert (name, backend, kwargs) == ("smollm2-135m", "auto", {}), (name, backend, kwargs)
        return smollm2

    monkeypatch.setattr(cli, "load_model", load)
    return smollm2


@pytest.fixture(scope="session")
def corpus_batch(smollm2):
    """Two sequences of 160 real tokens from the offline corpus (320 tokens in all)."""
    return corpus_tokens(smollm2, 2, 160)


def captured(model, tokens, names, *interventions) -> dict:
    """The activations at ``names`` in a forward pass under ``interventions`` (copies)."""
    from sinkinterp.interventions import intervene

    seen = {}
    keepers = [(name, lambda x, hook, name=name: seen.__setitem__(name, x.detach().clone())) for name in names]
    with intervene(model, *interventions):
        model.run_with_hooks(tokens, fwd_hooks=keepers)
    return seen


def n_hooks(model) -> int:
    """Forward hooks attached to ``model`` right now (0 after any intervention block, even one that raised)."""
    return sum(len(point.fwd_hooks) for point in model.hook_dict.values())


# --------------------------------------------------------------------------------------------
# Test tiers, enforced: a test that loads an embedded model must be marked integration


EMBEDDED_FIXTURES = {"smollm2", "smollm2_bridge", "smollm2_hf", "gemma", "gemma_bridge", "gemma_hf", "corpus_batch"}


def pytest_collection_modifyitems(config, items):
    unmarked = [item.nodeid for item in items
                if EMBEDDED_FIXTURES & set(getattr(item, "fixturenames", ())) and "integration" not in item.keywords]
    if unmarked:
        raise pytest.UsageError("tests use an embedded model without the integration marker: " + ", ".join(unmarked))


@pytest.fixture(autouse=True)
def _unit_tests_load_no_embedded_model(request, monkeypatch):
    """A unit test (no integration marker) that reaches a GGUF load fails at once: it would make the
    unit tier minutes long and depend on the weight cache."""
    if "integration" in request.keywords:
        return
    import sinkinterp.models

    def refuse(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} loads an embedded model: mark it integration")

    monkeypatch.setattr(sinkinterp.models, "_load_gguf", refuse)
