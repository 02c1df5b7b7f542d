"""From per-sequence numbers to the results record, the verdicts, ``report.md`` and the figures.

Every interval is a seeded percentile bootstrap over evaluation sequences, paired across
conditions (the same resampled sequences for all of them). Verdicts are computed from those
intervals and the spec's criteria; the report's text is generated from the numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sinkinterp._io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    slug,
)
from sinkinterp.data import describe_sampling
from sinkinterp.evaluate import METRICS
from sinkinterp.experiments.spec import CRITERION_KINDS, Criterion, ExperimentSpec
from sinkinterp.figures import figure_png, new_subplots
from sinkinterp.stats import Estimate, bootstrap_statistic

__all__ = ["assemble", "write_outputs", "judge", "format_report", "format_verdicts"]

PASS, FAIL, OPEN = "pass", "fail", "inconclusive"
ADAPTER_NOTE = ("recovery above 1 (its whole interval): the repair beats the clean model on held-out data, so it "
                "is an adapter, not evidence about the sink; counted as inconclusive")


def _statistic(metric: str, eps: float) -> Callable[[Tensor], Tensor]:
    """Per-sequence arrays [R, n, ...] -> one number per resample [R]."""
    if metric == "sink_ratio":  # Gu et al.: threshold each sequence's alpha, then average
        return lambda alpha: (alpha > eps).double().mean(dim=(-2, -1)).mean(dim=1)
    if metric == "sink_ratio_of_mean":  # the share of heads whose resample-averaged alpha passes
        return lambda alpha: (alpha.mean(dim=1) > eps).double().mean(dim=(-2, -1))
    return lambda x: x.mean(dim=1)


def _series(per_sequence: dict, metric: str) -> Tensor:
    key = "alpha_first" if metric.startswith("sink_ratio") else metric
    return torch.tensor(per_sequence[key], dtype=torch.float64)


class _Stats:
    def __init__(self, spec: ExperimentSpec, clean: dict):
        self.spec, self.clean = spec, clean
        self.options = dict(n_resamples=spec.bootstrap.n_resamples, confidence=spec.bootstrap.confidence,
                            seed=spec.seed)

    def _boot(self, fn, *arrays) -> Estimate:
        return bootstrap_statistic(fn, *arrays, **self.options)

    def value(self, ps: dict, metric: str) -> Estimate:
        return self._boot(_statistic(metric, self.spec.eps), _series(ps, metric))

    def delta(self, ps: dict, metric: str) -> Estimate:
        s = _statistic(metric, self.spec.eps)
        return self._boot(lambda x, c: s(x) - s(c), _series(ps, metric), _series(self.clean, metric))

    def difference(self, ps: dict, other: dict, metric: str) -> Estimate:
        s = _statistic(metric, self.spec.eps)
        return self._boot(lambda x, o: s(x) - s(o), _series(ps, metric), _series(other, metric))

    def ratio(self, ps: dict, other: dict, metric: str) -> Estimate:
        """delta(ps) / delta(other), both to clean; NaN where delta(other) is ~0."""
        s = _statistic(metric, self.spec.eps)

        def fn(a, b, c):
            gap = s(b) - s(c)
            return torch.where(gap.abs() > 1e-9, (s(a) - s(c)) / gap, torch.nan)

        return self._boot(fn, _series(ps, metric), _series(other, metric), _series(self.clean, metric))

    def recovery(self, broken: dict, repaired: dict, metric: str) -> Estimate:
        """(broken - repaired) / (broken - clean) = 1 - delta(repaired) / delta(broken): 1 means the
        repair restores the clean value. Percentile intervals map through 1 - x exactly."""
        r = self.ratio(repaired, broken, metric)
        return Estimate(1 - r.value, 1 - r.high, 1 - r.low, r.confidence)

    def mean(self, values: list[float]) -> Estimate:
        return self._boot(lambda x: x.mean(dim=1), torch.tensor(values, dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# Verdicts


def judge(kind: str, estimate: Estimate, threshold: float) -> str:
    """pass when the whole interval satisfies the criterion, fail when none of it does."""
    low, high, t = estimate.low, estimate.high, threshold
    if math.isnan(estimate.value) or math.isnan(low):
        return OPEN
    rules = {
        "increases": (low > t, high <= t),
        "exceeds_control": (low > t, high <= t),
        "measurement_above": (low > t, high <= t),
        "decreases": (high < -t, low >= -t),
        "negligible": (-t < low and high < t, low >= t or high <= -t),
        "recovers": (low >= t, high < t),
        "ratio_below": (high < t, low >= t),
    }
    passed, failed = rules[kind]
    return PASS if passed else FAIL if failed else OPEN


def _criterion_estimate(stats: _Stats, criterion: Criterion, by_name: dict, measurements: dict) -> tuple[str, Estimate]:
    kind, metric = criterion.kind, criterion.metric
    if kind == "measurement_above":
        for measured in measurements.values():
            if criterion.measurement in measured.get("per_sequence", {}):
                return criterion.measurement, stats.mean(measured["per_sequence"][criterion.measurement])
        return criterion.measurement, Estimate(math.nan, math.nan, math.nan)
    ps = by_name[criterion.condition]["per_sequence"]
    if kind in ("increases", "decreases", "negligible"):
        return f"delta {metric}", stats.delta(ps, metric)
    if kind == "recovers":
        repairs = next(c for c in stats.spec.conditions if c.name == criterion.condition).repairs
        broken = by_name[repairs]["per_sequence"]
        return f"recovery of {metric}", stats.recovery(broken, ps, metric)
    if kind == "exceeds_control":
        control = next(c for c in stats.spec.conditions if c.control_for == criterion.condition)
        record = by_name[control.name]
        if "draws" in record:
            # Conservative: the target must beat the most damaging of the control's draws.
            worst = _worst_draw(stats, record["draws"], metric)
            return (f"delta {metric} minus that of {control.name!r} (its most damaging of {len(record['draws'])} "
                    f"draws, #{worst['draw']})", stats.difference(ps, worst["per_sequence"], metric))
        return (f"delta {metric} minus that of {control.name!r}",
                stats.difference(ps, record["per_sequence"], metric))
    return (f"delta {metric} / delta {metric} of {criterion.other!r}",
            stats.ratio(ps, by_name[criterion.other]["per_sequence"], metric))


def _worst_draw(stats: _Stats, draws: list[dict], metric: str) -> dict:
    """The draw whose mean ``metric`` moved most in the damaging direction (up; down for accuracy)."""
    sign = -1.0 if METRICS[metric].higher_is_better else 1.0
    return max(draws, key=lambda d: sign * float(_statistic(metric, stats.spec.eps)(
        _series(d["per_sequence"], metric)[None])[0]))


def _draw_summary(stats: _Stats, draws: list[dict], metrics: list[str]) -> dict[str, Any]:
    """Each draw's paired change to clean, and their spread (min / median / max of the means)."""
    entries = [{"draw": d["draw"], "interventions": d["interventions"],
                **({"first_tokens": d["first_tokens"]} if "first_tokens" in d else {}),
                "delta": {m: stats.delta(d["per_sequence"], m).to_dict() for m in metrics},
                "per_sequence": d["per_sequence"]} for d in draws]
    spread = {}
    for m in metrics:
        values = sorted(e["delta"][m]["value"] for e in entries)
        spread[m] = {"n": len(values), "min": values[0], "median": float(torch.tensor(values).median()),
                     "max": values[-1], "values": [e["delta"][m]["value"] for e in entries]}
    return {"draws": entries, "spread": spread}


