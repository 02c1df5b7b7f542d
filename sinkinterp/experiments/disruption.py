"""Jin et al. (2025), massive-value disruption: does replacing the largest rotated q/k channel of
every head by its mean break contextual knowledge (a passkey read from the prompt) more than
parametric knowledge (facts recalled from the weights), and more than the same edit of the
smallest channel?"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sinkinterp._batches import check_int, progress_bar
from sinkinterp.backends import Model
from sinkinterp.data import FACTS, AnswerPrompts, fact_prompts, passkey_filler, passkey_prompts
from sinkinterp.interventions import DisruptQKChannels, intervene
from sinkinterp.stats import Estimate, bootstrap_mean, bootstrap_statistic, check_bootstrap_options

__all__ = ["QKDisruptionTest", "qk_disruption_test", "score_answers"]

CONDITIONS = ("clean", "massive", "lowest")


@torch.no_grad()
def score_answers(model: Model, prompts: AnswerPrompts, interventions=(), *, batch_size: int = 8) -> tuple[Tensor, Tensor]:
    """Per prompt: whether every answer token is the top-1 prediction under teacher forcing
    (exact match, as greedy decoding would write it) and the answer's total log-probability.
    Only rows of one length share a forward pass (never padding), so per-sequence statistics such
    as the disruption's see each row's own positions only."""
    check_int("batch_size", batch_size, 1)
    n = prompts.n_prompts
    exact, logprob = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    device = next(model.parameters()).device
    by_length: dict[tuple[int, int], list[int]] = {}
    for r, (row, n_prompt) in enumerate(zip(prompts.rows, prompts.prompt_len)):
        by_length.setdefault((len(row), n_prompt), []).append(r)
    for (_, n_prompt), members in by_length.items():
        for start in range(0, len(members), batch_size):
            rows = members[start : start + batch_size]
            tokens = torch.stack([prompts.rows[r] for r in rows]).to(device)
            with intervene(model, *interventions):
                logits = model(tokens)[:, n_prompt - 1 : -1].double()
            target = tokens[:, n_prompt:]
            exact[rows] = (logits.argmax(-1) == target).all(dim=-1).double().cpu()
            logprob[rows] = logits.log_softmax(-1).gather(-1, target[..., None])[..., 0].sum(-1).cpu()
    return exact, logprob


@dataclass(frozen=True)
class QKDisruptionTest:
    """``exact[task][condition]`` / ``logprob[...]``: per-prompt exact match (0/1) and answer
    log-probability, for the tasks ``passkey`` (contextual), ``facts`` (parametric) and
    ``facts_in_filler`` (the facts behind the passkey prompt's filler: as long, with no key), under the
    conditions ``clean``, ``massive`` (top-``top_k`` channels disrupted) and ``lowest`` (the control)."""

    top_k: int
    rotated: bool
    exact: dict[str, dict[str, Tensor]]
    logprob: dict[str, dict[str, Tensor]]
    prompts: dict[str, dict[str, Any]]
    n_resamples: int
    seed: int

    def retention(self, task: str, condition: str) -> Estimate:
        """Accuracy under ``condition`` over the clean accuracy (paired over prompts); 1 = untouched."""
        def ratio(edited: Tensor, clean: Tensor) -> Tensor:
            return edited.mean(dim=1) / clean.mean(dim=1).clamp(min=1e-12)

        return bootstrap_statistic(ratio, self.exact[task][condition], self.exact[task]["clean"],
                                   n_resamples=self.n_resamples, seed=self.seed)

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for task, by_condition in self.exact.items():
            for condition in CONDITIONS:
                row = {"task": task, "condition": condition,
                       "accuracy": bootstrap_mean(by_condition[condition], n_resamples=self.n_resamples,
                                                  seed=self.seed).to_dict(),
                       "answer_logprob": float(self.logprob[task][condition].mean())}
                if condition != "clean":
                    row["retention"] = self.retention(task, condition).to_dict()
                out.append(row)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "rotated": self.rotated, "rows": self.rows(), "prompts": self.prompts,
                "n_resamples": self.n_resamples, "seed": self.seed}

    def summary(self) -> str:
        where = "after" if self.rotated else "before"
        lines = [f"massive-value disruption (per head, the top {self.top_k} q/k channel(s) {where} rotary -> "
                 "their mean over the sequence; control: the lowest):"]
        for row in self.rows():
            acc = row["accuracy"]
            text = (f"  {row['task']:<8} {row['condition']:<8} accuracy {acc['value']:.3f} "
                    f"[{acc['low']:.3f}, {acc['high']:.3f}], answer log-prob {row['answer_logprob']:+.2f}")
            if "retention" in row:
                r = row["retention"]
                text += f", retention {r['value']:.2f} [{r['low']:.2f}, {r['high']:.2f}]"
            lines.append(text)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()


def qk_disruption_test(model: Model, *, top_k: int = 1, n_passkey: int = 40, context_len: int = 128,
                       digits: int = 6, facts: Sequence[tuple[str, str]] = FACTS, rotated: bool = True, seed: int = 0, n_resamples: int = 2000,
                       progress: bool | None = None) -> QKDisruptionTest:
    """Jin et al.'s experiment on ``model``: ``n_passkey`` passkey prompts of about ``context_len``
    tokens (keys of ``digits`` digits) and ``facts`` (the built-in :data:`~sinkinterp.data.FACTS`; bare, and
    behind as much filler), each scored clean, with the
    ``top_k`` largest rotated q/k channels of every head replaced by their mean, and with the
    ``top_k`` smallest replaced instead (``rotated``: after the rotary embedding, else before)."""
    check_int("top_k", top_k, 1)
    check_bootstrap_options(n_resamples, 0.95)
    passkey = passkey_prompts(model, n_passkey, context_len, digits=digits, seed=seed)
    # the facts again behind as much filler as a passkey prompt holds: the same length, no key
    n_fill = passkey_filler(model, context_len, digits, 0 if passkey.first_token == "none" else 1)
    tasks = {"passkey": passkey, "facts": fact_prompts(model, facts),
             "facts_in_filler": fact_prompts(model, facts, filler=n_fill)}
    edits = {"clean": (), "massive": (DisruptQKChannels(top_k=top_k, select="massive", rotated=rotated),),
             "lowest": (DisruptQKChannels(top_k=top_k, select="lowest", rotated=rotated),)}
    exact: dict[str, dict[str, Tensor]] = {}
    logprob: dict[str, dict[str, Tensor]] = {}
    steps = progress_bar()(total=len(tasks) * len(edits), desc="massive-value disruption", disable=progress is False)
    for task, prompts in tasks.items():
        exact[task], logprob[task] = {}, {}
        for condition, interventions in edits.items():
            exact[task][condition], logprob[task][condition] = score_answers(model, prompts, interventions)
            steps.update()
    steps.close()
    return QKDisruptionTest(top_k, rotated, exact, logprob, {task: p.to_dict() for task, p in tasks.items()},
                            n_resamples, seed)
