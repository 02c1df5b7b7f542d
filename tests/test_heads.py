"""Head scores on tiny models whose attention patterns are set by hooks to known shapes, q/k
massive values on set q/k, head ablation, and the errors. No weights: milliseconds each."""

import math

import pandas as pd
import pytest
import torch

from sinkinterp import SinkInterpError, load_model, sink_scores
from sinkinterp.data import NeedlePrompts, random_tokens
from sinkinterp.heads import (
    DEFAULT_THRESHOLDS,
    SCORERS,
    RepeatedTokens,
    classify_heads,
    greedy_recall,
    head_scores,
    top_heads,
)
from sinkinterp.experiments import validate_heads
from sinkinterp.heads.recall import _rouge1_recall
from sinkinterp.interventions import AblateHeads, Intervention, intervene
from sinkinterp.measure import qk_massive_values, rotary_pairs

pytestmark = pytest.mark.backend  # runs again on TransformerLens 3.9 (make test)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")  # 2 layers, 6 query heads over 2 kv heads, d_head 8, rotary


def _set_pattern(model, per_head):
    """Hooks that replace every layer's pattern by ``per_head`` [head, query, key] (rows sum to 1),
    or by ``per_head(n_pos)`` when it is a function of the sequence length."""
    def hook(pattern, hook):
        fixed = per_head(pattern.shape[-1]) if callable(per_head) else per_head
        return fixed.to(pattern).expand_as(pattern).clone()

    return [(f"blocks.{layer}.attn.hook_pattern", hook) for layer in range(model.cfg.n_layers)]


def _rows(n_pos, targets, sink=0.0):
    """Pattern [query, key]: weight ``sink`` on key 0 and the rest on ``targets(i)`` (self if None)."""
    pattern = torch.zeros(n_pos, n_pos)
    for i in range(n_pos):
        t = targets(i)
        t = i if t is None or t < 0 or t > i else t
        pattern[i, 0] += sink if i > 0 else 1.0
        pattern[i, t] += (1 - sink) if i > 0 else 0.0
    return pattern


def make_repeated(tiny, half=8, n=3):
    half_tokens = random_tokens(tiny, n, half, seed=1)
    return RepeatedTokens(torch.cat([half_tokens, half_tokens], dim=1), half)


def test_scorers_on_known_patterns(tiny):
    data = make_repeated(tiny)
    n, T = data.half_len, data.tokens.shape[1]
    heads = [
        _rows(T, lambda i: i - 1),                                   # previous-token
        _rows(T, lambda i: i - n + 1 if i >= n else None),           # induction
        _rows(T, lambda i: i - n if i >= n else None),               # duplicate
        _rows(T, lambda i: i - 1, sink=0.5),                         # previous-token half on the sink
        _rows(T, lambda i: 0, sink=0.0),                             # all on the sink
        _rows(T, lambda i: None),                                    # self only
    ]
    with tiny.hooks(fwd_hooks=_set_pattern(tiny, torch.stack(heads))):
        scores = head_scores(tiny, {"repeated": data, "text": data.tokens}, [n for n in SCORERS if n != "recall"],
                             progress=False)
    for layer in range(2):
        prev, ind, dup = scores["previous_token"][layer], scores["induction"][layer], scores["duplicate"][layer]
        torch.testing.assert_close(prev[[0, 3]], torch.ones(2))
        torch.testing.assert_close(ind[[1]], torch.ones(1))
        torch.testing.assert_close(dup[[2]], torch.ones(1))
        assert float(prev[1]) == 0 and float(ind[0]) == 0 and float(dup[1]) == 0 and float(ind[2]) == 0
        # The raw (ARENA) score counts the sink's half against the head; the score does not.
        assert float(scores["previous_token_raw"][layer, 3]) == pytest.approx(0.5)
        # Sink: mean over all queries of A[i, 0]; row 0 always has A[0, 0] = 1.
        # (Query 1's previous token is the first token, so A[1, 0] = 1.)
        assert float(scores["sink"][layer, 3]) == pytest.approx((2 + 0.5 * (T - 2)) / T)
        assert float(scores["sink"][layer, 4]) == pytest.approx(1.0)
        assert float(scores["sink"][layer, 0]) == pytest.approx(2 / T)
        # Distance over non-sink keys: self = 0; previous token = mean of 1 / (i - 1) over i >= 2.
        assert float(scores["distance"][layer, 5]) == pytest.approx(0.0)
        expected = sum(1 / (i - 1) for i in range(2, T)) / (T - 2)
        assert float(scores["distance"][layer, 0]) == pytest.approx(expected, rel=1e-5)
        # A head that only rests on the sink has no non-sink attention: no previous-token score.
        assert math.isnan(float(scores["previous_token"][layer, 4]))


