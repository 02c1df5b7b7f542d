"""The three built-in experiments end to end on the embedded model, at small sizes."""

import json

import pytest

from sinkinterp.cli import main
from sinkinterp.experiments import load_spec, run_experiment

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL = {"data.seq_len": 48, "data.n_seqs": 3, "data.n_calibration": 2, "data.batch_size": 3,
         "bootstrap.n_resamples": 200}


def quiet(*_):
    pass


def by_name(results):
    return {c["name"]: c for c in results["conditions"]}


def test_implicit_bias_from_the_cli(smollm2, tmp_path, capsys):
    out = tmp_path / "implicit"
    sets = [f"{k}={v}" for k, v in SMALL.items() if k != "data.n_seqs"]
    sets.append("conditions.2.interventions.0.fit.steps=3")
    argv = ["run", "implicit-bias", "--out", str(out), "--n-seqs", "3", "--figures", str(tmp_path / "figures")]
    for item in sets:
        argv += ["--set", item]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "implicit-bias: " in printed and "recovery of loss" in printed
    results = json.loads((out / "results.json").read_text())
    bos = results["provenance"]["bos_policy"]
    assert results["provenance"]["weights_sha256"] and bos["first_token"] == "default"
    assert bos["first_token_resolved"] == "none"  # SmolLM2's own convention: no BOS
    assert results["spec"]["data"]["seq_len"] == 48
    conditions = by_name(results)
    assert len(conditions) == 9
    mask = conditions["sink key masked"]["metrics"]["loss"]["delta"]
    assert mask["low"] > 0.3  # removing the sink's key hurts this model badly
    slot = conditions["constant slot (moments)"]["recovery"]["loss"]
    assert slot["value"] > 0.6  # and a constant slot gives most of it back
    draws = conditions["first token replaced by random tokens"]["draws"]["draws"]
    assert len(draws) == 5 and len({tuple(d["first_tokens"]) for d in draws}) == 5
    keys = [d["interventions"][0]["position"] for d in conditions["control: random early key masked"]["draws"]["draws"]]
    assert len(set(keys)) == 5 and all(1 <= k <= 15 for k in keys)
    assert "most damaging of 5 draws" in printed
    # The mean first token is patched from layer 1 on; the every-layer patch is its own condition.
    assert conditions["first-token residual, mean of inputs"]["interventions"][0]["layers"] == list(range(1, 30))
    assert conditions["first-token residual, mean of inputs, embedding too"]["interventions"][0]["layers"] is None
    gradient = conditions["constant slot (gradient)"]["interventions"][0]["fit_log"]
    assert gradient["n_train"] == 1 and gradient["n_validation"] == 1 and gradient["max_steps"] == 3
    report = (out / "report.md").read_text()
    verdict = results["verdicts"][0]["verdict"]
    assert f"### implicit-bias: **{verdict}**" in report
    assert (out / "conditions.png").stat().st_size > 1000
    figures = sorted(p.name for p in (tmp_path / "figures").iterdir())  # the report's figure and the effects
    assert figures == ["conditions.png", "intervention_effects.png"]
    assert (tmp_path / "figures" / "conditions.png").read_bytes() == (out / "conditions.png").read_bytes()


def test_no_op_with_sweeps_and_measurement(smollm2, tmp_path):
    spec = load_spec("no-op", SMALL)
    results = run_experiment(spec, tmp_path / "no-op", model=smollm2, log=quiet)
    conditions = by_name(results)
    for name in ("sink value zeroed, per layer", "sink key masked, per layer"):
        variants = conditions[name]["sweep"]["variants"]
        assert [v["layer"] for v in variants] == list(range(30))
    zero = conditions["sink value zeroed"]["metrics"]["loss"]["delta"]["value"]
    mean = conditions["sink value replaced by its mean"]["metrics"]["loss"]["delta"]["value"]
    assert zero > 0.1 and abs(mean) < zero / 4  # the sink's value matters, but only as a constant
    measured = results["measurements"]["value_weighted"]
    assert measured["n_sink_heads"] > 100
    assert measured["no_op_gap"]["value"] > 0.05
    assert (tmp_path / "no-op" / "sweep-sink-key-masked-per-layer.png").exists()


def test_massive_channels_and_sink_ratio(smollm2, tmp_path):
    spec = load_spec("massive", SMALL)
    results = run_experiment(spec, tmp_path / "massive", model=smollm2, log=quiet)
    conditions = by_name(results)
    zeroed = conditions["massive channels zeroed"]
    assert 507 in zeroed["interventions"][0]["channels"]
    draws = conditions["control: random channels zeroed"]["draws"]["draws"]
    assert len(draws) == 5 and len({tuple(d["interventions"][0]["channels"]) for d in draws}) > 1
    for draw in draws:
        control = draw["interventions"][0]["channels"]
        assert 507 not in control and len(control) == len(zeroed["interventions"][0]["channels"])
    # Sun et al.'s edit: once, after the first layer where the channels are massive (layer 11).
    assert zeroed["interventions"][0]["layers"] == [11]
    assert zeroed["metrics"]["loss"]["delta"]["low"] > 5.0  # +13 nats at the full size
    assert zeroed["metrics"]["sink_ratio"]["delta"]["high"] < -0.05  # part of the sink goes with it
    assert abs(conditions["control: random channels zeroed"]["metrics"]["loss"]["delta"]["value"]) < 0.1
    every = conditions["massive channels zeroed in every layer"]
    assert every["interventions"][0]["layers"] is None
    assert every["metrics"]["loss"]["delta"]["low"] > 1.0
    # The every-layer edit costs less loss but removes more of the sink.
    assert every["metrics"]["sink_ratio"]["delta"]["value"] < zeroed["metrics"]["sink_ratio"]["delta"]["value"] - 0.1
    assert every["metrics"]["loss"]["delta"]["value"] < zeroed["metrics"]["loss"]["delta"]["value"]
