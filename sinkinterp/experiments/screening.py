"""A fast screen of every per-head intervention by attribution patching, and its exact check.

:func:`screen` estimates, for every (layer, head) an intervention can be restricted to, the change
in next-token loss that applying it to that head alone would cause, from one forward and one
backward pass of the clean model plus one forward with the intervention applied everywhere:

    delta_loss(l, h)  ~=  sum over positions of  dL/dz[l, :, h] . (z'[l, :, h] - z[l, :, h])

``z`` is the head's output (``hook_z``) and ``z'`` the head's output under the intervention, from
the clean inputs of its layer. This is attribution patching (Nanda 2023) taken at the head's
output, with ``z'`` computed exactly rather than linearised: the attention softmax of the patched
head is recomputed (the intervention's own hooks run on the clean scores and pattern), which is the
fix AtP* (Kramár et al. 2024) makes for saturated attention. A sink head puts most of its weight
on one key, where the softmax's gradient is nearly zero and a linear estimate of masking that key
(a logit change of -inf) is meaningless; the exact ``z'`` has neither problem. What stays linear
is the rest of the network after the head: a large change in ``z`` (masking a key that holds 90%
of the attention) can still be mis-estimated there, which is why :meth:`Screen.confirm` reruns the
top hits exactly.

Per-head interventions do not interact within a layer (each edits its own head's scores, pattern
or output), so one forward with the intervention on every head gives every head's ``z'`` at
once. That forward puts each layer's clean ``z`` back after reading ``z'``, so every layer sees
clean inputs, as each single-head variant would.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import torch
from torch import Tensor

from sinkinterp._batches import check_int, check_tokens, progress_bar
from sinkinterp.backends import Model
from sinkinterp.errors import SinkInterpError
from sinkinterp.evaluate import token_metrics
from sinkinterp.experiments.sweep import Variant, fast_sweep, sweep_variants
from sinkinterp.interventions import Intervention
from sinkinterp.stats import bootstrap_mean

__all__ = ["screen", "Screen", "sweep_table", "agreement", "spearman", "SCREEN_HOOKS"]

#: The hook points a screened intervention may edit: its head's attention, up to and including z.
#: Whatever it changes there reaches the rest of the model only through ``hook_z``.
SCREEN_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_attn_scores", "hook_pattern",
                "hook_z")
_HOOK = re.compile(r"blocks\.(\d+)\.attn\.(\w+)$")


def sweep_table(variants: list[Variant], results: list[dict[str, Tensor]], clean: Tensor, *,
                seed: int = 0, n_resamples: int = 2000):
    """A per-head (or per-layer) sweep as a pandas DataFrame, one row per variant: ``layer``,
    ``head``, the mean loss change over sequences ``delta`` and its bootstrap interval
    (``low``, ``high``), largest ``delta`` first. ``results`` are per-variant per-sequence losses
    (:func:`~sinkinterp.experiments.sweep.fast_sweep`'s form, or :attr:`Screen.results`) and
    ``clean`` the clean per-sequence loss."""
    import pandas as pd

    rows = []
    for variant, result in zip(variants, results):
        delta = result["loss"].double() - clean.double()
        estimate = bootstrap_mean(delta, n_resamples=n_resamples, seed=seed)
        rows.append({**variant.label, "delta": estimate.value, "low": estimate.low, "high": estimate.high})
    frame = pd.DataFrame(rows)
    return frame.sort_values("delta", ascending=False, kind="stable").reset_index(drop=True)


@dataclasses.dataclass
class Screen:
    """Attribution-patching estimates of one intervention per (layer, head); see :func:`screen`.

    ``estimates[v, b]`` is the estimated loss change of ``variants[v]`` on sequence b, ``clean[b]``
    the clean loss (mean over queries >= ``from_query``). :attr:`results` has the exact sweep's
    form; :meth:`table` ranks; :meth:`confirm` runs the exact sweep on the top hits."""

    model: Model = dataclasses.field(repr=False)
    tokens: Tensor = dataclasses.field(repr=False)
    intervention: Intervention
    variants: list[Variant] = dataclasses.field(repr=False)
    estimates: Tensor = dataclasses.field(repr=False)
    perturbation: Tensor = dataclasses.field(repr=False)
    """[variant]: ||z' - z|| / ||z|| of the head over every sequence and position: how far from the
    clean point the linear estimate is taken (1 or more: not a small perturbation)."""
    clean: Tensor = dataclasses.field(repr=False)
    from_query: int
    batch_size: int
    seconds: float

    @property
    def results(self) -> list[dict[str, Tensor]]:
        """Per-variant per-sequence estimated losses (clean + estimate), as the exact sweep gives."""
        return [{"loss": self.clean + row} for row in self.estimates]

    def mean(self) -> Tensor:
        """The estimated loss change per variant, averaged over sequences."""
        return self.estimates.mean(dim=1)

    def table(self, *, seed: int = 0):
        """The estimates as :func:`sweep_table` gives an exact sweep (largest first)."""
        return sweep_table(self.variants, self.results, self.clean, seed=seed)

    def top(self, k: int, *, largest: int = 0) -> list[Variant]:
        """The ``k`` variants with the largest estimated loss increase, largest first; then the
        ``largest`` variants with the largest :attr:`perturbation` not already among them (where
        the linear estimate is least to be trusted)."""
        check_int("top_k", k, 1)
        check_int("largest", largest)
        order = torch.argsort(self.mean(), descending=True, stable=True)[:k].tolist()
        by_size = [i for i in torch.argsort(self.perturbation, descending=True, stable=True).tolist()
                   if i not in order][:largest]
        return [self.variants[i] for i in order + by_size]

    def confirm(self, top_k: int = 10, *, largest: int = 0, max_rows: int = 64, progress: bool = False):
        """Run the exact (fast) sweep on the ``top_k`` highest-ranked variants, and on the
        ``largest`` others with the largest perturbation (:meth:`top`), on the screen's own
        tokens. A DataFrame, in that order: ``layer``, ``head``, ``rank`` (by estimate),
        ``perturbation``, ``estimate`` (the screen's mean loss change), ``exact`` with its
        interval (``low``, ``high``) and ``error`` = estimate - exact."""
        import pandas as pd

        chosen = self.top(top_k, largest=largest)
        exact = fast_sweep(self.model, self.tokens, chosen, from_query=self.from_query, metrics=("loss",),
                           batch_size=self.batch_size, max_rows=max_rows, progress=progress)
        means = self.mean()
        rank_of = torch.empty(len(means), dtype=torch.long)
        rank_of[torch.argsort(means, descending=True, stable=True)] = torch.arange(1, len(means) + 1)
        index = {(v.layer, v.head): i for i, v in enumerate(self.variants)}
        rows = []
        for variant, result in zip(chosen, exact):
            i = index[variant.layer, variant.head]
            delta = bootstrap_mean(result["loss"].double() - self.clean, seed=0)
            estimate = float(means[i])
            rows.append({**variant.label, "rank": int(rank_of[i]), "perturbation": float(self.perturbation[i]),
                         "estimate": estimate, "exact": delta.value, "low": delta.low, "high": delta.high,
                         "error": estimate - delta.value})
        return pd.DataFrame(rows)

    def validate(self, exact: list[dict[str, Tensor]] | None = None, *, max_rows: int = 64,
                 progress: bool = False) -> dict[str, Any]:
        """How well the screen ranks the heads: :func:`agreement` with the exact sweep of every
        variant (run here on the screen's tokens unless ``exact`` per-variant results are given)."""
        if exact is None:
            exact = fast_sweep(self.model, self.tokens, self.variants, from_query=self.from_query, metrics=("loss",),
                               batch_size=self.batch_size, max_rows=max_rows, progress=progress)
        if len(exact) != len(self.variants):
            raise SinkInterpError(f"validate: {len(exact)} exact results for {len(self.variants)} variants")
        exact_mean = torch.stack([r["loss"].double() - self.clean for r in exact]).mean(dim=1)
        return agreement(self.variants, self.mean(), exact_mean, perturbation=self.perturbation)

    def to_dict(self) -> dict[str, Any]:
        """What a results file keeps: the intervention, the per-sequence estimates per variant."""
        return {"method": "screen", "intervention": self.intervention.to_dict(), "from_query": self.from_query,
                "seconds": round(self.seconds, 3), "clean": self.clean.tolist(),
                "variants": [{**v.label, "estimate": row.tolist(), "perturbation": float(size)}
                             for v, row, size in zip(self.variants, self.estimates, self.perturbation)]}


def _ranks(values: Tensor) -> Tensor:
    """Average ranks (ties share the mean of their ranks), 0-based."""
    order = torch.argsort(values, stable=True)
    ranks = torch.empty(len(values), dtype=torch.float64)
    ranks[order] = torch.arange(len(values), dtype=torch.float64)
    for value in values.unique():
        tied = values == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two equal-length 1-d tensors (Pearson's on average ranks)."""
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise SinkInterpError(f"spearman needs two 1-d tensors of one length >= 2, got {tuple(a.shape)} and "
                              f"{tuple(b.shape)}")
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float((ra.square().sum() * rb.square().sum()).sqrt())
    return float((ra * rb).sum()) / denominator if denominator > 0 else float("nan")


def agreement(variants: list[Variant], estimate: Tensor, exact: Tensor, *, ks: tuple[int, ...] = (10, 20),
              n_misses: int = 5, perturbation: Tensor | None = None) -> dict[str, Any]:
    """How an estimated per-variant loss change ranks the variants against the exact one: Spearman's
    rank correlation, the overlap of the top-k sets (largest increase first, as a fraction of k),
    and the ``n_misses`` variants with the largest |estimate - exact|. With ``perturbation``
    (:attr:`Screen.perturbation`), also ``top{k}_recall_with_largest``: the share of the exact
    top k found among the estimate's top k plus the k largest perturbations (what
    ``confirm(k, largest=k)`` reruns), and each miss's perturbation."""
    if not len(variants) == len(estimate) == len(exact):
        raise SinkInterpError(f"agreement: {len(variants)} variants, {len(estimate)} estimates, {len(exact)} exact")
    estimate, exact = estimate.double(), exact.double()
    out: dict[str, Any] = {"n_variants": len(variants), "spearman": spearman(estimate, exact)}
    by_estimate = torch.argsort(estimate, descending=True, stable=True)
    by_exact = torch.argsort(exact, descending=True, stable=True)
    for k in ks:
        if k <= len(variants):
            shared = set(by_estimate[:k].tolist()) & set(by_exact[:k].tolist())
            out[f"top{k}_overlap"] = len(shared) / k
            if perturbation is not None:
                by_size = torch.argsort(perturbation, descending=True, stable=True)
                rerun = [i for i in by_size.tolist() if i not in set(by_estimate[:k].tolist())][:k]
                found = (set(by_estimate[:k].tolist()) | set(rerun)) & set(by_exact[:k].tolist())
                out[f"top{k}_recall_with_largest"] = len(found) / k
    exact_rank = torch.empty(len(exact), dtype=torch.long)
    exact_rank[by_exact] = torch.arange(1, len(exact) + 1)
    estimate_rank = torch.empty(len(exact), dtype=torch.long)
    estimate_rank[by_estimate] = torch.arange(1, len(exact) + 1)
    worst = torch.argsort((estimate - exact).abs(), descending=True, stable=True)[:n_misses]
    out["misses"] = [{**variants[i].label, "estimate": float(estimate[i]), "exact": float(exact[i]),
                      "estimate_rank": int(estimate_rank[i]), "exact_rank": int(exact_rank[i]),
                      **({} if perturbation is None else {"perturbation": float(perturbation[i])})}
                     for i in worst.tolist()]
    return out


def _check_screenable(model: Model, intervention: Intervention) -> None:
    if not isinstance(intervention, Intervention):
        raise SinkInterpError(f"screen takes an Intervention (applied to every head it names), got "
                              f"{type(intervention).__name__}")
    if not type(intervention).HEAD_SWEEP:
        raise SinkInterpError(f"screen cannot estimate {type(intervention).__name__} head by head: it is not a "
                              "per-head intervention (HEAD_SWEEP types act on one head's scores, pattern or output)")
    for name, _ in intervention.hooks(model):
        match = _HOOK.match(name)
        if match is None or match.group(2) not in SCREEN_HOOKS:
            raise SinkInterpError(f"screen: {type(intervention).__name__} edits {name!r}; a screened intervention "
                                  f"may edit only its heads' attention ({', '.join(SCREEN_HOOKS)})")


def screen(model: Model, tokens: Tensor, intervention: Intervention, *, from_query: int, batch_size: int = 8,
           progress: bool = False) -> Screen:
    """Estimate the loss change of ``intervention`` restricted to each (layer, head) it acts on,
    by attribution patching with the head's attention recomputed exactly (module docstring).

    ``intervention`` is a per-head type (``AblateSinkValue``, ``MaskSinkKey``,
    ``ConstantAttentionBias``, ``AblateHeads``, ...) naming the heads to screen (all of them by
    default). Loss is next-token loss at queries >= ``from_query``, per sequence, as in
    :func:`~sinkinterp.experiments.sweep.fast_sweep`. Costs per mini-batch: one forward with its
    backward, and one forward under the intervention."""
    check_tokens(model, tokens)
    check_int("from_query", from_query)
    check_int("batch_size", batch_size, 1)
    if from_query > tokens.shape[1] - 2:
        raise SinkInterpError(f"from_query {from_query} leaves no scored query in sequences of {tokens.shape[1]} "
                              f"tokens (at most {tokens.shape[1] - 2})")
    _check_screenable(model, intervention)
    variants = sweep_variants(model, [intervention], "heads")
    layers = sorted({v.layer for v in variants})
    started = time.perf_counter()
    tqdm = progress_bar()
    estimates, clean = [], []
    change = torch.zeros(len(variants), dtype=torch.float64)  # sum of ||z' - z||^2 per variant
    size = torch.zeros(len(variants), dtype=torch.float64)  # sum of ||z||^2
    for begin in tqdm(range(0, tokens.shape[0], batch_size), desc="screen", unit="batch", disable=not progress,
                      leave=False):
        batch = tokens[begin:begin + batch_size]
        loss, z, grads = _clean_gradients(model, batch, layers, from_query)
        deltas = _patched_deltas(model, batch, intervention, layers, z)
        per_head = {layer: torch.einsum("bphd,bphd->bh", grads[layer].double(), deltas[layer].double())
                    for layer in layers}
        estimates.append(torch.stack([per_head[v.layer][:, v.head] for v in variants]))
        clean.append(loss)
        for i, v in enumerate(variants):
            change[i] += float(deltas[v.layer][:, :, v.head].double().square().sum())
            size[i] += float(z[v.layer][:, :, v.head].double().square().sum())
    return Screen(model=model, tokens=tokens, intervention=intervention, variants=variants,
                  estimates=torch.cat(estimates, dim=1), perturbation=(change / size.clamp(min=1e-30)).sqrt(),
                  clean=torch.cat(clean), from_query=from_query,
                  batch_size=batch_size, seconds=time.perf_counter() - started)


def _clean_gradients(model: Model, batch: Tensor, layers: list[int], from_query: int):
    """The clean per-sequence loss, each layer's ``hook_z`` and the loss's gradient there.

    The sum of per-sequence losses is differentiated: sequences do not mix, so sequence b's rows of
    the gradient are those of its own loss."""
    z: dict[int, Tensor] = {}

    def start_graph(x, hook):  # the model may be frozen: the graph then starts at the embedding
        return x if x.requires_grad else x.detach().requires_grad_(True)

    def keep(layer: int):
        def hook(x, hook):  # returned, so that the tensor kept is the one the model goes on with (a
            z[layer] = x    # TransformerLens 4 bridge hands a hook a reshaped view of its own tensor)
            return x
        return hook

    hooks = [("hook_embed", start_graph)] + [(f"blocks.{layer}.attn.hook_z", keep(layer)) for layer in layers]
    with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
        logits = model(batch, return_type="logits")
        loss = token_metrics(logits[:, from_query:-1], batch, from_query, ("loss",))["loss"]
        missing = [layer for layer in layers if layer not in z or not z[layer].requires_grad]
        if missing:
            raise SinkInterpError(f"screen: no gradient reaches hook_z of layers {missing} on this model")
        grads = torch.autograd.grad(loss.sum(), [z[layer] for layer in layers])
    return loss.detach(), {layer: z[layer].detach() for layer in layers}, dict(zip(layers, grads))


def _patched_deltas(model: Model, batch: Tensor, intervention: Intervention, layers: list[int],
                    clean_z: dict[int, Tensor]) -> dict[int, Tensor]:
    """``z' - z`` per layer: the intervention on every head at once, each layer's clean ``z`` put
    back after reading ``z'`` (hooks on one hook point run in the order added, so the restoring
    hook runs after the intervention's own)."""
    deltas: dict[int, Tensor] = {}

    def restore(layer: int):
        def hook(x, hook):
            deltas[layer] = x - clean_z[layer]
            return clean_z[layer].clone()
        return hook

    hooks = intervention.hooks(model) + [(f"blocks.{layer}.attn.hook_z", restore(layer)) for layer in layers]
    with torch.inference_mode(), model.hooks(fwd_hooks=hooks):
        model(batch, return_type="logits")
    return deltas