def _verdicts(stats: _Stats, by_name: dict, measurements: dict) -> list[dict[str, Any]]:
    hypotheses: dict[str, list[dict]] = {}
    for criterion in stats.spec.criteria:
        quantity, estimate = _criterion_estimate(stats, criterion, by_name, measurements)
        outcome = judge(criterion.kind, estimate, criterion.threshold)
        note = None
        if criterion.kind == "recovers" and estimate.low > 1:
            # Better than the clean model on held-out data: the repair adds something the model did not
            # have (an adapter), so recovering the damage says nothing about what the sink did.
            outcome, note = OPEN, ADAPTER_NOTE
        hypotheses.setdefault(criterion.hypothesis, []).append({
            "kind": criterion.kind, "condition": criterion.condition or None, "quantity": quantity,
            "rule": CRITERION_KINDS[criterion.kind], "threshold": criterion.threshold,
            "estimate": estimate.to_dict(), "outcome": outcome, "description": criterion.description,
            **({"note": note} if note else {}),
        })
    verdicts = []
    for hypothesis, results in hypotheses.items():
        outcomes = [r["outcome"] for r in results]
        verdict = "not supported" if FAIL in outcomes else "supported" if all(o == PASS for o in outcomes) else "inconclusive"
        verdicts.append({"hypothesis": hypothesis, "verdict": verdict, "criteria": results})
    return verdicts


