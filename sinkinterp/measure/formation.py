"""Where the sink comes from: the formation trace of a massive channel (which block steps it up,
which component and which neurons write it) and the chain that turns it into a sink
(massive activation -> normalised input -> small key and value -> attention on the sink)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from sinkinterp._batches import Batch, Reducer, check_int, check_tokens, stream
from sinkinterp.backends import Model
from sinkinterp.errors import SinkInterpError
from sinkinterp.measure.massive import find_massive_activations, stable_massive_channels
from sinkinterp.sites import select_indices
from sinkinterp.stats import bootstrap_mean

# --------------------------------------------------------------------------------------------
# Which channels to trace


def traced_channels(model: Model, tokens: Int[Tensor, "batch pos"], channels=None, *, position: int = 0,
                    min_fraction: float | int = 0.5, attention_mask=None, batch_size: int = 8) -> tuple[int, ...]:
    """``channels`` checked against the model, or (None) the detector's stable massive channels
    at relative ``position``: those massive there in at least ``min_fraction`` of the sequences."""
    if channels is not None:
        if isinstance(channels, int) and not isinstance(channels, bool):
            channels = (channels,)
        chosen = select_indices("channel", channels, model.cfg.d_model, "residual channels")
        if not chosen:
            raise SinkInterpError("channels is empty: name at least one residual channel, or None to detect them")
        return tuple(chosen)
    found = find_massive_activations(model, tokens, attention_mask=attention_mask, batch_size=batch_size,
                                     progress=False)
    found = found[found.position == position]
    found.attrs["n_seqs"] = tokens.shape[0]
    stable = stable_massive_channels(found, min_fraction=min_fraction)
    if stable.empty:
        raise SinkInterpError(
            f"no massive activation (|x| > 100 and >= 1000 x the median) at position {position} in at least "
            f"{min_fraction:.0%} of the {tokens.shape[0]} sequences: pass channels=[...] to trace chosen channels")
    return tuple(int(c) for c in stable.sort_values("max_abs", ascending=False).channel.unique())


def _position(tokens: Tensor, position) -> int:
    position = check_int("position", position)
    if position >= tokens.shape[1]:
        raise SinkInterpError(f"position {position} out of range for sequences of {tokens.shape[1]} tokens")
    return position


def _scale(observed: Tensor, raw: Tensor) -> Tensor:
    """Per-token factor from a component's raw sum to what a post-norm makes of it (Gemma's
    post-attention and post-feed-forward norms): the norm's weight over the token's RMS, so that
    the parts add up to the component's output exactly (the factor can be large: a norm with a large
    weight at the channel rescales a small raw sum). Where the raw sum is exactly 0: factor 1."""
    return torch.where(raw == 0, torch.ones_like(raw), observed / torch.where(raw == 0, 1, raw))


# --------------------------------------------------------------------------------------------
# The formation trace


@dataclass(frozen=True)
class FormationTrace:
    """The residual stream of the sink token along each traced channel, split into what built it.

    Per sequence (axis 0): ``embed[s, c]`` is the input to block 0; ``attn[s, l, c]`` and
    ``mlp[s, l, c]`` what block l's attention and MLP add (after any post-norm);
    ``resid[s, l, c]`` block l's output. They telescope exactly:
    ``resid[:, l] = embed + sum_{m <= l} (attn[:, m] + mlp[:, m])``.

    Averaged over sequences: ``neurons[l, n, c]``, what MLP neuron n of block l writes
    (activation x W_out row, times the post-norm's per-token factor, so that neurons plus
    ``mlp_bias`` add up to ``mlp``); ``heads[l, h, c]`` and ``attn_bias[l, c]`` the same for the
    attention heads (z x W_O).
    """

    channels: tuple[int, ...]
    position: int
    embed: Float[Tensor, "seq channel"]
    attn: Float[Tensor, "seq layer channel"]
    mlp: Float[Tensor, "seq layer channel"]
    resid: Float[Tensor, "seq layer channel"]
    neurons: Float[Tensor, "layer neuron channel"]
    mlp_bias: Float[Tensor, "layer channel"]
    heads: Float[Tensor, "layer head channel"]
    attn_bias: Float[Tensor, "layer channel"]

    @property
    def n_seqs(self) -> int:
        return self.embed.shape[0]

    @property
    def resid_pre(self) -> Float[Tensor, "seq layer channel"]:
        """Each block's input along the channels."""
        return torch.cat([self.embed[:, None], self.resid[:, :-1]], dim=1)

    def _channel(self, channel: int | None) -> int:
        if channel is None:
            return 0
        if channel not in self.channels:
            raise SinkInterpError(f"channel {channel!r} was not traced: traced channels are {list(self.channels)}")
        return self.channels.index(channel)

    def frame(self) -> pd.DataFrame:
        """One row per (layer, channel): the block's input, what attention and the MLP add, and
        its output, means over sequences."""
        rows = []
        pre = self.resid_pre.mean(dim=0)
        attn, mlp, post = self.attn.mean(dim=0), self.mlp.mean(dim=0), self.resid.mean(dim=0)
        for layer in range(self.resid.shape[1]):
            for index, channel in enumerate(self.channels):
                rows.append((layer, channel, float(pre[layer, index]), float(attn[layer, index]),
                             float(mlp[layer, index]), float(post[layer, index])))
        return pd.DataFrame(rows, columns=["layer", "channel", "resid_pre", "attn", "mlp", "resid_post"])

    @property
    def growth(self) -> Float[Tensor, "seq layer channel"]:
        """How much each block grows |x| of each channel."""
        return self.resid.abs() - self.resid_pre.abs()

    def step_layer(self, channel: int | None = None) -> int:
        """The block with the largest mean growth of |x| of ``channel`` (default: the first traced)."""
        return int(self.growth[:, :, self._channel(channel)].mean(dim=0).argmax())

    def step_up(self, *, n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
        """Per channel: the block with the largest mean growth of |x| (the step-up), the growth with
        a bootstrap 95% interval over sequences, |x| before and after, and its writer: the
        component (``"mlp"`` or ``"attention"``) that adds most along the sign of the output, with
        ``writer_share`` = its part of what the block adds along that sign."""
        growth = self.growth
        rows = []
        for index, channel in enumerate(self.channels):
            layer = self.step_layer(channel)
            sign = 1.0 if float(self.resid[:, layer, index].mean()) >= 0 else -1.0
            attn = sign * float(self.attn[:, layer, index].mean())
            mlp = sign * float(self.mlp[:, layer, index].mean())
            writer, part = ("mlp", mlp) if mlp >= attn else ("attention", attn)
            estimate = bootstrap_mean(growth[:, layer, index], n_resamples=n_resamples, seed=seed)
            rows.append(dict(channel=channel, step_layer=layer, growth=estimate.value, growth_low=estimate.low,
                             growth_high=estimate.high,
                             before=float(self.resid_pre[:, layer, index].abs().mean()),
                             after=float(self.resid[:, layer, index].abs().mean()),
                             writer=writer, writer_share=part / (attn + mlp) if attn + mlp else float("nan"),
                             attn=attn, mlp=mlp))
        return pd.DataFrame(rows)

    def top_neurons(self, channel: int | None = None, layer: int | None = None, n: int = 10) -> pd.DataFrame:
        """The ``n`` MLP neurons of ``layer`` (default: the channel's step-up layer) that write most
        along the sign of the block's output: their mean contribution, its share of what the whole
        MLP adds there, and the cumulative share."""
        return self._top(self.neurons, self.mlp, "neuron", channel, layer, n)

    def top_heads(self, channel: int | None = None, layer: int | None = None, n: int = 5) -> pd.DataFrame:
        """The same as :meth:`top_neurons` for the attention heads of ``layer``."""
        return self._top(self.heads, self.attn, "head", channel, layer, n)

    def _top(self, parts: Tensor, whole: Tensor, unit: str, channel, layer, n) -> pd.DataFrame:
        index = self._channel(channel)
        check_int("n", n, 1)
        if layer is None:
            layer = self.step_layer(self.channels[index])
        layer = check_int("layer", layer)
        if layer >= parts.shape[0]:
            raise SinkInterpError(f"layer {layer} out of range: the trace covers 0..{parts.shape[0] - 1}")
        sign = 1.0 if float(self.resid[:, layer, index].mean()) >= 0 else -1.0
        values = parts[layer, :, index] * sign
        total = float(whole[:, layer, index].mean()) * sign
        order = values.argsort(descending=True)[:n]
        contribution = values[order]
        share = contribution / total if total else torch.full_like(contribution, float("nan"))
        return pd.DataFrame({unit: order.numpy(), "contribution": (contribution * sign).numpy(),
                             "share": share.numpy(), "cumulative_share": share.cumsum(0).numpy()})

    def to_dict(self) -> dict[str, Any]:
        step = self.step_up()
        return {"channels": list(self.channels), "position": self.position, "n_seqs": self.n_seqs,
                "per_layer": self.frame().to_dict(orient="records"),
                "step_up": step.to_dict(orient="records"),
                "top_neurons": {str(c): self.top_neurons(c).to_dict(orient="records") for c in self.channels},
                "top_heads": {str(c): self.top_heads(c).to_dict(orient="records") for c in self.channels}}

    def summary(self) -> str:
        lines = [f"formation trace of position {self.position} over {self.n_seqs} sequences"]
        for row in self.step_up().itertuples():
            neurons = self.top_neurons(row.channel, n=5)
            lines.append(
                f"  channel {row.channel}: steps up in block {row.step_layer} "
                f"(|x| {row.before:.4g} -> {row.after:.4g}), written by the {row.writer} "
                f"({row.writer_share:.0%} of what the block adds); top neurons "
                + ", ".join(f"{int(r.neuron)} ({r.share:.0%})" for r in neurons.itertuples())
                + f" = {neurons.cumulative_share.iloc[-1]:.0%} of the MLP's part")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


class _TraceReducer(Reducer):
    def __init__(self, model: Model, channels: tuple[int, ...], position: int):
        self.model, self.channels, self.position = model, list(channels), position
        cfg = model.cfg
        self.w_out = [model.blocks[l].mlp.W_out.detach()[:, self.channels].double() for l in range(cfg.n_layers)]
        self.b_out = [_bias(model.blocks[l].mlp, "b_out", self.channels) for l in range(cfg.n_layers)]
        self.w_o = [model.blocks[l].attn.W_O.detach()[..., self.channels].double() for l in range(cfg.n_layers)]
        self.b_o = [_bias(model.blocks[l].attn, "b_O", self.channels) for l in range(cfg.n_layers)]
        # Gemma normalises each component's output (ln1_post, ln2_post): there the parts are scaled by
        # the norm's per-token factor; elsewhere they are used as they are.
        self.post_norm = {what: [f"blocks.{l}.{norm}.hook_scale" in model.hook_dict for l in range(cfg.n_layers)]
                          for what, norm in (("attn", "ln1_post"), ("mlp", "ln2_post"))}
        n, c = cfg.n_layers, len(channels)
        self.neurons = torch.zeros(n, self.w_out[0].shape[0], c, dtype=torch.float64)
        self.mlp_bias = torch.zeros(n, c, dtype=torch.float64)
        self.heads = torch.zeros(n, cfg.n_heads, c, dtype=torch.float64)
        self.attn_bias = torch.zeros(n, c, dtype=torch.float64)
        self.rows: dict[str, list[Tensor]] = {"embed": [], "attn": [], "mlp": [], "resid": []}
        self.pending: dict[str, list[Tensor]] = {}

    def begin(self, batch: Batch) -> None:
        super().begin(batch)
        if batch.padded:
            self._check_lengths(batch)
        self.kept: dict[tuple[str, int], Tensor] = {}

    def _check_lengths(self, batch: Batch) -> None:
        if int(batch.lengths.min()) <= self.position:
            raise SinkInterpError(f"a sequence has {int(batch.lengths.min())} real tokens, too few for position "
                                  f"{self.position}")

    def _at(self, x: Tensor) -> Tensor:
        return self.batch.align(x, dims=(1,))[:, self.position].detach().double().cpu()

    def hooks(self):
        hooks = [("blocks.0.hook_resid_pre", self._keep("embed", 0))]
        for layer in range(self.model.cfg.n_layers):
            hooks += [(f"blocks.{layer}.attn.hook_z", self._keep("z", layer)),
                      (f"blocks.{layer}.hook_attn_out", self._keep("attn", layer)),
                      (f"blocks.{layer}.mlp.hook_post", self._keep("post", layer)),
                      (f"blocks.{layer}.hook_mlp_out", self._keep("mlp", layer)),
                      (f"blocks.{layer}.hook_resid_post", self._keep("resid", layer))]
        return hooks

    def _keep(self, what: str, layer: int):
        def keep(x, hook):
            at = self._at(x)
            if what in ("embed", "attn", "mlp", "resid"):
                at = at[:, self.channels]
            self.kept[what, layer] = at
            if what == "attn":
                self._split(layer, self.kept["z", layer], at, self.w_o, self.b_o, self.heads, self.attn_bias,
                            "bhd,hdc->bhc", self.post_norm["attn"][layer])
            elif what == "mlp":
                self._split(layer, self.kept["post", layer], at, self.w_out, self.b_out, self.neurons,
                            self.mlp_bias, "bn,nc->bnc", self.post_norm["mlp"][layer])
            elif what == "resid" and layer == self.model.cfg.n_layers - 1:
                self._finish()

        return keep

    def _split(self, layer, inputs, observed, weights, biases, sums, bias_sums, equation, post_norm):
        raw = torch.einsum(equation, inputs, weights[layer])  # [batch unit channel]
        bias = biases[layer]
        factor = _scale(observed, raw.sum(dim=1) + bias) if post_norm else torch.ones_like(observed)
        sums[layer] += (raw * factor[:, None]).sum(dim=0)
        bias_sums[layer] += (bias * factor).sum(dim=0)

    def _finish(self) -> None:
        n_layers = self.model.cfg.n_layers
        self.rows["embed"].append(self.kept["embed", 0])
        for what in ("attn", "mlp", "resid"):
            self.rows[what].append(torch.stack([self.kept[what, l] for l in range(n_layers)], dim=1))

    def trace(self) -> FormationTrace:
        n = sum(t.shape[0] for t in self.rows["embed"])
        return FormationTrace(tuple(self.channels), self.position, torch.cat(self.rows["embed"]),
                              torch.cat(self.rows["attn"]), torch.cat(self.rows["mlp"]),
                              torch.cat(self.rows["resid"]), self.neurons / n, self.mlp_bias / n,
                              self.heads / n, self.attn_bias / n)


def _bias(module, name: str, channels: list[int]) -> Tensor:
    bias = getattr(module, name, None)
    if bias is None:
        return torch.zeros(len(channels), dtype=torch.float64)
    return bias.detach()[channels].double().cpu()


def formation_trace(
    model: Model,
    tokens: Int[Tensor, "*batch pos"],
    *,
    channels=None,
    position: int = 0,
    min_fraction: float | int = 0.5,
    attention_mask: Tensor | None = None,
    batch_size: int = 8,
    progress: bool | None = None,
) -> FormationTrace:
    """Decompose the residual stream at relative ``position`` (the first real token by default; a
    detected secondary sink's position for that one) along each massive channel into embedding,
    attention and MLP contributions per block, with the contribution of every MLP neuron and
    attention head (see :class:`FormationTrace`). ``channels=None`` traces the detector's stable
    channels at that position (:func:`traced_channels`)."""
    check_tokens(model, tokens)
    position = _position(tokens, position)
    channels = traced_channels(model, tokens, channels, position=position, min_fraction=min_fraction,
                               attention_mask=attention_mask, batch_size=batch_size)
    reducer = _TraceReducer(model, channels, position)
    stream(model, tokens, [reducer], attention_mask=attention_mask, batch_size=batch_size, progress=progress,
           description="formation trace")
    return reducer.trace()


# --------------------------------------------------------------------------------------------
# The chain from massive activation to sink


CHAIN_LINKS = ("massive", "channel_share", "key_ratio", "value_ratio", "first_share")


@dataclass(frozen=True)
class SinkChain:
    """Per sequence and block, the links from a massive activation to the sink at ``position``:

    - ``massive``: the largest |x| over ``channels`` in the block's input at the sink;
    - ``channel_share``: those channels' share of the sink's squared norm there, i.e. of its RMS
      denominator (near 1: the normalised input is almost a fixed one-hot direction);
    - ``key_ratio`` / ``value_ratio``: the sink's key (value) norm over the mean norm at the other
      positions, averaged over key/value heads (< 1: small key and value);
    - ``first_share``: attention on the sink position, the mean over heads and the later queries.
    """

    channels: tuple[int, ...]
    position: int
    links: dict[str, Float[Tensor, "seq layer"]]

    @property
    def n_seqs(self) -> int:
        return self.links["massive"].shape[0]

    def frame(self) -> pd.DataFrame:
        """One row per block: the mean of each link over sequences."""
        means = {name: values.mean(dim=0).numpy() for name, values in self.links.items()}
        return pd.DataFrame({"layer": range(self.links["massive"].shape[1]), **means})

    def to_dict(self) -> dict[str, Any]:
        return {"channels": list(self.channels), "position": self.position, "n_seqs": self.n_seqs,
                "per_layer": self.frame().to_dict(orient="records")}


class _ChainReducer(Reducer):
    def __init__(self, model: Model, channels: tuple[int, ...], position: int):
        self.model, self.channels, self.position = model, list(channels), position
        self.rows: dict[str, list[Tensor]] = {name: [] for name in CHAIN_LINKS}

    def begin(self, batch: Batch) -> None:
        super().begin(batch)
        if int(batch.lengths.min()) <= self.position + 1:
            raise SinkInterpError(f"a sequence has {int(batch.lengths.min())} real tokens: the chain at position "
                                  f"{self.position} needs at least {self.position + 2}")
        self.kept: dict[tuple[str, int], Tensor] = {}

    def hooks(self):
        hooks = []
        for layer in range(self.model.cfg.n_layers):
            hooks += [(f"blocks.{layer}.hook_resid_pre", self._resid(layer)),
                      (f"blocks.{layer}.attn.hook_k", self._norm_ratio("key_ratio", layer)),
                      (f"blocks.{layer}.attn.hook_v", self._norm_ratio("value_ratio", layer)),
                      (f"blocks.{layer}.attn.hook_pattern", self._share(layer))]
        return hooks

    def _resid(self, layer: int):
        def keep(x, hook):
            at = self.batch.align(x, dims=(1,))[:, self.position].detach().double()
            ours = at[:, self.channels]
            self.kept["massive", layer] = ours.abs().max(dim=1).values.cpu()
            self.kept["channel_share", layer] = (ours.pow(2).sum(dim=1) / at.pow(2).sum(dim=1).clamp(min=1e-30)).cpu()

        return keep

    def _norm_ratio(self, name: str, layer: int):
        def keep(x, hook):  # [batch pos kv_head d_head]
            norms = self.batch.align(x.detach().double().norm(dim=-1), dims=(1,))  # [batch pos kv_head]
            others = self.batch.valid().to(norms.device).clone()
            others[:, self.position] = False
            mean_other = (norms * others[..., None]).sum(dim=1) / others.sum(dim=1)[:, None]
            self.kept[name, layer] = (norms[:, self.position] / mean_other.clamp(min=1e-30)).mean(dim=1).cpu()

        return keep

    def _share(self, layer: int):
        def keep(pattern, hook):  # [batch head query key]
            pattern = self.batch.align(pattern.detach(), dims=(2, 3)).double()
            queries = self.batch.valid().to(pattern.device).clone()
            queries[:, : self.position + 1] = False
            weights = queries.double() / queries.sum(dim=1, keepdim=True)
            share = (pattern[..., self.position].mean(dim=1) * weights).sum(dim=1)
            self.kept["first_share", layer] = share.cpu()
            if layer == self.model.cfg.n_layers - 1:
                for name in CHAIN_LINKS:
                    self.rows[name].append(torch.stack([self.kept[name, l] for l in range(layer + 1)], dim=1))

        return keep

    def chain(self) -> SinkChain:
        return SinkChain(tuple(self.channels), self.position,
                         {name: torch.cat(rows) for name, rows in self.rows.items()})


def sink_chain(
    model: Model,
    tokens: Int[Tensor, "*batch pos"],
    *,
    channels,
    position: int = 0,
    attention_mask: Tensor | None = None,
    batch_size: int = 8,
    progress: bool | None = None,
) -> SinkChain:
    """The links massive activation -> normalised input -> small key/value -> sink, per block
    and sequence (see :class:`SinkChain`). Run it inside :func:`~sinkinterp.intervene` to see
    which links an intervention breaks."""
    check_tokens(model, tokens)
    position = _position(tokens, position)
    channels = traced_channels(model, tokens, channels, position=position)
    reducer = _ChainReducer(model, channels, position)
    stream(model, tokens, [reducer], attention_mask=attention_mask, batch_size=batch_size, progress=progress,
           description="sink chain")
    return reducer.chain()
