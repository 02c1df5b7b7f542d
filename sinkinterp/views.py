"""Views and figures: pure functions from a model's activations or from results to objects that
display in Jupyter (circuitsvis attention views) or to matplotlib figures (never shown or saved).

Saved views work offline and are safe: the circuitsvis bundle that ships with the package is
inlined (never the CDN), and every piece of data, token text included, goes into the page as JSON
with ``<``, ``>`` and ``&`` escaped, so a token such as ``</script><img onerror=...>`` stays text.
"""

from __future__ import annotations

import html
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from uuid import uuid4

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from sinkinterp.errors import SinkInterpError

__all__ = [
    "AttentionView",
    "attention_view",
    "compare_view",
    "plot_head_classes",
    "figure_png",
    "LABEL_ORDER",
    "MAX_VIEW_TOKENS",
    "MAX_VIEW_CELLS",
]

#: Longest input an attention view draws: each head is a T x T grid of cells in the browser.
MAX_VIEW_TOKENS = 512
#: Most cells (heads x T x T) one view draws before the browser tab slows to a crawl.
MAX_VIEW_CELLS = 4_000_000


@lru_cache(maxsize=1)
def _circuitsvis_bundle() -> str:
    """The circuitsvis browser bundle shipped in its wheel, made safe to inline in a <script>."""
    import circuitsvis

    path = Path(circuitsvis.__file__).parent / "dist" / "cdn" / "iife.js"
    if not path.is_file():
        raise SinkInterpError(f"the circuitsvis bundle is missing at {path}: reinstall circuitsvis")
    # "</script" inside the bundle (it has one, in a string) would end the inline script early;
    # "<\/script" is the same string to JavaScript.
    return re.sub(r"</(script)", r"<\\/\1", path.read_text(encoding="utf-8"), flags=re.IGNORECASE)


def _script_json(value) -> str:
    """JSON that cannot end a <script> element or start markup, whatever strings it holds."""
    text = json.dumps(value, ensure_ascii=False)
    for raw, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(raw, escaped)
    return text


@dataclass(frozen=True)
class AttentionView:
    """Attention patterns of some heads on one input, shown with circuitsvis ``AttentionHeads``.

    Displays in Jupyter (``_repr_html_``); :meth:`save_html` writes a standalone page that works
    offline. ``patterns`` is [view heads, query, key]; ``head_names`` label them.
    """

    tokens: tuple[str, ...]
    patterns: Float[Tensor, "head query key"] = field(repr=False)
    head_names: tuple[str, ...]
    title: str = ""
    element_id: str = field(default_factory=lambda: "sinkinterp-" + uuid4().hex[:12])

    def props(self) -> dict:
        return {
            "tokens": list(self.tokens),
            "attention": [[[round(float(v), 5) for v in row] for row in head] for head in self.patterns.tolist()],
            "attentionHeadNames": list(self.head_names),
            "maskUpperTri": True,
        }

    def html(self) -> str:
        """An HTML fragment: a heading, the element to render into and the scripts."""
        element = json.dumps(self.element_id)
        return (
            f'<div class="sinkinterp-view">'
            f"{f'<h3>{html.escape(self.title)}</h3>' if self.title else ''}"
            f'<div id="{html.escape(self.element_id)}" style="margin: 15px 0;"></div>'
            f"<script>{_circuitsvis_bundle()}</script>"
            f"<script>CircuitsVis.render({element}, CircuitsVis.AttentionHeads, {_script_json(self.props())});</script>"
            f"</div>"
        )

    def _repr_html_(self) -> str:
        return self.html()

    def save_html(self, path) -> Path:
        """A standalone page (atomically written), viewable offline."""
        from sinkinterp._io import atomic_write_text

        page = (
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(self.title or 'sinkinterp attention view')}</title></head>"
            f"<body>{self.html()}</body></html>\n"
        )
        return atomic_write_text(path, page)


def _view_tokens(model, tokens) -> Tensor:
    from sinkinterp._batches import check_tokens

    if isinstance(tokens, str):
        from sinkinterp.data import _text_ids

        ids = torch.tensor([_text_ids(model, tokens)], dtype=torch.long)
    elif isinstance(tokens, Tensor):
        ids = tokens[None] if tokens.ndim == 1 else tokens
    else:
        raise SinkInterpError(f"a view takes text or token ids, got {type(tokens).__name__}")
    check_tokens(model, ids)
    if ids.shape[0] != 1:
        raise SinkInterpError(f"a view shows one sequence, got {ids.shape[0]}: pass tokens[i]")
    return ids


def _token_strings(model, ids: Tensor) -> tuple[str, ...]:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return tuple(str(int(i)) for i in ids[0])
    return tuple(tokenizer.decode([int(i)]) for i in ids[0])


