"""Interventions on tiny models, checked against attention written out by hand."""

import json

import pytest
import torch
import yaml

from sinkinterp import SinkInterpError
from sinkinterp.data import random_tokens
from sinkinterp.interventions import (
    INTERVENTIONS,
    AblateHeads,
    AblateNeurons,
    AblateSinkValue,
    ConstantAttentionBias,
    EditMassiveChannels,
    EditResidualDimension,
    KeyValueSlot,
    OutputGate,
    WindowAttention,
    DisruptQKChannels,
    Intervention,
    MaskSinkKey,
    PatchFirstTokenResidual,
    ReplaceSinkKey,
    fit_constant_bias,
    intervene,
)
from sinkinterp.tiny import tiny_gpt2, tiny_llama
from conftest import n_hooks

pytestmark = pytest.mark.backend  # runs again on TransformerLens 3.9 (make test)

GROUP = 3  # tiny_llama: 6 query heads over 2 kv heads


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def tokens(llama):
    return random_tokens(llama, 2, 20, seed=1)


def run(model, tokens, *interventions, names=()):
    """Logits and the named activations, read after every intervention hook has run."""
    seen = {}
    # Bound per name: a bridge reports an aliased hook (hook_resid_post) under its own name.
    capture = [(name, lambda x, hook, name=name: seen.__setitem__(name, x.detach().clone())) for name in names]
    with intervene(model, *interventions), model.hooks(fwd_hooks=capture):
        logits = model(tokens)
    return logits, seen


def every_intervention(model, tokens):
    return [
        MaskSinkKey(from_query=4),
        AblateSinkValue(),
        AblateSinkValue.fit(model, tokens, mode="mean"),
        ReplaceSinkKey.fit(model, tokens),
        EditMassiveChannels(channels=(3, 5), mode="scale", factor=0.5),
        EditMassiveChannels.fit(model, tokens, channels=(3,), layers="all", mode="mean", largest_other=True),
        PatchFirstTokenResidual.fit(model, tokens[:1]),
        ConstantAttentionBias(logit=[[0.5] * 6, [1.0] * 6], from_query=4),
        fit_constant_bias(model, tokens, from_query=4),
        AblateHeads(heads=[(0, 1), (1, 5)], mode="zero"),
        AblateHeads.fit(model, tokens, heads=[(1, 0), (0, 2)]),
        AblateNeurons(layer=1, neurons=(2, 9), positions=(0, 1)),
        AblateNeurons.fit(model, tokens, layer=0, neurons=(4,)),
        EditResidualDimension(channels=(3,), multiple=2.0),
        EditResidualDimension.fit(model, tokens, channels=(3, 7), layers=(1,), mode="mean", from_position=1),
        KeyValueSlot.fit(model, tokens, from_query=4),
        KeyValueSlot.fit(model, tokens, from_query=4, with_value=False, layers=(1,), heads=(0, 3)),
        OutputGate(kind="constant", bias=[[2.0] * 6] * 2, from_query=4),
        OutputGate(kind="headwise", weight=[[[0.01] * 6] * 48] * 2, bias=[[2.0] * 6] * 2, from_query=4),
        WindowAttention(window=5, n_initial=1),
        DisruptQKChannels(top_k=2, select="lowest", kinds=("k",), layers=(1,)),
    ]


# --------------------------------------------------------------------------------------------
# Exactness against hand-written attention


def lower_own_scores(scores, hook):
    """Queries attend almost nothing to themselves: A_ii underflows to 0 in float32."""
    scores = scores.clone()
    scores.diagonal(dim1=-2, dim2=-1)[..., 1:] -= 200.0
    return scores


@pytest.mark.parametrize("replace_sink, own_scores", [(True, None), (False, None), (True, lower_own_scores)],
                         ids=["replace-sink", "keep-sink", "self-weight-underflows"])
