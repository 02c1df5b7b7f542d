"""Query/key/value geometry: norms and angles of the sink's q, k, v against the other positions."""

from __future__ import annotations

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from sinkinterp._batches import (
    Batch,
    Reducer,
    stream,
)
from sinkinterp.backends import (
    Model,
    attention_windows,
    require,
    visible,
)
from sinkinterp.measure.common import (
    query_weights,
)
from sinkinterp.sites import Heads, HeadsLike, as_query_heads, is_head_site, kv_group

# --------------------------------------------------------------------------------------------
# Query/key/value geometry


def head_frame(n_layers: int, n_heads: int) -> pd.DataFrame:
    """One row per head, ``layer`` and ``head`` columns, in (layer, head) order: what per-head
    tensors ``[layers, heads]`` flatten to."""
    return pd.DataFrame({"layer": [l for l in range(n_layers) for _ in range(n_heads)],
                         "head": [h for _ in range(n_layers) for h in range(n_heads)]})






class PerHeadReducer(Reducer):
    """Sums of per-sequence statistics per (layer, head), read out as a DataFrame of means."""

    STATS: tuple[str, ...] = ()

    def __init__(self, model: Model):
        self.model, self.group = model, kv_group(model)
        shape = (model.cfg.n_layers, model.cfg.n_heads)
        self.sums = {name: torch.zeros(shape, dtype=torch.float64) for name in self.STATS}
        self.n_seqs = 0

    def begin(self, batch: Batch) -> None:
        super().begin(batch)
        self.n_seqs += batch.tokens.shape[0]

    def add(self, layer: int, stats: dict[str, Tensor]) -> None:
        """Add per-sequence values ``[batch head]`` of each statistic."""
        for name, value in stats.items():
            self.sums[name][layer] += value.sum(dim=0).cpu()

    def frame(self) -> pd.DataFrame:
        frame = head_frame(self.model.cfg.n_layers, self.model.cfg.n_heads)
        frame["kv_head"] = frame["head"] // self.group
        for name in self.STATS:
            frame[name] = (self.sums[name] / self.n_seqs).flatten().numpy()
        return frame


def measure_heads(reducer: PerHeadReducer, model: Model, tokens, description: str, heads: HeadsLike = None,
                  **kwargs) -> pd.DataFrame:
    """Stream ``reducer`` over ``tokens``; its per-(layer, head) frame, restricted to ``heads`` (a
    :class:`~sinkinterp.sites.Heads` spelling, head indices for every layer, or None for every head)."""
    pairs = None
    if heads is not None:
        chosen = Heads(heads) if is_head_site(heads) else Heads.at(model, None, heads)
        pairs = [(layer, head) for layer, hs in chosen.by_layer(model).items() for head in hs]
    stream(model, tokens, [reducer], description=description, **kwargs)
    frame = reducer.frame()
    if pairs is not None:
        keep = pd.Series(list(zip(frame["layer"], frame["head"]))).isin(pairs).to_numpy()
        frame = frame[keep].reset_index(drop=True)
    return frame


