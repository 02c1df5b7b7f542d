"""Metrics on tiny models whose attention patterns or residual streams are set by hooks, so every
expected value is known exactly; and an independent recomputation for the q/k/v statistics."""

import math

import pandas as pd
import pytest
import torch

from sinkinterp import SinkInterpError
from sinkinterp._batches import check_mask, check_tokens
from sinkinterp.data import random_tokens
from sinkinterp.measure import (
    find_massive_activations,
    massive_entries,
    qkv_geometry,
    sink_scores,
    stable_massive_channels,
    value_weighted_attention,
)
from sinkinterp.tiny import tiny_gpt2, tiny_llama
from conftest import n_hooks

pytestmark = pytest.mark.backend  # runs again on TransformerLens 3.9 (make test)

# First-token share c[l, h] of each head of tiny_gpt2 (2 layers x 4 heads).
SHARE = torch.tensor([[0.9, 0.5, 0.1, 0.0], [1.0, 0.15, 0.7, 0.3]])


def sink_pattern(share: torch.Tensor, n_pos: int) -> torch.Tensor:
    """[head, query, key]: A[0, 0] = 1; A[i, 0] = c; the rest, 1 - c, spread evenly over keys 1..i."""
    n_heads = share.shape[0]
    pattern = torch.zeros(n_heads, n_pos, n_pos)
    pattern[:, 0, 0] = 1
    for i in range(1, n_pos):
        pattern[:, i, 0] = share
        pattern[:, i, 1 : i + 1] = ((1 - share) / i)[:, None]
    return pattern


def set_pattern(share: torch.Tensor):
    def hook(pattern, hook):
        layer = hook.layer()
        return sink_pattern(share[layer], pattern.shape[-1]).expand_as(pattern).clone()

    return [(lambda name: name.endswith("hook_pattern"), hook)]


@pytest.fixture(scope="module")
def gpt2():
    return tiny_gpt2()


def test_alpha_sink_ratio_and_first_token_share_on_a_hand_built_pattern(gpt2):
    n_pos = 8
    tokens = random_tokens(gpt2, 3, n_pos, seed=1)
    with gpt2.hooks(fwd_hooks=set_pattern(SHARE)):
        report = sink_scores(gpt2, tokens, eps=(0.3, 0.8))
    # alpha at k = 0: query 0 gives 1, the other n_pos - 1 queries give c.
    expected_first = (1 + (n_pos - 1) * SHARE.double()) / n_pos
    torch.testing.assert_close(report.alpha_first, expected_first, rtol=0, atol=1e-7)
    # alpha at k >= 1: mean over queries i >= k of (1 - c) / i.
    for k in range(1, n_pos):
        harmonic = sum(1 / i for i in range(k, n_pos)) / (n_pos - k)
        torch.testing.assert_close(report.alpha[:, :, k], (1 - SHARE.double()) * harmonic, rtol=0, atol=1e-7)
    # expected_first = [[.9125, .5625, .2125, .125], [1, .25625, .7375, .3875]]
    assert report.sink_ratio == {0.3: 5 / 8, 0.8: 2 / 8}
    torch.testing.assert_close(report.first_token_share, SHARE.double().mean(dim=1), rtol=0, atol=1e-7)
    torch.testing.assert_close(report.first_token_share_heads, SHARE.double(), rtol=0, atol=1e-7)
    assert (report.n_seqs, report.seq_len, report.n_seqs_at.tolist()) == (3, n_pos, [3] * n_pos)


