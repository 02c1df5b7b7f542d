"""Inference-time stand-ins for the sink on tiny random models: each equals its definition on a
hand-computed attention, fits with the model frozen, and runs from the built-in spec."""

from __future__ import annotations

import math

import pytest
import torch

from sinkinterp import SinkInterpError
from sinkinterp.experiments import load_spec, run_experiment
from sinkinterp.interventions import (
    ConstantAttentionBias,
    Intervention,
    KeyValueSlot,
    MaskSinkKey,
    OutputGate,
    WindowAttention,
    intervene,
    softmax_off_by_one,
)
from sinkinterp.measure import attention_budget
from sinkinterp.tiny import tiny_llama
from conftest import captured

pytestmark = pytest.mark.backend  # runs again on TransformerLens 3.9 (make test)

FQ = 4


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(n_layers=3)


@pytest.fixture(scope="module")
def tokens(llama):
    return torch.randint(0, llama.cfg.d_vocab, (6, 12), generator=torch.Generator().manual_seed(0))


def test_softmax_off_by_one_is_a_softmax_with_one_more_exp_of_zero(llama, tokens):
    layer = 1
    clean = captured(llama, tokens, [f"blocks.{layer}.attn.hook_attn_scores"])
    slot = softmax_off_by_one(from_query=FQ)
    assert slot == ConstantAttentionBias(logit=0.0, from_query=FQ)
    # Feed layer 1 the clean scores of layer 1 ... by comparing only layer 0, whose input is clean.
    scores = captured(llama, tokens, ["blocks.0.attn.hook_attn_scores"])["blocks.0.attn.hook_attn_scores"].double()
    pattern = captured(llama, tokens, ["blocks.0.attn.hook_pattern"], slot)["blocks.0.attn.hook_pattern"].double()
    rows = scores[:, :, FQ:].clone()
    rows[..., 0] = -math.inf  # the sink's key is masked, the slot takes its place
    expected = rows.exp() / (1 + rows.exp().sum(dim=-1, keepdim=True))
    assert torch.allclose(pattern[:, :, FQ:], expected, atol=1e-6)
    assert torch.allclose(pattern[:, :, :FQ].sum(dim=-1), torch.ones(1, dtype=torch.float64), atol=1e-6)
    assert clean  # the clean capture ran without the slot


def test_a_key_value_slot_is_an_extra_key_at_rotary_angle_zero(llama, tokens):
    slot = KeyValueSlot.fit(llama, tokens, from_query=FQ)
    assert slot.scale == pytest.approx(math.sqrt(llama.cfg.d_head), rel=1e-4)
    seen = captured(llama, tokens, ["blocks.0.attn.hook_rot_q", "blocks.0.attn.hook_attn_scores"])
    q, scores = seen["blocks.0.attn.hook_rot_q"].double(), seen["blocks.0.attn.hook_attn_scores"].double()
    key, value = torch.tensor(slot.key)[0].double(), torch.tensor(slot.value)[0].double()  # [head d]
    slot_logit = torch.einsum("bqhd,hd->bhq", q[:, FQ:], key) / slot.scale
    rows = scores[:, :, FQ:].clone()
    rows[..., 0] = -math.inf
    full = torch.cat([rows, slot_logit[..., None]], dim=-1).softmax(dim=-1)
    got = captured(llama, tokens, ["blocks.0.attn.hook_pattern", "blocks.0.attn.hook_z"], slot)
    assert torch.allclose(got["blocks.0.attn.hook_pattern"].double()[:, :, FQ:], full[..., :-1], atol=1e-6)
    # z gains (slot weight) x value on those rows
    clean_v = captured(llama, tokens, ["blocks.0.attn.hook_v"])["blocks.0.attn.hook_v"].double()
    group = llama.cfg.n_heads // clean_v.shape[2]
    v = clean_v.repeat_interleave(group, dim=2)  # [batch key head d]
    z = torch.einsum("bhqk,bkhd->bqhd", full[..., :-1], v) + full[..., -1].transpose(1, 2)[..., None] * value
    assert torch.allclose(got["blocks.0.attn.hook_z"].double()[:, FQ:], z, atol=1e-5)
    assert Intervention.from_dict(slot.to_dict()) == slot


