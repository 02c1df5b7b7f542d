"""TransformerLens 3.9 and 4.x behind one surface: which model classes exist, and what a model can do.

TransformerLens 4.0 removed ``HookedTransformer`` (even ``hasattr(transformer_lens,
"HookedTransformer")`` raises there); 3.9 has it and ``TransformerBridge`` side by side. Nothing
in sinkinterp asks "is this a HookedTransformer?" to decide what to do. It asks what the model can
do, and the answer is measured, not assumed:

- :class:`TransformerLensModel`: the structural type every function here accepts (the same idea
  as TransformerLens 4's ``model_protocol.TransformerLensModel``).
- :func:`capabilities`: one forward pass over four tokens with probing hooks, cached on the model.
  It records which hook points fire and in which order, whether an edit at ``hook_attn_scores``
  reaches ``hook_pattern`` and the logits, whether an edit at ``hook_pattern`` reaches ``hook_z``,
  whether ``hook_attn_scores`` holds logits (not probabilities), whether the rotary hooks fire, and
  whether ``start_at_layer`` resumes a forward pass exactly.
- :func:`require`: the one place that turns a missing capability into a :class:`SinkInterpError`
  naming the model's attention class and what would be needed, instead of a silent no-op.
- :func:`attention_windows`: per layer, how far back a query can see (sliding-window layers).
- :func:`resume` / :func:`final_logits`: finish a forward pass from a cached residual stream,
  including what TransformerLens's ``start_at_layer`` leaves out (a shortformer's positional
  embedding) and what a hand-written unembedding would skip (the final logit soft-cap).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import re
import warnings
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from sinkinterp.errors import SinkInterpError

__all__ = [
    "TL_VERSION",
    "HOOKED_AVAILABLE",
    "DEFAULT_BACKEND",
    "TransformerLensModel",
    "Model",
    "Capabilities",
    "hooked_transformer_class",
    "is_hooked_transformer",
    "is_bridge",
    "backend_of",
    "capabilities",
    "require",
    "attention_windows",
    "visible",
    "kv_layout",
    "resume",
    "final_logits",
]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


TL_VERSION: tuple[int, ...] = _version(importlib.metadata.version("transformer_lens"))
#: HookedTransformer exists (TransformerLens < 4).
HOOKED_AVAILABLE: bool = TL_VERSION < (4,)
#: What ``backend="auto"`` resolves to: HookedTransformer where it exists, else TransformerBridge.
DEFAULT_BACKEND: str = "hooked" if HOOKED_AVAILABLE else "bridge"


@runtime_checkable
class TransformerLensModel(Protocol):
    """What sinkinterp needs of a model: TransformerLens hook points and config.

    ``HookedTransformer`` (TransformerLens 3.x) and ``TransformerBridge`` in compatibility mode
    (3.9 and 4.x) both match.
    """

    @property
    def cfg(self) -> Any: ...

    @property
    def hook_dict(self) -> dict[str, Any]: ...

    def hooks(self, *args: Any, **kwargs: Any) -> Any: ...

    def run_with_hooks(self, *args: Any, **kwargs: Any) -> Any: ...

    def to_tokens(self, *args: Any, **kwargs: Any) -> Any: ...

    def parameters(self, *args: Any, **kwargs: Any) -> Any: ...


#: The type of every ``model`` parameter in sinkinterp (a short name for :class:`TransformerLensModel`).
Model = TransformerLensModel


@functools.cache
def hooked_transformer_class() -> type | None:
    """``transformer_lens.HookedTransformer``, or None on TransformerLens 4.x, where it was removed."""
    if not HOOKED_AVAILABLE:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from transformer_lens import HookedTransformer
    return HookedTransformer


@functools.cache
def _bridge_class() -> type:
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge


def is_hooked_transformer(model: Model) -> bool:
    cls = hooked_transformer_class()
    return cls is not None and isinstance(model, cls)


def is_bridge(model: Model) -> bool:
    return isinstance(model, _bridge_class())


def backend_of(model: Model) -> str:
    """``"hooked"``, ``"bridge"`` or ``"other"`` (any other object with TransformerLens hooks)."""
    if is_hooked_transformer(model):
        return "hooked"
    return "bridge" if is_bridge(model) else "other"


# --------------------------------------------------------------------------------------------
# Capabilities, measured once per model


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a model's hook points do, from a few probing forward passes (:func:`capabilities`)."""

    backend: str
    attention_class: str
    """Class name of block 0's attention module: what a refusal names."""
    fired: frozenset[str]
    """Hook-point suffixes (``attn.hook_pattern``, ``hook_resid_mid``...) that fire in every layer."""
    editable: frozenset[str]
    """Suffixes where an edit in layer 0 reaches the logits, and the attention ones also the next
    hook: a -inf score zeroes that pattern entry, zeroed pattern rows zero those rows of z, a
    zeroed sink key changes the pattern."""
    scores_are_logits: bool
    """``hook_attn_scores`` holds pre-softmax logits: the pattern is (proportional to) their softmax."""
    attention_hook_order: bool
    """In every layer ``hook_v`` and ``hook_attn_scores`` fire before ``hook_pattern``, which fires
    before ``hook_z``: what hooks that pass state from one to the next (value ablation, the
    constant slot) rely on."""
    start_at_layer: bool
    """``model(resid_pre[l], start_at_layer=l)`` reproduces the logits (to 1e-4)."""
    start_at_layer_skips_earlier_layers: bool
    """Resuming at layer l does not run layers < l again (HookedTransformer), so a sweep that
    resumes saves work; TransformerLens 4's bridge reruns them and discards the result."""
    kv_cache: bool
    """``past_kv_cache`` decoding (HookedTransformer's ``TransformerLensKeyValueCache``)."""

    @property
    def rotary_hooks(self) -> bool:
        return {"attn.hook_rot_q", "attn.hook_rot_k"} <= self.fired

    def to_dict(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["fired"], record["editable"] = sorted(self.fired), sorted(self.editable)
        return record


_CAPABILITIES_ATTR = "_sinkinterp_capabilities"
_PROBED = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k",
           "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "hook_resid_pre", "hook_resid_mid",
           "hook_resid_post", "hook_attn_out", "hook_mlp_out", "mlp.hook_post", "ln1.hook_normalized")


