"""Saved attention views in a real browser: pages written by ``AttentionView.save_html`` are opened
from disk in headless Chromium (driven over the DevTools protocol, see ``_chromium.py``) and must
render the pattern, show every name as text, and run nothing that their data smuggles in.

Chromium is installed from the Debian package when absent (root or passwordless sudo); the tests
skip, saying why, only where it cannot be had. ``SINKINTERP_SCREENSHOT_DIR`` keeps a screenshot.

circuitsvis ``AttentionHeads`` draws a canvas per head (a thumbnail in the head selector) and one
large canvas for the focused head, whose axes carry the token labels (``token`` without whitespace,
then `` (index)``). Token text is therefore never in the DOM; the tests record what the page draws
with ``fillText`` to check the labels.
"""

import io
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from _chromium import Browser, find_or_install_chromium
from sinkinterp.views import AttentionView

pytestmark = pytest.mark.slow

RENDER_TIMEOUT_S = 15.0
# 200 tokens (40,000 cells, drawn twice: thumbnail and zoom) take 9-12 s on 2 loaded CPU cores.
LONG_RENDER_TIMEOUT_S = 30.0
# Runs before the page's own scripts: keeps every string drawn on a canvas, so the test can read
# the chart's axis labels. It only records, then draws as before.
RECORD_CANVAS_TEXT = """
window.__sinkinterpDrawn = [];
const fillText = CanvasRenderingContext2D.prototype.fillText;
CanvasRenderingContext2D.prototype.fillText = function (text, ...rest) {
  window.__sinkinterpDrawn.push(String(text));
  return fillText.call(this, text, ...rest);
};
"""


@pytest.fixture(scope="session")
def chromium():
    path, reason = find_or_install_chromium()
    if path is None:
        pytest.skip(f"headless Chromium unavailable: {reason}")
    return path


@pytest.fixture(scope="module")
def browser(chromium):
    with Browser(chromium) as running:
        yield running


def _causal_patterns(heads: int, n: int, seed: int = 0) -> torch.Tensor:
    """Random [heads, n, n] patterns: lower-triangular rows summing to 1 (row 0 is all on token 0)."""
    weights = torch.rand(heads, n, n, generator=torch.Generator().manual_seed(seed)) + 0.05
    weights = weights.tril()
    return weights / weights.sum(dim=-1, keepdim=True)


def _label(token: str, index: int) -> str:
    """The axis label circuitsvis draws for a token: its whitespace removed, then its position."""
    return re.sub(r"\s", "", token) + f" ({index})"


def _rendered(element_id: str, heads: int) -> str:
    """JavaScript that is true once the view drew a canvas per head plus the zoomed one, with axes."""
    return (f"(() => {{ const root = document.getElementById({json.dumps(element_id)});"
            f" return !!root && root.querySelectorAll('canvas').length === {heads + 1}"
            f" && window.__sinkinterpDrawn.includes('Destination Token'); }})()")


def _open(browser, view: AttentionView, tmp_path, *, width=1200, height=1300, timeout=RENDER_TIMEOUT_S):
    """The saved view, loaded in a new tab; and whether it rendered within the timeout (the wait
    ends early once the page has reported an error)."""
    path = view.save_html(tmp_path / "view.html")
    page = browser.open_page(path.as_uri(), width=width, height=height, init_script=RECORD_CANVAS_TEXT)
    done = _rendered(view.element_id, len(view.head_names))
    return page, bool(page.wait_until(done, timeout=timeout, stop_on_error=True))


def _keep_screenshot(png: bytes, tmp_path, name: str) -> None:
    (tmp_path / name).write_bytes(png)
    if folder := os.environ.get("SINKINTERP_SCREENSHOT_DIR"):
        os.makedirs(folder, exist_ok=True)
        shutil.copyfile(tmp_path / name, os.path.join(folder, name))


def test_view_renders_heads_names_and_pattern(browser, tmp_path):
    """A normal saved view runs without a JavaScript error and draws what it should: one thumbnail
    per head titled with its name, the zoomed grid of the first head with every token labelled on
    its axes, and (in a screenshot) the pattern itself, with the first row's single full-weight
    cell in the scale's darkest blue and the masked upper triangle in grey."""
    tokens = ("The", " capital", " of", " France", " is", " Paris", ".", " It")
    names = ("L14H3 sink=0.82", "L2H0 sink=0.10")
    view = AttentionView(tokens, _causal_patterns(2, len(tokens)), names, title="France sinks",
                         element_id="fixed-id")
    page, rendered = _open(browser, view, tmp_path)
    try:
        assert rendered, f"the view did not render (waited up to {RENDER_TIMEOUT_S} s): {page.errors()}"
        assert page.errors() == [] and page.dialogs() == []
        dom = page.evaluate("""(() => { const root = document.getElementById('fixed-id');
            return {children: root.childElementCount, thumbs: [...root.querySelectorAll('h4')].map(e => e.textContent),
                    title: document.querySelector('h3').textContent, text: document.body.innerText,
                    drawn: window.__sinkinterpDrawn}; })()""")
        assert dom["children"] > 0 and dom["title"] == "France sinks"
        assert dom["thumbs"] == list(names)  # one selector thumbnail per head, in order
        assert f"{names[0]} Zoomed" in dom["text"] and names[1] in dom["text"]
        assert {_label(t, i) for i, t in enumerate(tokens)} <= set(dom["drawn"])  # both axes labelled
        assert {"Source Token", "Destination Token"} <= set(dom["drawn"])

        png = page.screenshot()
        _keep_screenshot(png, tmp_path, "attention_view.png")
        image = Image.open(io.BytesIO(png)).convert("RGB")
        assert image.size == (1200, 1300)
        pixels = np.asarray(image).astype(int).reshape(-1, 3)
        r, g, b = pixels.T
        assert len(np.unique(r << 16 | g << 8 | b)) > 100  # text, colour scale, grid: not a flat page
        assert (pixels.min(axis=1) < 245).mean() > 0.3  # a third of the page is not white
        full_weight = (b > 200) & (r < 40) & (g < 40)  # the A[0, 0] = 1 cell of the zoomed head
        assert full_weight.sum() > 5_000
        grey = (abs(r - g) < 4) & (abs(g - b) < 4) & (r > 150) & (r < 230)  # keys after the query, masked
        assert grey.sum() > 100_000
    finally:
        page.close()


