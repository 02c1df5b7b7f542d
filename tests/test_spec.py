"""Experiment specs: parsing, overrides, and every error a spec can cause before model work."""

import dataclasses

import pytest
import yaml

from sinkinterp.errors import SinkInterpError
from sinkinterp.experiments import ExperimentSpec, builtin_specs, load_spec, run_experiment
from sinkinterp.tiny import tiny_llama

BASE = {
    "name": "t",
    "model": "tiny-llama",
    "data": {"source": "random", "seq_len": 24, "n_seqs": 4, "n_calibration": 2},
    "from_query": 4,
    "conditions": [
        {"name": "mask", "interventions": [{"type": "MaskSinkKey", "from_query": 4}]},
        {"name": "slot", "repairs": "mask",
         "interventions": [{"type": "ConstantAttentionBias", "from_query": 4, "fit": {"method": "moments"}}]},
    ],
    "criteria": [{"hypothesis": "h", "kind": "recovers", "condition": "slot", "threshold": 0.8}],
}


def spec_with(**changes):
    record = yaml.safe_load(yaml.safe_dump(BASE))
    for key, value in changes.items():
        target, parts = record, key.split("__")
        for part in parts[:-1]:
            target = target[int(part)] if isinstance(target, list) else target[part]
        last = parts[-1]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return record


def test_builtin_specs_load_and_round_trip():
    names = set(builtin_specs())
    assert names == {"implicit-bias", "no-op", "massive", "stand-ins", "window-attention", "screen"}
    for name in names:
        spec = load_spec(name)
        assert spec.name == name
        assert ExperimentSpec.from_dict(spec.to_dict()) == spec
        assert spec.criteria, f"{name} has no criteria: its report would have no verdict"


def test_overrides_and_fingerprint():
    spec = ExperimentSpec.from_dict(BASE)
    smaller = spec.with_overrides({"data.n_seqs": 3, "model": "tiny-gpt2"})
    assert (smaller.data.n_seqs, smaller.model) == (3, "tiny-gpt2")
    assert spec.data.n_seqs == 4  # frozen: the original is unchanged
    assert smaller.fingerprint() != spec.fingerprint()
    assert ExperimentSpec.from_dict(BASE).fingerprint() == spec.fingerprint()
    with pytest.raises(SinkInterpError, match=r"override 'data.n_seq': unknown key 'n_seq'; allowed here: .*n_seqs"):
        spec.with_overrides({"data.n_seq": 3})
    with pytest.raises(SinkInterpError, match=r"spec.data.n_seqs: expected an integer, got 'many'"):
        spec.with_overrides({"data.n_seqs": "many"})


