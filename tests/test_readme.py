"""The README cannot rot: every ```python block runs offline as written, each in a fresh process in a scratch
folder that sees the repository's `checkpoints/` (as if run from a clone's root, writing nothing into it), and
prints what its `# prints: TEXT` comments say; every ```bash block calls commands that exist with flags they
accept (`python -m MODULE` answers `--help` naming each `--flag`; pip extras and pytest markers exist). A block
preceded by `<!-- readme-test: skip (REASON) -->` is skipped with that reason."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(?P<language>\w*)\n(?P<body>.*?)^```\s*$", re.MULTILINE | re.DOTALL)
MARKER = re.compile(r"<!--\s*readme-test:(?P<rest>.*?)-->")
SKIP = re.compile(r"\s*skip\s*\((?P<reason>[^)]+)\)\s*")
PRINTS = re.compile(r"#\s*prints:\s*(?P<text>.+?)\s*$", re.MULTILINE)
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@dataclass(frozen=True)
class Block:
    language: str
    body: str
    line: int  # of the opening fence
    skip: str | None  # the marker's reason

    def __str__(self) -> str:
        return f"{self.language}-line-{self.line}"


def readme_blocks(text: str) -> list[Block]:
    """The fenced blocks of `text`, each with the reason of a skip marker on the line before it."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.fullmatch(before.strip())
        skip = None
        if marker is not None:
            reason = SKIP.fullmatch(marker["rest"])
            if reason is None:
                raise ValueError(f"README.md: a marker must read `<!-- readme-test: skip (REASON) -->`: {before!r}")
            skip = reason["reason"].strip()
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(Block(match["language"], match["body"], line, skip))
    return blocks


BLOCKS = readme_blocks(README.read_text())
PYTHON = [block for block in BLOCKS if block.language == "python"]
BASH = [block for block in BLOCKS if block.language == "bash"]


def test_the_readme_has_blocks_of_both_kinds_and_skips_few():
    assert len(PYTHON) >= 5 and len(BASH) >= 5
    assert {block.language for block in BLOCKS} <= {"python", "bash"}, "a block of another language is not checked"
    assert sum(block.skip is not None for block in BLOCKS) <= 2
    assert sum(bool(PRINTS.search(block.body)) for block in PYTHON) >= 3  # outputs checked, not only "it ran"
    markers = len(re.findall(r"^\s*<!--\s*readme-test:", README.read_text(), re.MULTILINE))  # not inline mentions
    assert markers == sum(block.skip is not None for block in BLOCKS), "a marker that is not right before a block"


def test_a_marker_skips_the_block_after_it_and_needs_a_reason():
    text = "<!-- readme-test: skip (needs a GPU) -->\n```python\nimport cuda_only\n```\n\n```bash\nls\n```\n"
    gpu, plain = readme_blocks(text)
    assert (gpu.skip, gpu.line, gpu.body) == ("needs a GPU", 2, "import cuda_only\n") and plain.skip is None
    with pytest.raises(ValueError, match="must read"):
        readme_blocks("<!-- readme-test: skip -->\n```python\npass\n```\n")


@pytest.mark.parametrize("block", PYTHON, ids=str)
def test_the_python_block_runs_offline_as_written(block, tmp_path):
    if block.skip:
        pytest.skip(block.skip)
    (tmp_path / "checkpoints").symlink_to(ROOT / "checkpoints")
    (tmp_path / "block.py").write_text(block.body)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "HF_MODULES_CACHE": str(tmp_path / "modules")}  # fmt: skip
    done = subprocess.run([sys.executable, "block.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, f"README.md line {block.line} failed:\n{done.stderr[-4000:]}"
    for expected in PRINTS.findall(block.body):
        assert expected in done.stdout, f"README.md line {block.line}: {expected!r} not in its output {done.stdout!r}"
    assert sorted(path.name for path in tmp_path.iterdir() if path.name != "modules") == ["block.py", "checkpoints"]


def commands(body: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped, `&&` chains split."""
    lines = [line.split(" #")[0] for line in body.replace("\\\n", " ").splitlines() if not line.startswith("#")]
    return [shlex.split(part) for line in lines for part in line.split("&&") if part.strip()]


@cache
def help_text(module: str, *command: str) -> str:
    done = subprocess.run([sys.executable, "-m", module, *command, "--help"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)  # fmt: skip
    assert done.returncode == 0, f"`python -m {module} {' '.join(command)} --help` failed:\n{done.stderr[-2000:]}"
    return done.stdout


def check_command(words: list[str]) -> None:
    """One command of a bash block: assert what it calls exists and accepts the flags it is given."""
    if words[0] == "pip":
        assert words[1] == "install"
        for word in words[2:]:
            if extra := re.fullmatch(r"\.\[(\w+)\]", word):
                assert extra[1] in PYPROJECT["project"]["optional-dependencies"], f"no extra {extra[1]!r}"
            elif word != "-e":
                pinned = Requirement(word)
                required = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
                spec = next(r.specifier for r in required if r.name == pinned.name)
                assert all(spec.contains(s.version) for s in pinned.specifier), f"{word} against {spec}"
        return
    if words[0] == "lm_eval":  # lm-evaluation-harness's command line (the eval extra): `lm_eval run ...`
        words = ["python", "-m", "lm_eval", *words[1:]]
    assert words[0] == "python" and words[1] == "-m", f"a command the test does not know: {shlex.join(words)}"
    module, arguments = words[2], words[3:]
    if module == "pytest":
        markers = {m.split(":")[0] for m in PYPROJECT["tool"]["pytest"]["ini_options"]["markers"]}
        for flag, value in zip(arguments, arguments[1:], strict=False):
            assert flag != "-m" or value in markers, f"no pytest marker {value!r}"
        return
    if module == "lm_eval":
        assert arguments[0] == "run", f"an lm_eval command the test does not know: {shlex.join(words)}"
        text, arguments = help_text(module, "run"), arguments[1:]
    else:
        text = help_text(module)
    for flag in (word.split("=")[0] for word in arguments if word.startswith("--")):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), f"`python -m {module}` has no {flag}"


@pytest.mark.parametrize("block", BASH, ids=str)
def test_the_bash_block_calls_commands_that_exist_with_flags_they_accept(block):
    if block.skip:
        pytest.skip(block.skip)
    for words in commands(block.body):
        check_command(words)


def test_the_command_check_catches_a_flag_that_does_not_exist():
    check_command(shlex.split("python -m model_cards.generate results.json --no-plot"))
    with pytest.raises(AssertionError, match="has no --no-such-flag"):
        check_command(shlex.split("python -m model_cards.generate results.json --no-such-flag"))
    with pytest.raises(AssertionError, match="no extra 'gpu'"):
        check_command(shlex.split('pip install -e ".[gpu]"'))
    with pytest.raises(AssertionError, match="torch==2.0.0"):
        check_command(shlex.split("pip install torch==2.0.0"))
