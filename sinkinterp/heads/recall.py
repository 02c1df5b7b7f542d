"""Greedy reproduction of the needle (Wu et al.'s retrieval score on the model's own output)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sinkinterp._batches import (
    check_int,
)
from sinkinterp.backends import (
    Model,
    capabilities,
)
from sinkinterp.data import (
    NeedlePrompts,
)
from sinkinterp.errors import SinkInterpError
from sinkinterp.heads.scores import needle_hits

# --------------------------------------------------------------------------------------------
# Greedy reproduction of the needle


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _rouge1_recall(reference: str, response: str, exclude: str = "") -> float:
    """Share of the reference's words found in the response (with multiplicity): ROUGE-1 recall.
    ``exclude``: leave out the reference words that also occur in this text (the question), so that
    repeating the question is not counted as reproducing the needle."""
    ref, remaining = _words(reference), _words(response)
    if exclude:
        asked = set(_words(exclude))
        ref = [word for word in ref if word not in asked]
    hits = 0
    for word in ref:
        if word in remaining:
            remaining.remove(word)
            hits += 1
    return hits / max(len(ref), 1)


def _decode_steps(model: Model, prompts: Tensor, n_steps: int,
                  on_pattern: Callable[[int, int, Tensor], None]) -> Tensor:
    """Greedy tokens [batch, n_steps]; ``on_pattern(step, layer, pattern[batch, head, key])``
    sees each step's last-query attention. HookedTransformer uses its key/value cache; other
    models (TransformerBridge) recompute the whole sequence each step."""
    step = {"i": 0}

    def hook(layer: int):
        def keep(pattern, hook):
            on_pattern(step["i"], layer, pattern[:, :, -1, :])

        return keep

    hooks = [(f"blocks.{layer}.attn.hook_pattern", hook(layer)) for layer in range(model.cfg.n_layers)]
    out = []
    with torch.inference_mode(), model.hooks(fwd_hooks=hooks):
        if capabilities(model).kv_cache:
            from transformer_lens.cache.key_value_cache import (
                TransformerLensKeyValueCache,
            )

            cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, prompts.shape[0])
            logits = model(prompts, past_kv_cache=cache)
            for i in range(n_steps):
                nxt = logits[:, -1].argmax(dim=-1)
                out.append(nxt.cpu())
                if i + 1 < n_steps:
                    step["i"] = i + 1
                    logits = model(nxt[:, None], past_kv_cache=cache)
        else:
            sequence = prompts
            for i in range(n_steps):
                step["i"] = i
                nxt = model(sequence)[:, -1].argmax(dim=-1)
                out.append(nxt.cpu())
                sequence = torch.cat([sequence, nxt[:, None]], dim=1)
    return torch.stack(out, dim=1)


def greedy_recall(model: Model, data: NeedlePrompts, *, extra_steps: int = 4, batch_size: int = 8,
                  success: float = 0.5) -> dict[str, Any]:
    """Let the model answer each prompt greedily and score retrieval as Wu et al.: at every step
    the model produces token w, a head scores a hit if its top-1 key is a needle position holding
    w; per prompt, hits / needle length (at most 1). Generation stops at the first line break
    after some text, or after ``needle_len + extra_steps`` tokens.

    A prompt counts as reproduced when the answer holds more than ``success`` of the needle's *new
    content*: its words that are not in the question (for the default needle and question, the city
    and the number: the name, "The secret code of", "from" and "is" are all in the question, so an
    answer that repeats the question without the number does not pass; both are needed). Wu et al.'s literal rule, ROUGE-1
    recall of all the needle's words, is kept as ``*_wu``; prompts built without questions use it.

    Returns ``score`` [layers, heads] averaged over the prompts reproduced (NaN if none), and
    ``score_wu`` over the prompts Wu's rule passes, plus per prompt the response, both ROUGE-1
    recalls and whether it reproduces the needle exactly.
    """
    if not isinstance(data, NeedlePrompts):
        raise SinkInterpError(f"greedy_recall takes NeedlePrompts (see needle_prompts), got {type(data).__name__}")
    check_int("extra_steps", extra_steps, 0)
    check_int("batch_size", batch_size, 1)
    if isinstance(success, bool) or not isinstance(success, (int, float)) or not 0 <= success < 1:
        raise SinkInterpError(f"success must be a ROUGE-1 recall in [0, 1), got {success!r}")
    if data.prompt_len + int(data.needle_len.max()) + extra_steps > model.cfg.n_ctx:
        raise SinkInterpError(f"prompts of {data.prompt_len} tokens plus {int(data.needle_len.max()) + extra_steps} "
                              f"generated exceed the model's context n_ctx = {model.cfg.n_ctx}: lower extra_steps")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise SinkInterpError("greedy recall decodes the model's answers and needs a tokenizer")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    n_steps = int(data.needle_len.max()) + extra_steps
    per_prompt = torch.zeros(data.n_prompts, n_layers, n_heads, dtype=torch.float64)
    responses, rouge, rouge_wu, exact, lengths = [], [], [], [], []
    for start in range(0, data.n_prompts, batch_size):
        rows = torch.arange(start, min(start + batch_size, data.n_prompts))
        top = torch.zeros(len(rows), n_steps, n_layers, n_heads, dtype=torch.long)

        def on_pattern(step: int, layer: int, pattern: Tensor, top=top) -> None:
            top[:, step, layer] = pattern.argmax(dim=-1).cpu()

        generated = _decode_steps(model, data.prompts[rows], n_steps, on_pattern)
        for local, row in enumerate(rows.tolist()):
            tokens = generated[local].tolist()
            length = _answer_length(tokenizer, tokens)
            text = tokenizer.decode(tokens[:length])
            needle = data.needles[row] if data.needles else tokenizer.decode(data.needle_ids(row))
            responses.append(text)
            lengths.append(length)
            question = data.questions[row] if data.questions else ""
            rouge_wu.append(_rouge1_recall(needle, text))
            rouge.append(_rouge1_recall(needle, text, exclude=question) if question else rouge_wu[-1])
            exact.append(text.strip() == needle.strip())
            produced = generated[local, :length]
            hits = needle_hits(
                data, torch.full((length,), row), top[local, :length].reshape(length, -1),
                produced,
            ).reshape(length, n_layers, n_heads)
            per_prompt[row] = (hits.sum(dim=0).double() / int(data.needle_len[row])).clamp(max=1)
    def mean_over(passed: Tensor) -> Tensor:
        return per_prompt[passed].mean(dim=0) if bool(passed.any()) else torch.full((n_layers, n_heads), math.nan)

    reproduced = torch.tensor([r > success for r in rouge])
    reproduced_wu = torch.tensor([r > success for r in rouge_wu])
    return {
        "score": mean_over(reproduced).float(),
        "score_wu": mean_over(reproduced_wu).float(),
        "per_prompt": per_prompt.float(),
        "responses": responses,
        "rouge1_recall": rouge,
        "rouge1_recall_wu": rouge_wu,
        "rule": "new content" if data.questions else "Wu et al. (no questions recorded)",
        "exact": exact,
        "reproduced": reproduced.tolist(),
        "reproduced_wu": reproduced_wu.tolist(),
        "reproduction_rate": float(reproduced.double().mean()),
        "reproduction_rate_wu": float(reproduced_wu.double().mean()),
        "exact_rate": float(torch.tensor(exact, dtype=torch.float64).mean()),
    }


def _answer_length(tokenizer, tokens: list[int]) -> int:
    """Tokens up to the first line break that follows some text, or to an end-of-turn token."""
    stops = {tokenizer.eos_token_id, *tokenizer.all_special_ids}
    seen_text = False
    for i, token in enumerate(tokens):
        if token in stops:
            return max(i, 1)
        piece = tokenizer.decode([token])
        if "\n" in piece and seen_text:
            return i
        seen_text = seen_text or bool(piece.strip())
    return len(tokens)


