"""Tiny random test models: no weights on disk, no tokenizer, a fraction of a second to build.

Unit tests (ours and yours) run every metric and intervention on these two shapes of model:
a GPT-2-style one (LayerNorm, learned positions, one kv head per query head) and a Llama-style
one (RMSNorm, rotary, gated SiLU MLP, grouped-query attention).

``backend="hooked"`` (TransformerLens 3.x) builds a ``HookedTransformer`` straight from a config.
``backend="bridge"`` builds a seeded random transformers model of the same shape and boots a
``TransformerBridge`` on it in compatibility mode; TransformerLens 4 has only this one. The two
backends draw different random weights: compare them through their hooks, not their numbers.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from sinkinterp._batches import check_int, check_seed
from sinkinterp.backends import new_hooked, resolve_backend
from sinkinterp.errors import SinkInterpError
from sinkinterp.sources import ModelSource, attach_source

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

# HookedTransformerConfig field -> transformers config field, per family (what overrides may change
# on the bridge backend).
_HF_FIELDS = {
    "tiny-gpt2": dict(n_layers="n_layer", d_model="n_embd", n_heads="n_head", d_mlp="n_inner", d_vocab="vocab_size",
                      n_ctx="n_positions", act_fn="activation_function"),
    "tiny-llama": dict(n_layers="num_hidden_layers", d_model="hidden_size", n_heads="num_attention_heads",
                       n_key_value_heads="num_key_value_heads", d_head="head_dim", d_mlp="intermediate_size",
                       d_vocab="vocab_size", n_ctx="max_position_embeddings", act_fn="hidden_act"),
}


def _hooked(name: str, settings: dict[str, Any]):
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(**settings, model_name=name, default_prepend_bos=False, device="cpu",
                                  dtype=torch.float32)
    return new_hooked(cfg, None)


def _hf_config(name: str, settings: dict[str, Any]):
    from transformers import GPT2Config, LlamaConfig

    fields = _HF_FIELDS[name]
    values = {fields[k]: v for k, v in settings.items() if k in fields}
    # HookedTransformer's default init scale, so both backends' tiny models attend as sharply.
    values["initializer_range"] = 0.8 / settings["d_model"] ** 0.5
    if name == "tiny-gpt2":
        if settings["d_model"] != settings["n_heads"] * settings["d_head"]:
            raise SinkInterpError("tiny_gpt2 on the bridge needs d_model == n_heads * d_head")
        return GPT2Config(**values, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return LlamaConfig(**values, tie_word_embeddings=False, rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 10000.0})


_FOLDERS: list[str] = []


@atexit.register
def _remove_folders() -> None:
    for folder in _FOLDERS:
        shutil.rmtree(folder, ignore_errors=True)


def tiny_tokenizer_folder(n_vocab: int) -> Path:
    """A folder holding a word-level tokenizer of ``n_vocab`` tokens ``t0 t1 ...`` (the bridge
    reloads its tokenizer by path while booting; the model is then returned without one)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tempfile.mkdtemp(prefix="sinkinterp-tiny-")
    _FOLDERS.append(folder)
    core = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(n_vocab)}, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="t0", bos_token="t1", eos_token="t2").save_pretrained(folder)
    return Path(folder)


def _bridge(name: str, settings: dict[str, Any]):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = _hf_config(name, settings)
    folder = tiny_tokenizer_folder(config.vocab_size)
    config.save_pretrained(folder)
    hf_model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    bridge = TransformerBridge.boot_transformers(str(folder), hf_model=hf_model,
                                                 tokenizer=AutoTokenizer.from_pretrained(folder), device="cpu",
                                                 dtype=torch.float32)
    bridge.cfg.default_prepend_bos = False
    bridge.enable_compatibility_mode(disable_warnings=True)
    # No tokenizer, as on the HookedTransformer built from a config: ids are the only input.
    bridge.tokenizer = None
    return bridge


def _build(name: str, defaults: dict[str, Any], seed: int, backend: str, overrides: dict[str, Any]):
    backend = resolve_backend(backend)
    check_seed(seed)
    for field in ("n_layers", "n_heads", "d_model", "d_head", "d_mlp", "n_ctx", "d_vocab", "n_key_value_heads"):
        if field in overrides and overrides[field] is not None:
            check_int(field, overrides[field], 1)
    settings = {**defaults, **overrides}
    kv = settings.get("n_key_value_heads")
    if kv and settings["n_heads"] % kv:
        raise SinkInterpError(f"n_heads {settings['n_heads']} is not a multiple of n_key_value_heads {kv}: each "
                              "key/value head serves a whole group of query heads")
    if backend == "bridge":
        unknown = sorted(set(overrides) - set(_HF_FIELDS[name]))
        if unknown:
            raise SinkInterpError(f"{name} on the bridge cannot override {unknown[0]!r}: it can override "
                                  f"{', '.join(sorted(_HF_FIELDS[name]))}")
    # A private RNG stream: building a test model must not move the caller's global seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = _hooked(name, settings) if backend == "hooked" else _bridge(name, settings)
        except TypeError as e:  # an override HookedTransformerConfig does not know
            raise SinkInterpError(f"{name}: bad override ({e})") from None
    model.eval()
    attach_source(
        model,
        ModelSource(
            name=f"{name}(seed={seed})",
            origin="config",
            backend=backend,
            dtype="float32",
            prepend_bos=False,
        ),
    )
    return model


def tiny_gpt2(*, seed: int = 0, backend: str = "auto", **overrides: Any):
    """2 layers, 4 heads, LayerNorm, learned positions; ``overrides`` replace config fields
    (HookedTransformerConfig names; on the bridge the shape fields only)."""
    return _build("tiny-gpt2", _GPT2, seed, backend, overrides)


def tiny_llama(*, seed: int = 0, backend: str = "auto", **overrides: Any):
    """2 layers, 6 query heads sharing 2 kv heads, RMSNorm, rotary, gated SiLU MLP."""
    return _build("tiny-llama", _LLAMA, seed, backend, overrides)