def test_sink_ratio_thresholds_each_sequence_as_gu_et_al(gpt2):
    # Row s of the batch gets first-token share SHARE * scale[s]; alpha_s = (1 + 7 c_s) / 8.
    n_pos, scale = 8, torch.tensor([1.0, 0.25, 0.0, 1.0])

    tokens = random_tokens(gpt2, 4, n_pos, seed=1)
    seen: dict[int, int] = {}  # layer -> rows already served: mini-batches arrive in order

    def hook(pattern, hook):
        layer, b = hook.layer(), pattern.shape[0]
        start = seen.get(layer, 0)
        seen[layer] = start + b
        rows = [sink_pattern(SHARE[layer] * float(scale[start + r]), n_pos) for r in range(b)]
        return torch.stack(rows).to(pattern.dtype)

    def scores(rows, **kwargs):
        seen.clear()
        with gpt2.hooks(fwd_hooks=[(lambda n: n.endswith("hook_pattern"), hook)]):
            return sink_scores(gpt2, tokens[rows], eps=(0.3, 0.8), **kwargs)

    report = scores(slice(0, 4), batch_size=3)  # two mini-batches
    single = []
    for s in range(4):
        scale_s, scale = scale, scale[s:s + 1]
        single.append(scores(slice(s, s + 1)))
        scale = scale_s
    per_seq = (1 + 7 * SHARE.double()[None] * scale.double()[:, None, None]) / 8  # [seq layer head]
    for eps in (0.3, 0.8):
        gu = float((per_seq > eps).double().mean())
        assert report.sink_ratio[eps] == pytest.approx(gu)
        # Gu's statistic is the mean of the one-sequence ratios; the ratio of the mean alpha is not.
        assert report.sink_ratio[eps] == pytest.approx(sum(r.sink_ratio[eps] for r in single) / 4)
        assert report.sink_ratio_of_mean[eps] == pytest.approx(float((per_seq.mean(0) > eps).double().mean()))
        torch.testing.assert_close(report.head_sink_frequency(eps), (per_seq > eps).double().mean(0))
    assert report.sink_ratio == pytest.approx({0.3: 12 / 32, 0.8: 4 / 32})  # 5 + 2 + 0 + 5; 2 + 0 + 0 + 2
    assert report.sink_ratio_of_mean == pytest.approx({0.3: 4 / 8, 0.8: 0 / 8})
    assert report.to_dict()["sink_ratio_of_mean"] == {"0.3": 0.5, "0.8": 0.0}
    with pytest.raises(SinkInterpError, match=r"eps 0.5 was not counted per sequence.*\(0.3, 0.8\)"):
        report.sink_ratio_at(0, 0.5)
    assert report.sink_ratio_of_mean_at(0, 0.5) == pytest.approx(float((per_seq.mean(0) > 0.5).double().mean()))


def test_sink_ratio_at_later_positions_has_a_query_floor(gpt2):
    # Each query i >= 1 puts 0.5 on key 0 and 0.5 on itself, so alpha_s[k] = 0.5 / (16 - k) for k >= 1:
    # 0.5, 0.25, 0.167 at the last three positions, self-attention that Sink_k without a floor counts.
    def self_and_sink(pattern, hook):
        n = pattern.shape[-1]
        rows = 0.5 * torch.eye(n)
        rows[:, 0] += 0.5
        rows[0, 0] = 1.0
        return rows.expand_as(pattern).clone()

    tokens = random_tokens(gpt2, 2, 16, seed=0)
    with gpt2.hooks(fwd_hooks=[(lambda n: n.endswith("hook_pattern"), self_and_sink)]):
        floored = sink_scores(gpt2, tokens, eps=(0.15,), min_queries=4)
        bare = sink_scores(gpt2, tokens, eps=(0.15,), min_queries=1)
    assert [bare.sink_ratio_at(k, 0.15) for k in (0, 12, 13, 14, 15)] == [1.0, 0.0, 1.0, 1.0, 1.0]
    profile = floored.sink_ratio_profile(0.15)
    assert profile.index.name == "position" and len(profile) == 16
    assert profile.iloc[13:].isna().all()  # seen by 3, 2, 1 queries
    assert profile.iloc[:13].tolist() == [1.0] + [0.0] * 12
    with pytest.raises(SinkInterpError, match="position 15 is seen by fewer than min_queries=4 queries"):
        floored.sink_ratio_at(15, 0.15)
    with pytest.raises(SinkInterpError, match="position 16 out of range"):
        floored.sink_ratio_at(16, 0.15)