def test_sink_scorer_matches_sink_scores(tiny):
    tokens = random_tokens(tiny, 4, 16, seed=3)
    scores = head_scores(tiny, {"text": tokens}, ["sink"], progress=False)
    report = sink_scores(tiny, tokens, progress=False)
    torch.testing.assert_close(scores["sink"], report.alpha_first.float())


def _needle_data(tiny, prompt_len=24, needle=(6, 5)):
    """Random-token prompts with the tokens at [start, start + m) repeated after the prompt."""
    start, m = needle
    tokens = random_tokens(tiny, 2, prompt_len + m, seed=5)
    tokens[:, prompt_len:] = tokens[:, start : start + m]
    return NeedlePrompts(tokens=tokens, prompt_len=prompt_len, needle_start=torch.tensor([start, start]),
                         needle_len=torch.tensor([m, m]))


def test_recall_scorer_on_copy_pattern(tiny):
    data = _needle_data(tiny)
    P, (start, m), T = data.prompt_len, (6, 5), data.tokens.shape[1]

    def copy(i, fraction=1.0):
        t = i - (P - 1)
        return start + t if 0 <= t < m and t < round(fraction * m) else None

    heads = [
        _rows(T, copy),                                # copies every needle token
        _rows(T, lambda i: 0),                         # rests on the sink
        _rows(T, lambda i: copy(i, 0.6)),              # copies the first 3 of 5
        _rows(T, lambda i: start + i - P + 2 if 0 <= i - P + 1 < m - 1 else None),  # one token late
        _rows(T, lambda i: i - 1),
        _rows(T, lambda i: None),
    ]
    with tiny.hooks(fwd_hooks=_set_pattern(tiny, torch.stack(heads))):
        scores = head_scores(tiny, {"needle": data}, ["recall"], progress=False)["recall"]
    # Head 3 attends to the needle token *after* the one being produced: a miss unless tokens repeat.
    late_hits = sum(int(data.tokens[r, start + t + 1] == data.tokens[r, P + t]) for r in range(2) for t in range(m - 1))
    for layer in range(2):
        assert float(scores[layer, 0]) == pytest.approx(1.0)
        assert float(scores[layer, 1]) == 0.0
        assert float(scores[layer, 2]) == pytest.approx(0.6)
        assert float(scores[layer, 3]) == pytest.approx(late_hits / (2 * m))
        assert float(scores[layer, 5]) == 0.0


def test_needle_prompts_validate_their_answer(tiny):
    data = _needle_data(tiny)
    with pytest.raises(SinkInterpError, match="not the needle's tokens"):
        NeedlePrompts(tokens=data.tokens.flip(1), prompt_len=24, needle_start=data.needle_start,
                      needle_len=data.needle_len)
    with pytest.raises(SinkInterpError, match="beyond the prompt's 24 tokens"):
        NeedlePrompts(tokens=data.tokens, prompt_len=24, needle_start=torch.tensor([22, 22]),
                      needle_len=data.needle_len)
    rows, queries, targets = data.answer_steps()
    assert queries.tolist()[:5] == [23, 24, 25, 26, 27] and targets.tolist()[:5] == [24, 25, 26, 27, 28]