class _GeometryReducer(PerHeadReducer):
    STATS = ("q_norm", "k_sink_norm", "k_other_norm", "v_sink_norm", "v_other_norm",
             "cos_q_k_sink", "cos_q_k_other", "logit_sink", "logit_other")

    def __init__(self, model: Model):
        super().__init__(model)
        # The logits compare rotated queries and keys: read those, and refuse a model that lists the
        # rotary hooks without firing them rather than mix unrotated angles with rotated logits.
        rotary = "blocks.0.attn.hook_rot_q" in model.hook_dict
        require(model, "scores", *(["rotary_hooks"] if rotary else []), needed_by="qkv_geometry")
        self.q_hook, self.k_hook = ("hook_rot_q", "hook_rot_k") if rotary else ("hook_q", "hook_k")
        self.windows = attention_windows(model)
        self.stash: dict[str, Tensor] = {}

    def hooks(self):
        hooks = []
        for layer in range(self.model.cfg.n_layers):
            for key, name in (("q", self.q_hook), ("k", self.k_hook), ("v", "hook_v")):
                hooks.append((f"blocks.{layer}.attn.{name}", self._keep(key)))
            hooks.append((f"blocks.{layer}.attn.hook_attn_scores", self._hook(layer)))
        return hooks

    def _keep(self, key: str):
        def keep(x: Float[Tensor, "batch pos head d_head"], hook) -> None:
            self.stash[key] = self.batch.align(x, dims=(1,))

        return keep

    def _hook(self, layer: int):
        # hook_attn_scores fires after q, k (rotated) and v of the same layer: all are stashed.
        def reduce(scores: Float[Tensor, "batch head query key"], hook) -> None:
            q = self.stash.pop("q").double()
            k, v = (as_query_heads(self.stash.pop(name).double(), q.shape[2]) for name in ("k", "v"))
            scores = self.batch.align(scores, dims=(2, 3)).double()
            n_pos = q.shape[1]
            window = self.windows[layer]
            weights = query_weights(self.batch, q.device)  # mean over positions 1..len-1
            seeing = query_weights(self.batch, q.device, window)  # ... that can see the sink
            q_norm, k_norm, v_norm = (x.norm(dim=-1) for x in (q, k, v))  # [batch pos head]
            stats = {
                "q_norm": torch.einsum("bph,bp->bh", q_norm, weights),
                "k_sink_norm": k_norm[:, 0],
                "k_other_norm": torch.einsum("bph,bp->bh", k_norm, weights),
                "v_sink_norm": v_norm[:, 0],
                "v_other_norm": torch.einsum("bph,bp->bh", v_norm, weights),
            }
            cos = torch.einsum(
                "bihd,bjhd->bhij", q / q_norm.clamp(min=1e-12)[..., None], k / k_norm.clamp(min=1e-12)[..., None]
            )
            stats["cos_q_k_sink"] = torch.einsum("bhi,bi->bh", cos[..., 0], seeing)
            # Masked (unseen) entries hold -inf: zero them before weighting (their weight is 0).
            stats["logit_sink"] = torch.einsum("bhi,bi->bh", scores[..., 0].masked_fill(seeing[:, None] == 0, 0), seeing)
            # Pairs 1 <= j <= i < length that the query can see: every non-sink key it attends over.
            positions = torch.arange(n_pos, device=q.device)
            valid = self.batch.valid().to(q.device)
            pairs = visible(n_pos, window, q.device) & (positions[None, :] >= 1)
            pairs = pairs[None] & valid[:, :, None] & valid[:, None, :]  # [batch i j]
            n_pairs = pairs.sum(dim=(1, 2)).double()[:, None]
            pairs = pairs[:, None]
            stats["cos_q_k_other"] = torch.where(pairs, cos, 0).sum(dim=(-1, -2)) / n_pairs
            stats["logit_other"] = torch.where(pairs, scores, 0).sum(dim=(-1, -2)) / n_pairs
            self.add(layer, stats)

        return reduce


def qkv_geometry(
    model: Model,
    tokens: Int[Tensor, "*batch pos"],
    *,
    attention_mask: Tensor | None = None,
    batch_size: int = 8,
    progress: bool | None = None,
    heads: HeadsLike = None,
) -> pd.DataFrame:
    """Per (layer, head): is the sink chosen by the norm of its key or by its angle to the queries?

    Columns: ``kv_head`` (query head h reads kv head h // group); mean norms of q_i (i >= 1), of
    the sink's k and v (relative position 0) and of the other positions' k and v; mean
    ``cos(q_i, k_sink)`` over queries i >= 1 and ``cos(q_i, k_j)`` over pairs 1 <= j <= i; the
    attention logits (``hook_attn_scores``, scale included) on the same sets. Rotary models use
    the rotated q and k, which is what the logit sees (rotation keeps norms). ``heads`` (a
    :class:`~sinkinterp.sites.Heads` value such as ``report.sink_heads(0.3)``) keeps those rows only.
    """
    return measure_heads(_GeometryReducer(model), model, tokens, "q/k/v geometry", heads=heads,
                         attention_mask=attention_mask, batch_size=batch_size, progress=progress)