def test_report_views_agree_with_alpha(gpt2):
    tokens = random_tokens(gpt2, 2, 8, seed=1)
    with gpt2.hooks(fwd_hooks=set_pattern(SHARE)):
        report = sink_scores(gpt2, tokens)
    frame = report.to_frame()
    assert list(frame.columns) == ["layer", "head", "position", "alpha", "n_seqs"]
    assert len(frame) == 2 * 4 * 8
    first = frame[frame.position == 0].set_index(["layer", "head"]).alpha
    assert first.loc[(1, 2)] == pytest.approx(float(report.alpha[1, 2, 0]))
    top = report.strongest_heads(2)
    assert top.name.tolist() == ["L1H0", "L0H0"] and top.alpha.iloc[0] == pytest.approx(1.0)
    record = report.to_dict()
    assert record["sink_ratio"] == {"0.3": 0.625, "0.8": 0.25}
    assert record["alpha_first"][0][0] == pytest.approx(0.9125)
    assert "alpha" not in record and len(report.to_dict(include_alpha=True)["alpha"][0][0]) == 8
    text = repr(report)
    assert "2 seqs x 8 positions, 2 layers x 4 heads" in text and "eps=0.3: 0.625" in text
    assert "L1H0 1.00" in text


def test_secondary_sink_is_found_per_sequence_and_on_average(gpt2):
    n_pos = 16

    def hook(pattern, hook):
        # Layer 1 head 2: queries i >= 5 put 0.6 on key 5 and 0.4 on key 0; everything else as before.
        new = sink_pattern(torch.full((4,), 0.5), n_pos).expand_as(pattern).clone()
        if hook.layer() == 1:
            new[:, 2, 5:, :] = 0
            new[:, 2, 5:, 5] = 0.6
            new[:, 2, 5:, 0] = 0.4
        return new

    tokens = random_tokens(gpt2, 2, n_pos, seed=2)
    with gpt2.hooks(fwd_hooks=[(lambda n: n.endswith("hook_pattern"), hook)]):
        report = sink_scores(gpt2, tokens, eps=(0.5,), min_queries=4)
    occurrences = report.secondary_sinks
    assert occurrences[["seq", "position", "layer", "head", "n_heads"]].values.tolist() == [
        [0, 5, 1, 2, 1], [1, 5, 1, 2, 1]
    ]
    assert occurrences.max_alpha.tolist() == pytest.approx([0.6, 0.6])
    assert occurrences.token_id.tolist() == tokens[:, 5].tolist()
    positions = report.secondary_positions()
    assert positions[["position", "n_heads", "layer", "head"]].values.tolist() == [[5, 1, 1, 2]]
    tokens_table = report.secondary_tokens()
    assert tokens_table["count"].sum() == 2


def test_secondary_sinks_skip_positions_seen_by_few_queries(gpt2):
    # Uniform causal attention: alpha[k] = mean_{i>=k} 1/(i+1), large only for the last positions.
    def uniform(pattern, hook):
        n = pattern.shape[-1]
        rows = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
        return rows.expand_as(pattern).clone()

    tokens = random_tokens(gpt2, 1, 16, seed=0)
    with gpt2.hooks(fwd_hooks=[(lambda n: n.endswith("hook_pattern"), uniform)]):
        strict = sink_scores(gpt2, tokens, eps=(0.1,), min_queries=4)
        loose = sink_scores(gpt2, tokens, eps=(0.1,), min_queries=1)
    assert float(loose.alpha[0, 0, 15]) == pytest.approx(1 / 16)
    assert float(loose.alpha[0, 0, 1]) == pytest.approx(sum(1 / (i + 1) for i in range(1, 16)) / 15)
    assert strict.secondary_sinks.position.max() <= 12
    assert set(loose.secondary_sinks.position) - set(strict.secondary_sinks.position) == set()  # 1/16 < 0.1
    # With alpha above eps everywhere, min_queries alone decides which positions count.
    with gpt2.hooks(fwd_hooks=[(lambda n: n.endswith("hook_pattern"), uniform)]):
        everything = sink_scores(gpt2, tokens, eps=(0.01,), min_queries=4)
    assert sorted(set(everything.secondary_sinks.position)) == list(range(1, 13))


def test_batches_accumulate_to_the_same_numbers(gpt2):
    tokens = random_tokens(gpt2, 5, 12, seed=3)
    whole = sink_scores(gpt2, tokens, batch_size=5)
    pieces = sink_scores(gpt2, tokens, batch_size=2, progress=False)
    torch.testing.assert_close(pieces.alpha, whole.alpha, rtol=0, atol=1e-12)
    torch.testing.assert_close(pieces.first_token_share_heads, whole.first_token_share_heads, rtol=0, atol=1e-12)
    # Sequences weigh equally: the mean of the single-sequence reports.
    singles = torch.stack([sink_scores(gpt2, tokens[i : i + 1]).alpha for i in range(5)]).mean(0)
    torch.testing.assert_close(whole.alpha, singles, rtol=0, atol=1e-12)
    pd.testing.assert_frame_equal(pieces.secondary_sinks, whole.secondary_sinks)


