"""Edit residual-sink dimensions on every token (:class:`EditResidualDimension`): clip them to a
multiple of the token's RMS, set them to their mean, or scale them."""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from jaxtyping import Int
from torch import Tensor

from sinkinterp._batches import check_bool, check_int, check_seed, check_tokens
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
    frozen_tensor,
    ints_or_none,
    is_number,
    norm_common,
    one_of,
    pick,
    refuse_empty,
)
from sinkinterp.interventions.capture import capture
from sinkinterp.measure import residual_sinks
from sinkinterp.sites import resolve_layers, select_indices


def _check_number(name: str, value, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise SinkInterpError(f"{name} must be a finite number >= {low:g}, got {value!r}")
    return float(value)


@dataclass(frozen=True, repr=False)
class EditResidualDimension(RandomControl, Intervention):
    """Edit residual ``channels`` in the input of the chosen blocks (``hook_resid_pre``; default:
    every block) at every position from ``from_position`` on:

    - ``"clip"``: |x_c| is cut to ``multiple`` x the token's RMS (computed before the edit);
    - ``"mean"``: x_c is set to its mean over reference tokens (``values`` [layers][channels]);
    - ``"scale"``: x_c is multiplied by ``factor``.

    ``keep_norm=True`` then rescales each edited token so its L2 norm is what it was: an RMS norm
    reading it sees the same denominator's scale, and the blocks after it add to a stream of the
    same size; only the direction changes. (A norm is blind to the overall scale, so for the
    normalised input itself ``keep_norm`` changes nothing.)
    ``from_position=1`` leaves the first token alone, so its massive activation and the sink stay.
    """

    NEEDS: ClassVar[tuple[str, ...]] = ("hook_resid_pre",)
    ARRAY_AXES: ClassVar[dict[str, tuple[str, ...]]] = {"values": ("layer", "channel")}
    FIT_OPTIONS: ClassVar[dict[str, FitOption]] = {
        "sinks": FitOption("true: take the channels from residual_sinks on the calibration split",
                           one_of(True, False)),
        **RandomControl.CONTROL_OPTIONS,
        "min_share": FitOption("float in (0, 1]", is_number(0, 1)),
    }

    channels: IntsLike = ()
    layers: IntsLike = None
    mode: str = "clip"
    multiple: float = 3.0
    factor: float | None = None
    values: NumbersLike = None
    keep_norm: bool = True
    from_position: int = 0

    MODES: ClassVar[tuple[str, ...]] = ("clip", "mean", "scale")

    def __post_init__(self):
        object.__setattr__(self, "channels", ints_or_none("channels", self.channels))
        refuse_empty(self, "channels", self.channels)
        norm_common(self, heads=False)
        check_mode("EditResidualDimension", self.mode, self.MODES)
        object.__setattr__(self, "multiple", _check_number("multiple", self.multiple))
        check_bool("EditResidualDimension keep_norm", self.keep_norm)
        check_int("from_position", self.from_position)
        object.__setattr__(self, "values", frozen_tensor(self, "values"))
        if (self.mode == "scale") != (self.factor is not None):
            raise SinkInterpError("EditResidualDimension takes factor with mode 'scale' and only then")
        if self.factor is not None:
            object.__setattr__(self, "factor", _check_number("factor", self.factor))
        if (self.mode == "mean") != (self.values is not None):
            raise SinkInterpError("EditResidualDimension mode 'mean' needs stored values (build it with "
                                  "EditResidualDimension.fit(model, tokens, mode='mean')), and other modes take none")

    @classmethod
    def fit(cls, model: Model, tokens: Int[Tensor, "batch pos"], *, channels=None, layers=None, mode: str = "clip",
            multiple: float | int = 3.0, factor: float | None = None, keep_norm: bool = True, from_position: int = 0,
            min_share: float | int = 0.1) -> EditResidualDimension:
        """Resolve ``channels=None`` to the residual sinks of ``tokens`` (the most frequent channel
        of :func:`~sinkinterp.measure.residual_sinks`) and, for ``"mean"``, store each channel's
        mean over the edited positions of ``tokens`` in each chosen block's input."""
        check_tokens(model, tokens)
        if channels is None:
            found = residual_sinks(model, tokens, min_share=min_share, progress=False)
            if found.table.empty:
                raise SinkInterpError(f"no residual sink in the reference tokens (min_share {min_share}): "
                                      "pass channels explicitly")
            channels = found.channels[:1]
        edit = cls(channels=channels, layers=layers, mode="clip", multiple=multiple, keep_norm=keep_norm,
                   from_position=from_position)
        edit.check_sites(model)
        if mode == "mean":
            return dataclasses.replace(edit, mode="mean", values=_means(model, tokens, edit))
        return dataclasses.replace(edit, mode=mode, factor=factor)

    @classmethod
    def fit_spec(cls, model: Model, calibration: Tensor, *, seed: int = 0, draw: int = 0, n_draws: int = 1,
                 fields: dict[str, Any], options: dict[str, Any]) -> EditResidualDimension:
        """:meth:`fit` on the calibration split (``sinks: true`` finds the channels);
        ``control: random`` turns it into its matched random-dimension control."""
        sites = pick(fields, "channels", "layers", "mode", "multiple", "factor", "keep_norm", "from_position")
        if options.get("sinks"):
            sites["channels"] = None
        edit = cls.fit(model, calibration, min_share=options.get("min_share", 0.1), **sites)
        return edit.controlled(model, calibration, seed=seed + draw, options=options)


    @classmethod
    def check_spec(cls, fields: dict[str, Any], options: dict[str, Any] | None, context) -> None:
        super().check_spec(fields, options, context)
        if (options or {}).get("sinks") and "channels" in fields:
            context.fail(context.where, "fit.sinks finds the channels: leave out channels")
        elif not (options or {}).get("sinks") and "channels" not in fields:
            context.fail(context.where, "name the channels, or fit: {sinks: true} to find them")

    @classmethod
    def check_record(cls, model: Model, record: dict[str, Any]) -> None:
        super().check_record(model, record)
        if record.get("channels") is not None:
            select_indices("channel", list(record["channels"]), model.cfg.d_model, "residual channels")

    def check_sites(self, model: Model) -> list[int]:
        select_indices("channel", list(self.channels), model.cfg.d_model, "residual channels")
        return resolve_layers(model, self.layers)

    def random_control(self, model: Model, tokens: Int[Tensor, "batch pos"], *, seed: int = 0,
                       pool: int = 10) -> EditResidualDimension:
        """The same edit on as many random channels that are no residual sink, drawn (seeded) from
        the ``pool`` x n others with the largest typical (median) |x| at the edited positions.
        A clip would not
        touch an ordinary channel, so a clip's control *scales* its channels by the factor the
        clip applied to the sink channels on ``tokens`` (the median over edited tokens): it
        removes the same fraction of each chosen channel."""
        layers = self.check_sites(model)
        check_int("pool", pool, 1)
        check_tokens(model, tokens)
        fp = self.from_position
        sinks = set(residual_sinks(model, tokens, progress=False).channels) | set(self.channels)
        typical = capture(model, tokens, "hook_resid_pre", layers, None,
                          lambda x: x[:, fp:].abs().flatten(0, 1).median(dim=0).values).median(dim=0).values
        ranked = [c for c in typical.argsort(descending=True).tolist() if c not in sinks]
        n = len(self.channels)
        chosen = tuple(sorted(random.Random(check_seed(seed)).sample(ranked[: max(pool * n, n)], n)))
        control = dataclasses.replace(self, channels=chosen)
        if self.mode == "clip":
            return dataclasses.replace(control, mode="scale", factor=self.clip_factor(model, tokens))
        if self.mode == "mean":
            return dataclasses.replace(control, values=_means(model, tokens, control))
        return control

    def clip_factor(self, model: Model, tokens: Int[Tensor, "batch pos"]) -> float:
        """The median over edited tokens, channels and blocks of |clipped x_c| / |x_c|."""
        layers = self.check_sites(model)
        fp, channels, multiple = self.from_position, list(self.channels), self.multiple

        def ratio(x):
            x = x[:, fp:].double()
            rms = x.pow(2).mean(dim=-1, keepdim=True).sqrt()
            mine = x[..., channels].abs()
            return (mine.clamp(max=multiple * rms) / mine.clamp(min=1e-30)).flatten()

        return float(capture(model, tokens, "hook_resid_pre", layers, None, ratio).median())

    def hooks(self, model: Model) -> list[Hook]:
        layers = self.check_sites(model)
        self.check_model(model, vars(self))
        self.check_arrays(model, layer=len(layers), channel=len(self.channels))
        values = None if self.values is None else as_tensor(self.values)
        channels, fp = list(self.channels), self.from_position
        hooks = []
        for index, layer in enumerate(layers):
            def edit(x, hook, index=index):
                if fp >= x.shape[1]:
                    raise SinkInterpError(f"EditResidualDimension from_position {fp} is past the {x.shape[1]} positions")
                out = x.clone()
                part = out[:, fp:]
                before = part.norm(dim=-1, keepdim=True)
                mine = part[..., channels]
                if self.mode == "clip":
                    limit = self.multiple * part.pow(2).mean(dim=-1, keepdim=True).sqrt()
                    mine = mine.sign() * torch.minimum(mine.abs(), limit)
                elif self.mode == "scale":
                    mine = mine * self.factor
                else:
                    mine = values[index].to(mine).expand_as(mine)
                part[..., channels] = mine
                if self.keep_norm:
                    part *= before / part.norm(dim=-1, keepdim=True).clamp(min=1e-30)
                return out

            hooks.append((f"blocks.{layer}.hook_resid_pre", edit))
        return hooks


def _means(model: Model, tokens: Tensor, edit: EditResidualDimension) -> Tensor:
    """[layers][channels]: each channel's mean over the edited positions of ``tokens``."""
    layers, channels, fp = edit.check_sites(model), list(edit.channels), edit.from_position
    if fp >= tokens.shape[1]:
        raise SinkInterpError(f"from_position {fp} is past the {tokens.shape[1]} reference positions")
    return capture(model, tokens, "hook_resid_pre", layers, None,
                   lambda x: x[:, fp:][..., channels].flatten(0, 1).mean(dim=0))
