"""One vocabulary for "which heads": Heads values, their spellings, and every consumer taking them."""

from __future__ import annotations

import pytest
import torch

from sinkinterp import AblateHeads, AblateSinkValue, ConstantAttentionBias, Heads, MaskSinkKey, ReplaceSinkKey
from sinkinterp import SinkInterpError, evaluate, intervene, sink_scores
from sinkinterp.interventions import Intervention
from sinkinterp.tiny import tiny_llama

pytestmark = pytest.mark.backend  # runs again on TransformerLens 3.9 (make test)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()  # 2 layers, 6 query heads over 2 kv heads


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 60, (4, 16), generator=torch.Generator().manual_seed(3))


def test_every_spelling_of_the_same_heads_is_one_value(model):
    pairs = Heads([(1, 2), (0, 3), (1, 0)])
    assert pairs == Heads({0: [3], 1: [2, 0]}) == Heads({1: (0, 2), 0: 3}) == Heads(pairs)
    assert pairs.pairs == ((0, 3), (1, 0), (1, 2))  # sorted
    assert pairs.by_layer(model) == {0: [3], 1: [0, 2]}
    assert pairs.labels(model) == ["L0H3", "L1H0", "L1H2"]
    assert pairs.kv_heads(model) == {0: [1], 1: [0]}  # 3 query heads per kv head
    assert pairs.hook_names(model, "attn.hook_z") == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    assert Heads.at(model, layers=[1], heads=[0, 4]) == Heads([(1, 0), (1, 4)])
    assert Heads.all().by_layer(model) == {0: list(range(6)), 1: list(range(6))}


@pytest.mark.parametrize("heads, message", [
    ([(0, 6)], r"head 6 out of range: model has 6 heads \(0\.\.5\)"),
    ([(2, 0)], r"layer 2 out of range: model has 2 layers \(0\.\.1\)"),
    ([(0, 1), (0, 1)], r"repeats a head"),
    ([(0, "1")], r"must be integer \(layer, head\) pairs, got \(0, '1'\)"),
])
def test_bad_heads_are_refused_naming_the_value(model, heads, message):
    with pytest.raises(SinkInterpError, match=message):
        Heads(heads).by_layer(model)


def _pattern_hooks(alpha_by_head):
    """Every layer's pattern replaced: head h puts alpha_by_head[layer][h] on key 0, the rest
    spread evenly over keys 1..i (query 0 attends only to itself)."""
    def make(layer):
        def hook(pattern, hook):
            n = pattern.shape[-1]
            out = torch.zeros_like(pattern)
            for h, a in enumerate(alpha_by_head[layer]):
                out[:, h, 0, 0] = 1.0
                for i in range(1, n):
                    out[:, h, i, 0] = a
                    out[:, h, i, 1:i + 1] = (1 - a) / i
            return out
        return hook
    return [(f"blocks.{l}.attn.hook_pattern", make(l)) for l in range(len(alpha_by_head))]


def test_sink_heads_are_the_heads_above_eps_on_a_hand_built_pattern(model, tokens):
    alpha = [[0.9, 0.1, 0.5, 0.05, 0.31, 0.2], [0.2, 0.95, 0.1, 0.1, 0.29, 0.6]]
    with model.hooks(fwd_hooks=_pattern_hooks(alpha)):
        report = sink_scores(model, tokens, progress=False)
    # alpha at k = 0 averages query 0 (weight 1) with queries 1..15 (weight a): (1 + 15 a) / 16.
    expected = torch.tensor(alpha, dtype=torch.float64).mul(15).add(1).div(16)
    assert torch.allclose(report.alpha[:, :, 0], expected, atol=1e-6)
    heads = report.sink_heads(0.5)
    assert heads == Heads([(l, h) for l in range(2) for h in range(6) if expected[l, h] > 0.5])
    assert heads.by_layer(model) == {0: [0, 2], 1: [1, 5]}
    with pytest.raises(SinkInterpError, match=r"eps 1\.5 must be a number in \(0, 1\)"):
        report.sink_heads(1.5)


