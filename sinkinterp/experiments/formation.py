"""The causal half of the formation trace and of the residual-sink detector: ablate the neurons that
write the sink's massive channel, only at the sink, or edit a residual-sink dimension on the other
tokens, and follow the effect down the chain (massive value, the sink's key and value norms,
attention on the sink) and to the loss, each against a matched random control."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from sinkinterp._batches import check_int
from sinkinterp.backends import Model
from sinkinterp.errors import SinkInterpError
from sinkinterp.evaluate import evaluate
from sinkinterp.interventions import AblateNeurons, EditResidualDimension, Intervention, intervene
from sinkinterp.measure import (
    CHAIN_LINKS,
    FormationTrace,
    ResidualSinks,
    SinkChain,
    formation_trace,
    residual_sinks,
    sink_chain,
)
from sinkinterp.stats import Estimate, bootstrap_mean, check_bootstrap_options, paired_difference

__all__ = ["ChainEffects", "FormationTest", "formation_test", "ResidualSinkTest", "residual_sink_test"]


@dataclass(frozen=True)
class ChainEffects:
    """What each condition does to the sink chain and the loss on the same tokens.

    ``chains[name]`` is the :class:`~sinkinterp.measure.SinkChain` under condition ``name``
    (``"clean"``: nothing applied), ``loss[name]`` the per-sequence loss; links are summarised
    over the blocks from ``first_block`` on (those the edit can reach).
    """

    interventions: dict[str, Any]
    """condition -> an intervention, or a tuple of them applied together"""
    chains: dict[str, SinkChain]
    loss: dict[str, Tensor]
    first_block: int
    n_resamples: int
    seed: int

    def downstream(self, name: str, link: str) -> Tensor:
        """Per sequence, ``link`` averaged over the blocks from ``first_block`` on (or the loss)."""
        if name not in self.chains:
            raise SinkInterpError(f"no condition {name!r}: the conditions are {', '.join(self.chains)}")
        if link == "loss":
            return self.loss[name]
        if link not in CHAIN_LINKS:
            raise SinkInterpError(f"link {link!r} is not one of {', '.join(CHAIN_LINKS)}, 'loss'")
        return self.chains[name].links[link][:, self.first_block:].mean(dim=1)

    def effect(self, name: str, link: str) -> Estimate:
        """Paired difference of ``link`` (or ``"loss"``) from the clean run under ``name``."""
        return paired_difference(self.downstream(name, link), self.downstream("clean", link),
                                 n_resamples=self.n_resamples, seed=self.seed)

    def frame(self) -> pd.DataFrame:
        """One row per condition: each link (from ``first_block`` on) and the loss, their means and
        paired differences from the clean run with bootstrap 95% intervals."""
        rows = []
        for name in self.chains:
            row: dict[str, Any] = {"condition": name}
            for link in (*CHAIN_LINKS, "loss"):
                row[link] = bootstrap_mean(self.downstream(name, link), n_resamples=self.n_resamples,
                                           seed=self.seed).value
                if name != "clean":
                    delta = self.effect(name, link)
                    row[f"{link}_delta"], row[f"{link}_low"], row[f"{link}_high"] = delta.value, delta.low, delta.high
            rows.append(row)
        return pd.DataFrame(rows)

    def per_layer(self, link: str) -> pd.DataFrame:
        """``link`` per block (rows) and condition (columns), means over sequences."""
        if link not in CHAIN_LINKS:
            raise SinkInterpError(f"link {link!r} is not one of {', '.join(CHAIN_LINKS)}")
        return pd.DataFrame({name: chain.links[link].mean(dim=0).numpy() for name, chain in self.chains.items()})

    def control_of(self, name: str) -> str | None:
        return {"writers zero": "control zero", "writers mean": "control mean",
                "clip": "control clip", "mean": "control mean"}.get(name)

    def carriers(self, name: str) -> list[str]:
        """The links (and ``"loss"``) whose change under ``name`` has an interval that excludes 0
        and lies outside its control's interval."""
        control = self.control_of(name)
        moved = []
        for link in (*CHAIN_LINKS, "loss"):
            effect = self.effect(name, link)
            if effect.low <= 0 <= effect.high:
                continue
            if control in self.chains:
                other = self.effect(control, link)
                if other.low <= effect.value <= other.high:
                    continue
            moved.append(link)
        return moved

    def _lines(self) -> list[str]:
        frame = self.frame().set_index("condition")
        lines = []
        for name, row in frame.iterrows():
            text = (f"  {name:<14} massive {row.massive:9.4g}  key ratio {row.key_ratio:.3f}  value ratio "
                    f"{row.value_ratio:.3f}  first-token share {row.first_share:.3f}  loss {row.loss:.4f}")
            if name != "clean":
                text += f" ({row.loss_delta:+.4f} [{row.loss_low:+.4f}, {row.loss_high:+.4f}])"
            lines.append(text)
        for name in self.chains:
            if self.control_of(name) in self.chains:
                lines.append(f"  {name}: moved beyond its control: {', '.join(self.carriers(name)) or 'nothing'}")
        return lines

    def effects_dict(self) -> dict[str, Any]:
        return {"interventions": {name: [iv.to_dict() for iv in (ivs if isinstance(ivs, tuple) else (ivs,))]
                                  for name, ivs in self.interventions.items()},
                "first_block": self.first_block,
                "conditions": self.frame().to_dict(orient="records"),
                "per_layer": {link: self.per_layer(link).to_dict(orient="list") for link in CHAIN_LINKS},
                "carriers": {name: self.carriers(name) for name in self.chains if self.control_of(name) in self.chains}}

    def __repr__(self) -> str:
        return self.summary()