def test_query_blocks_give_the_same_numbers_as_one_block(monkeypatch):
    """Long contexts: the value-weighted measure makes its float64 copy of the pattern a block of
    queries at a time; one query per block gives the numbers of the whole pattern at once (padded
    rows too)."""
    from sinkinterp.measure import common

    model = tiny_llama()
    tokens = random_tokens(model, 3, 14, seed=4)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    whole_vw = value_weighted_attention(model, tokens, attention_mask=mask)
    assert len(common.query_blocks(torch.zeros(3, 6, 14, 14))) == 1
    monkeypatch.setattr(common, "QUERY_BLOCK_BYTES", 1)
    assert [s.stop - s.start for s in common.query_blocks(torch.zeros(3, 6, 14, 14))] == [1] * 14
    pd.testing.assert_frame_equal(value_weighted_attention(model, tokens, attention_mask=mask), whole_vw,
                                  check_exact=False, rtol=0, atol=1e-12)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["learned-positions", "rotary"])
def test_left_and_right_padding_match_unpadded_rows(build):
    model = build()
    short = random_tokens(model, 1, 6, seed=4)
    long = random_tokens(model, 1, 9, seed=5)
    pad = torch.zeros(1, 3, dtype=torch.long) + 7
    tokens = torch.cat([torch.cat([pad, short], 1), long])  # row 0 left-padded by 3
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    padded = sink_scores(model, tokens, attention_mask=mask)
    a_short, a_long = sink_scores(model, short).alpha, sink_scores(model, long).alpha
    expected = a_long.clone()
    expected[:, :, :6] = (a_short + a_long[:, :, :6]) / 2
    torch.testing.assert_close(padded.alpha, expected, rtol=0, atol=1e-5)
    assert padded.n_seqs_at.tolist() == [2] * 6 + [1] * 3
    share = (sink_scores(model, short).first_token_share_heads + sink_scores(model, long).first_token_share_heads) / 2
    torch.testing.assert_close(padded.first_token_share_heads, share, rtol=0, atol=1e-5)

    right = torch.cat([torch.cat([short, pad], 1), long])
    right_mask = torch.ones_like(right)
    right_mask[0, 6:] = 0
    torch.testing.assert_close(sink_scores(model, right, attention_mask=right_mask).alpha, expected, rtol=0, atol=1e-5)


def test_geometry_and_value_weighting_respect_padding():
    model = tiny_llama()
    row = random_tokens(model, 1, 7, seed=6)
    tokens = torch.cat([torch.zeros(1, 2, dtype=torch.long), row], 1)
    mask = torch.ones_like(tokens)
    mask[0, :2] = 0
    for measure in (qkv_geometry, value_weighted_attention):
        pd.testing.assert_frame_equal(measure(model, tokens, attention_mask=mask), measure(model, row), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "tokens, message",
    [
        (torch.zeros(0, 8, dtype=torch.long), "tokens are empty: shape (0, 8)"),
        (torch.zeros(8, dtype=torch.long), "tokens must be 2-D [n_seqs, seq_len], got 1-D shape (8,): for one sequence pass tokens[None]"),
        (torch.zeros(1, 65, dtype=torch.long), "sequence length 65 exceeds the model's context: n_ctx = 64"),
        (torch.zeros(2, 1, dtype=torch.long), "sequence length 1 is too short"),
        (torch.full((1, 4), 67), "token id 67 out of range: vocabulary is 0..66"),
        (torch.full((1, 4), -1), "token id -1 out of range: vocabulary is 0..66"),
    ],
)
def test_bad_tokens_are_refused(gpt2, tokens, message):
    for measure in (sink_scores, find_massive_activations, qkv_geometry, value_weighted_attention):
        with pytest.raises(SinkInterpError) as error:
            measure(gpt2, tokens)
        assert message in str(error.value)


