"""Integration: Gemma-3-270M, the second embedded model (one kv head per layer, sliding windows,
QK-norm, a 262k vocabulary, BOS by convention), on whichever backends this TransformerLens has."""

import json

import pytest
import torch

from sinkinterp import SinkInterpError, model_source, sink_scores
from sinkinterp.backends import attention_windows, is_hooked_transformer
from sinkinterp.data import corpus_tokens, default_first_token
from sinkinterp.interventions import MaskSinkKey, ReplaceSinkKey, intervene
from sinkinterp.models import EMBEDDED_MODELS, _sha256_of, _embedded_files, _EMBEDDED, model_info

from conftest import both_backends

pytestmark = [pytest.mark.integration, pytest.mark.backend]


@pytest.fixture(scope="module")
def tokens(gemma):
    return corpus_tokens(gemma, 4, 64)  # <bos> + 63 text tokens: the model's own convention


def test_gemma_is_embedded_with_its_bos_convention(gemma, tokens):
    assert "gemma-3-270m" in EMBEDDED_MODELS
    source = model_source(gemma)
    assert source.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert source.sha256 == _sha256_of(_embedded_files(_EMBEDDED["gemma-3-270m"]))  # the 4 parts, in order
    assert source.prepend_bos and source.bos_token == "<bos>" and default_first_token(gemma) == "bos"
    assert (tokens[:, 0] == gemma.tokenizer.bos_token_id).all() and gemma.tokenizer.bos_token_id == 2
    assert (corpus_tokens(gemma, 1, 8, first_token="none")[0, 0] != 2).item()  # overridable
    info = model_info(gemma)
    assert (info["n_layers"], info["n_heads"], info["n_key_value_heads"], info["d_head"], info["d_vocab"]) == (
        18, 4, 1, 256, 262144)
    assert info["bos_policy"] == "prepend '<bos>'"
    # Five sliding-window layers (512 keys) per global layer.
    assert attention_windows(gemma) == tuple(None if layer % 6 == 5 else 512 for layer in range(18))
    json.dumps(info)


@torch.no_grad()
def test_gemma_matches_transformers_log_probs(gemma, gemma_hf, tokens):
    ours = torch.log_softmax(gemma(tokens).double(), -1)
    theirs = torch.log_softmax(gemma_hf(tokens).logits.double(), -1)
    assert float((ours - theirs).abs().max()) < 1e-3
    assert float(theirs.max(-1).values.exp().mean()) > 0.3  # confident, so the check has teeth


@both_backends
@torch.no_grad()
def test_gemma_bridge_matches_transformers_log_probs(gemma_bridge, gemma_hf, tokens):
    assert not is_hooked_transformer(gemma_bridge)
    ours = torch.log_softmax(gemma_bridge(tokens).double(), -1)
    theirs = torch.log_softmax(gemma_hf(tokens).logits.double(), -1)
    assert float((ours - theirs).abs().max()) < 1e-3


def test_gemma_sinks_and_dimension_163(gemma, tokens):
    """Most heads rest on <bos>; dimension 163 of <bos>'s residual grows to ~1e5 from layer 3 on,
    and other tokens carry thousands there too (not only the first token)."""
    report = sink_scores(gemma, tokens)
    assert float((report.alpha_first > 0.3).double().mean()) > 0.6
    resid = {}
    hooks = [(f"blocks.{l}.hook_resid_post", (lambda l: lambda x, hook: resid.__setitem__(l, x[:, :, 163].double()))(l))
             for l in (2, 3, 14)]
    with torch.inference_mode():
        gemma.run_with_hooks(tokens, fwd_hooks=hooks)
    assert float(resid[2][:, 0].abs().max()) < 1000
    assert 5000 < float(resid[3][:, 0].abs().mean()) < 20000
    assert float(resid[14][:, 0].abs().mean()) > 80000
    assert float(resid[14][:, 1:].abs().median()) > 4000


def test_gemma_views_of_text_start_with_bos_as_the_model_is_fed(gemma):
    """A view of plain text follows the model's BOS convention: on Gemma the sink is <bos>, and a
    view without it shows sink-free heads the model never runs as (measured on the report's
    sentence: layer 5 puts 0.51-0.79 on <bos>, 0.05-0.06 on the first word without it)."""
    from sinkinterp.data import prompt_ids
    from sinkinterp.views import attention_view

    text = "The capital of France is Paris. The capital of Italy is Rome."
    assert prompt_ids(gemma, text)[0] == 2 and prompt_ids(gemma, text, "none")[0] != 2
    view = attention_view(gemma, text, layers=[5], heads=[1], element_id="v")
    bare = attention_view(gemma, text, layers=[5], heads=[1], element_id="v", first_token="none")
    assert view.tokens[0] == "<bos>" and bare.tokens == view.tokens[1:]
    alpha = lambda v: float(v.patterns[0][1:, 0].mean())  # noqa: E731
    assert alpha(view) > 0.5 and alpha(bare) < 0.3


def test_gemma_residual_sink_norm_weights(gemma_hf):
    """The effective pre-feed-forward RMSNorm weight (1 + w in Gemma's parametrisation) at dimension
    163 is exactly 0 in 11 of the 18 layers: that dimension never reaches the MLPs there."""
    effective = [float(1 + layer.pre_feedforward_layernorm.weight[163]) for layer in gemma_hf.model.layers]
    assert [l for l, w in enumerate(effective) if w == 0.0] == [5, 7, 8, 9, 10, 11, 12, 14, 15, 16, 17]
    assert effective[3] > 1  # it does reach the MLP in the layers where it grows


def test_one_kv_head_means_key_edits_hit_the_whole_layer(gemma, tokens):
    """With one kv head per layer a key intervention must take all 4 query heads; a per-head mask
    (scores) can take one."""
    with pytest.raises(SinkInterpError, match=r"split kv group 0 \(query heads \[0, 1, 2, 3\]\)"):
        ReplaceSinkKey.fit(gemma, tokens[:1], heads=[0, 1], layers=[3])
    whole = ReplaceSinkKey.fit(gemma, tokens[:1], layers=[3])
    assert len(whole.key[0]) == 1  # one kv head
    with torch.inference_mode():
        clean = gemma(tokens[:1, :32])
        with intervene(gemma, MaskSinkKey(layers=[5], heads=[1], from_query=8)):
            masked = gemma(tokens[:1, :32])
    assert not torch.allclose(clean, masked)
