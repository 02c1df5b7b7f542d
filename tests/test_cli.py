import json
import subprocess
import sys

import pytest

from sinkinterp.cli import main


def test_help_lists_the_commands():
    out = subprocess.run(
        [sys.executable, "-m", "sinkinterp", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "info" in out and "demo" in out


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["info", "--model", "no-such-model"]) == 2
    assert "sinkinterp: error: unknown model 'no-such-model'" in capsys.readouterr().err


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
def test_demo_prints_info_and_a_sensible_completion(smollm2, capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "layers        30" in out
    assert "greedy completion of 'The capital of France is'" in out and "Paris" in out
