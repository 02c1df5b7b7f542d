"""The attribution-patching screen on tiny models: each head's exact change of z, the gradient, its
ranking against the exact sweep, confirm, the spec form, rank statistics and refusals."""

import pytest
import torch

from sinkinterp.data import random_tokens
from sinkinterp.errors import SinkInterpError
from sinkinterp.experiments import ExperimentSpec, load_spec, run_experiment
from sinkinterp.experiments.report import format_report
from sinkinterp.experiments.screening import (
    _clean_gradients,
    _patched_deltas,
    agreement,
    screen,
    spearman,
    sweep_table,
)
from sinkinterp.experiments.sweep import Variant, fast_sweep
from sinkinterp.interventions import (
    AblateHeads,
    AblateSinkValue,
    ConstantAttentionBias,
    EditMassiveChannels,
    MaskSinkKey,
    ReplaceSinkKey,
)
from sinkinterp.tiny import tiny_gpt2, tiny_llama
from tests.conftest import captured, n_hooks

pytestmark = pytest.mark.backend  # runs again on TransformerLens 3.9 (make test)

FROM = 4


def _types(model, tokens):
    return {
        "value": AblateSinkValue(from_query=FROM),
        "key": MaskSinkKey(from_query=FROM),
        "slot": ConstantAttentionBias(logit=1.5, from_query=FROM),
        "mean": AblateHeads.fit(model, tokens.flip(0), heads="all", from_query=FROM),
    }


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def setup(request):
    make = {"tiny_llama": tiny_llama, "tiny_gpt2": tiny_gpt2}[request.param]
    model = make(n_layers=3)
    return model, random_tokens(model, 6, 20, seed=2)


@pytest.mark.parametrize("kind", ["value", "key", "slot", "mean"])
def test_each_heads_change_of_z_is_that_of_the_head_intervened_on_alone(setup, kind):
    """One forward with the intervention on every head (clean z put back at each layer) gives, for
    every head, exactly the z its single-head variant produces from clean inputs, and nothing else."""
    model, tokens = setup
    intervention = _types(model, tokens)[kind]
    layers = list(range(model.cfg.n_layers))
    _, clean_z, _ = _clean_gradients(model, tokens, layers, FROM)
    deltas = _patched_deltas(model, tokens, intervention, layers, clean_z)
    for layer, head in [(0, 0), (1, model.cfg.n_heads - 1), (2, 1)]:
        alone = intervention.restrict(model, layer, head)
        name = f"blocks.{layer}.attn.hook_z"
        changed = captured(model, tokens, [name], alone)[name] - clean_z[layer]
        assert changed[:, :, head].abs().max() > 1e-3  # the intervention does something here
        assert torch.allclose(deltas[layer][:, :, head], changed[:, :, head], atol=1e-5)
        others = [h for h in range(model.cfg.n_heads) if h != head]
        assert changed[:, :, others].abs().max() == 0  # and only to its own head
    assert n_hooks(model) == 0


def test_the_gradient_at_z_is_the_derivative_of_the_per_sequence_loss(setup):
    """Central finite differences of each sequence's loss along a random direction added at one
    head's z agree with the gradient the screen uses."""
    model, tokens = setup
    loss, _, grads = _clean_gradients(model, tokens, [1], FROM)
    direction = torch.randn(grads[1][:, :, 2].shape, generator=torch.Generator().manual_seed(0))
    eps = 1e-3

    def shifted(sign):
        def hook(z, hook):
            z = z.clone()
            z[:, :, 2] += sign * eps * direction
            return z
        with torch.no_grad(), model.hooks(fwd_hooks=[("blocks.1.attn.hook_z", hook)]):
            logits = model(tokens, return_type="logits").double()
        targets = tokens[:, FROM + 1:]
        part = logits[:, FROM:-1]
        return (torch.logsumexp(part, -1) - part.gather(-1, targets[..., None])[..., 0]).mean(-1)

    numeric = (shifted(1) - shifted(-1)) / (2 * eps)
    analytic = (grads[1][:, :, 2].double() * direction.double()).sum(dim=(1, 2))
    assert torch.allclose(numeric, analytic, rtol=0.02, atol=1e-4)
    assert torch.allclose(shifted(0), loss, atol=1e-5)


