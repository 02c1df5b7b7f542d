"""Exact checks of sinkinterp on every family of the zoo, against TransformerLens's own hooks.

Each check runs one measurement or intervention on a tiny model of one family and compares it
with what the model's hook points say, computed here from raw hooks (never from sinkinterp). A
check ends in one of three ways:

* ``ok``: the numbers match;
* ``refused``: sinkinterp raised a :class:`SinkInterpError`. :func:`refusal_is_justified` then
  edits the same hook points by hand and confirms the edit really cannot work on this model;
* ``wrong``: an assertion failed. The test suite allows none.

``python -m tests.zoo_checks [--out docs/zoo.md]`` prints (or writes) the family x backend x
check table.
"""

from __future__ import annotations

import argparse
import functools
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from sinkinterp import SinkInterpError
from sinkinterp.backends import TL_VERSION, capabilities
from sinkinterp.data import random_tokens
from sinkinterp.experiments.sweep import fast_sweep, naive_sweep, sweep_variants
from sinkinterp.interventions import (
    AblateSinkValue,
    ConstantAttentionBias,
    EditMassiveChannels,
    MaskSinkKey,
    PatchFirstTokenResidual,
    ReplaceSinkKey,
    fit_constant_bias,
    intervene,
)
from sinkinterp.measure import qk_massive_values, qkv_geometry, sink_scores, value_weighted_attention

try:  # imported by pytest, which puts tests/ on the path, or run as `python -m tests.zoo_checks`
    import zoo
except ImportError:
    from tests import zoo

N_POS = 12
FROM_QUERY = 5


@functools.cache
def model_for(family: str, backend: str):
    return zoo.build(family, backend)


def _tokens(model) -> torch.Tensor:
    return random_tokens(model, 2, N_POS, seed=11)