# --------------------------------------------------------------------------------------------
# The results record


def assemble(spec: ExperimentSpec, clean: dict, records: list[dict], measurements: dict,
             provenance: dict) -> dict[str, Any]:
    stats = _Stats(spec, clean)
    metrics = list(spec.metrics)
    by_name = {r["name"]: r for r in records}
    clean_summary = {m: stats.value(clean, m).to_dict() for m in metrics if m != "kl"}
    conditions = []
    for condition, record in zip(spec.conditions, records):
        entry: dict[str, Any] = {"name": condition.name, "description": condition.description,
                                 "interventions": record["interventions"], "seconds": record.get("seconds")}
        if "first_tokens" in record:
            entry["first_tokens"] = record["first_tokens"]
        if condition.sweep is not None:
            sweep_metrics = ["loss"]
            entry["sweep"] = {"over": condition.sweep, "variants": [
                {**{k: v for k, v in variant.items() if k != "per_sequence"},
                 **{m: {"value": stats.value(variant["per_sequence"], m).to_dict(),
                        "delta": stats.delta(variant["per_sequence"], m).to_dict()} for m in sweep_metrics},
                 "per_sequence": variant["per_sequence"]}
                for variant in record["sweep"]], "method": record.get("method", "exact")}
            if record.get("method") == "screen":
                estimated = {(v["layer"], v["head"]): v for v in entry["sweep"]["variants"]}
                entry["sweep"]["screen_seconds"] = record["screen_seconds"]
                entry["sweep"]["confirmed"] = [
                    {"layer": v["layer"], "head": v["head"],
                     "estimate": estimated[v["layer"], v["head"]]["loss"]["delta"],
                     "exact": stats.delta(v["per_sequence"], "loss").to_dict(), "per_sequence": v["per_sequence"]}
                    for v in record["confirmed"]]
        else:
            ps = record["per_sequence"]
            entry["metrics"] = {m: {"value": stats.value(ps, m).to_dict(), "delta": stats.delta(ps, m).to_dict()}
                                for m in metrics}
            if condition.repairs is not None:
                recovery = stats.recovery(by_name[condition.repairs]["per_sequence"], ps, "loss")
                entry["recovery"] = {"of": condition.repairs, "loss": recovery.to_dict(),
                                     # > 1: better than clean (an adapter); beats_clean when the whole CI is
                                     "above_one": bool(recovery.value > 1), "beats_clean": bool(recovery.low > 1)}
            if "draws" in record:
                entry["draws"] = _draw_summary(stats, record["draws"], metrics)
            if condition.control_for is not None:
                target = by_name[condition.control_for]["per_sequence"]
                entry["control"] = {"for": condition.control_for,
                                    "excess_loss": stats.difference(target, ps, "loss").to_dict()}
                if "draws" in record:
                    worst = _worst_draw(stats, record["draws"], "loss")
                    entry["control"]["excess_loss"]["over"] = f"the mean of {len(record['draws'])} draws"
                    entry["control"]["excess_loss_over_worst_draw"] = {
                        "draw": worst["draw"], **stats.difference(target, worst["per_sequence"], "loss").to_dict()}
            entry["per_sequence"] = ps
        conditions.append(entry)
    measured = {}
    for name, m in measurements.items():
        measured[name] = {
            **{key: stats.mean(values).to_dict() for key, values in m["per_sequence"].items()},
            "n_sink_heads": len(m["sink_heads"]), "sink_heads": m["sink_heads"],
            "per_sequence": m["per_sequence"], "per_head": m["per_head"],
        }
    return {
        "spec": spec.to_dict(),
        "fingerprint": spec.fingerprint(),
        "provenance": provenance,
        "clean": {"metrics": clean_summary, "per_sequence": clean},
        "conditions": conditions,
        "measurements": measured,
        "verdicts": _verdicts(stats, by_name, measurements),
    }


