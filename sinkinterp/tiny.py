"""Tiny random HookedTransformers built from a config: no weights, no tokenizer, milliseconds.

Unit tests (ours and yours) run every metric and intervention on these two shapes of model:
a GPT-2-style one (LayerNorm, learned positions, one kv head per query head) and a Llama-style
one (RMSNorm, rotary, gated SiLU MLP, grouped-query attention).
"""

from __future__ import annotations

from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from sinkinterp.models import ModelSource, _attach_source, _new_hooked

__all__ = ["tiny_gpt2", "tiny_llama"]

_GPT2 = dict(
    n_layers=2,
    d_model=32,
    n_heads=4,
    d_head=8,
    d_mlp=64,
    d_vocab=67,
    n_ctx=64,
    act_fn="gelu_new",
    normalization_type="LN",
    positional_embedding_type="standard",
)
_LLAMA = dict(
    n_layers=2,
    d_model=48,
    n_heads=6,
    n_key_value_heads=2,
    d_head=8,
    d_mlp=96,
    d_vocab=67,
    n_ctx=64,
    act_fn="silu",
    gated_mlp=True,
    normalization_type="RMS",
    final_rms=True,
    positional_embedding_type="rotary",
    rotary_dim=8,
    rotary_adjacent_pairs=False,
)


def _build(name: str, defaults: dict[str, Any], seed: int, overrides: dict[str, Any]):
    cfg = HookedTransformerConfig(
        **{**defaults, **overrides},
        model_name=name,
        default_prepend_bos=False,
        device="cpu",
        dtype=torch.float32,
    )
    # A private RNG stream: building a test model must not move the caller's global seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _new_hooked(cfg, None)
    model.eval()
    _attach_source(
        model,
        ModelSource(
            name=f"{name}(seed={seed})",
            origin="config",
            backend="hooked",
            dtype="float32",
            prepend_bos=False,
        ),
    )
    return model


def tiny_gpt2(*, seed: int = 0, **overrides: Any) -> HookedTransformer:
    """2 layers, 4 heads, LayerNorm, learned positions; ``overrides`` replace config fields."""
    return _build("tiny-gpt2", _GPT2, seed, overrides)


def tiny_llama(*, seed: int = 0, **overrides: Any) -> HookedTransformer:
    """2 layers, 6 query heads sharing 2 kv heads, RMSNorm, rotary, gated SiLU MLP."""
    return _build("tiny-llama", _LLAMA, seed, overrides)
