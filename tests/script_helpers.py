"""The project's scripts (tools/, benchmarks/) as modules, for tests that call their functions."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(relpath: str) -> ModuleType:
    """A fresh module of the script at ``relpath`` (from the repository root), e.g. ``tools/sample.py``."""
    path = REPO / relpath
    spec = importlib.util.spec_from_file_location(f"{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    sys.path.insert(0, str(path.parent))  # as when run: the script's own folder is importable (benchmarks/timing.py)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py`` as a fresh module."""
    return load_script(f"tools/{name}.py")
