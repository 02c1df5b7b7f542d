"""Forward passes for experiments: per-sequence metrics, and fast per-layer / per-head sweeps.

An intervention at layer l leaves layers < l unchanged, so a sweep variant does not need a full
forward: the clean run's ``blocks.{l}.hook_resid_pre`` is cached once per mini-batch and every
variant at layer l starts there (TransformerLens ``start_at_layer``, with a shortformer's
positional embedding passed along), where the model can resume without rerunning the earlier
layers (HookedTransformer; TransformerLens 4's bridge accepts ``start_at_layer`` but reruns them,
and 3.9's refuses it: those start every variant from the tokens). Either way, variants at the same
layer are stacked along the batch dimension (each variant's hooks act on its own rows) and share
one forward. :func:`naive_sweep` is the reference: one full forward per variant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from sinkinterp._batches import progress_bar
from sinkinterp._deprecated import renamed_option
from sinkinterp.backends import Model, capabilities, final_logits, resume
from sinkinterp.errors import SinkInterpError
from sinkinterp.evaluate import Evaluator, log_probs, token_metrics
from sinkinterp.interventions import Hook, Intervention

__all__ = ["sweep_variants", "restrict", "fast_sweep", "naive_sweep", "Variant"]

#: Largest logits tensor the fast sweep builds at once (several stacked variants per unembedding).
UNEMBED_BYTES = 1024**3

@dataclasses.dataclass(frozen=True)
class Variant:
    """One sweep point: its label (layer, and head for head sweeps) and its interventions."""

    layer: int
    head: int | None
    interventions: tuple[Intervention, ...]

    @property
    def label(self) -> dict[str, int]:
        return {"layer": self.layer} if self.head is None else {"layer": self.layer, "head": self.head}


def restrict(intervention: Intervention, model: Model, layer: int, head: int | None = None) -> Intervention | None:
    """``intervention`` at one layer (and head), or None if it does not act there: its stored
    arrays are sliced along the axes its type declares (``Intervention.restrict``)."""
    return intervention.restrict(model, layer, head)


def sweep_variants(model: Model, interventions: Iterable[Intervention], sweep: str) -> list[Variant]:
    """One variant per layer (``"layers"``) or per (layer, head) (``"heads"``) that every
    intervention of the condition acts on."""
    interventions = tuple(interventions)
    variants = []
    for layer in range(model.cfg.n_layers):
        for head in ([None] if sweep == "layers" else range(model.cfg.n_heads)):
            restricted = [restrict(iv, model, layer, head) for iv in interventions]
            if restricted and all(r is not None for r in restricted):
                variants.append(Variant(layer, head, tuple(restricted)))
    if not variants:
        raise SinkInterpError(f"the {sweep} sweep has no variant: no layer is shared by all its interventions")
    return variants


def _stacked(hook_lists: list[list[Hook]], rows: int) -> list[Hook]:
    """Hooks for variants stacked along the batch: variant v owns rows [v*rows, (v+1)*rows)."""
    by_name: dict[str, list[tuple[int, Callable]]] = {}
    for v, hooks in enumerate(hook_lists):
        for name, fn in hooks:
            by_name.setdefault(name, []).append((v, fn))

    def make(entries):
        def hook(x, hook):
            parts = list(x.split(rows, dim=0))
            for v, fn in entries:
                out = fn(parts[v], hook=hook)
                if out is not None:
                    parts[v] = out
            return torch.cat(parts, dim=0)

        return hook

    return [(name, make(entries)) for name, entries in by_name.items()]


def fast_sweep(model: Model, tokens: Tensor, variants: list[Variant], *, from_query: int | None = None,
               metrics=("loss",), batch_size: int = 8, max_rows: int = 64, progress: bool = False,
               loss_from: int | None = None) -> list[dict[str, Tensor]]:
    """Per-variant per-sequence metrics, starting each variant at its layer from the cached clean
    residual where the model can resume there (else from the tokens), with variants of one layer
    stacked up to ``max_rows`` rows per forward. ``loss_from`` is the old name of ``from_query``."""
    loss_from = _from_query("fast_sweep", from_query, loss_from)
    tqdm = progress_bar()
    resumable = capabilities(model).start_at_layer_skips_earlier_layers
    starts = sorted({v.layer for v in variants})
    results: list[dict[str, list[Tensor]]] = [{} for _ in variants]
    bar = tqdm(total=len(variants) * -(-tokens.shape[0] // batch_size), desc="sweep", unit="variant",
               disable=not progress, leave=False)
    n_scored = tokens.shape[1] - 1 - loss_from
    with torch.inference_mode():
        for begin in range(0, tokens.shape[0], batch_size):
            batch = tokens[begin:begin + batch_size]
            rows = batch.shape[0]
            cached: dict[int, Tensor] = {}

            def keeper(layer: int):
                def keep(x, hook):
                    cached[layer] = x.clone()
                return keep

            keepers = [(f"blocks.{l}.hook_resid_pre", keeper(l)) for l in starts] if resumable else []
            clean_lp = None
            if "kl" in metrics:
                logits = model.run_with_hooks(batch, return_type="logits", fwd_hooks=keepers)
                clean_lp = log_probs(logits[:, loss_from:-1])
                del logits
            elif resumable:  # only the cached residuals are needed: stop after the last start layer
                model.run_with_hooks(batch, fwd_hooks=keepers, stop_at_layer=starts[-1] + 1)
            # A larger unembedding GEMM is ~2x faster per row here, so several variants share one;
            # each logits tensor stays under UNEMBED_BYTES (a resumed model unembeds the scored
            # queries only, the others every position).
            per_variant = rows * (n_scored if resumable else batch.shape[1]) * model.cfg.d_vocab * 4
            step = max(1, UNEMBED_BYTES // per_variant)
            per_forward = max(1, max_rows // rows) if resumable else max(1, min(max_rows // rows, step))
            for layer in starts:
                group = [i for i, v in enumerate(variants) if v.layer == layer]
                for chunk_start in range(0, len(group), per_forward):
                    chunk = group[chunk_start:chunk_start + per_forward]
                    hook_lists = [[h for iv in variants[i].interventions for h in iv.hooks(model)] for i in chunk]
                    with model.hooks(fwd_hooks=_stacked(hook_lists, rows)):
                        if resumable:
                            final = resume(model, cached[layer].repeat(len(chunk), 1, 1), layer, tokens=batch,
                                           stop_at_layer=model.cfg.n_layers)
                        else:
                            everything = model(batch.repeat(len(chunk), 1))[:, loss_from:-1]
                    for first in range(0, len(chunk), step):
                        ids = chunk[first:first + step]
                        part_rows = slice(first * rows, (first + len(ids)) * rows)
                        logits = (final_logits(model, final[part_rows, loss_from:-1]) if resumable
                                  else everything[part_rows])
                        for k, i in enumerate(ids):
                            part = logits[k * rows:(k + 1) * rows]
                            for name, value in token_metrics(part, batch, loss_from, metrics, clean_lp).items():
                                results[i].setdefault(name, []).append(value)
                        del logits
                    bar.update(len(chunk))
    bar.close()
    return [{name: torch.cat(parts) for name, parts in r.items()} for r in results]


def naive_sweep(model: Model, tokens: Tensor, variants: list[Variant], *, from_query: int | None = None,
                metrics=("loss",), batch_size: int = 8, progress: bool = False,
                loss_from: int | None = None) -> list[dict[str, Tensor]]:
    """The reference: one full forward per variant and mini-batch, through the evaluation engine
    (:class:`~sinkinterp.evaluate.Evaluator`), as :func:`~sinkinterp.evaluate` computes it."""
    from_query = _from_query("naive_sweep", from_query, loss_from)
    engine = Evaluator(model, tokens, metrics=metrics, from_query=from_query, batch_size=batch_size)
    if "kl" in metrics:
        engine.run((), clean=True)  # the KL reference, kept per batch when it fits
    tqdm = progress_bar()
    return [engine.run(variant.interventions) for variant in tqdm(variants, desc="naive sweep", disable=not progress,
                                                                   leave=False)]


def _from_query(owner: str, from_query: int | None, loss_from: int | None) -> int:
    if loss_from is not None:
        renamed_option(owner, "loss_from", "from_query", stacklevel=4)
        if from_query is not None and from_query != loss_from:
            raise SinkInterpError(f"{owner}: from_query {from_query} and loss_from {loss_from} disagree (one name "
                                  "for the query cut: from_query)")
        from_query = loss_from
    if from_query is None:
        raise SinkInterpError(f"{owner} needs from_query (the first scored query)")
    return from_query
