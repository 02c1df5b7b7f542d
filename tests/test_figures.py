"""Figures draw the numbers they are given: each test reads the data back out of the returned
matplotlib objects. Also the residual profile behind the massive-activation figure, against a
direct computation. Tiny models and hand-made results, no weights."""

import matplotlib
import numpy as np
import pytest
import torch

from sinkinterp import SinkInterpError, load_model, qkv_geometry, sink_scores
from sinkinterp.data import random_tokens
from sinkinterp.figures import (
    effects_frame,
    figure_png,
    plot_alpha_heatmap,
    plot_first_token_share,
    plot_intervention_effects,
    plot_massive_activations,
    plot_qkv_norms,
    save_figures,
    scan_figures,
)
from sinkinterp.measure import ResidualProfile, residual_profile
from sinkinterp.measure.scan import scan

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


@pytest.fixture(scope="module")
def tokens(tiny):
    return random_tokens(tiny, 3, 12, seed=0)


def test_residual_profile_matches_a_direct_computation(tiny, tokens):
    profile = residual_profile(tiny, tokens, k=2, batch_size=2)
    _, cache = tiny.run_with_cache(tokens)
    for layer in range(tiny.cfg.n_layers):
        x = cache[f"blocks.{layer}.hook_resid_post"].double().abs()  # [batch pos d_model]
        flat = x.flatten(1)
        torch.testing.assert_close(profile.top[layer], flat.topk(2, dim=1).values.mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(profile.median[layer], flat.median(dim=1).values.mean(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(profile.sink[layer], x[:, 0].mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(profile.other[layer], x[:, 1:].mean(dim=(0, 1)), rtol=1e-5, atol=1e-6)
    channels = profile.sink_channels(1, n=3)
    assert channels["channel"].tolist() == profile.sink[1].topk(3).indices.tolist()
    assert profile.peak_layer == int(profile.top[:, 0].argmax()) and profile.n_seqs == 3
    with pytest.raises(SinkInterpError, match="layer 7 out of range"):
        profile.sink_channels(7)
    with pytest.raises(SinkInterpError, match="k must be"):
        residual_profile(tiny, tokens, k=0)


def test_sink_figures_draw_the_report(tiny, tokens):
    report = sink_scores(tiny, tokens)
    fig = plot_first_token_share(report)
    line = fig.axes[0].lines[0]
    assert list(line.get_xdata()) == list(range(tiny.cfg.n_layers))
    assert line.get_ydata() == pytest.approx(report.first_token_share.tolist())
    heat = plot_alpha_heatmap(report, position=1)
    drawn = np.asarray(heat.axes[0].images[0].get_array())
    np.testing.assert_allclose(drawn, report.alpha[:, :, 1].numpy(), rtol=1e-6)
    assert "sink ratio" in heat.axes[0].get_title()
    with pytest.raises(SinkInterpError, match="position 12 out of range"):
        plot_alpha_heatmap(report, position=12)
    with pytest.raises(SinkInterpError, match="expected a SinkReport or ScanResult, got dict"):
        plot_first_token_share({})
    plt.close("all")


def test_massive_figure_names_the_sink_channels(tiny, tokens):
    result = scan(tiny, tokens)
    fig = plot_massive_activations(result, layer=0, n_channels=2)
    left, right = fig.axes
    assert left.lines[0].get_ydata() == pytest.approx(result.profile.top[:, 0].tolist())
    assert left.lines[-1].get_ydata() == pytest.approx(result.profile.median.tolist())
    assert right.lines[1].get_ydata() == pytest.approx(result.profile.sink[0].tolist())
    top = result.profile.sink_channels(0, 2)
    assert [t.get_text().split(":")[0] for t in right.texts] == [f"ch {c}" for c in top["channel"]]
    assert right.get_title() == "channel profile at layer 0"
    plt.close("all")


def test_massive_figure_moves_labels_of_neighbouring_channels_apart():
    """Gemma's report drew 'ch 558' and 'ch 555' (|x| ~1,000 each) on top of each other: labels of
    nearby channels with similar values now stack a line apart; a distant channel's stays put."""
    sink = torch.ones(1, 640)
    sink[0, 163], sink[0, 558], sink[0, 555] = 100_000.0, 1_100.0, 1_030.0
    profile = ResidualProfile(top=torch.tensor([[100_000.0, 1_100.0]]), median=torch.tensor([1.0]), sink=sink,
                              other=torch.ones(1, 640), n_seqs=1)
    right = plot_massive_activations(profile, layer=0, n_channels=3).axes[1]
    offsets = {t.get_text().split(":")[0]: t.xyann for t in right.texts}
    assert offsets == {"ch 163": (4, 0), "ch 558": (4, 0), "ch 555": (4, -9)}
    plt.close("all")


def test_qkv_norm_figure_and_the_scan_set(tiny, tokens):
    geometry = qkv_geometry(tiny, tokens)
    fig = plot_qkv_norms(geometry)
    keys, values = fig.axes
    assert keys.lines[0].get_ydata() == pytest.approx(geometry.groupby("layer")["k_sink_norm"].mean().tolist())
    assert values.lines[1].get_ydata() == pytest.approx(geometry.groupby("layer")["v_other_norm"].mean().tolist())
    with pytest.raises(SinkInterpError, match="the frame lacks \\['k_sink_norm'"):
        plot_qkv_norms(geometry.drop(columns=["k_sink_norm"]))
    figures = scan_figures(scan(tiny, tokens), geometry)
    assert list(figures) == ["first_token_share", "alpha_heatmap", "massive_activations", "qkv_norms"]
    plt.close("all")


def _results(deltas: dict[str, tuple[float, float, float]]) -> dict:
    """A minimal experiment results record with loss deltas per condition."""
    def estimate(v, lo, hi):
        return {"value": v, "low": lo, "high": hi, "confidence": 0.95}

    conditions = [{"name": name, "metrics": {"loss": {"value": estimate(0, 0, 0), "delta": estimate(*d)}}}
                  for name, d in deltas.items()]
    conditions.append({"name": "sweep", "sweep": {"over": "layers", "variants": []}})
    return {"spec": {"name": "toy", "bootstrap": {"confidence": 0.95}}, "conditions": conditions}


def test_intervention_effects_plot_deltas_with_their_intervals():
    results = _results({"mask": (0.8, 0.6, 1.1), "control": (0.01, -0.02, 0.05)})
    frame = effects_frame(results)
    assert frame.to_dict(orient="list") == {"condition": ["mask", "control"], "metric": ["loss", "loss"],
                                            "delta": [0.8, 0.01], "delta_low": [0.6, -0.02],
                                            "delta_high": [1.1, 0.05]}
    fig = plot_intervention_effects(results)
    ax = fig.axes[0]
    points = ax.lines[0]
    assert list(points.get_xdata()) == [0.8, 0.01] and list(points.get_ydata()) == [1, 0]
    segments = ax.collections[0].get_segments()  # the interval bars
    assert [tuple(s[:, 0]) for s in segments] == [pytest.approx((0.6, 1.1)), pytest.approx((-0.02, 0.05))]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["mask", "control"]
    assert fig._suptitle.get_text() == "toy (95% CI)"
    with pytest.raises(SinkInterpError, match=r"no effects for metric\(s\) \['kl'\]; available: \['loss'\]"):
        plot_intervention_effects(results, metrics=["kl"])
    own = plot_intervention_effects(frame.assign(extra=1), title="mine")  # a frame of your own
    assert list(own.axes[0].lines[0].get_xdata()) == [0.8, 0.01] and own._suptitle.get_text() == "mine"
    with pytest.raises(SinkInterpError, match=r"the frame lacks \['delta_low'\]"):
        effects_frame(frame.drop(columns=["delta_low"]))
    with pytest.raises(SinkInterpError, match="expected an experiment's results"):
        plot_intervention_effects({"conditions": []})
    with pytest.raises(SinkInterpError, match="no intervention effects to plot"):
        plot_intervention_effects(_results({}))
    plt.close("all")


def test_intervention_effects_of_a_head_validation():
    from sinkinterp.heads import HeadValidation

    per_seq = {"clean": {"needle_loss": [1.0, 2.0, 3.0]}, "recall": {"needle_loss": [2.0, 3.0, 4.5]}}
    validation = HeadValidation(k=1, ablation="mean", sets="top", conditions={"recall": ((0, 0),)},
                                per_seq=per_seq, n_resamples=200, seed=0, data={})
    frame = effects_frame(validation)
    assert frame["condition"].tolist() == ["recall"] and frame["delta"].tolist() == pytest.approx([7 / 6])
    assert frame["delta_low"][0] <= 7 / 6 <= frame["delta_high"][0]
    fig = plot_intervention_effects(validation, title="ablations")
    assert fig._suptitle.get_text() == "ablations"
    plt.close("all")


def test_save_figures_writes_pngs_and_closes_them(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    data = figure_png(fig)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    paths = save_figures({"line": fig}, tmp_path / "out")
    assert [p.name for p in paths] == ["line.png"] and paths[0].read_bytes()[:4] == b"\x89PNG"
    assert not plt.fignum_exists(fig.number)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["line.png"]  # no temp file left
