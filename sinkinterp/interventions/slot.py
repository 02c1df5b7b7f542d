"""A constant attention bias: an explicit sink slot (:class:`ConstantAttentionBias`), and its fit
(:func:`fit_constant_bias`: moments, or gradient steps with held-out early stopping)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from jaxtyping import Int
from torch import Tensor

from sinkinterp._batches import (
    check_bool,
    check_int,
    check_seed,
    check_tokens,
    progress_bar,
)
from sinkinterp.backends import Model, attention_windows, require
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
    one_of,
    pick,
    refuse_head_site,
)
from sinkinterp.interventions.capture import add_at, capture_all
from sinkinterp.interventions.keys import key_masker
from sinkinterp.sites import (
    as_index,
    as_kv,
    as_query_heads,
    resolve_heads,
    resolve_layers,
)

# --------------------------------------------------------------------------------------------
# 6. Constant attention bias: an explicit sink slot


# The slot reads the real logits (for the log-sum-exp), rescales the pattern and adds to z.
SLOT_NEEDS = ("scores", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "order")


#: The fit options every gradient-fitted slot or gate shares (see :func:`fit_by_gradient`).
GRADIENT_OPTIONS: dict[str, FitOption] = {
    "method": FitOption("'moments' or 'gradient'", one_of("moments", "gradient")),
    "steps": FitOption("int (at most)", is_int(1)),
    "lr": FitOption("float", is_number(0, 10)),
    "batch_size": FitOption("int", is_int(1)),
    "validation": FitOption("int: calibration sequences held out to stop a gradient fit "
                            "(default a quarter, at least 1)", is_int(1)),
    "patience": FitOption("int: steps without a better validation loss before stopping (default 5)", is_int(1)),
}


def check_gradient_spec(options: dict[str, Any] | None, context: SpecContext) -> None:
    """A gradient fit needs calibration sequences beyond its held-out ones; validation and
    patience only stop a gradient fit."""
    options = options or {}
    if options.get("method") == "gradient":
        held = options.get("validation", max(1, context.n_calibration // 4))
        if context.n_calibration < held + 1:
            context.fail("spec.data.n_calibration", f"is {context.n_calibration} but {context.where} fits by "
                         f"gradient on the calibration split less {held} validation sequence(s): use "
                         f"n_calibration >= {held + 1}")
    elif "validation" in options or "patience" in options:
        context.fail(f"{context.where}.fit", "validation and patience stop a gradient fit: they need method "
                     "'gradient'")


@dataclass(frozen=True, repr=False)
class ConstantAttentionBias(Intervention):
    """A virtual key/value slot per head, the same for every input (docs/design.md §3.6).

    Softmax over ``[scores, logit]`` equals the pattern times ``keep_i = sigmoid(LSE_i - logit)``
    plus a slot of weight ``1 - keep_i`` whose value ``value`` is added to z. Applied to queries
    i >= ``from_query`` only; with ``replace_sink`` the real key ``position`` is masked for those
    queries, so the slot stands in for the sink. ``logit``: a number or [layers][heads];
    ``value``: None (zero, a pure key bias) or [layers][heads][d_head] (selected layers/heads).
    """

    NEEDS: ClassVar[tuple[str, ...]] = SLOT_NEEDS
    ARRAY_AXES: ClassVar[dict[str, tuple[str, ...]]] = {"logit": ("layer", "head"),
                                                         "value": ("layer", "head", "d_head")}
    HEAD_SWEEP: ClassVar[bool] = True
    FIT_OPTIONS: ClassVar[dict[str, FitOption]] = {
        **GRADIENT_OPTIONS,
        "with_value": FitOption("bool", lambda v: isinstance(v, bool)),
    }

    logit: NumbersLike = 0.0
    value: NumbersLike = None
    layers: IntsLike = None
    heads: IntsLike = None
    replace_sink: bool = True
    position: int = 0
    from_query: int = 16
    method: str = "given"
    # How a gradient fit went (losses per step, the step kept, the split sizes); not compared.
    fit_log: Any = field(default=None, compare=False)

    def __post_init__(self):
        refuse_head_site(self, "its logit and value are stored per [layer][head]")
        norm_common(self)
        check_bool("replace_sink", self.replace_sink)
        if self.fit_log is not None and not isinstance(self.fit_log, dict):
            raise SinkInterpError(f"fit_log is a dict written by fit_constant_bias, or None, got {self.fit_log!r}")
        if self.method not in ("given", "moments", "gradient"):
            raise SinkInterpError(f"ConstantAttentionBias method {self.method!r} is not one of 'given', 'moments', "
                                  "'gradient' (it records where the numbers came from)")
        check_int("position", self.position)
        check_from_query(self.from_query, self.position)
        logit = frozen_tensor(self, "logit", minus_inf=True)
        if isinstance(logit, int):
            logit = float(logit)
        if not isinstance(logit, (float, tuple)):
            raise SinkInterpError(f"logit must be a number or [layers][heads] numbers, got {self.logit!r}")
        object.__setattr__(self, "logit", logit)
        object.__setattr__(self, "value", frozen_tensor(self, "value"))

    @classmethod
    def fit_spec(cls, model: Model, calibration: Tensor, *, seed: int = 0, draw: int = 0, n_draws: int = 1,
                 fields: dict[str, Any], options: dict[str, Any]) -> ConstantAttentionBias:
        """:func:`fit_constant_bias` on the calibration split; a gradient fit trains on it less its
        last ``validation`` sequences (default a quarter) and stops on those."""
        given = pick(fields, "layers", "heads", "position", "from_query")
        given.update(pick(options, "steps", "lr", "batch_size", "with_value", "patience"))
        method = options.get("method", "moments")
        if method == "gradient":
            held = options.get("validation", max(1, calibration.shape[0] // 4))
            return fit_constant_bias(model, calibration[:-held], method=method, seed=seed,
                                     validation=calibration[-held:], **given)
        return fit_constant_bias(model, calibration, method=method, seed=seed, **given)

    @classmethod
    def check_spec(cls, fields: dict[str, Any], options: dict[str, Any] | None, context: SpecContext) -> None:
        super().check_spec(fields, options, context)
        check_gradient_spec(options, context)

    def _tensors(self, model: Model) -> tuple[list[int], list[int], Tensor, Tensor | None]:
        layers, heads = resolve_layers(model, self.layers), resolve_heads(model, self.heads)
        check_position(model, self.position)
        self.check_arrays(model, layer=len(layers), head=len(heads))
        if isinstance(self.logit, tuple):
            logit = as_tensor(self.logit)
        else:
            logit = torch.full((len(layers), len(heads)), self.logit)
        value = None
        if self.value is not None:
            value = as_tensor(self.value)
        return layers, heads, logit, value

    def hooks(self, model: Model) -> list[Hook]:
        layers, heads, logit, value = self._tensors(model)
        self.check_model(model, vars(self))
        return bias_hooks(model, layers, heads, logit, value, self.replace_sink, self.position, self.from_query)




def bias_hooks(model: Model, layers, heads, logit: Tensor, value: Tensor | None, replace_sink: bool,
                position: int, from_query: int, key: Tensor | None = None, scale: float = 1.0) -> list[Hook]:
    """Hooks of a slot; ``logit`` [layers heads], ``value`` [layers heads d_head] and ``key``
    [layers heads d_head] may require grad (the fits optimise them through these same hooks).

    With ``key`` the slot's logit depends on the query: ``logit + q_i . key / scale``, with q_i the
    rotated query (``hook_rot_q``): an explicit key/value slot, a key at rotary angle 0 as the
    first token's is.

    In a sliding-window layer the slot acts only on the queries that can see ``position``: it
    stands in for the sink where there is one, and queries past the window never had it."""
    n_heads, fq = model.cfg.n_heads, from_query
    windows = attention_windows(model)
    remove = key_masker(heads, n_heads, position, fq)
    heads = as_index(heads, n_heads)
    hooks = []
    for index, layer in enumerate(layers):
        state: dict[str, Tensor] = {}

        def on_q(q, hook, state=state, index=index):  # [batch pos head d_head]
            state["q_logit"] = torch.einsum("bqhd,hd->bhq", q[:, fq:, heads], key[index].to(q)) / scale

        def on_scores(scores, hook, state=state):
            check_seq(position, scores.shape[-1], "ConstantAttentionBias", fq)
            if replace_sink:
                scores = remove(scores)
            state["scores"] = scores
            return scores

        def on_pattern(pattern, hook, state=state, index=index, window=windows[layer]):
            # keep_i = sigmoid(LSE_i - logit), with LSE_i the log-sum-exp of row i's scores. Read
            # it off the diagonal, LSE_i = s_ii - log A_ii (the query's own key is never masked),
            # instead of a second pass over the scores; rows whose A_ii is too small for that to be
            # accurate get an exact logsumexp.
            scores = state.pop("scores")[:, heads, fq:]  # [batch heads query key]
            own_score = scores.diagonal(offset=fq, dim1=-2, dim2=-1)
            own_weight = pattern[:, heads, fq:].diagonal(offset=fq, dim1=-2, dim2=-1)
            lse = own_score - own_weight.log()
            tiny = own_weight < 1e-20
            if bool(tiny.any()):
                lse = torch.where(tiny, scores.logsumexp(dim=-1), lse)
            slot_logit = logit[index].to(lse)[None, :, None]
            if key is not None:
                slot_logit = slot_logit + state.pop("q_logit").to(lse)
            keep = torch.sigmoid(lse - slot_logit)
            if window is not None:
                unseen = torch.arange(fq, pattern.shape[-1], device=keep.device) - position >= window
                keep = keep.masked_fill(unseen, 1.0)
            state["keep"] = keep
            scale = torch.ones(pattern.shape[:3], dtype=pattern.dtype, device=pattern.device)
            scale[:, heads, fq:] = keep.to(pattern.dtype)
            return pattern * scale[..., None]

        def on_z(z, hook, state=state, index=index):
            keep = state.pop("keep")
            if value is None:
                return z
            slot = (1 - keep)[..., None] * value[index].to(z)[None, :, None, :]  # [batch heads query d]
            return add_at(z, slot.transpose(1, 2), fq, heads)

        if key is not None:
            hooks.append((f"blocks.{layer}.attn.hook_rot_q", on_q))
        hooks += [(f"blocks.{layer}.attn.hook_attn_scores", on_scores),
                  (f"blocks.{layer}.attn.hook_pattern", on_pattern),
                  (f"blocks.{layer}.attn.hook_z", on_z)]
    return hooks


# --------------------------------------------------------------------------------------------
# Fitting the slot: moments, or gradient steps with held-out early stopping


def fit_constant_bias(
    model: Model,
    tokens: Int[Tensor, "batch pos"],
    *,
    method: str = "moments",
    layers=None,
    heads=None,
    position: int = 0,
    from_query: int = 16,
    with_value: bool = True,
    steps: int = 30,
    lr: float = 0.01,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = False,
    history: list | None = None,
    validation: Tensor | None = None,
    patience: int = 5,
) -> ConstantAttentionBias:
    """A :class:`ConstantAttentionBias` (``replace_sink=True``) fitted on calibration ``tokens``.

    ``"moments"``: the slot's logit is the mean attention logit of the sink (``hook_attn_scores`` at
    key ``position``) over queries i >= from_query and sequences (this is the sink's log-odds
    against the other keys plus their log-sum-exp), and its value the mean sink value.
    ``"gradient"``: starting from the moments, logit and value are optimised with Adam (``steps``,
    ``lr``, mini-batches of ``batch_size``, seeded) to minimise next-token loss on queries
    i >= from_query, with the model frozen. With ``validation`` tokens (sequences not in
    ``tokens``), the loss on them is measured before the first step and after each one; the
    parameters with the lowest validation loss are kept (step 0 is the moments), and the fit stops
    after ``patience`` steps without improvement. Without them the last step is kept, which
    over-fits small calibration sets: score the result on held-out tokens either way.
    ``history``, if given a list, receives each step's mini-batch loss; the returned slot's
    ``fit_log`` holds both loss curves and the step kept. ``progress`` shows a bar.
    """
    if history is not None and not isinstance(history, list):
        raise SinkInterpError(f"history must be a list (it receives each step's loss) or None, got {history!r}")
    history = [] if history is None else history
    if method not in ("moments", "gradient"):
        raise SinkInterpError(f"fit_constant_bias method {method!r} is not one of 'moments', 'gradient'")
    check_bool("with_value", with_value)
    if method == "gradient":
        check_int("steps", steps, 1)
        check_int("batch_size", batch_size, 1)
        check_seed(seed)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr <= 10:
            raise SinkInterpError(f"lr must be a number in (0, 10], got {lr!r}")
        check_int("patience", patience, 1)
        if validation is not None:
            check_tokens(model, validation)
            if validation.shape[1] <= from_query + 1:
                raise SinkInterpError(f"validation tokens have {validation.shape[1]} positions: from_query "
                                      f"{from_query} leaves no query to score")
    elif validation is not None:
        raise SinkInterpError("validation tokens stop a gradient fit early: method 'moments' takes none")
    check_tokens(model, tokens)
    check_from_query(from_query, position)
    if tokens.shape[1] <= from_query + 1:
        raise SinkInterpError(
            f"calibration tokens have {tokens.shape[1]} positions: from_query {from_query} leaves no "
            "query to fit on; use longer sequences"
        )
    selected_layers, selected_heads = resolve_layers(model, ints_or_none("layers", layers)), resolve_heads(model, ints_or_none("heads", heads))
    check_seq(position, tokens.shape[1], "reference")
    require(model, *SLOT_NEEDS, needed_by="fit_constant_bias")
    kept = capture_all(model, tokens, selected_layers, {
        "attn.hook_attn_scores": lambda x: x[:, selected_heads, from_query:, position],  # [batch head query]
        "attn.hook_v": lambda x: x[:, position],  # [batch kv d_head]
    })
    logit = _mean_sink_logit(kept["attn.hook_attn_scores"], [attention_windows(model)[l] for l in selected_layers],
                             position, from_query)
    value = None
    if with_value:
        value = as_query_heads(as_kv(model, kept["attn.hook_v"]).mean(dim=1), model.cfg.n_heads)[:, selected_heads]
    fit_log = None
    if method == "gradient":
        logit, value, fit_log = _fit_by_gradient(model, tokens, validation, selected_layers, selected_heads, logit,
                                                 value, position, from_query, steps, lr, batch_size, seed, patience,
                                                 progress, history)
    return ConstantAttentionBias(logit=logit, value=value, layers=layers, heads=heads, replace_sink=True,
                                 position=position, from_query=from_query, method=method, fit_log=fit_log)


def _mean_sink_logit(scores: Tensor, windows: list[int | None], position: int, from_query: int) -> Tensor:
    """[layer head]: the sink's logit averaged over sequences and the queries i >= from_query that
    can see it. In a sliding-window layer the others hold -inf (masked); where no such query sees
    the sink the slot never acts (it is applied to visible queries only) and its logit is 0."""
    rows = []
    for layer_scores, window in zip(scores, windows):  # [batch head query]
        query = torch.arange(from_query, from_query + layer_scores.shape[-1])
        seen = torch.ones_like(query, dtype=torch.bool) if window is None else query - position < window
        if bool(seen.any()):
            rows.append(layer_scores[..., seen].mean(dim=(0, 2)))
        else:
            rows.append(torch.zeros(layer_scores.shape[1]))
    return torch.stack(rows)


def fit_by_gradient(model: Model, tokens: Tensor, validation: Tensor | None, params: list[Tensor], hooks: list[Hook],
                    *, from_query: int, steps: int, lr: float, batch_size: int, seed: int, patience: int,
                    progress: bool, history: list, description: str) -> tuple[list[Tensor | None], dict[str, Any]]:
    """Adam on ``params`` (leaf tensors that ``hooks`` read) with the model frozen, minimising
    next-token loss on queries i >= from_query of seeded mini-batches of ``tokens``. With
    ``validation``, the parameters with the lowest validation loss are kept (step 0: the start)
    and the fit stops after ``patience`` steps without improvement; otherwise the last step.
    Returns the kept values of ``params`` (on the CPU) and the fit log."""
    device = next(model.parameters()).device
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)

    tqdm = progress_bar()

    def loss_of(batch: Tensor) -> Tensor:
        with model.hooks(fwd_hooks=hooks):
            logits = model(batch, return_type="logits")
        return torch.nn.functional.cross_entropy(
            logits[:, from_query:-1].flatten(0, 1).float(), batch[:, from_query + 1 :].flatten(), reduction="sum"
        ) / (batch.shape[0] * (batch.shape[1] - 1 - from_query))

    def validation_loss() -> float:
        with torch.no_grad():
            parts = [float(loss_of(validation[b : b + batch_size].to(device))) * len(validation[b : b + batch_size])
                     for b in range(0, validation.shape[0], batch_size)]
        return sum(parts) / validation.shape[0]

    def snapshot():
        return [p.detach().cpu().clone() for p in params]

    trained: list[float] = []  # this fit's steps (``history`` may already hold a caller's)
    validated: list[float] = []
    try:
        best, best_step = snapshot(), 0
        if validation is not None:
            validated.append(validation_loss())
        bar = tqdm(range(steps), desc=description, unit="step", disable=not progress)
        for step in bar:
            rows = torch.randperm(tokens.shape[0], generator=generator)[:batch_size]
            loss = loss_of(tokens[rows].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            trained.append(float(loss.detach()))
            history.append(trained[-1])
            if validation is None:
                bar.set_postfix(loss=f"{trained[-1]:.4f}")
                continue
            validated.append(validation_loss())
            if validated[-1] < validated[best_step]:
                best, best_step = snapshot(), step + 1
            bar.set_postfix(loss=f"{trained[-1]:.4f}", validation=f"{validated[-1]:.4f}")
            if step + 1 - best_step >= patience:
                break
        if validation is None:  # no split to choose by: the last step
            best, best_step = snapshot(), len(trained)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    log = {"steps_run": len(trained), "max_steps": steps, "kept_step": best_step, "train_loss": trained,
           "n_train": int(tokens.shape[0]),
           "n_validation": 0 if validation is None else int(validation.shape[0]),
           "validation_loss": validated, "patience": patience if validation is not None else None,
           "stopped_early": validation is not None and len(trained) < steps}
    return best, log


def _fit_by_gradient(model: Model, tokens, validation, layers, heads, logit, value, position, from_query, steps, lr,
                     batch_size, seed, patience, progress, history):
    """Adam on the slot's logit (and value) with the model frozen; see :func:`fit_constant_bias`.
    Returns the kept logit, value and the fit log."""
    device = next(model.parameters()).device
    logit = logit.clone().to(device).requires_grad_(True)
    params = [logit]
    if value is not None:
        value = value.clone().to(device).requires_grad_(True)
        params.append(value)
    hooks = bias_hooks(model, layers, heads, logit, value, True, position, from_query)
    best, log = fit_by_gradient(model, tokens, validation, params, hooks, from_query=from_query, steps=steps, lr=lr,
                                batch_size=batch_size, seed=seed, patience=patience, progress=progress,
                                history=history, description="fit constant bias")
    return best[0], best[1] if value is not None else None, log


