"""The experiment spec: one dataclass is the YAML file, the CLI overrides and the saved record.

A spec names a model, the data (with a calibration / evaluation split), the conditions (each a
list of interventions in their ``to_dict`` form, optionally with a ``fit`` block that the runner
resolves on the calibration split), the metrics, the bootstrap settings, the seed and the
decision criteria behind each hypothesis's verdict. :func:`load_spec` reads a file or a built-in
name; every problem it can see without a model is a :class:`SinkInterpError` naming the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from sinkinterp._deprecated import renamed_option
from sinkinterp._yaml import check_finite, read_yaml_file
from sinkinterp.data import SAMPLING
from sinkinterp.errors import SinkInterpError
from sinkinterp.evaluate import METRICS
from sinkinterp.interventions import INTERVENTIONS, Intervention, SpecContext
from sinkinterp.measure import MEASUREMENTS
from sinkinterp.stats import MAX_RESAMPLES

__all__ = [
    "ExperimentSpec", "DataSpec", "ConditionSpec", "Criterion", "BootstrapSpec",
    "load_spec", "builtin_specs", "METRICS", "CRITERION_KINDS", "fit_options",
]

SPEC_DIR = Path(__file__).with_name("specs")

SWEEPS = ("layers", "heads")
SWEEP_METHODS = ("exact", "screen")
DATA_SOURCES = ("corpus", "random", "needle", "repeated")
#: Sources scored at chosen steps, not at every query from from_query on: the needle's answer tokens
#: (teacher-forced reproduction) and the second half of repeated random tokens (induction targets).
STEP_SOURCES = ("needle", "repeated")
CALIBRATION_SOURCES = ("same", "corpus_windows")

#: How a criterion turns an interval into pass / fail / inconclusive (see report.verdict).
CRITERION_KINDS = {
    "increases": "delta to clean > threshold",
    "decreases": "delta to clean < -threshold",
    "negligible": "|delta to clean| < threshold",
    "recovers": "recovery fraction of the repaired condition >= threshold",
    "exceeds_control": "delta(condition) - delta(its control) > threshold",
    "ratio_below": "delta(condition) / delta(other) < threshold",
    "measurement_above": "a measured quantity > threshold",
}

@dataclass(frozen=True)
class DataSpec:
    """Token data. The first ``n_calibration`` sequences fit interventions; the next ``n_seqs``
    are the evaluation set every condition (and the clean run) is scored on."""

    source: str = "corpus"  # 'corpus' (pydoc_data.topics), 'random' (seeded tokens) or a text file path
    seq_len: int = 128
    n_seqs: int = 16
    n_calibration: int = 8
    # The BOS policy: 'default' (the model's own convention), 'none', 'bos', a token string or an id.
    first_token: Union[str, int] = "default"
    seed: int = 0  # draws the random tokens, or which corpus windows
    # Text sources: 'windows' (seeded, non-overlapping, within one document; the default) or
    # 'consecutive' (chunks from the start of the text, the rule of sinkinterp before windows)
    sampling: str = "windows"
    batch_size: int = 8
    # Where the calibration split comes from: 'same' (the first n_calibration sequences of source) or
    # 'corpus_windows' (seeded windows of the offline corpus, calibration_seq_len tokens, which may
    # overlap: what the head validation's mean ablation is fitted on, beside needle or repeated data).
    calibration: str = "same"
    calibration_seq_len: int = 128


@dataclass(frozen=True)
class ConditionSpec:
    """A named condition: interventions applied together, or a replaced first token, or both."""

    name: str
    interventions: tuple[dict, ...] = ()
    # Replace each evaluation sequence's first token: 'random' or a token (data.first_token, by contrast,
    # is the token every sequence starts with; this swaps it for another after the data are built).
    replace_first_token: Union[str, int, None] = None
    repairs: Union[str, None] = None  # the broken condition this one repairs (recovery fraction)
    control_for: Union[str, None] = None  # the condition this one controls for
    sweep: Union[str, None] = None  # 'layers' or 'heads': one variant per layer / (layer, head)
    # How a heads sweep is computed: 'exact' (one resumed forward per variant) or 'screen'
    # (attribution patching, experiments.screening); a screen reruns exactly its `confirm` largest
    # estimates and its `confirm` largest perturbations (where the linear estimate is least trusted).
    method: str = "exact"
    confirm: int = 0
    # A condition with a seeded random choice (a random key position, random channels, random first
    # tokens) run this many times with different draws; it is reported as a distribution.
    draws: int = 1
    description: str = ""

    @property
    def first_token(self):
        """Deprecated: a condition's first-token swap is ``replace_first_token``."""
        renamed_option("ConditionSpec", "first_token", "replace_first_token")
        return self.replace_first_token


