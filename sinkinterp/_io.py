"""Atomic file writing: a crash leaves either the old file or the new one, never half of one.

Also: strict JSON (non-finite floats become null, so every file is valid JSON), checksummed
records that can be verified when read back, and an exclusive lock on an output folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sinkinterp.errors import SinkInterpError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a results file is as readable as any other
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # BaseException too: a Ctrl-C mid-write must not leave the temporary file behind.
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def strict_json(data: Any) -> Any:
    """``data`` with every NaN / inf float replaced by None (JSON has no such numbers; Python's
    json module would write bare ``NaN``, which other readers reject)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: strict_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(v) for v in data]
    return data


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(strict_json(data), indent=2, sort_keys=False, allow_nan=False) + "\n")


def _digest(record: dict) -> str:
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_record(path: str | os.PathLike, record: dict) -> dict:
    """Write ``record`` atomically with a ``checksum`` of its content; return it as read back."""
    body = strict_json({k: v for k, v in record.items() if k != "checksum"})
    atomic_write_json(path, {**body, "checksum": _digest(body)})
    return read_record(path)[0]


def read_record(path: str | os.PathLike) -> tuple[dict | None, str]:
    """``(record, "")`` if ``path`` holds a record written by :func:`write_record` whose checksum
    verifies; otherwise ``(None, why)``: missing, unreadable, not UTF-8, not JSON, not an object,
    no checksum, or edited since it was written."""
    path = Path(path)
    if not path.exists():
        return None, "missing"
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        return None, f"unreadable ({e.strerror})"
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except json.JSONDecodeError as e:
        return None, f"not JSON ({e.msg} at line {e.lineno})"
    if not isinstance(record, dict):
        return None, f"not a record (a JSON {type(record).__name__})"
    checksum = record.pop("checksum", None)
    if checksum is None:
        return None, "has no checksum"
    try:
        digest = _digest(record)
    except ValueError:
        return None, "holds non-finite numbers"
    if checksum != digest:
        return None, "does not match its checksum (edited or damaged since it was written)"
    return record, ""


@contextlib.contextmanager
def locked_folder(folder: str | os.PathLike, what: str = "run") -> Iterator[Path]:
    """Hold an exclusive lock on ``folder/.lock`` (created with the folder) for the block, so two
    runs cannot write into one folder at once. The lock is the operating system's (``flock``): it
    goes with the process, so a killed run leaves no stale lock."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / ".lock", "a+")
    except OSError as e:
        raise SinkInterpError(f"cannot create or lock the output folder {str(folder)!r}: {e.strerror}") from None
    try:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock to take (documented)
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise SinkInterpError(
                    f"{folder} is in use by another {what} ({holder}): wait for it, or use another --out") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}")
            handle.flush()
        yield folder
    finally:
        handle.close()


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        if path.parent == path:
            break
        path = path.parent
    return path


def check_writable_folder(folder: str | os.PathLike, flag: str, shown: str | os.PathLike | None = None) -> Path:
    """Refuse, before any work, an output folder that cannot be written: a file is in the way, or the
    nearest existing folder is read-only. Checked by writing (and removing) a probe file there.
    ``shown``: the path to name in the message (the file, when checking a file's folder)."""
    folder = Path(folder)
    shown = str(folder if shown is None else shown)
    base = _existing_ancestor(folder)
    if not base.is_dir():
        raise SinkInterpError(f"{flag} {shown!r}: {str(base)!r} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".sinkinterp-probe-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SinkInterpError(f"{flag} {shown!r} cannot be written ({str(base)!r}: {e.strerror})") from None
    return folder


def check_writable_file(path: str | os.PathLike, flag: str, suffixes: tuple[str, ...] = ()) -> Path:
    """Refuse, before any work, an output file path that cannot be written (a folder of that name,
    a wrong suffix, a read-only or missing-and-uncreatable folder)."""
    path = Path(path)
    if suffixes and path.suffix.lower() not in suffixes:
        raise SinkInterpError(f"{flag} must name a file ending in {' or '.join(suffixes)}, got {str(path)!r}")
    if path.is_dir():
        raise SinkInterpError(f"{flag} {str(path)!r} is a folder: give a file name")
    check_writable_folder(path.parent, flag, shown=path)
    if path.exists() and not os.access(path, os.W_OK):
        raise SinkInterpError(f"{flag} {str(path)!r} exists and is read-only")
    return path


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60] or "condition"
