"""Attention views: the data they carry (head names, shapes, the hidden sink), safe and offline
HTML, and the size limits. Tiny models, no weights."""

import json
import re

import pytest
import torch

from sinkinterp import MaskSinkKey, SinkInterpError, load_model
from sinkinterp.data import random_tokens
from sinkinterp.views import MAX_VIEW_CELLS, AttentionView, attention_view, compare_view


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llama")


def _props(page: str) -> dict:
    call = re.search(r"CircuitsVis\.render\((\"[^\"]+\"), CircuitsVis\.AttentionHeads, (.*)\);</script>", page)
    return json.loads(call.group(2))


def test_view_names_heads_with_their_sink_score(tiny):
    tokens = random_tokens(tiny, 1, 10, seed=0)
    _, cache = tiny.run_with_cache(tokens)
    view = attention_view(tiny, tokens[0], layers=[1], heads=[0, 4])
    pattern = cache["blocks.1.attn.hook_pattern"][0]
    assert view.patterns.shape == (2, 10, 10)
    torch.testing.assert_close(view.patterns, pattern[[0, 4]].detach())
    alphas = [float(pattern[h, :, 0].mean()) for h in (0, 4)]
    assert view.head_names == (f"L1H0 sink={alphas[0]:.2f}", f"L1H4 sink={alphas[1]:.2f}")
    assert view.tokens == tuple(str(int(t)) for t in tokens[0])  # no tokenizer: ids as text


def test_hide_sink_renormalises_the_rest(tiny):
    tokens = random_tokens(tiny, 1, 8, seed=1)
    full = attention_view(tiny, tokens, layers=[0], heads=[2])
    hidden = attention_view(tiny, tokens, layers=[0], heads=[2], hide_sink=True)
    p, h = full.patterns[0], hidden.patterns[0]
    assert float(h[1:, 0].abs().max()) == 0.0
    torch.testing.assert_close(h[1:].sum(dim=-1), torch.ones(7))
    torch.testing.assert_close(h[3, 1:4], p[3, 1:4] / (1 - p[3, 0]))
    kept = float((1 - p[1:, 0]).mean())  # the mean share each row had off the sink, before rescaling
    assert hidden.head_names[0].endswith(f"(sink hidden: rows rescaled from {kept:.1%} of their attention)")
    assert hidden.head_names[0].split()[1] == full.head_names[0].split()[1]


def test_hiding_the_sink_of_a_pure_sink_head_warns_and_says_noise(tiny):
    def nearly_all_on_the_sink(pattern, hook):
        n = pattern.shape[-1]
        rows = torch.tril(torch.ones(n, n)) * 1e-5
        rows[:, 0] = 1.0
        return (rows / rows.sum(dim=-1, keepdim=True)).expand_as(pattern).clone()

    tokens = random_tokens(tiny, 1, 8, seed=1)
    with tiny.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", nearly_all_on_the_sink)]):
        with pytest.warns(UserWarning, match=r"keep less than 1% of their attention off the sink: L0H2 \(4e-05\)"):
            view = attention_view(tiny, tokens, layers=[0], heads=[2], hide_sink=True)
    assert view.head_names[0].endswith("(sink hidden: rows rescaled from 0.0% of their attention, noise)")


def test_compare_view_puts_clean_and_intervened_side_by_side(tiny):
    tokens = random_tokens(tiny, 1, 12, seed=2)
    view = compare_view(tiny, tokens, [MaskSinkKey(from_query=4)], layers=[1], heads=[3], label="masked")
    assert view.head_names[0].endswith("clean") and view.head_names[1].endswith("masked")
    clean, masked = view.patterns
    assert float(masked[4:, 0].abs().max()) == 0.0 and float(clean[4:, 0].min()) > 0
    torch.testing.assert_close(masked[:4], clean[:4])  # rows before from_query are untouched
    with pytest.raises(SinkInterpError, match="needs at least one intervention"):
        compare_view(tiny, tokens, [])
    # The default from_query (16) on a 12-token prompt would show two identical panels.
    with pytest.raises(SinkInterpError, match="from_query 16 is beyond this input's 12 positions"):
        compare_view(tiny, tokens, [MaskSinkKey()])