@pytest.mark.parametrize("changes, message", [
    ({"colour": "red"}, r"spec: unknown key 'colour'; allowed keys: name, description, model"),
    ({"data__n_seq": 3}, r"spec.data: unknown key 'n_seq'; allowed keys: source, seq_len, n_seqs"),
    ({"data__seq_len": "long"}, r"spec.data.seq_len: expected an integer, got 'long'"),
    ({"data__seq_len": True}, r"spec.data.seq_len: expected an integer, got True"),
    ({"metrics": "loss"}, r"spec.metrics: expected a list of a string, got 'loss'"),
    ({"metrics": ["loss", "perplexity"]}, r"spec.metrics\[1\]: unknown metric 'perplexity'; allowed: loss, kl"),
    ({"metrics": ["kl"]}, r"spec.metrics: must include 'loss'"),
    ({"conditions__0__colour": 1}, r"spec.conditions\[0\]: unknown key 'colour'"),
    ({"conditions__0__interventions": [{"type": "MaskSinkKeys"}]},
     r"interventions\[0\]: unknown intervention 'MaskSinkKeys'; allowed: AblateHeads, AblateNeurons, AblateSinkValue, ConstantAttentionBias"),
    ({"conditions__0__interventions": [{"type": "MaskSinkKey", "query": 3}]},
     r"MaskSinkKey has no field 'query'; its fields: from_query, heads, layers, position, fit"),
    ({"conditions__0__interventions": [{"type": "MaskSinkKey", "from_query": 0}]},
     r"conditions\[0\] \('mask'\).interventions\[0\]: from_query 0 must be an integer > position 0"),
    ({"conditions__0__interventions": [{"type": "MaskSinkKey", "from_query": 30}]},
     r"interventions\[0\].from_query: 30 is beyond sequences of 24 tokens"),
    ({"conditions__1__interventions": [{"type": "ConstantAttentionBias", "fit": {"method": "moments", "stepz": 3}}]},
     r"interventions\[0\].fit: unknown option 'stepz' for ConstantAttentionBias; allowed: method"),
    ({"conditions__1__repairs": "masked"}, r"conditions\[1\] \('slot'\).repairs: 'masked' is not another condition"),
    ({"conditions__1__name": "mask"}, r"duplicate condition name"),
    ({"conditions__1__name": "clean"}, r"a name other than 'clean'"),
    ({"conditions__0__sweep": "neurons"}, r"sweep: 'neurons' is not one of \('layers', 'heads'\)"),
    ({"conditions__0__sweep": "heads", "conditions__0__method": "guess"},
     r"conditions\[0\] \('mask'\).method: 'guess' is not one of \('exact', 'screen'\)"),
    ({"conditions__0__sweep": "layers", "conditions__0__method": "screen"},
     r"a screen estimates one head at a time: it needs sweep: heads, not 'layers'"),
    ({"conditions__0__method": "screen"}, r"method: 'screen' is how a sweep is computed; this condition has no sweep"),
    ({"conditions__0__sweep": "heads", "conditions__0__confirm": 5},
     r"confirm: 5 reruns a screen's top hits exactly; it needs method: screen"),
    ({"conditions__0__sweep": "heads", "conditions__0__method": "screen", "conditions__0__confirm": -1},
     r"confirm: -1 is not an integer >= 0"),
    ({"conditions": []}, r"spec.conditions: is empty"),
    ({"criteria__0__kind": "improves"}, r"spec.criteria\[0\].kind: unknown kind 'improves'; allowed: increases"),
    ({"criteria__0__condition": "mask"}, r"'mask' repairs nothing: give it 'repairs: <condition>'"),
    ({"criteria__0__kind": "exceeds_control"}, r"no condition has control_for: 'slot'"),
    ({"data__source": "missing.txt"}, r"spec.data.source: 'missing.txt' is neither one of \('corpus', 'random', 'needle', 'repeated'\)"),
])
def test_bad_specs_name_the_key(changes, message):
    with pytest.raises(SinkInterpError, match=message):
        ExperimentSpec.from_dict(spec_with(**changes))


@pytest.mark.parametrize("changes, message", [
    ({"data__n_calibration": 0}, r"spec.data.n_calibration: is 0 but spec.conditions\[1\] \('slot'\).interventions\[0\] "
                                 r"is fitted on the calibration split"),
    ({"data__n_seqs": 1}, r"spec.data.n_seqs: must be >= 2, got 1"),
    ({"from_query": 23}, r"spec.from_query: 23 leaves no scored query in sequences of 24 tokens: allowed 0..22"),
    ({"conditions__1__interventions__0__fit": {"method": "gradient"}, "data__n_calibration": 1},
     r"spec.data.n_calibration: is 1 but spec.conditions\[1\] \('slot'\).interventions\[0\] fits by gradient on the "
     r"calibration split less 1 validation sequence\(s\): use n_calibration >= 2"),
    ({"conditions__1__interventions__0__fit": {"method": "gradient", "validation": 2}},
     r"is 2 but .* less 2 validation sequence\(s\): use n_calibration >= 3"),
    ({"conditions__1__interventions__0__fit": {"method": "moments", "patience": 3}},
     r"interventions\[0\].fit: validation and patience stop a gradient fit: they need method 'gradient'"),
    ({"conditions__1__interventions__0__fit": {"method": "gradient", "validation": 0}},
     r"fit.validation: 0 is not int: calibration sequences held out"),
    ({"conditions__1__interventions": [{"type": "PatchFirstTokenResidual", "layers": [1],
                                         "fit": {"source": "mean", "from_layer": 1}}]},
     r"interventions\[0\].fit.from_layer: give layers or fit.from_layer, not both"),
    ({"data__sampling": "start"}, r"spec.data.sampling: 'start' is not one of \('windows', 'consecutive'\)"),
])
def test_impossible_splits(changes, message):
    with pytest.raises(SinkInterpError, match=message):
        ExperimentSpec.from_dict(spec_with(**changes))


