"""Run an :class:`ExperimentSpec`: one clean run, every condition on the same evaluation tokens.

Order of work: validate the spec (no model), check the output folder, load the model, check the
spec against it (layers, heads, context, data length), build the tokens, fit what needs fitting
on the calibration split, then forward passes. Each condition's per-sequence numbers are written
atomically to ``OUT/conditions/NN-name.json`` as soon as it finishes; ``resume=True`` reuses the
files whose spec fingerprint matches. ``results.json``, ``report.md`` and the figures are built
from those files, so a resumed run and an uninterrupted one give the same numbers.
"""

from __future__ import annotations

import hashlib
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sinkinterp._io import (
    check_writable_folder,
    locked_folder,
    read_record,
    slug,
    write_record,
)
from sinkinterp.backends import Model
from sinkinterp.data import (
    allowed_ids,
    corpus_documents,
    corpus_tokens,
    corpus_windows,
    needle_prompts,
    random_tokens,
    repeated_random_tokens,
    resolve_first_token,
    resolve_token,
)
from sinkinterp.errors import SinkInterpError
from sinkinterp.evaluate import METRICS, Evaluator, step_metrics
from sinkinterp.experiments.report import assemble, write_outputs
from sinkinterp.experiments.spec import STEP_SOURCES, ConditionSpec, ExperimentSpec
from sinkinterp.experiments.screening import Screen, screen
from sinkinterp.experiments.sweep import fast_sweep, sweep_variants
from sinkinterp.heads.scores import RepeatedTokens
from sinkinterp.interventions import (
    INTERVENTIONS,
    Intervention,
    PerSequencePatch,
)
from sinkinterp.measure import MEASUREMENTS
from sinkinterp.models import load_model
from sinkinterp.provenance import describe_model, git_commit, package_versions

__all__ = ["run_experiment", "Prepared"]


def condition_file(out: Path, index: int, condition: ConditionSpec) -> Path:
    return out / "conditions" / f"{index:02d}-{slug(condition.name)}.json"


# --------------------------------------------------------------------------------------------
# Model-dependent checks and data


def check_against_model(spec: ExperimentSpec, model: Model) -> None:
    """Everything the spec asks of the model, checked before any forward pass."""
    cfg = model.cfg
    if spec.data.seq_len > cfg.n_ctx:
        raise SinkInterpError(f"spec.data.seq_len: {spec.data.seq_len} exceeds the model's context n_ctx = {cfg.n_ctx}")
    first = resolve_first_token(model, spec.data.first_token)
    needs_tokenizer = spec.data.source not in ("random", "repeated") or first != "none" and not isinstance(first, int)
    if spec.data.calibration == "corpus_windows" and spec.data.n_calibration:
        if getattr(model, "tokenizer", None) is None:
            raise SinkInterpError(f"spec.data.calibration: corpus_windows need a tokenizer, and {cfg.model_name} has "
                                  "none: use calibration 'same'")
        if spec.data.calibration_seq_len > cfg.n_ctx:
            raise SinkInterpError(f"spec.data.calibration_seq_len: {spec.data.calibration_seq_len} exceeds the "
                                  f"model's context n_ctx = {cfg.n_ctx}")
    if needs_tokenizer and getattr(model, "tokenizer", None) is None:
        raise SinkInterpError(f"spec.data: source {spec.data.source!r} / first_token {spec.data.first_token!r} "
                              f"need a tokenizer, and {cfg.model_name} has none: use source 'random'")

    for i, condition in enumerate(spec.conditions):
        if condition.replace_first_token not in (None, "random"):
            try:
                resolve_token(model, condition.replace_first_token)
            except SinkInterpError as e:
                raise SinkInterpError(f"spec.conditions[{i}] ({condition.name!r}).replace_first_token: {e}") from None
        for j, record in enumerate(condition.interventions):
            where = f"spec.conditions[{i}] ({condition.name!r}).interventions[{j}]"
            try:
                # Its layers, heads and fit options on this model, and whether its hook points carry it.
                INTERVENTIONS[record["type"]].check_record(model, record)
            except SinkInterpError as e:
                raise SinkInterpError(f"{where}: {e}") from None


