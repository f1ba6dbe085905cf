"""Build an RMT checkpoint folder from any supported Transformers backbone.

    python -m conversion.from_backbone BACKBONE OUTPUT_DIR --num-labels 2 --num-mem-tokens 10

The folder holds the config (with `auto_map`), the model code, safetensors weights and the
backbone's tokenizer with `model_max_length` raised for long documents, so it loads with
`AutoModelForSequenceClassification.from_pretrained(OUTPUT_DIR, trust_remote_code=True)` (or
`AutoModelForCausalLM` with `--head causal-lm` on a decoder backbone).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from modeling_rmt import RMTForCausalLM, RMTForSequenceClassification, RMTModel

HEADS = {"sequence-classification": RMTForSequenceClassification, "causal-lm": RMTForCausalLM, "base": RMTModel}

# Longest document the saved tokenizer accepts without warning; RMT itself has no length limit.
LONG_DOCUMENT_TOKENS = 2**24


def long_document_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Let the tokenizer (and `pipeline`) take whole documents: RMT segments them itself."""
    tokenizer.model_max_length = LONG_DOCUMENT_TOKENS
    tokenizer.init_kwargs.pop("max_length", None)  # a sentence-embedding default that would read as a limit
    return tokenizer


def make_like_a_new_folder(folder: Path) -> None:
    """Give a `tempfile.mkdtemp` folder (private: 0700) the permissions `mkdir` would have given it."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)


def refuse_non_empty(output_dir: Path) -> None:
    """ValueError unless `output_dir` is missing or an empty folder (checked before any work is done)."""
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise ValueError(f"Output folder {output_dir} exists and is not empty: choose a new folder (nothing written).")


def write_new_folder(output_dir: str | Path, write: Callable[[Path], None]) -> Path:
    """Run `write(folder)` into a fresh temporary folder beside `output_dir`, then rename it to
    `output_dir`: an existing non-empty folder (such as the backbone's own) is refused before anything
    is written, and a conversion that fails half-way leaves nothing behind."""
    output_dir = Path(output_dir)
    refuse_non_empty(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        write(staging)
        if output_dir.exists():
            output_dir.rmdir()  # empty (checked above)
        make_like_a_new_folder(staging)
        staging.rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def convert_backbone(
    backbone: str,
    output_dir: str | Path,
    *,
    head: str = "sequence-classification",
    **rmt_kwargs: Any,
) -> Path:
    """Wrap `backbone` with memory and save model, code and tokenizer to `output_dir` (a new or empty
    folder: nothing is ever written over)."""
    output_dir = Path(output_dir)
    refuse_non_empty(output_dir)
    model_class = HEADS[head]
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    model = model_class.from_backbone(backbone, tokenizer=tokenizer, **rmt_kwargs)

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        long_document_tokenizer(tokenizer).save_pretrained(folder)

    return write_new_folder(output_dir, write)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("backbone", help="a model id or folder of a supported encoder or decoder")
    parser.add_argument("output_dir")
    parser.add_argument("--head", choices=list(HEADS), default="sequence-classification")
    parser.add_argument("--num-labels", type=int, default=2)
    parser.add_argument("--num-mem-tokens", type=int, default=10)
    parser.add_argument("--segment-size", type=int, default=None, help="default: the most that fits")
    parser.add_argument("--bptt-depth", type=int, default=-1)
    parser.add_argument("--max-n-segments", type=int, default=None)
    args = parser.parse_args(argv)
    kwargs: dict[str, Any] = dict(
        num_mem_tokens=args.num_mem_tokens,
        segment_size=args.segment_size,
        bptt_depth=args.bptt_depth,
        max_n_segments=args.max_n_segments,
    )
    if args.head == "sequence-classification":
        kwargs["num_labels"] = args.num_labels
    out = convert_backbone(args.backbone, args.output_dir, head=args.head, **kwargs)
    print(f"saved RMT checkpoint to {out}")


if __name__ == "__main__":
    main()
