"""Attention views: pure functions from a model's activations to objects that display in Jupyter
(circuitsvis ``AttentionHeads``) and save as standalone pages. Matplotlib figures live in
:mod:`sinkinterp.figures`.

Saved views work offline and are safe: the circuitsvis bundle that ships with the package is
inlined (never the CDN), and every piece of data, token text included, goes into the page as JSON
with ``<``, ``>`` and ``&`` escaped, so a token such as ``</script><img onerror=...>`` stays text.
"""

from __future__ import annotations

import html
import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from uuid import uuid4

import torch
from jaxtyping import Float
from torch import Tensor

from sinkinterp._batches import check_bool, check_int, check_tokens
from sinkinterp._io import atomic_write_text
from sinkinterp.backends import Model, attention_windows
from sinkinterp.data import FirstToken, prompt_ids
from sinkinterp.errors import SinkInterpError
from sinkinterp.interventions import Intervention, intervene
from sinkinterp.interventions.base import ints_or_none
from sinkinterp.measure import alpha_at
from sinkinterp.sites import HeadsLike, head_label, is_head_site, selected_heads

__all__ = [
    "AttentionView",
    "attention_view",
    "compare_view",
    "MAX_VIEW_TOKENS",
    "MAX_VIEW_CELLS",
]

#: Longest input an attention view draws: the focused head is a T x T grid of chart cells.
MAX_VIEW_TOKENS = 256
#: Most cells (heads x T x T) one view draws. circuitsvis draws about 8,000 cells a second in
#: headless Chromium on this project's 2-core machine (256 tokens, one head: 7 s; 64 heads of 64
#: tokens: 19 s), so this keeps a page under about half a minute there instead of freezing a tab.
MAX_VIEW_CELLS = 250_000


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

    def __post_init__(self):
        # The id is written into HTML and into a script: only a plain identifier is allowed.
        if not isinstance(self.element_id, str) or not re.fullmatch(r"[A-Za-z][\w-]{0,63}", self.element_id, re.ASCII):
            raise SinkInterpError(f"element_id must be a letter then up to 63 letters, digits, '_' or '-', "
                                  f"got {self.element_id!r}")

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
        page = (
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(self.title or 'sinkinterp attention view')}</title></head>"
            f"<body>{self.html()}</body></html>\n"
        )
        return atomic_write_text(path, page)


def _view_tokens(model: Model, tokens, first_token: FirstToken = "default") -> Tensor:
    if isinstance(tokens, str):
        ids = torch.tensor([prompt_ids(model, tokens, first_token)], dtype=torch.long)
    elif isinstance(tokens, Tensor):
        ids = tokens[None] if tokens.ndim == 1 else tokens
    else:
        raise SinkInterpError(f"a view takes text or token ids, got {type(tokens).__name__}")
    check_tokens(model, ids)
    if ids.shape[0] != 1:
        raise SinkInterpError(f"a view shows one sequence, got {ids.shape[0]}: pass tokens[i]")
    return ids


def _token_strings(model: Model, ids: Tensor) -> tuple[str, ...]:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return tuple(str(int(i)) for i in ids[0])
    return tuple(tokenizer.decode([int(i)]) for i in ids[0])


def _patterns(model: Model, ids: Tensor, layers: list[int], interventions=()) -> dict[int, Tensor]:
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


def _selection(model: Model, layers, heads) -> list[tuple[int, list[int]]]:
    """(layer, heads) to show: per-layer head indices in each of ``layers``, or ``heads`` as a
    :class:`~sinkinterp.sites.Heads` value / mapping / pairs (then ``layers`` must be None)."""
    if is_head_site(heads):
        if layers is not None:
            raise SinkInterpError(f"heads {heads!r} already names its layers; leave layers=None")
        return selected_heads(model, None, heads)
    return selected_heads(model, ints_or_none("layers", layers), ints_or_none("heads", heads))


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


#: With the sink hidden, a head whose rows keep less than this share of their attention off the
#: sink (mean over queries i > sink) shows renormalised noise: the view warns and says so.
MIN_REST_MASS = 0.01


def _head_panel(pattern: Tensor, hide_sink: bool, sink: int, window: int | None = None
                ) -> tuple[Tensor, float, float | None]:
    """One head's [query, key] pattern, optionally with the sink column removed and the rest of
    each row renormalised; its sink score on this input, mean A[i, sink] over the queries that
    see the sink (i >= sink, and i - sink < window in a sliding-window layer); and, with the sink
    hidden, the mean attention that was left to renormalise (rows i > sink)."""
    alpha = float(alpha_at(pattern[None, None], sink, window)[0, 0])
    if not hide_sink:
        return pattern, alpha, None
    rest = pattern.clone()
    rest[:, sink] = 0
    total = rest.sum(dim=-1, keepdim=True)
    kept = float(total[sink + 1:].mean()) if pattern.shape[0] > sink + 1 else 1.0
    return torch.where(total > 0, rest / total.clamp(min=1e-12), rest), alpha, kept


