"""The repository's layers: `modeling_rmt/` holds the Hub files and `__init__.py` only, and no package imports one
above it (the library, then conversion, then training, then the demo, cards and benchmarks)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from conversion.export import HUB_FILES

ROOT = Path(__file__).resolve().parents[1]
# Each top-level package and the packages of this project it may import.
MAY_IMPORT = {
    "modeling_rmt": set(),
    "rmt_tools": set(),
    "conversion": {"modeling_rmt", "rmt_tools"},
    "rmt_training": {"modeling_rmt", "rmt_tools", "conversion"},
    "rmt_demo": {"modeling_rmt", "rmt_tools", "rmt_training"},
    "model_cards": {"modeling_rmt", "rmt_tools", "conversion", "rmt_training"},
    "benchmarks": {"modeling_rmt", "rmt_tools", "conversion", "rmt_training", "rmt_demo"},
}
# Known upward imports, inside a function: `evaluate_lengths --plot` draws with the card generator's plot.
KNOWN = {("rmt_training/evaluate_lengths.py", "model_cards")}


def imported_packages(path: Path) -> set[str]:
    """The top-level packages `path` imports by absolute name."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_library_folder_holds_only_the_hub_files_and_its_init():
    package = ROOT / "modeling_rmt"
    entries = {p.name for p in package.iterdir() if p.name != "__pycache__"}
    assert entries == {*HUB_FILES, "__init__.py"}, "training, tools and the like live in packages of their own"
    allowed = {"torch", "transformers", "modeling_rmt", *sys.stdlib_module_names}
    for path in package.glob("*.py"):
        assert imported_packages(path) <= allowed, f"{path.name} imports {imported_packages(path) - allowed}"


def test_no_package_imports_one_above_it():
    for package, allowed in MAY_IMPORT.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            ours = imported_packages(path) & set(MAY_IMPORT) - {package}
            relative = path.relative_to(ROOT).as_posix()
            upward = {name for name in ours - allowed if (relative, name) not in KNOWN}
            assert not upward, f"{relative} imports {sorted(upward)}, above {package}"
