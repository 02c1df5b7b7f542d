"""Step sources in experiment specs (repeated tokens here; needle prompts need a tokenizer and are
covered by the SmolLM2 head-validation tests): scored at their steps, through the runner."""

from __future__ import annotations

import pytest

from sinkinterp import SinkInterpError
from sinkinterp.data import repeated_random_tokens
from sinkinterp.evaluate import step_metrics
from sinkinterp.experiments import ExperimentSpec, run_experiment, validation_specs
from sinkinterp.heads import RepeatedTokens
from sinkinterp.interventions import AblateHeads
from sinkinterp.tiny import tiny_llama

pytestmark = pytest.mark.backend  # runs again on TransformerLens 3.9 (make test)

SPEC = {
    "name": "steps", "model": "tiny-llama", "from_query": 0, "metrics": ["loss"],
    "data": {"source": "repeated", "seq_len": 20, "n_seqs": 5, "n_calibration": 3, "seed": 7, "batch_size": 2},
    "bootstrap": {"n_resamples": 100},
    "conditions": [
        {"name": "zeroed", "interventions": [{"type": "AblateHeads", "heads": [[0, 1], [1, 4]], "mode": "zero"}]},
        {"name": "mean", "interventions": [{"type": "AblateHeads", "heads": [[1, 2]], "fit": {"mode": "mean"}}]},
    ],
}


def test_repeated_tokens_are_scored_at_the_induction_targets():
    model = tiny_llama()
    results = run_experiment(ExperimentSpec.from_dict(SPEC), model=model, log=lambda *_: None)
    tokens = repeated_random_tokens(model, 8, 10, seed=7, first_token="none")  # tiny models: no first token
    calibration, evaluation = tokens[:3], RepeatedTokens(tokens[3:], 10)
    steps = evaluation.induction_steps()
    clean = step_metrics(model, evaluation.tokens, *steps, batch_size=2)
    zeroed = step_metrics(model, evaluation.tokens, *steps, batch_size=2,
                          interventions=[AblateHeads(heads=[(0, 1), (1, 4)], mode="zero")])
    mean = step_metrics(model, evaluation.tokens, *steps, batch_size=2,
                        interventions=[AblateHeads.fit(model, calibration, heads=[(1, 2)])])
    by_name = {c["name"]: c for c in results["conditions"]}
    assert results["clean"]["per_sequence"]["loss"] == clean["loss"].tolist()
    assert by_name["zeroed"]["per_sequence"]["loss"] == zeroed["loss"].tolist()
    assert by_name["mean"]["per_sequence"]["loss"] == mean["loss"].tolist()
    assert results["provenance"]["data"]["repeated"] == {"n_seqs": 8, "half_len": 10}


def test_a_separate_calibration_source_fits_on_corpus_windows_spec_checks():
    spec = ExperimentSpec.from_dict({**SPEC, "data": {**SPEC["data"], "calibration": "corpus_windows"}})
    assert spec.data.calibration == "corpus_windows" and spec.data.calibration_seq_len == 128
    with pytest.raises(SinkInterpError, match=r"spec.data.calibration: 'text' is not one of"):
        ExperimentSpec.from_dict({**SPEC, "data": {**SPEC["data"], "calibration": "text"}})


@pytest.mark.parametrize("changes, message", [
    ({"metrics": ["loss", "kl"]}, r"spec.metrics: 'kl': repeated data are scored at their steps"),
    ({"data": {**SPEC["data"], "seq_len": 21}}, r"spec.data.seq_len: 21: repeated tokens are two equal halves"),
    ({"conditions": [{"name": "s", "sweep": "layers", "interventions": [{"type": "MaskSinkKey", "from_query": 4}]}]},
     r"spec.conditions\[0\] \('s'\).sweep: a sweep scores every query"),
    ({"conditions": [{"name": "f", "replace_first_token": "random"}]},
     r"spec.conditions\[0\] \('f'\).replace_first_token: repeated data keep their first token"),
])
def test_step_sources_refuse_what_they_cannot_score(changes, message):
    with pytest.raises(SinkInterpError, match=message):
        ExperimentSpec.from_dict({**SPEC, **changes})


def test_the_head_validation_is_two_ordinary_specs():
    model = tiny_llama()
    specs = validation_specs(model, {"recall": ((0, 1),), "random-0": ((1, 3),)}, ablation="mean", seed=2,
                             n_prompts=4, context_len=64, n_seqs=4, half_len=16, n_reference=3, batch_size=2,
                             n_resamples=100)
    needle, induction = specs["needle"], specs["induction"]
    assert needle.data.source == "needle" and needle.data.seq_len == 64 and needle.metrics == ("loss", "accuracy")
    assert induction.data.source == "repeated" and induction.data.seq_len == 32 and induction.metrics == ("loss",)
    for spec in specs.values():
        assert spec.data.seed == 1002 and spec.data.calibration == "corpus_windows" and spec.data.n_calibration == 3
        assert [c.name for c in spec.conditions] == ["recall", "random-0"]
        assert spec.conditions[0].interventions[0] == {"type": "AblateHeads", "heads": [[0, 1]], "fit": {"mode": "mean"}}
    # corpus windows need a tokenizer, which tiny models lack: refused before any forward pass
    with pytest.raises(SinkInterpError, match=r"spec.data.calibration: corpus_windows need a tokenizer"):
        run_experiment(induction, model=model, log=lambda *_: None)
