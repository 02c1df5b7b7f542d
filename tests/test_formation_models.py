"""Integration: where the sink comes from on the two embedded models (formation trace, the causal
test of its writers, residual sinks and the norms that silence them)."""

import pytest

from sinkinterp.data import corpus_tokens
from sinkinterp.experiments import formation_test
from sinkinterp.measure import formation_trace, read_weights, residual_sinks

pytestmark = [pytest.mark.integration, pytest.mark.backend]


def test_smollm2_channel_507_is_written_by_two_neurons_of_block_11(smollm2):
    tokens = corpus_tokens(smollm2, 16, 32, seed=0)
    trace = formation_trace(smollm2, tokens[:8])
    assert trace.channels[0] == 507
    step = trace.step_up(n_resamples=200).set_index("channel").loc[507]
    assert step.step_layer == 11 and step.writer == "mlp" and step.writer_share > 0.99
    assert step.after > 15_000 and step.before < 100  # the second stage: ~23,000 from block 11 on
    top = trace.top_neurons(507, n=2)
    assert set(top.neuron) == {1229, 1487} and top.cumulative_share.iloc[-1] > 0.99

    result = formation_test(smollm2, tokens[8:], calibration=tokens[:8], n_resamples=500)
    assert (result.layer, set(result.neurons)) == (11, {1229, 1487})
    _assert_writers_remove_the_sink(result, massive=0.95, first_share=0.2, loss=0.5)


def _assert_writers_remove_the_sink(result, *, massive: float, first_share: float, loss: float) -> None:
    """Zeroed or set to their mean, the writers take at least ``massive`` of the clean massive
    value, ``first_share`` of the first-token share and ``loss`` nats (interval bounds); the
    matched random neurons move neither the massive value (1%) nor the loss (0.05)."""
    clean = float(result.downstream("clean", "massive").mean())
    for mode in ("zero", "mean"):
        assert result.effect(f"writers {mode}", "massive").high < -massive * clean
        assert result.effect(f"writers {mode}", "first_share").high < -first_share
        assert result.effect(f"writers {mode}", "loss").low > loss
        assert abs(result.effect(f"control {mode}", "massive").value) < 0.01 * clean
        assert abs(result.effect(f"control {mode}", "loss").value) < 0.05


def test_gemma_dimension_163_is_a_residual_sink_its_norms_silence(gemma):
    silenced = {5, 7, 8, 9, 10, 11, 12, 14, 15, 16, 17}  # (1 + w) of pre_feedforward_layernorm is exactly 0
    for layer in range(gemma.cfg.n_layers):
        read = float(read_weights(gemma, layer)["mlp"][163])
        assert (read == 0) == (layer in silenced), (layer, read)
    found = residual_sinks(gemma, corpus_tokens(gemma, 4, 32, seed=0))
    assert 163 in found.channels
    rows = found.table[found.table.channel == 163].set_index("layer")
    assert set(range(8, 18)) <= set(rows.index)
    assert (rows.fraction_of_tokens > 0.9).all() and (rows.first_share > 0.95).all()
    assert rows.loc[12, "mean_share"] > 0.5 and rows.loc[12, "mlp_read"] == 0


def test_gemma_dimension_163_steps_up_through_one_neuron_of_block_5(gemma):
    trace = formation_trace(gemma, corpus_tokens(gemma, 2, 32, seed=0), channels=[163])
    step = trace.step_up(n_resamples=200).iloc[0]
    assert step.step_layer == 5 and step.writer == "mlp"
    top = trace.top_neurons(163, n=1)
    assert int(top.neuron.iloc[0]) == 584 and top.share.iloc[0] > 0.95
    # The first token is <bos> in every sequence and sees only itself: its trace is input-independent.
    assert float(trace.resid[:, 5, 0].std()) < 1e-3 * float(trace.resid[:, 5, 0].abs().mean())


def test_gemma_sink_falls_when_the_writers_of_six_blocks_are_ablated(gemma):
    """One writer (neuron 584 of block 5) takes 15% off dimension 163 and the sink holds; the
    writers of the six blocks that grow it most, eight neurons, remove it (README: on 16 + 32
    windows of 64 tokens, first-token share 0.502 -> 0.060, loss +0.66; random neurons +0.001).
    <bos>'s trace is input-independent, so two calibration windows find the same writers."""
    tokens = corpus_tokens(gemma, 6, 32, seed=0)
    result = formation_test(gemma, tokens[2:], calibration=tokens[:2], n_blocks=6, n_resamples=200)
    assert result.writers == {3: (1414,), 4: (84,), 5: (584,), 6: (1824,), 7: (1455,), 8: (188, 316, 1185)}
    assert float(result.downstream("clean", "massive").mean()) > 80_000
    assert float(result.downstream("clean", "first_share").mean()) > 0.4
    _assert_writers_remove_the_sink(result, massive=0.8, first_share=0.3, loss=0.3)


def test_gemma_parts_add_up_through_its_post_norms(gemma):
    trace = formation_trace(gemma, corpus_tokens(gemma, 2, 16, seed=1), channels=[163, 400])
    mlp, attn = trace.mlp.mean(dim=0), trace.attn.mean(dim=0)
    assert (trace.neurons.sum(dim=1) + trace.mlp_bias - mlp).abs().max() < 1e-4 * mlp.abs().max()
    assert (trace.heads.sum(dim=1) + trace.attn_bias - attn).abs().max() < 1e-4 * attn.abs().max()


def test_bos_test_scores_the_same_targets_with_and_without_bos(smollm2):
    import torch

    from sinkinterp.experiments import bos_test

    result = bos_test(smollm2, n_seqs=4, seq_len=32, n_resamples=200)
    assert result.bos_token == "<|im_start|>"
    with_bos = corpus_tokens(smollm2, 4, 33, first_token="bos", seed=0)
    assert (with_bos[:, 0] == smollm2.tokenizer.convert_tokens_to_ids("<|im_start|>")).all()
    with torch.no_grad():
        logits_with = smollm2(with_bos).double().log_softmax(-1)
        logits_without = smollm2(with_bos[:, 1:]).double().log_softmax(-1)
    nll_with = -logits_with[:, 1:-1].gather(-1, with_bos[:, 2:, None])[..., 0].mean(dim=1)
    nll_without = -logits_without[:, :-1].gather(-1, with_bos[:, 2:, None])[..., 0].mean(dim=1)
    assert torch.allclose(result.loss["with"].double(), nll_with, atol=1e-4)
    assert torch.allclose(result.loss["without"].double(), nll_without, atol=1e-4)
    # SmolLM2 was not trained with a BOS: the first position is the sink either way.
    for name in ("with", "without"):
        assert float(result.sinks[name].alpha_first.mean()) > 0.25
    assert "loss without minus with" in result.summary()
