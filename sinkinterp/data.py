"""Offline token data: the corpus that ships with Python, and seeded synthetic sequences.

No dataset hub is reachable, so natural text comes from ``pydoc_data.topics`` (the help texts of
the Python standard library, ~460 kB of English prose and code) or any text the caller passes.
The BOS policy is explicit everywhere: ``first_token="default"`` (the model's own convention,
recorded in its :class:`~sinkinterp.models.ModelSource`: nothing for SmolLM2, whose tokenizer adds
no BOS; ``<bos>`` for Gemma-3, which was trained with it), ``"none"``, ``"bos"``, a token string,
or a token id.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from sinkinterp._batches import check_int, check_seed
from sinkinterp.backends import Model
from sinkinterp.errors import SinkInterpError
from sinkinterp.models import model_source

__all__ = [
    "default_first_token",
    "corpus_text",
    "corpus_documents",
    "corpus_tokens",
    "random_tokens",
    "repeated_random_tokens",
    "resolve_token",
    "corpus_windows",
    "prompt_ids",
    "NeedlePrompts",
    "needle_prompts",
    "AnswerPrompts",
    "passkey_prompts",
    "fact_prompts",
    "FACTS",
]

FirstToken = str | int


def corpus_text() -> str:
    """The offline corpus as one string: every ``pydoc_data.topics`` entry (repeats included),
    sorted by topic name, blank-line separated. What ``sampling="consecutive"`` reads by default."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def _tokenizer(model: Model):
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise SinkInterpError(
            f"{type(model).__name__} has no tokenizer, so it cannot tokenize text or resolve "
            "token strings: use random_tokens(...) or pass first_token as a token id"
        )
    return tokenizer


def resolve_token(model: Model, token: FirstToken) -> int:
    """The id of ``token``: ``"bos"``, an exact vocabulary entry, text that is one token, or an id."""
    d_vocab = model.cfg.d_vocab
    if isinstance(token, int) and not isinstance(token, bool):
        if not 0 <= token < d_vocab:
            raise SinkInterpError(f"token id {token} out of range: vocabulary is 0..{d_vocab - 1}")
        return token
    if not isinstance(token, str) or not token or token in ("none", "default"):
        raise SinkInterpError(f"first token must be 'default', 'none', 'bos', a token string or an id, got {token!r}")
    tokenizer = _tokenizer(model)
    if token == "bos":
        if tokenizer.bos_token_id is None:
            raise SinkInterpError("first_token='bos' but the tokenizer defines no BOS token")
        return int(tokenizer.bos_token_id)
    vocab_id = tokenizer.get_vocab().get(token)
    if vocab_id is not None:
        return int(vocab_id)
    ids = tokenizer.encode(token, add_special_tokens=False)
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids == [unk]:
        raise SinkInterpError(f"first token {token!r} is not in the vocabulary: it encodes to the unknown token "
                              f"{tokenizer.unk_token!r} (id {unk}); pass a vocabulary entry or a token id")
    if len(ids) != 1:
        raise SinkInterpError(
            f"first token {token!r} is not a single token: it encodes to {len(ids)} tokens {ids}; "
            "pass 'bos', a vocabulary entry such as '<|endoftext|>', or a token id"
        )
    return int(ids[0])


def _check_counts(n_seqs: int, seq_len: int, model: Model, *, min_len: int = 1) -> None:
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


def default_first_token(model: Model) -> str:
    """The model's own BOS convention: ``"bos"`` if its tokenizer prepends BOS (Gemma-3), else
    ``"none"`` (SmolLM2, tiny test models). What ``first_token="default"`` resolves to."""
    try:
        prepend = model_source(model).prepend_bos
    except SinkInterpError:  # a model built elsewhere: TransformerLens's own setting
        prepend = bool(getattr(model.cfg, "default_prepend_bos", False))
    return "bos" if prepend else "none"


def resolve_first_token(model: Model, first_token: FirstToken) -> FirstToken:
    """``first_token`` with ``"default"`` replaced by the model's convention (see :func:`default_first_token`)."""
    return default_first_token(model) if first_token == "default" else first_token