@dataclass(frozen=True)
class Criterion:
    """One test behind a hypothesis's verdict, e.g. ``recovers >= 0.8``."""

    hypothesis: str
    kind: str
    threshold: float
    condition: str = ""
    other: str = ""  # 'ratio_below': the denominator condition
    metric: str = "loss"
    measurement: str = ""  # 'measurement_above': the quantity's name
    description: str = ""


@dataclass(frozen=True)
class BootstrapSpec:
    n_resamples: int = 2000
    confidence: float = 0.95


@dataclass(frozen=True)
class ExperimentSpec:
    name: str
    description: str = ""
    model: str = "smollm2-135m"
    backend: str = "auto"
    seed: int = 0
    data: DataSpec = field(default_factory=DataSpec)
    from_query: int = 16  # metrics use query positions i >= from_query (predicting token i + 1)
    eps: float = 0.3  # sink threshold for the sink_ratio metric and for choosing sink heads
    metrics: tuple[str, ...] = ("loss", "kl", "accuracy")
    measurements: tuple[str, ...] = ()
    conditions: tuple[ConditionSpec, ...] = ()
    criteria: tuple[Criterion, ...] = ()
    bootstrap: BootstrapSpec = field(default_factory=BootstrapSpec)
    sweep_rows: int = 64  # rows per stacked sweep forward (variants x sequences)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of the resolved spec: what ``--resume`` checks."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def loss_from(self) -> int:
        """Deprecated: the query cut is called ``from_query`` everywhere."""
        renamed_option("ExperimentSpec", "loss_from", "from_query")
        return self.from_query

    @classmethod
    def from_dict(cls, record: Any) -> ExperimentSpec:
        check_finite(record, "spec")
        spec = _build(cls, _new_spellings(record), "spec")
        _validate(spec)
        return spec

    def with_overrides(self, overrides: dict[str, Any]) -> ExperimentSpec:
        """A copy with dotted keys replaced, e.g. ``{"data.n_seqs": 8, "model": "tiny-llama"}``;
        list items by index: ``"conditions.2.interventions.0.fit.steps"``."""
        record = self.to_dict()
        for key, value in overrides.items():
            key = _new_key(key)
            target: Any = record
            parts = key.split(".")
            for depth, part in enumerate(parts):
                last = depth == len(parts) - 1
                if isinstance(target, list):
                    if not part.isdigit() or int(part) >= len(target):
                        raise SinkInterpError(f"override {key!r}: {part!r} is not an index of a list of {len(target)}")
                    part = int(part)
                elif not isinstance(target, dict) or part not in target:
                    allowed = ", ".join(sorted(target)) if isinstance(target, dict) else "none"
                    raise SinkInterpError(f"override {key!r}: unknown key {part!r}; allowed here: {allowed}")
                if last:
                    target[part] = value
                else:
                    target = target[part]
        return ExperimentSpec.from_dict(record)


# --------------------------------------------------------------------------------------------
# Old spellings, accepted with a DeprecationWarning

#: Old spec keys -> their one name now: the query cut is ``from_query`` everywhere (interventions,
#: evaluate, sweeps); a condition's first-token swap is ``replace_first_token`` (``data.first_token``
#: is the token sequences are built with).
RENAMED_KEYS = {"loss_from": "from_query"}
RENAMED_CONDITION_KEYS = {"first_token": "replace_first_token"}


def _renamed(record: dict, renames: dict[str, str], where: str) -> dict:
    out = dict(record)
    for old, new in renames.items():
        if old in out:
            if new in out:
                raise SinkInterpError(f"{where}: give {new!r} (the new name of {old!r}), not both")
            renamed_option(where, old, new, stacklevel=5)
            out[new] = out.pop(old)
    return out


