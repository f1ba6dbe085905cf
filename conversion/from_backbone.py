"""Build an RMT checkpoint folder from any supported Transformers backbone.

    python -m conversion.from_backbone BACKBONE OUTPUT_DIR --num-labels 2 --num-mem-tokens 10

    python -m conversion.from_backbone BACKBONE OUTPUT_DIR --head causal-lm --memory-type armt --armt-d-mem 64

The folder holds the config (with `auto_map`), the model code, safetensors weights and the
backbone's tokenizer with `model_max_length` raised for long documents, so it loads with
`AutoModelForSequenceClassification.from_pretrained(OUTPUT_DIR, trust_remote_code=True)` (or
`AutoModelForCausalLM` with `--head causal-lm` on a decoder backbone).
"""

from __future__ import annotations

import argparse
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from modeling_rmt import RMTForCausalLM, RMTForSequenceClassification, RMTModel
from modeling_rmt.configuration_rmt import LONG_DOCUMENT_TOKENS  # the saved tokenizers' model_max_length

HEADS = {"sequence-classification": RMTForSequenceClassification, "causal-lm": RMTForCausalLM, "base": RMTModel}


def count(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum`, refused with a one-line message otherwise."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def run_or_exit(parser: argparse.ArgumentParser, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`function(*args, **kwargs)`; a refused value or an unreadable input (ValueError, OSError, an unpickling
    error) ends the program with one line, `PROG: error: ...`, and status 1 instead of a traceback."""
    try:
        return function(*args, **kwargs)
    except (ValueError, OSError, pickle.UnpicklingError) as error:
        parser.exit(1, f"{parser.prog}: error: {' '.join(str(error).split())}\n")


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
    is written, a conversion that fails half-way leaves nothing behind, and files that appear in
    `output_dir` meanwhile are never written over or removed (the rename is refused)."""
    output_dir = Path(output_dir)
    refuse_non_empty(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        write(staging)
        make_like_a_new_folder(staging)
        try:  # replaces a missing or empty folder in one step, and fails if files appeared in it meanwhile
            os.rename(staging, output_dir)
        except OSError as error:
            raise ValueError(
                f"Output folder {output_dir} changed while writing ({error.strerror}): it is left as it was and "
                "nothing was written; choose a new folder."
            ) from None
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
    parser.add_argument("--num-labels", type=count(1), default=None, help="sequence-classification only (default 2)")
    parser.add_argument("--num-mem-tokens", type=count(1), default=10)
    parser.add_argument("--segment-size", type=count(1), default=None, help="default: the most that fits")
    parser.add_argument("--bptt-depth", type=count(-1), default=-1, help="-1: full backpropagation through time")
    parser.add_argument("--max-n-segments", type=count(1), default=None)
    parser.add_argument("--memory-type", choices=["rmt", "armt"], default="rmt")
    armt = parser.add_argument_group("ARMT memory (with --memory-type armt)")
    armt.add_argument("--armt-d-mem", type=count(1), default=None, help="key size before DPFP (default 64)")
    armt.add_argument("--armt-num-heads", type=count(1), default=None, help="memory heads (default 1)")
    armt.add_argument("--armt-correction", action=argparse.BooleanOptionalAction, default=None,
                      help="gamma correction of the normaliser (default: on)")  # fmt: skip
    armt.add_argument("--armt-normalize-features", action=argparse.BooleanOptionalAction, default=None,
                      help="L2-normalise the key features, as the authors' code does (default: off)")  # fmt: skip
    args = parser.parse_args(argv)
    kwargs: dict[str, Any] = dict(
        num_mem_tokens=args.num_mem_tokens,
        segment_size=args.segment_size,
        bptt_depth=args.bptt_depth,
        max_n_segments=args.max_n_segments,
        memory_type=args.memory_type,
    )
    armt_options = {name: value for name, value in vars(args).items() if name.startswith("armt_") and value is not None}
    if armt_options and args.memory_type != "armt":
        given = ", ".join("--" + name.replace("_", "-") for name in armt_options)
        parser.error(f"{given} configure an ARMT memory: add --memory-type armt, or drop them")
    kwargs.update(armt_options)
    if args.head == "sequence-classification":
        kwargs["num_labels"] = 2 if args.num_labels is None else args.num_labels
    elif args.num_labels is not None:
        parser.error(f"--num-labels is for --head sequence-classification, not {args.head}")
    out = run_or_exit(parser, convert_backbone, args.backbone, args.output_dir, head=args.head, **kwargs)
    print(f"saved RMT checkpoint to {out}")


if __name__ == "__main__":
    main()
