"""Inference-time stand-ins for the fixes that papers train in, each replacing the masked sink:
softmax-off-by-one (a zero slot), an explicit key/value slot (:class:`KeyValueSlot`, Gu et al.'s
K-bias when its value is 0) and a Gated-Attention output gate (:class:`OutputGate`, Qiu et al.
2025), fitted with the model frozen."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from jaxtyping import Int
from torch import Tensor

from sinkinterp._batches import check_bool, check_int, check_seed, check_tokens
from sinkinterp.backends import Model, require
from sinkinterp.errors import SinkInterpError
from sinkinterp.interventions.base import (
    FitOption,
    Hook,
    Intervention,
    IntsLike,
    NumbersLike,
    SpecContext,
    as_tensor,
    check_from_query,
    check_position,
    check_seq,
    frozen_tensor,
    ints_or_none,
    is_int,
    is_number,
    norm_common,
    pick,
    refuse_head_site,
)
from sinkinterp.interventions.capture import capture_all
from sinkinterp.interventions.keys import key_masker
from sinkinterp.interventions.slot import (
    GRADIENT_OPTIONS,
    SLOT_NEEDS,
    ConstantAttentionBias,
    bias_hooks,
    check_gradient_spec,
    fit_by_gradient,
)
from sinkinterp.sites import as_kv, as_query_heads, resolve_heads, resolve_layers

def softmax_off_by_one(*, layers=None, heads=None, position: int = 0, from_query: int = 16) -> ConstantAttentionBias:
    """StreamingLLM's "zero sink" / softmax-off-by-one in place of the real sink: a slot with
    logit 0 and value 0, i.e. ``softmax1(x)_j = exp(x_j) / (1 + sum_k exp(x_k))`` over the other
    keys, for queries i >= ``from_query`` (the real sink key masked for them)."""
    return ConstantAttentionBias(logit=0.0, value=None, layers=layers, heads=heads, replace_sink=True,
                                 position=position, from_query=from_query)


def _gradient_split(calibration: Tensor, options: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
    if options.get("method", "moments") != "gradient":
        return calibration, None
    held = options.get("validation", max(1, calibration.shape[0] // 4))
    return calibration[:-held], calibration[-held:]


def _check_fit_tokens(model: Model, tokens: Tensor, validation: Tensor | None, from_query: int) -> None:
    for name, x in (("calibration", tokens), ("validation", validation)):
        if x is None:
            continue
        check_tokens(model, x)
        if x.shape[1] <= from_query + 1:
            raise SinkInterpError(f"{name} tokens have {x.shape[1]} positions: from_query {from_query} leaves no query "
                                  "to fit on; use longer sequences")


def _gradient_settings(steps, lr, batch_size, seed, patience) -> None:
    check_int("steps", steps, 1)
    check_int("batch_size", batch_size, 1)
    check_int("patience", patience, 1)
    check_seed(seed)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr <= 10:
        raise SinkInterpError(f"lr must be a number in (0, 10], got {lr!r}")


# --------------------------------------------------------------------------------------------
# An explicit key/value slot


@dataclass(frozen=True, repr=False)
class KeyValueSlot(Intervention):
    """A virtual slot per head with its own key ``key`` [layers][heads][d_head] and value ``value``
    (None: 0, Gu et al.'s K-bias), the same for every input, standing in for the masked sink at
    queries i >= ``from_query``. Unlike :class:`ConstantAttentionBias` its logit depends on the
    query, ``q_i . key / scale`` with the rotated query, as a key at position 0 would (rotary angle
    0). ``scale`` is the model's attention scale, measured when the slot is fitted."""

    NEEDS: ClassVar[tuple[str, ...]] = (*SLOT_NEEDS, "rotary_hooks")
    ARRAY_AXES: ClassVar[dict[str, tuple[str, ...]]] = {"key": ("layer", "head", "d_head"),
                                                         "value": ("layer", "head", "d_head")}
    NEEDS_FIT: ClassVar[bool] = True
    FIT_OPTIONS: ClassVar[dict[str, FitOption]] = {
        **GRADIENT_OPTIONS,
        "with_value": FitOption("bool (false: the value is 0, a pure key bias)", lambda v: isinstance(v, bool)),
    }

    key: NumbersLike = ()
    value: NumbersLike = None
    scale: float | int = 1.0
    layers: IntsLike = None
    heads: IntsLike = None
    position: int = 0
    from_query: int = 16
    method: str = "given"
    fit_log: Any = field(default=None, compare=False)

    def __post_init__(self):
        refuse_head_site(self, "its key and value are stored per [layer][head]")
        norm_common(self)
        check_int("position", self.position)
        check_from_query(self.from_query, self.position)
        object.__setattr__(self, "key", frozen_tensor(self, "key"))
        object.__setattr__(self, "value", frozen_tensor(self, "value"))
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not self.scale > 0:
            raise SinkInterpError(f"KeyValueSlot scale must be a positive number, got {self.scale!r}")
        object.__setattr__(self, "scale", float(self.scale))

    @classmethod
    def fit_spec(cls, model: Model, calibration: Tensor, *, seed: int = 0, draw: int = 0, n_draws: int = 1,
                 fields: dict[str, Any], options: dict[str, Any]) -> KeyValueSlot:
        train, validation = _gradient_split(calibration, options)
        given = pick(fields, "layers", "heads", "position", "from_query")
        given.update(pick(options, "method", "steps", "lr", "batch_size", "with_value", "patience"))
        return cls.fit(model, train, validation=validation, seed=seed, **given)

    @classmethod
    def check_spec(cls, fields: dict[str, Any], options: dict[str, Any] | None, context: SpecContext) -> None:
        super().check_spec(fields, options, context)
        check_gradient_spec(options, context)

    @classmethod
    def fit(cls, model: Model, tokens: Int[Tensor, "batch pos"], *, method: str = "moments", layers=None, heads=None,
            position: int = 0, from_query: int = 16, with_value: bool = True, steps: int = 30, lr: float = 0.01,
            batch_size: int = 4, seed: int = 0, patience: int = 5, validation: Tensor | None = None,
            progress: bool = False) -> KeyValueSlot:
        """``"moments"``: the sink's mean rotated key and mean value over ``tokens`` (the mean sink
        as a slot); ``"gradient"``: from there, Adam on key (and value) with the model frozen, held-out
        early stopping on ``validation`` as :func:`~sinkinterp.fit_constant_bias`."""
        if method not in ("moments", "gradient"):
            raise SinkInterpError(f"KeyValueSlot.fit method {method!r} is not one of 'moments', 'gradient'")
        check_bool("with_value", with_value)
        if method == "gradient":
            _gradient_settings(steps, lr, batch_size, seed, patience)
        elif validation is not None:
            raise SinkInterpError("validation tokens stop a gradient fit early: method 'moments' takes none")
        _check_fit_tokens(model, tokens, validation, from_query)
        check_from_query(from_query, position)
        check_seq(position, tokens.shape[1], "reference")
        chosen_layers = resolve_layers(model, ints_or_none("layers", layers))
        chosen_heads = resolve_heads(model, ints_or_none("heads", heads))
        require(model, *cls.NEEDS, needed_by="KeyValueSlot.fit")
        kept = capture_all(model, tokens, chosen_layers, {
            "attn.hook_rot_q": lambda x: x[:, position + 1:],          # [batch query head d]
            "attn.hook_rot_k": lambda x: x[:, position],                # [batch kv d]
            "attn.hook_attn_scores": lambda x: x[:, :, position + 1:, position],  # [batch head query]
            "attn.hook_v": lambda x: x[:, position],
        })
        n_heads = model.cfg.n_heads
        keys = as_query_heads(as_kv(model, kept["attn.hook_rot_k"]), n_heads)  # [layer batch head d]
        dots = torch.einsum("lbqhd,lbhd->lbhq", kept["attn.hook_rot_q"].double(), keys.double())
        scores = kept["attn.hook_attn_scores"].double()
        seen = scores.isfinite() & (scores.abs() > 1e-3)
        if not bool(seen.any()):
            raise SinkInterpError("KeyValueSlot.fit: no finite sink score to measure the attention scale on")
        scale = float((dots[seen] / scores[seen]).median())
        spread = float(((dots[seen] / scale - scores[seen]).abs() / scores[seen].abs().clamp(min=1e-6)).median())
        if not scale > 0 or spread > 1e-3:
            raise SinkInterpError(
                f"on this model the sink's scores are not q_rot . k_rot / scale (median relative error {spread:.2g}): "
                "a query-dependent slot cannot be built from its rotary hooks")
        key = keys.mean(dim=1)[:, chosen_heads]  # [layer head d]
        value = None
        if with_value:
            value = as_query_heads(as_kv(model, kept["attn.hook_v"]).mean(dim=1), n_heads)[:, chosen_heads]
        fit_log = None
        if method == "gradient":
            device = next(model.parameters()).device
            params = [key.clone().to(device).requires_grad_(True)]
            if value is not None:
                params.append(value.clone().to(device).requires_grad_(True))
            zero_logit = torch.zeros(len(chosen_layers), len(chosen_heads), device=device)
            hooks = bias_hooks(model, chosen_layers, chosen_heads, zero_logit, params[1] if value is not None else None,
                               True, position, from_query, key=params[0], scale=scale)
            best, fit_log = fit_by_gradient(model, tokens, validation, params, hooks, from_query=from_query,
                                            steps=steps, lr=lr, batch_size=batch_size, seed=seed, patience=patience,
                                            progress=progress, history=[], description="fit key/value slot")
            key, value = best[0], best[1] if value is not None else None
        return cls(key=key, value=value, scale=scale, layers=layers, heads=heads, position=position,
                   from_query=from_query, method=method, fit_log=fit_log)

    def hooks(self, model: Model) -> list[Hook]:
        layers, heads = resolve_layers(model, self.layers), resolve_heads(model, self.heads)
        check_position(model, self.position)
        self.check_arrays(model, layer=len(layers), head=len(heads))
        self.check_model(model, vars(self))
        if self.key == ():
            raise SinkInterpError("KeyValueSlot has no key: build it with KeyValueSlot.fit(model, tokens)")
        value = None if self.value is None else as_tensor(self.value)
        return bias_hooks(model, layers, heads, torch.zeros(len(layers), len(heads)), value, True, self.position,
                          self.from_query, key=as_tensor(self.key), scale=self.scale)


# --------------------------------------------------------------------------------------------
# A Gated-Attention output gate


@dataclass(frozen=True, repr=False)
class OutputGate(Intervention):
    """Gated Attention's output gate (Qiu et al. 2025) on a model that was trained without one:
    each head's output z at queries i >= ``from_query`` is multiplied by
    ``sigmoid(x_i W + b)``, with x_i the block's normalised input (``ln1.hook_normalized``);
    the real sink key is masked for those queries (``replace_sink``), so the gate stands in for it.

    ``kind="headwise"``: one gate per head (``weight`` [layers][d_model][heads], ``bias``
    [layers][heads]); ``"elementwise"``: one per head and z element (``weight``
    [layers][d_model][rank] x ``up`` [layers][rank][heads * d_head], a rank-``rank`` map so the
    value can be stored; ``bias`` [layers][heads * d_head]); ``"constant"``: ``bias`` only, the
    input-independent gate. Fitted with the model frozen (:meth:`fit`).
    """

    NEEDS: ClassVar[tuple[str, ...]] = ("attn.hook_attn_scores", "attn.hook_z", "reads:ln1.hook_normalized")
    NEEDS_FIT: ClassVar[bool] = True
    FIT_OPTIONS: ClassVar[dict[str, FitOption]] = {
        **{k: v for k, v in GRADIENT_OPTIONS.items() if k != "method"},
        "rank": FitOption("int: rank of an elementwise gate's map (default 8)", is_int(1)),
        "init": FitOption("float: the gate's starting value, sigmoid(bias) (default 0.9)", is_number(0, 1)),
    }
    KINDS: ClassVar[tuple[str, ...]] = ("headwise", "elementwise", "constant")

    kind: str = "headwise"
    weight: NumbersLike = None
    up: NumbersLike = None
    bias: NumbersLike = ()
    layers: IntsLike = None
    replace_sink: bool = True
    position: int = 0
    from_query: int = 16
    fit_log: Any = field(default=None, compare=False)

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise SinkInterpError(f"OutputGate kind {self.kind!r} is not one of {', '.join(self.KINDS)}")
        norm_common(self, heads=False)
        check_bool("replace_sink", self.replace_sink)
        check_int("position", self.position)
        check_from_query(self.from_query, self.position)
        for name in ("weight", "up", "bias"):
            object.__setattr__(self, name, frozen_tensor(self, name))
        if (self.kind == "constant") != (self.weight is None):
            raise SinkInterpError("OutputGate takes a weight unless its kind is 'constant'")
        if (self.kind == "elementwise") != (self.up is not None):
            raise SinkInterpError("OutputGate takes up (the second factor of its map) for kind 'elementwise' only")

    @classmethod
    def fit_spec(cls, model: Model, calibration: Tensor, *, seed: int = 0, draw: int = 0, n_draws: int = 1,
                 fields: dict[str, Any], options: dict[str, Any]) -> OutputGate:
        train, validation = _gradient_split(calibration, {**options, "method": "gradient"})
        given = pick(fields, "kind", "layers", "position", "from_query", "replace_sink")
        given.update(pick(options, "steps", "lr", "batch_size", "patience", "rank", "init"))
        return cls.fit(model, train, validation=validation, seed=seed, **given)

    @classmethod
    def check_spec(cls, fields: dict[str, Any], options: dict[str, Any] | None, context: SpecContext) -> None:
        super().check_spec(fields, options, context)
        check_gradient_spec({**(options or {}), "method": "gradient"}, context)

    @classmethod
    def fit(cls, model: Model, tokens: Int[Tensor, "batch pos"], *, kind: str = "headwise", layers=None,
            position: int = 0, from_query: int = 16, replace_sink: bool = True, rank: int = 8, init: float = 0.9,
            steps: int = 30, lr: float = 0.01, batch_size: int = 4, seed: int = 0, patience: int = 5,
            validation: Tensor | None = None, progress: bool = False) -> OutputGate:
        """Adam on the gate's parameters with the model frozen, from a gate of ``init`` everywhere
        (bias = logit(init), the map a small seeded random start), with held-out early stopping on
        ``validation`` as :func:`~sinkinterp.fit_constant_bias`."""
        if kind not in cls.KINDS:
            raise SinkInterpError(f"OutputGate kind {kind!r} is not one of {', '.join(cls.KINDS)}")
        _gradient_settings(steps, lr, batch_size, seed, patience)
        check_int("rank", rank, 1)
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not 0 < init < 1:
            raise SinkInterpError(f"init must be a number in (0, 1), got {init!r}")
        _check_fit_tokens(model, tokens, validation, from_query)
        chosen = resolve_layers(model, ints_or_none("layers", layers))
        require(model, *cls.NEEDS, needed_by="OutputGate.fit")
        cfg = model.cfg
        width = cfg.n_heads * (cfg.d_head if kind == "elementwise" else 1)
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(check_seed(seed))
        start = float(torch.logit(torch.tensor(init)))
        params = {"bias": torch.full((len(chosen), width), start)}
        if kind == "headwise":
            params["weight"] = torch.randn(len(chosen), cfg.d_model, width, generator=generator) * 1e-3
        elif kind == "elementwise":
            params["weight"] = torch.randn(len(chosen), cfg.d_model, rank, generator=generator) * 1e-2
            params["up"] = torch.randn(len(chosen), rank, width, generator=generator) * 1e-2
        leaves = {name: value.to(device).requires_grad_(True) for name, value in params.items()}
        hooks = gate_hooks(model, chosen, kind, leaves.get("weight"), leaves.get("up"), leaves["bias"], replace_sink,
                           position, from_query)
        names = list(leaves)
        best, fit_log = fit_by_gradient(model, tokens, validation, [leaves[n] for n in names], hooks,
                                        from_query=from_query, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                                        patience=patience, progress=progress, history=[],
                                        description=f"fit {kind} output gate")
        fitted = dict(zip(names, best))
        return cls(kind=kind, weight=fitted.get("weight"), up=fitted.get("up"), bias=fitted["bias"], layers=layers,
                   replace_sink=replace_sink, position=position, from_query=from_query, fit_log=fit_log)

    def _arrays(self, model: Model) -> tuple[list[int], Tensor | None, Tensor | None, Tensor]:
        layers = resolve_layers(model, self.layers)
        check_position(model, self.position)
        cfg = model.cfg
        width = cfg.n_heads * (cfg.d_head if self.kind == "elementwise" else 1)
        bias = as_tensor(self.bias)
        if tuple(bias.shape) != (len(layers), width):
            raise SinkInterpError(f"OutputGate bias has shape {tuple(bias.shape)}, expected ({len(layers)}, {width})")
        weight = None if self.weight is None else as_tensor(self.weight)
        up = None if self.up is None else as_tensor(self.up)
        if weight is not None and (weight.shape[:2] != (len(layers), cfg.d_model)
                                   or (up is None and weight.shape[2] != width)):
            raise SinkInterpError(f"OutputGate weight has shape {tuple(weight.shape)}, expected "
                                  f"({len(layers)}, {cfg.d_model}, {width if up is None else 'rank'})")
        if up is not None and (up.shape[0] != len(layers) or up.shape[1] != weight.shape[2] or up.shape[2] != width):
            raise SinkInterpError(f"OutputGate up has shape {tuple(up.shape)}, expected ({len(layers)}, "
                                  f"{weight.shape[2]}, {width})")
        return layers, weight, up, bias

    def hooks(self, model: Model) -> list[Hook]:
        layers, weight, up, bias = self._arrays(model)
        self.check_model(model, vars(self))
        return gate_hooks(model, layers, self.kind, weight, up, bias, self.replace_sink, self.position, self.from_query)

    def mean_gate(self, model: Model, tokens: Int[Tensor, "batch pos"]) -> Tensor:
        """[layers]: the gate's mean value over heads (and elements) and queries i >= from_query,
        on ``tokens`` with the gate applied."""
        layers, weight, up, bias = self._arrays(model)
        sums = torch.zeros(len(layers), dtype=torch.float64)
        hooks = gate_hooks(model, layers, self.kind, weight, up, bias, self.replace_sink, self.position,
                           self.from_query, record=sums)
        check_tokens(model, tokens)
        with torch.inference_mode():
            model.run_with_hooks(tokens, fwd_hooks=hooks, return_type=None)
        return sums


def gate_hooks(model: Model, layers: list[int], kind: str, weight, up, bias, replace_sink: bool, position: int,
               from_query: int, record: Tensor | None = None) -> list[Hook]:
    """Hooks of an output gate (``weight``, ``up`` and ``bias`` may require grad). ``record``
    [layers], if given, receives each layer's mean gate value."""
    cfg, fq = model.cfg, from_query
    remove = key_masker(list(range(cfg.n_heads)), cfg.n_heads, position, fq)
    hooks = []
    for index, layer in enumerate(layers):
        state: dict[str, Tensor] = {}

        def on_input(x, hook, state=state):
            state["x"] = x[:, fq:]

        def on_scores(scores, hook):
            check_seq(position, scores.shape[-1], "OutputGate", fq)
            return remove(scores)

        def on_z(z, hook, state=state, index=index):
            x = state.pop("x").to(bias)
            if kind == "constant":
                logit = bias[index].expand(*x.shape[:2], -1)
            elif kind == "headwise":
                logit = x @ weight[index] + bias[index]
            else:
                logit = (x @ weight[index]) @ up[index] + bias[index]
            gate = torch.sigmoid(logit)  # [batch query heads or heads*d_head]
            if record is not None:
                record[index] = float(gate.double().mean())
            shape = (*gate.shape[:2], cfg.n_heads, -1)
            return torch.cat([z[:, :fq], z[:, fq:] * gate.reshape(shape).to(z)], dim=1)

        hooks.append((f"blocks.{layer}.ln1.hook_normalized", on_input))
        if replace_sink:
            hooks.append((f"blocks.{layer}.attn.hook_attn_scores", on_scores))
        hooks.append((f"blocks.{layer}.attn.hook_z", on_z))
    return hooks


