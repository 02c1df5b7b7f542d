"""Formation trace, sink chain, residual sinks and their interventions on tiny random models, with
massive channels planted by hooks so the right answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from sinkinterp import SinkInterpError
from sinkinterp.experiments import formation_test, load_spec, residual_sink_test, run_experiment
from sinkinterp.interventions import AblateNeurons, EditResidualDimension, Intervention, intervene
from sinkinterp.interventions.neurons import writer_sites
from sinkinterp.measure import formation_trace, read_weights, residual_sinks, sink_chain
from sinkinterp.tiny import tiny_gpt2, tiny_llama

pytestmark = pytest.mark.backend  # runs again on TransformerLens 3.9 (make test)

NEURON, LAYER, BOOST = 7, 1, 200.0


def tokens(model, n=4, t=12, seed=0):
    return torch.randint(0, model.cfg.d_vocab, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(n_layers=3)  # a block after the planted writer's


def planted_channel(model) -> int:
    """The channel neuron NEURON of block LAYER writes most strongly."""
    return int(model.blocks[LAYER].mlp.W_out[NEURON].detach().abs().argmax())


def plant(model):
    """A hook that drives neuron NEURON of block LAYER to BOOST at the first token only: a
    planted massive activation with a known writer."""
    def boost(post, hook):
        post = post.clone()
        post[:, 0, NEURON] = BOOST
        return post

    return model.hooks(fwd_hooks=[(f"blocks.{LAYER}.mlp.hook_post", boost)])


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_the_trace_telescopes_and_the_parts_add_up(make):
    model = make()
    trace = formation_trace(model, tokens(model), channels=[0, 5, 9])
    rebuilt = trace.embed[:, None] + (trace.attn + trace.mlp).cumsum(dim=1)
    assert torch.allclose(rebuilt, trace.resid, atol=1e-5)
    # float32 forward against a float64 sum of the parts
    assert torch.allclose(trace.neurons.sum(dim=1) + trace.mlp_bias, trace.mlp.mean(dim=0), atol=1e-5)
    assert torch.allclose(trace.heads.sum(dim=1) + trace.attn_bias, trace.attn.mean(dim=0), atol=1e-5)
    assert torch.allclose(trace.resid_pre[:, 1:], trace.resid[:, :-1])


def test_neuron_contributions_are_activation_times_w_out_without_a_post_norm(llama):
    x = tokens(llama)
    trace = formation_trace(llama, x, channels=[3])
    _, cache = llama.run_with_cache(x, names_filter=lambda name: name.endswith("mlp.hook_post"))
    for layer in range(llama.cfg.n_layers):
        expected = (cache[f"blocks.{layer}.mlp.hook_post"][:, 0].double()
                    * llama.blocks[layer].mlp.W_out[:, 3].double()).mean(dim=0)
        assert torch.allclose(trace.neurons[layer, :, 0], expected, atol=1e-6)


def test_the_trace_finds_a_planted_writer(llama):
    channel = planted_channel(llama)
    with plant(llama):
        trace = formation_trace(llama, tokens(llama), channels=[channel])
    step = trace.step_up(n_resamples=200).iloc[0]
    assert step.step_layer == LAYER and step.writer == "mlp" and step.writer_share > 0.9
    top = trace.top_neurons(channel, n=3)
    assert top.neuron.iloc[0] == NEURON and top.share.iloc[0] > 0.9
    expected = BOOST * float(llama.blocks[LAYER].mlp.W_out[NEURON, channel].detach())
    assert top.contribution.iloc[0] == pytest.approx(expected, rel=1e-5)
    assert f"steps up in block {LAYER}" in trace.summary()
    assert writer_sites(llama, tokens(llama), 1, channel=channel) != {}  # clean: still a valid site


def test_the_trace_refuses_what_it_cannot_trace(llama):
    x = tokens(llama)
    with pytest.raises(SinkInterpError, match="no massive activation"):
        formation_trace(llama, x)
    with pytest.raises(SinkInterpError, match="channel 999 out of range"):
        formation_trace(llama, x, channels=[999])
    with pytest.raises(SinkInterpError, match="position 12 out of range"):
        formation_trace(llama, x, channels=[0], position=12)
    trace = formation_trace(llama, x, channels=[0])
    with pytest.raises(SinkInterpError, match="channel 4 was not traced"):
        trace.top_neurons(4)


def test_the_chain_matches_a_cached_run(llama):
    x = tokens(llama)
    chain = sink_chain(llama, x, channels=[2])
    _, cache = llama.run_with_cache(x)
    for layer in (0, 1):
        resid = cache[f"blocks.{layer}.hook_resid_pre"].double()
        assert torch.allclose(chain.links["massive"][:, layer], resid[:, 0, 2].abs())
        share = resid[:, 0, 2] ** 2 / (resid[:, 0] ** 2).sum(dim=-1)
        assert torch.allclose(chain.links["channel_share"][:, layer], share)
        keys = cache[f"blocks.{layer}.attn.hook_k"].double().norm(dim=-1)  # [batch pos kv]
        assert torch.allclose(chain.links["key_ratio"][:, layer], (keys[:, 0] / keys[:, 1:].mean(dim=1)).mean(dim=1))
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"].double()
        assert torch.allclose(chain.links["first_share"][:, layer], pattern[:, :, 1:, 0].mean(dim=(1, 2)))


def test_ablate_neurons_edits_only_the_chosen_neurons_at_the_chosen_positions(llama):
    x = tokens(llama)
    ablation = AblateNeurons(layer=1, neurons=(3, 8), positions=(0, 2))
    _, clean = llama.run_with_cache(x, names_filter="blocks.1.mlp.hook_post")
    seen = {}
    with intervene(llama, ablation):
        llama.run_with_hooks(x, fwd_hooks=[("blocks.1.mlp.hook_post", lambda t, hook: seen.update(t=t.clone()))])
    before, after = clean["blocks.1.mlp.hook_post"], seen["t"]
    assert (after[:, [0, 2]][..., [3, 8]] == 0).all()
    changed = (after != before)
    changed[:, [0, 2], :] = changed[:, [0, 2], :] & False
    assert not changed.any()
    assert Intervention.from_dict(ablation.to_dict()) == ablation


def test_mean_ablation_uses_the_other_positions_and_the_control_is_matched(llama):
    x = tokens(llama, n=6)
    fitted = AblateNeurons.fit(llama, x, layer=1, neurons=(3, 8))
    _, cache = llama.run_with_cache(x, names_filter="blocks.1.mlp.hook_post")
    post = cache["blocks.1.mlp.hook_post"]
    assert torch.allclose(torch.tensor(fitted.values), post[:, 1:][..., [3, 8]].mean(dim=(0, 1)), atol=1e-6)
    control = fitted.random_control(llama, x, seed=3, pool=2)
    assert len(control.neurons) == 2 and not set(control.neurons) & {3, 8} and control.mode == "mean"
    assert control == fitted.random_control(llama, x, seed=3, pool=2)
    activity = post[:, 0].abs().mean(dim=0)
    ranked = [n for n in activity.argsort(descending=True).tolist() if n not in (3, 8)]
    assert set(control.neurons) <= set(ranked[:4])  # drawn from the 2 x 2 most active others


def test_ablate_neurons_refuses_bad_input(llama):
    with pytest.raises(SinkInterpError, match="neurons is empty"):
        AblateNeurons(layer=0, neurons=())
    with pytest.raises(SinkInterpError, match=r"neurons \(1, 1\) repeats an entry"):
        AblateNeurons(layer=0, neurons=(1, 1))
    with pytest.raises(SinkInterpError, match="mode 'mean' needs stored values"):
        AblateNeurons(layer=0, neurons=(1,), mode="mean")
    with pytest.raises(SinkInterpError, match=f"neuron 500 out of range: model has {llama.cfg.d_mlp} MLP neurons"):
        AblateNeurons(layer=0, neurons=(500,)).hooks(llama)
    with pytest.raises(SinkInterpError, match="layer 7 out of range"):
        AblateNeurons(layer=7, neurons=(1,)).hooks(llama)


def test_formation_test_breaks_a_planted_sink_and_its_control_does_not(llama):
    channel = planted_channel(llama)
    with plant(llama):
        # calibration and evaluation need not match in size (the README's runs use 16 and 32)
        result = formation_test(llama, tokens(llama, n=6, seed=1), calibration=tokens(llama, n=4, t=10),
                                channel=channel, n_resamples=200)
    assert (result.layer, result.neurons) == (LAYER, (NEURON,))
    assert set(result.chains) == {"clean", "writers zero", "control zero", "writers mean", "control mean"}
    massive = result.chains["clean"].links["massive"][:, LAYER + 1]
    assert float(massive.mean()) > 0.5 * BOOST * abs(float(llama.blocks[LAYER].mlp.W_out[NEURON, channel].detach()))
    zero = result.effect("writers zero", "massive")
    assert zero.high < -0.5 * float(massive.mean())
    control = result.effect("control zero", "massive")
    assert abs(control.value) < 0.2 * abs(zero.value)
    assert "massive" in result.carriers("writers zero")
    frame = result.frame().set_index("condition")
    assert frame.loc["writers zero", "massive_delta"] == pytest.approx(zero.value)
    assert "writers of channel" in result.summary()


def test_read_weights_are_row_norms_of_the_folded_matrices(llama):
    reads = read_weights(llama, 1)
    block = llama.blocks[1]
    attn = torch.cat([w.detach().double().permute(1, 0, 2).flatten(1)
                      for w in (block.attn.W_Q, block.attn.W_K, block.attn.W_V)], dim=1).norm(dim=1)
    assert torch.allclose(reads["attn"], attn / attn.median())
    assert reads["mlp"].shape == (llama.cfg.d_model,) and float(reads["mlp"].median()) == pytest.approx(1.0)


def test_residual_sinks_find_a_planted_dimension_on_every_token(llama):
    def plant_dimension(resid, hook):
        resid = resid.clone()
        resid[:, :, 4] += 50 * resid.pow(2).mean(dim=-1).sqrt()
        return resid

    x = tokens(llama)
    assert residual_sinks(llama, x).table.empty
    with llama.hooks(fwd_hooks=[("blocks.0.hook_resid_post", plant_dimension)]):
        found = residual_sinks(llama, x)
    assert found.channels == (4,)
    row = found.table.iloc[0]
    assert row.layer == 1 and row.fraction_of_tokens == 1.0 and row.mean_share > 0.9
    assert "channel 4: layers 1" in found.summary()
    with pytest.raises(SinkInterpError, match="min_share 0 must be a number in"):
        residual_sinks(llama, x, min_share=0)


def test_clipping_keeps_the_norm_and_leaves_earlier_positions_alone(llama):
    edit = EditResidualDimension(channels=(4,), layers=(0,), mode="clip", multiple=3.0, from_position=1)
    (name, fn), = edit.hooks(llama)
    assert name == "blocks.0.hook_resid_pre"
    x = torch.ones(2, 5, llama.cfg.d_model)
    x[:, :, 4] = 100.0
    out = fn(x, hook=None)
    assert torch.equal(out[:, 0], x[:, 0])
    rms = math.sqrt((100.0 ** 2 + llama.cfg.d_model - 1) / llama.cfg.d_model)
    before = x[:, 1:].norm(dim=-1)
    assert torch.allclose(out[:, 1:].norm(dim=-1), before)
    scale = float(before[0, 0]) / math.sqrt((3 * rms) ** 2 + llama.cfg.d_model - 1)
    assert float(out[0, 1, 4]) == pytest.approx(3 * rms * scale, rel=1e-5)
    assert float(out[0, 1, 0]) == pytest.approx(scale, rel=1e-5)
    loose = EditResidualDimension(channels=(4,), layers=(0,), multiple=3.0, keep_norm=False)
    assert float(loose.hooks(llama)[0][1](x, hook=None)[0, 0, 4]) == pytest.approx(3 * rms, rel=1e-5)


def test_residual_edits_refuse_bad_input_and_their_controls_match(llama):
    with pytest.raises(SinkInterpError, match="channels is empty"):
        EditResidualDimension(channels=())
    with pytest.raises(SinkInterpError, match="multiple must be a finite number"):
        EditResidualDimension(channels=(1,), multiple=float("nan"))
    with pytest.raises(SinkInterpError, match="factor with mode 'scale'"):
        EditResidualDimension(channels=(1,), mode="scale")
    x = tokens(llama, n=6)
    clip = EditResidualDimension(channels=(4,), multiple=0.5)
    control = clip.random_control(llama, x, seed=1, pool=2)
    assert control.mode == "scale" and control.channels != (4,)
    assert control.factor == pytest.approx(clip.clip_factor(llama, x)) and 0 < control.factor < 1
    mean = EditResidualDimension.fit(llama, x, channels=(4,), mode="mean")
    assert torch.tensor(mean.values).shape == (llama.cfg.n_layers, 1)


def test_residual_sink_test_runs_its_four_conditions(llama):
    result = residual_sink_test(llama, tokens(llama, n=6, seed=1), calibration=tokens(llama, n=4, t=10), channel=4,
                                multiple=0.5, n_resamples=200)
    assert set(result.chains) == {"clean", "clip", "control clip", "mean", "control mean"}
    assert result.effect("clip", "loss").value != 0
    # The first token is not edited (from_position 1): its own residual stays clean in block 0.
    assert torch.equal(result.chains["clip"].links["massive"][:, 0], result.chains["clean"].links["massive"][:, 0])
    assert "residual sink channel 4" in result.summary()


SPEC = """
name: writers
model: tiny-llama
data: {source: random, seq_len: 16, n_seqs: 4, n_calibration: 4, batch_size: 4}
from_query: 4
metrics: [loss]
bootstrap: {n_resamples: 200}
conditions:
  - name: writers
    interventions: [{type: AblateNeurons, fit: {writers: 2, channel: 3, mode: zero}}]
  - name: control
    interventions: [{type: AblateNeurons, fit: {writers: 2, channel: 3, control: random}}]
  - name: clip
    interventions: [{type: EditResidualDimension, channels: [3], multiple: 0.5, from_position: 1}]
  - name: clip control
    interventions: [{type: EditResidualDimension, channels: [3], multiple: 0.5, from_position: 1,
                     fit: {control: random}}]
