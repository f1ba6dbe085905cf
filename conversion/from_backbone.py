"""Build an RMT checkpoint folder from any supported Transformers backbone.

    python -m conversion.from_backbone BACKBONE OUTPUT_DIR --num-labels 2 --num-mem-tokens 10

The folder holds the config (with `auto_map`), the model code, safetensors weights and the
backbone's tokenizer with `model_max_length` raised for long documents, so it loads with
`AutoModelForSequenceClassification.from_pretrained(OUTPUT_DIR, trust_remote_code=True)` (or
`AutoModelForCausalLM` with `--head causal-lm` on a decoder backbone).
"""

from __future__ import annotations

import argparse
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


def convert_backbone(
    backbone: str,
    output_dir: str | Path,
    *,
    head: str = "sequence-classification",
    **rmt_kwargs: Any,
) -> Path:
    """Wrap `backbone` with memory and save model, code and tokenizer to `output_dir`."""
    model_class = HEADS[head]
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    model = model_class.from_backbone(backbone, tokenizer=tokenizer, **rmt_kwargs)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    long_document_tokenizer(tokenizer).save_pretrained(output_dir)
    return output_dir


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
