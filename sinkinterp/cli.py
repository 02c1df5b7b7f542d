"""The ``sinkinterp`` command. Each subcommand registers its arguments and its function in COMMANDS."""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import os
import sys
import time
from pathlib import Path
from typing import Callable

from sinkinterp._batches import check_int
from sinkinterp._io import (
    atomic_write_bytes,
    atomic_write_json,
    check_writable_file,
    check_writable_folder,
    slug,
)
from sinkinterp._yaml import load_yaml
from sinkinterp.backends import Model
from sinkinterp.data import SAMPLING
from sinkinterp.errors import SinkInterpError
from sinkinterp.experiments import builtin_specs, load_spec, run_experiment
from sinkinterp.experiments.report import format_verdicts
from sinkinterp.experiments.validation import validate_heads
from sinkinterp.figures import (
    figure_png,
    plot_head_classes,
    plot_intervention_effects,
    save_figures,
    scan_figures,
)
from sinkinterp.heads import (
    classify_heads,
    copying_evidence,
    qk_by_label,
)
from sinkinterp.interventions import Intervention, MaskSinkKey
from sinkinterp.measure import qkv_geometry
from sinkinterp.measure.scan import corpus_for_scan, scan, scan_corpus
from sinkinterp.models import load_model, model_info
from sinkinterp.provenance import describe_model, package_versions
from sinkinterp.views import attention_view, compare_view

__all__ = ["main"]

DEMO_PROMPT = "The capital of France is"
DEMO_VIEW_TEXT = ("The capital of France is Paris. The capital of Italy is Rome. "
                  "The capital of France is Paris.")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="'smollm2-135m' (embedded, offline), a .gguf path, or a TransformerLens name",
    )
    parser.add_argument("--backend", default="auto", choices=("auto", "hooked", "bridge"),
                        help="auto (default): HookedTransformer on TransformerLens 3.x, TransformerBridge on 4.x")


def _load_and_describe(args):
    """Load ``--model``, print its info table and load time; return the model and the info."""
    start = time.perf_counter()
    model = load_model(args.model, backend=args.backend)
    seconds = time.perf_counter() - start
    info = model_info(model)
    print(format_info(info))
    print(f"{'loaded in':<12}  {seconds:.1f} s")
    return model, info


def format_info(info: dict) -> str:
    source = info["source"]
    rows = [
        ("model", f"{info['model']} ({source['origin']}, backend {source['backend']}, {source['dtype']})"),
        ("architecture", info["architecture"]),
        ("layers", info["n_layers"]),
        ("heads", f"{info['n_heads']} query / {info['n_key_value_heads']} key-value (d_head {info['d_head']})"),
        ("d_model", f"{info['d_model']} (d_mlp {info['d_mlp']})"),
        ("n_ctx", info["n_ctx"]),
        ("vocab", info["d_vocab"]),
        ("BOS token", f"{info['bos_token']!r} (id {info['bos_token_id']})"),
        ("BOS policy", info["bos_policy"]),
        ("weights", f"{source['path'] or source['name']}"),
        ("sha256", source["sha256"] or "-"),
        ("cache", source["cache_dir"] or "-"),
    ]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def write_json_or_rescue(path, record: dict) -> None:
    """Write ``record`` to ``path`` atomically; if that fails (a full disk, a folder removed since
    the checks), save it in the temporary folder instead and say where, so the work is not lost."""
    import tempfile


    try:
        atomic_write_json(path, record)
    except OSError as e:
        fd, rescue = tempfile.mkstemp(prefix=f"sinkinterp-{Path(path).stem}-", suffix=".json")
        os.close(fd)
        atomic_write_json(rescue, record)
        raise SinkInterpError(f"cannot write {str(path)!r} ({e.strerror}); the results were saved to {rescue}") from None
    print(f"wrote {path}")


def _info(args) -> int:
    _, info = _load_and_describe(args)
    if args.json:
        write_json_or_rescue(args.json, info)
    return 0