def test_classify_labels_and_thresholds(tiny):
    data = make_repeated(tiny)

    def heads(n_pos):
        return torch.stack([_rows(n_pos, lambda i: i - 1, sink=0.45)] * 3 + [_rows(n_pos, lambda i: None)] * 3)

    needle = _needle_data(tiny)
    with tiny.hooks(fwd_hooks=_set_pattern(tiny, heads)):
        table = classify_heads(tiny, data={"repeated": data, "text": data.tokens, "needle": needle},
                               greedy=False, progress=False)
    assert len(table) == 12 and table["name"].iloc[7] == "L1H1"
    # Heads 0-2: previous-token 1.0 (raw 0.55) and sink (2 + 0.45 (T-2)) / T > 0.3; heads 3-5: none.
    # On the needle prompts the previous-token heads attend to the needle token produced one step
    # before, a miss (random tokens rarely repeat), so no head is a recall head.
    assert table["recall"].max() < 0.1
    assert table["labels"].iloc[0] == ("previous-token", "sink")
    assert table["labels"].iloc[3] == ("none",)
    with tiny.hooks(fwd_hooks=_set_pattern(tiny, heads)):
        strict = classify_heads(tiny, data={"repeated": data, "text": data.tokens, "needle": needle}, greedy=False,
                                thresholds={"sink": 0.9}, progress=False)
    assert strict["labels"].iloc[0] == ("previous-token",)
    assert strict.attrs["thresholds"] == {**DEFAULT_THRESHOLDS, "sink": 0.9}
    assert {"q_peak_ratio", "k_massive_low_freq", "recall", "distance"} <= set(table.columns)
    assert top_heads(table, "previous_token", 3) == [(0, 0), (0, 1), (0, 2)]


def test_scorer_registry_and_bad_input(tiny):
    assert set(SCORERS) == {"previous_token", "duplicate", "induction", "recall", "sink", "distance",
                            "previous_token_text", "previous_token_tl", "duplicate_tl", "induction_tl"}
    with pytest.raises(SinkInterpError, match="unknown scorer 'copying': allowed previous_token"):
        head_scores(tiny, {}, ["copying"])
    with pytest.raises(SinkInterpError, match="scorer 'recall' needs 'needle' data"):
        head_scores(tiny, {"text": random_tokens(tiny, 2, 8)}, ["recall"])
    with pytest.raises(SinkInterpError, match="unknown label 'copy' in thresholds"):
        classify_heads(tiny, thresholds={"copy": 0.2})
    with pytest.raises(SinkInterpError, match="threshold for 'recall' is 1.5"):
        classify_heads(tiny, thresholds={"recall": 1.5})
    with pytest.raises(SinkInterpError, match="context length 100 exceeds the model's context: n_ctx = 64"):
        classify_heads(tiny, scorers=["recall"], greedy=False, qk=False, context_lens=(32, 100))
    table = pd.DataFrame({"layer": [0, 0, 1], "head": [0, 1, 0], "recall": [0.3, 0.1, 0.2],
                          "induction": [0.1, 0.2, 0.3]})
    with pytest.raises(SinkInterpError, match="k = 4 heads: there are 3 heads to choose from, so k must be in 1..3"):
        top_heads(table, "recall", 4)
    with pytest.raises(SinkInterpError, match="k = 0 heads"):
        top_heads(table, "recall", 0)
    with pytest.raises(SinkInterpError, match="k = 4 heads: there are 3 heads to choose from"):
        validate_heads(tiny, table, k=4)
    with pytest.raises(SinkInterpError, match="ablation 'half' is not one of 'mean', 'zero'"):
        validate_heads(tiny, table, k=1, ablation="half")
    with pytest.raises(SinkInterpError, match="too few for a random draw of 2"):
        validate_heads(tiny, table, k=2)
    with pytest.raises(SinkInterpError, match="greedy recall decodes the model's answers and needs a tokenizer"):
        greedy_recall(tiny, _needle_data(tiny))


def test_rouge1_recall():
    needle = "The secret code of Marta Oliveira from Lisbon is 48213."
    assert _rouge1_recall(needle, needle) == 1.0
    assert _rouge1_recall(needle, "The secret code of Marta Oliveira is 48213.") == pytest.approx(8 / 10)
    assert _rouge1_recall(needle, "no idea") == 0.0
    # Repeating the question passes Wu et al.'s literal rule (8 of the needle's 10 words are in it)
    # but holds none of the needle's new content: the city and the number ("from" and "is" are asked).
    question = "\n\nQuestion: What is the secret code of Marta Oliveira? Answer with the full sentence from the text.\nAnswer:\n"
    echo = "The secret code of Keiko Oliveira is:"
    assert _rouge1_recall(needle, echo) == pytest.approx(6 / 10)
    assert _rouge1_recall(needle, echo, exclude=question) == 0.0
    assert _rouge1_recall(needle, "It is 48213, from Lisbon.", exclude=question) == 1.0
    assert _rouge1_recall(needle, "48213", exclude=question) == pytest.approx(1 / 2)