def _new_spellings(record: Any) -> Any:
    if not isinstance(record, dict):
        return record
    record = _renamed(record, RENAMED_KEYS, "spec")
    conditions = record.get("conditions")
    if isinstance(conditions, list):
        record["conditions"] = [_renamed(c, RENAMED_CONDITION_KEYS, f"spec.conditions[{i}]") if isinstance(c, dict)
                                else c for i, c in enumerate(conditions)]
    return record


def _new_key(key: str) -> str:
    """An override's dotted key in the new spelling (``loss_from`` -> ``from_query``, ...)."""
    parts = key.split(".")
    if parts[0] in RENAMED_KEYS:
        renamed_option("override", parts[0], RENAMED_KEYS[parts[0]], stacklevel=4)
        parts[0] = RENAMED_KEYS[parts[0]]
    if len(parts) == 3 and parts[0] == "conditions" and parts[2] in RENAMED_CONDITION_KEYS:
        renamed_option("override", parts[2], RENAMED_CONDITION_KEYS[parts[2]], stacklevel=4)
        parts[2] = RENAMED_CONDITION_KEYS[parts[2]]
    return ".".join(parts)


# --------------------------------------------------------------------------------------------
# Building dataclasses from plain data, naming the key on every error


def _describe(hint) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false", dict: "a mapping"}.get(hint, str(hint))