def _first_id(model: Model, first_token: FirstToken) -> int | None:
    first_token = resolve_first_token(model, first_token)
    return None if first_token == "none" else resolve_token(model, first_token)


def _first_ids(model: Model, first_token: FirstToken) -> list[int]:
    """What goes before a prompt's text: ``[]`` or the one first token's id."""
    first_id = _first_id(model, first_token)
    return [] if first_id is None else [first_id]


SAMPLING = ("windows", "consecutive")


def describe_sampling(record: dict) -> str:
    """How corpus tokens were drawn, from a record with ``sampling`` (and ``seed``): for summaries."""
    return {"windows": f"seeded windows (seed {record.get('seed')})",
            "consecutive": "consecutive chunks from the start"}.get(record.get("sampling"), "")


def corpus_documents() -> list[str]:
    """The offline corpus as documents without repeats, sorted by topic name.

    Many ``pydoc_data.topics`` entries are excerpts of others (``if``, ``while`` and ``try`` are
    sections of ``compound``; ``customization`` of ``specialnames``; ``else`` and ``if`` are the
    same text), so a quarter of the corpus's paragraphs appear twice. Sampled windows must not
    give calibration and evaluation the same text, so topics are visited longest first and one is
    dropped when at least half of its text (in paragraphs of over 40 characters) already appeared
    in a kept topic: 57 of the 79 topics remain, and under 0.1% of their text repeats.
    """
    return list(_deduplicated_topics())


@functools.lru_cache(maxsize=1)
def _deduplicated_topics() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    texts = {name: topics[name].strip() for name in topics}
    seen: set[str] = set()
    kept = []
    for name in sorted(texts, key=lambda n: (-len(texts[n]), n)):
        paragraphs = [part.strip() for part in texts[name].split("\n\n") if part.strip()]
        total = sum(map(len, paragraphs))
        repeated = sum(len(part) for part in paragraphs if len(part) > 40 and part in seen)
        if total and repeated >= total / 2:
            continue
        kept.append(name)
        seen.update(paragraphs)
    return tuple(texts[name] for name in sorted(kept))


def corpus_tokens(
    model: Model,
    n_seqs: int,
    seq_len: int,
    *,
    text: str | Sequence[str] | None = None,
    first_token: FirstToken = "default",
    seed: int = 0,
    sampling: str = "windows",
) -> Int[Tensor, "n_seqs seq_len"]:
    """``n_seqs`` rows of natural text, ``seq_len`` tokens each including the first token.

    ``text`` is one document (a string) or several (a sequence of strings); by default the
    offline corpus, one document per ``pydoc_data.topics`` entry without the topics that repeat
    others (:func:`corpus_documents`).

    ``sampling="windows"`` (the default) draws seeded windows from the whole corpus, never
    across a document boundary: each document of ``L`` tokens is cut into ``L // n`` windows of
    ``n`` text tokens, starting at a seeded offset within its last ``L % n`` tokens (documents
    shorter than one window are skipped); all windows are shuffled with ``seed`` and the first
    ``n_seqs`` are returned. Rows never overlap, so the first ``k`` rows of a draw are disjoint
    from the rest (a calibration / evaluation split), and a draw of ``k`` rows equals the first
    ``k`` rows of a larger draw with the same seed and length.

    ``sampling="consecutive"`` is the older rule: the documents joined by blank lines (by default
    :func:`corpus_text`, every topic), cut into consecutive chunks from the start of the text (so
    every row comes from its first ``n_seqs * seq_len`` tokens; the seed is not used).

    With ``first_token`` other than ``"none"``, each row is that token followed by ``seq_len - 1``
    text tokens. Text is tokenized without special tokens.
    """
    first_id = _first_id(model, first_token)
    _check_counts(n_seqs, seq_len, model, min_len=1 if first_id is None else 2)
    if sampling not in SAMPLING:
        raise SinkInterpError(f"sampling must be one of {SAMPLING}, got {sampling!r}")
    check_seed(seed)
    documents = _documents(text)
    n_text = seq_len - (first_id is not None)
    if sampling == "consecutive":
        ids = text_ids(model, corpus_text() if text is None else "\n\n".join(documents))
        needed = n_seqs * n_text
        if len(ids) < needed:
            raise SinkInterpError(
                f"the text has {len(ids)} tokens but {n_seqs} sequences of {n_text} text tokens need "
                f"{needed}: ask for at most {len(ids) // n_text} sequences of this length, shorter "
                "sequences, or pass a longer text"
            )
        tokens = torch.tensor(ids[:needed], dtype=torch.long).reshape(n_seqs, n_text)
        return _with_first(tokens, first_id)
    rng = random.Random(seed)
    windows: list[list[int]] = []
    for document in documents:
        ids = text_ids(model, document)
        n_windows = len(ids) // n_text
        if n_windows == 0:
            continue
        start = rng.randrange(len(ids) - n_windows * n_text + 1)
        windows.extend(ids[start + i * n_text : start + (i + 1) * n_text] for i in range(n_windows))
    rng.shuffle(windows)
    if len(windows) < n_seqs:
        raise SinkInterpError(
            f"the text holds {len(windows)} non-overlapping windows of {n_text} text tokens within its "
            f"{len(documents)} document(s) but {n_seqs} sequences were asked for: ask for at most "
            f"{len(windows)} sequences of this length, shorter sequences, a longer text, or "
            "sampling='consecutive' (which also crosses document boundaries)"
        )
    return _with_first(torch.tensor(windows[:n_seqs], dtype=torch.long), first_id)


