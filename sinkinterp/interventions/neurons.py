"""Ablate MLP neurons at chosen positions (:class:`AblateNeurons`): the causal test of which
neurons write a massive activation."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from jaxtyping import Int
from torch import Tensor

from sinkinterp._batches import check_int, check_seed, check_tokens
from sinkinterp.backends import Model
from sinkinterp.errors import SinkInterpError
from sinkinterp.interventions.base import (
    FitOption,
    Hook,
    Intervention,
    IntsLike,
    RandomControl,
    NumbersLike,
    as_tensor,
    check_mode,
    check_position,
    check_seq,
    frozen_tensor,
    ints_or_none,
    is_int,
    one_of,
    pick,
    refuse_empty,
)
from sinkinterp.interventions.capture import capture
from sinkinterp.measure import formation_trace
from sinkinterp.sites import resolve_layers, select_indices


def _d_mlp(model: Model) -> int:
    d_mlp = getattr(model.cfg, "d_mlp", None)
    if not d_mlp:
        raise SinkInterpError(f"{type(model).__name__} has no MLP neurons (cfg.d_mlp is {d_mlp!r})")
    return int(d_mlp)


@dataclass(frozen=True, repr=False)
class AblateNeurons(RandomControl, Intervention):
    """Set MLP ``neurons`` of one ``layer`` (its hidden activation, ``mlp.hook_post``) at
    ``positions`` to zero (``"zero"``) or to their mean (``"mean"``, ``values`` [neurons], from
    :meth:`fit`).

    The mean is taken over the *other* positions of reference text: at the sink the neuron's
    activation is the same in every input (the first token is), so a mean over sinks would change
    nothing. Only the chosen positions are edited, so every other token computes as before; what
    changes downstream is the sink's residual stream and everything that reads it.
    :meth:`random_control` ablates as many other neurons of the same layer, drawn from those
    about as active at these positions as the chosen ones.
    """

    NEEDS: ClassVar[tuple[str, ...]] = ("mlp.hook_post",)
    CONTROL_POOL: ClassVar[int] = 4
    ARRAY_AXES: ClassVar[dict[str, tuple[str, ...]]] = {"values": ("neuron",)}
    FIT_OPTIONS: ClassVar[dict[str, FitOption]] = {
        "mode": FitOption("'mean' (each neuron's mean over the other positions of the calibration split)",
                          one_of("mean", "zero")),
        **RandomControl.CONTROL_OPTIONS,
        "writers": FitOption("int: ablate the top n writers of the sink's largest massive channel, found by "
                             "formation_trace on the calibration split (layer and neurons then come from it)",
                             is_int(1)),
        "channel": FitOption("int: the channel whose writers to take (default: the largest massive one)", is_int(0)),
    }

    layer: int = 0
    neurons: IntsLike = ()
    positions: IntsLike = (0,)
    mode: str = "zero"
    values: NumbersLike = None

    MODES: ClassVar[tuple[str, ...]] = ("zero", "mean")

    def __post_init__(self):
        check_int("AblateNeurons layer", self.layer)
        object.__setattr__(self, "neurons", ints_or_none("neurons", self.neurons))
        object.__setattr__(self, "positions", ints_or_none("positions", self.positions))
        for name in ("neurons", "positions"):
            refuse_empty(self, name, getattr(self, name))
        for position in self.positions:
            check_int("AblateNeurons position", position)
        check_mode("AblateNeurons", self.mode, self.MODES)
        object.__setattr__(self, "values", frozen_tensor(self, "values"))
        if (self.mode == "mean") != (self.values is not None):
            raise SinkInterpError("AblateNeurons mode 'mean' needs stored values (build it with "
                                  "AblateNeurons.fit(model, tokens, ...)), and mode 'zero' takes none")

    @classmethod
    def fit(cls, model: Model, tokens: Int[Tensor, "batch pos"], *, layer: int, neurons, positions=(0,),
            mode: str = "mean") -> AblateNeurons:
        """For ``"mean"``: each neuron's activation averaged over ``tokens`` at every position
        that is not edited."""
        ablation = cls(layer=layer, neurons=neurons, positions=positions, mode="zero")
        ablation.check_sites(model)
        if mode == "zero":
            return ablation
        check_mode("AblateNeurons", mode, cls.MODES)
        check_tokens(model, tokens)
        others = [p for p in range(tokens.shape[1]) if p not in ablation.positions]
        if not others:
            raise SinkInterpError("AblateNeurons.fit needs reference tokens longer than the edited positions")
        index = list(ablation.neurons)
        mean = capture(model, tokens, "mlp.hook_post", [ablation.layer], None,
                       lambda x: x[:, others][..., index].flatten(0, 1).mean(dim=0))[0]
        return dataclasses.replace(ablation, mode="mean", values=mean)

    @classmethod
    def fit_spec(cls, model: Model, calibration: Tensor, *, seed: int = 0, draw: int = 0, n_draws: int = 1,
                 fields: dict[str, Any], options: dict[str, Any]) -> AblateNeurons:
        """:meth:`fit` on the calibration split; ``control: random`` turns it into its matched
        random-neuron control, drawn with seed + draw."""
        sites = pick(fields, "layer", "neurons", "positions")
        if options.get("writers") is not None:
            sites.update(writer_sites(model, calibration, options["writers"], channel=options.get("channel"),
                                      position=sites.get("positions", (0,))))
        ablation = cls.fit(model, calibration, mode=options.get("mode", "mean"), **sites)
        return ablation.controlled(model, calibration, seed=seed + draw, options=options)


    @classmethod
    def fit_needs_calibration(cls, options: dict[str, Any]) -> bool:
        return (options.get("mode", "mean") == "mean" or options.get("control") is not None
                or options.get("writers") is not None)

    @classmethod
    def check_spec(cls, fields: dict[str, Any], options: dict[str, Any] | None, context) -> None:
        super().check_spec(fields, options, context)
        by_writers = (options or {}).get("writers") is not None
        named = [name for name in ("layer", "neurons") if name in fields]
        if by_writers and named:
            context.fail(context.where, f"fit.writers finds the layer and neurons: leave out {', '.join(named)}")
        elif not by_writers and "neurons" not in fields:
            context.fail(context.where, "name the neurons (and layer), or fit: {writers: n} to find them")
        if "channel" in (options or {}) and not by_writers:
            context.fail(f"{context.where}.fit.channel", "only goes with fit.writers")

    @classmethod
    def check_record(cls, model: Model, record: dict[str, Any]) -> None:
        if (record.get("fit") or {}).get("writers") is None:
            cls(**{k: record[k] for k in ("layer", "neurons", "positions") if k in record}).check_sites(model)
        cls.check_model(model, {**record, **(record.get("fit") or {})}, where=record["type"])

    def check_sites(self, model: Model) -> None:
        resolve_layers(model, (self.layer,))
        select_indices("neuron", self.neurons, _d_mlp(model), f"MLP neurons in layer {self.layer}")
        for position in self.positions:
            check_position(model, position)

    def restrict(self, model: Model, layer: int, head: int | None = None) -> Intervention | None:
        raise SinkInterpError("AblateNeurons names its own layer and neurons and cannot be swept")

    def random_control(self, model: Model, tokens: Int[Tensor, "batch pos"], *, seed: int = 0,
                       pool: int = 4) -> AblateNeurons:
        """The same ablation of ``len(neurons)`` other neurons of this layer, drawn (seeded) from
        the ``pool`` x n most active of the rest at these positions (mean |activation| over
        ``tokens``): the control removes comparable activity, but not the chosen direction."""
        self.check_sites(model)
        check_int("pool", pool, 1)
        check_tokens(model, tokens)
        positions = list(self.positions)
        check_seq(max(positions), tokens.shape[1], "reference")
        activity = capture(model, tokens, "mlp.hook_post", [self.layer], None,
                           lambda x: x[:, positions].abs().flatten(0, 1).mean(dim=0))[0]
        chosen = set(self.neurons)
        ranked = [n for n in activity.argsort(descending=True).tolist() if n not in chosen]
        n = len(self.neurons)
        if len(ranked) < n:
            raise SinkInterpError(f"layer {self.layer} has {len(ranked)} other neurons, fewer than the {n} to match")
        drawn = tuple(sorted(random.Random(check_seed(seed)).sample(ranked[: max(pool * n, n)], n)))
        control = dataclasses.replace(self, neurons=drawn, mode="zero", values=None)
        return control if self.mode == "zero" else AblateNeurons.fit(
            model, tokens, layer=self.layer, neurons=drawn, positions=self.positions, mode="mean")

    def hooks(self, model: Model) -> list[Hook]:
        self.check_sites(model)
        self.check_model(model, vars(self))
        self.check_arrays(model, neuron=len(self.neurons))
        values = None if self.values is None else as_tensor(self.values)
        positions, neurons = list(self.positions), list(self.neurons)

        def ablate(post, hook):
            check_seq(max(positions), post.shape[1], "AblateNeurons")
            post = post.clone()
            where = (slice(None), torch.tensor(positions, device=post.device)[:, None],
                     torch.tensor(neurons, device=post.device)[None, :])
            post[where] = 0 if values is None else values.to(post)[None, None]
            return post

        return [(f"blocks.{self.layer}.mlp.hook_post", ablate)]


def writer_sites(model: Model, tokens: Int[Tensor, "batch pos"], n: int, *, channel: int | None = None,
                 position=(0,)) -> dict[str, Any]:
    """``layer`` and ``neurons`` of the ``n`` MLP neurons that write most of ``channel`` (default:
    the largest stable massive channel) at the sink, in the block that steps it up
    (:func:`~sinkinterp.measure.formation_trace` on ``tokens``)."""
    positions = ints_or_none("positions", position)
    if positions is None or len(positions) != 1:
        raise SinkInterpError(f"writers are found at one position, got positions {positions}")
    check_int("writers", n, 1)
    trace = formation_trace(model, tokens, channels=channel, position=positions[0], progress=False)
    chosen = trace.channels[0] if channel is None else channel
    layer = trace.step_layer(chosen)
    top = trace.top_neurons(chosen, layer=layer, n=n)
    return {"layer": layer, "neurons": tuple(int(x) for x in top.neuron), "positions": positions}