@pytest.mark.parametrize("kind", ["value", "key", "slot", "mean"])
def test_the_screen_ranks_heads_like_the_exact_sweep(setup, kind):
    """On a tiny model (small effects, nearly linear) the screen's per-head estimates track the
    exact sweep: rank correlation above 0.85, and the head with the largest exact effect estimated
    with its sign and within half its size."""
    model, tokens = setup
    result = screen(model, tokens, _types(model, tokens)[kind], from_query=FROM, batch_size=4)
    assert len(result.variants) == model.cfg.n_layers * model.cfg.n_heads
    assert result.estimates.shape == (len(result.variants), tokens.shape[0])
    exact = fast_sweep(model, tokens, result.variants, from_query=FROM, batch_size=4)
    check = result.validate(exact)
    assert check["spearman"] > 0.85, check
    exact_mean = torch.stack([r["loss"] - result.clean for r in exact]).mean(dim=1)
    biggest = int(exact_mean.abs().argmax())
    assert abs(float(result.mean()[biggest]) - float(exact_mean[biggest])) < 0.5 * float(exact_mean.abs().max())
    assert n_hooks(model) == 0


def test_confirm_runs_the_exact_sweep_on_the_top_hits_in_the_screens_order():
    model = tiny_llama(n_layers=3)
    tokens = random_tokens(model, 6, 20, seed=2)
    result = screen(model, tokens, MaskSinkKey(from_query=FROM), from_query=FROM, batch_size=4)
    top = result.top(4)
    means = result.mean()
    order = sorted(range(len(result.variants)), key=lambda i: -float(means[i]))[:4]
    assert top == [result.variants[i] for i in order]
    table = result.confirm(4)
    exact = fast_sweep(model, tokens, top, from_query=FROM, batch_size=4)
    assert [(r.layer, r.head) for r in table.itertuples()] == [(v.layer, v.head) for v in top]
    for row, r in zip(table.itertuples(), exact):
        assert row.exact == pytest.approx(float((r["loss"] - result.clean).mean()), abs=1e-6)
        assert row.estimate == pytest.approx(float(means[result.variants.index(top[row.rank - 1])]))
        assert row.low <= row.exact <= row.high
    both = result.top(2, largest=3)
    assert both[:2] == top[:2] and len(both) == 5
    others = [i for i in range(len(result.variants)) if result.variants[i] not in top[:2]]
    biggest = sorted(others, key=lambda i: -float(result.perturbation[i]))[:3]
    assert both[2:] == [result.variants[i] for i in biggest]
    assert (result.perturbation >= 0).all() and result.perturbation.max() > 0.01
    frame = result.table()
    assert list(frame.columns) == ["layer", "head", "delta", "low", "high"]
    assert frame["delta"].is_monotonic_decreasing and len(frame) == len(result.variants)
    assert (frame.iloc[0]["layer"], frame.iloc[0]["head"]) == (top[0].layer, top[0].head)


def test_rank_statistics_on_known_values():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a * 10 + 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # ties take their average rank: ranks (0.5, 0.5, 2, 3) against (0, 1, 2, 3)
    assert spearman(torch.tensor([1.0, 1.0, 2.0, 3.0]), a) == pytest.approx(0.9486833, abs=1e-6)
    variants = [Variant(0, h, ()) for h in range(12)]
    exact = torch.arange(12.0)  # head 11 largest
    estimate = exact.clone()
    estimate[0], estimate[11] = 11.0, 0.0  # the largest and the smallest swapped
    out = agreement(variants, estimate, exact, ks=(10,), n_misses=2)
    assert out["top10_overlap"] == pytest.approx(0.9)  # heads 2..10 shared; 0 in the estimate's top 10, 1 in exact's
    assert {(m["head"], m["estimate_rank"], m["exact_rank"]) for m in out["misses"]} == {(0, 1, 12), (11, 12, 1)}
    assert "top20_overlap" not in agreement(variants, estimate, exact)  # fewer than 20 variants
    # rerunning the 10 largest perturbations too finds head 11, which the estimate ranks last
    size = torch.zeros(12)
    size[11] = 5.0
    with_size = agreement(variants, estimate, exact, ks=(10,), perturbation=size)
    assert with_size["top10_recall_with_largest"] == pytest.approx(1.0)
    with pytest.raises(SinkInterpError, match="spearman needs two 1-d tensors of one length >= 2"):
        spearman(a, a[:3])
    clean = torch.zeros(3, dtype=torch.float64)
    frame = sweep_table(variants[:2], [{"loss": torch.tensor([1.0, 2.0, 3.0])}, {"loss": torch.tensor([4.0, 4, 4])}],
                        clean)
    assert frame["head"].tolist() == [1, 0] and frame["delta"].tolist() == pytest.approx([4.0, 2.0])


