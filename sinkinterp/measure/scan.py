"""The scan: sink scores and massive activations in one streamed pass, with a printable summary
and a JSON record that says which model, tokens and package versions produced every number."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from jaxtyping import Int
from torch import Tensor

from sinkinterp._batches import check_eps, check_int, check_tokens, stream
from sinkinterp.backends import Model
from sinkinterp.data import corpus_tokens, describe_sampling, resolve_first_token
from sinkinterp.errors import SinkInterpError
from sinkinterp.measure.massive import (
    ProfileReducer,
    ResidualProfile,
    massive_reducer,
    stable_massive_channels,
)
from sinkinterp.measure.sinks import SinkReducer, SinkReport
from sinkinterp.provenance import describe_model, package_versions

__all__ = ["ScanResult", "scan", "scan_corpus"]

CORPUS_SOURCE = "pydoc_data.topics"
_BARS = " ▏▎▍▌▋▊▉█"


@dataclass(frozen=True)
class ScanResult:
    """What ``sinkinterp scan`` measures: a :class:`SinkReport` and the massive activations."""

    sinks: SinkReport
    massive: pd.DataFrame = field(repr=False)
    model: dict[str, Any] = field(repr=False)
    tokens: dict[str, Any] = field(default_factory=dict, repr=False)
    """How the tokens were made (n_seqs, seq_len, first_token, source), so anyone can rebuild them."""
    profile: ResidualProfile | None = field(default=None, repr=False)
    """Top and median |x| per layer and the channel profile at the first token (Sun et al.)."""

    @property
    def stable_channels(self) -> pd.DataFrame:
        return stable_massive_channels(self.massive)

    def to_dict(self) -> dict[str, Any]:
        sinks = self.sinks.to_dict()
        return {
            "model": self.model,
            "versions": package_versions(),
            "tokens": self.tokens,
            "eps": sinks["eps"],
            "alpha_first": sinks["alpha_first"],
            "sink_ratio": sinks["sink_ratio"],
            "sink_ratio_definition": sinks["sink_ratio_definition"],
            "sink_ratio_of_mean": sinks["sink_ratio_of_mean"],
            "first_token_share": sinks["first_token_share"],
            "first_token_share_heads": sinks["first_token_share_heads"],
            "strongest_sink_heads": self.sinks.strongest_heads(10).to_dict(orient="records"),
            "secondary_sinks": sinks["secondary_sinks"],
            "massive_activations": self.massive.to_dict(orient="records"),
            "massive_rule": {key: self.massive.attrs[key] for key in ("min_abs", "min_ratio")},
            "stable_massive_channels": self.stable_channels.to_dict(orient="records"),
            "residual_profile": None if self.profile is None else self.profile.to_dict(),
        }

    def summary(self) -> str:
        report = self.sinks
        lines = []
        t = self.tokens
        if t:
            how = describe_sampling(t)
            lines.append(
                f"scan of {t['n_seqs']} sequences x {t['seq_len']} tokens, {how + ' ' if how else ''}from {t['source']} "
                f"(first token: {t.get('first_token_resolved', t['first_token'])}"
                f"{', the model default' if t['first_token'] == 'default' else ''})"
            )
        n_heads = report.n_layers * report.n_heads
        ratios = "   ".join(f"eps={eps:g}: {value:.3f}" for eps, value in report.sink_ratio.items())
        lines += [
            f"sink ratio (Gu et al.: share of (sequence, head) pairs, {n_heads} heads, with alpha at k=0 > eps):  {ratios}",
            "first-token share per layer (mean attention of queries i>=1 on position 0):",
        ]
        for layer, share in enumerate(report.first_token_share.tolist()):
            lines.append(f"  L{layer:<3d} {share:5.2f} {_bar(share)}")
        heads = ", ".join(f"{r.name} {r.alpha:.2f}" for r in report.strongest_heads(8).itertuples())
        lines.append(f"strongest sink heads (alpha at k=0): {heads}")
        tokens = report.secondary_tokens().head(5)
        found = ", ".join(
            f"{r.token!r} x{r.count} (median position {r.median_position:g})" for r in tokens.itertuples()
        ) or "none"
        lines.append(
            f"secondary sinks (alpha > {min(report.eps):g} at k>0 in some head, per sequence): "
            f"{len(report.secondary_sinks)}; most frequent tokens: {found}"
        )
        attrs = self.massive.attrs
        lines.append(
            f"massive activations (|x| > {attrs['min_abs']:g} and >= {attrs['min_ratio']:g} x median): "
            f"{len(self.massive)} entries in {self.massive.layer.nunique()} layers"
        )
        stable = self.stable_channels
        if stable.empty:
            lines.append("  no massive activations")
        for r in stable.head(6).itertuples():
            core = "" if pd.isna(r.core_first_layer) else f" (in most sequences: {r.core_first_layer:.0f}-{r.core_last_layer:.0f})"
            lines.append(
                f"  channel {r.channel:<5d} at {r.role:<11s} layers {r.first_layer}-{r.last_layer}{core}, "
                f"in {r.fraction_of_seqs:.0%} of sequences, max |x| {r.max_abs:,.0f}, "
                f"most often on {r.top_token!r}"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


def _bar(share: float, width: int = 30) -> str:
    eighths = round(max(0.0, min(1.0, share)) * width * 8)
    full, part = divmod(eighths, 8)
    return "█" * full + (_BARS[part] if part else "")


def scan(
    model: Model,
    tokens: Int[Tensor, "*batch pos"],
    *,
    eps=(0.3, 0.8),
    attention_mask: Tensor | None = None,
    min_abs: float | int = 100.0,
    min_ratio: float | int = 1000.0,
    batch_size: int = 8,
    min_queries: int = 8,
    progress: bool | None = None,
    token_spec: dict[str, Any] | None = None,
) -> ScanResult:
    """Sink scores and massive activations of ``tokens`` in one pass (one forward per mini-batch)."""
    eps = check_eps(eps)
    check_tokens(model, tokens)
    check_int("min_queries", min_queries, 1)
    if token_spec is not None and not isinstance(token_spec, dict):
        raise SinkInterpError(f"token_spec is a dict recording how the tokens were made (it goes into the "
                              f"results), or None, got {token_spec!r}")
    sinks = SinkReducer(model, tokens.shape[1], eps, min_queries)
    massive = massive_reducer(model, min_abs, min_ratio)
    profile = ProfileReducer(model, k=3)
    stream(model, tokens, [sinks, massive, profile], attention_mask=attention_mask, batch_size=batch_size,
           progress=progress, description="scan")
    spec = token_spec or {"n_seqs": tokens.shape[0], "seq_len": tokens.shape[1],
                          "first_token": None, "source": "tokens passed by the caller"}
    return ScanResult(sinks.report(eps), massive.frame(), describe_model(model), spec, profile.profile())


def scan_corpus(
    model: Model,
    *,
    text_file: str | Path | None = None,
    n_seqs: int = 32,
    seq_len: int = 64,
    first_token: str | int = "default",
    seed: int = 0,
    sampling: str = "windows",
    **kwargs,
) -> ScanResult:
    """:func:`scan` on :func:`~sinkinterp.data.corpus_tokens` of the offline corpus or of
    ``text_file`` (one document): seeded windows by default, see ``sampling``."""
    tokens, spec = corpus_for_scan(model, text_file, n_seqs, seq_len, first_token, seed=seed, sampling=sampling)
    return scan(model, tokens, token_spec=spec, **kwargs)


def corpus_for_scan(model: Model, text_file, n_seqs: int, seq_len: int, first_token, *, seed: int = 0,
            sampling: str = "windows") -> tuple[Tensor, dict[str, Any]]:
    """The tokens :func:`scan_corpus` measures, and the record of how they were made."""
    if text_file is None:
        text, source = None, {"source": CORPUS_SOURCE}
    else:
        if not isinstance(text_file, (str, Path)):
            raise SinkInterpError(f"text_file must be a path (str or Path), got {type(text_file).__name__}")
        path = Path(text_file)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise SinkInterpError(f"cannot read text file {str(path)!r}: {e.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SinkInterpError(f"text file {str(path)!r} is not UTF-8 text") from None
        source = {"source": str(path), "sha256": hashlib.sha256(raw).hexdigest()}
    tokens = corpus_tokens(model, n_seqs, seq_len, text=text, first_token=first_token, seed=seed,
                           sampling=sampling)
    return tokens, {"n_seqs": n_seqs, "seq_len": seq_len, "first_token": first_token,
                    "first_token_resolved": resolve_first_token(model, first_token),
                    "sampling": sampling, **({"seed": seed} if sampling == "windows" else {}), **source}
