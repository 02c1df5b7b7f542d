"""The ``sinkinterp`` command. Each subcommand registers its arguments and its function in COMMANDS."""

from __future__ import annotations

import argparse
import sys
import time
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


def _demo(args) -> int:
    model, _ = _load_and_describe(args)
    print()
    completion = model.generate(
        args.prompt, max_new_tokens=args.max_new_tokens, do_sample=False, verbose=False
    )
    print(f"greedy completion of {args.prompt!r}:\n  {completion!r}")
    return 0


def _info_args(parser: argparse.ArgumentParser) -> None:
    _add_model_args(parser)
    parser.add_argument("--json", metavar="FILE", help="also write the info as JSON (atomically)")


def _demo_args(parser: argparse.ArgumentParser) -> None:
    _add_model_args(parser)
    parser.add_argument("--prompt", default=DEMO_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=12)


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "info": ("print a model's architecture, BOS policy and weight provenance", _info_args, _info),
    "demo": ("the main job on the embedded model (for now: info + a greedy completion)", _demo_args, _demo),
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