def _documents(text) -> list[str]:
    if text is None:
        return corpus_documents()
    if isinstance(text, str):
        return [text]
    if isinstance(text, Sequence) and not isinstance(text, (bytes, bytearray)) and text:
        bad = [type(d).__name__ for d in text if not isinstance(d, str)]
        if not bad:
            return list(text)
        raise SinkInterpError(f"text documents must be strings, got {bad[0]}")
    raise SinkInterpError(f"text must be a string or a non-empty sequence of strings (documents), "
                          f"got {type(text).__name__}")


def corpus_windows(model: Model, n_seqs: int, seq_len: int, *, seed: int = 0, text: str | None = None,
                   first_token: FirstToken = "default") -> Int[Tensor, "n_seqs seq_len"]:
    """``n_seqs`` windows of text tokens at seeded random offsets (may overlap), ``seq_len`` tokens
    with the first token: a different sample of the text for each seed, where :func:`corpus_tokens`
    always takes its start."""
    first_id = _first_id(model, first_token)
    _check_counts(n_seqs, seq_len, model, min_len=1 if first_id is None else 2)
    n_text = seq_len - (first_id is not None)
    ids = text_ids(model, corpus_text() if text is None else text)
    if len(ids) < n_text:
        raise SinkInterpError(f"the text has {len(ids)} tokens, fewer than one window of {n_text}")
    rng = random.Random(check_seed(seed))
    starts = [rng.randrange(len(ids) - n_text + 1) for _ in range(n_seqs)]
    return _with_first(torch.tensor([ids[s : s + n_text] for s in starts], dtype=torch.long), first_id)


_TEXT_IDS: dict[tuple[str, int, str], list[int]] = {}


def text_ids(model: Model, text: str) -> list[int]:
    """``text`` tokenized without special tokens, cached per tokenizer (the corpus takes ~1 s)."""
    if not isinstance(text, str):
        raise SinkInterpError(f"text must be a string (decoded text, not bytes or a path object), got "
                              f"{type(text).__name__}")
    tokenizer = _tokenizer(model)
    key = (str(getattr(tokenizer, "name_or_path", "")), len(tokenizer), hashlib.sha256(text.encode()).hexdigest())
    if key not in _TEXT_IDS:
        # verbose=False: the corpus is far longer than model_max_length, and that is intended here.
        _TEXT_IDS[key] = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return _TEXT_IDS[key]


def prompt_ids(model: Model, text: str, first_token: FirstToken = "default") -> list[int]:
    """``text`` as the model would be fed it: ``first_token`` (``"default"``: the model's BOS
    convention, so ``<bos>`` on Gemma-3 and nothing on SmolLM2; ``"none"``; ``"bos"``; a token or
    an id), then the text tokenized without special tokens."""
    return _first_ids(model, first_token) + text_ids(model, text)