@pytest.mark.parametrize(
    "tokens, message",
    [
        (torch.zeros(1, 4), "tokens must hold integer token ids (int64 or int32), got dtype torch.float32"),
        (torch.zeros(1, 4, dtype=torch.uint8), "got dtype torch.uint8: convert with tokens.long()"),
        ([[1, 2, 3]], "tokens must be a torch tensor of token ids [n_seqs, seq_len], got list"),
    ],
)
def test_tokens_of_the_wrong_type_are_refused(gpt2, tokens, message):
    # Called on the validator: in the test run, the jaxtyping annotation of the public functions
    # rejects these first (TypeCheckError); users without runtime checking get this message.
    with pytest.raises(SinkInterpError) as error:
        check_tokens(gpt2, tokens)
    assert message in str(error.value)


def test_a_mask_of_the_wrong_type_is_refused(gpt2):
    tokens = random_tokens(gpt2, 2, 6)
    with pytest.raises(SinkInterpError, match="attention_mask must be a torch tensor like tokens, got list"):
        check_mask(gpt2, tokens, [[1] * 6] * 2)


@pytest.mark.parametrize("eps", [0.0, 1.0, 1.5, -0.1, (), (0.3, True), "0.3"])
def test_eps_must_be_inside_zero_one(gpt2, eps):
    with pytest.raises(SinkInterpError, match="eps"):
        sink_scores(gpt2, random_tokens(gpt2, 1, 4), eps=eps)


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.ones(2, 5, dtype=torch.long), "attention_mask shape (2, 5) does not match tokens shape (2, 6)"),
        (torch.full((2, 6), 2), "attention_mask must hold only 0 and 1, got values [2]"),
        (torch.tensor([[1, 0, 1, 1, 1, 1], [1] * 6]), "attention_mask row 0 is [1, 0, 1, 1, 1, 1]"),
        (torch.tensor([[0, 0, 0, 0, 0, 1], [1] * 6]), "one contiguous run of at least 2 ones"),
    ],
)
def test_bad_masks_are_refused(gpt2, mask, message):
    with pytest.raises(SinkInterpError) as error:
        sink_scores(gpt2, random_tokens(gpt2, 2, 6), attention_mask=mask)
    assert message in str(error.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ({"min_queries": 0}, "min_queries must be an integer >= 1, got 0"),
])
def test_bad_options_are_refused(gpt2, kwargs, message):
    with pytest.raises(SinkInterpError, match=message):
        sink_scores(gpt2, random_tokens(gpt2, 1, 4), **kwargs)


def test_a_crash_mid_forward_leaves_only_the_callers_hooks(gpt2):
    kept = []
    gpt2.add_hook("blocks.0.hook_resid_post", lambda x, hook: kept.append(1))
    before = n_hooks(gpt2)

    def boom(x, hook):
        raise KeyboardInterrupt

    try:
        for measure in (sink_scores, find_massive_activations, qkv_geometry, value_weighted_attention):
            with gpt2.hooks(fwd_hooks=[("blocks.1.hook_resid_mid", boom)]):
                with pytest.raises(KeyboardInterrupt):
                    measure(gpt2, random_tokens(gpt2, 2, 6))
            assert n_hooks(gpt2) == before
        gpt2(random_tokens(gpt2, 1, 4))
        assert kept  # the caller's own hook is still attached and still runs
    finally:
        gpt2.reset_hooks()
    assert n_hooks(gpt2) == 0


# --------------------------------------------------------------------------------------------
# Massive activations


def test_detector_finds_planted_outliers_and_ignores_large_but_not_massive_values():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(32, 64, generator=generator)  # median |x| ~ 0.67
    hidden[0, 7] = 5000.0  # massive
    hidden[5, 2] = -3000.0  # massive, negative
    hidden[3, 4] = 150.0  # > 100 but only ~220 x median: not massive
    where, values, median = massive_entries(hidden)
    assert where.tolist() == [[0, 7], [5, 2]] and values.tolist() == [5000.0, -3000.0]
    assert 0.5 < median < 0.9
    # Tiny median: 1000 x median is easy to reach, but |x| must also exceed 100.
    quiet = torch.randn(32, 64, generator=generator) * 0.001
    quiet[1, 1] = 50.0
    quiet[2, 2] = 500.0
    where, values, _ = massive_entries(quiet)
    assert where.tolist() == [[2, 2]]
    # Thresholds are parameters.
    where, _, _ = massive_entries(hidden, min_abs=100.0, min_ratio=200.0)
    assert where.tolist() == [[0, 7], [3, 4], [5, 2]]


