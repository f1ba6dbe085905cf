"""One training step of the qa1 decoder recipe in float32 against bfloat16 mixed precision (`--bf16`).

    python benchmarks/training_precision.py [--device cpu|cuda] [--segments 3] [--repeats 3]

The model of `checkpoints/rmt-minilm-qa1`'s recipe: MiniLM (all-MiniLM-L6-v2) as a decoder, 10 memory
tokens, 128-token segments, batch 16, loss on the last 4 tokens, AdamW. Steps alternate between the two
precisions (after one warm-up step each) and each is timed; the ratio of the medians is the speed-up.
It also reports the loss of the same batch in both precisions, from the same weights, as a sanity check.
On a CPU the speed-up needs bfloat16 matrix units (AVX512-BF16 or AMX); without them bf16 can be slower.
Prints a table and writes JSON (default benchmarks/results/training_precision_<device>.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from modeling_rmt import RMTForCausalLM
from rmt_tools.backbones import minilm_path
from rmt_tools.hardware import cpu_bfloat16_is_fast, cpu_capability

RESULTS = Path(__file__).parent / "results"


def training_step(model, optimizer, batch: dict[str, torch.Tensor], bf16: bool) -> float:
    """Forward, backward and an optimizer step; returns the loss."""
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--segments", type=int, default=3)
    parser.add_argument("--segment", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    model = RMTForCausalLM.from_backbone(str(minilm_path()), num_mem_tokens=10, segment_size=args.segment)
    model.to(args.device).train()
    # A tiny learning rate: the steps barely move the weights, so every step costs the same.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-9)
    ids = torch.randint(1000, 20000, (args.batch, args.segments * args.segment), device=args.device)
    labels = torch.full_like(ids, -100)
    labels[:, -4:] = ids[:, -4:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    with torch.no_grad():
        losses = {}
        for bf16 in (False, True):
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=bf16):
                losses[bf16] = float(model(**batch).loss)
    times: dict[bool, list[float]] = {False: [], True: []}
    for bf16 in (False, True):
        training_step(model, optimizer, batch, bf16)  # warm-up
    for _ in range(args.repeats):
        for bf16 in (False, True):
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            training_step(model, optimizer, batch, bf16)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[bf16].append(time.perf_counter() - start)

    fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
    cpu = (
        {"cpu_capability": cpu_capability(), "cpu_bfloat16_fast": cpu_bfloat16_is_fast()}
        if args.device == "cpu"
        else {}
    )
    result = {
        "device": args.device, "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), **cpu,
        "batch": args.batch, "segments": args.segments, "segment": args.segment,
        "float32_step_s": times[False], "bfloat16_step_s": times[True], "speedup_median": fp32 / bf16,
        "loss_float32": losses[False], "loss_bfloat16": losses[True],
    }  # fmt: skip
    print(f"{'precision':<24}{'median step (s)':>16}{'loss':>10}")
    print(f"{'float32':<24}{fp32:>16.2f}{losses[False]:>10.4f}")
    print(f"{'bfloat16 mixed':<24}{bf16:>16.2f}{losses[True]:>10.4f}")
    print(f"speed-up (median float32 / median bfloat16): {fp32 / bf16:.2f}x")
    output = Path(args.output or RESULTS / f"training_precision_{args.device}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