def _coerce(value: Any, hint, path: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(value, option, path)
            except SinkInterpError:
                continue
        raise SinkInterpError(f"{path}: expected {_describe(hint)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SinkInterpError(f"{path}: expected {_describe(hint)}, got {value!r}")
        return tuple(_coerce(v, typing.get_args(hint)[0], f"{path}[{i}]") for i, v in enumerate(value))
    ok = {
        type(None): value is None,
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
    }[hint]
    if not ok:
        raise SinkInterpError(f"{path}: expected {_describe(hint)}, got {value!r}")
    return float(value) if hint is float else value


def _build(cls, record: Any, path: str):
    if not isinstance(record, dict):
        raise SinkInterpError(f"{path}: expected a mapping of keys to values, got {record!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(record) - set(fields))
    if unknown:
        raise SinkInterpError(f"{path}: unknown key {unknown[0]!r}; allowed keys: {', '.join(fields)}")
    required = [name for name, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in record]
    if missing:
        raise SinkInterpError(f"{path}: missing required key {missing[0]!r}")
    values = {name: _coerce(value, hints[name], f"{path}.{name}") for name, value in record.items()}
    return cls(**values)


# --------------------------------------------------------------------------------------------
# What can be checked without a model


def _fail(path: str, message: str) -> None:
    raise SinkInterpError(f"{path}: {message}")


def _at_least(path: str, value: int, low: int) -> None:
    if value < low:
        _fail(path, f"must be >= {low}, got {value}")


def _validate(spec: ExperimentSpec) -> None:
    data = spec.data
    if not spec.name:
        _fail("spec.name", "must not be empty")
    if spec.backend not in ("auto", "hooked", "bridge"):
        _fail("spec.backend", f"{spec.backend!r} is not one of 'auto', 'hooked', 'bridge'")
    if data.source not in DATA_SOURCES and not Path(data.source).is_file():
        _fail("spec.data.source", f"{data.source!r} is neither one of {DATA_SOURCES} nor an existing text file")
    if data.sampling not in SAMPLING:
        _fail("spec.data.sampling", f"{data.sampling!r} is not one of {SAMPLING}")
    if data.calibration not in CALIBRATION_SOURCES:
        _fail("spec.data.calibration", f"{data.calibration!r} is not one of {CALIBRATION_SOURCES}")
    _at_least("spec.data.calibration_seq_len", data.calibration_seq_len, 2)
    if data.source in STEP_SOURCES:
        _validate_step_source(spec)
    _at_least("spec.data.seq_len", data.seq_len, 2)
    _at_least("spec.data.n_seqs", data.n_seqs, 2)  # a bootstrap over sequences needs two
    _at_least("spec.data.n_calibration", data.n_calibration, 0)
    _at_least("spec.data.batch_size", data.batch_size, 1)
    _at_least("spec.sweep_rows", spec.sweep_rows, 1)
    for where, seed in (("spec.seed", spec.seed), ("spec.data.seed", data.seed)):
        if not 0 <= seed <= 2**63 - 1:
            _fail(where, f"{seed} is outside 0..2**63-1")
    if not 0 <= spec.from_query < data.seq_len - 1:
        _fail("spec.from_query", f"{spec.from_query} leaves no scored query in sequences of {data.seq_len} "
              f"tokens: allowed 0..{data.seq_len - 2}")
    if not 0 < spec.eps < 1:
        _fail("spec.eps", f"{spec.eps} is outside (0, 1)")
    for i, metric in enumerate(spec.metrics):
        if metric not in METRICS:
            _fail(f"spec.metrics[{i}]", f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    if "loss" not in spec.metrics:
        _fail("spec.metrics", "must include 'loss' (deltas, recovery and verdicts are computed on it)")
    for i, name in enumerate(spec.measurements):
        if name not in MEASUREMENTS:
            _fail(f"spec.measurements[{i}]",
                  f"unknown measurement {name!r}; allowed: {', '.join(sorted(MEASUREMENTS))}")
    if not 100 <= spec.bootstrap.n_resamples <= MAX_RESAMPLES:
        _fail("spec.bootstrap.n_resamples", f"must be in 100..{MAX_RESAMPLES}, got {spec.bootstrap.n_resamples}")
    if not 0 < spec.bootstrap.confidence < 1:
        _fail("spec.bootstrap.confidence", f"{spec.bootstrap.confidence} is outside (0, 1)")
    if not spec.conditions:
        _fail("spec.conditions", "is empty: an experiment needs at least one condition")

    names = [c.name for c in spec.conditions]
    needs_calibration = []
    for i, condition in enumerate(spec.conditions):
        path = f"spec.conditions[{i}] ({condition.name!r})"
        if not condition.name or condition.name == "clean":
            _fail(path, "a condition needs a name other than 'clean' (the clean run is always included)")
        if names.count(condition.name) > 1:
            _fail(path, "duplicate condition name")
        if not condition.interventions and condition.replace_first_token is None:
            _fail(path, "has no interventions and no replace_first_token: it would equal the clean run")
        for key in ("repairs", "control_for"):
            target = getattr(condition, key)
            if target is not None and (target not in names or target == condition.name):
                _fail(f"{path}.{key}", f"{target!r} is not another condition; conditions: {', '.join(names)}")
        _at_least(f"{path}.draws", condition.draws, 1)
        if condition.draws > MAX_DRAWS:
            _fail(f"{path}.draws", f"{condition.draws} is more than {MAX_DRAWS} (each draw is a full evaluation)")
        if condition.draws > 1 and not _is_random(condition):
            _fail(f"{path}.draws", f"{condition.draws} draws of a condition with no random choice would be identical: "
                  "draws need replace_first_token: random, a MaskSinkKey fit with position: random, or an "
                  "EditMassiveChannels fit with control: random")
        if condition.sweep is not None:
            if condition.draws > 1:
                _fail(f"{path}.draws", "a sweep cannot also be drawn several times")
            if condition.sweep not in SWEEPS:
                _fail(f"{path}.sweep", f"{condition.sweep!r} is not one of {SWEEPS}")
            if condition.replace_first_token is not None:
                _fail(f"{path}.sweep", "a sweep varies interventions by layer; it cannot replace the first token")
            if condition.method not in SWEEP_METHODS:
                _fail(f"{path}.method", f"{condition.method!r} is not one of {SWEEP_METHODS}")
            if condition.method == "screen" and condition.sweep != "heads":
                _fail(f"{path}.method", f"a screen estimates one head at a time: it needs sweep: heads, not "
                      f"{condition.sweep!r}")
            if condition.method == "screen" and len(condition.interventions) != 1:
                _fail(f"{path}.interventions", f"a screen estimates one intervention type per head, got "
                      f"{len(condition.interventions)} interventions")
        elif condition.method != "exact":
            _fail(f"{path}.method", f"{condition.method!r} is how a sweep is computed; this condition has no sweep")
        if isinstance(condition.confirm, bool) or not isinstance(condition.confirm, int) or condition.confirm < 0:
            _fail(f"{path}.confirm", f"{condition.confirm!r} is not an integer >= 0 (the top hits to rerun exactly)")
        if condition.confirm and condition.method != "screen":
            _fail(f"{path}.confirm", f"{condition.confirm} reruns a screen's top hits exactly; it needs "
                  "method: screen")
        for j, record in enumerate(condition.interventions):
            where = f"{path}.interventions[{j}]"
            kind = record.get("type")
            if kind not in INTERVENTIONS:
                _fail(where, f"unknown intervention {kind!r}; allowed: {', '.join(sorted(INTERVENTIONS))}")
            cls = INTERVENTIONS[kind]
            allowed = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(record) - allowed - {"type", "fit"})
            if unknown:
                _fail(where, f"{kind} has no field {unknown[0]!r}; its fields: {', '.join(sorted(allowed))}, fit")
            fit = record.get("fit")
            plain = {k: v for k, v in record.items() if k != "fit"}
            fields = {k: v for k, v in plain.items() if k != "type"}
            context = SpecContext(where=where, condition=path, n_calibration=data.n_calibration,
                                  draws=condition.draws, fail=_fail)
            if fit is None:
                if cls.NEEDS_FIT:
                    _fail(where, f"{kind} stores arrays that only a fit makes: give it a fit: block "
                          f"(fit: {{}} for the defaults; options: {', '.join(cls.FIT_OPTIONS) or 'none'})")
                _intervention_from_dict(plain, where)
                _check_positions(plain, data.seq_len, where)
                cls.check_spec(fields, None, context)
                continue
            if not isinstance(fit, dict):
                _fail(f"{where}.fit", f"expected a mapping of fit options, got {fit!r}")
            options = cls.FIT_OPTIONS
            if not options:
                _fail(f"{where}.fit", f"{kind} takes no fit: block (it has no fit options)")
            bad = sorted(set(fit) - set(options))
            if bad:
                _fail(f"{where}.fit", f"unknown option {bad[0]!r} for {kind}; allowed: "
                      + "; ".join(f"{k} ({v.allowed})" for k, v in options.items()))
            for key, value in fit.items():
                if not options[key].check(value):
                    _fail(f"{where}.fit.{key}", f"{value!r} is not {options[key].allowed}")
            _check_positions(plain, data.seq_len, where)
            cls.check_spec(fields, fit, context)
            if cls.fit_needs_calibration(fit):
                needs_calibration.append(where)
    if needs_calibration and data.n_calibration < 1:
        _fail("spec.data.n_calibration", f"is 0 but {needs_calibration[0]} is fitted on the calibration split: "
              "use n_calibration >= 1")
    if data.source == "random" and any(c.replace_first_token not in (None, "random")
                                       and not isinstance(c.replace_first_token, int)
                                       for c in spec.conditions):
        _fail("spec.conditions", "a token string as replace_first_token needs a tokenizer; random data may have none")

    for i, criterion in enumerate(spec.criteria):
        _validate_criterion(spec, criterion, f"spec.criteria[{i}]", names)


MAX_DRAWS = 100


def _validate_step_source(spec: ExperimentSpec) -> None:
    """Needle and repeated-token data are scored at their steps: loss and accuracy only, no
    sweeps (the fast sweep scores every query), no first-token swap, no alpha-based quantities."""
    data = spec.data
    if data.source == "repeated" and data.seq_len % 2:
        _fail("spec.data.seq_len", f"{data.seq_len}: repeated tokens are two equal halves, so seq_len must be even")
    other = [m for m in spec.metrics if m not in ("loss", "accuracy")]
    if other:
        _fail("spec.metrics", f"{other[0]!r}: {data.source} data are scored at their steps (loss and accuracy only)")
    if spec.measurements:
        _fail("spec.measurements", f"{data.source} data take no measurements (they read the clean run's alpha)")
    for i, condition in enumerate(spec.conditions):
        where = f"spec.conditions[{i}] ({condition.name!r})"
        if condition.sweep is not None:
            _fail(f"{where}.sweep", f"a sweep scores every query; {data.source} data are scored at their steps")
        if condition.replace_first_token is not None:
            _fail(f"{where}.replace_first_token", f"{data.source} data keep their first token")


def _is_random(condition: ConditionSpec) -> bool:
    """Whether the condition makes a seeded random choice (so several draws differ)."""
    if condition.replace_first_token == "random":
        return True
    for record in condition.interventions:
        fit = record.get("fit") if isinstance(record, dict) else None
        cls = INTERVENTIONS.get(record.get("type")) if isinstance(record, dict) else None
        if isinstance(fit, dict) and cls is not None and cls.fit_is_random(fit):
            return True
    return False


def _intervention_from_dict(record: dict, where: str):
    try:
        return Intervention.from_dict(record)
    except SinkInterpError as e:
        raise SinkInterpError(f"{where}: {e}") from None


def _check_positions(record: dict, seq_len: int, where: str) -> None:
    for key in ("position", "from_query"):
        value = record.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= seq_len:
            _fail(f"{where}.{key}", f"{value} is beyond sequences of {seq_len} tokens (positions 0..{seq_len - 1})")


def _validate_criterion(spec: ExperimentSpec, criterion: Criterion, path: str, names: list[str]) -> None:
    if criterion.kind not in CRITERION_KINDS:
        _fail(f"{path}.kind", f"unknown kind {criterion.kind!r}; allowed: {', '.join(CRITERION_KINDS)}")
    if criterion.kind == "measurement_above":
        if not spec.measurements:
            _fail(path, "measurement_above needs spec.measurements")
        if not criterion.measurement:
            _fail(f"{path}.measurement", "name the measured quantity, e.g. 'no_op_gap'")
        return
    if criterion.condition not in names:
        _fail(f"{path}.condition", f"{criterion.condition!r} is not a condition; conditions: {', '.join(names)}")
    if criterion.metric not in spec.metrics:
        _fail(f"{path}.metric", f"{criterion.metric!r} is not among spec.metrics {spec.metrics}")
    condition = next(c for c in spec.conditions if c.name == criterion.condition)
    if condition.sweep is not None:
        _fail(f"{path}.condition", f"{criterion.condition!r} is a sweep; criteria use whole conditions")
    if criterion.kind == "recovers" and condition.repairs is None:
        _fail(f"{path}.condition", f"{criterion.condition!r} repairs nothing: give it 'repairs: <condition>'")
    if criterion.kind == "exceeds_control" and not any(c.control_for == criterion.condition for c in spec.conditions):
        _fail(f"{path}.condition", f"no condition has control_for: {criterion.condition!r}")
    if criterion.kind == "ratio_below" and criterion.other not in names:
        _fail(f"{path}.other", f"{criterion.other!r} is not a condition; conditions: {', '.join(names)}")


# --------------------------------------------------------------------------------------------
# Files and built-in names


def builtin_specs() -> dict[str, Path]:
    """The specs that ship with the package, by name."""
    return {path.stem: path for path in sorted(SPEC_DIR.glob("*.yaml"))}


def load_spec(spec_or_name: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentSpec:
    """Read a YAML spec file, or a built-in spec by name (see :func:`builtin_specs`)."""
    if not isinstance(spec_or_name, (str, Path)):
        raise SinkInterpError(f"load_spec takes a spec file path or a built-in name, got {spec_or_name!r}")
    if overrides is not None and (not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides)):
        raise SinkInterpError(f"overrides must be a dict of dotted keys (e.g. {{'data.n_seqs': 8}}), got {overrides!r}")
    builtin = builtin_specs()
    path = builtin.get(str(spec_or_name), Path(spec_or_name))
    if not path.is_file():
        raise SinkInterpError(
            f"no spec file {str(spec_or_name)!r} and no built-in spec of that name; built-in: {', '.join(builtin)}"
        )
    spec = ExperimentSpec.from_dict(read_yaml_file(path))
    return spec.with_overrides(overrides) if overrides else spec


def fit_options() -> dict[str, dict[str, str]]:
    """The ``fit:`` options of every registered intervention type that takes them: type ->
    option -> what it allows."""
    return {name: {key: option.allowed for key, option in cls.FIT_OPTIONS.items()}
            for name, cls in sorted(INTERVENTIONS.items()) if cls.FIT_OPTIONS}
