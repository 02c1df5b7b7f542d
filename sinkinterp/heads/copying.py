"""Circuit evidence for copying heads: the OV circuit and direct logit attribution."""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from sinkinterp._batches import (
    check_int,
    check_seed,
)
from sinkinterp.backends import Model
from sinkinterp.data import (
    allowed_ids,
    needle_prompts,
)
from sinkinterp.errors import SinkInterpError
from sinkinterp.heads.classify import top_heads
from sinkinterp.heads.scores import make_repeated
from sinkinterp.sites import check_head_pairs, head_pairs

# --------------------------------------------------------------------------------------------
# Circuit evidence for copying heads: the OV circuit and direct logit attribution


def _norm_weight(module) -> Tensor | None:
    """The elementwise weight a norm applies, or None where it was folded away (HookedTransformer
    with ``fold_ln``: ``LNPre`` / ``RMSNormPre`` have none)."""
    weight = getattr(module, "w", None)
    return weight.detach() if isinstance(weight, Tensor) else None


def _head_ov(model: Model, layer: int, head: int) -> tuple[Tensor, Tensor]:
    """``W_V`` [d_model d_head] (with the block's input-norm weight folded in) and ``W_O``
    [d_head d_model] of query head ``head``; its value weights are its kv group's."""
    attn = model.blocks[layer].attn
    w_v, w_o = attn.W_V.detach(), attn.W_O.detach()
    kv = head if w_v.shape[0] == model.cfg.n_heads else head // (model.cfg.n_heads // w_v.shape[0])
    w_v = w_v[kv].double()
    ln1 = _norm_weight(model.blocks[layer].ln1)
    if ln1 is not None:
        w_v = ln1.double()[:, None] * w_v
    return w_v, w_o[head].double()


def _unembed(model: Model) -> Tensor:
    """``W_U`` [d_model vocab] with the final norm's weight folded in."""
    w_u = model.W_U.detach().double()
    final = _norm_weight(model.ln_final)
    return w_u if final is None else final.double()[:, None] * w_u


