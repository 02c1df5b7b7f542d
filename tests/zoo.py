"""A zoo of tiny random decoder models, one per family TransformerLens can convert.

Each HuggingFace family is built as a tiny randomly initialised transformers model (2 layers, a
67-token vocabulary, 64 positions; no hub, no network) and then handed to TransformerLens's *own*
conversion path, so tests see exactly the components, hooks and weight processing a real
checkpoint of that family would get:

* ``backend="hooked"``: ``HookedTransformer.from_pretrained(<official name>, hf_model=...)``
  (TransformerLens 3.x only) with the default folding and centering. TransformerLens builds the
  config of an official model from the hub config (or from a table keyed by the model's name);
  :func:`_redirect_tl_config` points that lookup at the tiny config for the duration of the call.
* ``backend="bridge"``: ``TransformerBridge.boot_transformers(folder, hf_model=...)`` in
  compatibility mode (TransformerLens 3.x and 4.x).

Three TransformerLens-native kinds that have no HuggingFace class (shortformer positions, SoLU
MLPs, attention-only) are built directly from a ``HookedTransformerConfig`` (hooked only).

Interface: :data:`FAMILIES`, :func:`backends_for`, :func:`build`, :func:`hf_reference`,
:func:`windows`, :data:`UNAVAILABLE` (why a family/backend pair is missing here) and
:data:`PARITY_GAPS` (pairs where TransformerLens's conversion itself departs from HF).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import io
import logging
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable
from unittest import mock

# Everything here must work with no network: never let transformers or the hub client try.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from sinkinterp.models import ModelSource

__all__ = [
    "FAMILIES",
    "PARITY_GAPS",
    "UNAVAILABLE",
    "backends_for",
    "build",
    "hf_reference",
    "windows",
]

# Shared sizes. d_head 8 everywhere; the grouped-query families use 6 query heads on 2 kv heads.
VOCAB = 67
N_CTX = 64
N_LAYERS = 2
WINDOW = 4  # sliding window (keys per query, the query included) for the local-attention families
_INIT_STD = 0.15  # matrices: large enough that attention patterns are far from uniform
_JITTER_STD = 0.1  # vectors (norm gains, biases): moved off 1/0 so folding them is really tested
_SINK_STD = 1.0  # gpt-oss's learned per-head sink logits: big enough to matter

_BOS, _EOS, _UNK, _PAD = 1, 2, 0, 3
_BACKENDS = ("hooked", "bridge")

try:  # TransformerLens 4.x removed HookedTransformer; even touching the attribute raises there.
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as _tl_loading

    _HOOKED_IMPORT_ERROR: str | None = None
except ImportError as exc:
    HookedTransformer = HookedTransformerConfig = _tl_loading = None  # type: ignore[assignment]
    _HOOKED_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------------------------
# Family table


@dataclasses.dataclass(frozen=True)
class _Family:
    model_class: str
    """The transformers ``*ForCausalLM`` class."""
    config_class: str
    config: dict[str, Any]
    """Keyword arguments for ``config_class`` (ids and dropout are added by :func:`_hf_config`)."""
    tl_name: str | None
    """The official TransformerLens name whose conversion ``backend="hooked"`` goes through."""
    tl_overlay: Callable[[Any], dict[str, Any]] | None = None
    """For names TransformerLens configures from a hard-coded table instead of the HF config:
    the tiny sizes to write over that table (structure flags stay TransformerLens's own)."""


def _head_dim(c) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _rope_theta(c, layer_type: str | None = None) -> float:
    # transformers 5 keeps rope settings in rope_parameters, nested per layer type for Gemma-3.
    rope = getattr(c, "rope_parameters", None) or {}
    if layer_type is not None and layer_type in rope:
        rope = rope[layer_type]
    return float(rope.get("rope_theta", 10000.0))


def _sizes(c, *, gqa: bool) -> dict[str, Any]:
    n_kv = c.num_key_value_heads
    out = {
        "d_model": c.hidden_size,
        "d_head": _head_dim(c),
        "n_heads": c.num_attention_heads,
        "d_mlp": c.intermediate_size,
        "n_layers": c.num_hidden_layers,
        "n_ctx": c.max_position_embeddings,
        "d_vocab": c.vocab_size,
    }
    if gqa:
        out["n_key_value_heads"] = n_kv if n_kv != c.num_attention_heads else None
    return out


def _attn_types(c) -> list[str]:
    return ["local" if t == "sliding_attention" else "global" for t in c.layer_types]


def _gemma_overlay(c) -> dict[str, Any]:
    return {
        **_sizes(c, gqa=True),
        "eps": c.rms_norm_eps,
        "rotary_dim": _head_dim(c),
        "rotary_base": _rope_theta(c),
    }


def _gemma2_overlay(c) -> dict[str, Any]:
    return {
        **_gemma_overlay(c),
        "window_size": c.sliding_window,
        "attn_types": _attn_types(c),
        "attn_scores_soft_cap": c.attn_logit_softcapping,
        "output_logits_soft_cap": c.final_logit_softcapping,
        # HF scales scores by query_pre_attn_scalar ** -0.5, TL divides by attn_scale.
        "attn_scale": math.sqrt(c.query_pre_attn_scalar),
    }


def _gemma3_overlay(c) -> dict[str, Any]:
    return {
        **_gemma_overlay(c),
        "rotary_base": _rope_theta(c, "full_attention"),
        "rotary_base_local": _rope_theta(c, "sliding_attention"),
        "window_size": c.sliding_window,
        "attn_types": _attn_types(c),
        "attn_scale": math.sqrt(c.query_pre_attn_scalar),
    }


def _olmo_overlay(c) -> dict[str, Any]:
    # TL's OLMo/OLMo-2 converters reshape K and V with n_heads: plain multi-head attention only.
    return {
        **_sizes(c, gqa=False),
        "rotary_base": _rope_theta(c),
        "attn_types": ["global"] * c.num_hidden_layers,
        **({"eps": c.rms_norm_eps} if hasattr(c, "rms_norm_eps") else {}),
    }


# Sizes shared by the Llama-like families: 48 wide, 6 query heads of 8 sharing 2 kv heads.
_GQA = dict(
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=N_CTX,
)
_MHA = {**_GQA, "num_key_value_heads": 6}


def _rope(*, partial: float | None = None) -> dict[str, Any]:
    # transformers 5 takes partial_rotary_factor inside rope_parameters, not as a top-level field.
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0}
    if partial is not None:
        rope["partial_rotary_factor"] = partial
    return rope