def test_constant_bias_equals_a_softmax_with_an_extra_column(llama, tokens, replace_sink, own_scores):
    fq, layer = 5, 1
    logit = torch.tensor([[-1.0, 0.0, 0.5, 1.0, 2.0, 3.0]])
    value = torch.randn(1, 6, 8, generator=torch.Generator().manual_seed(0))
    bias = ConstantAttentionBias(logit=logit, value=value, layers=[layer], replace_sink=replace_sink, from_query=fq)
    edit = [] if own_scores is None else [(f"blocks.{layer}.attn.hook_attn_scores", own_scores)]
    with llama.hooks(fwd_hooks=edit):
        _, clean = llama.run_with_cache(tokens)
        _, seen = run(llama, tokens, bias, names=[f"blocks.{layer}.attn.hook_z"])
    if own_scores is not None:
        assert clean[f"blocks.{layer}.attn.hook_pattern"][:, :, fq:].diagonal(offset=fq, dim1=-2, dim2=-1).max() == 0
    scores = clean[f"blocks.{layer}.attn.hook_attn_scores"]  # layer 0 is untouched, so these are its inputs
    v = clean[f"blocks.{layer}.attn.hook_v"]
    z = seen[f"blocks.{layer}.attn.hook_z"]
    expected = clean[f"blocks.{layer}.attn.hook_z"].clone()
    for b in range(tokens.shape[0]):
        for h in range(6):
            for i in range(fq, tokens.shape[1]):
                row = scores[b, h, i, : i + 1].clone()
                if replace_sink:
                    row[0] = float("-inf")
                weights = torch.softmax(torch.cat([row, logit[0, h : h + 1]]), dim=0)
                expected[b, i, h] = weights[:-1] @ v[b, : i + 1, h // GROUP] + weights[-1] * value[0, h]
    torch.testing.assert_close(z, expected, rtol=0, atol=1e-5)


def test_constant_bias_with_logit_minus_infinity_is_the_identity(llama, tokens):
    clean = llama(tokens)
    bias = ConstantAttentionBias(logit=float("-inf"), value=torch.ones(2, 6, 8), replace_sink=False, from_query=1)
    with intervene(llama, bias):
        assert torch.equal(llama(tokens), clean)


def test_mask_leaves_rows_before_from_query_bit_identical(llama, tokens):
    names = [f"blocks.{l}.hook_resid_post" for l in range(2)]
    clean, before = run(llama, tokens, names=names)
    masked, after = run(llama, tokens, MaskSinkKey(from_query=6), names=names)
    assert torch.equal(masked[:, :6], clean[:, :6]) and not torch.allclose(masked[:, 6:], clean[:, 6:])
    for name in names:
        assert torch.equal(after[name][:, :6], before[name][:, :6])
    # The masked rows put no attention on the sink.
    _, seen = run(llama, tokens, MaskSinkKey(layers=[1], heads=[2], from_query=6), names=["blocks.1.attn.hook_pattern"])
    pattern = seen["blocks.1.attn.hook_pattern"]
    assert pattern[:, 2, 6:, 0].abs().max() == 0 and pattern[:, 1, 6:, 0].min() > 0
    torch.testing.assert_close(pattern[:, 2, 6:].sum(-1), torch.ones(2, 14))


def test_value_ablation_leaves_the_sinks_row_and_residual_stream_identical(llama, tokens):
    names = [f"blocks.{l}.hook_resid_post" for l in range(2)] + ["blocks.1.attn.hook_pattern"]
    clean, before = run(llama, tokens, names=names)
    ablated, after = run(llama, tokens, AblateSinkValue(), names=names)
    for name in names[:2]:
        assert torch.equal(after[name][:, 0], before[name][:, 0])
    assert torch.equal(ablated[:, 0], clean[:, 0]) and not torch.allclose(ablated[:, 1:], clean[:, 1:])


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_value_ablation_removes_exactly_the_sink_term(llama, tokens, mode):
    layer, heads, fq = 1, [0, 4], 3
    ablation = (AblateSinkValue(layers=[layer], heads=heads, from_query=fq) if mode == "zero"
                else AblateSinkValue.fit(llama, tokens, mode="mean", layers=[layer], heads=heads, from_query=fq))
    _, clean = llama.run_with_cache(tokens)
    _, seen = run(llama, tokens, ablation, names=[f"blocks.{layer}.attn.hook_z"])
    a = clean[f"blocks.{layer}.attn.hook_pattern"]
    v = clean[f"blocks.{layer}.attn.hook_v"]
    expected = clean[f"blocks.{layer}.attn.hook_z"].clone()
    for index, h in enumerate(heads):
        new = torch.zeros(8) if mode == "zero" else v[:, 0, h // GROUP].mean(0)
        assert mode == "zero" or torch.allclose(torch.tensor(ablation.value[0][index], dtype=torch.float32), new)
        for i in range(fq, tokens.shape[1]):
            expected[:, i, h] += a[:, h, i, 0, None] * (new - v[:, 0, h // GROUP])
    torch.testing.assert_close(seen[f"blocks.{layer}.attn.hook_z"], expected, rtol=0, atol=1e-6)


def test_patching_a_sequence_with_itself_is_the_identity(llama, tokens):
    clean = llama(tokens)
    for hook in ("resid_pre", "resid_mid", "resid_post"):
        with intervene(llama, PatchFirstTokenResidual.fit(llama, tokens, hook=hook)):
            torch.testing.assert_close(llama(tokens), clean, rtol=0, atol=1e-6)
    with intervene(llama, ReplaceSinkKey.fit(llama, tokens[:1], mode="patch")):
        torch.testing.assert_close(llama(tokens[:1]), clean[:1], rtol=0, atol=1e-6)


def test_patching_from_another_input_and_a_different_first_token(llama, tokens):
    other = random_tokens(llama, 1, 20, seed=9)
    patch = PatchFirstTokenResidual.fit(llama, other, layers=[0])
    # Position 0's residual depends on its token alone: patching it is the same as swapping the token.
    swapped = tokens.clone()
    swapped[:, 0] = other[0, 0]
    with intervene(llama, patch):
        torch.testing.assert_close(llama(tokens), llama(swapped), rtol=0, atol=1e-5)
    by_id = PatchFirstTokenResidual.fit(llama, int(other[0, 0]))
    with intervene(llama, by_id):
        torch.testing.assert_close(llama(tokens), llama(swapped), rtol=0, atol=1e-5)
    mean = PatchFirstTokenResidual.fit(llama, "mean", reference=tokens, layers=[1])
    _, cache = llama.run_with_cache(tokens)
    torch.testing.assert_close(torch.tensor(mean.source[0][0], dtype=torch.float32),
                               cache["blocks.1.hook_resid_pre"][:, 0].mean(0), rtol=0, atol=1e-6)


def test_replace_sink_key_sets_the_key_before_rotation(llama, tokens):
    replace = ReplaceSinkKey.fit(llama, tokens, layers=[1], heads=[3, 4, 5])
    _, clean = llama.run_with_cache(tokens)
    mean_other = clean["blocks.1.attn.hook_k"][:, 1:, 1].mean(dim=(0, 1))
    torch.testing.assert_close(torch.tensor(replace.key[0][0], dtype=torch.float32), mean_other, rtol=0, atol=1e-6)
    _, seen = run(llama, tokens, replace, names=["blocks.1.attn.hook_rot_k", "blocks.1.attn.hook_pattern"])
    rotated = seen["blocks.1.attn.hook_rot_k"]
    assert torch.equal(rotated[:, :, 0], clean["blocks.1.attn.hook_rot_k"][:, :, 0])  # kv head 0 untouched
    assert not torch.allclose(rotated[:, 0, 1], clean["blocks.1.attn.hook_rot_k"][:, 0, 1])
    # Position 0 is rotated by angle 0, so the rotated key is the new key itself.
    torch.testing.assert_close(rotated[:, 0, 1], mean_other.expand(2, -1), rtol=0, atol=1e-5)


def test_massive_channel_edits(llama, tokens):
    names = [f"blocks.{l}.hook_resid_post" for l in range(2)]
    _, clean = run(llama, tokens, names=names)
    _, zeroed = run(llama, tokens, EditMassiveChannels(channels=(3, 7), positions=(0, 2)), names=names)
    for name in names:
        assert zeroed[name][:, [0, 2]][..., [3, 7]].abs().max() == 0
    _, unscaled = run(llama, tokens, EditMassiveChannels(channels=(3,), mode="scale", factor=1.0), names=names)
    assert all(torch.equal(unscaled[n], clean[n]) for n in names)
    mean = EditMassiveChannels.fit(llama, tokens, channels=(3, 7), layers=[0], mode="mean")
    expected = clean["blocks.0.hook_resid_post"][:, 0][:, [3, 7]].mean(0)
    torch.testing.assert_close(torch.tensor(mean.values[0][0], dtype=torch.float32), expected, rtol=0, atol=1e-6)
    _, edited = run(llama, tokens, mean, names=names[:1])
    torch.testing.assert_close(edited["blocks.0.hook_resid_post"][:, 0][:, [3, 7]], expected.expand(2, -1))
    # Several positions: each gets its own mean (Sun et al.), not one mean shared by all of them.
    two = EditMassiveChannels.fit(llama, tokens, channels=(3, 7), positions=(0, 2), layers=[1], mode="mean")
    per_position = clean["blocks.1.hook_resid_post"][:, [0, 2]][..., [3, 7]].mean(0)  # [position channel]
    torch.testing.assert_close(torch.tensor(two.values[0], dtype=torch.float32), per_position, rtol=0, atol=1e-6)
    assert not torch.allclose(per_position[0], per_position[1])
    _, edited = run(llama, tokens, two, names=names)
    torch.testing.assert_close(edited["blocks.1.hook_resid_post"][:, [0, 2]][..., [3, 7]], per_position.expand(2, -1, -1))


def test_largest_other_position_is_edited_per_sequence(llama, tokens):
    names = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    spikes = {0: 5, 1: 11}  # row -> the position where channel 4 spikes after layer 0

    def plant(x, hook):
        x = x.clone()
        for row, position in spikes.items():
            x[row, position, 4] = 900.0
        return x

    with llama.hooks(fwd_hooks=[("blocks.0.hook_resid_post", plant)]):
        _, clean = run(llama, tokens, names=names[:1])
        _, zeroed = run(llama, tokens, EditMassiveChannels(channels=(4,), layers=[0], largest_other=True),
                        names=names[:1])
        mean = EditMassiveChannels.fit(llama, tokens, channels=(4,), layers=[0], mode="mean", largest_other=True)
    after = zeroed["blocks.0.hook_resid_post"]
    for row, position in spikes.items():
        assert after[row, position, 4] == 0 and after[row, 0, 4] == 0
        keep = [p for p in range(20) if p not in (0, position)]
        torch.testing.assert_close(after[row, keep], clean["blocks.0.hook_resid_post"][row, keep])
    assert len(mean.values[0]) == 2 and mean.values[0][1][0] == pytest.approx(900.0)  # the spike's own mean
    assert mean.n_slots == 2


def _plant_channel_7(out, hook):
    """A massive activation: +5000 in residual channel 7 at the first token, from this MLP on."""
    out[:, 0, 7] += 5000.0
    return out


def test_fit_edits_one_layer_the_first_where_the_channels_are_massive():
    gpt2 = tiny_gpt2()
    tokens = random_tokens(gpt2, 4, 12, seed=3)
    with gpt2.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", _plant_channel_7)]):  # massive from layer 1 on
        first = EditMassiveChannels.fit(gpt2, tokens)
        every = EditMassiveChannels.fit(gpt2, tokens, layers="all")
    assert first.channels == (7,) and first.layers == (1,) and every.layers is None
    with pytest.raises(SinkInterpError, match="layers 'second': use 'first', 'all' or layer numbers"):
        EditMassiveChannels.fit(gpt2, tokens, channels=(7,), layers="second")
    with pytest.raises(SinkInterpError, match=r"channels \(3,\) are not massive at positions \(0,\)"):
        EditMassiveChannels.fit(gpt2, tokens, channels=(3,))


def test_fit_resolves_the_stable_channels_and_the_control_avoids_them():
    gpt2 = tiny_gpt2()
    tokens = random_tokens(gpt2, 4, 12, seed=3)
    with gpt2.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", _plant_channel_7)]):
        edit = EditMassiveChannels.fit(gpt2, tokens, mode="mean")
        assert edit.channels == (7,) and edit.values[0][0][0] > 4000
        control = edit.random_control(gpt2, tokens, seed=0)
        again = edit.random_control(gpt2, tokens, seed=0)
        other = [edit.random_control(gpt2, tokens, seed=s).channels for s in range(1, 6)]
    assert control == again and len(control.channels) == 1 and control.channels != (7,)
    assert control.mode == "mean" and abs(control.values[0][0][0]) < 100
    assert len(set(other + [control.channels])) > 1  # seeds give different draws
    with pytest.raises(SinkInterpError, match="no massive channel at positions"):
        EditMassiveChannels.fit(gpt2, tokens)


def test_gradient_fit_lowers_the_calibration_loss(llama):
    tokens = random_tokens(llama, 4, 24, seed=5)
    moments = fit_constant_bias(llama, tokens, from_query=4)
    history = []
    fitted = fit_constant_bias(llama, tokens, from_query=4, method="gradient", steps=30, lr=0.1, batch_size=4,
                               history=history)
    assert len(history) == 30 and history[-1] < history[0]
    assert fitted.method == "gradient" and fitted != moments

    def loss(bias):
        with intervene(llama, bias):
            logits = llama(tokens)
        return torch.nn.functional.cross_entropy(logits[:, 4:-1].flatten(0, 1), tokens[:, 5:].flatten())

    assert loss(fitted) < loss(moments) - 1e-3
    assert all(p.requires_grad for p in llama.parameters())  # the model is unfrozen afterwards
    _, clean = llama.run_with_cache(tokens)
    expected = clean["blocks.1.attn.hook_attn_scores"][:, 2, 4:, 0].mean()
    assert moments.logit[1][2] == pytest.approx(float(expected), abs=1e-5)


def test_gradient_fit_keeps_the_step_with_the_lowest_validation_loss(llama):
    tokens, validation = random_tokens(llama, 6, 24, seed=5)[:4], random_tokens(llama, 6, 24, seed=5)[4:]

    def loss(bias, batch):
        with intervene(llama, bias):
            logits = llama(batch)
        return float(torch.nn.functional.cross_entropy(logits[:, 4:-1].flatten(0, 1), batch[:, 5:].flatten()))

    # A large learning rate over-fits 4 random sequences: the validation curve turns up and the fit stops.
    fitted = fit_constant_bias(llama, tokens, from_query=4, method="gradient", steps=40, lr=1.0, batch_size=4,
                               validation=validation, patience=3)
    log = fitted.fit_log
    curve = log["validation_loss"]
    assert len(curve) == log["steps_run"] + 1 and log["n_train"] == 4 and log["n_validation"] == 2
    assert curve[log["kept_step"]] == min(curve)
    assert log["stopped_early"] and log["steps_run"] == log["kept_step"] + 3 < 40
    assert loss(fitted, validation) == pytest.approx(curve[log["kept_step"]], abs=1e-5)  # the kept parameters
    # Kept step 0 would be the moments themselves.
    moments = fit_constant_bias(llama, tokens, from_query=4)
    assert loss(moments, validation) == pytest.approx(curve[0], abs=1e-5)
    # Without a validation split the last step is kept, and the log says there was none.
    earlier = [9.0, 9.0]  # a caller's list that already holds losses: the log counts this fit's steps only
    plain = fit_constant_bias(llama, tokens, from_query=4, method="gradient", steps=5, lr=0.1, history=earlier)
    assert plain.fit_log["kept_step"] == 5 and plain.fit_log["n_validation"] == 0
    assert plain.fit_log["steps_run"] == 5 and earlier[2:] == plain.fit_log["train_loss"] and len(earlier) == 7
    assert plain.fit_log["validation_loss"] == [] and not plain.fit_log["stopped_early"]
    # The log survives a round trip and does not take part in equality.
    again = Intervention.from_dict(json.loads(json.dumps(fitted.to_dict())))
    assert again == fitted and again.fit_log == log
    with pytest.raises(SinkInterpError, match="validation tokens stop a gradient fit early: method 'moments'"):
        fit_constant_bias(llama, tokens, from_query=4, validation=validation)
    with pytest.raises(SinkInterpError, match="patience must be an integer >= 1, got 0"):
        fit_constant_bias(llama, tokens, from_query=4, method="gradient", validation=validation, patience=0)
    with pytest.raises(SinkInterpError, match="validation tokens have 5 positions: from_query 4 leaves no query"):
        fit_constant_bias(llama, tokens, from_query=4, method="gradient", validation=validation[:, :5])


# --------------------------------------------------------------------------------------------
# Values: serialisation, repr, equality


def test_every_intervention_round_trips_through_json_and_yaml(llama, tokens):
    kinds = set()
    for intervention in every_intervention(llama, tokens):
        kinds.add(type(intervention).__name__)
        record = intervention.to_dict()
        assert Intervention.from_dict(json.loads(json.dumps(record))) == intervention
        assert Intervention.from_dict(yaml.safe_load(yaml.safe_dump(record))) == intervention
        with intervene(llama, Intervention.from_dict(record)):  # and applies
            llama(tokens)
    assert kinds == set(INTERVENTIONS) - {"Intervention"}
    text = repr(AblateSinkValue.fit(llama, tokens, mode="mean"))
    assert text.startswith("AblateSinkValue(layers=None, heads=None, position=0, mode='mean'") and "<2x6x8 numbers>" in text
    assert MaskSinkKey(layers=[1, 2]) == MaskSinkKey(layers=(1, 2)) and hash(MaskSinkKey()) == hash(MaskSinkKey())


def test_bad_records_are_refused():
    with pytest.raises(SinkInterpError, match="unknown intervention 'MaskSink': use one of AblateHeads, AblateNeurons, AblateSinkValue"):
        Intervention.from_dict({"type": "MaskSink"})
    with pytest.raises(SinkInterpError, match="MaskSinkKey has no field 'from_qeury'"):
        Intervention.from_dict({"type": "MaskSinkKey", "from_qeury": 3})


# --------------------------------------------------------------------------------------------
# Hook hygiene


def test_intervene_removes_exactly_its_hooks_after_an_exception_and_when_nested(llama, tokens):
    marks = []
    llama.add_hook("blocks.0.hook_resid_post", lambda x, hook: marks.append(1))
    before = n_hooks(llama)
    try:
        interventions = every_intervention(llama, tokens)
        with pytest.raises(RuntimeError, match="boom"):
            with intervene(llama, *interventions):
                assert n_hooks(llama) > before
                raise RuntimeError("boom")
        assert n_hooks(llama) == before
        with intervene(llama, MaskSinkKey(from_query=4)):
            inner_start = n_hooks(llama)
            with intervene(llama, AblateSinkValue()):
                assert n_hooks(llama) > inner_start
                llama(tokens)
            assert n_hooks(llama) == inner_start
        assert n_hooks(llama) == before
        # A failure inside a hook during the forward (a position beyond the input) cleans up too.
        with pytest.raises(SinkInterpError, match="MaskSinkKey position 30 is beyond this input's 20 positions"):
            with intervene(llama, MaskSinkKey(position=30, from_query=31)):
                llama(tokens)
        assert n_hooks(llama) == before
        # Validation fails before any hook is attached.
        with pytest.raises(SinkInterpError):
            with intervene(llama, MaskSinkKey(), MaskSinkKey(layers=[9])):
                pass
        assert n_hooks(llama) == before and marks
    finally:
        llama.reset_hooks()


def test_hooks_also_work_with_run_with_hooks(llama, tokens):
    mask = MaskSinkKey(from_query=4)
    with intervene(llama, mask):
        expected = llama(tokens)
    torch.testing.assert_close(llama.run_with_hooks(tokens, fwd_hooks=mask.hooks(llama)), expected, rtol=0, atol=0)
    with llama.hooks(fwd_hooks=mask.hooks(llama)):
        torch.testing.assert_close(llama(tokens), expected, rtol=0, atol=0)
    assert n_hooks(llama) == 0


# --------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda m: MaskSinkKey(layers=[2]), "layer 2 out of range: model has 2 layers (0..1)"),
        (lambda m: MaskSinkKey(heads=[6]), "head 6 out of range: model has 6 heads (0..5)"),
        (lambda m: MaskSinkKey(position=64, from_query=70), "position 64 out of range: model context is 0..63"),
        (lambda m: EditMassiveChannels(channels=(48,)), "channel 48 out of range: model has 48 residual channels (0..47)"),
        (lambda m: ConstantAttentionBias(logit=[[1.0] * 5] * 2), "ConstantAttentionBias logit has shape (2, 5), expected (2, 6)"),
        (lambda m: ConstantAttentionBias(logit=0.0, value=torch.zeros(2, 6, 4)), "ConstantAttentionBias value has shape (2, 6, 4), expected (2, 6, 8)"),
        (lambda m: ConstantAttentionBias(logit=0.0, layers=[1], value=torch.zeros(2, 6, 8)), "expected (1, 6, 8)"),
        (lambda m: ReplaceSinkKey(key=torch.zeros(2, 2, 8), heads=[0, 1]), "heads (0, 1) split kv group 0 (query heads [0, 1, 2])"),
        (lambda m: AblateSinkValue(mode="mean", value=torch.zeros(2, 6, 7)), "AblateSinkValue value has shape (2, 6, 7), expected (2, 6, 8)"),
        (lambda m: PatchFirstTokenResidual(source=torch.zeros(2, 1, 40)), "PatchFirstTokenResidual source has shape (2, 1, 40), expected (2, rows, 48)"),
    ],
)
def test_values_that_do_not_fit_the_model_are_refused(llama, build, message):
    with pytest.raises(SinkInterpError) as error:
        build(llama).hooks(llama)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: MaskSinkKey(from_query=0), "from_query 0 must be an integer > position 0"),
        (lambda: ConstantAttentionBias(position=3, from_query=3), "from_query 3 must be an integer > position 3"),
        (lambda: AblateSinkValue(position=2, from_query=1), "from_query 1 must be an integer > position 2"),
        (lambda: AblateSinkValue(mode="half"), "AblateSinkValue mode 'half' is not one of 'zero', 'mean', 'patch'"),
        (lambda: AblateSinkValue(mode="mean"), "needs stored values: build it with AblateSinkValue.fit"),
        (lambda: ReplaceSinkKey(mode="random"), "ReplaceSinkKey mode 'random' is not one of 'mean_other', 'patch'"),
        (lambda: EditMassiveChannels(mode="scale"), "takes factor with mode 'scale' and only then"),
        (lambda: EditMassiveChannels(mode="clip"), "EditMassiveChannels mode 'clip' is not one of"),
        (lambda: EditMassiveChannels(channels=(1, 1)), "channels (1, 1) repeats an entry"),
        (lambda: PatchFirstTokenResidual(hook="attn_out"), "hook 'attn_out' is not one of 'resid_pre'"),
        (lambda: MaskSinkKey(layers=[0.5]), "layers must be integers, got 0.5"),
        # Interventions that would act nowhere, and values that are not finite numbers.
        (lambda: MaskSinkKey(layers=[]), "MaskSinkKey layers is empty: it would act nowhere"),
        (lambda: AblateSinkValue(heads=()), "AblateSinkValue heads is empty: it would act nowhere"),
        (lambda: ConstantAttentionBias(layers=(), logit=1.0), "ConstantAttentionBias layers is empty"),
        (lambda: EditMassiveChannels(channels=()), "EditMassiveChannels channels is empty"),
        (lambda: AblateHeads(heads=[], mode="zero"), "AblateHeads heads is empty"),
        (lambda: ConstantAttentionBias(logit=float("nan")), "ConstantAttentionBias logit holds nan: only finite numbers or -inf"),
        (lambda: ConstantAttentionBias(logit=float("inf")), "logit holds inf"),
        (lambda: ConstantAttentionBias(logit=1.0, value=[[[float("nan")] * 8] * 6] * 2), "value holds nan: only finite numbers of magnitude at most 1e+30 are allowed"),
        (lambda: AblateSinkValue(mode="mean", value=torch.full((2, 6, 8), float("inf"))), "AblateSinkValue value holds inf"),
        (lambda: EditMassiveChannels(channels=(3,), mode="scale", factor=float("nan")), "factor must be a finite number, got nan"),
        (lambda: AblateHeads(heads=[(0, 1)], value=[[float("-inf")] * 8]), "AblateHeads value holds -inf"),
    ],
)
def test_bad_arguments_are_refused_at_construction(build, message):
    with pytest.raises(SinkInterpError) as error:
        build()
    assert message in str(error.value)