def test_malformed_yaml_and_missing_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nconditions: [\n")
    with pytest.raises(SinkInterpError, match=r"bad.yaml is not valid YAML"):
        load_spec(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- name: x\n")
    with pytest.raises(SinkInterpError, match=r"spec: expected a mapping of keys to values"):
        load_spec(listy)
    with pytest.raises(SinkInterpError, match=r"no spec file 'nope' and no built-in spec of that name; built-in: "):
        load_spec("nope")


def _forward_counter(model):
    calls = []
    model.hook_embed.add_hook(lambda x, hook: calls.append(1))
    return calls


@pytest.mark.parametrize("changes, message", [
    ({"conditions__0__interventions": [{"type": "MaskSinkKey", "from_query": 4, "layers": [2]}]},
     r"spec.conditions\[0\] \('mask'\).interventions\[0\]: layer 2 out of range: model has 2 layers \(0..1\)"),
    ({"conditions__0__interventions": [{"type": "MaskSinkKey", "from_query": 4, "heads": [6]}]},
     r"head 6 out of range: model has 6 heads"),
    ({"data__seq_len": 80}, r"spec.data.seq_len: 80 exceeds the model's context n_ctx = 64"),
    ({"data__source": "corpus"}, r"need a tokenizer"),
])
def test_model_errors_come_before_any_forward(tmp_path, changes, message):
    model = tiny_llama()
    calls = _forward_counter(model)
    spec = ExperimentSpec.from_dict(spec_with(**changes))
    with pytest.raises(SinkInterpError, match=message):
        run_experiment(spec, tmp_path / "out", model=model, log=lambda *_: None)
    assert calls == []  # no forward pass ran
    assert not (tmp_path / "out").exists()  # and nothing was written
    model.reset_hooks()


def test_spec_dataclasses_are_frozen():
    spec = ExperimentSpec.from_dict(BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 3


def test_old_spellings_are_read_with_a_warning_naming_the_new_one():
    """One name per concept: loss_from is from_query (as in interventions and evaluate), and a
    condition's first-token swap is replace_first_token (data.first_token is what sequences start with)."""
    new = ExperimentSpec.from_dict(spec_with(conditions__0__replace_first_token="random"))
    old_record = spec_with(conditions__0__replace_first_token="random")
    old_record["loss_from"] = old_record.pop("from_query")
    old_record["conditions"][0]["first_token"] = old_record["conditions"][0].pop("replace_first_token")
    with pytest.warns(DeprecationWarning) as caught:
        old = ExperimentSpec.from_dict(old_record)
    messages = [str(w.message) for w in caught]
    assert any("'loss_from' is now spelt 'from_query'" in m for m in messages)
    assert any("'first_token' is now spelt 'replace_first_token'" in m for m in messages)
    assert old == new and old.fingerprint() == new.fingerprint()
    with pytest.warns(DeprecationWarning, match="'loss_from' is now spelt 'from_query'"):
        assert new.loss_from == new.from_query == 4
    with pytest.warns(DeprecationWarning, match="'first_token' is now spelt 'replace_first_token'"):
        assert new.conditions[0].first_token == "random"
    with pytest.warns(DeprecationWarning, match="'loss_from' is now spelt 'from_query'"):
        assert new.with_overrides({"loss_from": 6}).from_query == 6
    both = spec_with()
    both["loss_from"] = 4
    with pytest.raises(SinkInterpError, match=r"spec: give 'from_query' \(the new name of 'loss_from'\), not both"):
        ExperimentSpec.from_dict(both)


def test_a_record_without_the_fit_its_arrays_need_is_refused_when_read():
    """ReplaceSinkKey without fit: used to pass validation and fail mid-run with a shape error."""
    record = spec_with(conditions__0__interventions=[{"type": "ReplaceSinkKey"}])
    with pytest.raises(SinkInterpError, match=r"ReplaceSinkKey stores arrays that only a fit makes: give it a fit: "
                                              r"block \(fit: \{\} for the defaults; options: mode\)"):
        ExperimentSpec.from_dict(record)
    record = spec_with(conditions__0__interventions=[{"type": "AblateSinkValue", "from_query": 4, "fit": {}}])
    assert ExperimentSpec.from_dict(record)  # an empty fit block: the defaults (mode mean)