def test_find_massive_activations_on_a_planted_residual_stream(gpt2):
    def plant(out, hook):
        out[:, 0, 7] += 5000.0  # block 0's MLP writes a massive value at the first token
        return out

    tokens = random_tokens(gpt2, 3, 10, seed=7)
    with gpt2.hooks(fwd_hooks=[("blocks.0.hook_mlp_out", plant)]):
        found = find_massive_activations(gpt2, tokens, batch_size=2)
    assert list(found.columns) == ["layer", "seq", "position", "channel", "value", "ratio_to_median", "token"]
    # The residual stream carries it into block 1: both layers, every sequence, nothing else.
    assert sorted(zip(found.layer, found.seq)) == [(layer, seq) for layer in (0, 1) for seq in range(3)]
    assert set(found.position) == {0} and set(found.channel) == {7}
    assert found.value.between(4900, 5100).all() and (found.ratio_to_median > 1000).all()
    assert dict(zip(found.seq, found.token)) == {s: str(int(tokens[s, 0])) for s in range(3)}  # no tokenizer: ids
    assert found[["seq", "layer"]].values.tolist() == [[s, l] for s in range(3) for l in (0, 1)]  # sorted
    assert found.attrs == {"n_seqs": 3, "min_abs": 100.0, "min_ratio": 1000.0}
    stable = stable_massive_channels(found)
    assert stable[["channel", "role", "first_layer", "last_layer", "n_layers", "fraction_of_seqs"]].values.tolist() == [
        [7, "first token", 0, 1, 2, 1.0]
    ]
    clean = find_massive_activations(gpt2, tokens)
    assert clean.empty and stable_massive_channels(clean).empty


def test_stable_channels_separate_roles_and_filter_by_fraction():
    frame = pd.DataFrame(
        [(3, 0, 0, 9, 900.0, 2000.0, "a"), (4, 0, 0, 9, 950.0, 2100.0, "a"), (3, 1, 0, 9, 880.0, 1900.0, "b"),
         (2, 1, 5, 9, -300.0, 1200.0, "\n")],
        columns=["layer", "seq", "position", "channel", "value", "ratio_to_median", "token"],
    )
    frame.attrs["n_seqs"] = 4
    stable = stable_massive_channels(frame)
    assert stable[["channel", "role", "first_layer", "last_layer", "fraction_of_seqs", "top_token"]].values.tolist() == [
        [9, "first token", 3, 4, 0.5, "a"], [9, "other", 2, 2, 0.25, "\n"]
    ]
    # Layer 3 has the first-token pair in 2 of 4 sequences (core), layer 4 in 1 (not core).
    assert stable[["core_first_layer", "core_last_layer"]].values.tolist()[0] == [3, 3]
    assert stable.core_first_layer.isna().tolist() == [False, True]
    assert len(stable_massive_channels(frame, min_fraction=0.5)) == 1
    with pytest.raises(SinkInterpError, match="n_seqs"):
        stable_massive_channels(frame.drop(columns=[]).pipe(lambda f: pd.DataFrame(f.to_dict())))


@pytest.mark.parametrize("kwargs", [{"min_abs": 0}, {"min_ratio": -1}, {"min_abs": float("nan")}])
def test_massive_thresholds_must_be_positive(gpt2, kwargs):
    with pytest.raises(SinkInterpError, match="must be a positive number"):
        find_massive_activations(gpt2, random_tokens(gpt2, 1, 4), **kwargs)


# --------------------------------------------------------------------------------------------
# q/k/v geometry and value-weighted attention, against a direct computation from the cache


def _cache(model, tokens):
    _, cache = model.run_with_cache(tokens)
    return cache