# --------------------------------------------------------------------------------------------
# q/k massive values


def test_rotary_pairs_and_low_frequency(tiny):
    pairs = rotary_pairs(tiny)  # d_head 8, rotary_dim 8, halves layout: dim d has pair d % 4
    assert pairs.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert rotary_pairs(load_model("tiny-gpt2")) is None


def test_qk_massive_values_find_a_set_dimension(tiny):
    tokens = random_tokens(tiny, 3, 16, seed=2)

    def big(dim, scale):
        def hook(x, hook):
            x = torch.ones_like(x)
            x[..., dim] = scale
            return x
        return hook

    hooks = [(f"blocks.{l}.attn.hook_q", big(7, 20.0)) for l in range(2)]
    hooks += [(f"blocks.{l}.attn.hook_k", big(1, 20.0)) for l in range(2)]
    with tiny.hooks(fwd_hooks=hooks):
        result = qk_massive_values(tiny, tokens, progress=False)
    frame = result.per_head()
    # RMS is 1 in seven dimensions and 20 in one: mean 27 / 8, so the peak ratio is 20 / 3.375.
    assert frame["q_peak_ratio"].tolist() == pytest.approx([20 / 3.375] * 12, rel=1e-5)
    assert frame["q_top_dim"].tolist() == [7] * 12 and frame["k_top_dim"].tolist() == [1] * 12
    assert frame["q_n_massive"].tolist() == [1] * 12
    assert frame["q_massive_low_freq"].tolist() == [1.0] * 12  # dim 7 is pair 3, the slowest
    assert frame["k_massive_low_freq"].tolist() == [0.0] * 12  # dim 1 is pair 1, a fast one
    summary = result.summary()
    assert summary["q_n_massive"] == 12 and summary["k_n_massive"] == 4  # k counted per kv head
    with pytest.raises(SinkInterpError, match="ratio must be a positive number, got -1"):
        qk_massive_values(tiny, tokens, ratio=-1)


# --------------------------------------------------------------------------------------------
# Ablating heads


def _z(model, tokens, interventions=()):
    kept = {}

    def keep(z, hook):
        kept[hook.name] = z.detach().clone()

    hooks = [(f"blocks.{l}.attn.hook_z", keep) for l in range(model.cfg.n_layers)]
    with intervene(model, *interventions), model.hooks(fwd_hooks=hooks):
        model(tokens)
    return kept


def test_ablate_heads_zero_and_mean(tiny):
    tokens = random_tokens(tiny, 2, 12, seed=4)
    reference = random_tokens(tiny, 4, 12, seed=5)
    clean = _z(tiny, tokens)
    zeroed = _z(tiny, tokens, [AblateHeads(heads=[(1, 2), (1, 4)], mode="zero")])
    z = zeroed["blocks.1.attn.hook_z"]
    assert float(z[:, 1:, [2, 4]].abs().max()) == 0.0
    torch.testing.assert_close(z[:, 0], clean["blocks.1.attn.hook_z"][:, 0])  # the first row is left alone
    # Layer 0 comes before the ablation: untouched; layer 1's other heads read unchanged inputs.
    torch.testing.assert_close(zeroed["blocks.0.attn.hook_z"], clean["blocks.0.attn.hook_z"])
    torch.testing.assert_close(z[:, :, [0, 1, 3, 5]], clean["blocks.1.attn.hook_z"][:, :, [0, 1, 3, 5]])

    fitted = AblateHeads.fit(tiny, reference, heads=[(0, 3), (1, 2)])
    ref_z = _z(tiny, reference)
    torch.testing.assert_close(torch.tensor(fitted.value[0]), ref_z["blocks.0.attn.hook_z"][:, 1:, 3].mean(dim=(0, 1)))
    torch.testing.assert_close(torch.tensor(fitted.value[1]), ref_z["blocks.1.attn.hook_z"][:, 1:, 2].mean(dim=(0, 1)))
    meaned = _z(tiny, tokens, [fitted])["blocks.0.attn.hook_z"]
    torch.testing.assert_close(meaned[:, 1:, 3], torch.tensor(fitted.value[0]).expand(2, 11, -1))
    assert Intervention.from_dict(fitted.to_dict()) == fitted