def allowed_ids(model: Model) -> Tensor:
    """Token ids to sample from: the whole vocabulary minus the tokenizer's special tokens."""
    ids = torch.arange(model.cfg.d_vocab)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return ids
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    return ids[~torch.isin(ids, special)]


def random_tokens(
    model: Model, n_seqs: int, seq_len: int, *, seed: int = 0, first_token: FirstToken = "default"
) -> Int[Tensor, "n_seqs seq_len"]:
    """Uniformly random non-special tokens from a seeded generator (``seq_len`` includes the first token)."""
    first_id = _first_id(model, first_token)
    _check_counts(n_seqs, seq_len, model, min_len=1 if first_id is None else 2)
    allowed = allowed_ids(model)
    generator = torch.Generator().manual_seed(check_seed(seed))
    n_random = seq_len - (first_id is not None)
    picks = torch.randint(len(allowed), (n_seqs, n_random), generator=generator)
    return _with_first(allowed[picks], first_id)


def repeated_random_tokens(
    model: Model, n_seqs: int, half_len: int, *, seed: int = 0, first_token: FirstToken = "default"
) -> Int[Tensor, "n_seqs seq"]:
    """``[x_1..x_n, x_1..x_n]`` for random ``x`` (n = ``half_len``), for induction and duplicate heads.

    With ``first_token`` the sequence is that token followed by both halves (length 2n + 1), so
    the halves stay aligned: position i of the second half repeats position i - n.
    """
    first_id = _first_id(model, first_token)
    _check_counts(n_seqs, 2 * half_len + (first_id is not None), model)
    half = random_tokens(model, n_seqs, half_len, seed=seed)
    return _with_first(torch.cat([half, half], dim=1), first_id)


# --------------------------------------------------------------------------------------------
# Needle-in-a-haystack prompts (for recall / retrieval heads, Wu et al. 2024)

