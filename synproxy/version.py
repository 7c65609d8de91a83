"""The version of synproxy that runs (`synproxy --version`, the synproxy_build_info metric)."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path


def version() -> str:
    """The version pyproject.toml gives: read from it in a source tree (the lab's image runs one, and an
    editable install's metadata may be another checkout's), else from the installed package's metadata."""
    try:
        project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
        if project.get("name") == "synproxy":
            return project["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        pass
    try:
        return importlib.metadata.version("synproxy")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (neither a source tree nor installed)"
