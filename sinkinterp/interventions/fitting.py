"""Fit the explicit sink slot: moments, or gradient steps with held-out early stopping."""

from __future__ import annotations

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
from sinkinterp.interventions.base import check_from_query, check_seq, ints_or_none
from sinkinterp.interventions.capture import capture_all
from sinkinterp.interventions.slot import SLOT_NEEDS, ConstantAttentionBias, bias_hooks
from sinkinterp.sites import as_kv, as_query_heads, resolve_heads, resolve_layers


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
        return logit.detach().cpu().clone(), None if value is None else value.detach().cpu().clone()

    trained: list[float] = []  # this fit's steps (``history`` may already hold a caller's)
    validated: list[float] = []
    try:
        hooks = bias_hooks(model, layers, heads, logit, value, True, position, from_query)
        best, best_step = snapshot(), 0
        if validation is not None:
            validated.append(validation_loss())
        bar = tqdm(range(steps), desc="fit constant bias", unit="step", disable=not progress)
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
    return best[0], best[1], log