def test_qkv_geometry_matches_a_direct_computation_with_gqa():
    model = tiny_llama()  # 6 query heads over 2 kv heads: head h reads kv head h // 3
    tokens = random_tokens(model, 2, 9, seed=8)
    frame = qkv_geometry(model, tokens).set_index(["layer", "head"])
    cache = _cache(model, tokens)
    assert frame.kv_head.tolist() == [h // 3 for _ in range(2) for h in range(6)]
    for layer in range(2):
        q = cache[f"blocks.{layer}.attn.hook_rot_q"].double()
        k = cache[f"blocks.{layer}.attn.hook_rot_k"].double()
        v = cache[f"blocks.{layer}.attn.hook_v"].double()
        scores = cache[f"blocks.{layer}.attn.hook_attn_scores"].double()
        for head in range(6):
            kv = head // 3
            row = frame.loc[(layer, head)]
            per_seq = {name: [] for name in ("q", "ks", "ko", "vs", "vo", "cs", "co", "ls", "lo")}
            for b in range(2):
                n = tokens.shape[1]
                per_seq["q"].append(q[b, 1:, head].norm(dim=-1).mean())
                per_seq["ks"].append(k[b, 0, kv].norm())
                per_seq["ko"].append(k[b, 1:, kv].norm(dim=-1).mean())
                per_seq["vs"].append(v[b, 0, kv].norm())
                per_seq["vo"].append(v[b, 1:, kv].norm(dim=-1).mean())
                cos = lambda i, j: torch.nn.functional.cosine_similarity(q[b, i, head], k[b, j, kv], dim=0)
                per_seq["cs"].append(torch.stack([cos(i, 0) for i in range(1, n)]).mean())
                per_seq["co"].append(torch.stack([cos(i, j) for i in range(1, n) for j in range(1, i + 1)]).mean())
                per_seq["ls"].append(scores[b, head, 1:, 0].mean())
                per_seq["lo"].append(torch.stack([scores[b, head, i, j] for i in range(1, n) for j in range(1, i + 1)]).mean())
            expected = {name: float(torch.stack(values).mean()) for name, values in per_seq.items()}
            got = row[["q_norm", "k_sink_norm", "k_other_norm", "v_sink_norm", "v_other_norm",
                       "cos_q_k_sink", "cos_q_k_other", "logit_sink", "logit_other"]].tolist()
            assert got == pytest.approx(list(expected.values()), abs=1e-5)


def test_value_weighted_attention_matches_a_direct_computation_with_gqa():
    model = tiny_llama()
    tokens = random_tokens(model, 2, 9, seed=9)
    frame = value_weighted_attention(model, tokens).set_index(["layer", "head"])
    cache = _cache(model, tokens)
    for layer in range(2):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"].double()
        v = cache[f"blocks.{layer}.attn.hook_v"].double()
        W_O = model.blocks[layer].attn.W_O.detach().double()
        for head in range(6):
            attn, norm = [], []
            for b in range(2):
                out = v[b, :, head // 3] @ W_O[head]  # [pos, d_model]
                parts = pattern[b, head][:, :, None] * out[None]  # A[i, j] v_j W_O
                share = parts[:, 0].norm(dim=-1) / parts.norm(dim=-1).sum(dim=-1)
                attn.append(pattern[b, head, 1:, 0].mean())
                norm.append(share[1:].mean())
            row = frame.loc[(layer, head)]
            assert row.attn_sink_share == pytest.approx(float(torch.stack(attn).mean()), abs=1e-6)
            assert row.norm_sink_share == pytest.approx(float(torch.stack(norm).mean()), abs=1e-6)
            assert row.no_op_gap == pytest.approx(row.attn_sink_share - row.norm_sink_share)


def test_value_weighted_attention_on_a_pure_sink_pattern(gpt2):
    share = torch.tensor([[1.0, 0.0, 0.5, 0.5]] * 2)
    with gpt2.hooks(fwd_hooks=set_pattern(share)):
        frame = value_weighted_attention(gpt2, random_tokens(gpt2, 2, 6, seed=1))
    head0, head1 = frame.iloc[0], frame.iloc[1]
    assert (head0.attn_sink_share, head0.norm_sink_share) == pytest.approx((1.0, 1.0))
    assert (head1.attn_sink_share, head1.norm_sink_share) == pytest.approx((0.0, 0.0))
    assert 0 < frame.iloc[2].norm_sink_share < 1 and not math.isnan(frame.iloc[2].value_out_norm_other)
