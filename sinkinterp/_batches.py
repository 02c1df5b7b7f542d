"""Validated token batches, padding alignment, and the streaming forward loop every metric shares.

A metric is a *reducer*: it receives each mini-batch (``begin``), attaches hooks that reduce an
activation to a small statistic and drop it, and is read out at the end. ``stream`` runs any set
of reducers in one forward pass per mini-batch, under ``torch.inference_mode``, through
``run_with_hooks`` (which removes exactly the hooks it added, also when the forward raises).

Positions are relative to each row's first real token: with left padding, relative position 0
is the first token after the pads, which is where the sink sits (docs/design.md §3.8).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from sinkinterp.backends import Model
from sinkinterp.errors import SinkInterpError

Hook = tuple[str, Callable]


@dataclass
class Batch:
    """One mini-batch: token ids, and where each row's real tokens start and how many there are."""

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"] | None
    offsets: Int[Tensor, " batch"]
    lengths: Int[Tensor, " batch"]
    first_index: int
    """Index of this mini-batch's first row in the whole input (for per-sequence records)."""

    @property
    def padded(self) -> bool:
        return self.attention_mask is not None and bool((self.lengths < self.tokens.shape[1]).any())

    @property
    def n_pos(self) -> int:
        return self.tokens.shape[1]

    def valid(self) -> Bool[Tensor, "batch pos"]:
        """``valid[b, p]``: relative position p is a real token of row b."""
        return torch.arange(self.n_pos) < self.lengths[:, None]

    def align(self, x: Tensor, dims: Sequence[int]) -> Tensor:
        """``x`` (batch first) with each listed position axis shifted to relative positions.

        Entries past a row's length are set to 0 (not multiplied: padded rows of an attention
        pattern may hold NaN). Without padding ``x`` is returned as is, with no copy.
        """
        if not self.padded:
            return x
        index = (torch.arange(self.n_pos) + self.offsets[:, None]).clamp(max=self.n_pos - 1)
        index, valid = index.to(x.device), self.valid().to(x.device)
        for dim in dims:
            dim = dim % x.ndim
            shape = [1] * x.ndim
            shape[0], shape[dim] = x.shape[0], self.n_pos
            x = torch.take_along_dim(x, index.view(shape), dim=dim)
            x = x.masked_fill(~valid.view(shape), 0)
        return x

    def relative_tokens(self) -> Int[Tensor, "batch pos"]:
        return self.align(self.tokens, dims=[1])


class Reducer:
    """Base for metrics that stream: ``hooks`` reduce activations into running sums."""

    batch: Batch

    def begin(self, batch: Batch) -> None:
        self.batch = batch

    def hooks(self) -> list[Hook]:
        raise NotImplementedError


def check_tokens(model: Model, tokens) -> None:
    """Refuse anything but a non-empty 2-D tensor of in-vocabulary ids that fits the context."""
    if not isinstance(tokens, Tensor):
        raise SinkInterpError(
            f"tokens must be a torch tensor of token ids [n_seqs, seq_len], got {type(tokens).__name__}"
        )
    if tokens.dtype not in (torch.int64, torch.int32):
        hint = ": convert with tokens.long()" if not (tokens.dtype.is_floating_point or tokens.dtype.is_complex
                                                      or tokens.dtype == torch.bool) else ""
        raise SinkInterpError(f"tokens must hold integer token ids (int64 or int32), got dtype {tokens.dtype}{hint}")
    if tokens.ndim != 2:
        hint = ": for one sequence pass tokens[None]" if tokens.ndim == 1 else ""
        raise SinkInterpError(
            f"tokens must be 2-D [n_seqs, seq_len], got {tokens.ndim}-D shape {tuple(tokens.shape)}{hint}"
        )
    if tokens.numel() == 0:
        raise SinkInterpError(f"tokens are empty: shape {tuple(tokens.shape)}")
    n_ctx = model.cfg.n_ctx
    if tokens.shape[1] > n_ctx:
        raise SinkInterpError(
            f"sequence length {tokens.shape[1]} exceeds the model's context: n_ctx = {n_ctx}"
        )
    if tokens.shape[1] < 2:
        raise SinkInterpError(
            f"sequence length {tokens.shape[1]} is too short: sink metrics need at least 2 positions"
        )
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= model.cfg.d_vocab:
        bad = low if low < 0 else high
        raise SinkInterpError(f"token id {bad} out of range: vocabulary is 0..{model.cfg.d_vocab - 1}")


def _pad_id(model: Model) -> int | None:
    tokenizer = getattr(model, "tokenizer", None)
    return None if tokenizer is None else tokenizer.pad_token_id