_FIRST_NAMES = (
    "Marta", "Kenji", "Amara", "Lars", "Priya", "Diego", "Sofia", "Tomas", "Ingrid", "Rafael",
    "Yusuf", "Elena", "Mateo", "Hana", "Oskar", "Leila", "Nikolai", "Aisha", "Bruno", "Clara",
    "Dmitri", "Esther", "Felipe", "Greta", "Hugo", "Imani", "Jonas", "Keiko", "Luca", "Mira",
)
_LAST_NAMES = (
    "Oliveira", "Watanabe", "Okafor", "Eriksson", "Raman", "Alvarez", "Novak", "Lindqvist",
    "Moreau", "Castillo", "Demir", "Petrova", "Romero", "Sato", "Berg", "Haddad", "Volkov",
    "Mensah", "Costa", "Weber", "Ivanova", "Klein", "Duarte", "Holm", "Laurent", "Nwosu", "Falk",
)
_CITIES = (
    "Lisbon", "Osaka", "Lagos", "Uppsala", "Chennai", "Cordoba", "Brno", "Malmo", "Lyon", "Quito",
    "Izmir", "Kazan", "Seville", "Sapporo", "Bergen", "Beirut", "Tartu", "Accra", "Porto", "Graz",
)
NEEDLE_TEMPLATE = "The secret code of {name} from {city} is {number}."
# Phrased as a question with the needle's own words: SmolLM2-135M answers it with the sentence
# (ROUGE-1 recall > 0.5) in 60-75% of prompts at 256-1024 tokens, against 0-25% for a bare
# "Repeat the sentence about X word for word." (measured on 8 prompts per length).
REQUEST_TEMPLATE = (
    "\n\nQuestion: What is the secret code of {name}? Answer with the full sentence from the text.\nAnswer:\n"
)
_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class NeedlePrompts:
    """Needle-in-a-haystack prompts followed by the needle again (the answer, for teacher forcing).

    Row r is ``tokens[r, :prompt_len]`` (haystack with the needle at ``needle_start[r]``, then the
    request to repeat it), then the needle's ``needle_len[r]`` tokens again, then padding up to
    the longest row. Every prompt has exactly ``prompt_len`` tokens, so greedy generation runs in
    one batch without padding; padding sits after each answer, where a causal model never looks.
    """

    tokens: Int[Tensor, "n_prompts pos"]
    prompt_len: int
    needle_start: Int[Tensor, " n_prompts"]
    needle_len: Int[Tensor, " n_prompts"]
    needles: tuple[str, ...] = ()
    depths: tuple[float, ...] = ()
    seed: int | None = None
    request: str = ""
    first_token: FirstToken = "none"
    """The resolved first-token policy the prompts were built with."""
    questions: tuple[str, ...] = ()
    """Each prompt's request text: its words are not evidence of reproducing the needle."""

    def __post_init__(self):
        tokens, n = self.tokens, self.tokens.shape[0] if isinstance(self.tokens, Tensor) else 0
        if not isinstance(tokens, Tensor) or tokens.ndim != 2 or n == 0:
            raise SinkInterpError("NeedlePrompts.tokens must be a non-empty 2-D tensor [n_prompts, pos]")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise SinkInterpError(f"NeedlePrompts.tokens must hold token ids (int64 or int32), got dtype {tokens.dtype}")
        if isinstance(self.prompt_len, bool) or not isinstance(self.prompt_len, int) or self.prompt_len < 1:
            raise SinkInterpError(f"NeedlePrompts.prompt_len must be an integer >= 1, got {self.prompt_len!r}")
        for label in ("needle_start", "needle_len"):
            value = getattr(self, label)
            if not isinstance(value, Tensor) or value.shape != (n,) or value.dtype.is_floating_point:
                raise SinkInterpError(f"NeedlePrompts.{label} must be an integer tensor of shape ({n},)")
        if bool((self.needle_len < 1).any()) or bool((self.needle_start < 0).any()):
            raise SinkInterpError("NeedlePrompts: every needle needs a start >= 0 and at least one token")
        end = self.needle_start + self.needle_len
        if bool((end > self.prompt_len).any()):
            row = int((end > self.prompt_len).nonzero()[0])
            raise SinkInterpError(
                f"needle of prompt {row} ends at {int(end[row])}, beyond the prompt's {self.prompt_len} tokens"
            )
        if self.prompt_len + int(self.needle_len.max()) > tokens.shape[1]:
            raise SinkInterpError(
                f"tokens have {tokens.shape[1]} positions but prompt ({self.prompt_len}) + answer "
                f"({int(self.needle_len.max())}) need {self.prompt_len + int(self.needle_len.max())}"
            )
        for row in range(n):
            start, length = int(self.needle_start[row]), int(self.needle_len[row])
            needle = tokens[row, start : start + length]
            answer = tokens[row, self.prompt_len : self.prompt_len + length]
            if not torch.equal(needle, answer):
                raise SinkInterpError(f"prompt {row}: the answer after the prompt is not the needle's tokens")

    @property
    def n_prompts(self) -> int:
        return self.tokens.shape[0]

    @property
    def prompts(self) -> Int[Tensor, "n_prompts prompt_len"]:
        return self.tokens[:, : self.prompt_len]

    def answer_steps(self) -> tuple[Tensor, Tensor, Tensor]:
        """Teacher-forced reproduction steps as flat (row, query position, target position):
        the query at ``prompt_len - 1 + t`` predicts answer token t, at ``prompt_len + t``."""
        rows, steps = [], []
        for row, length in enumerate(self.needle_len.tolist()):
            rows += [row] * length
            steps += range(length)
        rows_t, steps_t = torch.tensor(rows), torch.tensor(steps)
        return rows_t, self.prompt_len - 1 + steps_t, self.prompt_len + steps_t

    def needle_ids(self, row: int) -> list[int]:
        start = int(self.needle_start[row])
        return self.tokens[row, start : start + int(self.needle_len[row])].tolist()

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_prompts": self.n_prompts,
            "prompt_len": self.prompt_len,
            "needle_start": self.needle_start.tolist(),
            "needle_len": self.needle_len.tolist(),
            "needles": list(self.needles),
            "depths": list(self.depths),
            "seed": self.seed,
            "needle_template": NEEDLE_TEMPLATE,
            "request_template": self.request,
            "first_token": self.first_token,
            "questions": list(self.questions),
            "tokens_sha256": hashlib.sha256(self.tokens.numpy().tobytes()).hexdigest(),
        }


