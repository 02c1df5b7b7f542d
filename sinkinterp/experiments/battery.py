"""``sinkinterp report``: the whole battery on one model, at sizes a laptop runs, as one
self-contained HTML page and its JSON.

Stages (each its own progress bar; each saved to ``stages/<stage>.json`` atomically the moment it
finishes, so ``resume=True`` skips the stages already done with the same model and sizes, and the
experiments resume per condition): the scan, the implicit-bias and no-op experiments, the
formation test, the head classification and the stand-ins experiment. The page embeds its figures
(PNG, base64) and an attention view (circuitsvis, inline), so it opens offline.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sinkinterp._batches import progress_bar
from sinkinterp._io import atomic_write_bytes, atomic_write_json, atomic_write_text
from sinkinterp.backends import Model
from sinkinterp.data import corpus_tokens, resolve_token
from sinkinterp.errors import SinkInterpError
from sinkinterp.experiments.formation import formation_test
from sinkinterp.experiments.report import format_estimate, format_verdicts
from sinkinterp.experiments.runner import run_experiment
from sinkinterp.experiments.spec import load_spec
from sinkinterp.figures import figure_png, plot_head_classes, plot_intervention_effects, scan_figures
from sinkinterp.heads import classify_heads
from sinkinterp.measure import qkv_geometry
from sinkinterp.measure.scan import corpus_for_scan, scan
from sinkinterp.models import model_info
from sinkinterp.provenance import package_versions
from sinkinterp.views import attention_view

__all__ = ["REPORT_STAGES", "SIZES", "resolve_sizes", "run_report", "report_html", "summary_rows"]

REPORT_STAGES = ("scan", "implicit-bias", "no-op", "formation", "heads", "stand-ins")
EXPERIMENTS = ("implicit-bias", "no-op", "stand-ins")

#: Sizes per preset. ``laptop`` (the default) keeps the built-in specs' own sizes except the
#: evaluation split (8 sequences) and gradient fits of 30 steps; ``quick`` is for a smoke run.
SIZES: dict[str, dict[str, int]] = {
    "laptop": {"scan_seqs": 16, "seq_len": 128, "experiment_seqs": 8, "calibration_seqs": 8, "gradient_steps": 30,
               "formation_seqs": 8, "heads_seqs": 8, "heads_prompts": 3, "heads_context": 256,
               "n_resamples": 2000},
    "quick": {"scan_seqs": 4, "seq_len": 32, "experiment_seqs": 4, "calibration_seqs": 4, "gradient_steps": 2,
              "formation_seqs": 4, "heads_seqs": 4, "heads_prompts": 1, "heads_context": 96,
              "n_resamples": 200},
}
VIEW_TEXT = ("The capital of France is Paris. The capital of Italy is Rome. The capital of France is Paris.")


def _png(figure) -> str:
    import matplotlib.pyplot as plt

    data = base64.b64encode(figure_png(figure)).decode()
    plt.close(figure)
    return data


# --------------------------------------------------------------------------------------------
# Stages: each returns (a JSON-able record, a text summary, figures as base64 PNG, extra HTML)


def _stage_scan(model: Model, sizes: dict, out: Path, resume: bool, progress) -> tuple:
    tokens, spec = corpus_for_scan(model, None, sizes["scan_seqs"], sizes["seq_len"], "default", seed=0)
    result = scan(model, tokens, token_spec=spec, progress=progress)
    figures = scan_figures(result, qkv_geometry(model, tokens, progress=progress))
    strongest = result.sinks.strongest_heads(1)
    layer = int(strongest["layer"].iloc[0])
    view = attention_view(model, VIEW_TEXT, layers=[layer],
                          title=f"layer {layer}, which holds the strongest sink head ({strongest['name'].iloc[0]})")
    record = result.to_dict()
    record.pop("massive_activations")  # per (sequence, layer, channel): in the scan's own JSON, not here
    return record, result.summary(), {k: _png(f) for k, f in figures.items()}, view.html()


def _experiment_spec(name: str, sizes: dict, model: Model):
    """The built-in spec at the report's sizes. A condition that puts a named token first which
    this model's vocabulary lacks (the implicit-bias spec's ``<|endoftext|>`` on Gemma-3) uses the
    model's own end-of-sequence token instead, under a name that says so."""
    spec = load_spec(name)
    overrides: dict[str, Any] = {"data.n_seqs": sizes["experiment_seqs"],
                                 "data.n_calibration": sizes["calibration_seqs"], "data.seq_len": sizes["seq_len"],
                                 "bootstrap.n_resamples": sizes["n_resamples"]}
    if spec.from_query is not None and spec.from_query >= sizes["seq_len"] // 2:
        overrides["from_query"] = sizes["seq_len"] // 4
    eos = getattr(getattr(model, "tokenizer", None), "eos_token", None)
    for i, condition in enumerate(spec.conditions):
        token = condition.replace_first_token
        if isinstance(token, str) and token not in ("random", "bos", "none", "default") and eos is not None:
            try:
                resolve_token(model, token)
            except SinkInterpError:
                overrides[f"conditions.{i}.replace_first_token"] = eos
                overrides[f"conditions.{i}.name"] = condition.name.replace(token, eos)
        for j, record in enumerate(condition.interventions):
            fit = record.get("fit") or {}
            if "steps" in fit or fit.get("method") == "gradient":
                overrides[f"conditions.{i}.interventions.{j}.fit.steps"] = sizes["gradient_steps"]
    return spec.with_overrides(overrides)