def test_a_k_bias_slot_has_no_value_and_fits_by_gradient_with_the_model_frozen(llama, tokens):
    before = {name: p.detach().clone() for name, p in llama.named_parameters()}
    slot = KeyValueSlot.fit(llama, tokens[:4], validation=tokens[4:], method="gradient", with_value=False,
                            from_query=FQ, steps=5, lr=0.05)
    assert slot.value is None and slot.method == "gradient"
    assert slot.fit_log["n_train"] == 4 and slot.fit_log["n_validation"] == 2
    assert len(slot.fit_log["validation_loss"]) == slot.fit_log["steps_run"] + 1
    for name, p in llama.named_parameters():
        assert torch.equal(p, before[name]) and p.requires_grad
    moments = KeyValueSlot.fit(llama, tokens[:4], from_query=FQ, with_value=False)
    if slot.fit_log["kept_step"] > 0:
        assert slot.key != moments.key


@pytest.mark.parametrize("kind", ["headwise", "elementwise", "constant"])
def test_an_output_gate_scales_each_heads_output_by_its_gate(llama, tokens, kind):
    gate = OutputGate.fit(llama, tokens[:4], validation=tokens[4:], kind=kind, from_query=FQ, steps=3, rank=2)
    assert gate.fit_log["n_validation"] == 2
    seen = captured(llama, tokens, ["blocks.0.ln1.hook_normalized", "blocks.0.attn.hook_z"], gate)
    masked = captured(llama, tokens, ["blocks.0.attn.hook_z"], MaskSinkKey(from_query=FQ))["blocks.0.attn.hook_z"]
    x = seen["blocks.0.ln1.hook_normalized"][:, FQ:]
    bias = torch.tensor(gate.bias)[0]
    if kind == "constant":
        logit = bias.expand(*x.shape[:2], -1)
    elif kind == "headwise":
        logit = x @ torch.tensor(gate.weight)[0] + bias
    else:
        logit = x @ torch.tensor(gate.weight)[0] @ torch.tensor(gate.up)[0] + bias
    g = torch.sigmoid(logit).reshape(*x.shape[:2], llama.cfg.n_heads, -1)
    z = seen["blocks.0.attn.hook_z"]
    assert torch.allclose(z[:, FQ:], masked[:, FQ:] * g, atol=1e-5)
    assert torch.equal(z[:, :FQ], masked[:, :FQ])
    mean = gate.mean_gate(llama, tokens)
    assert mean.shape == (3,) and 0 < float(mean[0]) < 1
    assert float(mean[0]) == pytest.approx(float(torch.sigmoid(logit).double().mean()), abs=1e-6)


def test_stand_ins_refuse_bad_input(llama, tokens):
    with pytest.raises(SinkInterpError, match="kind 'gated' is not one of headwise, elementwise, constant"):
        OutputGate(kind="gated")
    with pytest.raises(SinkInterpError, match="takes a weight unless its kind is 'constant'"):
        OutputGate(kind="headwise", bias=[[0.0]])
    with pytest.raises(SinkInterpError, match="OutputGate bias has shape"):
        OutputGate(kind="constant", bias=[[0.0, 1.0]]).hooks(llama)
    with pytest.raises(SinkInterpError, match="scale must be a positive number"):
        KeyValueSlot(key=[[[0.0]]], scale=0)
    with pytest.raises(SinkInterpError, match="method 'moments' takes none"):
        KeyValueSlot.fit(llama, tokens, validation=tokens, from_query=FQ)
    with pytest.raises(SinkInterpError, match="from_query 11 leaves no query"):
        KeyValueSlot.fit(llama, tokens, from_query=11)


