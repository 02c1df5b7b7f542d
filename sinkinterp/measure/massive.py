"""Massive activations (Sun et al.): the detector, its stable channels, and the per-layer residual
profile of the first token."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from sinkinterp._batches import (
    Batch,
    Reducer,
    check_int,
    check_tokens,
    stream,
)
from sinkinterp.backends import Model
from sinkinterp.errors import SinkInterpError
from sinkinterp.measure.common import (
    MASSIVE_COLUMNS,
    check_positive,
    token_text,
)

# --------------------------------------------------------------------------------------------
# Massive activations


def massive_entries(
    hidden: Float[Tensor, "pos d_model"], *, min_abs: float | int = 100.0, min_ratio: float | int = 1000.0
) -> tuple[Int[Tensor, "n 2"], Float[Tensor, " n"], float]:
    """Sun et al.'s rule on one sequence's hidden state: ``|x| > min_abs`` and
    ``|x| >= min_ratio * median(|x|)``, the median over all positions and channels.

    Returns the (position, channel) index of each entry, its value, and the median.
    """
    magnitude = hidden.abs()
    median = float(magnitude.flatten().median())
    found = (magnitude > min_abs) & (magnitude >= min_ratio * median)
    where = found.nonzero()
    return where, hidden[found], median


class MassiveReducer(Reducer):
    def __init__(self, model: Model, min_abs: float, min_ratio: float):
        self.model, self.min_abs, self.min_ratio = model, min_abs, min_ratio
        self.rows: list[tuple] = []
        self.n_seqs = 0

    def begin(self, batch: Batch) -> None:
        super().begin(batch)
        self.n_seqs += batch.tokens.shape[0]
        self.tokens = batch.relative_tokens()

    def hooks(self):
        return [(f"blocks.{layer}.hook_resid_post", self._hook(layer)) for layer in range(self.model.cfg.n_layers)]

    def _hook(self, layer: int):
        def detect(resid: Float[Tensor, "batch pos d_model"], hook) -> None:
            batch = self.batch
            resid = batch.align(resid, dims=(1,))
            for row in range(resid.shape[0]):
                length = int(batch.lengths[row])
                where, values, median = massive_entries(
                    resid[row, :length].float(), min_abs=self.min_abs, min_ratio=self.min_ratio
                )
                for (position, channel), value in zip(where.tolist(), values.tolist()):
                    token_id = int(self.tokens[row, position])
                    self.rows.append(
                        (layer, batch.first_index + row, position, channel, value,
                         abs(value) / median if median > 0 else float("inf"),
                         token_text(self.model, token_id))
                    )

        return detect

    def frame(self) -> pd.DataFrame:
        # Sorted, so the frame does not depend on the mini-batch size.
        frame = pd.DataFrame(self.rows, columns=MASSIVE_COLUMNS)
        frame = frame.sort_values(["seq", "layer", "position", "channel"], ignore_index=True)
        frame.attrs.update(n_seqs=self.n_seqs, min_abs=self.min_abs, min_ratio=self.min_ratio)
        return frame


def find_massive_activations(
    model: Model,
    tokens: Int[Tensor, "*batch pos"],
    *,
    min_abs: float | int = 100.0,
    min_ratio: float | int = 1000.0,
    attention_mask: Tensor | None = None,
    batch_size: int = 8,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Massive activations in the residual stream after each block (``hook_resid_post``).

    One row per entry: layer, seq, position (relative to the first real token), channel, value,
    ratio_to_median (|value| over the median |x| of that layer's hidden state for that sequence),
    token. ``frame.attrs`` records n_seqs, min_abs and min_ratio;
    :func:`stable_massive_channels` summarises the frame.
    """
    reducer = massive_reducer(model, min_abs, min_ratio)
    stream(model, tokens, [reducer], attention_mask=attention_mask, batch_size=batch_size,
           progress=progress, description="massive activations")
    return reducer.frame()


