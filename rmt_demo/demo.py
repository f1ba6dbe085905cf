"""Main demo: the trained rmt-minilm finds one fact hidden in a 100k-token document.

    python -m rmt_demo [--tokens 100000] [--seed 0]

It loads the committed checkpoint `checkpoints/rmt-minilm` (all-MiniLM-L6-v2 with 10 memory tokens,
trained on the memorize and detect & memorize tasks) through `pipeline("text-classification",
trust_remote_code=True)`, hides "<name> <went to> the <place>." at a random sentence boundary of a
document of public-domain text it never saw in training (Milton, Project Gutenberg), asks "Where is
<name>?" at the end and prints the answer, the truth, the time and the peak memory. A progress bar counts
the segments as the backbone reads them.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import pipeline  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from rmt_training.tasks import NAMES, PLACES, VERBS, TokenizedNoise, make_sample  # noqa: E402

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "rmt-minilm"
DEMO_SEED = 7_000_001  # documents no training or evaluation run used


def synthetic_document(num_tokens: int, tokenizer, seed: int = 0) -> str:
    """bAbI-style sentences until the document holds at least `num_tokens` backbone tokens."""
    rng = random.Random(seed)
    sentences = [f"{rng.choice(NAMES)} {rng.choice(VERBS)} the {rng.choice(PLACES)}." for _ in range(64)]
    tokens_per_block = len(tokenizer(" ".join(sentences), add_special_tokens=False).input_ids)
    blocks = [" ".join(rng.sample(sentences, len(sentences))) for _ in range(num_tokens // tokens_per_block + 1)]
    return " ".join(blocks) + " Where is Mary?"


@contextmanager
def segment_progress(model: nn.Module, segments: int) -> Iterator[tqdm]:
    """A progress bar over `segments`: a forward pre-hook on the model's backbone advances it once per
    backbone call, i.e. once per segment (the recurrence runs the backbone on one segment at a time)."""
    bar = tqdm(total=segments, unit="segment", desc="reading", dynamic_ncols=True)

    def advance(*_: object) -> None:  # returns None: a pre-hook's result would replace the backbone's inputs
        bar.update(1)

    hook = model.backbone.register_forward_pre_hook(advance)
    try:
        yield bar
    finally:
        hook.remove()
        bar.close()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=100_000, help="document length in backbone tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", choices=["detect_memorize", "memorize"], default="detect_memorize")
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if not Path(args.checkpoint, "config.json").is_file():
        raise SystemExit(f"No checkpoint at {args.checkpoint}: pass --checkpoint FOLDER (a trained RMT classifier).")

    classifier = pipeline(
        "text-classification", model=args.checkpoint, trust_remote_code=True, device="cpu", dtype=torch.float32
    )  # the weights are stored in float16; CPUs compute in float32
    tokenizer, config = classifier.tokenizer, classifier.model.config
    sample = make_sample(args.task, TokenizedNoise(tokenizer, "milton"), tokenizer, args.tokens, DEMO_SEED, args.seed)
    document = f"{sample.input} {sample.question}"
    fact = sample.facts[0]
    where = sample.input.index(fact) / len(sample.input)
    tokens = len(tokenizer(document, add_special_tokens=False).input_ids)  # what the pipeline will read
    segments = -(-tokens // config.segment_size)
    print(f"model: {args.checkpoint} (all-MiniLM-L6-v2, {config.num_mem_tokens} memory tokens, "
          f"{config.segment_size} tokens per segment)")  # fmt: skip
    print(f"document: {tokens:,} tokens -> {segments:,} segments, Milton's prose and verse")
    print(f"hidden fact: {fact!r} at {where:.0%} of the document; question: {sample.question!r}", flush=True)
    rss_before = peak_rss_mib()
    start = time.perf_counter()
    with segment_progress(classifier.model, segments):
        best = classifier(document)[0]
    seconds = time.perf_counter() - start
    verdict = "correct" if best["label"] == sample.target else f"wrong, the answer is {sample.target}"
    print(f"answer: {best['label']} (score {best['score']:.3f}): {verdict}")
    print(f"time: {seconds:.1f} s ({tokens / seconds:,.0f} tokens/s)")
    print(f"peak RSS: {peak_rss_mib():,.0f} MiB (before the call: {rss_before:,.0f} MiB)")


if __name__ == "__main__":
    main()