def check_mask(model: Model, tokens: Tensor, attention_mask) -> tuple[Tensor, Tensor]:
    """Offsets and lengths of the real tokens per row; refuse padding without a mask."""
    n_seqs, n_pos = tokens.shape
    if attention_mask is None:
        pad = _pad_id(model)
        if pad is not None and bool((tokens[:, 0] == pad).any()):
            rows = (tokens[:, 0] == pad).nonzero().flatten().tolist()
            raise SinkInterpError(
                f"rows {rows[:5]}{'...' if len(rows) > 5 else ''} start with the pad token (id {pad}): "
                "a padded batch needs attention_mask (1 = real token, 0 = pad); if the pad token is "
                "meant as content, pass attention_mask=torch.ones_like(tokens)"
            )
        return torch.zeros(n_seqs, dtype=torch.long), torch.full((n_seqs,), n_pos, dtype=torch.long)
    if not isinstance(attention_mask, Tensor):
        raise SinkInterpError(
            f"attention_mask must be a torch tensor like tokens, got {type(attention_mask).__name__}"
        )
    if attention_mask.shape != tokens.shape:
        raise SinkInterpError(
            f"attention_mask shape {tuple(attention_mask.shape)} does not match tokens shape "
            f"{tuple(tokens.shape)}"
        )
    values = set(attention_mask.unique().tolist())
    if not values <= {0, 1}:
        raise SinkInterpError(f"attention_mask must hold only 0 and 1, got values {sorted(values)}")
    mask = attention_mask.long()
    lengths = mask.sum(dim=1)
    offsets = mask.argmax(dim=1)  # first 1 in each row
    # One contiguous run of real tokens per row (left and/or right padding), at least 2 long.
    position = torch.arange(n_pos)
    expected = (position >= offsets[:, None]) & (position < (offsets + lengths)[:, None])
    bad_rows = ((mask == 1) != expected).any(dim=1) | (lengths < 2)
    if bool(bad_rows.any()):
        row = int(bad_rows.nonzero()[0])
        raise SinkInterpError(
            f"attention_mask row {row} is {mask[row].tolist()[:20]}{'...' if n_pos > 20 else ''}: each "
            "row must be one contiguous run of at least 2 ones (real tokens), padded by zeros on the "
            "left or right"
        )
    return offsets, lengths


def check_eps(eps) -> tuple[float, ...]:
    if isinstance(eps, Tensor):
        eps = eps.tolist()
    if isinstance(eps, (str, bytes)) or eps is None or not isinstance(eps, (int, float, list, tuple)):
        raise SinkInterpError(f"eps must be a number or a list of numbers in (0, 1), e.g. (0.3, 0.8); got {eps!r}")
    values = (eps,) if isinstance(eps, (int, float)) else tuple(eps)
    if not values:
        raise SinkInterpError("eps is empty: give at least one threshold in (0, 1), e.g. (0.3, 0.8)")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise SinkInterpError(f"eps {value!r} is outside (0, 1): a sink threshold is a share of attention")
    if len(set(values)) != len(values):
        raise SinkInterpError(f"eps {values} repeats a threshold")
    return tuple(float(v) for v in values)


def check_bool(label: str, value) -> bool:
    """``value`` if it is True or False: a string such as 'no' would otherwise count as True."""
    if not isinstance(value, bool):
        raise SinkInterpError(f"{label} must be True or False, got {value!r}")
    return value


#: Seeds are integers in this range (what torch.Generator.manual_seed takes); None is refused,
#: because it would give different data on every call.
MAX_SEED = 2**63 - 1


def check_seed(seed, label: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise SinkInterpError(f"{label} must be an integer in 0..2**63-1 (results are reproducible only with a "
                              f"fixed seed), got {seed!r}")
    return seed


def check_hooks_exist(model: Model, names: Iterable[str]) -> None:
    missing = [name for name in names if name not in model.hook_dict]
    if missing:
        raise SinkInterpError(
            f"{type(model).__name__} has no hook point {missing[0]!r} (missing {len(missing)} in all): "
            "sinkinterp needs TransformerLens hook names; for a TransformerBridge call "
            "enable_compatibility_mode() first"
        )


def check_int(label: str, value, low: int = 0) -> int:
    """``value`` if it is an integer >= ``low`` (not a bool), else a SinkInterpError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SinkInterpError(f"{label} must be an integer >= {low}, got {value!r}")
    return value


def batches(tokens: Tensor, offsets: Tensor, lengths: Tensor, attention_mask, batch_size: int):
    for start in range(0, tokens.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        mask = None if attention_mask is None else attention_mask[rows].long()
        yield Batch(tokens[rows], mask, offsets[rows], lengths[rows], start)


def progress_bar():
    """``tqdm.auto.tqdm``, imported quietly: in Jupyter without ipywidgets it falls back to a text
    bar and would otherwise warn about it in every notebook."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from tqdm.auto import tqdm
    return tqdm


def stream(
    model: Model,
    tokens: Int[Tensor, "*batch pos"],
    reducers: Sequence[Reducer],
    *,
    attention_mask=None,
    batch_size: int = 8,
    progress: bool | None = None,
    description: str = "forward",
) -> None:
    """Run ``model`` over ``tokens`` in mini-batches with every reducer's hooks attached.

    ``progress=None`` shows a bar only when there is more than one mini-batch.
    """
    tqdm = progress_bar()
    check_tokens(model, tokens)
    check_int("batch_size", batch_size, 1)
    offsets, lengths = check_mask(model, tokens, attention_mask)
    n_batches = -(-tokens.shape[0] // batch_size)
    show = n_batches > 1 if progress is None else progress
    device = next(model.parameters()).device
    for batch in tqdm(
        batches(tokens, offsets, lengths, attention_mask, batch_size),
        total=n_batches,
        desc=description,
        unit="batch",
        disable=not show,
    ):
        hooks: list[Hook] = []
        for reducer in reducers:
            reducer.begin(batch)
            hooks.extend(reducer.hooks())
        check_hooks_exist(model, [name for name, _ in hooks])
        kwargs = {} if batch.attention_mask is None else {"attention_mask": batch.attention_mask.to(device)}
        with torch.inference_mode():
            model.run_with_hooks(batch.tokens.to(device), fwd_hooks=hooks, return_type=None, **kwargs)