def test_hostile_tokens_title_and_head_names_stay_text(browser, tmp_path):
    """Markup in tokens, the title and head names never becomes markup in the browser: no dialog,
    no script of its own (only the page's two scripts exist), no img and no event handler anywhere,
    ``window.__pwned`` never set; the view still renders and shows every string verbatim (the
    title and head name as DOM text, each token as its axis label on the canvas)."""
    tokens = ("<s>", '</script><img src=x onerror="window.__pwned=1;alert(1)">',
              "<script>window.__pwned=2</script>", "]]></script><svg onload=alert(3)>",
              "line\u2028break\u2029", "&amp; \"quoted\" 'x'")
    title = '</title><img src=x onerror="window.__pwned=3;alert(4)"><script>window.__pwned=4</script>'
    name = "<svg onload=\"window.__pwned=5;alert(6)\">L0H0</svg> sink=0.50"
    view = AttentionView(tokens, _causal_patterns(1, len(tokens), seed=1), (name,), title=title,
                         element_id="fixed-id")
    page, rendered = _open(browser, view, tmp_path)
    try:
        assert page.dialogs() == []
        assert page.evaluate("typeof window.__pwned") == "undefined"
        assert page.errors() == []
        assert rendered, f"the hostile view did not render (waited up to {RENDER_TIMEOUT_S} s)"
        dom = page.evaluate("""(() => ({
            scripts: [...document.scripts].map(s => s.text.slice(0, 200)),
            imgs: document.querySelectorAll('img, iframe, object, embed').length,
            handlers: [...document.querySelectorAll('*')].flatMap(e => [...e.attributes]
                .filter(a => a.name.startsWith('on')).map(a => e.tagName + ' ' + a.name)),
            svgs: document.querySelectorAll('svg').length,
            documentTitle: document.title, heading: document.querySelector('h3').textContent,
            thumbs: [...document.querySelectorAll('#fixed-id h4')].map(e => e.textContent),
            text: document.body.innerText, drawn: window.__sinkinterpDrawn}))()""")
        assert len(dom["scripts"]) == 2, dom["scripts"]  # the inlined bundle and the render call, nothing else
        assert "CircuitsVis" in dom["scripts"][0] and dom["scripts"][1].startswith('CircuitsVis.render("fixed-id"')
        assert dom["imgs"] == 0 and dom["handlers"] == [] and dom["svgs"] == 0
        assert dom["documentTitle"] == title and dom["heading"] == title  # shown as text, exactly
        assert dom["thumbs"] == [name] and "onerror" in dom["text"] and "<svg onload" in dom["text"]
        assert {_label(t, i) for i, t in enumerate(tokens)} <= set(dom["drawn"])
    finally:
        page.close()


def test_long_input_renders_in_time(browser, tmp_path):
    """A 200-token view (40,000 cells; well within the size limits) renders within its timeout
    without errors, and the zoomed grid is labelled at both ends of the sequence (Chart.js skips
    some labels in between when they would overlap)."""
    tokens = tuple(f" tok{i}" for i in range(200))
    view = AttentionView(tokens, _causal_patterns(1, len(tokens), seed=2), ("L0H0 sink=0.50",),
                         element_id="fixed-id")
    page, rendered = _open(browser, view, tmp_path, timeout=LONG_RENDER_TIMEOUT_S)
    try:
        assert rendered, f"the 200-token view did not render (waited up to {LONG_RENDER_TIMEOUT_S} s): {page.errors()}"
        assert page.errors() == [] and page.dialogs() == []
        drawn = set(page.evaluate("window.__sinkinterpDrawn"))
        assert {_label(tokens[0], 0), _label(tokens[-1], 199)} <= drawn
    finally:
        page.close()


@pytest.mark.integration
def test_report_page_renders_its_figures_and_view_offline(browser, smollm2, tmp_path):
    """``sinkinterp report``'s page, opened from disk: every figure decodes, the attention view draws
    its canvases, and nothing errs (the page fetches nothing: it has no network to fetch from)."""
    from sinkinterp.experiments.battery import run_report

    run_report(smollm2, tmp_path, size="quick", stages=("scan",), progress=False, log=lambda *_: None)
    path = tmp_path / "report.html"
    page = browser.open_page(path.as_uri(), width=1200, height=2400, init_script=RECORD_CANVAS_TEXT)
    try:
        drawn = page.wait_until("document.querySelectorAll('.sinkinterp-view canvas').length > 1 && "
                                "window.__sinkinterpDrawn.includes('Destination Token')", timeout=RENDER_TIMEOUT_S,
                                stop_on_error=True)
        assert drawn, f"the report's attention view did not render: {page.errors()}"
        images = page.evaluate("[...document.images].map(i => [i.alt, i.complete && i.naturalWidth > 100])")
        assert len(images) == 4 and all(ok for _, ok in images), images  # the scan's four figures
        text = page.evaluate("document.body.innerText")
        assert "sinkinterp report: smollm2-135m" in text and "Run time per stage" in text
        assert page.errors() == []
        _keep_screenshot(page.screenshot(), tmp_path, "report.png")
    finally:
        page.close()