# --------------------------------------------------------------------------------------------
# report.md and figures


def format_estimate(record: dict, digits: int = 3) -> str:
    if record is None or record["value"] is None or math.isnan(record["value"]):
        return "undefined"
    return f"{record['value']:.{digits}f} [{record['low']:.{digits}f}, {record['high']:.{digits}f}]"


def _signed(record: dict, digits: int = 3) -> str:
    if math.isnan(record["value"]):
        return "undefined"
    return f"{record['value']:+.{digits}f} [{record['low']:+.{digits}f}, {record['high']:+.{digits}f}]"


_LABELS = {"loss": "loss (nats)", "kl": "KL to clean", "accuracy": "top-1 accuracy",
           "sink_ratio": "sink ratio (Gu et al.)", "sink_ratio_of_mean": "sink ratio of the mean alpha"}


def format_report(results: dict[str, Any]) -> str:
    spec, prov = results["spec"], results["provenance"]
    data = spec["data"]
    confidence = spec["bootstrap"]["confidence"]
    model = prov["model"]
    lines = [f"# Experiment `{spec['name']}`", ""]
    if spec["description"]:
        lines += [spec["description"].strip(), ""]
    git = prov.get("git") or {}
    lines += [
        "## Setup", "",
        f"- model: `{model.get('model')}`, weights sha256 `{prov.get('weights_sha256') or '-'}`, "
        f"backend `{model.get('backend') or spec['backend']}` (asked: `{spec['backend']}`), "
        f"TransformerLens {model.get('source', {}).get('transformer_lens', '?')}",
        f"- data: {prov['data'].get('corpus') or data['source']}: {data['n_calibration']} calibration + "
        f"{data['n_seqs']} evaluation sequences of {data['seq_len']} tokens"
        + (f", {how}" if (how := describe_sampling(prov["data"])) else "")
        + "; first token policy "
        f"`{data['first_token']}`"
        + (f" (the model's: `{resolved}`)" if (resolved := prov.get("bos_policy", {}).get("first_token_resolved",
                                                                                             data["first_token"]))
           != data["first_token"] else ""),
        f"- metrics over query positions i >= {spec['from_query']} (predicting token i + 1); "
        f"{confidence:.0%} intervals: percentile bootstrap over sequences, {spec['bootstrap']['n_resamples']} "
        f"resamples, seed {spec['seed']}, paired across conditions",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in prov["versions"].items()),
        f"- git: {git.get('commit', '-')}{' (uncommitted changes)' if git.get('dirty') else ''}",
        f"- spec fingerprint `{results['fingerprint'][:16]}`", "",
    ]
    metrics = spec["metrics"]
    lines += ["## Conditions", "", "| condition | " + " | ".join(_LABELS.get(m, m) for m in metrics)
              + " | Δ loss vs clean | recovery / control |",
              "|---" * (len(metrics) + 3) + "|"]
    clean = results["clean"]["metrics"]
    lines.append("| clean | " + " | ".join("0" if m == "kl" else format_estimate(clean[m]) for m in metrics) + " | | |")
    for c in results["conditions"]:
        if "sweep" in c:
            continue
        extra = ""
        if "recovery" in c:
            extra = f"recovers {format_estimate(c['recovery']['loss'], 2)} of {c['recovery']['of']!r}"
            if c["recovery"].get("beats_clean"):
                extra += " **(beats clean: an adapter, not evidence)**"
            elif c["recovery"].get("above_one"):
                extra += " (above 1: better than clean, within noise)"
        if "control" in c:
            extra = f"{c['control']['for']!r} exceeds this by {_signed(c['control']['excess_loss'])}"
            if "excess_loss_over_worst_draw" in c["control"]:
                extra += (f" (mean of {c['draws']['spread']['loss']['n']} draws; the most damaging draw by "
                          f"{_signed(c['control']['excess_loss_over_worst_draw'])})")
        if "draws" in c:
            spread = c["draws"]["spread"]["loss"]
            extra += (f"{'; ' if extra else ''}{spread['n']} draws, Δ loss min {spread['min']:+.3f} / median "
                      f"{spread['median']:+.3f} / max {spread['max']:+.3f}")
        values = " | ".join(format_estimate(c["metrics"][m]["value"]) for m in metrics)
        lines.append(f"| {c['name']} | {values} | {_signed(c['metrics']['loss']['delta'])} | {extra} |")
    lines += ["", "![change per condition, paired to clean](conditions.png)", ""]
    fits = [(c["name"], iv["fit_log"]) for c in results["conditions"] for iv in c["interventions"]
            if isinstance(iv, dict) and iv.get("fit_log")]
    if fits:
        lines += ["### Gradient fits", ""]
        for name, log in fits:
            if log["n_validation"]:
                curve = log["validation_loss"]
                lines.append(
                    f"- {name}: fitted on {log['n_train']} calibration sequences, stopped on {log['n_validation']} "
                    f"held-out calibration sequences: kept step {log['kept_step']} of {log['steps_run']} run (at most "
                    f"{log['max_steps']}; step 0 is the moments); validation loss {curve[0]:.4f} at step 0, "
                    f"{curve[log['kept_step']]:.4f} kept. Scored on the evaluation split, which it never saw.")
            else:
                lines.append(f"- {name}: fitted on {log['n_train']} sequences for {log['steps_run']} steps with no "
                             "validation split (the last step kept).")
        lines.append("")
    for c in results["conditions"]:
        if "sweep" not in c:
            continue
        variants = c["sweep"]["variants"]
        top = sorted(variants, key=lambda v: -v["loss"]["delta"]["value"])[:5]
        name = lambda v: f"L{v['layer']}" + (f"H{v['head']}" if "head" in v else "")  # noqa: E731
        screened = c["sweep"].get("method") == "screen"
        lines += [f"### Sweep: {c['name']} (over {c['sweep']['over']}, {len(variants)} variants"
                  + (", attribution-patching screen)" if screened else ")"), "",
                  ("Largest estimated loss increases (linear estimates, intervals over sequences): " if screened
                   else "Largest loss increases: ") + ", ".join(f"{name(v)} {_signed(v['loss']['delta'])}" for v in top),
                  ""]
        if c["sweep"].get("confirmed"):
            lines += [f"Rerun exactly ({len(c['sweep']['confirmed'])}: the largest estimates, then the largest "
                      "perturbations ||z' - z|| / ||z||): " + ", ".join(
                f"{name(v)} estimated {v['estimate']['value']:+.3f}, exact {_signed(v['exact'])}"
                for v in c["sweep"]["confirmed"]), ""]
        lines += [f"![{c['name']}]({_figure_name(c['name'])})", ""]
    for name, m in results["measurements"].items():
        lines += [f"## Measurement: {name}", "",
                  f"Over the {m['n_sink_heads']} heads whose clean sink score exceeds eps = {spec['eps']}, "
                  "mean per sequence:", ""]
        for key, value in m.items():
            if isinstance(value, dict) and "value" in value:
                lines.append(f"- {key}: {format_estimate(value)}")
        lines.append("")
    lines += ["## Verdicts", ""]
    for v in results["verdicts"]:
        lines += [f"### {v['hypothesis']}: **{v['verdict']}**", ""]
        for r in v["criteria"]:
            subject = f"{r['condition']!r}: " if r["condition"] else ""
            lines.append(f"- {r['outcome'].upper()}: {subject}{r['quantity']} = {format_estimate(r['estimate'])}; "
                         f"rule: {r['rule']} with threshold {r['threshold']:g}"
                         + (f". {r['description']}" if r["description"] else "")
                         + (f". **{r['note']}**" if r.get("note") else ""))
        lines.append("")
    lines.append("A criterion passes when its whole interval satisfies the rule, fails when none of it does, "
                 "and is inconclusive otherwise; a hypothesis is supported when all its criteria pass and "
                 "not supported when any fails.")
    return "\n".join(lines) + "\n"


