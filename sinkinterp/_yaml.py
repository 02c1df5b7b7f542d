"""YAML for specs and command-line records, read strictly.

PyYAML's safe loader still expands aliases (a few hundred bytes of nested ``*a`` references
become gigabytes before any check runs) and lets a repeated key silently replace the first. Specs
need neither, so both are refused, as are files over :data:`MAX_BYTES` and text that is not UTF-8.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from sinkinterp.errors import SinkInterpError

__all__ = ["load_yaml", "read_yaml_file", "check_finite", "MAX_BYTES"]

#: Largest spec file read (a spec is a few kilobytes).
MAX_BYTES = 1024 * 1024


def _loader(what: str):
    class StrictLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise SinkInterpError(
                    f"{what}: YAML aliases are not allowed (*{event.anchor} at line {event.start_mark.line + 1}): "
                    "write the value out")
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise SinkInterpError(
                        f"{what}: key {key!r} appears twice in one mapping (line {key_node.start_mark.line + 1}); "
                        "YAML would silently keep the last")
                seen.add(key)
            return super().construct_mapping(node, deep)

    return StrictLoader


def check_finite(value: Any, what: str, where: str = "") -> None:
    """Refuse NaN and inf anywhere in nested plain data, naming the key."""
    if isinstance(value, float) and not math.isfinite(value):
        raise SinkInterpError(f"{what}: {where or 'the value'} is {value!r}: only finite numbers are allowed")
    if isinstance(value, dict):
        for key, item in value.items():
            check_finite(item, what, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_finite(item, what, f"{where}[{i}]")


def load_yaml(text: str, what: str) -> Any:
    """Parse ``text`` (``what`` names it in errors): no aliases, no repeated keys, finite numbers."""
    try:
        value = yaml.load(text, Loader=_loader(what))  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise SinkInterpError(f"{what} is not valid YAML: {' '.join(str(e).split())}") from None
    check_finite(value, what)
    return value


def read_yaml_file(path: str | Path) -> Any:
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise SinkInterpError(f"{path} is {size:,} bytes: a spec is at most {MAX_BYTES:,}")
        data = path.read_bytes()
    except OSError as e:
        raise SinkInterpError(f"cannot read {str(path)!r}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SinkInterpError(f"{path} is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") from None
    return load_yaml(text, str(path))