def _patterns(model, ids: Tensor, layers: list[int], interventions=()) -> dict[int, Tensor]:
    from sinkinterp.interventions import intervene

    kept: dict[int, Tensor] = {}

    def keep(layer: int):
        def hook(pattern, hook):
            kept[layer] = pattern[0].detach().float().cpu()

        return hook

    hooks = [(f"blocks.{layer}.attn.hook_pattern", keep(layer)) for layer in layers]
    device = next(model.parameters()).device
    with torch.inference_mode(), intervene(model, *interventions), model.hooks(fwd_hooks=hooks):
        model(ids.to(device), return_type=None)
    return kept


def _selection(model, layers, heads) -> tuple[list[int], list[int]]:
    from sinkinterp.interventions import _heads, _ints, _layers

    return _layers(model, _ints("layers", layers)), _heads(model, _ints("heads", heads))


def _check_size(n_tokens: int, n_heads: int, max_tokens: int) -> None:
    if n_tokens > max_tokens:
        raise SinkInterpError(
            f"{n_tokens} tokens is too many for an attention view (limit {max_tokens}): each head is a "
            f"{n_tokens} x {n_tokens} grid in the browser; pass fewer tokens or raise max_tokens"
        )
    cells = n_heads * n_tokens * n_tokens
    if cells > MAX_VIEW_CELLS:
        raise SinkInterpError(
            f"{n_heads} heads x {n_tokens}^2 tokens = {cells:,} cells is too many for one view "
            f"(limit {MAX_VIEW_CELLS:,}): choose fewer layers or heads"
        )


def _head_panel(pattern: Tensor, hide_sink: bool, sink: int) -> tuple[Tensor, float]:
    """One head's [query, key] pattern, optionally with the sink column removed and the rest of
    each row renormalised; and its sink score on this input, mean_i A[i, sink] over i >= sink."""
    alpha = float(pattern[sink:, sink].mean())
    if not hide_sink:
        return pattern, alpha
    rest = pattern.clone()
    rest[:, sink] = 0
    total = rest.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, rest / total.clamp(min=1e-12), rest), alpha


def attention_view(
    model,
    tokens,
    *,
    layers: Sequence[int] | int | None = None,
    heads: Sequence[int] | int | None = None,
    hide_sink: bool = False,
    sink_position: int = 0,
    interventions: Sequence = (),
    max_tokens: int = MAX_VIEW_TOKENS,
    title: str = "",
) -> AttentionView:
    """Attention patterns of the chosen layers and heads on one input (text, or token ids of one
    sequence), each head named with its sink score on this input (``L14H3 sink=0.82``).

    ``hide_sink`` removes the sink column and renormalises every row over the other keys, so what
    the head does besides resting on the sink becomes visible. ``interventions`` are applied
    during the forward (see :func:`compare_view` for clean and intervened side by side).
    """
    ids = _view_tokens(model, tokens)
    chosen_layers, chosen_heads = _selection(model, layers, heads)
    _check_size(ids.shape[1], len(chosen_layers) * len(chosen_heads), max_tokens)
    if not 0 <= sink_position < ids.shape[1]:
        raise SinkInterpError(f"sink_position {sink_position} is outside this input's {ids.shape[1]} tokens")
    kept = _patterns(model, ids, chosen_layers, interventions)
    panels, names = [], []
    for layer in chosen_layers:
        for head in chosen_heads:
            panel, alpha = _head_panel(kept[layer][head], hide_sink, sink_position)
            panels.append(panel)
            names.append(f"L{layer}H{head} sink={alpha:.2f}{' (sink hidden)' if hide_sink else ''}")
    return AttentionView(_token_strings(model, ids), torch.stack(panels), tuple(names), title)


def compare_view(
    model,
    tokens,
    interventions: Sequence,
    *,
    layers: Sequence[int] | int | None = None,
    heads: Sequence[int] | int | None = None,
    hide_sink: bool = False,
    label: str = "intervened",
    max_tokens: int = MAX_VIEW_TOKENS,
    title: str = "",
) -> AttentionView:
    """Each chosen head clean and under ``interventions``, side by side (clean first)."""
    if not interventions:
        raise SinkInterpError("compare_view needs at least one intervention to compare against the clean run")
    clean = attention_view(model, tokens, layers=layers, heads=heads, hide_sink=hide_sink, max_tokens=max_tokens)
    _check_size(len(clean.tokens), 2 * len(clean.head_names), max_tokens)
    edited = attention_view(model, tokens, layers=layers, heads=heads, hide_sink=hide_sink,
                            interventions=interventions, max_tokens=max_tokens)
    panels, names = [], []
    for i in range(len(clean.head_names)):
        panels += [clean.patterns[i], edited.patterns[i]]
        names += [f"{clean.head_names[i]} clean", f"{edited.head_names[i]} {label}"]
    return AttentionView(clean.tokens, torch.stack(panels), tuple(names), title)

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