_FAMILIES: dict[str, _Family] = {
    # d_mlp is left to the default 4 * d_model: TL's GPT-2 and GPT-Neo branches assume it.
    "gpt2": _Family(
        "GPT2LMHeadModel",
        "GPT2Config",
        # n_ctx: not a GPT2Config field any more, but the real gpt2 config.json carries it and
        # TL's GPT-2 branch reads it.
        dict(
            n_embd=32,
            n_layer=N_LAYERS,
            n_head=4,
            n_positions=N_CTX,
            n_ctx=N_CTX,
            activation_function="gelu_new",
        ),
        "gpt2",
    ),
    "gpt-neo": _Family(
        "GPTNeoForCausalLM",
        "GPTNeoConfig",
        dict(
            hidden_size=32,
            num_layers=N_LAYERS,
            num_heads=4,
            max_position_embeddings=N_CTX,
            attention_types=[[["global", "local"], 1]],  # layer 0 global, layer 1 local
            window_size=WINDOW,
        ),
        "EleutherAI/gpt-neo-125M",
    ),
    "gpt-j": _Family(
        "GPTJForCausalLM",
        "GPTJConfig",
        # rotary_dim 4 of d_head 8: GPT-J rotates only part of each head (adjacent pairs).
        dict(n_embd=32, n_layer=N_LAYERS, n_head=4, n_positions=N_CTX, rotary_dim=4),
        "EleutherAI/gpt-j-6B",
    ),
    "gpt-neox": _Family(
        "GPTNeoXForCausalLM",
        "GPTNeoXConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            max_position_embeddings=N_CTX,
            rope_parameters=_rope(partial=0.25),
            use_parallel_residual=True,
        ),
        "EleutherAI/pythia-70m",
    ),
    "opt": _Family(
        "OPTForCausalLM",
        "OPTConfig",
        dict(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=N_LAYERS,
            num_attention_heads=4,
            max_position_embeddings=N_CTX,
            word_embed_proj_dim=32,
            do_layer_norm_before=True,
        ),
        "facebook/opt-125m",
    ),
    "bloom": _Family(
        "BloomForCausalLM",
        "BloomConfig",
        dict(hidden_size=32, n_layer=N_LAYERS, n_head=4),
        "bigscience/bloom-560m",
    ),
    # Every official TL name containing "llama" is configured from a hard-coded table; Yi is a
    # LlamaForCausalLM that goes through TL's generic, config-driven Llama branch instead.
    "llama": _Family("LlamaForCausalLM", "LlamaConfig", dict(_GQA), "01-ai/Yi-6B"),
    "mistral": _Family(
        "MistralForCausalLM",
        "MistralConfig",
        dict(_GQA, sliding_window=WINDOW),
        "mistralai/Mistral-7B-v0.1",
    ),
    "mixtral": _Family(
        "MixtralForCausalLM",
        "MixtralConfig",
        dict(_GQA, num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
        "mistralai/Mixtral-8x7B-v0.1",
    ),
    "qwen2": _Family(
        "Qwen2ForCausalLM", "Qwen2Config", dict(_GQA, use_sliding_window=False), "Qwen/Qwen2-0.5B"
    ),
    "qwen3": _Family(
        "Qwen3ForCausalLM", "Qwen3Config", dict(_GQA, use_sliding_window=False), "Qwen/Qwen3-0.6B"
    ),
    # hidden_act="gelu" as in the real checkpoints (HF reads it as the tanh approximation).
    "gemma": _Family(
        "GemmaForCausalLM",
        "GemmaConfig",
        dict(_GQA, hidden_act="gelu"),
        "google/gemma-2b",
        _gemma_overlay,
    ),
    # Soft caps far below the real 50 / 30 so that they bite on this model's scores and logits.
    "gemma-2": _Family(
        "Gemma2ForCausalLM",
        "Gemma2Config",
        dict(
            _GQA,
            query_pre_attn_scalar=8,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            attn_logit_softcapping=4.0,
            final_logit_softcapping=5.0,
        ),
        "google/gemma-2-2b",
        _gemma2_overlay,
    ),
    "gemma-3": _Family(
        "Gemma3ForCausalLM",
        "Gemma3TextConfig",
        dict(
            _GQA,
            query_pre_attn_scalar=8,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
        ),
        "google/gemma-3-270m",
        _gemma3_overlay,
    ),
    "phi": _Family(
        "PhiForCausalLM",
        "PhiConfig",
        dict(_MHA, rope_parameters=_rope(partial=0.5)),
        "microsoft/phi-2",
    ),
    "phi-3": _Family(
        "Phi3ForCausalLM",
        "Phi3Config",
        dict(_GQA, sliding_window=None),
        "microsoft/Phi-3-mini-4k-instruct",
    ),
    # A clip_qkv low enough to clip some q/k/v entries of this model.
    "olmo": _Family(
        "OlmoForCausalLM",
        "OlmoConfig",
        dict(_MHA, clip_qkv=1.5),
        "allenai/OLMo-1B-hf",
        _olmo_overlay,
    ),
    "olmo-2": _Family(
        "Olmo2ForCausalLM", "Olmo2Config", dict(_MHA), "allenai/OLMo-2-0425-1B", _olmo_overlay
    ),
    "olmoe": _Family(
        "OlmoeForCausalLM",
        "OlmoeConfig",
        dict(_GQA, num_experts=4, num_experts_per_tok=2, intermediate_size=32),
        "allenai/OLMoE-1B-7B-0924",
    ),
    # TL's official "stablelm" names are GPT-NeoX checkpoints; StableLmForCausalLM is the
    # StableLM-2 architecture (partial rotary, LayerNorm, GQA), which HookedTransformer lacks.
    "stablelm": _Family(
        "StableLmForCausalLM",
        "StableLmConfig",
        dict(_GQA, rope_parameters=_rope(partial=0.25)),
        "stabilityai/stablelm-base-alpha-3b",
    ),
    "gpt-oss": _Family(
        "GptOssForCausalLM",
        "GptOssConfig",
        dict(
            _GQA,
            intermediate_size=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters=_rope(),  # plain RoPE, not the real model's YaRN
        ),
        "openai/gpt-oss-20b",
    ),
}

