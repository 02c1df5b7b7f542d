"""Provenance: which package versions, model and source commit produced a number."""

from __future__ import annotations

import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from sinkinterp.backends import Model
from sinkinterp.models import model_info

__all__ = ["package_versions", "describe_model", "git_commit"]


def package_versions() -> dict[str, str | None]:
    versions = {}
    for package in ("sinkinterp", "torch", "transformer_lens", "transformers", "numpy", "pandas"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions


def describe_model(model: Model) -> dict[str, Any]:
    """``model_info`` for models sinkinterp loaded; the config's name for any other model."""
    if getattr(model, "sinkinterp_source", None) is not None:
        return model_info(model)
    cfg = model.cfg
    return {"model": getattr(cfg, "model_name", type(model).__name__), "n_layers": cfg.n_layers,
            "n_heads": cfg.n_heads, "source": None}


def git_commit() -> dict[str, Any] | None:
    folder = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None