def _data(model: Model, spec: ExperimentSpec) -> tuple[Tensor, Tensor, dict[str, Any], tuple | None]:
    """Calibration and evaluation tokens (disjoint: calibration first), how they were made, and the
    steps to score for step sources (needle answers, induction targets; None: every query from
    ``from_query`` on)."""
    data = spec.data
    n_total = data.n_calibration + data.n_seqs
    record: dict[str, Any] = {"source": data.source, "first_token": data.first_token,
                              "first_token_resolved": resolve_first_token(model, data.first_token)}
    steps = None
    if data.source in STEP_SOURCES:
        n_total = data.n_seqs if data.calibration == "corpus_windows" else n_total
        if data.source == "needle":
            needle = needle_prompts(model, n_total, data.seq_len, seed=data.seed, first_token=data.first_token)
            tokens, record["needle"] = needle.tokens, needle.to_dict()
            steps = needle.answer_steps()
        else:
            first = resolve_first_token(model, data.first_token)
            repeated = RepeatedTokens(repeated_random_tokens(model, n_total, data.seq_len // 2, seed=data.seed,
                                                             first_token=first),
                                      data.seq_len // 2, offset=int(first != "none"))
            tokens, steps = repeated.tokens, repeated.induction_steps()
            record["repeated"] = {"n_seqs": n_total, "half_len": data.seq_len // 2}
        record["seed"] = data.seed
    elif data.source == "random":
        tokens = random_tokens(model, n_total, data.seq_len, seed=data.seed, first_token=data.first_token)
        record["seed"] = data.seed
    else:
        if data.source == "corpus":
            text = corpus_documents()
            record["corpus"] = "pydoc_data.topics"
        else:
            text = [Path(data.source).read_text(encoding="utf-8")]  # one document
        record["text_sha256"] = hashlib.sha256("\n\n".join(text).encode()).hexdigest()
        record["n_documents"] = len(text)
        record["sampling"] = data.sampling
        if data.sampling == "windows":
            record["seed"] = data.seed
        try:
            tokens = corpus_tokens(model, n_total, data.seq_len, text=text, first_token=data.first_token,
                                   seed=data.seed, sampling=data.sampling)
        except SinkInterpError as e:
            raise SinkInterpError(
                f"spec.data: the split needs {data.n_calibration} calibration + {data.n_seqs} evaluation "
                f"sequences: {e}"
            ) from None
    record["shape"] = list(tokens.shape)
    if data.calibration == "corpus_windows":
        record["calibration"] = {"source": "corpus_windows", "n_seqs": data.n_calibration,
                                 "seq_len": data.calibration_seq_len, "seed": data.seed}
        calibration = (corpus_windows(model, data.n_calibration, data.calibration_seq_len, seed=data.seed)
                       if data.n_calibration else tokens[:0])
        return calibration, tokens, record, steps
    if steps is not None:  # the steps of the evaluation rows, renumbered from 0
        rows, queries, targets = steps
        keep = rows >= data.n_calibration
        steps = (rows[keep] - data.n_calibration, queries[keep], targets[keep])
    return tokens[:data.n_calibration], tokens[data.n_calibration:], record, steps


# --------------------------------------------------------------------------------------------
# Fitting interventions on the calibration split


def _fit(model: Model, record: dict, calibration: Tensor, seed: int, draw: int = 0,
         n_draws: int = 1) -> Intervention | PerSequencePatch:
    """The intervention ``record`` describes, fitted on ``calibration`` by its own type (random
    choices are draw ``draw`` of ``n_draws``)."""
    if record.get("fit") is None:
        return Intervention.from_dict(record)
    fields = {k: v for k, v in record.items() if k not in ("type", "fit")}
    return INTERVENTIONS[record["type"]].fit_spec(model, calibration, seed=seed, draw=draw, n_draws=n_draws,
                                                  fields=fields, options=record["fit"])


# --------------------------------------------------------------------------------------------
# Forward passes


class _Evaluator(Evaluator):
    """The evaluation engine on a spec's evaluation tokens; the clean run records alpha, and sweeps
    go through the fast sweep."""

    def __init__(self, model: Model, spec: ExperimentSpec, tokens: Tensor, steps: tuple | None = None):
        super().__init__(model, tokens, metrics=spec.metrics, from_query=spec.from_query,
                         batch_size=spec.data.batch_size,
                         alpha=any(METRICS[m].from_alpha for m in spec.metrics))
        self.spec, self.steps = spec, steps

    def run(self, interventions: list, first_token: Tensor | None = None, clean: bool = False) -> dict[str, Tensor]:
        if self.steps is not None:  # needle answers / induction targets (the spec refused the rest)
            if any(hasattr(iv, "build") for iv in interventions):
                raise SinkInterpError("per-sequence patch sources (fit source 'other') need every query scored")
            values = step_metrics(self.model, self.tokens, *self.steps, interventions=interventions,
                                  batch_size=self.batch_size)
            return {m: values[m] for m in self.metrics}
        return super().run(interventions, first_token=first_token, clean=clean,
                           record_alpha=self.alpha or clean)

    def sweep(self, interventions: list, kind: str, progress: bool) -> tuple[list, list[dict[str, Tensor]]]:
        self._refuse_patch_sources(interventions)
        variants = sweep_variants(self.model, interventions, kind)
        metrics = ("loss",)  # a sweep reports the per-layer (per-head) loss effect
        options = dict(from_query=self.spec.from_query, metrics=metrics, batch_size=self.spec.data.batch_size,
                       progress=progress)
        results = fast_sweep(self.model, self.tokens, variants, max_rows=self.spec.sweep_rows, **options)
        return variants, results

    def screen(self, intervention, confirm: int, progress: bool) -> tuple[Screen, list[dict[str, Tensor]]]:
        """The attribution-patching screen of one per-head intervention, and the exact loss of its
        ``confirm`` top hits (in the screen's order)."""
        self._refuse_patch_sources([intervention])
        result = screen(self.model, self.tokens, intervention, from_query=self.spec.from_query,
                        batch_size=self.spec.data.batch_size, progress=progress)
        confirmed = []
        if confirm:
            confirmed = fast_sweep(self.model, self.tokens, self.confirmed_variants(result, confirm),
                                   from_query=self.spec.from_query, metrics=("loss",),
                                   batch_size=self.spec.data.batch_size, max_rows=self.spec.sweep_rows,
                                   progress=progress)
        return result, confirmed

    @staticmethod
    def confirmed_variants(result: Screen, confirm: int) -> list:
        """What ``confirm: k`` reruns: the k largest estimates, then the k largest perturbations
        among the rest (where the linear estimate is least to be trusted)."""
        k = min(confirm, len(result.variants))
        return result.top(k, largest=k)

    @staticmethod
    def _refuse_patch_sources(interventions: list) -> None:
        if any(hasattr(iv, "build") for iv in interventions):
            raise SinkInterpError("a sweep cannot use per-sequence patch sources (fit source 'other')")


def _lists(values: dict[str, Tensor]) -> dict[str, list]:
    return {name: value.tolist() for name, value in values.items()}


# --------------------------------------------------------------------------------------------
# Provenance


def provenance(model: Model, spec: ExperimentSpec, data: dict[str, Any]) -> dict[str, Any]:
    info = describe_model(model)
    source = info.get("source") or {}
    return {
        "model": info,
        "weights_sha256": source.get("sha256"),
        "versions": package_versions(),
        "git": git_commit(),
        "seed": spec.seed,
        "bos_policy": {"first_token": spec.data.first_token, "tokenizer": info.get("bos_policy"),
                       "first_token_resolved": resolve_first_token(model, spec.data.first_token)},
        "data": data,
        "torch_threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------
# The run


class Prepared:
    """A spec, its model and its tokens, checked and ready for forward passes."""

    def __init__(self, spec: ExperimentSpec, model: Model):
        self.spec, self.model = spec, model
        self.calibration, self.evaluation, self.data, steps = _data(model, spec)
        self.evaluator = _Evaluator(model, spec, self.evaluation, steps)


def _check_out(spec: ExperimentSpec, out: Path, resume: bool) -> None:
    """With the folder locked: refuse to mix runs. A folder that holds a run is continued only with
    ``resume`` and the same spec fingerprint."""
    saved = out / "spec.json"
    if not saved.exists():
        return
    if not resume:
        raise SinkInterpError(f"{out} already holds results: pass --resume to continue that run, or another --out")
    previous, why = read_record(saved)
    if previous is None:
        raise SinkInterpError(f"{saved} {why}: cannot tell which spec that run used; use another --out")
    if previous.get("fingerprint") != spec.fingerprint():
        raise SinkInterpError(
            f"{out} holds a run of a different spec (fingerprint {str(previous.get('fingerprint'))[:12]}, "
            f"this spec {spec.fingerprint()[:12]}): use another --out, or the same spec and overrides to resume"
        )


def _load_done(path: Path | None, fingerprint: str, resume: bool, log) -> dict | None:
    """A record written earlier by this spec, verified by its checksum; None (recompute) otherwise,
    saying why when a file was there but cannot be trusted."""
    if not resume or path is None or not path.exists():
        return None
    record, why = read_record(path)
    if record is None:
        log(f"recomputing {path.parent.name}/{path.name}: it {why}")
        return None
    if record.get("fingerprint") != fingerprint:
        log(f"recomputing {path.parent.name}/{path.name}: it belongs to another spec")
        return None
    return record


def run_experiment(spec: ExperimentSpec, out: str | Path | None = None, *, model: Model | None = None,
                   resume: bool = False, progress: bool | None = None, log=print) -> dict[str, Any]:
    """Run ``spec``; with ``out``, write every result there (see the module docstring).

    ``model``: an already loaded model to use instead of loading ``spec.model``. Returns the
    results record (the content of ``results.json``). The folder is locked for the whole run: a
    second run into the same ``out`` is refused while the first is writing. With ``resume``, each
    saved record is checked against its checksum; one that does not verify (edited, truncated,
    damaged) is recomputed, and the log says so.
    """
    if not isinstance(spec, ExperimentSpec):
        raise SinkInterpError(f"run_experiment takes an ExperimentSpec (see load_spec), got {type(spec).__name__}")
    if not callable(log):
        raise SinkInterpError(f"log must be a function taking one line of text (print, list.append), got {log!r}")
    if out is None:
        return _run(spec, None, model, resume, progress, log)
    out = Path(out)
    check_writable_folder(out, "--out")  # also refuses a file in the way
    created = not out.exists()
    try:
        with locked_folder(out, "sinkinterp run"):
            _check_out(spec, out, resume)
            return _run(spec, out, model, resume, progress, log)
    except BaseException:
        # A run refused or stopped before it wrote anything leaves no folder behind.
        if created and out.is_dir() and [p.name for p in out.iterdir()] == [".lock"]:
            (out / ".lock").unlink(missing_ok=True)
            out.rmdir()
        raise


def _run(spec: ExperimentSpec, out: Path | None, model: Model | None, resume: bool, progress: bool | None,
         log) -> dict[str, Any]:
    progress = _show_progress() if progress is None else progress
    if model is None:
        model = load_model(spec.model, backend=spec.backend)
    check_against_model(spec, model)
    run = Prepared(spec, model)
    fingerprint = spec.fingerprint()
    started = time.perf_counter()
    if out is not None:
        write_record(out / "spec.json", {"fingerprint": fingerprint, "spec": spec.to_dict()})

    log(f"[{spec.name}] clean run on {tuple(run.evaluation.shape)} evaluation tokens")
    clean = _lists(run.evaluator.run([], clean=True))
    if out is not None:
        previous = _load_done(out / "clean.json", fingerprint, resume, log)
        if previous is not None and previous["per_sequence"]["loss"] != clean["loss"]:
            raise SinkInterpError(f"{out}/clean.json differs from this clean run: the model or data changed; "
                                  "use another --out")
        write_record(out / "clean.json", {"fingerprint": fingerprint, "per_sequence": clean})

    records = []
    for index, condition in enumerate(spec.conditions):
        path = None if out is None else condition_file(out, index, condition)
        done = _load_done(path, fingerprint, resume, log)
        if done is not None:
            log(f"[{spec.name}] {condition.name}: done earlier, reusing {path.name}")
            records.append(done)
            continue
        start = time.perf_counter()
        record = _run_condition(run, condition, progress)
        record.update(fingerprint=fingerprint, seconds=round(time.perf_counter() - start, 2))
        log(f"[{spec.name}] {condition.name}: {record['seconds']:.1f} s")
        if path is not None:
            record = write_record(path, record)  # the same floats a resumed run reads back
        records.append(record)

    measurements = _measurements(run, clean, out, fingerprint, resume, log)
    results = assemble(spec, clean, records, measurements, provenance(model, spec, run.data))
    results["provenance"]["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results["provenance"]["seconds"] = round(time.perf_counter() - started, 1)
    if out is not None:
        write_outputs(results, out)
    return results


def _show_progress() -> bool:
    import sys

    return sys.stderr.isatty()


def _run_condition(run: Prepared, condition: ConditionSpec, progress: bool) -> dict[str, Any]:
    spec, model = run.spec, run.model
    if condition.method == "screen":
        (intervention,) = [_fit(model, record, run.calibration, spec.seed) for record in condition.interventions]
        result, confirmed = run.evaluator.screen(intervention, condition.confirm, progress)
        top = run.evaluator.confirmed_variants(result, condition.confirm) if confirmed else []
        # per_sequence holds the screen's estimated losses (clean + estimate), so a screen reads
        # like an exact sweep; the confirmed top hits carry their exact losses beside them.
        return {"name": condition.name, "interventions": [intervention.to_dict()], "method": "screen",
                "screen_seconds": round(result.seconds, 3), "clean_loss": result.clean.tolist(),
                "sweep": [{**v.label, "perturbation": float(size), "per_sequence": _lists(r)}
                          for v, r, size in zip(result.variants, result.results, result.perturbation)],
                "confirmed": [{**v.label, "per_sequence": _lists(r)} for v, r in zip(top, confirmed)]}
    if condition.sweep is not None:
        interventions = [_fit(model, record, run.calibration, spec.seed) for record in condition.interventions]
        variants, results = run.evaluator.sweep(interventions, condition.sweep, progress)
        return {"name": condition.name, "interventions": [iv.to_dict() for iv in interventions],
                "sweep": [{**v.label, "per_sequence": _lists(r)} for v, r in zip(variants, results)]}
    draws = [_run_draw(run, condition, draw) for draw in range(condition.draws)]
    if condition.draws == 1:
        return {"name": condition.name, **draws[0]}
    # Several draws of a random condition: its own per-sequence values are the mean over draws,
    # and every draw is kept (the report shows their distribution).
    mean = {key: torch.tensor([d["per_sequence"][key] for d in draws], dtype=torch.float64).mean(dim=0).tolist()
            for key in draws[0]["per_sequence"]}
    return {"name": condition.name, "interventions": draws[0]["interventions"],
            "draws": [{"draw": i, **d} for i, d in enumerate(draws)], "per_sequence": mean}


def _run_draw(run: Prepared, condition: ConditionSpec, draw: int) -> dict[str, Any]:
    """One full evaluation of the condition, its random choices being draw ``draw`` of ``condition.draws``."""
    spec, model = run.spec, run.model
    interventions = [_fit(model, record, run.calibration, spec.seed, draw, condition.draws)
                     for record in condition.interventions]
    entry: dict[str, Any] = {"interventions": [iv.to_dict() for iv in interventions]}
    first_token = None
    if condition.replace_first_token is not None:
        first_token = _first_tokens(model, condition.replace_first_token, run.evaluation.shape[0], spec.seed + draw)
        entry["first_tokens"] = first_token.tolist()
    entry["per_sequence"] = _lists(run.evaluator.run(interventions, first_token))
    return entry


def _first_tokens(model: Model, token, n: int, seed: int) -> Tensor:
    if token == "random":
        allowed = allowed_ids(model)
        generator = torch.Generator().manual_seed(seed)
        return allowed[torch.randint(len(allowed), (n,), generator=generator)]
    return torch.full((n,), resolve_token(model, token), dtype=torch.long)


def _measurements(run: Prepared, clean: dict, out: Path | None, fingerprint: str, resume: bool, log) -> dict:
    if not run.spec.measurements:
        return {}
    path = None if out is None else out / "measurements.json"
    done = _load_done(path, fingerprint, resume, log)
    if done is not None:
        log(f"[{run.spec.name}] measurements: done earlier, reusing {path.name}")
        return done["measurements"]
    measured = {}
    alpha_first = torch.tensor(clean["alpha_first"])
    for name in run.spec.measurements:
        measurement = MEASUREMENTS[name]
        log(f"[{run.spec.name}] {measurement.description}")
        measured[name] = measurement.compute(run.model, run.evaluation, alpha_first=alpha_first, eps=run.spec.eps)
    if path is not None:
        measured = write_record(path, {"fingerprint": fingerprint, "measurements": measured})["measurements"]
    return measured