def test_ablate_heads_bad_input_and_cleanup(tiny):
    with pytest.raises(SinkInterpError, match=r"layer 5 out of range: model has 2 layers \(0..1\)"):
        AblateHeads(heads=[(5, 0)], mode="zero").hooks(tiny)
    with pytest.raises(SinkInterpError, match="must be integer \\(layer, head\\) pairs, got 3"):
        AblateHeads(heads=[3], mode="zero")
    with pytest.raises(SinkInterpError, match="repeats a head"):
        AblateHeads(heads=[(0, 1), (0, 1)], mode="zero")
    with pytest.raises(SinkInterpError, match="needs stored means"):
        AblateHeads(heads=[(0, 1)])
    before = sum(len(hp.fwd_hooks) for hp in tiny.hook_dict.values())
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(tiny, AblateHeads(heads=[(0, 1), (1, 1)], mode="zero")):
            raise RuntimeError("boom")
    assert sum(len(hp.fwd_hooks) for hp in tiny.hook_dict.values()) == before


def test_tl_scores_equal_transformer_lens_detect_head(tiny, monkeypatch):
    from transformer_lens.head_detector import detect_head

    data = make_repeated(tiny)
    scores = head_scores(tiny, {"repeated": data}, ["previous_token_tl", "duplicate_tl", "induction_tl"], progress=False)
    for kind, name in (("previous_token_head", "previous_token_tl"), ("duplicate_token_head", "duplicate_tl"),
                       ("induction_head", "induction_tl")):
        per_seq = []
        for row in data.tokens:  # detect_head tokenizes its prompt: hand it our ids instead
            monkeypatch.setattr(tiny, "to_tokens", lambda seq, row=row, **kwargs: row[None])
            per_seq.append(detect_head(tiny, "ignored", kind))
        torch.testing.assert_close(scores[name], torch.stack(per_seq).mean(dim=0), rtol=0, atol=1e-6)


def test_tl_score_is_about_half_the_arena_mean_on_repeated_tokens(tiny):
    generator = torch.Generator().manual_seed(0)
    half = torch.stack([torch.randperm(tiny.cfg.d_vocab, generator=generator)[:8] for _ in range(2)])
    data = RepeatedTokens(torch.cat([half, half], dim=1), 8)  # no token twice within a half
    T, n = data.tokens.shape[1], data.half_len
    induction = _rows(T, lambda i: i - n + 1 if i >= n else None)
    with tiny.hooks(fwd_hooks=_set_pattern(tiny, induction.expand(6, T, T))):
        scores = head_scores(tiny, {"repeated": data}, ["induction", "induction_tl"], progress=False)
    # A perfect induction head: ARENA mean 1 over the second half; detect_head divides by all 16 rows,
    # and the rows of the first half that attend to themselves hit nothing (random tokens, no repeats).
    assert scores["induction_raw"].min() == 1.0
    torch.testing.assert_close(scores["induction_tl"], torch.full((2, 6), n / T), rtol=0, atol=1e-6)