def test_one_mask_on_different_heads_per_layer_equals_one_mask_per_layer(model, tokens):
    heads = Heads({0: [0, 2], 1: [1, 5]})
    together = MaskSinkKey(heads=heads, from_query=4)
    per_layer = [MaskSinkKey(layers=[0], heads=[0, 2], from_query=4), MaskSinkKey(layers=[1], heads=[1, 5], from_query=4)]
    with intervene(model, together):
        a = model(tokens)
    with intervene(model, *per_layer):
        b = model(tokens)
    assert torch.equal(a, b) and not torch.equal(a, model(tokens))
    # every head, spelt as pairs, is the default
    every = MaskSinkKey(heads=Heads.at(model), from_query=4)
    assert torch.equal(evaluate(model, tokens, every, from_query=4).loss,
                       evaluate(model, tokens, MaskSinkKey(from_query=4), from_query=4).loss)
    # the record round-trips (a spec can say heads: [[0, 0], [0, 2], ...])
    record = together.to_dict()
    assert record["heads"] == [[0, 0], [0, 2], [1, 1], [1, 5]] and record["layers"] is None
    assert Intervention.from_dict(record) == together


def test_value_ablation_and_head_ablation_take_heads_values(model, tokens):
    heads = Heads({0: [3], 1: [0, 4]})
    with intervene(model, AblateSinkValue(heads=heads, from_query=2)):
        a = model(tokens)
    with intervene(model, AblateSinkValue(layers=[0], heads=[3], from_query=2),
                   AblateSinkValue(layers=[1], heads=[0, 4], from_query=2)):
        b = model(tokens)
    assert torch.equal(a, b)
    assert AblateHeads(heads=heads, mode="zero").heads == AblateHeads(heads=[(0, 3), (1, 0), (1, 4)], mode="zero").heads


def test_types_that_store_per_layer_arrays_refuse_different_heads_per_layer(model, tokens):
    with pytest.raises(SinkInterpError, match=r"ConstantAttentionBias takes layers= and heads= \(the same heads in "
                                              r"every layer\)"):
        ConstantAttentionBias(heads={0: [1]})
    with pytest.raises(SinkInterpError, match=r"ReplaceSinkKey takes layers= and heads="):
        ReplaceSinkKey(heads=[(0, 1)])
    with pytest.raises(SinkInterpError, match=r"AblateSinkValue mode 'mean' stores \[layers\]\[heads\] values"):
        AblateSinkValue(heads={0: [1]}, mode="mean", value=[[[0.0] * 8]])
    with pytest.raises(SinkInterpError, match=r"heads .* already names its layers; leave layers=None"):
        MaskSinkKey(layers=[0], heads={0: [1]})


def test_a_sweep_restricts_heads_values_layer_by_layer(model):
    mask = MaskSinkKey(heads={0: [0, 2], 1: [1]}, from_query=4)
    assert mask.restrict(model, 0) == MaskSinkKey(heads=[(0, 0), (0, 2)], from_query=4)
    assert mask.restrict(model, 1, 1) == MaskSinkKey(heads=[(1, 1)], from_query=4)
    assert mask.restrict(model, 1, 0) is None


def test_a_view_shows_exactly_the_heads_of_a_heads_value(model, tokens):
    from sinkinterp import attention_view

    view = attention_view(model, tokens[0], heads=Heads({0: [4], 1: [0, 2]}), element_id="v")
    assert [name.split(" ")[0] for name in view.head_names] == ["L0H4", "L1H0", "L1H2"]
    same = attention_view(model, tokens[0], layers=[1], heads=[0, 2], element_id="v")
    assert torch.equal(view.patterns[1:], same.patterns)
    with pytest.raises(SinkInterpError, match=r"already names its layers; leave layers=None"):
        attention_view(model, tokens[0], layers=[0], heads={0: [1]})


def test_per_head_measurements_keep_the_rows_of_a_heads_value(model, tokens):
    from sinkinterp import qkv_geometry, value_weighted_attention

    heads = Heads({0: [1], 1: [3, 5]})
    for measure in (qkv_geometry, value_weighted_attention):
        every = measure(model, tokens, progress=False)
        some = measure(model, tokens, progress=False, heads=heads)
        assert list(zip(some["layer"], some["head"])) == [(0, 1), (1, 3), (1, 5)]
        expected = every.set_index(["layer", "head"]).loc[[(0, 1), (1, 3), (1, 5)]].reset_index()
        assert some.equals(expected[some.columns])
    with pytest.raises(SinkInterpError, match=r"head 9 out of range"):
        qkv_geometry(model, tokens, heads={0: [9]})