@dataclass(frozen=True, repr=False)
class FormationTest(ChainEffects):
    """:class:`ChainEffects` of ablating the writers of ``channel`` at the sink: conditions
    ``writers zero`` / ``writers mean`` and their ``control`` twins (as many random neurons of the
    same block, as active at the sink), summarised over the blocks after the step-up block."""

    trace: FormationTrace | None = None
    channel: int = 0
    writers: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """{block: neurons}: the ablated writers, one entry per ablated block."""

    @property
    def layer(self) -> int:
        """The step-up block (the first ablated one)."""
        return min(self.writers)

    @property
    def neurons(self) -> tuple[int, ...]:
        """The writers ablated in the step-up block."""
        return self.writers[self.layer]

    def to_dict(self) -> dict[str, Any]:
        return {"channel": self.channel, "writers": {str(k): list(v) for k, v in self.writers.items()},
                **self.effects_dict(), "trace": self.trace.to_dict()}

    def summary(self) -> str:
        blocks = "; ".join(f"block {layer}: neurons {list(neurons)}" for layer, neurons in self.writers.items())
        return "\n".join([f"writers of channel {self.channel} ({blocks}); means over blocks {self.first_block}..:"]
                         + self._lines())


@dataclass(frozen=True, repr=False)
class ResidualSinkTest(ChainEffects):
    """:class:`ChainEffects` of editing a residual-sink ``channel`` on the tokens from
    ``from_position`` on: ``clip`` (to ``multiple`` x the token's RMS, norm kept), ``mean``, and
    their matched random-dimension controls, over every block."""

    sinks: ResidualSinks | None = None
    channel: int = 0
    multiple: float = 3.0
    from_position: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {"channel": self.channel, "multiple": self.multiple, "from_position": self.from_position,
                **self.effects_dict(), "sinks": self.sinks.to_dict()}

    def summary(self) -> str:
        return "\n".join([f"residual sink channel {self.channel} edited from position {self.from_position} on "
                          f"(clip to {self.multiple:g} x RMS, norm kept); means over every block:"] + self._lines())


def _run_conditions(model: Model, tokens: Tensor, interventions: dict[str, Any], channels, *,
                    position: int, batch_size: int, progress) -> tuple[dict[str, SinkChain], dict[str, Tensor]]:
    """Each condition's chain and loss; a condition is an intervention or a tuple of them."""
    chains, loss = {}, {}
    for name, intervention in {"clean": (), **interventions}.items():
        applied = intervention if isinstance(intervention, tuple) else (intervention,)
        with intervene(model, *applied):
            chains[name] = sink_chain(model, tokens, channels=channels, position=position, batch_size=batch_size,
                                      progress=progress)
        values = evaluate(model, tokens, *applied, batch_size=batch_size, progress=progress).values["loss"]
        loss[name] = torch.as_tensor(values, dtype=torch.float64)
    return chains, loss