def test_heads_with_negligible_non_sink_mass_get_no_content_label(tiny):
    data = make_repeated(tiny, half=8, n=3)
    T, n = data.tokens.shape[1], data.half_len
    target = lambda i: i - n + 1 if i >= n else None  # noqa: E731
    heads = torch.stack([
        _rows(T, target, sink=0.99),   # an induction pattern under a 99% sink: mass 0.01
        _rows(T, target, sink=0.90),   # mass 0.10: above the floor
        _rows(T, target, sink=0.0),
        _rows(T, lambda i: None), _rows(T, lambda i: None), _rows(T, lambda i: None),
    ])
    with tiny.hooks(fwd_hooks=_set_pattern(tiny, heads)):
        table = classify_heads(tiny, data={"repeated": data, "text": data.tokens}, greedy=False, qk=False,
                               scorers=["previous_token", "duplicate", "induction", "sink"], progress=False)
        strict = classify_heads(tiny, data={"repeated": data, "text": data.tokens}, greedy=False, qk=False,
                                scorers=["induction"], min_non_sink_mass=0.2, progress=False)
        loose = classify_heads(tiny, data={"repeated": data, "text": data.tokens}, greedy=False, qk=False,
                               scorers=["induction"], min_non_sink_mass=0.0, progress=False)
    first = table[table.layer == 0].set_index("head")
    assert first.induction_mass.tolist()[:3] == pytest.approx([0.01, 0.10, 1.0])
    assert first.induction.tolist()[:3] == pytest.approx([1.0, 1.0, 1.0])  # the conditional score alone
    assert first.induction_raw.tolist()[:3] == pytest.approx([0.01, 0.10, 1.0])
    assert first.labels.tolist()[:3] == [("sink",), ("induction", "sink"), ("induction",)]
    assert strict[strict.layer == 0].labels.tolist()[:3] == [("none",), ("none",), ("induction",)]
    assert loose[loose.layer == 0].labels.tolist()[:3] == [("induction",)] * 3
    assert table.attrs["min_non_sink_mass"] == 0.05 and "pooled conditional score" in table.attrs["label_statistic"]
    with pytest.raises(SinkInterpError, match=r"min_non_sink_mass 1.5 must be a number in \[0, 1\)"):
        classify_heads(tiny, data={"repeated": data}, scorers=["induction"], greedy=False, qk=False,
                       min_non_sink_mass=1.5)


def test_previous_token_score_on_text(tiny):
    tokens = random_tokens(tiny, 2, 12, seed=4)
    prev = _rows(12, lambda i: i - 1, sink=0.5)
    with tiny.hooks(fwd_hooks=_set_pattern(tiny, prev.expand(6, 12, 12))):
        scores = head_scores(tiny, {"text": tokens}, ["previous_token_text"], progress=False)
    torch.testing.assert_close(scores["previous_token_text"], torch.ones(2, 6))
    torch.testing.assert_close(scores["previous_token_text_raw"], torch.full((2, 6), 0.5))
    torch.testing.assert_close(scores["previous_token_text_mass"], torch.full((2, 6), 0.5))


