"""Offline token data: the corpus that ships with Python, and seeded synthetic sequences.

No dataset hub is reachable, so natural text comes from ``pydoc_data.topics`` (the help texts of
the Python standard library, ~460 kB of English prose and code) or any text the caller passes.
The BOS policy is explicit everywhere: ``first_token="none"`` (the default, the way SmolLM2's
tokenizer works), ``"bos"``, a token string, or a token id.
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor

from sinkinterp.errors import SinkInterpError

__all__ = ["corpus_text", "corpus_tokens", "random_tokens", "repeated_random_tokens", "resolve_token"]

FirstToken = str | int


def corpus_text() -> str:
    """The offline corpus: every ``pydoc_data.topics`` entry, sorted by topic name, blank-line separated."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def _tokenizer(model):
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise SinkInterpError(
            f"{type(model).__name__} has no tokenizer, so it cannot tokenize text or resolve "
            "token strings: use random_tokens(...) or pass first_token as a token id"
        )
    return tokenizer


def resolve_token(model, token: FirstToken) -> int:
    """The id of ``token``: ``"bos"``, an exact vocabulary entry, text that is one token, or an id."""
    d_vocab = model.cfg.d_vocab
    if isinstance(token, int) and not isinstance(token, bool):
        if not 0 <= token < d_vocab:
            raise SinkInterpError(f"token id {token} out of range: vocabulary is 0..{d_vocab - 1}")
        return token
    if not isinstance(token, str) or not token:
        raise SinkInterpError(f"first token must be 'none', 'bos', a token string or an id, got {token!r}")
    tokenizer = _tokenizer(model)
    if token == "bos":
        if tokenizer.bos_token_id is None:
            raise SinkInterpError("first_token='bos' but the tokenizer defines no BOS token")
        return int(tokenizer.bos_token_id)
    vocab_id = tokenizer.get_vocab().get(token)
    if vocab_id is not None:
        return int(vocab_id)
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise SinkInterpError(
            f"first token {token!r} is not a single token: it encodes to {len(ids)} tokens {ids}; "
            "pass 'bos', a vocabulary entry such as '<|endoftext|>', or a token id"
        )
    return int(ids[0])


def _check_counts(n_seqs: int, seq_len: int, model, *, min_len: int = 1) -> None:
    for label, value, low in (("n_seqs", n_seqs, 1), ("seq_len", seq_len, min_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise SinkInterpError(f"{label} must be an integer >= {low}, got {value!r}")
    if seq_len > model.cfg.n_ctx:
        raise SinkInterpError(
            f"seq_len {seq_len} exceeds the model's context: n_ctx = {model.cfg.n_ctx}"
        )


def _with_first(tokens: Tensor, first_id: int | None) -> Tensor:
    if first_id is None:
        return tokens
    first = torch.full((tokens.shape[0], 1), first_id, dtype=tokens.dtype)
    return torch.cat([first, tokens], dim=1)


def _first_id(model, first_token: FirstToken) -> int | None:
    return None if first_token == "none" else resolve_token(model, first_token)


def corpus_tokens(
    model,
    n_seqs: int,
    seq_len: int,
    *,
    text: str | None = None,
    first_token: FirstToken = "none",
) -> Int[Tensor, "n_seqs seq_len"]:
    """Consecutive, non-overlapping chunks of the tokenized text, from its start.

    The whole text is tokenized once without special tokens. With ``first_token`` other than
    ``"none"``, each row is that token followed by ``seq_len - 1`` text tokens, so every row has
    exactly ``seq_len`` tokens either way. Anyone can rebuild the same tensor from the same text
    and arguments.
    """
    first_id = _first_id(model, first_token)
    _check_counts(n_seqs, seq_len, model, min_len=1 if first_id is None else 2)
    if text is None:
        text = corpus_text()
    tokenizer = _tokenizer(model)
    # verbose=False: the corpus is far longer than model_max_length, and that is intended here.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n_text = seq_len - (first_id is not None)
    needed = n_seqs * n_text
    if len(ids) < needed:
        raise SinkInterpError(
            f"the text has {len(ids)} tokens but {n_seqs} sequences of {n_text} text tokens need "
            f"{needed}: ask for at most {len(ids) // n_text} sequences of this length, shorter "
            "sequences, or pass a longer text"
        )
    tokens = torch.tensor(ids[:needed], dtype=torch.long).reshape(n_seqs, n_text)
    return _with_first(tokens, first_id)


def _allowed_ids(model) -> Tensor:
    """Token ids to sample from: the whole vocabulary minus the tokenizer's special tokens."""
    ids = torch.arange(model.cfg.d_vocab)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return ids
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    return ids[~torch.isin(ids, special)]


def random_tokens(
    model, n_seqs: int, seq_len: int, *, seed: int = 0, first_token: FirstToken = "none"
) -> Int[Tensor, "n_seqs seq_len"]:
    """Uniformly random non-special tokens from a seeded generator (``seq_len`` includes the first token)."""
    first_id = _first_id(model, first_token)
    _check_counts(n_seqs, seq_len, model, min_len=1 if first_id is None else 2)
    allowed = _allowed_ids(model)
    generator = torch.Generator().manual_seed(seed)
    n_random = seq_len - (first_id is not None)
    picks = torch.randint(len(allowed), (n_seqs, n_random), generator=generator)
    return _with_first(allowed[picks], first_id)


def repeated_random_tokens(
    model, n_seqs: int, half_len: int, *, seed: int = 0, first_token: FirstToken = "none"
) -> Int[Tensor, "n_seqs seq"]:
    """``[x_1..x_n, x_1..x_n]`` for random ``x`` (n = ``half_len``), for induction and duplicate heads.

    With ``first_token`` the sequence is that token followed by both halves (length 2n + 1), so
    the halves stay aligned: position i of the second half repeats position i - n.
    """
    first_id = _first_id(model, first_token)
    _check_counts(n_seqs, 2 * half_len + (first_id is not None), model)
    half = random_tokens(model, n_seqs, half_len, seed=seed)
    return _with_first(torch.cat([half, half], dim=1), first_id)