def _check_depths(depths) -> tuple[float, ...]:
    values = (depths,) if isinstance(depths, (int, float)) else tuple(depths)
    if not values:
        raise SinkInterpError("depths is empty: give needle depths in [0, 1], e.g. (0.25, 0.5, 0.75)")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise SinkInterpError(f"needle depth {value!r} is outside [0, 1] (0 = start of the haystack, 1 = end)")
    return tuple(float(v) for v in values)


def _line_break_near(model: Model, ids: list[int], at: int, reach: int = 24) -> int:
    """The insertion point nearest ``at`` that follows a token ending a line (else ``at``), so
    the needle is its own paragraph rather than a cut through a sentence."""
    tokenizer = _tokenizer(model)
    for distance in range(reach + 1):
        for j in (at - distance, at + distance):
            if 0 < j < len(ids) and tokenizer.decode([ids[j - 1]]).endswith("\n"):
                return j
    return at


def needle_prompts(
    model: Model,
    n_prompts: int,
    context_len: int,
    *,
    depths: Sequence[float] | float = (0.25, 0.5, 0.75),
    seed: int = 0,
    text: str | None = None,
    request: str = REQUEST_TEMPLATE,
    first_token: FirstToken = "default",
) -> NeedlePrompts:
    """``n_prompts`` prompts of exactly ``context_len`` tokens: a window of the offline corpus
    (at a seeded random offset) with a planted needle (a sentence with a random name, city and
    5-digit number, :data:`NEEDLE_TEMPLATE`) at depth ``depths[r % len(depths)]`` of the haystack,
    then a request to repeat it (``request``, with ``{name}``; :data:`REQUEST_TEMPLATE` by default);
    each row continues with the needle.

    ``first_token`` (the model's BOS convention by default) opens each prompt; with ``"none"``
    position 0 is a haystack token.
    """
    if isinstance(n_prompts, bool) or not isinstance(n_prompts, int) or n_prompts < 1:
        raise SinkInterpError(f"n_prompts must be an integer >= 1, got {n_prompts!r}")
    if isinstance(context_len, bool) or not isinstance(context_len, int) or context_len < 2:
        raise SinkInterpError(f"context_len must be an integer >= 2, got {context_len!r}")
    depths = _check_depths(depths)
    if not isinstance(request, str) or "{name}" not in request:
        raise SinkInterpError(f"request must be a string with a {{name}} field (the needle's name is asked for), "
                              f"got {request!r}")
    try:
        request.format(name="x")
    except (KeyError, IndexError, ValueError) as e:
        raise SinkInterpError(f"request {request!r} has a field other than {{name}} or a stray brace ({e}); "
                              "write literal braces as {{ and }}") from None
    if text is None:
        text = corpus_text()
    corpus = text_ids(model, text)
    prefix = _first_ids(model, first_token)
    rng = random.Random(check_seed(seed))
    rows, starts, lengths, needles, questions = [], [], [], [], []
    for row in range(n_prompts):
        name = f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}"
        needle = NEEDLE_TEMPLATE.format(name=name, city=rng.choice(_CITIES), number=rng.randint(10000, 99999))
        needle_ids = text_ids(model, needle)
        request_ids = text_ids(model, request.format(name=name))
        separator = text_ids(model, _SEPARATOR)
        n_hay = context_len - len(prefix) - len(needle_ids) - len(request_ids) - len(separator)
        if n_hay < 1:
            raise SinkInterpError(
                f"needle ({len(needle_ids)} tokens) and request ({len(request_ids)} tokens) do not fit in "
                f"context_len {context_len}: the needle is longer than the context; use context_len >= "
                f"{context_len - n_hay + 1}"
            )
        if context_len + len(needle_ids) > model.cfg.n_ctx:
            raise SinkInterpError(
                f"context_len {context_len} plus the answer ({len(needle_ids)} tokens) exceeds the model's "
                f"context: n_ctx = {model.cfg.n_ctx}"
            )
        if len(corpus) < n_hay:
            raise SinkInterpError(f"the text has {len(corpus)} tokens, fewer than the {n_hay} a haystack needs")
        offset = rng.randrange(len(corpus) - n_hay + 1)
        haystack = corpus[offset : offset + n_hay]
        at = _line_break_near(model, haystack, round(depths[row % len(depths)] * n_hay))
        prompt = prefix + haystack[:at] + needle_ids + separator + haystack[at:] + request_ids
        rows.append(prompt + needle_ids)
        starts.append(len(prefix) + at)
        lengths.append(len(needle_ids))
        needles.append(needle)
        questions.append(request.format(name=name))
    width = max(len(r) for r in rows)
    pad = _pad_token(model)
    tokens = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
    return NeedlePrompts(
        tokens=tokens,
        prompt_len=context_len,
        needle_start=torch.tensor(starts),
        needle_len=torch.tensor(lengths),
        needles=tuple(needles),
        depths=tuple(depths[r % len(depths)] for r in range(n_prompts)),
        seed=seed,
        request=request,
        first_token=resolve_first_token(model, first_token),
        questions=tuple(questions),
    )