def _figure_name(condition: str) -> str:

    return f"sweep-{slug(condition)}.png"


def figures(results: dict[str, Any]) -> dict[str, bytes]:
    out = {}
    plain = [c for c in results["conditions"] if "sweep" not in c]
    panels = [m for m in ("loss", "sink_ratio") if m in results["spec"]["metrics"]]
    if plain:
        fig, axes = new_subplots(1, len(panels), figsize=(5.5 * len(panels), 0.45 * len(plain) + 1.6), squeeze=False)
        for ax, metric in zip(axes[0], panels):
            # Paired differences to clean (the same sequences under both), with their bootstrap CIs:
            # the quantity the verdicts test, not absolute values with unpaired intervals.
            names = [c["name"] for c in plain]
            estimates = [c["metrics"][metric]["delta"] for c in plain]
            y = list(range(len(names)))[::-1]
            values = [e["value"] for e in estimates]
            errors = [[e["value"] - e["low"] for e in estimates], [e["high"] - e["value"] for e in estimates]]
            ax.errorbar(values, y, xerr=errors, fmt="o", capsize=3)
            for row, c in zip(y, plain):  # a drawn control: each draw's mean change as a grey dot
                if "draws" in c:
                    spread = c["draws"]["spread"][metric]["values"]
                    ax.plot(spread, [row] * len(spread), "|", color="grey", ms=9, alpha=0.8)
            ax.axvline(0, color="grey", lw=0.8, ls="--")
            ax.set_yticks(y, names)
            ax.set_xlabel(f"Δ {_LABELS.get(metric, metric)} vs clean, paired ({results['spec']['bootstrap']['confidence']:.0%} CI)")
        fig.suptitle(results["spec"]["name"])
        out["conditions.png"] = figure_png(fig)
    for c in results["conditions"]:
        if "sweep" not in c:
            continue
        variants = c["sweep"]["variants"]
        fig, ax = new_subplots(figsize=(7, 3.6))
        if c["sweep"]["over"] == "layers":
            layers = [v["layer"] for v in variants]
            delta = [v["loss"]["delta"] for v in variants]
            ax.plot(layers, [d["value"] for d in delta], marker="o", ms=3)
            ax.fill_between(layers, [d["low"] for d in delta], [d["high"] for d in delta], alpha=0.3)
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xlabel("layer")
            ax.set_ylabel("Δ loss vs clean (nats)")
        else:
            n_layers = max(v["layer"] for v in variants) + 1
            n_heads = max(v["head"] for v in variants) + 1
            grid = torch.full((n_layers, n_heads), float("nan"))
            for v in variants:
                grid[v["layer"], v["head"]] = v["loss"]["delta"]["value"]
            image = ax.imshow(grid.T.numpy(), aspect="auto", cmap="viridis", origin="lower")
            fig.colorbar(image, ax=ax, label="Δ loss vs clean (nats)")
            ax.set_xlabel("layer")
            ax.set_ylabel("head")
        ax.set_title(f"{results['spec']['name']}: {c['name']}")
        out[_figure_name(c["name"])] = figure_png(fig)
    return out


def write_outputs(results: dict[str, Any], out: Path) -> None:
    """Figures first, then report.md, then results.json (written last: its presence means done)."""
    for name, data in figures(results).items():
        atomic_write_bytes(out / name, data)
    atomic_write_text(out / "report.md", format_report(results))
    atomic_write_json(out / "results.json", results)


def format_verdicts(results: dict) -> str:
    """Each hypothesis's verdict, with the criteria behind it, from a results record."""
    lines = []
    for verdict in results["verdicts"]:
        lines.append(f"{verdict['hypothesis']}: {verdict['verdict'].upper()}")
        for r in verdict["criteria"]:
            subject = f"{r['condition']}: " if r["condition"] else ""
            lines.append(f"  {r['outcome']:<12} {subject}{r['quantity']} = {format_estimate(r['estimate'])} "
                         f"(rule: {r['rule']}, threshold {r['threshold']:g})")
            if r.get("note"):
                lines.append(f"               note: {r['note']}")
    return "\n".join(lines)