def test_saved_page_is_offline_and_treats_tokens_as_data(tmp_path):
    hostile = "</script><img src=x onerror=alert(1)>"
    view = AttentionView(("a", hostile, "&amp;\u2028"), torch.tensor([[[1.0, 0, 0], [0.5, 0.5, 0], [0.2, 0.3, 0.5]]]),
                         ("L0H0 sink=1.00",), title="<b>title</b>", element_id="sinkinterp-fixed")
    page = view.save_html(tmp_path / "view.html").read_text(encoding="utf-8")
    assert "unpkg.com" not in page and "https://" not in page.split("<script>")[0]
    assert page.lower().count("</script") == 2  # the bundle's own and the render call's closing tags
    assert "<img" not in page and "<b>" not in page and "&lt;b&gt;title&lt;/b&gt;" in page
    props = _props(page)
    assert props["tokens"] == ["a", hostile, "&amp;\u2028"]  # the data survive exactly
    assert props["attentionHeadNames"] == ["L0H0 sink=1.00"] and props["maskUpperTri"] is True
    assert props["attention"][0][2] == [0.2, 0.3, 0.5]
    assert 'id="sinkinterp-fixed"' in page and "var CircuitsVis" in page
    assert view._repr_html_() == view.html()


def test_size_limits_and_bad_input(tiny):
    with pytest.raises(SinkInterpError, match="40 tokens is too many for an attention view \\(limit 32\\)"):
        attention_view(tiny, random_tokens(tiny, 1, 40), max_tokens=32)
    with pytest.raises(SinkInterpError, match=f"cells is too many for one view \\(limit {MAX_VIEW_CELLS:,}\\)"):
        from sinkinterp.views import _check_size

        _check_size(512, 16, 512)
    with pytest.raises(SinkInterpError, match="a view shows one sequence, got 2"):
        attention_view(tiny, random_tokens(tiny, 2, 8))
    with pytest.raises(SinkInterpError, match=r"layer 7 out of range: model has 2 layers \(0..1\)"):
        attention_view(tiny, random_tokens(tiny, 1, 8), layers=[7])
    with pytest.raises(SinkInterpError, match="has no tokenizer"):
        attention_view(tiny, "some text")


def test_snapshot_of_a_view_with_a_fixed_id(tiny):
    """With a fixed element id the page is a pure function of its inputs: two builds are byte
    identical, and the data carried are exactly the expected names, tokens and [head, T, T] shapes."""
    tokens = random_tokens(tiny, 1, 6, seed=3)
    build = lambda: attention_view(tiny, tokens, layers=[0, 1], heads=[2], element_id="view-snapshot")  # noqa: E731
    view = build()
    page = view.html()
    assert page == build().html()
    _, cache = tiny.run_with_cache(tokens)
    alphas = [float(cache[f"blocks.{l}.attn.hook_pattern"][0, 2, :, 0].mean()) for l in (0, 1)]
    props = _props(page)
    assert props["attentionHeadNames"] == [f"L0H2 sink={alphas[0]:.2f}", f"L1H2 sink={alphas[1]:.2f}"]
    assert props["tokens"] == [str(int(t)) for t in tokens[0]]
    assert [len(props["attention"]), len(props["attention"][0]), len(props["attention"][0][0])] == [2, 6, 6]
    assert 'id="view-snapshot"' in page and 'CircuitsVis.render("view-snapshot", ' in page
    clean_vs_masked = compare_view(tiny, tokens, [MaskSinkKey(from_query=2)], layers=[1], heads=[0, 1],
                                   element_id="compare-snapshot")
    assert [n.split()[0] + " " + n.split()[-1] for n in clean_vs_masked.head_names] == [
        "L1H0 clean", "L1H0 intervened", "L1H1 clean", "L1H1 intervened"]
    assert clean_vs_masked.patterns.shape == (4, 6, 6) and clean_vs_masked.element_id == "compare-snapshot"
    with pytest.raises(SinkInterpError, match="element_id must be a letter"):
        attention_view(tiny, tokens, element_id='x" onload="alert(1)')
    # Built directly, too: the id would otherwise end the script it is written into.
    with pytest.raises(SinkInterpError, match="element_id must be a letter"):
        AttentionView(("a",), torch.ones(1, 1, 1), ("L0H0",), element_id="x</script><script>alert(1)//")