def _check_heads(model: Model, heads) -> list[tuple[int, int]]:
    """Every head for None, else the (layer, head) pairs checked against the model."""
    if heads is None:
        return [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    pairs = head_pairs("heads", heads)
    if not pairs:
        raise SinkInterpError("heads is empty: name at least one (layer, head) pair, or None for all")
    return check_head_pairs(model, pairs)


def ov_copying_scores(model: Model, heads=None, *, n_tokens: int = 200, seed: int = 0) -> pd.DataFrame:
    """How much each head's OV circuit copies: the token-to-logit map ``W_E W_V W_O W_U``
    (Elhage et al. 2021) read directly from the weights, norm weights folded in, norm scales and
    everything between embedding and head ignored (a first-order, layer-0 view for later heads).

    ``ov_eigen``: the sum of its eigenvalues over the sum of their absolute values, in [-1, 1]
    (+1: a pure copying map, -1: anti-copying, ~0: neither); computed from the d_head x d_head
    matrix ``W_O W_U W_E W_V``, which has the same non-zero eigenvalues. ``ov_top1`` / ``ov_top5``:
    the share of ``n_tokens`` seeded non-special tokens whose own logit is the largest (in the top
    5) of the vocabulary in their row of the map (ARENA's "full OV circuit" test); chance is
    1 / vocab and 5 / vocab.
    """
    check_int("n_tokens", n_tokens, 1)
    check_seed(seed)
    chosen = _check_heads(model, heads)

    allowed = allowed_ids(model)
    generator = torch.Generator().manual_seed(seed)
    sample = allowed[torch.randperm(len(allowed), generator=generator)[: min(n_tokens, len(allowed))]]
    w_e = model.W_E.detach().double()
    w_u = _unembed(model)
    ue = w_u @ w_e  # [d_model d_model]: unembed after embed, summed over the vocabulary
    rows = []
    with torch.no_grad():
        for layer, head in chosen:
            w_v, w_o = _head_ov(model, layer, head)
            eigen = torch.linalg.eigvals(w_o @ ue @ w_v)
            circuit = (w_e[sample] @ w_v) @ (w_o @ w_u)  # [tokens vocab]
            own = circuit.gather(1, sample[:, None])
            rank = (circuit > own).sum(dim=1)  # how many logits beat the token's own
            rows.append({"layer": layer, "head": head,
                         "ov_eigen": float(eigen.real.sum() / eigen.abs().sum().clamp(min=1e-30)),
                         "ov_top1": float((rank == 0).double().mean()),
                         "ov_top5": float((rank < 5).double().mean())})
    frame = pd.DataFrame(rows)
    frame.attrs.update(n_tokens=len(sample), seed=seed)
    return frame


def logit_attribution(model: Model, tokens: Int[Tensor, "batch pos"], rows: Tensor, queries: Tensor, targets: Tensor,
                      *, batch_size: int = 4) -> Tensor:
    """Direct logit attribution per step and head: ``[steps, layers, heads]``, each head's output
    at (row, query) (``z W_O``) through the final norm, with the norm's scale as measured in that
    forward pass (the linearisation everyone uses), onto the unembedding of ``tokens[row, target]``
    minus the mean unembedding (the logit's move against the average token). Adding the other
    components' terms would give the logit; a head's term is its direct effect only (what later
    layers do with its output is not counted)."""
    n_layers = model.cfg.n_layers
    centre = getattr(model.cfg, "normalization_type", "RMS") in ("LN", "LNPre")
    w_u = _unembed(model).float()
    w_u = w_u - w_u.mean(dim=1, keepdim=True)
    out = torch.zeros(len(rows), n_layers, model.cfg.n_heads)
    device = next(model.parameters()).device
    w_o = [model.blocks[l].attn.W_O.detach().float() for l in range(n_layers)]
    for start in range(0, tokens.shape[0], batch_size):
        chosen = torch.nonzero((rows >= start) & (rows < start + batch_size), as_tuple=True)[0]
        if not len(chosen):
            continue
        r, q = (rows[chosen] - start).to(device), queries[chosen].to(device)
        kept: dict[str, Tensor] = {}

        def keep(x: Tensor, hook) -> None:
            kept[hook.name] = x[r, q].detach().float()

        hooks = [(f"blocks.{l}.attn.hook_z", keep) for l in range(n_layers)] + [("ln_final.hook_scale", keep)]
        with torch.inference_mode(), model.hooks(fwd_hooks=hooks):
            model(tokens[start : start + batch_size].to(device), return_type=None)
        scale = kept["ln_final.hook_scale"]  # [steps 1]
        direction = w_u[:, tokens[rows[chosen], targets[chosen]].to(device)].T  # [steps d_model]
        for layer in range(n_layers):
            written = torch.einsum("shd,hdm->shm", kept[f"blocks.{layer}.attn.hook_z"], w_o[layer])
            if centre:
                written = written - written.mean(dim=-1, keepdim=True)
            out[chosen, layer] = torch.einsum("shm,sm->sh", written / scale[:, None], direction).cpu()
    return out


def copying_evidence(model: Model, table: pd.DataFrame | None = None, *, k: int = 5, seed: int = 0, n_seqs: int = 16,
                     half_len: int = 64, n_prompts: int = 8, context_len: int = 512, n_tokens: int = 200,
                     batch_size: int = 4) -> pd.DataFrame:
    """Weights-and-activations evidence that heads copy, for every head: the OV copying scores
    (:func:`ov_copying_scores`) and the mean direct logit attribution to the correct next token
    on held-out data (seeds ``seed + 1000`` on, as :func:`validate_heads`): ``dla_induction`` on
    the second half of repeated random tokens, ``dla_needle`` on the teacher-forced reproduction
    of the needle (``n_prompts`` prompts of ``context_len`` tokens; 0 skips it, for models without a
    tokenizer). With ``table`` (from :func:`classify_heads`), ``role`` marks the top-``k``
    induction and recall heads, so they can be compared with the rest (``attrs["by_role"]``:
    medians per role). A copying head should have a positive OV eigenvalue score and a positive
    direct effect on the token it copies; attention alone shows neither.
    """
    check_int("k", k, 1)
    check_seed(seed)
    check_int("n_prompts", n_prompts, 0)
    top: dict[str, set] = {"induction": set(), "recall": set()}
    if table is not None:  # checked before any forward pass
        if not isinstance(table, pd.DataFrame):
            raise SinkInterpError(f"table must be the DataFrame from classify_heads or None, got {type(table).__name__}")
        for label in ("recall", "induction"):
            if label not in table.columns:
                raise SinkInterpError(f"the table has no {label!r} score: classify with that scorer first")
        top = {label: set(top_heads(table, label, k)) for label in top}
    frame = ov_copying_scores(model, n_tokens=n_tokens, seed=seed)
    eval_seed = seed + 1000

    def per_head(values: Tensor, step_rows: Tensor, n: int) -> list[float]:
        """Mean over steps within each sequence, then over sequences, per (layer, head) row of frame."""
        sums = torch.zeros(n, *values.shape[1:]).index_add_(0, step_rows, values)
        means = sums / torch.bincount(step_rows, minlength=n).clamp(min=1)[:, None, None]
        return [float(means[:, l, h].mean()) for l, h in zip(frame["layer"], frame["head"])]

    repeated = make_repeated(model, n_seqs, half_len, eval_seed)
    steps = repeated.induction_steps()
    frame["dla_induction"] = per_head(logit_attribution(model, repeated.tokens, *steps, batch_size=batch_size),
                                      steps[0], n_seqs)
    data: dict[str, Any] = {"repeated": {"n_seqs": n_seqs, "half_len": half_len, "seed": eval_seed}}
    columns = ["ov_eigen", "ov_top1", "dla_induction"]
    if n_prompts:
        needle = needle_prompts(model, n_prompts, context_len, seed=eval_seed)
        steps = needle.answer_steps()
        frame["dla_needle"] = per_head(logit_attribution(model, needle.tokens, *steps, batch_size=batch_size),
                                       steps[0], n_prompts)
        data["needle"] = needle.to_dict()
        columns.append("dla_needle")
    frame["role"] = ["+".join(label for label in ("induction", "recall") if (int(l), int(h)) in top[label]) or "other"
                     for l, h in zip(frame["layer"], frame["head"])]
    frame.attrs.update(
        k=k, seed=seed, n_tokens=n_tokens, data=data,
        by_role=frame.groupby("role")[columns].median().reset_index().to_dict(orient="records"),
    )
    return frame


