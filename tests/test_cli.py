import json
import subprocess
import sys

import pytest
import torch

from sinkinterp.backends import TL_VERSION
from sinkinterp.cli import main


def test_help_lists_the_commands():
    out = subprocess.run(
        [sys.executable, "-m", "sinkinterp", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "info" in out and "demo" in out and "scan" in out


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["info", "--model", "no-such-model"]) == 2
    assert "sinkinterp: error: unknown model 'no-such-model'" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--stages", "scan,heads,plots"], "--stages: 'plots' is not one of scan, implicit-bias, no-op, formation, heads, stand-ins"),
    (["--size", "huge"], "--size / --set: report size 'huge' is not one of 'laptop', 'quick'"),
    (["--set", "seq_len=0"], "report size seq_len must be an integer >= 1, got 0"),
    (["--set", "n_layers=2"], "report size key 'n_layers' is not one of scan_seqs"),
])
def test_report_bad_arguments_fail_before_any_model_loads(capsys, extra, message):
    # no model fixture: a unit test that reached a model load would fail at once (conftest)
    assert main(["report", *extra]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.integration
def test_info_prints_and_writes_json(smollm2, tmp_path, capsys):
    out_file = tmp_path / "sub" / "info.json"
    assert main(["info", "--json", str(out_file)]) == 0
    printed = capsys.readouterr().out
    assert "9 query / 3 key-value" in printed and "'<|im_start|>'" in printed
    info = json.loads(out_file.read_text())
    assert (info["n_layers"], info["n_heads"], info["n_key_value_heads"]) == (30, 9, 3)
    assert (info["d_model"], info["n_ctx"], info["d_vocab"]) == (576, 8192, 49152)
    assert info["bos_token"] == "<|im_start|>" and info["bos_policy"].startswith("none")
    assert len(info["source"]["sha256"]) == 64 and info["source"]["cache_dir"]
    assert [p.name for p in out_file.parent.iterdir()] == ["info.json"]  # no temp file left


@pytest.mark.integration
def test_demo_prints_info_and_a_sensible_completion(smollm2, capsys, tmp_path):
    assert main(["demo", "--experiment-seqs", "2", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "layers        30" in out
    assert "greedy completion of 'The capital of France is'" in out and "Paris" in out
    assert ("scan of 32 sequences x 64 tokens, seeded windows (seed 0) from pydoc_data.topics (first token: none, "
            "the model default)") in out
    assert "sink ratio (Gu et al.: share of (sequence, head) pairs, 270 heads, with alpha at k=0 > eps):  eps=0.3: 0.747" in out
    assert "channel 507   at first token" in out
    results = json.loads((tmp_path / "demo" / "experiment" / "results.json").read_text())
    assert results["spec"]["name"] == "implicit-bias" and results["spec"]["data"]["n_seqs"] == 2
    verdict = results["verdicts"][0]
    assert f"implicit-bias: {verdict['verdict'].upper()}" in out
    assert sum(line.strip().startswith(("pass", "fail", "inconclusive")) for line in out.splitlines()) == 6
    # The views and figures land in the folder the demo names at the end.
    assert f"demo outputs in {tmp_path / 'demo'}/" in out
    figures = sorted(p.name for p in (tmp_path / "demo" / "figures").iterdir())
    assert figures == ["alpha_heatmap.png", "first_token_share.png", "intervention_effects.png",
                       "massive_activations.png", "qkv_norms.png"]
    assert all((tmp_path / "demo" / "figures" / name).read_bytes()[:8] == PNG for name in figures)
    props = _view_props(tmp_path / "demo" / "attention_masked.html")
    assert len(props["attentionHeadNames"]) == 18 and props["attentionHeadNames"][1].endswith("sink key masked")


PNG = b"\x89PNG\r\n\x1a\n"


def _view_props(path) -> dict:
    import re

    call = re.search(r"CircuitsVis\.AttentionHeads, (.*)\);</script>", path.read_text(encoding="utf-8"))
    return json.loads(call.group(1))


@pytest.mark.integration
def test_view_writes_a_page_of_the_chosen_heads(smollm2, session_smollm2, tmp_path, capsys):
    page = tmp_path / "view.html"
    prompt = "The capital of France is Paris."
    assert main(["view", "--prompt", prompt, "--layers", "14", "--heads", "3", "4", "--out", str(page)]) == 0
    props = _view_props(page)
    tokens = [smollm2.tokenizer.decode([t]) for t in smollm2.tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    assert props["tokens"] == tokens and len(props["attention"][0]) == len(tokens)
    names = props["attentionHeadNames"]
    assert [n.split()[0] for n in names] == ["L14H3", "L14H4"] and all(" sink=0." in n for n in names)
    assert "wrote " in capsys.readouterr().out
    compared = tmp_path / "compare.html"
    argv = ["view", "--prompt", prompt, "--layers", "14", "--heads", "3", "--compare",
            "{type: MaskSinkKey, from_query: 2}", "--label", "masked", "--hide-sink", "--out", str(compared)]
    assert main(argv) == 0
    names = _view_props(compared)["attentionHeadNames"]
    assert len(names) == 2 and "(sink hidden: rows rescaled from" in names[0] and names[0].endswith(" clean")
    assert names[1].endswith("masked")


@pytest.mark.integration
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--out", "view.txt"], "--out must name a file ending in .html or .htm, got 'view.txt'"),
        (["--layers", "30", "--out", "v.html"], "layer 30 out of range: model has 30 layers (0..29)"),
        (["--max-tokens", "3", "--out", "v.html"], "is too many for an attention view (limit 3)"),
        # The help's own example on a prompt of 16 tokens or fewer would compare clean with clean.
        (["--compare", "{type: MaskSinkKey}", "--out", "v.html"], "from_query 16 is beyond this input's"),
    ],
)
def test_view_bad_input_is_a_clear_error(smollm2, session_smollm2, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    assert main(["view", "--prompt", "The capital of France is Paris.", *extra]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_view_refuses_a_bad_intervention_record(capsys):
    with pytest.raises(SystemExit):
        main(["view", "--prompt", "x", "--compare", "{type: NoSuch}", "--out", "v.html"])
    assert "unknown intervention 'NoSuch'" in capsys.readouterr().err


@pytest.mark.integration
def test_scan_prints_a_summary_and_writes_reproducible_json(smollm2, session_smollm2, tmp_path, capsys):
    from sinkinterp.data import corpus_tokens
    from sinkinterp.measure import sink_scores

    out_file = tmp_path / "scan.json"
    argv = ["scan", "--n-seqs", "4", "--seq-len", "32", "--batch-size", "2", "--json", str(out_file),
            "--figures", str(tmp_path / "figures")]
    assert main(argv) == 0
    figures = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert figures == ["alpha_heatmap.png", "first_token_share.png", "massive_activations.png", "qkv_norms.png"]
    captured = capsys.readouterr()
    assert "first-token share per layer" in captured.out and "L29" in captured.out
    assert "strongest sink heads (alpha at k=0): L" in captured.out
    assert "scan: 100%" in captured.err  # two mini-batches: a progress bar
    record = json.loads(out_file.read_text())
    for key in ("model", "tokens", "alpha_first", "sink_ratio", "first_token_share", "secondary_sinks",
                "massive_activations", "stable_massive_channels"):
        assert key in record
    assert record["tokens"] == {"n_seqs": 4, "seq_len": 32, "first_token": "default", "first_token_resolved": "none",
                                "sampling": "windows", "seed": 0, "source": "pydoc_data.topics"}
    assert record["model"]["source"]["sha256"] and record["versions"]["transformer_lens"] == ".".join(map(str, TL_VERSION))
    assert len(record["alpha_first"]) == 30 and len(record["alpha_first"][0]) == 9
    assert set(record["sink_ratio"]) == {"0.3", "0.8"} and len(record["first_token_share"]) == 30
    entry = record["massive_activations"][0]
    assert {"layer", "position", "channel", "value", "ratio_to_median"} <= set(entry)
    assert record["stable_massive_channels"][0]["channel"] == 507
    profile = record["residual_profile"]
    assert len(profile["top_abs"]) == 30 and profile["sink_channels"][0]["channel"] == 507
    # The tokens can be rebuilt from the record, and give the same numbers.
    tokens = corpus_tokens(smollm2, record["tokens"]["n_seqs"], record["tokens"]["seq_len"],
                           seed=record["tokens"]["seed"], sampling=record["tokens"]["sampling"])
    assert not torch.equal(tokens, corpus_tokens(smollm2, 4, 32, sampling="consecutive"))
    again = sink_scores(smollm2, tokens)  # another mini-batch size: float32 rounding may differ
    expected = torch.tensor(record["alpha_first"], dtype=torch.float64)
    torch.testing.assert_close(again.alpha_first, expected, rtol=0, atol=1e-6)
    assert again.sink_ratio[0.3] == record["sink_ratio"]["0.3"]


@pytest.mark.integration
def test_scan_with_a_text_file_and_a_bos_first_token(smollm2, session_smollm2, tmp_path, capsys):
    text = tmp_path / "story.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    out_file = tmp_path / "scan.json"
    argv = ["scan", "--text", str(text), "--n-seqs", "2", "--seq-len", "16", "--first-token", "bos",
            "--eps", "0.5", "--json", str(out_file)]
    assert main(argv) == 0
    record = json.loads(out_file.read_text())
    assert record["tokens"]["first_token"] == "bos" and record["tokens"]["source"] == str(text)
    assert len(record["tokens"]["sha256"]) == 64 and list(record["sink_ratio"]) == ["0.5"]
    assert "(first token: bos)" in capsys.readouterr().out


@pytest.mark.integration
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--eps", "1.5"], "eps 1.5 is outside (0, 1)"),
        (["--text", "/no/such/file.txt"], "cannot read text file '/no/such/file.txt'"),
        (["--seq-len", "9000"], "seq_len 9000 exceeds the model's context: n_ctx = 8192"),
        (["--n-seqs", "100000"], "the text holds 1396 non-overlapping windows of 64 text tokens"),
        (["--n-seqs", "100000", "--sampling", "consecutive"], "the text has"),
        (["--seed", "-1"], "seed must be an integer in 0..2**63-1"),
        (["--first-token", "two words"], "first token 'two words' is not a single token"),
    ],
)
def test_scan_bad_input_is_a_clear_error(smollm2, session_smollm2, capsys, extra, message):
    assert main(["scan", *extra]) == 2
    assert message in capsys.readouterr().err