def massive_reducer(model: Model, min_abs, min_ratio) -> MassiveReducer:
    return MassiveReducer(model, check_positive("min_abs", min_abs), check_positive("min_ratio", min_ratio))


def stable_massive_channels(activations: pd.DataFrame, *, min_fraction: float = 0.0) -> pd.DataFrame:
    """Summary per (channel, position role): where massive activations recur across inputs.

    role is ``"first token"`` (relative position 0) or ``"other"``. Columns: first and last layer
    where the pair occurs in any sequence and how many layers; ``core_first_layer`` /
    ``core_last_layer``, the same over the layers where it occurs in at least half of the
    sequences (None if no layer does), so that one odd sequence does not stretch the range; the
    fraction of sequences with the pair in some layer; the largest |value|, the median value, and
    the most frequent token. Rows with ``fraction_of_seqs`` below ``min_fraction`` are dropped;
    sorted by fraction, then by magnitude.
    """
    columns = ["channel", "role", "first_layer", "last_layer", "n_layers", "core_first_layer",
               "core_last_layer", "fraction_of_seqs", "max_abs", "median_value", "top_token"]
    if not isinstance(activations, pd.DataFrame):
        raise SinkInterpError(f"stable_massive_channels takes the frame from find_massive_activations, "
                              f"got {type(activations).__name__}")
    if isinstance(min_fraction, bool) or not isinstance(min_fraction, (int, float)) or not 0 <= min_fraction <= 1:
        raise SinkInterpError(f"min_fraction {min_fraction!r} must be a number in [0, 1]")
    missing = [c for c in MASSIVE_COLUMNS if c not in activations.columns]
    if missing:
        raise SinkInterpError(f"activations lacks columns {missing}: pass the frame from find_massive_activations")
    if "n_seqs" not in activations.attrs:
        raise SinkInterpError(
            "activations has no attrs['n_seqs']: pass the frame returned by find_massive_activations"
        )
    n_seqs = activations.attrs["n_seqs"]
    if isinstance(n_seqs, bool) or not isinstance(n_seqs, int) or n_seqs < 1:
        raise SinkInterpError(f"activations.attrs['n_seqs'] must be a positive integer, got {n_seqs!r}")
    if activations.empty:
        return pd.DataFrame(columns=columns)
    frame = activations.assign(role=activations["position"].eq(0).map({True: "first token", False: "other"}))
    rows = []
    for (channel, role), group in frame.groupby(["channel", "role"], sort=False):
        per_layer = group.groupby("layer").seq.nunique() / n_seqs
        core = per_layer[per_layer >= 0.5].index
        rows.append(
            (int(channel), role, int(group.layer.min()), int(group.layer.max()), group.layer.nunique(),
             int(core.min()) if len(core) else None, int(core.max()) if len(core) else None,
             group.seq.nunique() / n_seqs, float(group.value.abs().max()), float(group.value.median()),
             Counter(group.token).most_common(1)[0][0])
        )
    summary = pd.DataFrame(rows, columns=columns)
    summary = summary[summary.fraction_of_seqs >= min_fraction]
    return summary.sort_values(["fraction_of_seqs", "max_abs"], ascending=False, ignore_index=True)