def test_the_attention_budget_shows_where_a_slot_takes_the_mass(llama, tokens):
    clean = attention_budget(llama, tokens, from_query=FQ)
    assert (clean.slot_share.abs() < 1e-6).all() and (clean.first_share > 0).all()
    with intervene(llama, softmax_off_by_one(from_query=FQ)):
        slotted = attention_budget(llama, tokens, from_query=FQ)
    assert (slotted.first_share == 0).all() and (slotted.slot_share > 0).all()
    _, cache = llama.run_with_cache(tokens, names_filter="blocks.0.attn.hook_pattern")
    expected = cache["blocks.0.attn.hook_pattern"][:, :, FQ:, 0].double().mean()
    assert float(clean.first_share[0]) == pytest.approx(float(expected), abs=1e-9)


def test_the_stand_ins_spec_runs_on_a_tiny_model(tmp_path):
    spec = load_spec("stand-ins", overrides={"model": "tiny-llama", "data.source": "random", "data.seq_len": 20, "data.n_seqs": 4,
                                             "data.n_calibration": 4, "data.batch_size": 4,
                                             "bootstrap.n_resamples": 200})
    assert [c.name for c in spec.conditions][:2] == ["sink key masked", "constant slot (moments)"]
    for condition in spec.conditions:  # a few steps: this checks the plumbing, not the fit
        for record in condition.interventions:
            if "steps" in (record.get("fit") or {}):
                record["fit"]["steps"] = 2
    results = run_experiment(spec, tmp_path / "run", log=lambda *_: None)
    by_name = {c["name"]: c for c in results["conditions"]}
    assert set(by_name) == {c.name for c in spec.conditions}
    gate = by_name["output gate, head-wise"]["interventions"][0]
    assert gate["type"] == "OutputGate" and gate["fit_log"]["n_validation"] == 1
    recovery = by_name["softmax-off-by-one"]["recovery"]
    assert recovery["of"] == "sink key masked"
    broken = by_name["sink key masked"]["metrics"]["loss"]["delta"]["value"]
    repaired = by_name["softmax-off-by-one"]["metrics"]["loss"]["delta"]["value"]
    assert recovery["loss"]["value"] == pytest.approx((broken - repaired) / broken, rel=1e-6)


def test_window_attention_keeps_the_recent_window_and_the_initial_tokens(llama, tokens):
    window = WindowAttention(window=3, n_initial=2, layers=(0,))
    pattern = captured(llama, tokens, ["blocks.0.attn.hook_pattern"], window)["blocks.0.attn.hook_pattern"]
    query = torch.arange(tokens.shape[1])[:, None]
    key = torch.arange(tokens.shape[1])[None, :]
    allowed = (key <= query) & ((query - key < 3) | (key < 2))
    assert (pattern[..., ~allowed] == 0).all() and (pattern[..., allowed] > 0).all()
    clean = captured(llama, tokens, ["blocks.0.attn.hook_pattern"])["blocks.0.attn.hook_pattern"]
    assert torch.allclose(pattern[:, :, :3], clean[:, :, :3])  # rows that see no more than the window
    with pytest.raises(SinkInterpError, match="window must be an integer"):
        WindowAttention(window=0)


def test_the_window_attention_spec_runs_on_a_tiny_model(tmp_path):
    spec = load_spec("window-attention", overrides={"model": "tiny-llama", "data.source": "random",
                                                    "data.seq_len": 24, "from_query": 8,
                                                    "bootstrap.n_resamples": 200})
    for condition in spec.conditions:
        condition.interventions[0]["window"] = 6
    results = run_experiment(spec, tmp_path / "run", log=lambda *_: None)
    losses = {c["name"]: c["metrics"]["loss"]["delta"]["value"] for c in results["conditions"]}
    assert len(losses) == 4 and all(v != 0 for v in losses.values())
