"""Every intervention gives the same next-token loss on HookedTransformer and TransformerBridge."""

import pytest
import torch

from sinkinterp.data import corpus_tokens
from sinkinterp.interventions import (
    AblateSinkValue,
    ConstantAttentionBias,
    EditMassiveChannels,
    MaskSinkKey,
    PatchFirstTokenResidual,
    ReplaceSinkKey,
    fit_constant_bias,
    intervene,
)

from conftest import both_backends

pytestmark = [pytest.mark.integration, pytest.mark.backend]


@pytest.fixture(scope="module")
def reference(smollm2):
    return corpus_tokens(smollm2, 4, 48)


@pytest.fixture(scope="module")
def evaluation(smollm2):
    return corpus_tokens(smollm2, 6, 48)[4:]  # the two sequences after the reference ones


def loss(model, tokens, *interventions) -> float:
    with torch.inference_mode(), intervene(model, *interventions):
        return float(model(tokens, return_type="loss"))


def interventions(model, reference):
    edit = EditMassiveChannels.fit(model, reference, mode="zero")
    return {
        "mask": MaskSinkKey(from_query=16),
        "value zero": AblateSinkValue(),
        "value mean": AblateSinkValue.fit(model, reference, mode="mean"),
        "key mean_other": ReplaceSinkKey.fit(model, reference),
        "massive zero": edit,
        "massive control": edit.random_control(model, reference, seed=0),
        "patch mean": PatchFirstTokenResidual.fit(model, "mean", reference=reference),
        "patch token": PatchFirstTokenResidual.fit(model, "<|endoftext|>"),
        "bias moments": fit_constant_bias(model, reference, from_query=16),
        "bias logit only": ConstantAttentionBias(logit=3.0, from_query=16),
    }


@both_backends
def test_each_intervention_gives_the_same_loss_on_both_backends(smollm2, smollm2_bridge, reference, evaluation):
    clean = loss(smollm2, evaluation)
    assert abs(loss(smollm2_bridge, evaluation) - clean) < 1e-3
    changed = 0
    for name, intervention in interventions(smollm2, reference).items():
        hooked, bridge = loss(smollm2, evaluation, intervention), loss(smollm2_bridge, evaluation, intervention)
        assert abs(hooked - bridge) < 1e-3, (name, hooked, bridge)
        changed += abs(hooked - clean) > 1e-3
    assert changed >= 8  # the interventions do something (each is a real change to the forward)


def test_the_detector_resolves_channel_507(smollm2, reference):
    edit = EditMassiveChannels.fit(smollm2, reference, mode="mean")
    assert 507 in edit.channels
    control = edit.random_control(smollm2, reference, seed=0)
    assert len(control.channels) == len(edit.channels) and not set(control.channels) & set(edit.channels)