def formation_test(
    model: Model,
    tokens: Int[Tensor, "batch pos"],
    *,
    calibration: Int[Tensor, "calibration_batch calibration_pos"],
    channel: int | None = None,
    n_neurons: int | None = None,
    share: float | int = 0.9,
    max_neurons: int = 20,
    n_blocks: int = 1,
    position: int = 0,
    seed: int = 0,
    pool: int = 4,
    n_resamples: int = 2000,
    batch_size: int = 8,
    progress: bool | None = None,
) -> FormationTest:
    """Trace ``channel`` (default: the largest stable massive channel at ``position``) on
    ``calibration``, take the fewest MLP neurons of its step-up block that write ``share`` of the
    MLP's part (or ``n_neurons`` of them; at most ``max_neurons``), and ablate them at the sink only
    on ``tokens`` (held out): zeroed, set to their mean at the other positions, and the same for a
    matched random-neuron control (seeded). Each condition's chain and loss are measured on the
    same tokens (see :class:`FormationTest`). ``n_blocks > 1`` ablates the writers of each of the
    ``n_blocks`` blocks that grow the channel most (a channel built up over several blocks, as
    Gemma's 163, survives the loss of one writer); links are then summarised after the last."""
    check_bootstrap_options(n_resamples, 0.95)
    check_int("max_neurons", max_neurons, 1)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise SinkInterpError(f"share {share!r} must be a number in (0, 1]")
    trace = formation_trace(model, calibration, channels=channel, position=position, batch_size=batch_size,
                            progress=progress)
    channel = trace.channels[0] if channel is None else channel
    n_blocks = check_int("n_blocks", n_blocks, 1)
    growth = trace.growth[:, :, trace.channels.index(channel)].mean(dim=0)
    blocks = sorted(int(b) for b in growth.argsort(descending=True)[:n_blocks])
    if blocks[-1] == model.cfg.n_layers - 1:
        raise SinkInterpError(f"channel {channel} grows most in the last block ({blocks[-1]}): no block reads it "
                              "afterwards")
    layer = trace.step_layer(channel)
    if n_blocks == 1 and trace.step_up().set_index("channel").loc[channel, "writer"] != "mlp":
        raise SinkInterpError(f"channel {channel} steps up in block {layer} through attention, not the MLP: "
                              "see trace.top_heads(); formation_test ablates MLP neurons")
    writers: dict[int, tuple[int, ...]] = {}
    for block in blocks:
        top = trace.top_neurons(channel, layer=block, n=max_neurons)
        count = n_neurons
        if count is None:
            reached = (top.cumulative_share >= share).to_numpy().nonzero()[0]
            count = int(reached[0]) + 1 if len(reached) else max_neurons
        count = check_int("n_neurons", count, 1)
        writers[block] = tuple(int(n) for n in top.neuron[:count])
    interventions: dict[str, tuple[Intervention, ...]] = {}
    for mode in ("zero", "mean"):
        ablations = tuple(AblateNeurons.fit(model, calibration, layer=block, neurons=neurons, positions=(position,),
                                            mode=mode) for block, neurons in writers.items())
        interventions[f"writers {mode}"] = ablations
        interventions[f"control {mode}"] = tuple(a.random_control(model, calibration, seed=seed + i, pool=pool)
                                                 for i, a in enumerate(ablations))
    chains, loss = _run_conditions(model, tokens, interventions, trace.channels, position=position,
                                   batch_size=batch_size, progress=progress)
    return FormationTest(interventions, chains, loss, blocks[-1] + 1, n_resamples, seed, trace=trace, channel=channel,
                         writers=writers)


def residual_sink_test(
    model: Model,
    tokens: Int[Tensor, "batch pos"],
    *,
    calibration: Int[Tensor, "calibration_batch calibration_pos"],
    channel: int | None = None,
    multiple: float | int = 3.0,
    from_position: int = 1,
    min_share: float | int = 0.1,
    seed: int = 0,
    pool: int = 10,
    n_resamples: int = 2000,
    batch_size: int = 8,
    progress: bool | None = None,
) -> ResidualSinkTest:
    """Find the residual sinks on ``calibration`` and edit ``channel`` (default: the most frequent
    one) in every block's input on ``tokens`` (held out), at positions >= ``from_position`` (1:
    the first token keeps its massive activation, so the sink itself is not edited directly):
    clipped to ``multiple`` x the token's RMS with the norm kept, set to its mean, and each with a
    matched random-dimension control (see :class:`EditResidualDimension`). The chain is read at
    the first token (``channels`` = the edited channel)."""
    check_bootstrap_options(n_resamples, 0.95)
    sinks = residual_sinks(model, calibration, min_share=min_share, batch_size=batch_size, progress=progress)
    if channel is None:
        if sinks.table.empty:
            raise SinkInterpError(f"no residual sink on the calibration tokens (min_share {min_share}): pass channel")
        channel = sinks.channels[0]
    clip = EditResidualDimension(channels=(channel,), mode="clip", multiple=multiple, from_position=from_position)
    mean = EditResidualDimension.fit(model, calibration, channels=(channel,), mode="mean", multiple=multiple,
                                     from_position=from_position)
    interventions: dict[str, Intervention] = {
        "clip": clip, "control clip": clip.random_control(model, calibration, seed=seed, pool=pool),
        "mean": mean, "control mean": mean.random_control(model, calibration, seed=seed, pool=pool)}
    chains, loss = _run_conditions(model, tokens, interventions, (channel,), position=0, batch_size=batch_size,
                                   progress=progress)
    return ResidualSinkTest(interventions, chains, loss, 0, n_resamples, seed, sinks=sinks, channel=channel,
                            multiple=multiple, from_position=from_position)
