"""Integration on SmolLM2: the passkey and fact prompts, Jin et al.'s disruption on them, and
``sinkinterp report`` (its stages, resume, and the self-contained page)."""

import json
import re

import pytest

from sinkinterp.data import FACTS, PASSKEY_QUESTION, fact_prompts, passkey_prompts

pytestmark = pytest.mark.integration


def _report_table():
    """scripts/report_table.py (a script, not a module of the package), imported from its path."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "report_table.py"
    spec = importlib.util.spec_from_file_location("report_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_passkey_prompts_end_with_the_question_and_are_answered_by_the_key(smollm2):
    prompts = passkey_prompts(smollm2, 4, 128, digits=6, seed=3)
    again = passkey_prompts(smollm2, 4, 128, digits=6, seed=3)
    assert prompts.to_dict() == again.to_dict() and len(set(prompts.answers)) == 4
    tokenizer = smollm2.tokenizer
    for row, n, key in zip(prompts.rows, prompts.prompt_len, prompts.answers):
        assert 100 <= len(row) <= 128 and len(key) == 6 and key.isdigit()
        assert tokenizer.decode(row[:n]).endswith(PASSKEY_QUESTION)
        assert tokenizer.decode(row[n:]).strip() == key
        assert tokenizer.decode(row[:n]).count(key) == 2  # the needle says it twice
    facts = fact_prompts(smollm2, [("The capital of France is", " Paris")], filler=2)
    assert facts.task == "facts_in_filler"
    assert tokenizer.decode(facts.rows[0][facts.prompt_len[0]:]) == " Paris"


def test_disrupting_the_top_two_qk_channels_breaks_retrieval_the_lowest_do_not(smollm2):
    """Measured (40 passkey prompts, 42 facts): clean passkey accuracy 0.65; top-2 disruption 0.23;
    the lowest-channel control 0.65 (retention 1.00). Facts behind filler: 0.86 -> 0.02."""
    from sinkinterp.experiments import qk_disruption_test

    result = qk_disruption_test(smollm2, top_k=2, n_passkey=12, facts=FACTS[:12], n_resamples=200, progress=False)
    exact = result.exact
    assert float(exact["passkey"]["clean"].mean()) >= 0.4
    assert float(exact["passkey"]["massive"].mean()) <= float(exact["passkey"]["clean"].mean()) - 0.2
    assert float(exact["facts_in_filler"]["massive"].mean()) <= 0.2
    for task in exact:
        assert result.retention(task, "lowest").value >= 0.8
    rows = {(r["task"], r["condition"]): r for r in result.rows()}
    assert set(rows) == {(t, c) for t in ("passkey", "facts", "facts_in_filler") for c in ("clean", "massive", "lowest")}
    assert "control: the lowest" in result.summary()


def test_report_runs_stages_resumes_and_writes_one_self_contained_page(smollm2, tmp_path, capsys):
    from sinkinterp.experiments.battery import run_report

    stages = ("scan", "implicit-bias", "formation")
    report = run_report(smollm2, tmp_path, size="quick", stages=stages, progress=False)
    assert list(report["stages"]) == list(stages)
    saved = {s: json.loads((tmp_path / "stages" / f"{s}.json").read_text()) for s in stages}
    assert saved["formation"]["record"]["channel"] == 507  # SmolLM2's massive channel
    verdicts = saved["implicit-bias"]["record"]["verdicts"]
    assert verdicts and all(v["verdict"] in ("pass", "fail", "inconclusive") for v in verdicts)
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(saved["scan"]["figures"]) + 1  # + the effects figure
    assert "CircuitsVis.render(" in page and not re.search(r"<script[^>]+src=", page)  # nothing fetched
    assert all(v["hypothesis"] in page for v in verdicts)
    assert json.loads((tmp_path / "report.json").read_text())["model"]["model"] == "smollm2-135m"
    # the README's side-by-side table reads the same files: one row per stage, with its seconds
    table = _report_table().markdown([tmp_path, tmp_path]).splitlines()
    assert table[0] == "| stage | smollm2-135m | smollm2-135m |"
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table[2:]}
    assert f"({saved['scan']['seconds']:.0f} s)" in rows["scan"] and "sink ratio (eps 0.3)" in rows["scan"]
    assert rows["heads"] == "| heads | not run | not run |"
    total = sum(s["seconds"] for s in saved.values())
    assert f"({total:.0f} s)" in rows["run time, all stages"]
    # resume: every stage is read back, not run again
    seen = []
    again = run_report(smollm2, tmp_path, size="quick", stages=stages, resume=True, progress=False, log=seen.append)
    assert seen == [f"{s}: reusing {tmp_path / 'stages' / (s + '.json')}" for s in stages]
    assert json.dumps(again["stages"]) == json.dumps(report["stages"])  # as saved (tuples read back as lists)
    # another size is another fingerprint: that stage runs again, into the same folder
    seen.clear()
    run_report(smollm2, tmp_path, size="quick", overrides={"n_resamples": 100}, stages=("formation",), resume=True,
               progress=False, log=seen.append)
    assert len(seen) == 1 and seen[0].startswith("formation: ") and "reusing" not in seen[0]
    rerun = json.loads((tmp_path / "stages" / "formation.json").read_text())
    assert rerun["fingerprint"] != saved["formation"]["fingerprint"]
