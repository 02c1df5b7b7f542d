"""Figures: pure functions from results to matplotlib figures (they never show or save anything)."""

from __future__ import annotations

import io

import pandas as pd

from sinkinterp.errors import SinkInterpError

__all__ = ["plot_head_classes", "figure_png", "LABEL_ORDER"]

#: When a head carries several labels, the map colours it by the first of these it has.
LABEL_ORDER = ("recall", "induction", "duplicate", "previous-token", "sink", "none")
_LABEL_COLOURS = {"recall": "#d62728", "induction": "#1f77b4", "duplicate": "#9467bd",
                  "previous-token": "#2ca02c", "sink": "#bdbdbd", "none": "#ffffff"}
_SCORES = ("previous_token", "duplicate", "induction", "recall", "sink", "distance")


def figure_png(figure, *, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (for an atomic write)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def plot_head_classes(table: pd.DataFrame, *, scores=_SCORES):
    """A layers x heads map of each score (0..1) and one of the labels, from :func:`classify_heads`.

    In the label map a cell's colour is its first label in :data:`LABEL_ORDER`; its letters name
    every non-sink label it carries (R recall, I induction, D duplicate, P previous-token), and a
    dot marks a sink head.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    for column in ("layer", "head", "labels"):
        if column not in table.columns:
            raise SinkInterpError(f"the table has no {column!r} column: pass the frame classify_heads returns")
    scores = [s for s in scores if s in table.columns]
    n_layers, n_heads = int(table["layer"].max()) + 1, int(table["head"].max()) + 1
    panels = len(scores) + 1
    fig, axes = plt.subplots(1, panels, figsize=(1.0 + 0.42 * n_heads * panels, 0.16 * n_layers + 1.8),
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
