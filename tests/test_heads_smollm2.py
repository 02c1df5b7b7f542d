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


def test_cli_heads_writes_table_figure_and_validation(session_smollm2, tmp_path, capsys):
    out = tmp_path / "heads.json"
    code = main(["heads", "--n-seqs", "2", "--context-lens", "160", "--n-prompts", "2", "--no-greedy",
                 "--json", str(out), "--validate", "--k", "2", "--n-random", "1", "--validate-prompts", "2",
                 "--per-head", "--copying", "--figures", str(tmp_path / "figures")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "labels: sink" in printed and "double dissociation" in printed and "induction" in printed
    record = json.loads(out.read_text())
    assert len(record["heads"]) == 270 and record["seed"] == 0
    alone = {f"alone-L{l}H{h}" for l, h in record["validation"]["conditions"]["recall"]
             + record["validation"]["conditions"]["induction"]}
    assert set(record["validation"]["conditions"]) == {"clean", "recall", "induction", "random-0"} | alone
    assert "one head at a time" in printed and "largest direct effect on induction targets" in printed
    copying = record["copying"]
    assert len(copying["heads"]) == 270 and {r["role"] for r in copying["heads"]} >= {"other"}
    assert {"ov_eigen", "dla_induction", "dla_needle"} <= set(copying["heads"][0])
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
    assert main(["heads", "--per-head"]) == 2
    assert "--per-head ablates heads one at a time within the causal validation: add --validate" in capsys.readouterr().err


def test_the_direct_copier_of_induction_targets_is_a_last_layer_head(smollm2):
    """Circuit evidence on the embedded model (README): the heads whose attention does induction
    (layers 17-18) write little directly to the copied token; L29H1 does, and its OV circuit copies."""
    from sinkinterp.heads import copying_evidence

    frame = copying_evidence(smollm2, n_seqs=4, n_prompts=0).set_index(["layer", "head"])
    assert frame["dla_induction"].idxmax() == (29, 1) and frame.loc[(29, 1), "dla_induction"] > 1.0
    assert frame.loc[(29, 1), "ov_eigen"] > 0.99 and frame.loc[(29, 1), "ov_top1"] > 0.3
    assert abs(frame.loc[(17, 3), "dla_induction"]) < 0.1
    assert frame.loc[(24, 4), "dla_induction"] < -0.2  # a head that writes against the copied token


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
