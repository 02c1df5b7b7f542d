"""Figures: pure functions from measurements or results to matplotlib ``Figure`` objects.

Nothing here shows or saves a figure; :func:`save_figures` writes them as PNG (atomically) and
closes them, which is what the CLI's ``--figures DIR`` does. The plots follow the papers:

- first-token share per layer and the alpha heatmap (Gu et al.) from a :class:`SinkReport`;
- massive activations (Sun et al., Figs. 1-2) from a :class:`ResidualProfile`;
- key and value norms at the sink against the rest from :func:`qkv_geometry`;
- intervention effects with their intervals from an experiment's results or a head validation;
- the head-class map from :func:`classify_heads`.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from sinkinterp._io import atomic_write_bytes, check_writable_folder
from sinkinterp.errors import SinkInterpError
from sinkinterp.heads import HeadValidation
from sinkinterp.measure import ResidualProfile, SinkReport
from sinkinterp.measure.scan import ScanResult

__all__ = [
    "LABEL_ORDER",
    "figure_png",
    "save_figures",
    "plot_first_token_share",
    "plot_alpha_heatmap",
    "plot_massive_activations",
    "plot_qkv_norms",
    "effects_frame",
    "plot_intervention_effects",
    "plot_head_classes",
    "scan_figures",
]

#: When a head carries several labels, the map colours it by the first of these it has.
LABEL_ORDER = ("recall", "induction", "duplicate", "previous-token", "sink", "none")
_LABEL_COLOURS = {"recall": "#d62728", "induction": "#1f77b4", "duplicate": "#9467bd",
                  "previous-token": "#2ca02c", "sink": "#bdbdbd", "none": "#ffffff"}
_SCORES = ("previous_token", "duplicate", "induction", "recall", "sink", "distance")
_SINK, _REST = "#d62728", "#7f7f7f"


def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def new_subplots(*args, **kwargs):
    """``plt.subplots``, with the figure at once released by pyplot: nothing is shown or kept open
    (no window, no figure piling up in a loop), and in Jupyter the returned figure displays once,
    through its own repr, instead of twice. No backend is forced: headless, pyplot picks Agg."""
    plt = _pyplot()
    fig, axes = plt.subplots(*args, **kwargs)
    plt.close(fig)
    return fig, axes


def figure_png(figure, *, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (for an atomic write)."""
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or not 10 <= dpi <= 1200:
        raise SinkInterpError(f"dpi must be a number in 10..1200, got {dpi!r}")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def save_figures(figures: Mapping[str, Any], directory) -> list[Path]:
    """Write each figure as ``directory/<name>.png`` (atomically), close it, return the paths."""
    plt = _pyplot()
    directory = Path(directory)
    paths = []
    if not isinstance(figures, Mapping):
        raise SinkInterpError(f"figures must be a mapping name -> matplotlib figure, got {type(figures).__name__}")
    for name, figure in figures.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name) or ".." in name:
            raise SinkInterpError(f"figure name {name!r} must be a plain file stem (letters, digits, '_', '-', '.')")
        if not hasattr(figure, "savefig"):
            raise SinkInterpError(f"figure {name!r} is not a matplotlib figure, got {type(figure).__name__}")

    check_writable_folder(directory, "figures folder")
    for name, figure in figures.items():
        paths.append(atomic_write_bytes(directory / f"{name}.png", figure_png(figure)))
        plt.close(figure)
    return paths


def _report(report):
    if isinstance(report, ScanResult):
        return report.sinks
    if not isinstance(report, SinkReport):
        raise SinkInterpError(f"expected a SinkReport or ScanResult, got {type(report).__name__}")
    return report


def plot_first_token_share(report, *, title: str = ""):
    """Mean attention of queries i >= 1 on position 0 per layer: the mean over heads (line) and
    every head (dots), from :func:`sink_scores` or :func:`scan`."""
    report = _report(report)
    shares = report.first_token_share_heads.numpy()
    layers = range(report.n_layers)
    fig, ax = new_subplots(figsize=(7, 3.4))
    for layer in layers:
        ax.scatter([layer] * report.n_heads, shares[layer], s=7, color=_REST, alpha=0.45, lw=0)
    ax.plot(layers, shares.mean(axis=1), marker="o", ms=4, color=_SINK, label="mean over heads")
    ax.scatter([], [], s=7, color=_REST, label="one head")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("layer")
    ax.set_ylabel("attention on the first token")
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    ax.set_title(title or f"first-token share per layer ({report.n_seqs} sequences x {report.seq_len} tokens)",
                 fontsize=10)
    return fig