def test_refusals_name_the_value_and_leave_no_hook():
    model = tiny_llama()
    tokens = random_tokens(model, 2, 16, seed=0)
    with pytest.raises(SinkInterpError, match="screen cannot estimate EditMassiveChannels head by head"):
        screen(model, tokens, EditMassiveChannels(channels=[1], mode="zero", layers=[0]), from_query=4)
    with pytest.raises(SinkInterpError, match="screen cannot estimate ReplaceSinkKey head by head"):
        screen(model, tokens, ReplaceSinkKey.fit(model, tokens), from_query=4)
    with pytest.raises(SinkInterpError, match="from_query 15 leaves no scored query in sequences of 16 tokens"):
        screen(model, tokens, MaskSinkKey(from_query=4), from_query=15)
    # the intervention fails inside the forward (its own from_query is past the sequence): no hook stays
    with pytest.raises(SinkInterpError, match="MaskSinkKey"):
        screen(model, tokens, MaskSinkKey(from_query=20), from_query=4)
    assert n_hooks(model) == 0


def test_a_spec_screen_confirms_its_top_hits_with_the_exact_sweeps_losses(tmp_path):
    """``sweep: heads, method: screen, confirm: k``: the estimates read like a sweep, and each
    confirmed head's exact losses equal the exact sweep's for that head in the same run."""
    spec = ExperimentSpec.from_dict({
        "name": "screen", "model": "tiny-llama",
        "data": {"source": "random", "seq_len": 24, "n_seqs": 6, "n_calibration": 2, "batch_size": 4},
        "from_query": 6, "metrics": ["loss"], "bootstrap": {"n_resamples": 200}, "measurements": [],
        "criteria": [],
        "conditions": [
            {"name": "exact", "sweep": "heads", "interventions": [{"type": "MaskSinkKey", "from_query": 6}]},
            {"name": "screened", "sweep": "heads", "method": "screen", "confirm": 3,
             "interventions": [{"type": "MaskSinkKey", "from_query": 6}]},
        ],
    })
    results = run_experiment(spec, tmp_path / "run", log=lambda *_: None)
    exact, screened = results["conditions"]
    assert screened["sweep"]["method"] == "screen" and exact["sweep"]["method"] == "exact"
    assert len(screened["sweep"]["variants"]) == len(exact["sweep"]["variants"]) == 12
    by_head = {(v["layer"], v["head"]): v for v in exact["sweep"]["variants"]}
    estimated = sorted(screened["sweep"]["variants"], key=lambda v: -v["loss"]["delta"]["value"])
    confirmed = screened["sweep"]["confirmed"]
    assert len(confirmed) == 6  # the 3 largest estimates, then the 3 largest perturbations among the rest
    assert [(v["layer"], v["head"]) for v in confirmed[:3]] == [(v["layer"], v["head"]) for v in estimated[:3]]
    rest = sorted(estimated[3:], key=lambda v: -v["perturbation"])
    assert [(v["layer"], v["head"]) for v in confirmed[3:]] == [(v["layer"], v["head"]) for v in rest[:3]]
    for v in confirmed:
        same = by_head[v["layer"], v["head"]]
        assert v["per_sequence"]["loss"] == pytest.approx(same["per_sequence"]["loss"], abs=1e-6)
        assert v["exact"]["value"] == pytest.approx(same["loss"]["delta"]["value"], abs=1e-6)
    text = format_report(results)
    assert "attribution-patching screen" in text and "Rerun exactly (6: the largest estimates" in text


def test_the_builtin_screen_spec_runs_every_type_and_confirms(tmp_path):
    spec = load_spec("screen", overrides={"model": "tiny-llama", "data.source": "random", "data.seq_len": 24,
                                          "data.n_seqs": 6, "data.n_calibration": 2, "data.batch_size": 4,
                                          "from_query": 6, "bootstrap.n_resamples": 100})
    spec = ExperimentSpec.from_dict({**spec.to_dict(), "conditions": [
        {**c, **({"confirm": 2} if c.get("sweep") else {}),
         "interventions": [{**iv, "from_query": 6} for iv in c["interventions"]]}
        for c in spec.to_dict()["conditions"]]})
    results = run_experiment(spec, tmp_path / "run", log=lambda *_: None)
    assert [c["name"] for c in results["conditions"]] == ["sink key masked in every head", "sink value zeroed",
                                                         "sink key masked", "head mean-ablated",
                                                         "constant slot for the sink"]
    assert results["conditions"][0].get("sweep") is None and len(results["verdicts"]) == 1
    for c in results["conditions"][1:]:
        assert c["sweep"]["method"] == "screen" and len(c["sweep"]["variants"]) == 12
        assert len(c["sweep"]["confirmed"]) == 4
        assert all(v["exact"]["value"] != 0 for v in c["sweep"]["confirmed"])