# --------------------------------------------------------------------------------------------
# Circuit evidence: OV copying scores and direct logit attribution


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def test_ov_weights_are_what_the_forward_uses(tiny):
    """At layer 0 the value of token t is its normalised embedding times W_V (its kv group's), and
    z W_O summed over heads is the attention output: the weights read are the ones that run."""
    from sinkinterp.heads.copying import _head_ov

    tokens = random_tokens(tiny, 1, 12, seed=3)
    _, cache = tiny.run_with_cache(tokens)
    embedded = _rms(tiny.W_E[tokens[0]].double(), tiny.cfg.eps)
    written = 0
    for head in range(tiny.cfg.n_heads):
        w_v, w_o = _head_ov(tiny, 0, head)
        v = cache["blocks.0.attn.hook_v"][0, :, head // 3].double()  # 6 query heads over 2 kv heads
        torch.testing.assert_close(embedded @ w_v, v, rtol=0, atol=1e-5)
        written = written + cache["blocks.0.attn.hook_z"][0, :, head].double() @ w_o
    torch.testing.assert_close(written, cache["blocks.0.hook_attn_out"][0].double(), rtol=0, atol=1e-5)


def test_ov_copying_scores_match_the_full_vocabulary_circuit(tiny):
    from sinkinterp.data import allowed_ids
    from sinkinterp.heads.copying import _head_ov, ov_copying_scores

    frame = ov_copying_scores(tiny, [(0, 1), (1, 4)], n_tokens=10_000, seed=0)
    assert frame.attrs["n_tokens"] == len(allowed_ids(tiny))  # capped at the vocabulary
    for row in frame.itertuples():
        w_v, w_o = _head_ov(tiny, row.layer, row.head)
        circuit = tiny.W_E.double() @ w_v @ w_o @ tiny.W_U.double()  # [vocab vocab], tiny: 67 x 67
        eigen = torch.linalg.eigvals(circuit)
        assert row.ov_eigen == pytest.approx(float(eigen.real.sum() / eigen.abs().sum()), abs=1e-9)
        ids = allowed_ids(tiny)
        top = circuit[ids].argmax(dim=1)
        assert row.ov_top1 == pytest.approx(float((top == ids).double().mean()), abs=1e-12)
        assert -1 <= row.ov_eigen <= 1 and row.ov_top1 <= row.ov_top5


def test_direct_logit_attribution_is_the_direct_effect_with_the_norm_scale_frozen(tiny):
    """Removing one last-layer head's output, with the final norm's scale and the last MLP's output
    held at their clean values (so only the direct path changes), moves the target's logit
    (against the mean logit) by exactly minus its attribution."""
    from sinkinterp.heads import logit_attribution

    tokens = random_tokens(tiny, 3, 16, seed=4)
    rows, queries = torch.tensor([0, 0, 1, 2]), torch.tensor([5, 14, 9, 2])
    targets = queries + 1
    targets[-1] = 0  # any position's token can be the target, not only the next one
    dla = logit_attribution(tiny, tokens, rows, queries, targets, batch_size=2)
    assert dla.shape == (4, 2, 6)
    last, head = 1, 4
    _, cache = tiny.run_with_cache(tokens)
    scale, mlp = cache["ln_final.hook_scale"], cache[f"blocks.{last}.hook_mlp_out"]

    def remove(z, hook):
        z = z.clone()
        z[..., head, :] = 0
        return z

    with torch.inference_mode(), tiny.hooks(fwd_hooks=[(f"blocks.{last}.attn.hook_z", remove),
                                                       (f"blocks.{last}.hook_mlp_out", lambda x, hook: mlp),
                                                       ("ln_final.hook_scale", lambda x, hook: scale)]):
        ablated = tiny(tokens)
    clean = tiny(tokens)

    def centred(logits):
        picked = logits[rows, queries]
        return picked.gather(1, tokens[rows, targets][:, None])[:, 0] - picked.mean(dim=1)

    torch.testing.assert_close(centred(clean) - centred(ablated), dla[:, last, head], rtol=0, atol=1e-5)
    assert dla[:, last].abs().sum() > 0


def test_copying_evidence_marks_the_top_heads(tiny):
    from sinkinterp.heads import copying_evidence

    table = pd.DataFrame({"layer": [0] * 6 + [1] * 6, "head": list(range(6)) * 2,
                          "induction": [0.9, 0.1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.8],
                          "recall": [0.1, 0.7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.6]})
    frame = copying_evidence(tiny, table, k=2, n_seqs=2, half_len=8, n_prompts=0, n_tokens=20)  # no tokenizer
    roles = dict(zip(zip(frame["layer"], frame["head"]), frame["role"]))
    assert roles[(0, 0)] == "induction" and roles[(0, 1)] == "recall" and roles[(1, 5)] == "induction+recall"
    assert sum(r == "other" for r in roles.values()) == 9
    assert {"ov_eigen", "ov_top1", "dla_induction"} <= set(frame.columns) and "dla_needle" not in frame
    assert {r["role"] for r in frame.attrs["by_role"]} == {"induction", "recall", "induction+recall", "other"}
    assert frame["dla_induction"].notna().all()


def test_random_head_sets_are_layer_matched():
    import random as stdlib_random

    from sinkinterp.heads.validate import _layer_matched

    reference = [(17, 3), (17, 4), (18, 6), (23, 2)]
    pool = [(l, h) for l in range(30) for h in range(9) if (l, h) not in reference]
    for seed in range(20):
        drawn = _layer_matched(pool, reference, stdlib_random.Random(seed))
        assert sorted(l for l, _ in drawn) == [17, 17, 18, 23] and len(set(drawn)) == 4
    # A layer with too few other heads lends from the nearest one.
    crowded = [(0, 0), (0, 1), (1, 0), (3, 0)]
    drawn = _layer_matched(crowded, [(0, 5), (0, 6), (0, 7)], stdlib_random.Random(0))
    assert sorted(drawn) == [(0, 0), (0, 1), (1, 0)]