@dataclass(frozen=True)
class ResidualProfile:
    """Magnitudes of the residual stream after each block, as Sun et al. plot them.

    ``top[l, j]`` is the (j+1)-th largest |x| over all positions and channels of layer l's
    hidden state and ``median[l]`` its median |x|, each averaged over sequences; ``sink[l, c]`` is
    |x| of channel c at the first real token (relative position 0) and ``other[l, c]`` the mean
    |x| of channel c over the other positions, both averaged over sequences.
    """

    top: Float[Tensor, "layer k"]
    median: Float[Tensor, " layer"]
    sink: Float[Tensor, "layer d_model"]
    other: Float[Tensor, "layer d_model"]
    n_seqs: int

    @property
    def peak_layer(self) -> int:
        """The layer whose largest |x| is largest."""
        return int(self.top[:, 0].argmax())

    def sink_channels(self, layer: int | None = None, n: int = 5) -> pd.DataFrame:
        """The ``n`` channels with the largest |x| at the first token in ``layer`` (default: the
        peak layer), with their mean |x| at the other positions and the ratio of the two."""
        layer = self.peak_layer if layer is None else check_int("layer", layer)
        check_int("n", n, 1)
        if not 0 <= layer < self.sink.shape[0]:
            raise SinkInterpError(f"layer {layer} out of range: the profile covers 0..{self.sink.shape[0] - 1}")
        values, channels = self.sink[layer].topk(min(n, self.sink.shape[1]))
        other = self.other[layer, channels]
        return pd.DataFrame({"channel": channels.numpy(), "sink_abs": values.numpy(), "other_abs": other.numpy(),
                             "ratio": (values / other.clamp(min=1e-12)).numpy()})

    def to_dict(self) -> dict[str, Any]:
        return {"n_seqs": self.n_seqs, "top_abs": self.top.tolist(), "median_abs": self.median.tolist(),
                "peak_layer": self.peak_layer,
                "sink_channels": self.sink_channels().to_dict(orient="records")}


class ProfileReducer(Reducer):
    def __init__(self, model: Model, k: int):
        self.model, self.k = model, k
        n_layers, d_model = model.cfg.n_layers, model.cfg.d_model
        self.top = torch.zeros(n_layers, k, dtype=torch.float64)
        self.median = torch.zeros(n_layers, dtype=torch.float64)
        self.sink = torch.zeros(n_layers, d_model, dtype=torch.float64)
        self.other = torch.zeros(n_layers, d_model, dtype=torch.float64)
        self.n_seqs = 0

    def begin(self, batch: Batch) -> None:
        super().begin(batch)
        self.n_seqs += batch.tokens.shape[0]

    def hooks(self):
        return [(f"blocks.{layer}.hook_resid_post", self._hook(layer)) for layer in range(self.model.cfg.n_layers)]

    def _hook(self, layer: int):
        def reduce(resid: Float[Tensor, "batch pos d_model"], hook) -> None:
            resid = self.batch.align(resid, dims=(1,))
            for row in range(resid.shape[0]):
                # The top-k and the median select entries, so they are exact in the stream's own
                # dtype; only the means accumulate in float64 (no float64 copy of [T, d_model]).
                magnitude = resid[row, : int(self.batch.lengths[row])].detach().abs()
                flat = magnitude.flatten()
                self.top[layer] += flat.topk(min(self.k, flat.numel())).values.double().cpu()
                self.median[layer] += float(flat.median())
                self.sink[layer] += magnitude[0].double().cpu()
                if magnitude.shape[0] > 1:
                    self.other[layer] += (magnitude[1:].sum(dim=0, dtype=torch.float64) / (magnitude.shape[0] - 1)).cpu()

        return reduce

    def profile(self) -> ResidualProfile:
        n = max(self.n_seqs, 1)
        return ResidualProfile(self.top / n, self.median / n, self.sink / n, self.other / n, self.n_seqs)


def residual_profile(
    model: Model,
    tokens: Int[Tensor, "*batch pos"],
    *,
    k: int = 3,
    attention_mask: Tensor | None = None,
    batch_size: int = 8,
    progress: bool | None = None,
) -> ResidualProfile:
    """The ``k`` largest and the median |x| of each block's output, and the channel profile at the
    first token against the other positions (Sun et al., Figs. 1-2): see :class:`ResidualProfile`."""
    check_int("k", k, 1)
    check_tokens(model, tokens)
    if k > tokens.shape[1] * model.cfg.d_model:
        raise SinkInterpError(f"k = {k} exceeds the {tokens.shape[1]} x {model.cfg.d_model} values of one block's "
                              "output per sequence")
    reducer = ProfileReducer(model, k)
    stream(model, tokens, [reducer], attention_mask=attention_mask, batch_size=batch_size,
           progress=progress, description="residual profile")
    return reducer.profile()