def _pad_token(model: Model) -> int:
    tokenizer = _tokenizer(model)
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


# --------------------------------------------------------------------------------------------
# Prompts with one right answer: contextual (a passkey in the prompt) and parametric (facts)

#: The passkey task of Mohtashami & Jaggi (2023), as Jin et al. (2025) use it: a key hidden in
#: repeated filler, asked for at the end; answered from the context alone.
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"

#: Parametric knowledge: facts a small model may know from training, with one short answer and no
#: hint in the prompt (the counterpart of Jin et al.'s knowledge-QA sets).
FACTS: tuple[tuple[str, str], ...] = (
    ("The capital of France is", " Paris"), ("The capital of Italy is", " Rome"),
    ("The capital of Germany is", " Berlin"), ("The capital of Spain is", " Madrid"),
    ("The capital of Japan is", " Tokyo"), ("The capital of Russia is", " Moscow"),
    ("The capital of England is", " London"), ("The capital of China is", " Beijing"),
    ("The capital of Egypt is", " Cairo"), ("The capital of Greece is", " Athens"),
    ("The capital of Portugal is", " Lisbon"), ("The capital of Austria is", " Vienna"),
    ("The capital of Ireland is", " Dublin"), ("The capital of Norway is", " Oslo"),
    ("The capital of Sweden is", " Stockholm"), ("The capital of Poland is", " Warsaw"),
    ("The capital of Hungary is", " Budapest"), ("The capital of Kenya is", " Nairobi"),
    ("The capital of Thailand is", " Bangkok"), ("The capital of Canada is", " Ottawa"),
    ("The capital of Australia is", " Canberra"), ("The capital of Argentina is", " Buenos"),
    ("The capital of Peru is", " Lima"), ("The capital of Cuba is", " Havana"),
    ("The capital of Turkey is", " Ankara"), ("The capital of Iran is", " Tehran"),
    ("The capital of India is", " New"), ("The capital of Belgium is", " Brussels"),
    ("The capital of Denmark is", " Copenhagen"), ("The capital of Finland is", " Helsinki"),
    ("The Eiffel Tower is in the city of", " Paris"), ("The Colosseum is in the city of", " Rome"),
    ("The largest planet in the solar system is", " Jupiter"), ("The planet closest to the sun is", " Mercury"),
    ("Water is made of hydrogen and", " oxygen"), ("The opposite of hot is", " cold"),
    ("The first month of the year is", " January"), ("The day after Monday is", " Tuesday"),
    ("The color of the clear sky is", " blue"), ("The author of Hamlet is William", " Shakespeare"),
    ("The theory of relativity was developed by Albert", " Einstein"), ("The currency of Japan is the", " yen"),
)


@dataclass(frozen=True)
class AnswerPrompts:
    """Prompts each followed by its answer tokens, for teacher-forced exact-match scoring: row r is
    ``rows[r]`` (prompt, then answer), its first ``prompt_len[r]`` tokens the prompt. All answer
    tokens predicted top-1 under teacher forcing is exactly "greedy decoding writes the answer"."""

    task: str
    rows: tuple[Tensor, ...]
    prompt_len: tuple[int, ...]
    answers: tuple[str, ...]
    seed: int | None
    first_token: FirstToken

    @property
    def n_prompts(self) -> int:
        return len(self.rows)

    def to_dict(self) -> dict[str, Any]:
        joined = torch.cat(list(self.rows)).numpy().tobytes()
        return {"task": self.task, "n_prompts": self.n_prompts, "prompt_len": list(self.prompt_len),
                "answers": list(self.answers), "seed": self.seed, "first_token": self.first_token,
                "tokens_sha256": hashlib.sha256(joined).hexdigest()}