def _capture(model, tokens, names: list[str], interventions=()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and the named activations after every intervention hook (names bound per hook: a
    bridge reports an aliased hook point under its canonical name)."""
    seen: dict[str, torch.Tensor] = {}

    def keeper(name):
        def keep(x, hook):
            seen[name] = x.detach().clone()

        return keep

    with torch.inference_mode(), intervene(model, *interventions), model.hooks(fwd_hooks=[(n, keeper(n)) for n in names]):
        logits = model(tokens)
    return logits, seen


def _seen(n_pos: int, key: int, window: int | None) -> list[int]:
    return [i for i in range(key, n_pos) if window is None or i - key < window]


def _close(a, b, atol: float, what: str) -> None:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    gap = float((a - b).abs().max()) if a.numel() else 0.0
    assert a.shape == b.shape and gap <= atol, f"{what}: max difference {gap:.3g} > {atol:g}"


def _windows(family: str) -> list[int | None]:
    return zoo.windows(family)


# --------------------------------------------------------------------------------------------
# The checks. Each takes (model, family); returns None or raises.


def check_alpha(model, family):
    """alpha[l, h, k] = mean of hook_pattern[:, h, i, k] over the queries that can see k."""
    tokens = _tokens(model)
    n_layers = model.cfg.n_layers
    _, seen = _capture(model, tokens, [f"blocks.{l}.attn.hook_pattern" for l in range(n_layers)])
    report = sink_scores(model, tokens)
    for layer, window in enumerate(_windows(family)):
        pattern = seen[f"blocks.{layer}.attn.hook_pattern"].double()
        invisible = ~torch.tensor([[j <= i and (window is None or i - j < window) for j in range(N_POS)]
                                   for i in range(N_POS)])
        assert float(pattern[:, :, invisible].abs().sum()) == 0, f"layer {layer}: attention outside the window"
        for key in (0, 3, 9):
            expected = pattern[:, :, _seen(N_POS, key, window), key].mean(dim=2).mean(dim=0)
            _close(report.alpha[layer, :, key], expected, 1e-6, f"alpha layer {layer} key {key}")
        share = pattern[:, :, _seen(N_POS, 0, window)[1:], 0].mean(dim=2).mean(dim=(0, 1))
        _close(report.first_token_share[layer], share, 1e-6, f"first-token share layer {layer}")


def _from_query(family: str) -> int:
    """FROM_QUERY, or less where every layer has a window so short that no later query sees key 0."""
    windows = [w for w in _windows(family)]
    if all(w is not None for w in windows):
        return min(FROM_QUERY, min(windows) - 2)
    return FROM_QUERY


def check_mask(model, family):
    """MaskSinkKey: column 0 is zero for queries >= from_query, those rows renormalise over the other
    keys, and the rows before are untouched."""
    tokens = _tokens(model)
    fq = _from_query(family)
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    clean_logits, clean = _capture(model, tokens, names)
    logits, masked = _capture(model, tokens, names, [MaskSinkKey(from_query=fq)])
    for name in names:
        _close(masked[name][:, :, :fq], clean[name][:, :, :fq], 1e-6, f"{name} rows before from_query")
        assert float(masked[name][:, :, fq:, 0].abs().max()) == 0, f"{name}: the masked column is not zero"
    first, after = clean[names[0]].double()[:, :, fq:], masked[names[0]].double()[:, :, fq:]
    # Renormalised over keys 1..: each row is the clean row without key 0, rescaled (a learned sink
    # keeps its share of the row, so compare shapes, not sums).
    expected = first[..., 1:] / first[..., 1:].sum(dim=-1, keepdim=True)
    got = after[..., 1:] / after[..., 1:].sum(dim=-1, keepdim=True)
    _close(got, expected, 1e-5, "layer 0 masked rows renormalised")
    assert not torch.allclose(logits, clean_logits), "masking the sink changed nothing"


def check_value_ablation(model, family):
    """AblateSinkValue(zero) changes layer 0's hook_z by exactly -A[i, 0] v_0 for i >= from_query."""
    tokens = _tokens(model)
    names = ["blocks.0.attn.hook_v", "blocks.0.attn.hook_pattern", "blocks.0.attn.hook_z"]
    _, clean = _capture(model, tokens, names)
    _, ablated = _capture(model, tokens, names[2:], [AblateSinkValue(layers=[0], from_query=FROM_QUERY)])
    v = clean["blocks.0.attn.hook_v"].double()
    v0 = v[:, 0].repeat_interleave(model.cfg.n_heads // v.shape[2], dim=1)  # [batch head d]
    a0 = clean["blocks.0.attn.hook_pattern"].double()[:, :, :, 0]  # [batch head query]
    z, z_clean = ablated["blocks.0.attn.hook_z"].double(), clean["blocks.0.attn.hook_z"].double()
    _close(z[:, :FROM_QUERY], z_clean[:, :FROM_QUERY], 0, "hook_z rows before from_query")
    expected = z_clean[:, FROM_QUERY:] - (a0[:, :, FROM_QUERY:, None] * v0[:, :, None, :]).transpose(1, 2)
    _close(z[:, FROM_QUERY:], expected, 1e-5, "hook_z after ablating the sink's value")


def check_slot_identity(model, family):
    """ConstantAttentionBias with logit -1e9 (slot weight 0) equals the clean run; with a large
    logit it moves the output."""
    tokens = _tokens(model)
    clean, _ = _capture(model, tokens, [])
    value = torch.ones(model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
    off, _ = _capture(model, tokens, [], [ConstantAttentionBias(logit=-1e9, value=value, replace_sink=False,
                                                                from_query=1)])
    _close(off, clean, 1e-5, "logits with a dead slot")
    on, _ = _capture(model, tokens, [], [ConstantAttentionBias(logit=30.0, value=value, replace_sink=False,
                                                               from_query=1)])
    assert not torch.allclose(on, clean, atol=1e-3), "a dominant slot changed nothing"


def check_fitted_slot(model, family):
    """fit_constant_bias gives a finite logit in every layer, sliding-window ones included."""
    tokens = random_tokens(model, 3, N_POS, seed=12)
    bias = fit_constant_bias(model, tokens, from_query=FROM_QUERY)
    logit = torch.tensor(bias.logit)
    assert bool(torch.isfinite(logit).all()), f"fitted slot logits {logit.tolist()}"
    with torch.inference_mode(), intervene(model, bias):
        assert bool(torch.isfinite(model(tokens)).all())


def check_massive_edit(model, family):
    """EditMassiveChannels(zero) changes hook_resid_post only at its channel and positions."""
    tokens = _tokens(model)
    name = "blocks.0.hook_resid_post"
    clean_logits, clean = _capture(model, tokens, [name])
    logits, edited = _capture(model, tokens, [name], [EditMassiveChannels(channels=(3,), positions=(0, 2),
                                                                          layers=[0], mode="zero")])
    x, x0 = edited[name], clean[name]
    assert float(x[:, [0, 2], 3].abs().max()) == 0, "the edited entries are not zero"
    keep = torch.ones_like(x, dtype=torch.bool)
    keep[:, [0, 2], 3] = False
    assert torch.equal(x[keep], x0[keep]), "an entry outside the edited channel changed"
    assert not torch.allclose(logits, clean_logits), "the edit changed nothing"


def check_first_token_patch(model, family):
    """PatchFirstTokenResidual with another first token equals running that token (layer 0 alone,
    and every layer)."""
    tokens = _tokens(model)
    token = int(tokens[0, 1])
    swapped = tokens.clone()
    swapped[:, 0] = token
    expected, _ = _capture(model, swapped, [])
    for layers in ([0], None):
        patch = PatchFirstTokenResidual.fit(model, token, layers=layers)
        got, _ = _capture(model, tokens, [], [patch])
        _close(got, expected, 1e-4, f"patched logits (layers={layers}) vs a real token swap")


def check_key_replacement(model, family):
    """ReplaceSinkKey(mean_other) writes the mean of the other keys into hook_k at the sink."""
    tokens = _tokens(model)
    replace = ReplaceSinkKey.fit(model, tokens, layers=[0])
    _, seen = _capture(model, tokens, ["blocks.0.attn.hook_k"], [replace])
    _, clean = _capture(model, tokens, ["blocks.0.attn.hook_k"])
    k, k0 = seen["blocks.0.attn.hook_k"].double(), clean["blocks.0.attn.hook_k"].double()
    expected = k0[:, 1:].mean(dim=1).mean(dim=0)  # [heads in the hook, d]
    _close(k[:, 0], expected.expand_as(k[:, 0]), 1e-5, "the replaced key")
    _close(k[:, 1:], k0[:, 1:], 0, "the other keys")


def _sink_column_matches(model, family, frame, hook: str, column: str, atol: float) -> None:
    """``frame[column]`` per (layer, head) is the mean of ``hook[..., i, 0]`` over the queries
    i >= 1 that can see key 0, then over sequences."""
    tokens = _tokens(model)
    _, seen = _capture(model, tokens, [f"blocks.{l}.attn.{hook}" for l in range(model.cfg.n_layers)])
    for layer, window in enumerate(_windows(family)):
        values = seen[f"blocks.{layer}.attn.{hook}"].double()
        expected = values[:, :, _seen(N_POS, 0, window)[1:], 0].mean(dim=2).mean(dim=0)
        _close(torch.tensor(frame[frame.layer == layer][column].to_numpy()), expected, atol, f"{column} layer {layer}")


def check_geometry(model, family):
    """qkv_geometry's logits are the mean hook_attn_scores over the queries that can see the key."""
    frame = qkv_geometry(model, _tokens(model))
    _sink_column_matches(model, family, frame, "hook_attn_scores", "logit_sink", 1e-4)
    assert bool(torch.isfinite(torch.tensor(frame.drop(columns=["layer", "head", "kv_head"]).to_numpy())).all())


def check_value_weighted(model, family):
    """value_weighted_attention's attention share is the mean A[i, 0] over queries that see it."""
    frame = value_weighted_attention(model, _tokens(model))
    _sink_column_matches(model, family, frame, "hook_pattern", "attn_sink_share", 1e-6)
    assert (frame.norm_sink_share.between(0, 1)).all()


def check_qk_values(model, family):
    """qk_massive_values: per-dimension RMS of hook_q / hook_k (and of the rotated ones where they fire)."""
    tokens = _tokens(model)
    values = qk_massive_values(model, tokens)
    _, seen = _capture(model, tokens, ["blocks.0.attn.hook_q", "blocks.0.attn.hook_k"])
    q = seen["blocks.0.attn.hook_q"].double()[:, 1:]
    _close(values.q_rms[0], q.pow(2).mean(dim=(0, 1)).sqrt(), 1e-5, "q RMS layer 0")
    if "blocks.0.attn.hook_rot_q" in model.hook_dict:
        rotated = qk_massive_values(model, tokens, rotated=True)
        assert float(rotated.q_rms.abs().max()) > 0, "rotated q RMS is all zero"


class NotApplicable(Exception):
    """The check does not apply to this model (e.g. ungrouping on a model without grouped heads)."""


def check_ungrouped_gqa(model, family):
    """After set_ungroup_grouped_query_attention(True) (hook_k/hook_v then hold one copy of each kv
    head per query head), every measurement and key/value intervention gives the grouped numbers."""
    n_kv = getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads
    if n_kv == model.cfg.n_heads or not hasattr(model, "set_ungroup_grouped_query_attention"):
        raise NotApplicable("no grouped-query attention" if n_kv == model.cfg.n_heads
                            else f"{type(model).__name__} has no set_ungroup_grouped_query_attention")
    tokens = _tokens(model)

    def everything(m):
        bias = fit_constant_bias(m, tokens, from_query=FROM_QUERY)
        interventions = [AblateSinkValue(from_query=FROM_QUERY), AblateSinkValue.fit(m, tokens, mode="mean"),
                         ReplaceSinkKey.fit(m, tokens), bias]
        logits = []
        for iv in interventions:
            with torch.inference_mode(), intervene(m, iv):
                logits.append(m(tokens))
        return (qkv_geometry(m, tokens), value_weighted_attention(m, tokens), qk_massive_values(m, tokens).k_rms,
                torch.tensor(bias.value), logits)

    grouped = everything(model)
    ungrouped_model = zoo.build(family, capabilities(model).backend)
    ungrouped_model.set_ungroup_grouped_query_attention(True)
    try:
        with torch.inference_mode():
            ungrouped_model(tokens)
    except Exception as e:  # TransformerLens's own forward, with no sinkinterp hook attached
        raise NotApplicable(f"TransformerLens itself cannot run this model ungrouped ({type(e).__name__}: {e})")
    ungrouped = everything(ungrouped_model)
    for name in ("geometry", "value_weighted"):
        a, b = (x[0 if name == "geometry" else 1] for x in (grouped, ungrouped))
        numbers = [c for c in a.columns if c not in ("layer", "head", "kv_head")]
        _close(torch.tensor(b[numbers].to_numpy()), torch.tensor(a[numbers].to_numpy()), 1e-5, name)
    _close(ungrouped[2], grouped[2], 1e-5, "k RMS")
    _close(ungrouped[3], grouped[3], 1e-5, "fitted slot value")
    for i, (a, b) in enumerate(zip(grouped[4], ungrouped[4])):
        _close(b, a, 1e-4, f"logits under intervention {i}")


def check_fast_sweep(model, family):
    """The fast sweep (resuming at each layer, variants stacked) equals one full forward per variant."""
    tokens = random_tokens(model, 3, N_POS, seed=13)
    variants = sweep_variants(model, [EditMassiveChannels(channels=(1, 3), mode="scale", factor=0.0)], "layers")
    fast = fast_sweep(model, tokens, variants, from_query=2, metrics=("loss", "kl"), batch_size=2, max_rows=4)
    naive = naive_sweep(model, tokens, variants, from_query=2, metrics=("loss", "kl"), batch_size=2)
    for f, n in zip(fast, naive):
        for name in ("loss", "kl"):
            _close(f[name], n[name], 1e-5, f"fast vs naive {name}")
    assert max(float(r["kl"].max()) for r in fast) > 1e-6, "the swept edit did nothing"


CHECKS: dict[str, Callable] = {
    "alpha": check_alpha,
    "mask": check_mask,
    "value_ablation": check_value_ablation,
    "slot_identity": check_slot_identity,
    "fitted_slot": check_fitted_slot,
    "massive_edit": check_massive_edit,
    "first_token_patch": check_first_token_patch,
    "key_replacement": check_key_replacement,
    "geometry": check_geometry,
    "value_weighted": check_value_weighted,
    "qk_values": check_qk_values,
    "fast_sweep": check_fast_sweep,
    "ungrouped_gqa": check_ungrouped_gqa,
}

# The hook points a check needs to *edit* (or to read as logits): what a refusal must be about.
EDITS = {
    "mask": ("attn.hook_attn_scores",),
    "value_ablation": ("attn.hook_z", "order"),
    "slot_identity": ("attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "order"),
    "fitted_slot": ("attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "order"),
    "key_replacement": ("attn.hook_k",),
    "geometry": ("scores", "rotary"),
    "qk_values": ("rotary",),
}


def run_check(family: str, backend: str, name: str) -> tuple[str, str]:
    """(outcome, detail): outcome is "ok", "refused", "n/a", "wrong" or "crash"."""
    model = model_for(family, backend)
    try:
        CHECKS[name](model, family)
    except SinkInterpError as e:
        return "refused", str(e)
    except NotApplicable as e:
        return "n/a", str(e)
    except AssertionError as e:
        return "wrong", str(e)
    except Exception as e:  # a raw crash (KeyError...) is a failure too, only not a silent one
        return "crash", f"{type(e).__name__}: {e}"
    return "ok", ""


def _raw_edit_reaches(model, suffix: str) -> bool:
    """Test-side, without sinkinterp: does a hand-made edit at blocks.0.{suffix} change the logits?"""
    tokens = _tokens(model)

    def edit(x, hook):
        x = x.clone()
        if suffix == "attn.hook_attn_scores":
            x[:, :, 1:, 0] = float("-inf")
        elif suffix == "attn.hook_pattern":
            x[:, :, 1:] = 0
        elif suffix == "attn.hook_k":
            x[:, 0] = 0
        else:
            x = x * 0
        return x

    # TransformerLens 4 warns when it discards such an edit: here that is the point.
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clean = model(tokens)
        edited = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.0.{suffix}", edit)])
    return not torch.equal(clean, edited)


def _hook_order_broken(model) -> bool:
    order: list[str] = []
    names = ["attn.hook_v", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z"]

    def keeper(name):
        return lambda x, hook: order.append(name)

    with torch.inference_mode():
        model.run_with_hooks(_tokens(model), fwd_hooks=[(f"blocks.0.{n}", keeper(n)) for n in names])
    return order != names and order != ["attn.hook_attn_scores", "attn.hook_v", "attn.hook_pattern", "attn.hook_z"]


def refusal_is_justified(family: str, backend: str, name: str) -> str | None:
    """Why the model really cannot take this check's edit (checked by hand), or None if it can."""
    model = model_for(family, backend)
    reasons = []
    for need in EDITS.get(name, ()):
        if need == "order":
            if _hook_order_broken(model):
                reasons.append("hook_z fires before hook_pattern")
        elif need == "scores":
            probs = False
            _, seen = _capture(model, _tokens(model), ["blocks.0.attn.hook_attn_scores", "blocks.0.attn.hook_pattern"])
            scores, pattern = seen["blocks.0.attn.hook_attn_scores"], seen["blocks.0.attn.hook_pattern"]
            probs = not torch.allclose(torch.softmax(scores.double(), -1),
                                       pattern.double() / pattern.double().sum(-1, keepdim=True), atol=1e-5)
            if probs:
                reasons.append("hook_attn_scores does not hold logits")
        elif need == "rotary":
            fired: list[str] = []
            if "blocks.0.attn.hook_rot_q" in model.hook_dict:
                with torch.inference_mode():
                    model.run_with_hooks(_tokens(model), fwd_hooks=[("blocks.0.attn.hook_rot_q",
                                                                     lambda x, hook: fired.append("q"))])
                if not fired:
                    reasons.append("hook_rot_q never fires")
        elif not _raw_edit_reaches(model, need):
            reasons.append(f"an edit at {need} does not reach the logits")
    return "; ".join(reasons) or None


def table() -> str:
    """The markdown table: one row per family, one column per backend x check."""
    version = ".".join(map(str, TL_VERSION))
    lines = [f"TransformerLens {version}: `ok` = matches TransformerLens's own hooks exactly; `refused` = a "
             "SinkInterpError naming the attention class (and the hand-made edit was confirmed not to reach "
             "the output); `WRONG` = a silent mismatch; `-` = the family cannot be built on that backend here.", ""]
    header = ["family", "backend", "attention class", *CHECKS]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for family in zoo.FAMILIES:
        for backend in ("hooked", "bridge"):
            if backend not in zoo.backends_for(family):
                reason = zoo.UNAVAILABLE.get((family, backend), "")
                if "removed in TransformerLens 4.0" in reason or "native" in reason.lower():
                    continue
                lines.append(f"| {family} | {backend} | - | " + " | ".join("-" for _ in CHECKS) + " |")
                notes.append(f"- {family}/{backend} cannot be built: {reason.splitlines()[0][:200]}")
                continue
            cells = []
            for name in CHECKS:
                outcome, detail = run_check(family, backend, name)
                cells.append({"ok": "ok", "refused": "refused", "wrong": "WRONG", "crash": "CRASH", "n/a": "n/a"}[outcome])
                trivial = outcome == "n/a" and ("no grouped-query" in detail or "has no set_ungroup" in detail)
                if outcome != "ok" and not trivial:
                    notes.append(f"- {family}/{backend}/{name}: {outcome}: {detail[:300]}")
            attention = capabilities(model_for(family, backend)).attention_class
            lines.append(f"| {family} | {backend} | {attention} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", *notes]) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the table here (markdown) instead of printing it")
    args = parser.parse_args(argv)
    text = table()
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