def _first_token(value: str) -> str | int:
    """``--first-token``: 'default', 'none', 'bos', a token string, or a token id written as digits."""
    return int(value) if value.isdigit() else value


def _add_first_token_arg(target, what: str) -> None:
    """``--first-token`` on a parser or argument group; ``what`` says what it is put in front of."""
    target.add_argument("--first-token", default="default", metavar="default|none|bos|TOKEN",
                        help=f"what to put before {what}: the model's own convention (default: nothing for "
                             "SmolLM2, <bos> for Gemma-3), nothing, the BOS token, a token string or a token id")


def _scan_and_print(model: Model, args):
    """The scan's result and the tokens it measured (what ``scan_corpus`` does, keeping the tokens
    for the figures' geometry pass)."""
    tokens, spec = corpus_for_scan(model, args.text, args.n_seqs, args.seq_len, _first_token(args.first_token),
                           seed=args.seed, sampling=args.sampling)
    result = scan(model, tokens, token_spec=spec, eps=tuple(args.eps), batch_size=args.batch_size,
                  min_abs=args.min_abs, min_ratio=args.min_ratio)
    print(result.summary())
    return result, tokens


def _scan(args) -> int:
    model, _ = _load_and_describe(args)
    print()
    result, tokens = _scan_and_print(model, args)
    if args.json:
        write_json_or_rescue(args.json, result.to_dict())
    if args.figures:
        _write_figures(_scan_figure_set(model, tokens, result, args.batch_size), args.figures)
    return 0


def _scan_figure_set(model: Model, tokens, result, batch_size: int) -> dict:
    """The scan's figures, plus q/k/v norms from a geometry pass over the same tokens."""
    return scan_figures(result, qkv_geometry(model, tokens, batch_size=batch_size))


def _write_figures(figures: dict, directory) -> None:
    for path in save_figures(figures, directory):
        print(f"wrote {path}")


def _demo(args) -> int:
    import tempfile


    # Small enough for the demo's time budget: fewer sequences and a 10-step gradient fit. Checked
    # before the model loads, so a bad override fails at once.
    spec = load_spec("implicit-bias")
    overrides = {"data.n_seqs": args.experiment_seqs, "data.n_calibration": 4}
    for i, condition in enumerate(spec.conditions):
        for j, record in enumerate(condition.interventions):
            if (record.get("fit") or {}).get("method") == "gradient":
                overrides[f"conditions.{i}.interventions.{j}.fit.steps"] = 10
                overrides[f"conditions.{i}.interventions.{j}.fit.batch_size"] = 2
    spec = spec.with_overrides(overrides)
    model, _ = _load_and_describe(args)
    print()
    completion = model.generate(
        args.prompt, max_new_tokens=args.max_new_tokens, do_sample=False, verbose=False
    )
    print(f"greedy completion of {args.prompt!r}:\n  {completion!r}")
    print()
    result, tokens = _scan_and_print(model, args)
    print()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="sinkinterp-demo-"))
    figures = _scan_figure_set(model, tokens, result, args.batch_size)
    results = run_experiment(spec, out / "experiment", model=model)
    print()
    print(format_verdicts(results))
    figures["intervention_effects"] = plot_intervention_effects(results)
    _write_figures(figures, out / "figures")
    layers = result.sinks.strongest_heads(1)["layer"].tolist() + [2]
    view = attention_view(model, DEMO_VIEW_TEXT, layers=sorted(set(layers)),
                          title="sinkinterp demo: the strongest sink head's layer and layer 2")
    view.save_html(out / "attention.html")
    masked = compare_view(model, DEMO_VIEW_TEXT, [MaskSinkKey(from_query=4)], layers=layers[:1], label="sink key masked",
                          title="the strongest sink head's layer, clean vs the sink key masked")
    masked.save_html(out / "attention_masked.html")
    print(f"\ndemo outputs in {out}/:\n  attention.html, attention_masked.html (open in a browser, offline)\n"
          f"  figures/*.png ({len(figures)} figures)\n  experiment/report.md, experiment/results.json")
    return 0


