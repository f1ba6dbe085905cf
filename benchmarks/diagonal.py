r"""Diagonal batching against the sequential segment loop for ARMT, and the full-attention backbone.

Each measurement runs in a fresh child process (so peak memory belongs to one variant), best of
`--repeats` timed passes after one warm-up; `--rounds` repeats the processes with the variants
interleaved (the best round counts), for machines whose speed drifts. Random weights (speed does not
depend on them). The same seed gives every variant the same weights, so the summary also compares the
last position's logits of diagonal and sequential, next to the rounding floor: sequential on the same
documents inside a batch twice as large (one extra, untimed pass). Prints a table and writes JSON.

    python benchmarks/diagonal.py                                  # CPU, small model
    python benchmarks/diagonal.py --device cuda --dtype bfloat16 --preset llama-1b \
        --lengths 32768 131072 --segment 1008 --memory 16          # the paper's setting on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from modeling_rmt import RMTConfig, RMTForCausalLM

PRESETS = {
    # Llama-3.2-1B's shape
    "llama-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     intermediate_size=8192, vocab_size=128256),
    "cpu-small": dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                      intermediate_size=1024, vocab_size=8192),
    # small enough that per-call overhead, not arithmetic, bounds a layer call (as on a GPU)
    "cpu-tiny": dict(hidden_size=64, num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=256, vocab_size=8192),
}  # fmt: skip
VARIANTS = ("sequential", "diagonal", "full-attention")


def build(args: argparse.Namespace, variant: str, length: int) -> torch.nn.Module:
    dtype = getattr(torch, args.dtype)
    text_config = AutoConfig.for_model(
        "llama", **PRESETS[args.preset], max_position_embeddings=max(length, 4096), tie_word_embeddings=False
    )
    torch.manual_seed(0)
    with torch.device(args.device):  # random initialisation where the model runs (fast for a 1B model on a GPU)
        if variant == "full-attention":
            model = AutoModelForCausalLM.from_config(text_config, dtype=dtype, attn_implementation="sdpa")
        else:
            config = RMTConfig(
                text_config=text_config,
                num_mem_tokens=args.memory,
                segment_size=args.segment,
                memory_type="armt",
                armt_d_mem=args.d_mem,
                diagonal_batching=variant == "diagonal",
            )
            model = RMTForCausalLM(config).to(dtype)
            with torch.no_grad():  # a memory that is written, as after training
                for layer in model.memory.layers:
                    layer.W_mv.weight.normal_(0.0, 0.02)
    return model.to(args.device).eval()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_one(args: argparse.Namespace) -> dict:
    """Child process: time one variant at one length; report seconds and peak memory."""
    model = build(args, args.variant, args.length)
    ids = torch.randint(10, 1000, (args.batch, args.length), generator=torch.Generator().manual_seed(1))
    ids = ids.to(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    with torch.no_grad():
        for _ in range(args.repeats + 1):  # the first pass warms up
            synchronize(args.device)
            start = time.perf_counter()
            logits = model(input_ids=ids, logits_to_keep=1).logits
            synchronize(args.device)
            times.append(time.perf_counter() - start)
    result = {"variant": args.variant, "length": args.length, "seconds": min(times[1:]), "all_seconds": times[1:],
              "last_logit_norm": float(logits.float().norm())}  # fmt: skip
    if args.device.startswith("cuda"):
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.logits_file:  # for the parent's comparison of the variants (same seed: the same weights)
        torch.save(logits[:, -1].float().cpu(), args.logits_file)
        if args.variant == "sequential":  # the rounding floor: the same documents inside a batch twice as large
            other = torch.randint(10, 1000, ids.shape, generator=torch.Generator().manual_seed(2)).to(args.device)
            with torch.no_grad():
                batched = model(input_ids=torch.cat([ids, other]), logits_to_keep=1).logits[: len(ids)]
            torch.save(batched[:, -1].float().cpu(), f"{args.logits_file}.batched")
    return result


def child_command(args: argparse.Namespace, variant: str, length: int) -> list[str]:
    command = [sys.executable, __file__, "--child", "--variant", variant, "--length", str(length)]
    for name in ("device", "dtype", "preset", "segment", "memory", "d_mem", "batch", "repeats"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return command + ["--logits-file", str(logits_file(args, variant, length))]


def logits_file(args: argparse.Namespace, variant: str, length: int) -> Path:
    return Path(args.logits_dir) / f"{variant}-{length}.pt"


def last_logits_difference(args: argparse.Namespace, length: int, other: str = "diagonal") -> float | None:
    """Max |sequential - other| / max |sequential| over the last position's logits, where both ran.

    `other="batched"` compares the sequential loop with itself run on the same documents inside a
    larger batch: the floor that rounding alone sets for this model at this length.
    """
    sequential_file = logits_file(args, "sequential", length)
    other_file = Path(f"{sequential_file}.batched") if other == "batched" else logits_file(args, other, length)
    if not (sequential_file.is_file() and other_file.is_file()):
        return None
    sequential, compared = (torch.load(f, weights_only=True) for f in (sequential_file, other_file))
    return float((sequential - compared).abs().max() / sequential.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--preset", default="cpu-small", choices=sorted(PRESETS))
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--segment", type=int, default=112)
    parser.add_argument("--memory", type=int, default=16)
    parser.add_argument("--d-mem", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per process (after a warm-up)")
    parser.add_argument("--rounds", type=int, default=1, help="processes per variant, interleaved; best one counts")
    parser.add_argument("--full-attention-max", type=int, default=16384, help="longest input for the full backbone")
    parser.add_argument("--child-timeout", type=float, default=None, help="seconds one measurement may take")
    parser.add_argument("--output", default="benchmarks/results/diagonal_cpu.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--logits-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_one(args)))
        return
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as args.logits_dir:
        for length in args.lengths:
            variants = [v for v in VARIANTS if v != "full-attention" or length <= args.full_attention_max]
            for round_number in range(args.rounds):  # variants interleaved, so a noisy machine hits all alike
                for variant in variants:
                    rows.append({**run_child(args, variant, length), "round": round_number})
                    print(json.dumps(rows[-1]), flush=True)
                    summary = write_results(args, rows)  # after every row: a run cut short keeps what it measured
    for entry in summary:
        print(json.dumps(entry))


def run_child(args: argparse.Namespace, variant: str, length: int) -> dict:
    """One measurement in a fresh process; a failure or a timeout becomes a row with the reason."""
    try:
        done = subprocess.run(
            child_command(args, variant, length), capture_output=True, text=True, timeout=args.child_timeout
        )
    except subprocess.TimeoutExpired:
        return {"variant": variant, "length": length, "error": f"timed out after {args.child_timeout:.0f} s"}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit status {done.returncode}"]
        return {"variant": variant, "length": length, "error": lines[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def speedups_per_round(rows: list[dict], length: int) -> list[float]:
    """Sequential over diagonal seconds within each round: steadier than the best of all rounds
    where the machine's speed drifts between processes."""
    by_round: dict[int, dict[str, float]] = {}
    for row in rows:
        if row["length"] == length and "seconds" in row:
            by_round.setdefault(row["round"], {})[row["variant"]] = row["seconds"]
    both = [seconds for _, seconds in sorted(by_round.items()) if {"sequential", "diagonal"} <= seconds.keys()]
    return [seconds["sequential"] / seconds["diagonal"] for seconds in both]


