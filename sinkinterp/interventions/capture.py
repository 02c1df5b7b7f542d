"""Capture activations at hook points: what the fitted interventions average."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sinkinterp._batches import check_tokens
from sinkinterp.backends import Model
from sinkinterp.interventions.base import check_seq


def add_at(z: Tensor, delta: Tensor, from_query: int, heads: list[int] | slice) -> Tensor:
    """``z`` [batch pos head d] plus ``delta`` [batch pos-from_query len(heads) d] on those rows/heads."""
    z = z.clone()
    z[:, from_query:, heads] += delta.to(z.dtype)
    return z


def capture(model: Model, tokens: Tensor, hook: str, layers: list[int], position: int | None,
             select: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """A clean run's activation at ``blocks.{l}.{hook}`` for each layer: at ``position`` (batch
    first, so ``x[:, position]``), or reduced by ``select`` inside the hook so that only what is
    needed is kept (a full attention-score cache of every layer would not fit in memory)."""
    if position is not None:
        check_seq(position, tokens.shape[1], "reference")
        select = lambda x: x[:, position]  # noqa: E731
    return capture_all(model, tokens, layers, {hook: select})[hook]


def capture_all(model: Model, tokens: Tensor, layers: list[int],
                 selects: dict[str, Callable[[Tensor], Tensor] | None]) -> dict[str, Tensor]:
    """Several hooks' selections in one clean forward: {hook: [layer, ...]}."""
    check_tokens(model, tokens)
    kept: dict[tuple[str, int], Tensor] = {}

    def keeper(hook_name: str, layer: int):
        select = selects[hook_name]

        def keep(x, hook):
            kept[hook_name, layer] = (x if select is None else select(x)).detach().float().cpu()

        return keep

    hooks = [(f"blocks.{layer}.{name}", keeper(name, layer)) for name in selects for layer in layers]
    with torch.inference_mode():
        model.run_with_hooks(tokens, fwd_hooks=hooks, return_type=None)
    return {name: torch.stack([kept[name, layer] for layer in layers]) for name in selects}