def format_copying(evidence) -> str:
    """The heads with the largest direct effect on induction targets, and the medians per role."""
    columns = [c for c in ("ov_eigen", "ov_top1", "dla_induction", "dla_needle") if c in evidence]
    top = evidence.sort_values("dla_induction", ascending=False).head(10)
    lines = ["copying evidence: OV circuit W_E W_V W_O W_U (eigenvalue score, top-1 copying share) and direct "
             "logit attribution to the correct next token (held-out data)",
             "  largest direct effect on induction targets:"]
    for row in top.itertuples():
        cells = "  ".join(f"{c} {getattr(row, c):+.3f}" for c in columns)
        lines.append(f"    L{row.layer}H{row.head:<3} {row.role:<17} {cells}")
    lines.append("  medians by role:")
    for entry in evidence.attrs["by_role"]:
        cells = "  ".join(f"{c} {entry[c]:+.3f}" for c in columns)
        lines.append(f"    {entry['role']:<22} {cells}")
    return "\n".join(lines)


def _override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE (e.g. data.seq_len=64), got {text!r}")
    try:
        return key, load_yaml(value, f"--set {key}")
    except SinkInterpError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def load_plugin(path) -> None:
    """Import a Python file that registers interventions, metrics, measurements or head scorers
    (``sinkinterp run SPEC --plugin FILE``): it runs once, under a module name of its own."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".py":
        raise SinkInterpError(f"--plugin {str(path)!r} is not a Python file")
    name = f"sinkinterp_plugin_{slug(path.stem).replace('-', '_')}"
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SinkInterpError:
        del sys.modules[name]
        raise
    except Exception as e:
        del sys.modules[name]
        raise SinkInterpError(f"--plugin {str(path)!r} failed to import: {type(e).__name__}: {e}") from None


def _run(args) -> int:
    for plugin in args.plugin or ():
        load_plugin(plugin)
    if args.list:
        for name, path in builtin_specs().items():
            spec = load_spec(path)
            print(f"{name:<16} {len(spec.conditions)} conditions  {' '.join(spec.description.split())[:90]}")
        return 0
    if args.show is not None:
        return _show_spec(args)
    if args.spec is None:
        raise SinkInterpError("name a spec file or a built-in spec (see sinkinterp run --list)")
    overrides = dict(args.set or [])
    for key, value in (("model", args.model), ("backend", args.backend), ("data.n_seqs", args.n_seqs)):
        if value is not None:
            overrides[key] = value
    spec = load_spec(args.spec, overrides)
    out = Path(args.out or Path("runs") / spec.name)
    results = run_experiment(spec, out, resume=args.resume)
    print()
    print(format_verdicts(results))
    print(f"\nwrote {out}/results.json, report.md and figures")
    if args.figures:
        for path in sorted(out.glob("*.png")):  # the report's own figures, as the run wrote them
            print(f"wrote {atomic_write_bytes(Path(args.figures) / path.name, path.read_bytes())}")
        if any("metrics" in c for c in results["conditions"]):
            _write_figures({"intervention_effects": plot_intervention_effects(results)}, args.figures)
    return 0


def _show_spec(args) -> int:
    """Print a spec as a template: a built-in spec's own file (with its comments), or with --set
    overrides (or a spec file) the resolved spec, every default filled in."""
    import yaml


    if args.spec is not None:
        raise SinkInterpError(f"--show takes the spec itself (--show {args.show} or --show {args.spec}), not both")
    builtin = builtin_specs()
    overrides = dict(args.set or [])
    spec = load_spec(args.show, overrides)  # validates, and names the built-in specs if none matches
    if args.show in builtin and not overrides:
        print(builtin[args.show].read_text(encoding="utf-8"), end="")
    else:
        print(yaml.safe_dump(spec.to_dict(), sort_keys=False, allow_unicode=True), end="")
    return 0


def _threshold(text: str) -> tuple[str, float]:
    label, sep, value = text.partition("=")
    try:
        return label, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LABEL=VALUE such as recall=0.2, got {text!r}") from None


def format_heads(table, *, everything: bool = False) -> str:
    """Label counts, then one line per head that carries a label other than ``sink`` (every
    head with ``everything``)."""
    counts = table["labels"].explode().value_counts()
    lines = ["labels: " + ", ".join(f"{label} {count}" for label, count in counts.items())]
    shown = table if everything else table[table["labels"].map(lambda ls: bool(set(ls) - {"sink", "none"}))]
    columns = [c for c in ("previous_token", "duplicate", "induction", "recall", "recall_greedy", "sink",
                           "distance", "q_peak_ratio", "k_peak_ratio") if c in table.columns]
    header = f"{'head':<7}" + "".join(f"{c.replace('_', ' ')[:11]:>12}" for c in columns) + "  labels"
    lines += ["", header]
    for row in shown.itertuples(index=False):
        values = "".join(f"{getattr(row, c):>12.3f}" for c in columns)
        lines.append(f"{row.name:<7}{values}  {', '.join(row.labels)}")
    return "\n".join(lines)


def _heads(args) -> int:
    import math


    if args.validate or args.copying:  # before the model loads and the scores run, not minutes later
        check_int("--k", args.k, 1)
    if args.validate:
        check_int("--n-random", args.n_random, 1)
    if args.per_head and not args.validate:
        raise SinkInterpError("--per-head ablates heads one at a time within the causal validation: add --validate")
    model, _ = _load_and_describe(args)
    print()
    table = classify_heads(
        model, seed=args.seed, thresholds=dict(args.threshold or []) or None, n_seqs=args.n_seqs,
        context_lens=tuple(args.context_lens), n_prompts=args.n_prompts, depths=tuple(args.depths),
        greedy=not args.no_greedy,
        batch_size=args.batch_size,
    )
    print(format_heads(table, everything=args.all))
    if "greedy_reproduction_rate" in table.attrs:
        rates = ", ".join(f"{length} tokens {g['reproduction_rate']:.0%} (exact {g['exact_rate']:.0%})"
                          for length, g in table.attrs["greedy"].items())
        print(f"\ngreedy reproduction of the needle (ROUGE-1 recall of its words not in the question > 0.5): "
              f"{table.attrs['greedy_reproduction_rate']:.0%} overall; {rates}; Wu et al.'s rule (all its words): "
              f"{table.attrs['greedy_reproduction_rate_wu']:.0%}")
    qk = qk_by_label(table)
    print("\nq/k massive values by label (peak = largest dimension RMS / the head's mean):")
    print(qk.to_string(index=False, float_format=lambda x: "nan" if math.isnan(x) else f"{x:.3f}"))
    record = {
        "model": describe_model(model),
        "versions": package_versions(),
        "seed": args.seed,
        "bos_policy": "none: corpus windows, repeated random tokens and needle prompts start with content tokens",
        "heads": table.assign(labels=table["labels"].map(list)).to_dict(orient="records"),
        "attrs": table.attrs,
        "qk_by_label": qk.to_dict(orient="records"),
    }
    if args.validate:
        lens = sorted(args.context_lens)
        validation = validate_heads(model, table, k=args.k, n_random=args.n_random, ablation=args.ablation,
                                    sets=args.sets, seed=args.seed, batch_size=args.batch_size,
                                    n_prompts=args.validate_prompts, context_len=lens[len(lens) // 2],
                                    n_seqs=args.n_seqs, per_head=args.per_head, match=args.match)
        print()
        print(validation)
        record["validation"] = validation.to_dict()
    if args.copying:
        lens = sorted(args.context_lens)
        evidence = copying_evidence(model, table, k=args.k, seed=args.seed, n_seqs=args.n_seqs,
                                    n_prompts=args.validate_prompts, context_len=lens[len(lens) // 2],
                                    batch_size=args.batch_size)
        print()
        print(format_copying(evidence))
        record["copying"] = {"heads": evidence.to_dict(orient="records"), "attrs": evidence.attrs}
    figure = args.figure or (None if args.json is None else str(Path(args.json).with_suffix(".png")))
    if args.json:
        write_json_or_rescue(args.json, record)
    if not (figure or args.figures):
        return 0

    classes = plot_head_classes(table)  # drawn once for --figure and --figures
    if figure:
        atomic_write_bytes(figure, figure_png(classes))
        print(f"wrote {figure}")
    if args.figures:
        figures = {"head_classes": classes}
        if args.validate:
            figures["intervention_effects"] = plot_intervention_effects(
                validation, title=f"{args.ablation}-ablating {args.k} heads per set")
        _write_figures(figures, args.figures)
    return 0


def default_of(function, name: str):
    """The default of ``function``'s parameter ``name``: every CLI default is read from the function
    it is passed to, so each default is written in one place."""
    value = inspect.signature(function).parameters[name].default
    if value is inspect.Parameter.empty:
        raise SinkInterpError(f"{function.__name__} has no default for {name!r}")
    return list(value) if isinstance(value, tuple) else value


def flag(parser, option: str, function, name: str, *, help: str, **kwargs) -> None:
    """``parser.add_argument(option, ...)`` with the default of ``function``'s ``name`` (the help
    formatter shows it)."""
    parser.add_argument(option, default=default_of(function, name), help=help, **kwargs)


def _heads_args(parser: argparse.ArgumentParser) -> None:
    _add_model_args(parser)
    flag(parser, "--seed", classify_heads, "seed", type=int, help="seeds every data set")
    flag(parser, "--n-seqs", classify_heads, "n_seqs", type=int, help="repeated-token and text sequences")
    flag(parser, "--context-lens", classify_heads, "context_lens", type=int, nargs="+",
         help="needle prompt lengths in tokens")
    flag(parser, "--n-prompts", classify_heads, "n_prompts", type=int, help="needle prompts per context length")
    flag(parser, "--depths", classify_heads, "depths", type=float, nargs="+",
         help="needle depths in the haystack, 0 = start, 1 = end")
    parser.add_argument("--no-greedy", action="store_true", help="skip the greedy-generation recall score")
    parser.add_argument("--threshold", type=_threshold, action="append", metavar="LABEL=VALUE",
                        help="override a label's threshold, e.g. --threshold recall=0.2 (repeatable)")
    flag(parser, "--batch-size", classify_heads, "batch_size", type=int, help="sequences per forward pass")
    parser.add_argument("--all", action="store_true", help="print every head, not only the labelled ones")
    parser.add_argument("--json", metavar="OUT", help="write the table, scores and provenance as JSON (atomically)")
    parser.add_argument("--figure", metavar="PNG", help="layers x heads map of scores and labels "
                        "(default: next to --json)")
    _add_figures_arg(parser, "head_classes.png and, with --validate, intervention_effects.png")
    group = parser.add_argument_group("causal validation")
    group.add_argument("--validate", action="store_true", help="ablate top recall / induction / random heads")
    flag(group, "--k", validate_heads, "k", type=int, help="heads per ablated set")
    flag(group, "--n-random", validate_heads, "n_random", type=int, help="seeded random draws of k heads")
    flag(group, "--ablation", validate_heads, "ablation", choices=("mean", "zero"), help="what replaces a head's output")
    flag(group, "--validate-prompts", validate_heads, "n_prompts", type=int,
         help="held-out needle prompts at the median context length")
    flag(group, "--sets", validate_heads, "sets", choices=("top", "exclusive"),
         help="top-k by score, or top-k recall among non-induction heads and vice versa")
    flag(group, "--match", validate_heads, "match", choices=("layer", "none"),
         help="random sets layer-matched to the induction set, or drawn from all other heads")
    group.add_argument("--per-head", action="store_true",
                       help="with --validate: also ablate each head of the two sets alone")
    group.add_argument("--copying", action="store_true",
                       help="circuit evidence for every head: OV copying scores and direct logit attribution "
                            "on held-out induction and needle data")


def _intervention(text: str):
    try:
        return Intervention.from_dict(load_yaml(text, "--compare (a YAML/JSON intervention record)"))
    except (SinkInterpError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _view(args) -> int:
    model, _ = _load_and_describe(args)
    options = dict(layers=args.layers, heads=args.heads, hide_sink=args.hide_sink, max_tokens=args.max_tokens,
                   title=args.title or f"sinkinterp: {args.prompt[:60]}", first_token=_first_token(args.first_token))
    if args.compare:
        view = compare_view(model, args.prompt, args.compare, label=args.label, **options)
    else:
        view = attention_view(model, args.prompt, **options)
    path = view.save_html(args.out)
    print(f"\n{len(view.tokens)} tokens, {len(view.head_names)} heads: {', '.join(view.head_names[:6])}"
          f"{' ...' if len(view.head_names) > 6 else ''}")
    print(f"wrote {path} (self-contained; open it in a browser, no network needed)")
    return 0


def _view_args(parser: argparse.ArgumentParser) -> None:
    _add_model_args(parser)
    parser.add_argument("--prompt", required=True, metavar="TEXT",
                        help="the text to look at (tokenized without special tokens, after --first-token)")
    _add_first_token_arg(parser, "the text")
    parser.add_argument("--layers", type=int, nargs="+", help="layers to show (default: all)")
    parser.add_argument("--heads", type=int, nargs="+", help="heads to show in each layer (default: all)")
    parser.add_argument("--hide-sink", action="store_true",
                        help="drop the sink column and renormalise each row over the other keys")
    parser.add_argument("--compare", type=_intervention, action="append", metavar="RECORD",
                        help="show each head clean and under this intervention, e.g. "
                             "--compare '{type: MaskSinkKey, from_query: 4}' (repeatable: all apply together; "
                             "from_query must be inside the prompt)")
    parser.add_argument("--label", default="intervened", help="name of the intervened run in --compare views")
    parser.add_argument("--max-tokens", type=int, default=256, help="refuse longer prompts (default 256)")
    parser.add_argument("--title", help="page title")
    parser.add_argument("--out", required=True, metavar="FILE.html", help="where to write the page (atomically)")


def _info_args(parser: argparse.ArgumentParser) -> None:
    _add_model_args(parser)
    parser.add_argument("--json", metavar="FILE", help="also write the info as JSON (atomically)")


def _add_scan_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scan")
    group.add_argument("--text", metavar="FILE", help="UTF-8 text to scan (default: the offline corpus, pydoc_data.topics)")
    flag(group, "--seq-len", scan_corpus, "seq_len", type=int, help="tokens per sequence, first token included")
    flag(group, "--n-seqs", scan_corpus, "n_seqs", type=int, help="number of sequences")
    flag(group, "--sampling", scan_corpus, "sampling", choices=SAMPLING,
         help="seeded non-overlapping windows within documents, or consecutive chunks from the start of the text")
    flag(group, "--seed", scan_corpus, "seed", type=int, help="which windows")
    _add_first_token_arg(group, "each sequence")
    flag(group, "--eps", scan, "eps", type=float, nargs="+", help="sink-ratio thresholds in (0, 1)")
    flag(group, "--batch-size", scan, "batch_size", type=int, help="sequences per forward pass")
    flag(group, "--min-abs", scan, "min_abs", type=float, help="massive activation: |x| above this")
    flag(group, "--min-ratio", scan, "min_ratio", type=float, help="massive activation: |x| / median at least this")


def _scan_args(parser: argparse.ArgumentParser) -> None:
    _add_model_args(parser)
    _add_scan_args(parser)
    parser.add_argument("--json", metavar="OUT", help="write every number, with provenance, as JSON (atomically)")
    _add_figures_arg(parser, "first_token_share, alpha_heatmap, massive_activations and qkv_norms (.png)")


def _add_figures_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--figures", metavar="DIR", help=f"write figures as PNG into DIR: {what}")


def _report(args) -> int:
    from sinkinterp.experiments.battery import REPORT_STAGES, resolve_sizes, run_report

    stages = args.stages.split(",") if args.stages else list(REPORT_STAGES)
    unknown = [s for s in stages if s not in REPORT_STAGES]
    if unknown:
        raise SinkInterpError(f"--stages: {unknown[0]!r} is not one of {', '.join(REPORT_STAGES)}")
    overrides = dict(args.set or [])
    try:
        resolve_sizes(args.size, overrides)
    except SinkInterpError as e:
        raise SinkInterpError(f"--size / --set: {e}") from None
    out = Path(args.out) if args.out else Path("reports") / slug(args.model)
    model, _ = _load_and_describe(args)
    start = time.perf_counter()
    report = run_report(model, out, size=args.size, overrides=overrides, stages=stages, resume=args.resume)
    seconds = time.perf_counter() - start
    per_stage = ", ".join(f"{name} {stage['seconds']:.0f} s" for name, stage in report["stages"].items())
    print(f"\nreport in {seconds:.0f} s ({per_stage})")
    print(f"wrote {out / 'report.html'} and {out / 'report.json'}")
    return 0


def _report_args(parser: argparse.ArgumentParser) -> None:
    _add_model_args(parser)
    parser.add_argument("--out", metavar="DIR", help="the report's folder (default reports/<model>)")
    parser.add_argument("--size", default="laptop", help="size preset: 'laptop' (the built-in specs on 8 evaluation "
                        "sequences, 30-step gradient fits) or 'quick' (a smoke run)")
    parser.add_argument("--set", type=_override, action="append", metavar="KEY=VALUE",
                        help="override one size of the preset, e.g. --set seq_len=64 (repeatable; keys: scan_seqs, "
                        "seq_len, experiment_seqs, calibration_seqs, gradient_steps, formation_seqs, heads_seqs, "
                        "heads_prompts, heads_context, n_resamples)")
    parser.add_argument("--stages", metavar="A,B", help="comma-separated subset of: scan, implicit-bias, no-op, "
                        "formation, heads, stand-ins (default: all)")
    parser.add_argument("--resume", action="store_true", help="reuse the stages already saved in --out with the same "
                        "model and sizes; experiments also resume per condition")


def _demo_args(parser: argparse.ArgumentParser) -> None:
    _add_model_args(parser)
    parser.add_argument("--prompt", default=DEMO_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    _add_scan_args(parser)
    group = parser.add_argument_group("experiment")
    group.add_argument("--experiment-seqs", type=int, default=8,
                       help="evaluation sequences of the small implicit-bias experiment (default 8)")
    group.add_argument("--out", metavar="DIR", help="where the views, figures and experiment go "
                       "(default: a new temporary folder)")


def _run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", metavar="SPEC_OR_NAME", help="a YAML spec file or a built-in spec name")
    parser.add_argument("--list", action="store_true", help="list the built-in specs and exit")
    parser.add_argument("--show", metavar="NAME", help="print a built-in spec (or a spec file) as a template and "
                        "exit; with --set, the resolved spec with those overrides")
    parser.add_argument("--out", metavar="DIR", help="results folder (default runs/<spec name>)")
    parser.add_argument("--model", help="override the spec's model")
    parser.add_argument("--backend", choices=("auto", "hooked", "bridge"), help="override the spec's backend")
    parser.add_argument("--n-seqs", type=int, help="override data.n_seqs (evaluation sequences)")
    parser.add_argument("--set", type=_override, action="append", metavar="KEY=VALUE",
                        help="override any spec key, e.g. --set data.seq_len=64 (repeatable)")
    parser.add_argument("--plugin", action="append", metavar="FILE.py",
                        help="import a Python file first: it may register intervention types and metrics the spec uses")
    parser.add_argument("--resume", action="store_true", help="continue a run in --out, skipping finished conditions")
    _add_figures_arg(parser, "the report's figures and intervention_effects.png")


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "info": ("print a model's architecture, BOS policy and weight provenance", _info_args, _info),
    "scan": ("measure attention sinks and massive activations on corpus text", _scan_args, _scan),
    "run": ("run a hypothesis experiment from a spec file or a built-in spec", _run_args, _run),
    "view": ("write a self-contained HTML page of attention patterns (circuitsvis), heads named with "
             "their sink score", _view_args, _view),
    "heads": ("score and label every head (sink, previous-token, duplicate, induction, recall), with q/k "
              "massive values and an optional causal validation", _heads_args, _heads),
    "report": ("the whole battery on one model (scan, both hypotheses, formation, heads, stand-ins) at laptop "
               "sizes, as one self-contained HTML page and its JSON, with resume", _report_args, _report),
    "demo": ("the main job on the embedded model: info, a greedy completion, the scan summary, a small "
             "implicit-bias experiment, attention views and figures", _demo_args, _demo),
}


class _DefaultsHelp(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the text already names it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" not in text and action.default not in (None, False, argparse.SUPPRESS)
                and action.option_strings):
            default = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
            text += f" (default: {default})"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sinkinterp",
        description="Attention sinks and massive activations in TransformerLens models.",
        epilog="Run times measured on 2 CPU cores with SmolLM2-135M and a warm weight cache (TransformerLens 4.3): "
               "info 10 s, view 11 s, scan 20 s, demo 50 s, run massive 113 s / implicit-bias 92 s / no-op 272 s, "
               "report (laptop size) 12-15 min (Gemma-3-270M: 29 min), heads 16 min (6 min on TransformerLens 3.9's HookedTransformer, which has a KV cache for the "
               "greedy decoding; --validate --per-head --copying add about 6 min there). The first load converts the model into the cache (SmolLM2 25 s, Gemma-3 77-95 s).",
        formatter_class=_DefaultsHelp,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text, formatter_class=_DefaultsHelp))
    return parser


#: Output arguments per command, checked before any work: (attribute, flag, kind, suffixes).
OUTPUTS = {
    "info": [("json", "--json", "file", (".json",))],
    "scan": [("json", "--json", "file", (".json",)), ("figures", "--figures", "folder", ())],
    "run": [("out", "--out", "folder", ()), ("figures", "--figures", "folder", ())],
    "view": [("out", "--out", "file", (".html", ".htm"))],
    "heads": [("json", "--json", "file", (".json",)), ("figure", "--figure", "file", (".png",)),
              ("figures", "--figures", "folder", ())],
    "demo": [("out", "--out", "folder", ())],
    "report": [("out", "--out", "folder", ())],
}


def _check_text_args(argv: list[str]) -> None:
    """Arguments that are not valid UTF-8 (undecodable bytes arrive as lone surrogates) would fail
    only when a title or a path is finally written: refuse them first."""
    for i, arg in enumerate(argv):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            flag = next((a for a in reversed(argv[:i]) if a.startswith("--")), "an argument")
            raise SinkInterpError(f"{flag}: argument {arg.encode('utf-8', 'backslashreplace').decode()!r} "
                                  "is not valid UTF-8 text") from None


def check_outputs(args) -> None:
    """Refuse unwritable outputs before the model loads and the work starts, not after."""
    for attr, flag, kind, suffixes in OUTPUTS.get(args.command, []):
        value = getattr(args, attr, None)
        if value is None:
            continue
        if kind == "file":
            check_writable_file(value, flag, suffixes)
        else:
            check_writable_folder(value, flag)  # also refuses a file in the way


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        _check_text_args(argv)
    except SinkInterpError as e:
        print(f"sinkinterp: error: {e}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        check_outputs(args)
        return COMMANDS[args.command][2](args)
    except SinkInterpError as e:
        print(f"sinkinterp: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        # A disk that fills up or a folder that vanishes after the checks above.
        where = f" {e.filename!r}" if e.filename else ""
        print(f"sinkinterp: error: cannot write{where}: {e.strerror or e}. Finished experiment conditions are "
              "kept in their folder (sinkinterp run ... --resume reuses them)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Every file is written atomically, so what is on disk is whole; `run --resume` continues.
        print("sinkinterp: interrupted; finished results are saved (sinkinterp run ... --resume continues)",
              file=sys.stderr)
        return 130
