"""The ``sinkinterp`` command. Each subcommand registers its arguments and its function in COMMANDS."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

from sinkinterp.errors import SinkInterpError

__all__ = ["main"]

DEMO_PROMPT = "The capital of France is"


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="'smollm2-135m' (embedded, offline), a .gguf path, or a TransformerLens name",
    )
    parser.add_argument("--backend", default="hooked", choices=("hooked", "bridge"))


def _load_and_describe(args):
    """Load ``--model``, print its info table and load time; return the model and the info."""
    from sinkinterp.models import load_model, model_info

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


def _info(args) -> int:
    from sinkinterp._io import atomic_write_json

    _, info = _load_and_describe(args)
    if args.json:
        atomic_write_json(args.json, info)
        print(f"wrote {args.json}")
    return 0


def _first_token(value: str) -> str | int:
    """``--first-token``: 'none', 'bos', a token string, or a token id written as digits."""
    return int(value) if value.isdigit() else value


def _scan_and_print(model, args):
    from sinkinterp.scan import scan_corpus

    result = scan_corpus(
        model,
        text_file=args.text,
        n_seqs=args.n_seqs,
        seq_len=args.seq_len,
        first_token=_first_token(args.first_token),
        eps=tuple(args.eps),
        batch_size=args.batch_size,
        min_abs=args.min_abs,
        min_ratio=args.min_ratio,
    )
    print(result.summary())
    return result


def _scan(args) -> int:
    from sinkinterp._io import atomic_write_json

    model, _ = _load_and_describe(args)
    print()
    result = _scan_and_print(model, args)
    if args.json:
        atomic_write_json(args.json, result.to_dict())
        print(f"wrote {args.json}")
    return 0


def _demo(args) -> int:
    import tempfile

    from sinkinterp.experiments import load_spec, run_experiment

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
    _scan_and_print(model, args)
    print()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="sinkinterp-demo-"))
    results = run_experiment(spec, out, model=model)
    print()
    print(format_verdicts(results))
    print(f"\nreport: {out / 'report.md'}")
    return 0


def format_verdicts(results: dict) -> str:
    """Each hypothesis's verdict, with the criteria behind it, from a results record."""
    from sinkinterp.experiments.report import _est

    lines = []
    for verdict in results["verdicts"]:
        lines.append(f"{verdict['hypothesis']}: {verdict['verdict'].upper()}")
        for r in verdict["criteria"]:
            subject = f"{r['condition']}: " if r["condition"] else ""
            lines.append(f"  {r['outcome']:<12} {subject}{r['quantity']} = {_est(r['estimate'])} "
                         f"(rule: {r['rule']}, threshold {r['threshold']:g})")
    return "\n".join(lines)


def _override(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set takes KEY=VALUE (e.g. data.seq_len=64), got {text!r}")
    return key, yaml.safe_load(value)


def _run(args) -> int:
    from sinkinterp.experiments import builtin_specs, load_spec, run_experiment

    if args.list:
        for name, path in builtin_specs().items():
            spec = load_spec(path)
            print(f"{name:<16} {len(spec.conditions)} conditions  {' '.join(spec.description.split())[:90]}")
        return 0
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
    return 0


def _info_args(parser: argparse.ArgumentParser) -> None:
    _add_model_args(parser)
    parser.add_argument("--json", metavar="FILE", help="also write the info as JSON (atomically)")


def _add_scan_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scan")
    group.add_argument("--text", metavar="FILE", help="UTF-8 text to scan (default: the offline corpus, pydoc_data.topics)")
    group.add_argument("--seq-len", type=int, default=64, help="tokens per sequence, first token included (default 64)")
    group.add_argument("--n-seqs", type=int, default=32, help="number of sequences (default 32)")
    group.add_argument(
        "--first-token", default="none", metavar="none|bos|TOKEN",
        help="what to put first: nothing (default), the BOS token, a token string or a token id",
    )
    group.add_argument("--eps", type=float, nargs="+", default=[0.3, 0.8], help="sink-ratio thresholds in (0, 1)")
    group.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    group.add_argument("--min-abs", type=float, default=100.0, help="massive activation: |x| above this")
    group.add_argument("--min-ratio", type=float, default=1000.0, help="massive activation: |x| / median at least this")


def _scan_args(parser: argparse.ArgumentParser) -> None:
    _add_model_args(parser)
    _add_scan_args(parser)
    parser.add_argument("--json", metavar="OUT", help="write every number, with provenance, as JSON (atomically)")


def _demo_args(parser: argparse.ArgumentParser) -> None:
    _add_model_args(parser)
    parser.add_argument("--prompt", default=DEMO_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    _add_scan_args(parser)
    group = parser.add_argument_group("experiment")
    group.add_argument("--experiment-seqs", type=int, default=8,
                       help="evaluation sequences of the small implicit-bias experiment (default 8)")
    group.add_argument("--out", metavar="DIR", help="where the experiment writes (default: a new temporary folder)")


def _run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", nargs="?", metavar="SPEC_OR_NAME", help="a YAML spec file or a built-in spec name")
    parser.add_argument("--list", action="store_true", help="list the built-in specs and exit")
    parser.add_argument("--out", metavar="DIR", help="results folder (default runs/<spec name>)")
    parser.add_argument("--model", help="override the spec's model")
    parser.add_argument("--backend", choices=("hooked", "bridge"), help="override the spec's backend")
    parser.add_argument("--n-seqs", type=int, help="override data.n_seqs (evaluation sequences)")
    parser.add_argument("--set", type=_override, action="append", metavar="KEY=VALUE",
                        help="override any spec key, e.g. --set data.seq_len=64 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue a run in --out, skipping finished conditions")


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "info": ("print a model's architecture, BOS policy and weight provenance", _info_args, _info),
    "scan": ("measure attention sinks and massive activations on corpus text", _scan_args, _scan),
    "run": ("run a hypothesis experiment from a spec file or a built-in spec", _run_args, _run),
    "demo": ("the main job on the embedded model: info, a greedy completion, the scan summary and a small "
             "implicit-bias experiment", _demo_args, _demo),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sinkinterp",
        description="Attention sinks and massive activations in TransformerLens models.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][2](args)
    except SinkInterpError as e:
        print(f"sinkinterp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Every file is written atomically, so what is on disk is whole; `run --resume` continues.
        print("sinkinterp: interrupted; finished results are saved (sinkinterp run ... --resume continues)",
              file=sys.stderr)
        return 130
