"""Integration: needle prompts, head classification and ``sinkinterp heads`` on the embedded model,
at small sizes (the full-size numbers are in the README)."""

import json

import pytest
import torch

from sinkinterp import SinkInterpError
from sinkinterp.cli import main
from sinkinterp.data import NEEDLE_TEMPLATE, needle_prompts
from sinkinterp.heads import classify_heads, qk_by_label, top_heads

from conftest import both_backends

pytestmark = pytest.mark.integration


def test_needle_prompts_structure(smollm2):
    tokenizer = smollm2.tokenizer
    data = needle_prompts(smollm2, 3, 200, depths=(0.0, 0.5, 1.0), seed=7)
    assert data.prompt_len == 200 and data.prompts.shape == (3, 200)
    for row in range(3):
        needle = tokenizer.decode(data.needle_ids(row))
        assert needle == data.needles[row]
        assert needle.startswith("The secret code of ") and needle[-6:-1].isdigit()
        prompt = tokenizer.decode(data.prompts[row].tolist())
        name = needle[len("The secret code of "):].split(" from ")[0]
        assert prompt.endswith(f"Question: What is the secret code of {name}? Answer with the full sentence "
                               "from the text.\nAnswer:\n")
        assert tokenizer.decode(data.tokens[row, 200 : 200 + int(data.needle_len[row])].tolist()) == needle
    # Depth 0 puts the needle at the start, depth 1 just before the request.
    assert int(data.needle_start[0]) < 30 and int(data.needle_start[2]) > 120
    again = needle_prompts(smollm2, 3, 200, depths=(0.0, 0.5, 1.0), seed=7)
    assert torch.equal(again.tokens, data.tokens) and again.to_dict() == data.to_dict()
    other = needle_prompts(smollm2, 3, 200, depths=(0.0, 0.5, 1.0), seed=8)
    assert other.needles != data.needles
    assert "{name}" in NEEDLE_TEMPLATE


def test_needle_prompt_errors(smollm2):
    with pytest.raises(SinkInterpError, match=r"do not fit in context_len 20: the needle is longer than the context"):
        needle_prompts(smollm2, 2, 20)
    n_ctx = smollm2.cfg.n_ctx
    with pytest.raises(SinkInterpError, match=f"context_len {n_ctx} plus the answer .* exceeds the model's context: "
                                              f"n_ctx = {n_ctx}"):
        needle_prompts(smollm2, 1, n_ctx)
    with pytest.raises(SinkInterpError, match=r"needle depth 1.5 is outside \[0, 1\]"):
        needle_prompts(smollm2, 1, 256, depths=(0.5, 1.5))
    with pytest.raises(SinkInterpError, match=f"context length {n_ctx + 1} exceeds the model's context"):
        classify_heads(smollm2, context_lens=(256, n_ctx + 1))


@pytest.fixture(scope="module")
def small_table(smollm2):
    return classify_heads(smollm2, n_seqs=4, half_len=32, text_len=64, context_lens=(192,), n_prompts=3,
                          progress=False)


def test_classify_heads_on_smollm2(small_table):
    table = small_table
    assert len(table) == 30 * 9
    # The model's induction heads sit in layers 17-18 (scores > 0.9 at every size we tried).
    assert {layer for layer, _ in top_heads(table, "induction", 3)} <= {17, 18}
    assert float(table["induction"].max()) > 0.9
    # Recall heads copy the token being produced, as induction heads do: the top sets overlap.
    assert len(set(top_heads(table, "recall", 5)) & set(top_heads(table, "induction", 5))) >= 2
    counts = table["labels"].explode().value_counts()
    assert counts["sink"] > 120 and counts["induction"] >= 3 and counts["previous-token"] >= 3
    greedy = table.attrs["greedy"]["192"]
    assert len(greedy["responses"]) == 3 and 0 <= table.attrs["greedy_reproduction_rate"] <= 1
    # Jin et al.: the massive q/k dimensions lie in the low-frequency rotary half.
    assert table.attrs["qk"]["q_massive_low_freq_share"] > 0.9
    by_label = qk_by_label(table).set_index("label")
    assert by_label.loc["all", "n_heads"] == 270


def test_cli_heads_writes_table_figure_and_validation(tmp_path, capsys):
    out = tmp_path / "heads.json"
    code = main(["heads", "--n-seqs", "2", "--context-lens", "160", "--n-prompts", "2", "--no-greedy",
                 "--json", str(out), "--validate", "--k", "2", "--n-random", "1", "--validate-prompts", "2",
                 "--figures", str(tmp_path / "figures")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "labels: sink" in printed and "double dissociation" in printed and "induction" in printed
    record = json.loads(out.read_text())
    assert len(record["heads"]) == 270 and record["seed"] == 0
    assert set(record["validation"]["conditions"]) == {"clean", "recall", "induction", "random-0"}
    assert record["validation"]["ablation"] == "mean"
    assert record["model"]["source"]["sha256"]
    png = (tmp_path / "heads.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    figures = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert figures == ["head_classes.png", "intervention_effects.png"]
    assert all((tmp_path / "figures" / name).read_bytes()[:4] == b"\x89PNG" for name in figures)
    assert main(["heads", "--k", "0", "--n-seqs", "2", "--context-lens", "160", "--n-prompts", "1", "--no-greedy",
                 "--validate"]) == 2
    assert "--k must be an integer >= 1, got 0" in capsys.readouterr().err


@pytest.mark.backend
@both_backends
def test_greedy_recall_agrees_between_backends(smollm2, smollm2_bridge):
    """The bridge has no key/value cache here and recomputes each step: same answers, same scores."""
    from sinkinterp.heads import greedy_recall

    prompts = needle_prompts(smollm2, 2, 160, seed=3)
    hooked = greedy_recall(smollm2, prompts, batch_size=2)
    bridge = greedy_recall(smollm2_bridge, prompts, batch_size=2)
    assert hooked["responses"] == bridge["responses"]
    assert all(r.strip().startswith("The secret code of") for r in hooked["responses"])
    torch.testing.assert_close(hooked["per_prompt"], bridge["per_prompt"])
    assert float(hooked["per_prompt"].max()) >= 0.4  # some head copies much of the needle (0.5 measured)