def _device(model: Model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _probe_tokens(model: Model) -> Tensor:
    # Four distinct in-vocabulary ids away from 0 (often the pad or unk token).
    n_vocab = model.cfg.d_vocab
    return (torch.arange(4) * 7 + 3).remainder(n_vocab)[None].to(_device(model))


def capabilities(model: Model, *, refresh: bool = False) -> Capabilities:
    """Probe ``model`` once (forward passes over four tokens) and cache the answer on it."""
    cached = getattr(model, _CAPABILITIES_ATTR, None)
    if cached is not None and not refresh:
        return cached
    caps = _probe(model)
    object.__setattr__(model, _CAPABILITIES_ATTR, caps)
    return caps


def _probe(model: Model) -> Capabilities:
    # The probe edits hook points on purpose; TransformerLens 4 warns when an edit is discarded.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _probe_quietly(model)


def _probe_quietly(model: Model) -> Capabilities:
    n_layers = model.cfg.n_layers
    tokens = _probe_tokens(model)
    names = {f"blocks.{layer}.{suffix}": (layer, suffix) for layer in range(n_layers) for suffix in _PROBED
             if f"blocks.{layer}.{suffix}" in model.hook_dict}
    order: list[tuple[int, str]] = []
    seen: dict[tuple[int, str], Tensor] = {}

    def recorder(key):
        # Bound per name: a bridge reports an aliased hook point (hook_resid_pre) under its own name.
        def record(x, hook):
            order.append(key)
            seen[key] = x.detach().clone()

        return record

    with torch.inference_mode():
        clean = model.run_with_hooks(tokens, fwd_hooks=[(n, recorder(key)) for n, key in names.items()],
                                     return_type="logits")
    fired = frozenset(s for s in _PROBED if all((layer, s) in seen for layer in range(n_layers)))

    def position(layer, suffix):
        return order.index((layer, suffix)) if (layer, suffix) in seen else None

    hook_order = True
    for layer in range(n_layers):
        v, scores, pattern, z = (position(layer, s) for s in
                                 ("attn.hook_v", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z"))
        if None in (v, scores, pattern, z) or not (v < pattern and scores < pattern < z):
            hook_order = False

    scores_are_logits = False
    if {"attn.hook_attn_scores", "attn.hook_pattern"} <= fired:
        scores, pattern = seen[0, "attn.hook_attn_scores"].double(), seen[0, "attn.hook_pattern"].double()
        if scores.shape == pattern.shape:
            # Learned sinks (gpt-oss) keep some mass off the pattern: compare row-normalised.
            rows = pattern / pattern.sum(dim=-1, keepdim=True).clamp(min=1e-30)
            scores_are_logits = bool(torch.allclose(torch.softmax(scores, dim=-1), rows, atol=1e-5))

    editable = frozenset(s for s in _EDITS if s in fired and _edit_reaches(model, tokens, clean, s, fired))
    start, skips = _probe_start_at_layer(model, tokens, clean, fired)
    return Capabilities(
        backend=backend_of(model),
        attention_class=type(model.blocks[0].attn).__name__,
        fired=fired,
        editable=editable,
        scores_are_logits=scores_are_logits,
        attention_hook_order=hook_order,
        start_at_layer=start,
        start_at_layer_skips_earlier_layers=start and skips,
        kv_cache=is_hooked_transformer(model),
    )


def _mask_key0(x):
    x = x.clone()
    x[:, :, 1:, 0] = float("-inf")
    return x


def _zero_rows(x, dim: int):
    x = x.clone()
    x.narrow(dim, 1, x.shape[dim] - 1).zero_()
    return x


def _zero_first(x):
    x = x.clone()
    x[:, 0] = 0
    return x


# suffix -> (edit in layer 0, the layer-0 hook that must show it, the check on that hook's value)
_EDITS: dict[str, tuple[Any, str | None, Any]] = {
    "attn.hook_attn_scores": (_mask_key0, "attn.hook_pattern", lambda seen, clean: bool((seen[:, :, 1:, 0] == 0).all())),
    "attn.hook_pattern": (lambda x: _zero_rows(x, 2), "attn.hook_z", lambda seen, clean: bool((seen[:, 1:] == 0).all())),
    "attn.hook_k": (_zero_first, "attn.hook_pattern", lambda seen, clean: not torch.equal(seen, clean)),
    "attn.hook_v": (lambda x: _zero_rows(x, 1), "attn.hook_z", lambda seen, clean: not torch.equal(seen, clean)),
    "attn.hook_z": (lambda x: x * 0, None, None),
    "hook_resid_pre": (_zero_first, None, None),
    # an MLP neuron edit must reach the block's MLP output
    "mlp.hook_post": (_zero_first, "hook_mlp_out", lambda seen, clean: not torch.equal(seen, clean)),
    "hook_resid_mid": (_zero_first, None, None),
    "hook_resid_post": (_zero_first, None, None),
}


def _edit_reaches(model: Model, tokens: Tensor, clean: Tensor, suffix: str, fired) -> bool:
    """Whether the probe edit at ``blocks.0.{suffix}`` shows where it must and changes the logits."""
    edit, observed, check = _EDITS[suffix]
    if observed is not None and observed not in fired:
        return False
    kept: dict[str, Tensor] = {}
    clean_seen: dict[str, Tensor] = {}

    def observe(store):
        def keep(x, hook):
            store["x"] = x.detach().clone()

        return keep

    try:
        with torch.inference_mode():
            if observed is not None:
                model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.0.{observed}", observe(clean_seen))],
                                     return_type=None)
            hooks = [(f"blocks.0.{suffix}", lambda x, hook: edit(x))]
            if observed is not None:
                hooks.append((f"blocks.0.{observed}", observe(kept)))
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits")
    except Exception:  # an edit the model cannot take (a shape it does not expect) is no edit
        return False
    if torch.equal(logits, clean):
        return False
    return observed is None or ("x" in kept and check(kept["x"], clean_seen["x"]))


def _probe_start_at_layer(model: Model, tokens: Tensor, clean: Tensor, fired) -> tuple[bool, bool]:
    """(resumes exactly, skips the layers before). Layer n_layers // 2, from its cached resid_pre."""
    if "hook_resid_pre" not in fired or model.cfg.n_layers < 2:
        return False, False
    layer = model.cfg.n_layers // 2
    kept: dict[str, Tensor] = {}

    def keep(x, hook):
        kept["resid"] = x.detach().clone()

    ran: list[int] = []

    def counter(index):
        def count(x, hook):
            ran.append(index)

        return count

    with torch.inference_mode():
        model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", keep)], return_type=None)
        try:
            hooks = [(f"blocks.{l}.hook_resid_post", counter(l)) for l in range(model.cfg.n_layers)]
            with model.hooks(fwd_hooks=hooks):
                logits = resume(model, kept["resid"], layer, tokens=tokens)
        except Exception:  # TransformerLens 3.9's bridge refuses start_at_layer outright
            return False, False
    exact = logits.shape == clean.shape and bool(torch.allclose(logits, clean, atol=1e-4, rtol=1e-4))
    return exact, min(ran, default=layer) >= layer


_WHY = {
    "attn.hook_attn_scores": "a -inf written there does not reach the pattern and the output",
    "attn.hook_pattern": "an edit of the pattern does not reach hook_z and the output",
    "attn.hook_z": "an edit of z does not reach the output",
    "attn.hook_k": "an edit of the key does not reach the pattern and the output",
    "attn.hook_v": "an edit of the value does not reach z and the output",
}


def require(model: Model, *capabilities_needed: str, needed_by: str) -> Capabilities:
    """Refuse, with a :class:`SinkInterpError`, a model that lacks any of ``capabilities_needed``.

    Each is a hook suffix that must take edits (``"attn.hook_attn_scores"``, ``"attn.hook_pattern"``,
    ``"attn.hook_z"``, ``"attn.hook_k"``, ``"attn.hook_v"``, ``"hook_resid_mid"``...),
    ``"reads:<suffix>"`` for a hook that only has to fire, ``"order"`` (v and scores before pattern
    before z), ``"scores"`` (``hook_attn_scores`` holds logits) or ``"rotary_hooks"``.
    """
    caps = capabilities(model)
    where = f"{type(model).__name__} with attention class {caps.attention_class}"
    rebuild = ("It needs attention that TransformerLens computes itself, with hooks between the steps: a "
               "HookedTransformer (backend='hooked', TransformerLens < 4) or a bridge whose attention class "
               "reimplements attention (the Llama, Gemma, GPT-2 adapters do)")
    for need in capabilities_needed:
        if need == "order":
            if not caps.attention_hook_order:
                raise SinkInterpError(
                    f"{needed_by} passes the value and the pattern on to hook_z, but on this {where} "
                    f"hook_v / hook_attn_scores / hook_pattern / hook_z do not fire in that order. {rebuild}")
        elif need == "scores":
            if not caps.scores_are_logits:
                raise SinkInterpError(
                    f"{needed_by} reads attention logits at hook_attn_scores, but on this {where} that hook "
                    f"does not hold pre-softmax logits (their softmax is not the pattern). {rebuild}")
        elif need == "rotary_hooks":
            if not caps.rotary_hooks:
                state = "lists but never fires" if "blocks.0.attn.hook_rot_q" in model.hook_dict else "has no"
                raise SinkInterpError(
                    f"{needed_by} needs the rotated query and key (hook_rot_q / hook_rot_k), which this {where} "
                    f"{state}: use rotated=False, or backend='hooked' (TransformerLens < 4), whose rotary hooks fire")
        elif need.startswith("reads:"):
            suffix = need.removeprefix("reads:")
            if suffix not in caps.fired:
                raise SinkInterpError(f"{needed_by} reads blocks.L.{suffix}, which never fires on this {where}")
        elif need not in caps.editable:
            if need not in caps.fired:
                extra = (" (parallel attention and MLP, or an attention-only model, has no residual stream "
                         "between the two)") if need == "hook_resid_mid" else ""
                raise SinkInterpError(f"{needed_by} edits blocks.L.{need}, which never fires on this {where}{extra}")
            raise SinkInterpError(
                f"{needed_by} edits blocks.L.{need}, but on this {where} {_WHY.get(need, 'an edit there does not reach the output')} "
                f"(its hooks only observe what the wrapped module computed). {rebuild}")
    return caps


# --------------------------------------------------------------------------------------------
# Which keys a query can see


def _hf_config(model: Model):
    original = getattr(model, "original_model", None)
    return getattr(original, "config", None) if original is not None else None


def attention_windows(model: Model) -> tuple[int | None, ...]:
    """Per layer: the sliding window w (query i sees key j iff 0 <= i - j < w), or None (global causal).

    Read from the HookedTransformer config (``attn_types`` / ``window_size``) or, for a bridge,
    from the wrapped transformers config (``layer_types`` / ``sliding_window``, GPT-Neo's
    ``attention_layers`` / ``window_size``, Gemma-2's alternating layers).
    """
    cached = getattr(model, "_sinkinterp_windows", None)
    if cached is not None:
        return cached
    n_layers = model.cfg.n_layers
    windows: list[int | None] = [None] * n_layers
    hf = _hf_config(model)
    if hf is not None:
        hf = getattr(hf, "text_config", None) or hf
        types = getattr(hf, "layer_types", None) or getattr(hf, "attention_layers", None)
        window = getattr(hf, "sliding_window", None) or getattr(hf, "window_size", None)
        if window and getattr(hf, "use_sliding_window", True) is not False:
            if types:
                windows = [int(window) if t in ("sliding_attention", "local") else None for t in types]
            elif getattr(hf, "model_type", "") == "gemma2":  # alternating, local first
                windows = [int(window) if layer % 2 == 0 else None for layer in range(n_layers)]
            else:  # Mistral, Mixtral, Phi-3: one window for every layer
                windows = [int(window)] * n_layers
    else:
        cfg = model.cfg
        types = getattr(cfg, "attn_types", None)
        window = getattr(cfg, "window_size", None)
        if window and types:
            windows = [int(window) if t == "local" else None for t in types]
    result = tuple(windows)
    object.__setattr__(model, "_sinkinterp_windows", result)
    return result


def visible(n_pos: int, window: int | None, device=None) -> Tensor:
    """``[query, key]`` bool: causal and, for a windowed layer, ``i - j < window``."""
    i = torch.arange(n_pos, device=device)[:, None]
    j = torch.arange(n_pos, device=device)[None, :]
    seen = j <= i
    if window is not None:
        seen = seen & (i - j < window)
    return seen


# --------------------------------------------------------------------------------------------
# Grouped-query attention, grouped or ungrouped


def kv_layout(model: Model, x: Tensor) -> int:
    """How many query heads share each head of ``x`` (a ``hook_k``/``hook_v`` activation
    ``[batch, pos, head, d_head]``): ``n_heads // n_key_value_heads`` normally, 1 after
    ``model.set_ungroup_grouped_query_attention(True)``, which repeats each kv head per query head."""
    n_heads = model.cfg.n_heads
    if n_heads % x.shape[-2]:
        raise SinkInterpError(f"a key/value activation has {x.shape[-2]} heads, which does not divide {n_heads}")
    return n_heads // x.shape[-2]


# --------------------------------------------------------------------------------------------
# Finishing a forward pass from a cached residual stream


def _soft_cap(logits: Tensor, cap) -> Tensor:
    if cap is not None and cap > 0:
        return cap * torch.tanh(logits / cap)
    return logits


def final_logits(model: Model, residual: Tensor) -> Tensor:
    """Final norm, unembedding and (Gemma-2) the final logit soft-cap, for a HookedTransformer's
    last residual stream. On other models use the model's own forward: it does all three."""
    if not is_hooked_transformer(model):
        raise SinkInterpError(f"final_logits unembeds a HookedTransformer's residual; got {type(model).__name__}")
    if model.cfg.normalization_type is not None:
        residual = model.ln_final(residual)
    return _soft_cap(model.unembed(residual), getattr(model.cfg, "output_logits_soft_cap", None))


def resume(model: Model, residual: Tensor, layer: int, *, tokens: Tensor, stop_at_layer: int | None = None) -> Tensor:
    """The rest of a forward pass from ``blocks.{layer}.hook_resid_pre``: logits, or the residual
    before ``stop_at_layer``. ``tokens`` are the input that produced ``residual`` (rows repeated
    to match it): a shortformer adds its positional embedding inside every attention layer, which
    TransformerLens's ``start_at_layer`` leaves out unless it is passed."""
    kwargs: dict[str, Any] = {"start_at_layer": layer}
    if stop_at_layer is not None:
        kwargs["stop_at_layer"] = stop_at_layer
    if is_hooked_transformer(model) and model.cfg.positional_embedding_type == "shortformer":
        if tokens.shape[0] != residual.shape[0]:
            tokens = tokens.repeat(residual.shape[0] // tokens.shape[0], 1)
        kwargs["shortformer_pos_embed"] = model.pos_embed(tokens)
    return model(residual, **kwargs)


_BACKENDS = ("auto", "hooked", "bridge")


def resolve_backend(backend) -> str:
    if backend not in _BACKENDS:
        raise SinkInterpError(f"backend {backend!r} is not supported: use one of {_BACKENDS}")
    if backend == "auto":
        return DEFAULT_BACKEND
    if backend == "hooked" and not HOOKED_AVAILABLE:
        raise SinkInterpError(
            f"backend 'hooked' needs HookedTransformer, which TransformerLens "
            f"{'.'.join(map(str, TL_VERSION))} no longer has (removed in 4.0): use backend='bridge' "
            "(TransformerBridge in compatibility mode, the same hook names) or backend='auto'"
        )
    return backend


def quiet_hooked():
    """A context in which TransformerLens 3.x's deprecation notices for HookedTransformer (which
    point at TransformerBridge, our backend='bridge') are not shown: choosing 'hooked' is explicit."""
    context = warnings.catch_warnings()
    context.__enter__()
    warnings.filterwarnings("ignore", message="HookedTransformer.* is deprecated", category=DeprecationWarning)
    return context


def new_hooked(cfg, tokenizer):
    """``HookedTransformer(cfg, tokenizer)`` on the CPU, without the 3.x deprecation notice."""
    cls = hooked_transformer_class()
    if cls is None:
        raise SinkInterpError("HookedTransformer does not exist in TransformerLens 4: use backend='bridge'")
    context = quiet_hooked()
    try:
        return cls(cfg, tokenizer, move_to_device=False)
    finally:
        context.__exit__(None, None, None)
