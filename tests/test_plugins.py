"""Extending sinkinterp without touching it: a user-defined intervention type and a user-defined
metric, each in one file outside the package (tests/plugins/), used from a YAML spec."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sinkinterp import INTERVENTIONS, METRICS, SinkInterpError, evaluate, register_metric, sink_scores
from sinkinterp.cli import load_plugin, main
from sinkinterp.experiments import load_spec, run_experiment
from sinkinterp.interventions import Intervention, intervene
from sinkinterp.tiny import tiny_llama

pytestmark = pytest.mark.backend  # runs again on TransformerLens 3.9 (make test)

PLUGINS = Path(__file__).with_name("plugins")
SPEC = """
name: plugin
model: tiny-llama
data: {source: random, seq_len: 24, n_seqs: 6, n_calibration: 4, batch_size: 3}
from_query: 4
metrics: [loss, top5]
bootstrap: {n_resamples: 200}
conditions:
  - name: scaled
    interventions:
      - type: ScaleSinkAttention
        from_query: 4
        fit: {target: 0.05}
  - name: halved
    interventions:
      - {type: ScaleSinkAttention, factor: 0.5, from_query: 4}
criteria:
  - {hypothesis: the sink matters, kind: increases, condition: scaled, threshold: 0.0}
"""


@pytest.fixture(scope="module")
def plugins():
    for name in ("scale_sink.py", "top5.py"):
        load_plugin(PLUGINS / name)
    return INTERVENTIONS["ScaleSinkAttention"]


def test_a_user_type_and_metric_run_from_a_yaml_spec(plugins, tmp_path):
    spec_file = tmp_path / "plugin.yaml"
    spec_file.write_text(SPEC)
    spec = load_spec(spec_file)
    results = run_experiment(spec, tmp_path / "run", log=lambda *_: None)
    model = tiny_llama()
    tokens = torch.tensor(json.loads((tmp_path / "run" / "results.json").read_text())["provenance"]["data"]["shape"])
    assert tokens.tolist() == [10, 24]  # 4 calibration + 6 evaluation rows
    by_name = {c["name"]: c for c in results["conditions"]}
    # The fit read the calibration split: factor = target / mean alpha there.
    from sinkinterp.data import random_tokens

    all_tokens = random_tokens(model, 10, 24, seed=0, first_token="default")
    calibration, evaluation = all_tokens[:4], all_tokens[4:]
    alpha = float(sink_scores(model, calibration, progress=False).alpha[..., 0].mean())
    (record,) = by_name["scaled"]["interventions"]
    assert record["type"] == "ScaleSinkAttention" and record["factor"] == pytest.approx(0.05 / alpha, rel=1e-12)
    # The user's metric went through the runner: the same numbers as evaluate() with it.
    fitted = Intervention.from_dict(record)
    direct = evaluate(model, evaluation, fitted, metrics=("loss", "top5"), from_query=4)
    assert by_name["scaled"]["per_sequence"]["top5"] == pytest.approx(direct.top5.tolist(), abs=0)
    assert by_name["scaled"]["per_sequence"]["loss"] == pytest.approx(direct.loss.tolist(), abs=0)
    halved, clean = by_name["halved"], results["clean"]
    paired = (torch.tensor(halved["per_sequence"]["top5"], dtype=torch.float64)
              - torch.tensor(clean["per_sequence"]["top5"], dtype=torch.float64))
    assert halved["metrics"]["top5"]["delta"]["value"] == pytest.approx(float(paired.mean()), abs=1e-12)
    # ... and the hook does what the file says.
    seen = {}
    with intervene(model, fitted):
        model.run_with_hooks(evaluation[:1], fwd_hooks=[("blocks.0.attn.hook_pattern",
                                                         lambda p, hook: seen.setdefault("p", p.clone()))])
    clean = {}
    model.run_with_hooks(evaluation[:1], fwd_hooks=[("blocks.0.attn.hook_pattern",
                                                     lambda p, hook: clean.setdefault("p", p.clone()))])
    scale_module = __import__("sinkinterp_plugin_scale_sink")
    assert torch.equal(seen["p"], scale_module.expected_pattern_change(clean["p"], record["factor"], 4))


def test_the_cli_loads_a_plugin_before_reading_the_spec(plugins, tmp_path, capsys):
    spec_file = tmp_path / "plugin.yaml"
    spec_file.write_text(SPEC)
    argv = ["run", str(spec_file), "--out", str(tmp_path / "cli"), "--plugin", str(PLUGINS / "scale_sink.py"),
            "--plugin", str(PLUGINS / "top5.py")]
    assert main(argv) == 0
    assert "the sink matters" in capsys.readouterr().out


def test_a_spec_checks_a_user_types_fit_options(plugins, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SPEC.replace("fit: {target: 0.05}", "fit: {target: 2}"))
    with pytest.raises(SinkInterpError, match=r"fit\.target: 2 is not a number in \(0, 1\]"):
        load_spec(bad)
    bad.write_text(SPEC.replace("fit: {target: 0.05}", "fit: {goal: 0.05}"))
    with pytest.raises(SinkInterpError, match=r"unknown option 'goal' for ScaleSinkAttention; allowed: target"):
        load_spec(bad)


def test_registries_refuse_a_second_entry_of_the_same_name(plugins):
    with pytest.raises(SinkInterpError, match=r"'MaskSinkKey' is already registered \(sinkinterp\.interventions\.keys"):
        type("MaskSinkKey", (Intervention,), {"__module__": "someone.else"})
    assert INTERVENTIONS["MaskSinkKey"].__module__ == "sinkinterp.interventions.keys"  # the built-in stayed
    with pytest.raises(SinkInterpError, match=r"a metric named 'top5' is already registered"):
        register_metric("top5", lambda logits, targets: logits[..., 0, 0])
    with pytest.raises(SinkInterpError, match=r"a metric named 'loss' is already registered"):
        register_metric("loss", lambda logits, targets: logits[..., 0, 0])
    assert METRICS["loss"].compute is None
    from sinkinterp.heads import SCORERS, Scorer, register_scorer

    with pytest.raises(SinkInterpError, match=r"a head scorer named 'induction' is already registered"):
        register_scorer(Scorer("induction", "repeated", SCORERS["induction"].make))


def test_a_metric_must_return_one_number_per_sequence(plugins):
    register_metric("broken_shape", lambda logits, targets: logits.mean(dim=-1))  # [batch, query]: wrong
    model = tiny_llama()
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 10), generator=torch.Generator().manual_seed(0))
    with pytest.raises(SinkInterpError, match=r"metric 'broken_shape' returned \(3, 9\); it must return one number "
                                              r"per sequence, shape \(3,\)"):
        evaluate(model, tokens, metrics=("broken_shape",))
    METRICS.pop("broken_shape")
