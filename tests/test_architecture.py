"""The package's shape: no import cycles, no private name crossing a module, layers that only
import downwards, and the old import paths still working (with a warning naming the new one)."""

from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sinkinterp"

#: The layers, lowest first. A module may import from its own layer or any layer below it.
TIERS = [
    {"errors", "_batches", "_io", "_yaml", "_deprecated", "_registry", "backends", "sources", "tiny", "models",
     "data", "sites", "stats", "provenance"},
    {"measure"},
    {"interventions"},
    {"evaluate"},
    {"heads"},
    {"views", "figures"},
    {"experiments"},
    {"cli", "__main__", "__init__"},
]
#: Old paths kept for a release: they only forward, so they sit outside the layers.
SHIMS = {"sinkinterp.metrics", "sinkinterp.scan", "sinkinterp.experiments.stats"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(modules: dict[str, Path]) -> list[tuple[str, str, str, int]]:
    """(importer, imported module, imported name or "", line) for every import of sinkinterp in the
    package, at module level or inside a function (an import in a function still makes a cycle)."""
    found = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                if base.startswith("sinkinterp"):
                    for alias in node.names:
                        target = f"{base}.{alias.name}"
                        if target in modules:
                            found.append((name, target, "", node.lineno))
                        else:
                            found.append((name, base, alias.name, node.lineno))
            elif isinstance(node, ast.Import):
                found += [(name, a.name, "", node.lineno) for a in node.names if a.name.startswith("sinkinterp")]
    return found


def _tier(module: str) -> int:
    parts = module.split(".")
    key = "__init__" if module == "sinkinterp" else parts[1]
    for index, names in enumerate(TIERS):
        if key in names:
            return index
    raise AssertionError(f"{module} is in no layer of TIERS: add it")


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycle():
    modules = _modules()
    edges: dict[str, set[str]] = {}
    for importer, imported, _, _ in _imports(modules):
        if imported in modules and imported != importer:
            edges.setdefault(importer, set()).add(imported)
    assert _cycles(edges) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check can fail


def test_no_private_name_crosses_a_module():
    crossing = [f"{importer}:{line} imports {name} from {imported}"
                for importer, imported, name, line in _imports(_modules())
                if name.startswith("_") and imported != importer]
    assert crossing == []


def test_layers_only_import_downwards():
    modules = _modules()
    upward = []
    for importer, imported, _, line in _imports(modules):
        if importer in SHIMS or imported in SHIMS or imported == "sinkinterp" and importer == "sinkinterp":
            continue
        if _tier(imported) > _tier(importer):
            upward.append(f"{importer}:{line} (layer {_tier(importer)}) imports {imported} (layer {_tier(imported)})")
    assert upward == []
    # nothing in the package imports an old path
    assert [i for i in _imports(modules) if i[1] in SHIMS and i[0] not in SHIMS | {"sinkinterp"}] == []


OLD_PATHS = [
    ("sinkinterp.heads", "validate_heads", "sinkinterp.experiments.validation"),
    ("sinkinterp.metrics", "sink_scores", "sinkinterp.measure.sinks"),
    ("sinkinterp.metrics", "SinkReport", "sinkinterp.measure.sinks"),
    ("sinkinterp.metrics", "alpha_at", "sinkinterp.measure.common"),
    ("sinkinterp.metrics", "find_massive_activations", "sinkinterp.measure.massive"),
    ("sinkinterp.metrics", "qkv_geometry", "sinkinterp.measure.geometry"),
    ("sinkinterp.metrics", "value_weighted_attention", "sinkinterp.measure.value_weighted"),
    ("sinkinterp.metrics", "qk_massive_values", "sinkinterp.measure.qk"),
    ("sinkinterp.scan", "scan", "sinkinterp.measure.scan"),
    ("sinkinterp.scan", "ScanResult", "sinkinterp.measure.scan"),
    ("sinkinterp.scan", "package_versions", "sinkinterp.provenance"),
    ("sinkinterp.experiments.stats", "paired_difference", "sinkinterp.stats"),
    ("sinkinterp.experiments.stats", "bootstrap_statistic", "sinkinterp.stats"),
]


@pytest.mark.parametrize("old, name, new", OLD_PATHS)
def test_an_old_import_path_still_works_and_names_the_new_one(old, name, new):
    with pytest.warns(DeprecationWarning, match=rf"{old}\.{name} moved to {new}\.{name}"):
        value = getattr(importlib.import_module(old), name)
    assert value is getattr(importlib.import_module(new), name)


def test_old_paths_refuse_names_they_never_had():
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        importlib.import_module("sinkinterp.metrics").nonsense


def test_importing_the_old_scan_module_leaves_the_scan_function_in_place():
    import sinkinterp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from sinkinterp.scan import ScanResult  # noqa: F401
    assert callable(sinkinterp.scan) and sinkinterp.scan.__module__ == "sinkinterp.measure.scan"


def test_the_package_imports_without_a_deprecation_warning():
    """Nothing in the package goes through an old path (that would warn every user)."""
    import subprocess
    import sys

    code = "import warnings; warnings.simplefilter('error', DeprecationWarning); import sinkinterp, sinkinterp.cli"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_cli_defaults_are_the_functions_defaults():
    """One place per default: the CLI reads each from the function it calls."""
    import inspect

    from sinkinterp.cli import build_parser
    from sinkinterp.experiments import validate_heads
    from sinkinterp.heads import classify_heads
    from sinkinterp.measure import scan, scan_corpus

    def default(function, name):
        value = inspect.signature(function).parameters[name].default
        return list(value) if isinstance(value, tuple) else value

    scan_args = build_parser().parse_args(["scan"])
    for option, function, name in [("seq_len", scan_corpus, "seq_len"), ("n_seqs", scan_corpus, "n_seqs"),
                                   ("sampling", scan_corpus, "sampling"), ("seed", scan_corpus, "seed"),
                                   ("eps", scan, "eps"), ("batch_size", scan, "batch_size"),
                                   ("min_abs", scan, "min_abs"), ("min_ratio", scan, "min_ratio")]:
        assert getattr(scan_args, option) == default(function, name), option
    heads_args = build_parser().parse_args(["heads"])
    for option, function, name in [("seed", classify_heads, "seed"), ("n_seqs", classify_heads, "n_seqs"),
                                   ("context_lens", classify_heads, "context_lens"),
                                   ("n_prompts", classify_heads, "n_prompts"), ("depths", classify_heads, "depths"),
                                   ("batch_size", classify_heads, "batch_size"), ("k", validate_heads, "k"),
                                   ("n_random", validate_heads, "n_random"), ("ablation", validate_heads, "ablation"),
                                   ("validate_prompts", validate_heads, "n_prompts"), ("sets", validate_heads, "sets"),
                                   ("match", validate_heads, "match")]:
        assert getattr(heads_args, option) == default(function, name), option
