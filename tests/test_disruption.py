"""Jin et al.'s massive-value disruption: the edit on hand-built q/k tensors and on a tiny rotary
model, the teacher-forced answer scoring, and the passkey / fact prompts."""

from __future__ import annotations

import pytest
import torch

from sinkinterp import SinkInterpError
from sinkinterp.data import AnswerPrompts
from sinkinterp.experiments.disruption import score_answers
from sinkinterp.interventions import DisruptQKChannels, Intervention, intervene
from sinkinterp.interventions.qk import disrupt_channels
from sinkinterp.tiny import tiny_gpt2, tiny_llama
from conftest import captured, n_hooks

pytestmark = pytest.mark.backend  # runs again on TransformerLens 3.9 (make test)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(n_layers=2)


def test_disruption_replaces_the_largest_or_smallest_norm_channel_by_its_mean():
    # [batch 2, pos 3, head 1, d_head 3]; per sequence the channel norms differ
    x = torch.tensor([[[[10.0, 1.0, 0.1]], [[20.0, -1.0, 0.2]], [[30.0, 2.0, 0.0]]],
                      [[[1.0, 5.0, 0.5]], [[1.0, -7.0, 0.5]], [[1.0, 9.0, 0.5]]]])
    massive = disrupt_channels(x, 1, "massive")
    assert torch.equal(massive[0, :, 0, 0], torch.full((3,), 20.0))  # sequence 0: channel 0, mean 20
    assert torch.allclose(massive[1, :, 0, 1], torch.full((3,), 7 / 3))  # sequence 1: channel 1
    untouched = torch.ones_like(x, dtype=torch.bool)
    untouched[0, :, 0, 0] = untouched[1, :, 0, 1] = False
    assert torch.equal(massive[untouched], x[untouched])
    lowest = disrupt_channels(x, 1, "lowest")
    assert torch.allclose(lowest[0, :, 0, 2], torch.full((3,), 0.1))
    assert torch.allclose(lowest[1, :, 0, 2], torch.full((3,), 0.5))  # constant already: unchanged
    both = disrupt_channels(x, 3, "massive")  # every channel: each position becomes the mean vector
    assert torch.allclose(both, x.mean(dim=1, keepdim=True).expand_as(x))


@pytest.mark.parametrize("rotated", [True, False])
def test_the_model_reads_the_disrupted_query_and_key(llama, rotated):
    """Layer 0 (its input is clean): the q and k the attention uses are the clean ones with each
    head's largest-norm channel per sequence set to its mean; the scores follow from them."""
    tokens = torch.randint(0, llama.cfg.d_vocab, (3, 10), generator=torch.Generator().manual_seed(1))
    site = "hook_rot_" if rotated else "hook_"
    names = [f"blocks.0.attn.{site}q", f"blocks.0.attn.{site}k", "blocks.0.attn.hook_attn_scores"]
    clean = captured(llama, tokens, names)
    edited = captured(llama, tokens, names, DisruptQKChannels(layers=(0,), rotated=rotated))
    for kind in "qk":
        name = f"blocks.0.attn.{site}{kind}"
        assert torch.allclose(edited[name], disrupt_channels(clean[name], 1, "massive"), atol=1e-6)
        assert not torch.allclose(edited[name], clean[name])
    assert not torch.allclose(edited["blocks.0.attn.hook_attn_scores"], clean["blocks.0.attn.hook_attn_scores"])
    only_q = captured(llama, tokens, names, DisruptQKChannels(layers=(0,), kinds="q", rotated=rotated))
    assert torch.equal(only_q[f"blocks.0.attn.{site}k"], clean[f"blocks.0.attn.{site}k"])


def test_disruption_round_trips_and_refuses_bad_input(llama):
    edit = DisruptQKChannels(top_k=2, select="lowest", kinds=["k"], layers=[1])
    assert Intervention.from_dict(edit.to_dict()) == edit and edit.kinds == ("k",)
    for kwargs, words in [({"select": "largest"}, "'massive', 'lowest'"), ({"kinds": ("v",)}, "'q' and/or 'k'"),
                          ({"kinds": ()}, "'q' and/or 'k'"), ({"top_k": 0}, "top_k must be an integer >= 1")]:  # a non-bool rotated: tests/bad_api.py
        with pytest.raises(SinkInterpError, match=words):
            DisruptQKChannels(**kwargs)
    before = n_hooks(llama)
    with pytest.raises(SinkInterpError, match="top_k 99 exceeds d_head"):
        with intervene(llama, DisruptQKChannels(top_k=99)):
            pass
    with pytest.raises(SinkInterpError, match="rotary"):
        with intervene(tiny_gpt2(), DisruptQKChannels()):  # no rotary embedding: no rotated q and k
            pass
    assert n_hooks(llama) == before


def test_answers_are_scored_by_teacher_forcing_in_batches_of_one_length(llama):
    """Exact match and log-probability equal a forward pass per row, whether rows of one length share a
    batch or not; a planted answer (the model's own greedy tokens) is an exact match."""
    g = torch.Generator().manual_seed(2)
    rows, lens = [], []
    for length, n_prompt in [(9, 6), (9, 6), (12, 8), (9, 6), (12, 8)]:
        row = torch.randint(0, llama.cfg.d_vocab, (length,), generator=g)
        rows.append(row)
        lens.append(n_prompt)
    # make row 0's answer the model's greedy continuation, so it must count as exact
    row = rows[0].clone()
    for pos in range(lens[0], len(row)):
        row[pos] = llama(row[None, :pos])[0, -1].argmax()
    rows[0] = row
    prompts = AnswerPrompts("toy", tuple(rows), tuple(lens), ("",) * 5, None, "none")
    edit = (DisruptQKChannels(),)
    for interventions in [(), edit]:
        exact, logprob = score_answers(llama, prompts, interventions, batch_size=2)
        for r, (row, n) in enumerate(zip(rows, lens)):
            with intervene(llama, *interventions):
                logits = llama(row[None])[0, n - 1 : -1].double()
            target = row[n:]
            assert exact[r] == float((logits.argmax(-1) == target).all())
            expected = logits.log_softmax(-1).gather(-1, target[:, None]).sum()
            assert logprob[r] == pytest.approx(float(expected), abs=1e-4)
        if not interventions:
            assert exact[0] == 1.0
