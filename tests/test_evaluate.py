"""evaluate(): per-sequence loss / KL / accuracy, against direct TransformerLens computations and
the experiment runner; its refusals."""

import pytest
import torch

from sinkinterp import MaskSinkKey, SinkInterpError, evaluate, paired_difference, recovery_fraction
from sinkinterp.data import random_tokens
from sinkinterp.experiments import ExperimentSpec, run_experiment
from sinkinterp.interventions import ConstantAttentionBias, intervene
from sinkinterp.tiny import tiny_llama
from conftest import n_hooks

pytestmark = pytest.mark.backend  # runs again on TransformerLens 3.9 (make test)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def tokens(llama):
    return random_tokens(llama, 5, 24, seed=0)


def test_metrics_equal_a_direct_computation(llama, tokens):
    fq, mask = 8, MaskSinkKey(from_query=8)
    got = evaluate(llama, tokens, mask, metrics=("loss", "kl", "accuracy"), from_query=fq, batch_size=2)
    with torch.inference_mode():
        clean_logits = llama(tokens)
        clean_loss = llama(tokens, return_type="loss", loss_per_token=True)
        with intervene(llama, mask):
            logits = llama(tokens)
            loss = llama(tokens, return_type="loss", loss_per_token=True)  # [batch, pos - 1]
    torch.testing.assert_close(got.loss, loss[:, fq:].double().mean(dim=1), rtol=0, atol=1e-6)
    p, q = clean_logits[:, fq:-1].log_softmax(-1), logits[:, fq:-1].log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1).mean(-1).double()
    torch.testing.assert_close(got.kl, kl, rtol=0, atol=1e-6)
    accuracy = (logits[:, fq:-1].argmax(-1) == tokens[:, fq + 1:]).double().mean(-1)
    torch.testing.assert_close(got.accuracy, accuracy, rtol=0, atol=0)
    clean = evaluate(llama, tokens, metrics=("kl", "loss"), from_query=fq)
    assert clean.kl.tolist() == [0.0] * 5 and list(clean.values) == ["loss", "kl"]
    torch.testing.assert_close(clean.loss, clean_loss[:, fq:].double().mean(dim=1), rtol=0, atol=1e-6)
    assert got.interventions == (mask.to_dict(),) and got.from_query == fq and got.n_seqs == 5
    assert list(got.to_frame().columns) == ["loss", "kl", "accuracy"] and len(got.to_frame()) == 5
    assert n_hooks(llama) == 0
    # The paired statistics take the per-sequence values directly.
    diff = paired_difference(got.loss, clean.loss, seed=0)
    assert diff.value == pytest.approx(float((got.loss - clean.loss).mean()))


def test_evaluate_gives_the_runners_numbers(llama):
    spec = ExperimentSpec.from_dict({
        "name": "e", "model": "tiny-llama", "seed": 0,
        "data": {"source": "random", "seq_len": 32, "n_seqs": 6, "n_calibration": 3},
        "from_query": 8, "metrics": ["loss", "kl", "accuracy"],
        "conditions": [{"name": "mask", "interventions": [{"type": "MaskSinkKey", "from_query": 8}]}],
        "bootstrap": {"n_resamples": 200},
    })
    results = run_experiment(spec, None, model=llama, log=lambda *a: None)
    evaluation = random_tokens(llama, 9, 32, seed=0)[3:]  # the runner's split: calibration first
    got = evaluate(llama, evaluation, MaskSinkKey(from_query=8), metrics=("loss", "kl", "accuracy"), from_query=8)
    ran = results["conditions"][0]["per_sequence"]
    for name in ("loss", "kl", "accuracy"):
        torch.testing.assert_close(got.values[name], torch.tensor(ran[name], dtype=torch.float64), rtol=0, atol=1e-6)


def test_recovery_fraction_of_a_slot_from_evaluations(llama, tokens):
    clean = evaluate(llama, tokens, from_query=8)
    broken = evaluate(llama, tokens, MaskSinkKey(from_query=8), from_query=8)
    same = evaluate(llama, tokens, MaskSinkKey(from_query=8), from_query=8)
    assert recovery_fraction(clean.loss, broken.loss, same.loss).value == pytest.approx(0.0)
    assert recovery_fraction(clean.loss, broken.loss, clean.loss).value == pytest.approx(1.0)


@pytest.mark.parametrize("call, message", [
    (lambda m, t: evaluate(m, t, from_query=23), r"from_query 23 leaves no prediction in sequences of 24 tokens: use 0..22"),
    (lambda m, t: evaluate(m, t, from_query=-1), r"from_query -1 leaves no prediction"),
    (lambda m, t: evaluate(m, t, from_query=True), r"from_query True leaves no prediction"),
    (lambda m, t: evaluate(m, t, metrics=("perplexity",)), r"metrics \['perplexity'\]: choose from loss, kl, accuracy"),
    (lambda m, t: evaluate(m, t, metrics=()), r"metrics \[\]: choose from"),
    (lambda m, t: evaluate(m, t, {"type": "MaskSinkKey"}), r"evaluate takes Intervention values after the tokens, got dict"),
    (lambda m, t: evaluate(m, t[0]), r"tokens must be 2-D"),
    (lambda m, t: evaluate(m, t, batch_size=0), r"batch_size"),
    (lambda m, t: evaluate(m, t, MaskSinkKey(from_query=30)), r"from_query 30 is beyond this input's 24 positions"),
    (lambda m, t: evaluate(m, t).kl, r"'kl' was not computed: pass metrics=\(\.\.\., 'kl'\) to evaluate"),
])
def test_bad_calls_are_refused(llama, tokens, call, message):
    with pytest.raises(SinkInterpError, match=message):
        call(llama, tokens)
    assert n_hooks(llama) == 0


def test_an_error_mid_run_leaves_no_hook(llama, tokens):
    slot = ConstantAttentionBias(logit=1.0, from_query=8)  # value None: keeps the sink's value
    bad = MaskSinkKey(position=30, from_query=31)  # a position past these inputs
    with pytest.raises(SinkInterpError, match="position 30 is beyond this input's 24 positions"):
        evaluate(llama, tokens, slot, bad, from_query=8)
    assert n_hooks(llama) == 0