def attention_view(
    model: Model,
    tokens,
    *,
    layers: Sequence[int] | int | None = None,
    heads: HeadsLike = None,
    hide_sink: bool = False,
    sink_position: int = 0,
    interventions: Sequence = (),
    max_tokens: int = MAX_VIEW_TOKENS,
    title: str = "",
    element_id: str | None = None,
    first_token: FirstToken = "default",
) -> AttentionView:
    """Attention patterns of the chosen layers and heads on one input (text, or token ids of one
    sequence), each head named with its sink score on this input (``L14H3 sink=0.82``). ``heads``
    may be a :class:`~sinkinterp.sites.Heads` value (``report.sink_heads(0.3)``) with ``layers`` None.

    Text starts with ``first_token`` (``"default"``: the model's BOS convention, as the corpus and
    the scans use: ``<bos>`` on Gemma-3, whose sink lives there, nothing on SmolLM2; ``"none"``
    shows the text alone). Token ids are shown as given.

    ``hide_sink`` removes the sink column and renormalises every row over the other keys, so what
    the head does besides resting on the sink becomes visible. ``interventions`` are applied
    during the forward (see :func:`compare_view` for clean and intervened side by side).
    """
    check_bool("hide_sink", hide_sink)
    check_int("max_tokens", max_tokens, 2)
    if not isinstance(title, str):
        raise SinkInterpError(f"title must be a string, got {title!r}")
    if isinstance(interventions, Intervention) or not isinstance(interventions, (list, tuple)):
        raise SinkInterpError(f"interventions must be a list of Intervention values, got {interventions!r}")
    ids = _view_tokens(model, tokens, first_token)
    sites = _selection(model, layers, heads)
    _check_size(ids.shape[1], sum(len(chosen) for _, chosen in sites), max_tokens)
    check_int("sink_position", sink_position)
    if not 0 <= sink_position < ids.shape[1]:
        raise SinkInterpError(f"sink_position {sink_position} is outside this input's {ids.shape[1]} tokens")
    kept = _patterns(model, ids, [layer for layer, _ in sites], interventions)
    windows = attention_windows(model)
    panels, names, noisy = [], [], []
    for layer, chosen in sites:
        for head in chosen:
            panel, alpha, rest = _head_panel(kept[layer][head], hide_sink, sink_position, windows[layer])
            if rest is not None and rest < MIN_REST_MASS:
                noisy.append(f"{head_label(layer, head)} ({rest:.2g})")
            panels.append(panel)
            hidden = "" if rest is None else (f" (sink hidden: rows rescaled from {rest:.1%} of their attention"
                                              f"{', noise' if rest < MIN_REST_MASS else ''})")
            names.append(f"{head_label(layer, head)} sink={alpha:.2f}{hidden}")
    if noisy:
        warnings.warn(
            f"hide_sink=True on heads that keep less than {MIN_REST_MASS:.0%} of their attention off the sink: "
            f"{', '.join(noisy[:8])}{' ...' if len(noisy) > 8 else ''}; their rows are rescaled noise, not a pattern",
            stacklevel=2)
    return _make_view(_token_strings(model, ids), torch.stack(panels), tuple(names), title, element_id)


def _make_view(tokens, patterns, names, title, element_id) -> AttentionView:
    """An :class:`AttentionView`; ``element_id`` (default: a fresh random one) names the page
    element it renders into: fix it to get byte-identical pages from identical inputs."""
    if element_id is None:
        return AttentionView(tokens, patterns, names, title)
    return AttentionView(tokens, patterns, names, title, element_id)


def compare_view(
    model: Model,
    tokens,
    interventions: Sequence,
    *,
    layers: Sequence[int] | int | None = None,
    heads: HeadsLike = None,
    hide_sink: bool = False,
    label: str = "intervened",
    max_tokens: int = MAX_VIEW_TOKENS,
    title: str = "",
    element_id: str | None = None,
    first_token: FirstToken = "default",
) -> AttentionView:
    """Each chosen head clean and under ``interventions``, side by side (clean first); text starts
    with ``first_token`` as in :func:`attention_view`."""
    if isinstance(interventions, Intervention) or not isinstance(interventions, (list, tuple)):
        raise SinkInterpError(f"interventions must be a list of Intervention values, got {interventions!r}")
    if not interventions:
        raise SinkInterpError("compare_view needs at least one intervention to compare against the clean run")
    if not isinstance(label, str):
        raise SinkInterpError(f"label must be a string, got {label!r}")
    clean = attention_view(model, tokens, layers=layers, heads=heads, hide_sink=hide_sink, max_tokens=max_tokens,
                           first_token=first_token)
    _check_size(len(clean.tokens), 2 * len(clean.head_names), max_tokens)
    edited = attention_view(model, tokens, layers=layers, heads=heads, hide_sink=hide_sink,
                            interventions=interventions, max_tokens=max_tokens, first_token=first_token)
    panels, names = [], []
    for i in range(len(clean.head_names)):
        panels += [clean.patterns[i], edited.patterns[i]]
        names += [f"{clean.head_names[i]} clean", f"{edited.head_names[i]} {label}"]
    return _make_view(clean.tokens, torch.stack(panels), tuple(names), title, element_id)
