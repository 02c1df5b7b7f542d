"""Value-weighted attention: the sink's attention share against its share of ``||A v W_O||``."""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from sinkinterp.backends import Model, attention_windows
from sinkinterp.errors import SinkInterpError
from sinkinterp.measure.common import (
    query_blocks,
    query_weights,
    register_measurement,
)
from sinkinterp.measure.geometry import (
    PerHeadReducer,
    measure_heads,
)
from sinkinterp.sites import HeadsLike, as_query_heads

# --------------------------------------------------------------------------------------------
# Value-weighted attention


class _ValueWeightedReducer(PerHeadReducer):
    STATS = ("attn_sink_share", "norm_sink_share", "value_out_norm_sink", "value_out_norm_other")

    def __init__(self, model: Model):
        super().__init__(model)
        # Per-layer W_O [head d_head d_model], read once (TransformerBridge exposes it per block too).
        self.W_O = [model.blocks[layer].attn.W_O.detach() for layer in range(model.cfg.n_layers)]
        self.windows = attention_windows(model)
        self.value_norm: Tensor | None = None

    def hooks(self):
        hooks = []
        for layer in range(self.model.cfg.n_layers):
            hooks.append((f"blocks.{layer}.attn.hook_v", self._values(layer)))
            hooks.append((f"blocks.{layer}.attn.hook_pattern", self._hook(layer)))
        return hooks

    def _values(self, layer: int):
        def keep(v: Float[Tensor, "batch pos kv_head d_head"], hook) -> None:
            v = as_query_heads(self.batch.align(v, dims=(1,)), self.model.cfg.n_heads)
            out = torch.einsum("bphd,hdm->bphm", v, self.W_O[layer].to(v.dtype))
            self.value_norm = out.norm(dim=-1).double().transpose(1, 2)  # [batch head pos]

        return keep

    def _hook(self, layer: int):
        def reduce(pattern: Float[Tensor, "batch head query key"], hook) -> None:
            f, self.value_norm = self.value_norm, None
            a = self.batch.align(pattern, dims=(2, 3))
            weights = query_weights(self.batch, a.device)
            seeing = query_weights(self.batch, a.device, self.windows[layer])  # queries that see the sink
            # ||A[i,j] v_j W_O|| = A[i,j] ||v_j W_O|| since A[i,j] >= 0; in float64, a block of
            # queries at a time (a float64 copy of a whole long-context pattern would double its size).
            total = torch.cat([torch.einsum("bhij,bhj->bhi", a[:, :, rows].double(), f) for rows in query_blocks(a)],
                              dim=-1)
            first = a[..., 0].double()
            sink = first * f[..., :1]
            stats = {
                "attn_sink_share": torch.einsum("bhi,bi->bh", first, seeing),
                "norm_sink_share": torch.einsum("bhi,bi->bh", sink / total.clamp(min=1e-30), seeing),
                "value_out_norm_sink": f[..., 0],
                "value_out_norm_other": torch.einsum("bhj,bj->bh", f, weights),
            }
            self.add(layer, stats)

        return reduce

    def frame(self) -> pd.DataFrame:
        frame = super().frame()
        frame["no_op_gap"] = frame["attn_sink_share"] - frame["norm_sink_share"]
        return frame


def value_weighted_attention(
    model: Model,
    tokens: Int[Tensor, "*batch pos"],
    *,
    attention_mask: Tensor | None = None,
    batch_size: int = 8,
    progress: bool | None = None,
    heads: HeadsLike = None,
) -> pd.DataFrame:
    """Per (layer, head): attention share of the sink vs its share of the value-weighted norm.

    For queries i >= 1 (Kobayashi et al. 2020): ``attn_sink_share`` = mean A[i, 0];
    ``norm_sink_share`` = mean of ``||A[i,0] v_0 W_O|| / sum_j ||A[i,j] v_j W_O||`` (per head,
    without the output bias, which does not depend on attention). ``no_op_gap`` is their
    difference: a head that attends to the sink but writes little from it has a large gap.
    Also the mean ``||v W_O||`` of the sink and of the other positions. ``heads`` (a
    :class:`~sinkinterp.sites.Heads` value) keeps those rows only.
    """
    return measure_heads(_ValueWeightedReducer(model), model, tokens, "value-weighted attention", heads=heads,
                         attention_mask=attention_mask, batch_size=batch_size, progress=progress)




def value_weighted_measurement(model: Model, tokens: Int[Tensor, "batch pos"], *, alpha_first: Tensor,
                               eps: float) -> dict[str, Any]:
    """The experiment measurement ``value_weighted``: per sequence, the attention share and the
    value-weighted norm share of the sink, averaged over the sink heads (clean alpha at the first
    token > ``eps``, from ``alpha_first`` [seq, layer, head]); plus the per-head means."""
    alpha = alpha_first.mean(dim=0)  # [layer head]
    sink_heads = [(int(l), int(h)) for l, h in zip(*torch.nonzero(alpha > eps, as_tuple=True))]
    if not sink_heads:
        raise SinkInterpError(f"no head has a clean sink score above eps = {eps}: nothing to measure")
    per_sequence: dict[str, list[float]] = {"attn_sink_share": [], "norm_sink_share": [], "no_op_gap": []}
    frames = []
    for row in range(tokens.shape[0]):
        frame = value_weighted_attention(model, tokens[row:row + 1], progress=False)
        frames.append(frame)
        chosen = frame.set_index(["layer", "head"]).loc[sink_heads]
        for key in per_sequence:
            per_sequence[key].append(float(chosen[key].mean()))
    heads = pd.concat(frames).groupby(["layer", "head"], as_index=False)[
        ["attn_sink_share", "norm_sink_share", "no_op_gap"]].mean()
    return {"sink_heads": [list(h) for h in sink_heads], "per_sequence": per_sequence,
            "per_head": heads.to_dict(orient="records")}


register_measurement("value_weighted", value_weighted_measurement,
                     description="value-weighted sink shares, one sequence at a time")
