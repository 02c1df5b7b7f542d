"""Bad values for the public API, run by tests/test_robustness.py in a plain interpreter (no
runtime type checker). Each case is (label, call, message): the call must raise SinkInterpError
whose text matches ``message``, and leave no hook attached. ``python -m tests.bad_api`` prints one
JSON list of outcomes."""

import json
import re

import torch

from sinkinterp import (AblateHeads, AblateSinkValue, ConstantAttentionBias, DisruptQKChannels, EditMassiveChannels, MaskSinkKey,
                        PatchFirstTokenResidual, ReplaceSinkKey, fit_constant_bias, intervene,
                        qk_massive_values, sink_scores)
from sinkinterp.data import NeedlePrompts, corpus_tokens, needle_prompts, random_tokens, repeated_random_tokens
from sinkinterp.experiments import load_spec
from sinkinterp.stats import bootstrap_mean, bootstrap_statistic, recovery_fraction
from sinkinterp.figures import effects_frame, figure_png, plot_head_classes, plot_qkv_norms, save_figures
from sinkinterp.measure import find_massive_activations, residual_profile, stable_massive_channels
from sinkinterp.heads import RepeatedTokens, classify_heads, head_scores
from sinkinterp.interventions import Intervention
from sinkinterp.experiments.screening import screen
from sinkinterp.measure.scan import scan, scan_corpus
from sinkinterp.tiny import tiny_llama
from sinkinterp.views import attention_view, compare_view


def _massive(m, t, n_seqs=None):
    frame = find_massive_activations(m, t, progress=False)
    if n_seqs is not None:
        frame.attrs["n_seqs"] = n_seqs
    return frame


def _head_table():
    import pandas as pd

    return pd.DataFrame({"layer": [0, 0], "head": [0, 1], "labels": [("sink",), ("none",)], "sink": [0.9, 0.1]})


def forward(m, t, *interventions):
    with intervene(m, *interventions):
        m(t)