@pytest.mark.parametrize("build", [
    lambda: MaskSinkKey(from_query=20),
    lambda: AblateSinkValue(from_query=25),
    lambda: ConstantAttentionBias(logit=2.0, from_query=20),
])
def test_an_intervention_that_would_act_on_no_query_is_refused_and_leaves_no_hook(llama, tokens, build):
    # tokens have 20 positions: from_query >= 20 would leave every row clean.
    intervention = build()
    with pytest.raises(SinkInterpError, match=r"from_query \d+ is beyond this input's 20 positions: it would act on no query"):
        with intervene(llama, intervention):
            llama(tokens)
    assert n_hooks(llama) == 0
    longer = random_tokens(llama, 2, 32, seed=3)  # on longer inputs the same intervention acts
    clean = llama(longer)
    with intervene(llama, intervention):
        edited = llama(longer)
    fq = intervention.from_query
    assert torch.equal(edited[:, :fq], clean[:, :fq]) and not torch.allclose(edited[:, fq:], clean[:, fq:])


def test_bad_sources_and_fits_are_refused(llama, tokens):
    patch = PatchFirstTokenResidual.fit(llama, tokens)  # 2 aligned rows
    with pytest.raises(SinkInterpError, match="patch source has 2 rows but the batch has 3"):
        with intervene(llama, patch):
            llama(random_tokens(llama, 3, 20))
    with pytest.raises(SinkInterpError, match="source 'mean' needs reference tokens"):
        PatchFirstTokenResidual.fit(llama, "mean")
    with pytest.raises(SinkInterpError, match="mode 'patch' takes one source sequence, got 2"):
        ReplaceSinkKey.fit(llama, tokens, mode="patch")
    with pytest.raises(SinkInterpError, match="fit_constant_bias method 'adam' is not one of"):
        fit_constant_bias(llama, tokens, method="adam")
    with pytest.raises(SinkInterpError, match="calibration tokens have 20 positions: from_query 19"):
        fit_constant_bias(llama, tokens, from_query=19)
    with pytest.raises(SinkInterpError, match="intervene takes Intervention values, got dict"):
        with intervene(llama, {"type": "MaskSinkKey"}):
            pass
