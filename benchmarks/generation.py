"""RMTForCausalLM.generate against the bare backbone's generate, and long-prompt prefill.

    python benchmarks/generation.py [--device cpu|cuda] [--dtype float32|bfloat16] [--prefill-tokens 100000]

A randomly initialised GPT-2-shaped decoder (no pretrained decoder is available offline; speed does
not depend on the weights). Three measurements, side by side in one run:
- decode throughput: the same prompt (inside one segment) and the same number of new tokens, long
  enough to cross several segment boundaries, for RMT and for the bare backbone (whose context just
  grows); the ratio RMT / bare;
- per-token latency of RMT decoding (p50, p99, and at the steps that cross a segment boundary);
- prefill throughput of RMT on a prompt of `--prefill-tokens` tokens (the bare backbone cannot take it).
Prints a table and writes JSON (default benchmarks/results/generation_<device>.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as hf_logging

from modeling_rmt import RMTConfig, RMTForCausalLM

RESULTS = Path(__file__).parent / "results"


class TokenClock(BaseStreamer):
    """Records the time at which each new token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.calls = 0

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls > 1:  # the first call carries the prompt
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def build(args: argparse.Namespace) -> tuple[RMTForCausalLM, torch.nn.Module]:
    torch.manual_seed(0)
    text_config = AutoConfig.for_model(
        "gpt2", vocab_size=args.vocab, n_embd=args.hidden, n_layer=args.layers, n_head=args.heads,
        n_positions=args.segment + 2 * args.memory + args.new_tokens + args.prompt_tokens, eos_token_id=None,
    )  # fmt: skip
    config = RMTConfig(text_config=text_config, num_mem_tokens=args.memory, segment_size=args.segment)
    dtype = getattr(torch, args.dtype)
    rmt = RMTForCausalLM(config).to(device=args.device, dtype=dtype).eval()
    bare = AutoModelForCausalLM.from_config(text_config).to(device=args.device, dtype=dtype).eval()
    bare.load_state_dict(rmt.backbone.state_dict())
    return rmt, bare


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_generate(model, prompt: torch.Tensor, new_tokens: int, device: str) -> tuple[float, list[float]]:
    clock = TokenClock()
    synchronize(device)
    start = time.perf_counter()
    model.generate(input_ids=prompt, max_new_tokens=new_tokens, do_sample=False, streamer=clock, pad_token_id=0)
    synchronize(device)
    seconds = time.perf_counter() - start
    stamps = [start, *clock.times]
    return seconds, [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--vocab", type=int, default=16_000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--segment", type=int, default=256)
    parser.add_argument("--memory", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=768)
    parser.add_argument("--prefill-tokens", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    rmt, bare = build(args)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, args.vocab, (1, args.prompt_tokens), generator=generator).to(args.device)
    long_prompt = torch.randint(3, args.vocab, (1, args.prefill_tokens), generator=generator).to(args.device)

    with torch.inference_mode():
        timed_generate(rmt, prompt, 32, args.device)  # warm-up
        timed_generate(bare, prompt, 32, args.device)
        rmt_runs, bare_runs, latencies = [], [], []
        for repeat in range(args.repeats):  # alternate the order; keep the best of each
            for name in ("rmt", "bare")[:: 1 if repeat % 2 == 0 else -1]:
                seconds, steps = timed_generate(rmt if name == "rmt" else bare, prompt, args.new_tokens, args.device)
                (rmt_runs if name == "rmt" else bare_runs).append(seconds)
                if name == "rmt":
                    latencies = steps if not latencies or seconds <= min(rmt_runs) else latencies
        synchronize(args.device)
        start = time.perf_counter()
        rmt.generate(input_ids=long_prompt, max_new_tokens=1, do_sample=False, pad_token_id=0)
        synchronize(args.device)
        prefill_seconds = time.perf_counter() - start

    # The step producing new token i appends token i - 1; it crosses a boundary when the current
    # segment is full. After the prompt the last segment holds `filled` tokens.
    filled = args.prompt_tokens - (-(-args.prompt_tokens // args.segment) - 1) * args.segment
    first_crossing = args.segment - filled + 1
    boundary_steps = [i for i in range(first_crossing, len(latencies), args.segment)]
    inner = [lat for i, lat in enumerate(latencies) if i not in boundary_steps and i > 0]
    report = {
        "benchmark": "generation",
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "dtype": args.dtype,
        "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "model": {k: getattr(args, k) for k in ("vocab", "hidden", "layers", "heads", "segment", "memory")},
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "rmt_tokens_per_s": args.new_tokens / min(rmt_runs),
        "bare_tokens_per_s": args.new_tokens / min(bare_runs),
        "rmt_over_bare_throughput": min(bare_runs) / min(rmt_runs),
        "latency_ms": {
            "p50": 1e3 * percentile(inner, 0.5),
            "p99": 1e3 * percentile(inner, 0.99),
            "boundary_mean": 1e3 * statistics.mean(latencies[i] for i in boundary_steps) if boundary_steps else None,
            "boundary_max": 1e3 * max(latencies[i] for i in boundary_steps) if boundary_steps else None,
            "all_p99": 1e3 * percentile(latencies[1:], 0.99),
            "boundary_steps": len(boundary_steps),
        },
        "prefill_tokens": args.prefill_tokens,
        "prefill_tokens_per_s": args.prefill_tokens / prefill_seconds,
    }
    out = args.out or RESULTS / f"generation_{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