CASES = [
    ("text bytes document", lambda m, t: corpus_tokens(m, 1, 4, text=["fine", b"bytes"]), r"text documents must be strings, got bytes"),
    ("text no documents", lambda m, t: corpus_tokens(m, 1, 4, text=[]), r"text must be a string or a non-empty sequence of strings \(documents\), got list"),
    ("text number", lambda m, t: corpus_tokens(m, 1, 4, text=123), r"text must be a string or a non-empty sequence .* got int"),
    ("corpus seed", lambda m, t: corpus_tokens(m, 1, 4, seed=-1), r"seed must be an integer in 0..2\*\*63-1 .*got -1"),
    ("scan_corpus text_file 123", lambda m, t: scan_corpus(m, text_file=123), r"text_file must be a path \(str or Path\), got int"),
    ("uint8 tokens", lambda m, t: sink_scores(m, t.to(torch.uint8)), r"got dtype torch.uint8: convert with tokens.long\(\)"),
    ("eps None", lambda m, t: sink_scores(m, t, eps=None), r"eps must be a number or a list of numbers in \(0, 1\)"),
    ("eps string", lambda m, t: sink_scores(m, t, eps="0.3"), r"eps must be a number .* got '0.3'"),
    ("eps repeated", lambda m, t: sink_scores(m, t, eps=(0.3, 0.3)), r"eps \(0.3, 0.3\) repeats a threshold"),
    ("scan min_queries 0", lambda m, t: scan(m, t, min_queries=0), r"min_queries must be an integer >= 1, got 0"),
    ("rotated 'no'", lambda m, t: qk_massive_values(m, t, rotated="no"), r"rotated must be True or False, got 'no'"),
    ("strongest_heads position", lambda m, t: sink_scores(m, t).strongest_heads(position=100), r"position 100 out of range"),
    ("strongest_heads n", lambda m, t: sink_scores(m, t).strongest_heads(n=0), r"n must be an integer >= 1, got 0"),
    ("float layers", lambda m, t: MaskSinkKey(layers=1.5), r"layers must be a list of integers \(or None\), got 1.5"),
    ("list type", lambda m, t: Intervention.from_dict({"type": ["MaskSinkKey"]}), r"'type' is a name such as 'MaskSinkKey'"),
    ("replace_sink 'no'", lambda m, t: ConstantAttentionBias(replace_sink="no"), r"replace_sink must be True or False, got 'no'"),
    ("DisruptQKChannels rotated 'yes'", lambda m, t: DisruptQKChannels(rotated="yes"), r"rotated must be True or False, got 'yes'"),
    ("DisruptQKChannels top_k 1.5", lambda m, t: DisruptQKChannels(top_k=1.5), r"top_k must be an integer >= 1, got 1.5"),
    ("bias method", lambda m, t: ConstantAttentionBias(method="bogus"), r"method 'bogus' is not one of 'given', 'moments'"),
    ("logit 1e39", lambda m, t: ConstantAttentionBias(logit=1e39), r"logit holds 1e\+39: only finite numbers or -inf of magnitude"),
    ("value 1e39", lambda m, t: AblateSinkValue(mode="mean", layers=[0], heads=[0], value=[[[1e39] * 8]]),
     r"value holds 1e\+39: only finite numbers of magnitude at most 1e\+30"),
    ("negative position", lambda m, t: EditMassiveChannels(channels=(0,), positions=(-1,)), r"position must be an integer >= 0, got -1"),
    ("fit on 1-D tokens", lambda m, t: AblateSinkValue.fit(m, t[0]), r"tokens must be 2-D .* for one sequence pass tokens\[None\]"),
    ("fit on a list", lambda m, t: ReplaceSinkKey.fit(m, t.tolist()), r"tokens must be a torch tensor"),
    ("fit position past input", lambda m, t: ReplaceSinkKey.fit(m, t, position=50), r"reference position 50 is beyond this input's 32"),
    ("fit position string", lambda m, t: PatchFirstTokenResidual.fit(m, t, position="0"), r"position must be an integer >= 0, got '0'"),
    ("from_query string", lambda m, t: AblateHeads.fit(m, t, heads=[(0, 0)], from_query="1"), r"from_query must be an integer"),
    ("AblateHeads past input", lambda m, t: forward(m, t, AblateHeads(heads=[(0, 0)], mode="zero", from_query=32)),
     r"AblateHeads from_query 32 is beyond this input's 32 positions"),
    ("channel out of range", lambda m, t: EditMassiveChannels.fit(m, t, channels=[1000], mode="mean", layers="all"),
     r"channel 1000 out of range"),
    ("pool 0", lambda m, t: EditMassiveChannels(channels=(0,)).random_control(m, t, pool=0), r"pool must be an integer >= 1"),
    ("control seed None", lambda m, t: EditMassiveChannels(channels=(0,)).random_control(m, t, seed=None), r"seed must be an integer"),
    ("lr negative", lambda m, t: fit_constant_bias(m, t, method="gradient", steps=2, lr=-1.0), r"lr must be a number in \(0, 10\]"),
    ("history string", lambda m, t: fit_constant_bias(m, t, method="gradient", steps=2, history="abc"), r"history must be a list"),
    ("with_value 'no'", lambda m, t: fit_constant_bias(m, t, with_value="no"), r"with_value must be True or False"),
    ("seed string", lambda m, t: random_tokens(m, 2, 8, seed="a"), r"seed must be an integer in 0..2\*\*63-1"),
    ("seed bool", lambda m, t: random_tokens(m, 2, 8, seed=True), r"seed must be an integer"),
    ("seed 2**70", lambda m, t: random_tokens(m, 2, 8, seed=2**70), r"seed must be an integer"),
    ("seed None", lambda m, t: repeated_random_tokens(m, 2, 4, seed=None), r"seed must be an integer"),
    ("bootstrap of a string", lambda m, t: bootstrap_mean("abc"), r"values must be numbers \(a list or tensor\), got str"),
    ("bootstrap of 2-D", lambda m, t: bootstrap_mean([[1.0, 2.0], [3.0, 4.0]]), r"one number per sequence \(1-D\), got shape \(2, 2\)"),
    ("confidence string", lambda m, t: bootstrap_mean([1.0, 2.0], confidence="0.9"), r"confidence '0.9' is outside \(0, 1\)"),
    ("bootstrap seed float", lambda m, t: bootstrap_mean([1.0, 2.0], seed=1.5), r"seed must be an integer"),
    ("statistic shape", lambda m, t: bootstrap_statistic(lambda x: x, [1.0, 2.0, 3.0]), r"statistic must return one number per resample"),
    ("statistic NaN", lambda m, t: bootstrap_statistic(lambda x: x.mean(1), [1.0, float("nan"), 3.0]), r"array 0 holds non-finite"),
    ("min_gap string", lambda m, t: recovery_fraction([1.0, 2.0], [2.0, 3.0], [1.5, 2.5], min_gap="a"), r"min_gap must be a number"),
    ("head_scores data None", lambda m, t: head_scores(m, None, ["sink"]), r"data must be a dict"),
    ("repeated as a tensor", lambda m, t: head_scores(m, {"repeated": t}, ["induction"]), r"data\['repeated'\] must be RepeatedTokens"),
    ("scorers string", lambda m, t: head_scores(m, {"text": t}, "sink"), r"scorers must be a list of scorer names"),
    ("scorers empty", lambda m, t: head_scores(m, {"text": t}, []), r"scorers is empty"),
    ("half_len 0", lambda m, t: RepeatedTokens(t[:, :0], half_len=0), r"half_len must be an integer >= 1, got 0"),
    ("greedy 'no'", lambda m, t: classify_heads(m, greedy="no"), r"greedy must be True or False, got 'no'"),
    ("classify seed float", lambda m, t: classify_heads(m, seed=1.5), r"seed must be an integer"),
    ("hide_sink 'no'", lambda m, t: attention_view(m, t[:1], hide_sink="no"), r"hide_sink must be True or False"),
    ("sink_position string", lambda m, t: attention_view(m, t[:1], sink_position="0"), r"sink_position must be an integer"),
    ("max_tokens string", lambda m, t: attention_view(m, t[:1], max_tokens="a"), r"max_tokens must be an integer >= 2"),
    ("title number", lambda m, t: attention_view(m, t[:1], title=123), r"title must be a string, got 123"),
    ("screen a type name", lambda m, t: screen(m, t, "MaskSinkKey", from_query=4),
     r"screen takes an Intervention \(applied to every head it names\), got str"),
    ("screen batch_size 0", lambda m, t: screen(m, t, MaskSinkKey(from_query=4), from_query=4, batch_size=0),
     r"batch_size must be an integer >= 1, got 0"),
    ("view first_token float", lambda m, t: attention_view(m, "some text", first_token=1.5),
     r"first token must be 'default', 'none', 'bos', a token string or an id, got 1.5"),
    ("view interventions not a list", lambda m, t: attention_view(m, t[:1], interventions=MaskSinkKey()), r"interventions must be a list"),
    ("compare not a list", lambda m, t: compare_view(m, t[:1], MaskSinkKey(from_query=8)), r"interventions must be a list"),
    ("figure name escapes", lambda m, t: save_figures({"../escaped": None}, "/tmp"), r"figure name '../escaped' must be a plain file stem"),
    ("stable channels of None", lambda m, t: stable_massive_channels(None), r"takes the frame from find_massive_activations"),
    ("stable channels n_seqs 0", lambda m, t: stable_massive_channels(_massive(m, t, n_seqs=0)),
     r"attrs\['n_seqs'\] must be a positive integer, got 0"),
    ("stable channels min_fraction", lambda m, t: stable_massive_channels(_massive(m, t), min_fraction=2),
     r"min_fraction 2 must be a number in \[0, 1\]"),
    ("stable channels missing columns", lambda m, t: stable_massive_channels(_massive(m, t)[["layer"]]),
     r"activations lacks columns"),
    ("residual profile k", lambda m, t: residual_profile(m, t[:, :2], k=100), r"k = 100 exceeds the 2 x 48 values"),
    ("sink_channels layer string", lambda m, t: residual_profile(m, t).sink_channels(layer="0"), r"layer must be an integer"),
    ("sink_channels n", lambda m, t: residual_profile(m, t).sink_channels(n=0), r"n must be an integer >= 1, got 0"),
    ("plot_head_classes no scores", lambda m, t: plot_head_classes(_head_table(), scores=()), r"none of the scores to plot"),
    ("effects_frame malformed", lambda m, t: effects_frame({"spec": {}, "conditions": [{"name": "x", "metrics": {"loss": {}}}]}),
     r"results\['conditions'\]\[0\] is not a condition record as run_experiment writes it"),
    ("effects_frame conditions string", lambda m, t: effects_frame({"spec": {}, "conditions": "abc"}),
     r"results\['conditions'\]\[0\] is not a condition record"),
    ("plot_qkv_norms string", lambda m, t: plot_qkv_norms("frame"), r"plot_qkv_norms takes the DataFrame qkv_geometry returns, got str"),
    ("scan token_spec string", lambda m, t: scan(m, t, token_spec="x"), r"token_spec is a dict recording how the tokens were made"),
    ("NeedlePrompts prompt_len string", lambda m, t: NeedlePrompts(t, "a", torch.zeros(len(t), dtype=torch.long), torch.ones(len(t), dtype=torch.long)),
     r"NeedlePrompts.prompt_len must be an integer >= 1, got 'a'"),
    ("NeedlePrompts float tokens", lambda m, t: NeedlePrompts(t.float(), 4, torch.zeros(len(t), dtype=torch.long), torch.ones(len(t), dtype=torch.long)),
     r"NeedlePrompts.tokens must hold token ids \(int64 or int32\), got dtype torch.float32"),
    ("NeedlePrompts float starts", lambda m, t: NeedlePrompts(t, 4, torch.zeros(len(t)), torch.ones(len(t), dtype=torch.long)),
     r"NeedlePrompts.needle_start must be an integer tensor of shape"),
    ("needle request without name", lambda m, t: needle_prompts(m, 1, 64, request="Repeat it:"),
     r"request must be a string with a \{name\} field"),
    ("needle request stray field", lambda m, t: needle_prompts(m, 1, 64, request="{name} and {city}"),
     r"request '\{name\} and \{city\}' has a field other than \{name\} or a stray brace"),
    ("figure_png dpi 0", lambda m, t: figure_png(None, dpi=0), r"dpi must be a number in 10..1200, got 0"),
    ("tiny n_layers 0", lambda m, t: tiny_llama(n_layers=0), r"n_layers must be an integer >= 1, got 0"),
    ("tiny heads not a multiple", lambda m, t: tiny_llama(n_heads=5), r"n_heads 5 is not a multiple of n_key_value_heads 2"),
    ("tiny bogus override", lambda m, t: tiny_llama(bogus=1), r"bogus"),
    ("load_spec number", lambda m, t: load_spec(123), r"load_spec takes a spec file path or a built-in name, got 123"),
    ("overrides list", lambda m, t: load_spec("no-op", overrides=["a"]), r"overrides must be a dict of dotted keys"),
]


def main() -> None:
    model = tiny_llama()
    tokens = random_tokens(model, 4, 32, seed=0)
    outcomes = []
    for label, call, message in CASES:
        try:
            call(model, tokens)
            outcome = {"type": "none", "message": "accepted"}
        except Exception as e:  # noqa: BLE001 - what is raised is what is being tested
            outcome = {"type": type(e).__name__, "message": str(e)[:300]}
        outcome["matches"] = outcome["type"] == "SinkInterpError" and bool(re.search(message, outcome["message"]))
        outcome["hooks_left"] = sum(len(p.fwd_hooks) for p in model.hook_dict.values())
        outcome["label"] = label
        model.reset_hooks()
        outcomes.append(outcome)
    print(json.dumps(outcomes))


if __name__ == "__main__":
    main()
