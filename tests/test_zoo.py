"""Every decoder family TransformerLens converts, on every backend this TransformerLens has: each
sinkinterp measurement and intervention checked against TransformerLens's own hooks
(tests/zoo_checks.py), and each refusal confirmed by editing the hook by hand."""

import pytest
import torch

from sinkinterp.backends import capabilities

import zoo
from zoo_checks import CHECKS, model_for, refusal_is_justified, run_check

pytestmark = pytest.mark.backend  # runs again on TransformerLens 3.9 (make test)

PAIRS = [(family, backend) for family in zoo.FAMILIES for backend in zoo.backends_for(family)]


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize(("family", "backend"), PAIRS, ids=[f"{f}-{b}" for f, b in PAIRS])
def test_family(family, backend, check):
    outcome, detail = run_check(family, backend, check)
    if outcome == "refused":
        # A refusal names the attention class and is only allowed where the edit really fails.
        assert capabilities(model_for(family, backend)).attention_class in detail
        assert refusal_is_justified(family, backend, check), f"refused although the hooks take the edit: {detail}"
    else:
        assert outcome in ("ok", "n/a"), f"{outcome}: {detail}"


@pytest.mark.parametrize(("family", "backend"), [p for p in PAIRS if zoo.hf_reference(p[0]) is not None],
                         ids=lambda p: str(p))
def test_family_matches_transformers(family, backend):
    """Log-probabilities agree with the HF model; where TransformerLens's own conversion departs
    (zoo.PARITY_GAPS), the gap is what it says, so a TransformerLens fix shows up here."""
    model, reference = model_for(family, backend), zoo.hf_reference(family)
    tokens = torch.randint(3, zoo.VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ours = torch.log_softmax(model(tokens).double(), -1)
        theirs = torch.log_softmax(reference(tokens).logits.double(), -1)
    gap = float((ours - theirs).abs().max())
    if (family, backend) in zoo.PARITY_GAPS:
        assert gap > 1e-4, f"{zoo.PARITY_GAPS[family, backend]}, but the gap is now {gap:.2g}"
    else:
        assert gap < 1e-4


def test_learned_sinks_keep_their_mass_off_the_pattern():
    """gpt-oss's learned sink logits take part of the softmax but have no key: hook_pattern rows sum
    to less than 1, and sink_scores reports that share as learned_sink_share."""
    from sinkinterp import sink_scores
    from sinkinterp.data import random_tokens

    model = model_for("gpt-oss", zoo.backends_for("gpt-oss")[0])
    tokens = random_tokens(model, 2, 12, seed=2)
    seen = {}
    with torch.inference_mode():
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda x, hook: seen.update(p=x))])
    missing = 1 - seen["p"].double().sum(-1)  # [batch head query]
    assert float(missing.min()) > 0.01
    report = sink_scores(model, tokens)
    torch.testing.assert_close(report.learned_sink_share[0], missing[:, :, 1:].mean(dim=(0, 2)), rtol=0, atol=1e-6)
    plain = sink_scores(model_for("llama", zoo.backends_for("llama")[0]), tokens)
    assert float(plain.learned_sink_share.abs().max()) < 1e-6


@pytest.mark.parametrize("family", [f for f in ("gpt-j", "attn-only") if zoo.backends_for(f)])
def test_spec_refuses_an_unfired_hook_before_any_forward_pass(family, tmp_path):
    """PatchFirstTokenResidual(hook='resid_mid') on parallel attention (GPT-J) or an attention-only
    model: the spec check refuses it by name before the experiment's first forward pass (the only
    passes allowed are the capability probe's, over 4 tokens)."""
    from sinkinterp import SinkInterpError
    from sinkinterp.experiments import ExperimentSpec, run_experiment

    model = zoo.build(family, zoo.backends_for(family)[0])
    spec = ExperimentSpec.from_dict({
        "name": "resid-mid", "model": "tiny-llama",
        "data": {"source": "random", "seq_len": 16, "n_seqs": 2, "n_calibration": 1},
        "from_query": 4,
        "conditions": [{"name": "patch mid", "interventions": [
            {"type": "PatchFirstTokenResidual", "hook": "resid_mid", "fit": {"source": "mean"}}]}],
    })
    lengths = []
    hook = model.hook_dict["hook_embed"]
    handle = hook.register_forward_hook(lambda module, args, out: lengths.append(out.shape[1]))
    try:
        with pytest.raises(SinkInterpError, match=r"interventions\[0\].*PatchFirstTokenResidual edits "
                                                  r"blocks\.L\.hook_resid_mid, which never fires"):
            run_experiment(spec, tmp_path / "out", model=model, log=lambda *a: None)
    finally:
        handle.remove()
    assert all(n == 4 for n in lengths), f"forward passes over {lengths} positions before the refusal"


def test_boot_native_attention_edits_are_refused_not_ignored():
    """TransformerLens's TL-native toy path (boot_native) fires hook_attn_scores as the post-softmax
    pattern, after hook_z, and ignores edits there: MaskSinkKey and the constant slot must refuse it."""
    from transformer_lens.model_bridge import TransformerBridge

    from sinkinterp import SinkInterpError
    from sinkinterp.interventions import ConstantAttentionBias, MaskSinkKey, intervene
    from sinkinterp.models import ModelSource, attach_source

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TransformerBridge.boot_native({"n_layers": 2, "d_model": 32, "n_heads": 4, "d_head": 8, "d_mlp": 64,
                                               "d_vocab": 67, "n_ctx": 64, "act_fn": "gelu"})
    attach_source(model, ModelSource(name="native", origin="config", backend="bridge", dtype="float32",
                                     prepend_bos=False))
    caps = capabilities(model)
    assert not caps.scores_are_logits and "attn.hook_attn_scores" not in caps.editable
    tokens = torch.arange(3, 9)[None]
    for intervention in (MaskSinkKey(from_query=2), ConstantAttentionBias(logit=0.0, from_query=2)):
        with pytest.raises(SinkInterpError, match=rf"{type(intervention).__name__} .*attention class AttentionBridge"):
            with intervene(model, intervention):
                model(tokens)
    # ...and the hand-made edit that sinkinterp refuses really does nothing there.
    def mask(x, hook):
        x = x.clone()
        x[:, :, 1:, 0] = float("-inf")
        return x

    import warnings

    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(model(tokens), model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_attn_scores", mask)]))