# TransformerLens-native kinds: HookedTransformerConfig fields on top of a small GPT-2-like base.
_NATIVE_BASE = dict(
    n_layers=N_LAYERS,
    d_model=32,
    n_heads=4,
    d_head=8,
    d_mlp=64,
    d_vocab=VOCAB,
    n_ctx=N_CTX,
    act_fn="gelu_new",
    normalization_type="LN",
)
_NATIVE: dict[str, dict[str, Any]] = {
    "shortformer": dict(positional_embedding_type="shortformer"),
    "solu": dict(act_fn="solu_ln"),
    "attn-only": dict(attn_only=True),
}

FAMILIES: tuple[str, ...] = (*_FAMILIES, *_NATIVE)


# --------------------------------------------------------------------------------------------
# HuggingFace side


def _require(family: str) -> None:
    if family not in FAMILIES:
        raise KeyError(f"unknown zoo family {family!r}; known: {', '.join(FAMILIES)}")


def _hf_config(family: str):
    import transformers

    spec = _FAMILIES[family]
    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB, bos_token_id=_BOS, eos_token_id=_EOS, pad_token_id=_PAD, **spec.config
    )
    config = getattr(transformers, spec.config_class)(**kwargs)
    config.architectures = [spec.model_class]
    return config


def _scramble(model: torch.nn.Module) -> None:
    """Redraw the matrices and jitter the vectors, from the current RNG in a fixed order.

    HF's default init leaves norm gains at 1 and biases at 0, which would hide any mistake in
    folding them, and its 0.02-std matrices give nearly uniform attention.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.normal_(0.0, _SINK_STD)
            elif p.dim() >= 2:
                p.normal_(0.0, _INIT_STD)
            else:
                p.add_(torch.randn_like(p), alpha=_JITTER_STD)


def _new_hf_model(family: str, seed: int):
    import transformers

    config = _hf_config(family)
    cls = getattr(transformers, _FAMILIES[family].model_class)
    # A private RNG stream: building a test model must not move the caller's global seed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(config, attn_implementation="eager", dtype=torch.float32)
        _scramble(model)
    return model.eval()


def hf_reference(family: str, *, seed: int = 0):
    """The transformers model behind ``build(family, ...)``, eager attention; None if TL-native."""
    _require(family)
    if family in _NATIVE:
        return None
    return _new_hf_model(family, seed)


def windows(family: str) -> list[int | None]:
    """Per layer: the sliding window (query i sees key j iff 0 <= i - j < window) or None (causal).

    Read from the HF config set here, not from TransformerLens, so tests can check TL against it.
    """
    _require(family)
    if family in _NATIVE:
        return [None] * N_LAYERS
    c = _hf_config(family)
    if family == "gpt-neo":
        return [c.window_size if t == "local" else None for t in c.attention_layers]
    window = getattr(c, "sliding_window", None)
    if getattr(c, "use_sliding_window", True) is False:
        window = None
    layer_types = getattr(c, "layer_types", None)
    if layer_types is not None:
        return [window if t == "sliding_attention" else None for t in layer_types]
    return [window] * c.num_hidden_layers  # Mistral, Mixtral, Phi-3: one window for every layer


# --------------------------------------------------------------------------------------------
# Tokenizer and folder (the bridge reloads the tokenizer from tokenizer.name_or_path)

_ROOT: Path | None = None


def _root() -> Path:
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="sinkinterp-zoo-"))
        atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
    return _ROOT


def _save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token=f"t{_UNK}"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token=f"t{_BOS}",
        eos_token=f"t{_EOS}",
        unk_token=f"t{_UNK}",
        pad_token=f"t{_PAD}",
    ).save_pretrained(folder)


def _folder(family: str) -> Path:
    """A per-process folder with the family's HF config and the tiny tokenizer, made once."""
    folder = _root() / family.replace("-", "_")
    if not (folder / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        _save_tokenizer(folder)
        _hf_config(family).save_pretrained(folder)
    return folder


def _tokenizer(family: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_folder(family))


# --------------------------------------------------------------------------------------------
# Availability


def _static_problem(family: str, backend: str) -> str | None:
    """Why the pair can't exist at all in this TransformerLens (no build needed to know)."""
    if backend == "hooked":
        if _HOOKED_IMPORT_ERROR is not None:
            return f"HookedTransformer is not in this TransformerLens ({_HOOKED_IMPORT_ERROR})"
        return None
    if family in _NATIVE:
        return "TransformerLens-native kind: there is no HuggingFace model for the bridge to wrap"
    try:
        from transformer_lens.model_bridge import TransformerBridge  # noqa: F401
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


class _Unavailable(dict):
    """``UNAVAILABLE[(family, backend)]``: why that pair can't be built here (lazily probed).

    A pair is probed by building it once (tens of milliseconds for these sizes), so what is
    recorded is the exception TransformerLens actually raises. Iterating, ``len()`` or ``repr()``
    probes every pair.
    """

    def __init__(self):
        super().__init__()
        self._probed: set[tuple[str, str]] = set()

    def _check(self, key) -> None:
        if key in self._probed:
            return
        family, backend = key
        _require(family)
        if backend not in _BACKENDS:
            raise KeyError(f"unknown backend {backend!r}")
        self._probed.add(key)
        problem = _static_problem(family, backend)
        if problem is None:
            try:
                _build(family, backend, seed=0)
            except Exception as exc:  # whatever TransformerLens raises is the reason we report
                problem = f"{type(exc).__name__}: {exc}"
        if problem is not None:
            super().__setitem__(key, problem)

    def _check_all(self) -> None:
        for family in FAMILIES:
            for backend in _BACKENDS:
                self._check((family, backend))

    def __contains__(self, key) -> bool:
        self._check(key)
        return super().__contains__(key)

    def __getitem__(self, key):
        self._check(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._check(key)
        return super().get(key, default)

    def __iter__(self):
        self._check_all()
        return super().__iter__()

    def __len__(self) -> int:
        self._check_all()
        return super().__len__()

    def keys(self):
        self._check_all()
        return super().keys()

    def values(self):
        self._check_all()
        return super().values()

    def items(self):
        self._check_all()
        return super().items()

    def __repr__(self) -> str:
        self._check_all()
        return super().__repr__()


UNAVAILABLE: dict[tuple[str, str], str] = _Unavailable()


def backends_for(family: str) -> tuple[str, ...]:
    """The backends (of "hooked", "bridge") that can build ``family`` with this TransformerLens."""
    _require(family)
    return tuple(b for b in _BACKENDS if (family, b) not in UNAVAILABLE)


# Where TransformerLens's conversion itself makes the model disagree with hf_reference (max
# |log_softmax| difference well above float32 noise). Tests comparing against HF should expect
# these; every other available pair agrees to ~1e-5.
PARITY_GAPS: dict[tuple[str, str], str] = {
    # Folding b_V into b_O assumes each attention row sums to 1; the sink takes part of the mass.
    ("gpt-oss", "hooked"): "fold_value_biases is wrong with attention sinks (difference ~1)",
    ("gpt-oss", "bridge"): "compatibility mode folds value biases despite attention sinks (~1)",
    # HF reads Gemma's legacy hidden_act="gelu" as the tanh approximation; TL's gemma-2b table
    # uses exact GELU.
    ("gemma", "hooked"): "exact GELU where HF uses the tanh approximation (~1e-3)",
}


# --------------------------------------------------------------------------------------------
# TransformerLens side


class _TinyAutoConfig:
    """Stands in for ``transformers.AutoConfig`` in TL's loading module: any name -> our config."""

    def __init__(self, config):
        self._config = config

    def from_pretrained(self, *args: Any, **kwargs: Any):
        return copy.deepcopy(self._config)


@contextlib.contextmanager
def _redirect_tl_config(family: str, hf_config):
    """While active, TL configures the official ``_FAMILIES[family].tl_name`` from ``hf_config``.

    TL's ``convert_hf_model_config`` either reads the hub config (redirected to ours) or, for
    some names, a hard-coded table; for those, ``tl_overlay`` writes the tiny sizes over it.
    Patches are undone on exit, exceptions included.
    """
    overlay = _FAMILIES[family].tl_overlay
    original = _tl_loading.convert_hf_model_config

    def convert(model_name: str, **kwargs: Any) -> dict[str, Any]:
        cfg_dict = original(model_name, **kwargs)
        if overlay is not None:
            cfg_dict.update(overlay(hf_config))
        return cfg_dict

    with contextlib.ExitStack() as stack:
        tiny = _TinyAutoConfig(hf_config)
        stack.enter_context(mock.patch.object(_tl_loading, "AutoConfig", tiny))
        stack.enter_context(mock.patch.object(_tl_loading, "convert_hf_model_config", convert))
        yield


@contextlib.contextmanager
def _quiet():
    # Conversion prints a line, warns about deprecation, and logs that it turned folding off for
    # post-norm / soft-capped models: expected here, and noise in a test log.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _hooked_from_hf(family: str, seed: int):
    hf_model = _new_hf_model(family, seed)
    with _quiet(), _redirect_tl_config(family, hf_model.config):
        return HookedTransformer.from_pretrained(
            _FAMILIES[family].tl_name,
            hf_model=hf_model,
            tokenizer=_tokenizer(family),
            device="cpu",
            dtype=torch.float32,
            default_prepend_bos=False,
        )


def _hooked_native(family: str, seed: int):
    """A TL-native kind, processed the way ``from_pretrained`` processes a NeelNanda checkpoint."""
    fields = {**_NATIVE_BASE, **_NATIVE[family]}
    common = dict(
        model_name=f"zoo-{family}", default_prepend_bos=False, device="cpu", dtype=torch.float32
    )
    with _quiet(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        raw = HookedTransformer(HookedTransformerConfig(**fields, **common), move_to_device=False)
        _scramble(raw)
        # Shortformer can't be folded or centered (from_pretrained turns both off for it).
        fold = fields.get("positional_embedding_type") != "shortformer"
        if not fold:
            raw.eval()
            return raw
        folded_cfg = HookedTransformerConfig(**{**fields, "normalization_type": "LNPre"}, **common)
        model = HookedTransformer(folded_cfg, move_to_device=False)
        model.load_and_process_state_dict(
            raw.state_dict(), fold_ln=True, center_writing_weights=True, center_unembed=True
        )
    return model


def _bridge(family: str, seed: int):
    from transformer_lens.model_bridge import TransformerBridge

    hf_model = _new_hf_model(family, seed)
    folder = _folder(family)
    with _quiet():
        bridge = TransformerBridge.boot_transformers(
            str(folder),
            hf_model=hf_model,
            tokenizer=_tokenizer(family),
            device="cpu",
            dtype=torch.float32,
        )
        bridge.enable_compatibility_mode(disable_warnings=True)
    return bridge


def _build(family: str, backend: str, *, seed: int):
    if backend == "hooked":
        model = _hooked_native(family, seed) if family in _NATIVE else _hooked_from_hf(family, seed)
    else:
        model = _bridge(family, seed)
    model.eval()
    if getattr(model, "cfg", None) is not None and hasattr(model.cfg, "default_prepend_bos"):
        model.cfg.default_prepend_bos = False
    # object.__setattr__: nn.Module and TransformerBridge route attribute writes elsewhere.
    object.__setattr__(
        model,
        "sinkinterp_source",
        ModelSource(
            name=f"zoo-{family}(seed={seed})",
            origin="config",
            backend=backend,
            dtype="float32",
            prepend_bos=False,
        ),
    )
    return model


def build(family: str, backend: str, *, seed: int = 0):
    """A tiny ``family`` model as a HookedTransformer or a TransformerBridge (compatibility mode).

    eval(), float32, CPU, no BOS prepended, with sinkinterp provenance. A pair that can't exist in
    this TransformerLens raises ``LookupError``; a conversion failure raises what TL raised
    (:func:`backends_for` leaves both out).
    """
    _require(family)
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be 'hooked' or 'bridge', not {backend!r}")
    problem = _static_problem(family, backend)
    if problem is not None:
        raise LookupError(f"zoo {family}/{backend} is unavailable: {problem}")
    return _build(family, backend, seed=seed)