def _stage_experiment(name: str):
    def run(model: Model, sizes: dict, out: Path, resume: bool, progress) -> tuple:
        spec = _experiment_spec(name, sizes, model)  # run on ``model``, whatever model the built-in spec names
        results = run_experiment(spec, out / "runs" / name, model=model, resume=resume, progress=progress,
                                 log=lambda *_: None)
        record = {"fingerprint": results["fingerprint"], "clean": results["clean"]["metrics"],
                  "verdicts": results["verdicts"],
                  "conditions": [{k: v for k, v in c.items() if k not in ("per_sequence", "interventions")}
                                 for c in results["conditions"] if "sweep" not in c]}
        figures = {"effects": _png(plot_intervention_effects(results))}
        return record, format_verdicts(results), figures, ""

    return run


def _stage_formation(model: Model, sizes: dict, out: Path, resume: bool, progress) -> tuple:
    n = sizes["formation_seqs"]
    tokens = corpus_tokens(model, 2 * n, sizes["seq_len"], seed=0)
    test = formation_test(model, tokens[n:], calibration=tokens[:n], n_resamples=sizes["n_resamples"],
                          progress=progress)
    record = test.to_dict()
    record.pop("trace", None)
    record["step_up_layer"] = test.layer
    return record, test.summary(), {}, ""