def write_results(args: argparse.Namespace, rows: list[dict]) -> list[dict]:
    """Write the rows and the speed-ups measured so far to `--output`; return the speed-ups."""
    summary = []
    for length in args.lengths:
        by_variant: dict[str, dict] = {}
        for row in rows:  # the best round of each variant
            if row["length"] == length and "seconds" in row:
                best = by_variant.get(row["variant"])
                by_variant[row["variant"]] = row if best is None or row["seconds"] < best["seconds"] else best
        if {"sequential", "diagonal"} <= by_variant.keys():
            entry = {"length": length, "speedup_vs_sequential": by_variant["sequential"]["seconds"]
                     / by_variant["diagonal"]["seconds"]}  # fmt: skip
            if "full-attention" in by_variant:
                entry["speedup_vs_full_attention"] = (
                    by_variant["full-attention"]["seconds"] / by_variant["diagonal"]["seconds"]
                )
            entry["speedup_vs_sequential_per_round"] = speedups_per_round(rows, length)
            entry["last_logits_max_relative_difference"] = last_logits_difference(args, length)
            entry["sequential_alone_vs_batched_relative_difference"] = last_logits_difference(args, length, "batched")
            summary.append(entry)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    hidden = ("child", "variant", "length", "output", "logits_file", "logits_dir")
    setting = {k: v for k, v in vars(args).items() if k not in hidden}
    machine = {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name()
    Path(args.output).write_text(json.dumps({"setting": setting, "machine": machine, "rows": rows,
                                             "summary": summary}, indent=2))  # fmt: skip
    return summary


if __name__ == "__main__":
    main()
