import pytest
import torch

from sinkinterp import SinkInterpError, model_source
from sinkinterp.tiny import tiny_gpt2, tiny_llama

pytestmark = pytest.mark.backend  # runs again on TransformerLens 3.9 (make test)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_tiny_models_run_and_are_seeded(build):
    tokens = torch.arange(12).reshape(2, 6)
    a, b, c = build(seed=0), build(seed=0), build(seed=1)
    with torch.no_grad():
        logits = a(tokens)
        assert logits.shape == (2, 6, a.cfg.d_vocab)
        torch.testing.assert_close(logits, b(tokens), rtol=0, atol=0)
        assert not torch.allclose(logits, c(tokens))
    assert model_source(a).origin == "config" and model_source(a).prepend_bos is False


def test_building_does_not_move_the_global_seed():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_llama(seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_llama_is_grouped_query_rotary_rms():
    model = tiny_llama()
    cfg = model.cfg
    assert (cfg.n_heads, cfg.n_key_value_heads) == (6, 2)
    assert cfg.positional_embedding_type == "rotary" and cfg.normalization_type == "RMS"
    _, cache = model.run_with_cache(torch.arange(5)[None], names_filter=lambda n: n.endswith(("hook_k", "hook_pattern")))
    assert cache["blocks.0.attn.hook_k"].shape == (1, 5, 2, 8)  # kv heads
    assert cache["blocks.0.attn.hook_pattern"].shape == (1, 6, 5, 5)  # query heads


def test_tiny_gpt2_is_layernorm_learned_positions():
    cfg = tiny_gpt2(n_layers=3).cfg
    assert cfg.n_layers == 3 and cfg.normalization_type == "LN"
    assert cfg.positional_embedding_type == "standard" and cfg.n_key_value_heads is None


def test_model_source_of_a_foreign_model():
    with pytest.raises(SinkInterpError, match=r"Linear carries no sinkinterp provenance"):
        model_source(torch.nn.Linear(2, 2))