"""


def test_the_new_interventions_run_from_a_spec(tmp_path):
    path = tmp_path / "writers.yaml"
    path.write_text(SPEC)
    results = run_experiment(load_spec(path), tmp_path / "run", log=lambda *_: None)
    records = {c["name"]: c["interventions"][0] for c in results["conditions"]}
    assert records["writers"]["type"] == "AblateNeurons" and len(records["writers"]["neurons"]) == 2
    assert not set(records["control"]["neurons"]) & set(records["writers"]["neurons"])
    assert records["clip control"]["mode"] == "scale" and records["clip control"]["channels"] != [3]


@pytest.mark.parametrize("condition, message", [
    ({"type": "AblateNeurons", "layer": 1, "fit": {"writers": 2}}, "fit.writers finds the layer and neurons"),
    ({"type": "AblateNeurons", "layer": 1}, "AblateNeurons neurons is empty"),
    ({"type": "AblateNeurons", "layer": 1, "fit": {"mode": "mean"}}, "name the neurons"),
    ({"type": "EditResidualDimension", "fit": {"control": "random"}}, "name the channels, or fit: {sinks: true}"),
    ({"type": "EditResidualDimension", "channels": [1], "fit": {"sinks": True}}, "fit.sinks finds the channels"),
])
def test_specs_refuse_incomplete_records(tmp_path, condition, message):
    import yaml

    spec = yaml.safe_load(SPEC)
    spec["conditions"] = [{"name": "bad", "interventions": [condition]}]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SinkInterpError, match=message.replace("{", r"\{").replace("}", r"\}")):
        load_spec(path)


def test_formation_test_can_ablate_the_writers_of_several_blocks():
    model = tiny_llama(n_layers=4)
    channel = planted_channel(model)
    w_out = model.blocks[2].mlp.W_out[:, channel].detach()
    second = int(w_out.abs().argmax())
    sign = 1.0 if float(w_out[second]) * float(model.blocks[LAYER].mlp.W_out[NEURON, channel].detach()) > 0 else -1.0

    def boost(neuron, value):
        def hook(post, hook):
            post = post.clone()
            post[:, 0, neuron] = value
            return post
        return hook

    hooks = [(f"blocks.{LAYER}.mlp.hook_post", boost(NEURON, BOOST)), ("blocks.2.mlp.hook_post", boost(second, sign * BOOST))]
    with model.hooks(fwd_hooks=hooks):
        result = formation_test(model, tokens(model, n=6, seed=1), calibration=tokens(model, n=6), channel=channel,
                                n_blocks=2, n_resamples=200)
    assert result.writers == {LAYER: (NEURON,), 2: (second,)} and result.first_block == 3
    assert len(result.interventions["writers zero"]) == 2
    clean = float(result.downstream("clean", "massive").mean())
    assert result.effect("writers zero", "massive").high < -0.5 * clean
    assert "block 1: neurons" in result.summary() and "block 2: neurons" in result.summary()