def _stage_heads(model: Model, sizes: dict, out: Path, resume: bool, progress) -> tuple:
    table = classify_heads(model, n_seqs=sizes["heads_seqs"], half_len=sizes["seq_len"] // 2,
                           text_len=sizes["seq_len"], context_lens=(sizes["heads_context"],),
                           n_prompts=sizes["heads_prompts"], greedy=False, progress=progress)
    counts: dict[str, int] = {}
    for labels in table["labels"]:
        for label in labels:
            counts[label] = counts.get(label, 0) + 1
    named = {label: [f"L{r.layer}H{r.head}" for r in table.itertuples() if label in r.labels][:12]
             for label in counts if label != "none"}
    record = {"n_heads": len(table), "label_counts": counts, "heads_by_label": named}
    text = "\n".join([f"{len(table)} heads; labels: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))]
                     + [f"  {label}: {', '.join(heads)}" for label, heads in named.items()])
    return record, text, {"head_classes": _png(plot_head_classes(table))}, ""


STAGE_FUNCTIONS: dict[str, Callable] = {
    "scan": _stage_scan,
    "implicit-bias": _stage_experiment("implicit-bias"),
    "no-op": _stage_experiment("no-op"),
    "formation": _stage_formation,
    "heads": _stage_heads,
    "stand-ins": _stage_experiment("stand-ins"),
}


# --------------------------------------------------------------------------------------------
# The run


def _fingerprint(info: dict, stage: str, sizes: dict) -> str:
    """Of what a stage's numbers depend on: the stage, the sizes, the weights, the backend and the
    package versions (sinkinterp's among them)."""
    source = info["source"]
    key = {"stage": stage, "sizes": sizes, "model": source.get("sha256") or source.get("name"),
           "backend": source.get("backend"), "versions": package_versions()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _load_stage(path: Path, fingerprint: str) -> dict | None:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and saved.get("fingerprint") == fingerprint else None


def resolve_sizes(size: str, overrides: dict[str, Any] | None = None) -> dict[str, int]:
    """The ``size`` preset of :data:`SIZES` with ``overrides`` (each a key of the preset, an integer >= 1)."""
    if size not in SIZES:
        raise SinkInterpError(f"report size {size!r} is not one of {', '.join(map(repr, SIZES))}")
    sizes = dict(SIZES[size])
    for key, value in (overrides or {}).items():
        if key not in sizes:
            raise SinkInterpError(f"report size key {key!r} is not one of {', '.join(sizes)}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SinkInterpError(f"report size {key} must be an integer >= 1, got {value!r}")
        sizes[key] = value
    return sizes


def run_report(model: Model, out: str | Path, *, size: str = "laptop", overrides: dict[str, Any] | None = None,
               stages: Sequence[str] = REPORT_STAGES, resume: bool = False, progress: bool | None = None,
               log=print) -> dict[str, Any]:
    """Run ``stages`` on ``model`` at the ``size`` preset (:data:`SIZES`, with ``overrides`` such as
    ``{"seq_len": 64}``) into ``out``: each stage's record in ``stages/<stage>.json``, then
    ``report.json`` and ``report.html``. With ``resume``, a stage saved earlier with the same model,
    backend, sizes and package versions is read back, not run."""
    sizes = resolve_sizes(size, overrides)
    unknown = [s for s in stages if s not in STAGE_FUNCTIONS]
    if unknown or not stages:
        raise SinkInterpError(f"report stage {unknown[0] if unknown else None!r} is not one of "
                              f"{', '.join(REPORT_STAGES)}")
    out = Path(out)
    info = model_info(model)
    records: dict[str, dict] = {}
    bar = progress_bar()(list(stages), desc="report", unit="stage", disable=progress is False)
    for stage in bar:
        bar.set_postfix_str(stage)
        path = out / "stages" / f"{stage}.json"
        fingerprint = _fingerprint(info, stage, sizes)
        saved = _load_stage(path, fingerprint) if resume else None
        if saved is not None:
            log(f"{stage}: reusing {path}")
            records[stage] = saved
            continue
        start = time.perf_counter()
        record, summary, figures, extra = STAGE_FUNCTIONS[stage](model, sizes, out, resume, progress)
        saved = {"stage": stage, "fingerprint": fingerprint, "seconds": round(time.perf_counter() - start, 1),
                 "summary": summary, "record": record, "figures": figures, "html": extra}
        atomic_write_json(path, saved)
        saved = json.loads(path.read_text())  # as a resumed run will read it: the same page either way
        log(f"{stage}: {saved['seconds']:.0f} s")
        records[stage] = saved
    report = {"model": info, "size": size, "sizes": sizes, "versions": package_versions(),
              "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "stages": {name: {k: v for k, v in r.items() if k not in ("figures", "html")}
                         for name, r in records.items()}}
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.html", report_html(report, records))
    for name, r in records.items():
        for figure, data in r["figures"].items():
            atomic_write_bytes(out / "figures" / f"{name}-{figure}.png", base64.b64decode(data))
    return report


# --------------------------------------------------------------------------------------------
# The page

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-top: .5em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ddd; padding: 3px 8px; }
th { background: #f3f3f3; text-align: left; }
.v-pass, .v-supported { color: #11772d; font-weight: bold; }
.v-fail, .v-not-supported { color: #b00020; font-weight: bold; } .v-inconclusive { color: #a66a00; font-weight: bold; }
pre { background: #f7f7f7; padding: .6em; overflow-x: auto; font-size: .85em; } img { max-width: 100%; }
.small { color: #666; font-size: .85em; }
"""


def _esc(value) -> str:
    return html.escape(str(value))


def _table(header: Sequence[str] | None, rows: list[Sequence[Any]]) -> str:
    head = "" if header is None else "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _mark(word: str) -> str:
    """A verdict or an outcome, coloured by what it says."""
    return f'<span class="v-{_esc(word.replace(" ", "-"))}">{_esc(word)}</span>'


def _loss_change(condition: dict) -> str:
    return f"{condition['loss_delta']:+.3f} [{condition['loss_low']:+.3f}, {condition['loss_high']:+.3f}]"


def summary_rows(records: dict[str, dict]) -> list[tuple[str, str]]:
    """One line per stage: what it found, from its record (the report's summary, the README's table)."""
    rows = []
    for name, saved in records.items():
        r = saved["record"]
        if name == "scan":
            shares = r["first_token_share"]
            stable = r["stable_massive_channels"][:2]
            channels = ", ".join(f"{c['channel']} (max {c['max_abs']:,.0f})" for c in stable) or "none"
            text = (f"sink ratio (eps 0.3) {r['sink_ratio']['0.3']:.2f}; first-token share up to {max(shares):.2f} "
                    f"(layer {shares.index(max(shares))}); massive channels {channels}")
        elif name in EXPERIMENTS:
            text = "; ".join(f"{v['hypothesis']}: {v['verdict']}" for v in r["verdicts"])
            recovered = [f"{c['name']} {format_estimate(c['recovery']['loss'], 2)}"
                         for c in r["conditions"] if "recovery" in c]
            if recovered:
                text += ". Recovery of the masked sink's loss: " + ", ".join(recovered)
        elif name == "formation":
            by = {c["condition"]: c for c in r["conditions"]}
            zero, clean = by["writers zero"], by["clean"]
            text = (f"channel {r['channel']}: step-up block {r['step_up_layer']}, writer neurons "
                    f"{'; '.join(f'block {k}: {v}' for k, v in r['writers'].items())}; zeroed at the sink: massive "
                    f"{clean['massive']:,.0f} -> {zero['massive']:,.0f}, first-token share {clean['first_share']:.3f} -> "
                    f"{zero['first_share']:.3f}, loss {_loss_change(zero)} (random-neuron control "
                    f"{_loss_change(by['control zero'])})")
        elif name == "heads":
            text = ", ".join(f"{k} {v}" for k, v in sorted(r["label_counts"].items()))
        rows.append((name, text))
    return rows


def _verdicts_html(verdicts: list[dict]) -> str:
    rows = []
    for v in verdicts:
        for r in v["criteria"]:
            rows.append([_esc(v["hypothesis"]), _mark(v["verdict"]), _esc(r["condition"] or ""), _esc(r["quantity"]),
                         _esc(format_estimate(r["estimate"])), _esc(f"{r['rule']} {r['threshold']:g}"),
                         _mark(r["outcome"])])
    return _table(["hypothesis", "verdict", "condition", "quantity", "estimate [95% CI]", "rule", "criterion"], rows)


def _conditions_html(record: dict) -> str:
    rows = []
    for c in record["conditions"]:
        delta = c["metrics"]["loss"]["delta"]
        extra = ""
        if "recovery" in c:
            extra = f"recovers {format_estimate(c['recovery']['loss'], 2)} of {c['recovery']['of']!r}"
            if c["recovery"].get("beats_clean"):
                extra += " (beats clean: an adapter, not evidence)"
        elif "control" in c:
            extra = f"{c['control']['for']!r} exceeds this by {format_estimate(c['control']['excess_loss'])}"
        rows.append([_esc(c["name"]), _esc(format_estimate(delta)), _esc(extra)])
    return _table(["condition", "Δ loss vs clean [95% CI]", "recovery / control"], rows)


def report_html(report: dict, records: dict[str, dict]) -> str:
    """The self-contained page of a :func:`run_report`."""
    info, source = report["model"], report["model"]["source"]
    times = [[_esc(name), f"{r['seconds']:.0f} s"] for name, r in records.items()]
    parts = [f"<h1>sinkinterp report: {_esc(info['model'])}</h1>",
             f"<p class=small>{_esc(report['created'])}; size preset <b>{_esc(report['size'])}</b> "
             f"({_esc(json.dumps(report['sizes']))})</p>",
             "<h2>Summary</h2>",
             _table(["stage", "finding"], [[_esc(k), _esc(v)] for k, v in summary_rows(records)]),
             "<h2>Model and provenance</h2>",
             _table(None, [[_esc(k), _esc(v)] for k, v in (
                 ("architecture", info["architecture"]), ("layers x heads", f"{info['n_layers']} x {info['n_heads']}"),
                 ("backend", source["backend"]), ("dtype", source["dtype"]), ("weights", source["path"] or source["name"]),
                 ("sha256", source["sha256"] or "-"), ("BOS policy", info["bos_policy"]),
                 ("versions", ", ".join(f"{k} {v}" for k, v in report["versions"].items())))]),
             "<h3>Run time per stage</h3>", _table(["stage", "seconds"], times)]
    titles = {"scan": "Scan: sinks and massive activations", "implicit-bias": "Implicit-bias hypothesis",
              "no-op": "No-op hypothesis", "formation": "Formation: who writes the massive channel",
              "heads": "Head classes", "stand-ins": "Stand-ins for the trained fixes"}
    for name, r in records.items():
        parts.append(f"<h2 id=\"{_esc(name)}\">{_esc(titles[name])}</h2>")
        if name in EXPERIMENTS:
            parts += [_verdicts_html(r["record"]["verdicts"]), _conditions_html(r["record"])]
        parts.append(f"<pre>{_esc(r['summary'])}</pre>")
        parts += [f'<img alt="{_esc(name)} {_esc(k)}" src="data:image/png;base64,{v}">' for k, v in r["figures"].items()]
        if r.get("html"):
            parts.append(r["html"])
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>sinkinterp report: {_esc(info['model'])}</title><style>{_STYLE}</style></head><body>"
            + "\n".join(parts) + "</body></html>\n")