def _answer_row(model: Model, prefix: list[int], prompt: str, answer: str) -> tuple[Tensor, int]:
    """Token ids of prompt + answer, and the prompt's length; the answer's tokens are those the
    whole text has after the prompt's, so refuse a tokenizer that merges across the boundary."""
    whole, head = text_ids(model, prompt + answer), text_ids(model, prompt)
    if whole[: len(head)] != head or len(whole) == len(head):
        raise SinkInterpError(f"the tokenizer merges the answer {answer!r} into the prompt's last token; "
                              "cannot score it as a continuation")
    return torch.tensor(prefix + whole, dtype=torch.long), len(prefix) + len(head)


def passkey_filler(model: Model, context_len: int, digits: int, n_prefix: int) -> int:
    """How many filler sentences a passkey prompt of about ``context_len`` tokens holds."""
    fixed = n_prefix + len(text_ids(model, PASSKEY_INTRO + PASSKEY_NEEDLE.format(key="0" * digits) + PASSKEY_QUESTION))
    return (context_len - fixed) // len(text_ids(model, PASSKEY_FILLER))


def passkey_prompts(model: Model, n_prompts: int = 40, context_len: int = 128, *, digits: int = 6, seed: int = 0,
                    first_token: FirstToken = "default") -> AnswerPrompts:
    """``n_prompts`` passkey prompts of about ``context_len`` tokens (the intro, filler sentences
    with the key's sentence at a seeded random place, the question), each answered by its random
    ``digits``-digit key."""
    check_int("n_prompts", n_prompts, 1)
    check_int("digits", digits, 1)
    check_int("context_len", context_len, 2)
    prefix = _first_ids(model, first_token)
    n_fill = passkey_filler(model, context_len, digits, len(prefix))
    if n_fill < 1:
        raise SinkInterpError(f"context_len {context_len} leaves no room for filler around the key: use a longer "
                              "context_len (about 100 tokens or more)")
    rng = random.Random(check_seed(seed))
    rows, lens, answers = [], [], []
    for _ in range(n_prompts):
        key = "".join(str(rng.randrange(10)) for _ in range(digits))
        at = rng.randrange(n_fill + 1)
        prompt = (PASSKEY_INTRO + PASSKEY_FILLER * at + PASSKEY_NEEDLE.format(key=key)
                  + PASSKEY_FILLER * (n_fill - at) + PASSKEY_QUESTION)
        row, length = _answer_row(model, prefix, prompt, f" {key}")
        rows.append(row)
        lens.append(length)
        answers.append(key)
    return AnswerPrompts("passkey", tuple(rows), tuple(lens), tuple(answers), seed,
                         resolve_first_token(model, first_token))


def fact_prompts(model: Model, facts: Sequence[tuple[str, str]] = FACTS, *, filler: int = 0,
                 first_token: FirstToken = "default") -> AnswerPrompts:
    """One prompt per (prompt, answer) pair of ``facts`` (:data:`FACTS` by default). ``filler`` > 0
    puts the passkey task's intro and that many filler sentences in front, so the parametric task
    can be matched in length with the contextual one (task name ``facts_in_filler``)."""
    check_int("filler", filler)
    if not facts or any(not (isinstance(f, (tuple, list)) and len(f) == 2 and all(isinstance(x, str) for x in f))
                        for f in facts):
        raise SinkInterpError("facts must be a non-empty sequence of (prompt, answer) string pairs")
    prefix = _first_ids(model, first_token)
    context = PASSKEY_INTRO + PASSKEY_FILLER * filler + " " if filler else ""
    built = [_answer_row(model, prefix, context + prompt, answer) for prompt, answer in facts]
    return AnswerPrompts("facts_in_filler" if filler else "facts", tuple(r for r, _ in built), tuple(n for _, n in built),
                         tuple(a for _, a in facts), None, resolve_first_token(model, first_token))
