"""Edit massive channels of the residual stream (:class:`EditMassiveChannels`, Sun et al.)."""

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
    check_position,
    check_seq,
    frozen_tensor,
    ints_or_none,
    is_number,
    norm_common,
    pick,
    refuse_empty,
)
from sinkinterp.interventions.capture import capture
from sinkinterp.measure import find_massive_activations, stable_massive_channels
from sinkinterp.sites import resolve_layers, select_indices

# --------------------------------------------------------------------------------------------
# 4. Edit massive channels


@dataclass(frozen=True, repr=False)
class EditMassiveChannels(RandomControl, Intervention):
    """Set residual-stream ``channels`` at ``positions`` after the chosen blocks (``hook_resid_post``)
    to zero, to their reference mean (``values``: [layers][slots][channels], one mean per edited
    position), or scale them by ``factor``.

    ``largest_other=True`` also edits, in each sequence and layer, the one position outside
    ``positions`` where these channels are largest in magnitude (Sun et al. edit the starting token
    and the other token that carries massive activations, a first "." or "\n"); its mean is the
    last slot of ``values``.

    ``channels=None`` stands for the stable channels the detector finds: resolve it with
    :meth:`fit`, which by default edits one layer, the first where the channels are massive (as
    Sun et al.); ``layers=None`` on the constructor means every layer, a different, milder
    experiment (the edit is undone and redone at each layer instead of propagating).
    :meth:`random_control` edits as many random non-massive channels of comparable typical
    magnitude instead.
    """

    NEEDS: ClassVar[tuple[str, ...]] = ("hook_resid_post",)
    ARRAY_AXES: ClassVar[dict[str, tuple[str, ...]]] = {"values": ("layer", "slot", "channel")}
    LAYER_WORDS: ClassVar[tuple[str, ...]] = ("first", "all")
    FIT_OPTIONS: ClassVar[dict[str, FitOption]] = {
        "min_fraction": FitOption("float in (0, 1]", is_number(0, 1)),
        **RandomControl.CONTROL_OPTIONS,
    }

    channels: IntsLike = None
    positions: IntsLike = (0,)
    layers: IntsLike = None
    mode: str = "zero"
    factor: NumbersLike = None
    values: NumbersLike = None
    largest_other: bool = False

    MODES: ClassVar[tuple[str, ...]] = ("zero", "mean", "scale")

    def __post_init__(self):
        object.__setattr__(self, "channels", ints_or_none("channels", self.channels))
        object.__setattr__(self, "positions", ints_or_none("positions", self.positions))
        for position in self.positions or ():
            check_int("EditMassiveChannels position", position)
        norm_common(self, heads=False)
        check_mode("EditMassiveChannels", self.mode, self.MODES)
        object.__setattr__(self, "values", frozen_tensor(self, "values"))
        check_bool("EditMassiveChannels largest_other", self.largest_other)
        for name in ("channels", "positions"):
            refuse_empty(self, name, getattr(self, name))
        if (self.mode == "scale") != (self.factor is not None):
            raise SinkInterpError("EditMassiveChannels takes factor with mode 'scale' and only then")
        if self.mode == "scale":
            if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)) or not math.isfinite(self.factor):
                raise SinkInterpError(f"factor must be a finite number, got {self.factor!r}")
            object.__setattr__(self, "factor", float(self.factor))
        if (self.mode == "mean") != (self.values is not None):
            raise SinkInterpError(
                "EditMassiveChannels mode 'mean' needs stored values (build it with "
                "EditMassiveChannels.fit(model, tokens, mode='mean')), and other modes take none"
            )

    @classmethod
    def fit_spec(cls, model: Model, calibration: Tensor, *, seed: int = 0, draw: int = 0, n_draws: int = 1,
                 fields: dict[str, Any], options: dict[str, Any]) -> EditMassiveChannels:
        """:meth:`fit` on the calibration split; ``control: random`` turns it into its matched
        random-channel control, drawn with seed + draw."""
        edit = cls.fit(model, calibration, min_fraction=options.get("min_fraction", 0.5),
                       **pick(fields, "channels", "positions", "layers", "mode", "factor"))
        return edit.controlled(model, calibration, seed=seed + draw, options=options)


    @classmethod
    def check_record(cls, model: Model, record: dict[str, Any]) -> None:
        super().check_record(model, record)
        if record.get("channels") is not None:
            select_indices("channel", record["channels"], model.cfg.d_model, "residual channels")

    @property
    def n_slots(self) -> int:
        """Edited positions per sequence: ``positions`` plus the largest other one if asked."""
        return len(self.positions) + int(self.largest_other)

    @classmethod
    def fit(cls, model: Model, tokens: Int[Tensor, "batch pos"], *, channels=None, positions=(0,), layers="first",
            mode: str = "zero", factor: float | None = None, min_fraction: float = 0.5,
            largest_other: bool = False) -> EditMassiveChannels:
        """Resolve ``channels=None`` to the detector's stable channels at these positions (found in
        at least ``min_fraction`` of the sequences of ``tokens``), ``layers="first"`` to the first
        layer where those channels are massive at those positions in at least ``min_fraction`` of
        the sequences (``"all"``: every layer), and for ``"mean"`` store each edited position's own
        reference mean of each channel after each selected block."""
        check_tokens(model, tokens)
        check_bool("largest_other", largest_other)
        positions = ints_or_none("positions", positions)
        for position in positions or ():
            check_int("position", position)
            check_seq(position, tokens.shape[1], "reference")
        if channels is not None:
            select_indices("channel", ints_or_none("channels", channels), model.cfg.d_model, "residual channels")
        if not isinstance(min_fraction, (int, float)) or isinstance(min_fraction, bool) or not 0 < min_fraction <= 1:
            raise SinkInterpError(f"min_fraction {min_fraction!r} must be a number in (0, 1]")
        found = None
        if channels is None or layers == "first":
            found = find_massive_activations(model, tokens, progress=False)
            found = found[found.position.isin(positions or ())]
            found.attrs["n_seqs"] = tokens.shape[0]
        if channels is None:
            stable = stable_massive_channels(found, min_fraction=min_fraction)
            channels = tuple(sorted(int(c) for c in stable.channel.unique()))
            if not channels:
                raise SinkInterpError(
                    f"no massive channel at positions {positions} in at least {min_fraction:.0%} of the "
                    "reference sequences: pass channels explicitly"
                )
        channels = ints_or_none("channels", channels)
        if isinstance(layers, str):
            if layers == "all":
                layers = None
            elif layers == "first":
                ours = found[found.channel.isin(channels)]
                share = ours.groupby("layer").seq.nunique() / tokens.shape[0]
                common = share[share >= min_fraction].index
                if not len(common):
                    raise SinkInterpError(
                        f"channels {channels} are not massive at positions {positions} in at least "
                        f"{min_fraction:.0%} of the reference sequences in any layer: pass layers explicitly")
                layers = (int(common.min()),)
            else:
                raise SinkInterpError(f"EditMassiveChannels.fit layers {layers!r}: use 'first', 'all' or layer numbers")
        values = None
        if mode == "mean":
            values = channel_means(model, tokens, resolve_layers(model, ints_or_none("layers", layers)), positions, channels,
                                    largest_other)
        return cls(channels=channels, positions=positions, layers=layers, mode=mode, factor=factor, values=values,
                   largest_other=largest_other)

    def random_control(self, model: Model, tokens: Int[Tensor, "batch pos"], *, seed: int = 0,
                       pool: int = 10) -> EditMassiveChannels:
        """The same edit on ``len(channels)`` random channels that are never massive in ``tokens``
        and whose typical magnitude is closest to the edited channels'. Typical magnitude is the
        median |x| at the *other* positions (at the edited ones a massive channel has no
        non-massive peer by definition), per edited layer, then the median over those layers.
        Drawn (seeded) from the ``pool`` x n channels nearest in log magnitude to the edited
        channels' median."""
        if self.channels is None:
            raise SinkInterpError("random_control needs resolved channels: call fit(model, tokens) first")
        layers = resolve_layers(model, self.layers)
        massive = set(find_massive_activations(model, tokens, progress=False).channel.tolist()) | set(self.channels)
        others = [p for p in range(tokens.shape[1]) if p not in self.positions]
        if not others:
            raise SinkInterpError("random_control needs reference tokens longer than the edited positions")
        per_layer = capture(model, tokens, "hook_resid_post", layers, None,
                             lambda x: x[:, others].abs().flatten(0, 1).median(dim=0).values)  # [layer d_model]
        typical = per_layer.median(dim=0).values
        target = typical[list(self.channels)].median().clamp(min=1e-12).log()
        candidates = [c for c in range(model.cfg.d_model) if c not in massive]
        candidates.sort(key=lambda c: abs(float(typical[c].clamp(min=1e-12).log() - target)))
        check_int("pool", pool, 1)
        chosen = tuple(sorted(random.Random(check_seed(seed)).sample(candidates[: pool * len(self.channels)], len(self.channels))))
        values = None
        if self.mode == "mean":
            values = channel_means(model, tokens, layers, self.positions, chosen, self.largest_other)
        return dataclasses.replace(self, channels=chosen, values=values)

    def hooks(self, model: Model) -> list[Hook]:
        if self.channels is None:
            raise SinkInterpError(
                "EditMassiveChannels channels=None: resolve the stable channels with "
                "EditMassiveChannels.fit(model, reference_tokens, ...)"
            )
        layers = resolve_layers(model, self.layers)
        select_indices("channel", self.channels, model.cfg.d_model, "residual channels")
        self.check_model(model, vars(self))
        for position in self.positions:
            check_position(model, position)
        self.check_arrays(model, layer=len(layers), slot=self.n_slots, channel=len(self.channels))
        values = None if self.values is None else as_tensor(self.values)
        positions, channels = list(self.positions), list(self.channels)
        hooks = []
        for index, layer in enumerate(layers):
            def edit(x, hook, index=index):
                check_seq(max(positions), x.shape[1], "EditMassiveChannels")
                slots = edited_slots(x, positions, channels, self.largest_other)  # [batch slot]
                cols = torch.tensor(channels, device=x.device)
                rows = torch.arange(x.shape[0], device=x.device)[:, None, None]
                where = (rows, slots[:, :, None], cols[None, None, :])
                x = x.clone()
                if self.mode == "zero":
                    x[where] = 0
                elif self.mode == "scale":
                    x[where] = x[where] * self.factor
                else:
                    x[where] = values[index].to(x)[None].expand(x.shape[0], -1, -1)
                return x

            hooks.append((f"blocks.{layer}.hook_resid_post", edit))
        return hooks


def edited_slots(x: Tensor, positions: list[int], channels: list[int], largest_other: bool) -> Tensor:
    """[batch, slot] positions to edit in each row: ``positions``, then (``largest_other``) the
    position outside them where ``max_c |x[row, p, c]|`` over ``channels`` is largest."""
    fixed = torch.tensor(positions, device=x.device).expand(x.shape[0], -1)
    if not largest_other:
        return fixed
    size = x[:, :, channels].abs().amax(dim=-1)  # [batch pos]
    size[:, positions] = -1
    return torch.cat([fixed, size.argmax(dim=1, keepdim=True)], dim=1)


def channel_means(model: Model, tokens, layers: list[int], positions, channels, largest_other: bool = False) -> Tensor:
    """[layer, slot, channel]: each edited slot's own mean over the reference sequences."""
    cols = list(channels)

    def select(x):
        slots = edited_slots(x, list(positions), cols, largest_other)  # [batch slot]
        picked = x[torch.arange(x.shape[0])[:, None], slots]  # [batch slot d_model]
        return picked[:, :, cols]

    resid = capture(model, tokens, "hook_resid_post", layers, None, select)  # [layer batch slot channel]
    return resid.mean(dim=1)


