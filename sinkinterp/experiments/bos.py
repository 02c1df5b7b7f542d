"""The model with and without a BOS token (Barbero et al. 2025): the same text windows, once with
the BOS token in front and once without, scored on the same next tokens; where the sink goes and
what it costs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jaxtyping import Float
from torch import Tensor

from sinkinterp._batches import check_int
from sinkinterp.backends import Model
from sinkinterp.data import corpus_tokens
from sinkinterp.errors import SinkInterpError
from sinkinterp.evaluate import evaluate
from sinkinterp.measure import SinkReport, sink_scores
from sinkinterp.stats import Estimate, bootstrap_mean, check_bootstrap_options, paired_difference

__all__ = ["BosTest", "bos_test"]


@dataclass(frozen=True)
class BosTest:
    """``loss[with]`` / ``loss[without]``: per-sequence next-token loss on the same targets (the
    text tokens after the first text token); ``sinks[...]``: the :class:`SinkReport` of each, so
    alpha at position 0 is the BOS token's in one and the first text token's in the other."""

    bos_token: str
    loss: dict[str, Float[Tensor, " seq"]]
    sinks: dict[str, SinkReport]
    n_resamples: int
    seed: int

    def loss_change(self) -> Estimate:
        """Loss without BOS minus with it (paired over sequences)."""
        return paired_difference(self.loss["without"], self.loss["with"], n_resamples=self.n_resamples, seed=self.seed)

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for name in ("with", "without"):
            report = self.sinks[name]
            loss = bootstrap_mean(self.loss[name], n_resamples=self.n_resamples, seed=self.seed)
            out.append({"bos": name, "loss": loss.to_dict(), "alpha_first_mean": float(report.alpha_first.mean()),
                        "first_token_share_mean": float(report.first_token_share.mean()),
                        **{f"sink_ratio_{eps:g}": value for eps, value in report.sink_ratio.items()}})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"bos_token": self.bos_token, "rows": self.rows(), "loss_change": self.loss_change().to_dict(),
                "first_token_share": {name: report.first_token_share.tolist() for name, report in self.sinks.items()}}

    def summary(self) -> str:
        lines = [f"with and without {self.bos_token!r} in front of the same text:"]
        for row in self.rows():
            ratios = ", ".join(f"{k.removeprefix('sink_ratio_')}: {v:.3f}" for k, v in row.items()
                               if k.startswith("sink_ratio_"))
            lines.append(f"  {row['bos']:<7} BOS: loss {row['loss']['value']:.4f}, alpha at position 0 "
                         f"{row['alpha_first_mean']:.3f}, first-token share {row['first_token_share_mean']:.3f}, "
                         f"sink ratio (eps {ratios})")
        change = self.loss_change()
        lines.append(f"  loss without minus with: {change.value:+.4f} [{change.low:+.4f}, {change.high:+.4f}]")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


def bos_test(model: Model, *, n_seqs: int = 16, seq_len: int = 128, seed: int = 0, n_resamples: int = 2000,
             batch_size: int = 8, progress: bool | None = None) -> BosTest:
    """Seeded corpus windows of ``seq_len`` text tokens, scored with the tokenizer's BOS token in
    front and without it, on the same targets (text tokens 2..n); the sink scores of both."""
    check_int("n_seqs", n_seqs, 1)
    check_int("seq_len", seq_len, 3)
    check_bootstrap_options(n_resamples, 0.95)
    tokenizer = getattr(model, "tokenizer", None)
    bos = getattr(tokenizer, "bos_token", None)
    if bos is None:
        raise SinkInterpError(f"{model.cfg.model_name} has no BOS token to add or remove")
    with_bos = corpus_tokens(model, n_seqs, seq_len + 1, first_token="bos", seed=seed)
    without = with_bos[:, 1:]
    loss = {"with": evaluate(model, with_bos, from_query=1, batch_size=batch_size, progress=progress).values["loss"],
            "without": evaluate(model, without, from_query=0, batch_size=batch_size, progress=progress).values["loss"]}
    sinks = {"with": sink_scores(model, with_bos, batch_size=batch_size, progress=progress),
             "without": sink_scores(model, without, batch_size=batch_size, progress=progress)}
    return BosTest(bos, loss, sinks, n_resamples, seed)