def plot_alpha_heatmap(report, *, position: int = 0, title: str = ""):
    """Gu et al.'s sink score alpha at key ``position`` for every layer and head."""
    report = _report(report)
    if not 0 <= position < report.seq_len:
        raise SinkInterpError(f"position {position} out of range: scores cover 0..{report.seq_len - 1}")
    alpha = report.alpha[:, :, position].numpy()
    fig, ax = new_subplots(figsize=(0.35 * report.n_heads + 2.2, 0.16 * report.n_layers + 1.4))
    image = ax.imshow(alpha, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=f"alpha at k={position}")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    if int(report.n_counted_at[position]) > 0:
        ratios = ", ".join(f"{report.sink_ratio_at(position, eps):.2f} at eps={eps:g}" for eps in report.eps)
    else:  # too few queries see this position for a per-sequence sink ratio
        ratios = f"n/a (fewer than {report.min_queries} queries see k={position})"
    ax.set_title(title or f"sink score alpha (k={position}); sink ratio {ratios}", fontsize=9)
    return fig


def plot_massive_activations(profile, *, layer: int | None = None, n_channels: int = 3, title: str = ""):
    """Sun et al.'s two views: the largest |x| per layer against the median (log scale), and the
    channel profile at the first token in ``layer`` (default: the peak layer) against the mean
    over the other positions, with the ``n_channels`` largest channels named."""
    if not isinstance(profile, ResidualProfile):
        if not (isinstance(profile, ScanResult) and profile.profile is not None):
            raise SinkInterpError(f"expected a ResidualProfile or ScanResult, got {type(profile).__name__}")
        profile = profile.profile
    layer = profile.peak_layer if layer is None else layer
    channels = profile.sink_channels(layer, n_channels)  # checks the layer
    fig, (left, right) = new_subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1, 1.4]})
    layers = range(profile.top.shape[0])
    for j in range(profile.top.shape[1]):
        left.plot(layers, profile.top[:, j].numpy(), marker="o", ms=3, label=f"top {j + 1}")
    left.plot(layers, profile.median.numpy(), marker="o", ms=3, color="k", label="median")
    left.set_yscale("log")
    left.set_xlabel("layer")
    left.set_ylabel("|x| (block output)")
    left.legend(fontsize=8, frameon=False)
    left.set_title("largest and median magnitudes per layer", fontsize=9)
    d_model = profile.sink.shape[1]
    right.plot(range(d_model), profile.other[layer].numpy(), color=_REST, lw=0.8, label="other positions (mean)")
    right.plot(range(d_model), profile.sink[layer].numpy(), color=_SINK, lw=0.8, label="first token")
    placed: list[tuple[int, float]] = []  # (channel, log10 |x|) of the labels drawn so far
    for row in channels.itertuples():
        height = math.log10(max(row.sink_abs, 1e-12))
        # labels of neighbouring channels with similar values would print on top of each other:
        # each one that collides moves its text a line down
        below = sum(abs(c - row.channel) < 0.15 * d_model and abs(h - height) < 0.3 for c, h in placed)
        right.annotate(f"ch {row.channel}: {row.sink_abs:,.0f}", (row.channel, row.sink_abs), fontsize=7,
                       xytext=(4, -9 * below), textcoords="offset points", va="center")
        placed.append((row.channel, height))
    right.set_yscale("log")
    right.set_xlabel("channel")
    right.set_ylabel("|x|")
    right.legend(fontsize=8, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    right.set_title(f"channel profile at layer {layer}", fontsize=9)
    fig.suptitle(title or f"massive activations ({profile.n_seqs} sequences)", fontsize=10)
    return fig


def plot_qkv_norms(geometry: pd.DataFrame, *, title: str = ""):
    """Key and value norms at the sink against the mean over other positions, per layer (mean
    over heads as lines, every head as dots), with the query norm for scale, from
    :func:`qkv_geometry`."""
    if not isinstance(geometry, pd.DataFrame):
        raise SinkInterpError(f"plot_qkv_norms takes the DataFrame qkv_geometry returns, got {type(geometry).__name__}")
    needed = {"layer", "head", "q_norm", "k_sink_norm", "k_other_norm", "v_sink_norm", "v_other_norm"}
    missing = needed - set(geometry.columns)
    if missing:
        raise SinkInterpError(f"the frame lacks {sorted(missing)}: pass the frame qkv_geometry returns")
    by_layer = geometry.groupby("layer")
    fig, axes = new_subplots(1, 2, figsize=(11, 3.4), sharex=True)
    for ax, kind in zip(axes, ("k", "v")):
        for column, colour, label in ((f"{kind}_sink_norm", _SINK, "sink (first token)"),
                                      (f"{kind}_other_norm", _REST, "other positions")):
            ax.scatter(geometry["layer"], geometry[column], s=6, color=colour, alpha=0.35, lw=0)
            ax.plot(by_layer[column].mean(), marker="o", ms=3, color=colour, label=label)
        if kind == "k":
            ax.plot(by_layer["q_norm"].mean(), ls="--", color="k", lw=0.8, label="queries (mean)")
        ax.set_xlabel("layer")
        ax.set_ylabel(f"||{kind}||")
        ax.set_title({"k": "key norms", "v": "value norms"}[kind], fontsize=9)
        ax.legend(fontsize=8, frameon=False)
    fig.suptitle(title or "query/key/value norms: sink vs rest", fontsize=10)
    return fig


_EFFECT_COLUMNS = ["condition", "metric", "delta", "delta_low", "delta_high"]


def effects_frame(effects) -> pd.DataFrame:
    """Condition, metric, delta and its interval, from an experiment's results record (what
    ``run_experiment`` returns or ``results.json`` holds), a :class:`HeadValidation`, or a
    DataFrame of your own with those columns."""
    if isinstance(effects, pd.DataFrame):
        missing = [c for c in _EFFECT_COLUMNS if c not in effects.columns]
        if missing:
            raise SinkInterpError(f"the frame lacks {missing}: effects need columns {_EFFECT_COLUMNS}")
        return effects[_EFFECT_COLUMNS].reset_index(drop=True)
    if isinstance(effects, HeadValidation):
        frame = effects.estimates()
        frame = frame[frame["condition"] != "clean"]
        return frame[_EFFECT_COLUMNS].reset_index(drop=True)
    if not (isinstance(effects, Mapping) and "conditions" in effects and "spec" in effects):
        raise SinkInterpError(
            f"expected an experiment's results (with 'spec' and 'conditions'), a HeadValidation or a DataFrame, "
            f"got {type(effects).__name__}"
        )
    rows = []
    for i, condition in enumerate(effects["conditions"] if isinstance(effects["conditions"], list) else [None]):
        try:
            for metric, values in condition.get("metrics", {}).items():
                delta = values["delta"]
                rows.append((condition["name"], metric, float(delta["value"]), float(delta["low"]),
                             float(delta["high"])))
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise SinkInterpError(
                f"results['conditions'][{i}] is not a condition record as run_experiment writes it (name, "
                f"metrics.<metric>.delta.value/low/high): {type(e).__name__} {e}"
            ) from None
    return pd.DataFrame(rows, columns=_EFFECT_COLUMNS)


def plot_intervention_effects(effects, *, metrics: Sequence[str] | None = None, title: str = ""):
    """The change each intervention makes to each metric, relative to the clean run, with its
    interval (paired bootstrap over sequences), one panel per metric."""
    from matplotlib.ticker import MaxNLocator

    frame = effects_frame(effects)
    if frame.empty:
        raise SinkInterpError("no intervention effects to plot: the results have no non-sweep conditions")
    available = list(dict.fromkeys(frame["metric"]))
    metrics = available if metrics is None else list(metrics)
    unknown = [m for m in metrics if m not in available]
    if unknown:
        raise SinkInterpError(f"no effects for metric(s) {unknown}; available: {available}")
    conditions = list(dict.fromkeys(frame["condition"]))
    fig, axes = new_subplots(1, len(metrics), figsize=(4.6 * len(metrics) + 1.5, 0.42 * len(conditions) + 1.4),
                          sharey=True, squeeze=False)
    y = {name: len(conditions) - 1 - i for i, name in enumerate(conditions)}
    for ax, metric in zip(axes[0], metrics):
        rows = frame[frame["metric"] == metric]
        ax.errorbar(rows["delta"], rows["condition"].map(y),
                    xerr=[rows["delta"] - rows["delta_low"], rows["delta_high"] - rows["delta"]],
                    fmt="o", capsize=3, color="#1f77b4")
        ax.axvline(0, color="grey", lw=0.8, ls="--")
        ax.xaxis.set_major_locator(MaxNLocator(5))  # wide tick labels (-0.175) would otherwise run together
        ax.set_xlabel(f"Δ {metric.replace('_', ' ')} vs clean")
    axes[0][0].set_yticks(list(y.values()), list(y.keys()))
    confidence = ""
    if isinstance(effects, Mapping):
        confidence = f" ({effects['spec']['bootstrap']['confidence']:.0%} CI)"
        title = title or effects["spec"]["name"]
    fig.suptitle((title or "intervention effects") + confidence, fontsize=10)
    return fig


def plot_head_classes(table: pd.DataFrame, *, scores=_SCORES):
    """A layers x heads map of each score (0..1) and one of the labels, from :func:`classify_heads`.

    In the label map a cell's colour is its first label in :data:`LABEL_ORDER`; its letters name
    every non-sink label it carries (R recall, I induction, D duplicate, P previous-token), and a
    dot marks a sink head.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    if not isinstance(table, pd.DataFrame) or table.empty:
        raise SinkInterpError("plot_head_classes takes the (non-empty) frame classify_heads returns")
    for column in ("layer", "head", "labels"):
        if column not in table.columns:
            raise SinkInterpError(f"the table has no {column!r} column: pass the frame classify_heads returns")
    if isinstance(scores, str) or not isinstance(scores, (list, tuple)):
        raise SinkInterpError(f"scores must be a list of score columns, got {scores!r}")
    scores = [s for s in scores if s in table.columns]
    if not scores:
        raise SinkInterpError("none of the scores to plot is a column of the table; its columns: "
                              + ", ".join(map(str, table.columns)))
    n_layers, n_heads = int(table["layer"].max()) + 1, int(table["head"].max()) + 1
    panels = len(scores) + 1
    fig, axes = new_subplots(1, panels, figsize=(1.0 + 0.42 * n_heads * panels, 0.16 * n_layers + 1.8),
                          sharey=True, squeeze=False)
    axes = axes[0]

    def grid(column):
        return table.pivot(index="layer", columns="head", values=column).reindex(
            index=range(n_layers), columns=range(n_heads))

    for ax, score in zip(axes, scores):
        image = ax.imshow(grid(score).to_numpy(dtype=float), vmin=0, vmax=1, cmap="viridis", aspect="auto",
                          origin="upper", interpolation="nearest")
        ax.set_title(score.replace("_", " "), fontsize=9)
        ax.set_xlabel("head")
    fig.colorbar(image, ax=list(axes[:-1]), fraction=0.02, pad=0.01)

    ax = axes[-1]
    primary = table["labels"].map(lambda labels: next(l for l in LABEL_ORDER if l in labels or l == "none"))
    codes = primary.map({label: i for i, label in enumerate(LABEL_ORDER)})
    code_grid = table.assign(code=codes).pivot(index="layer", columns="head", values="code").reindex(
        index=range(n_layers), columns=range(n_heads))
    cmap = ListedColormap([_LABEL_COLOURS[l] for l in LABEL_ORDER])
    ax.imshow(code_grid.to_numpy(dtype=float), cmap=cmap, vmin=-0.5, vmax=len(LABEL_ORDER) - 0.5,
              aspect="auto", origin="upper", interpolation="nearest")
    letters = {"recall": "R", "induction": "I", "duplicate": "D", "previous-token": "P"}
    for row in table.itertuples():
        text = "".join(letters[l] for l in LABEL_ORDER if l in row.labels and l in letters)
        if "sink" in row.labels:
            text = text or "\u00b7"
        if text:
            ax.text(row.head, row.layer, text, ha="center", va="center", fontsize=5)
    ax.set_title("labels", fontsize=9)
    ax.set_xlabel("head")
    ax.legend(handles=[Patch(facecolor=_LABEL_COLOURS[l], edgecolor="k", label=l) for l in LABEL_ORDER],
              loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7, frameon=False)
    axes[0].set_ylabel("layer")
    seed = table.attrs.get("seed")
    fig.suptitle(f"head classes{'' if seed is None else f' (seed {seed})'}", fontsize=10)
    return fig


def scan_figures(result, geometry: pd.DataFrame | None = None) -> dict[str, Any]:
    """The figures of a :func:`scan` (and of its :func:`qkv_geometry`, when given), by file stem."""
    figures = {"first_token_share": plot_first_token_share(result), "alpha_heatmap": plot_alpha_heatmap(result)}
    if getattr(result, "profile", None) is not None:
        figures["massive_activations"] = plot_massive_activations(result.profile)
    if geometry is not None:
        figures["qkv_norms"] = plot_qkv_norms(geometry)
    return figures
