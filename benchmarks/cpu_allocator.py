"""Training steps on a CPU with glibc's malloc against jemalloc preloaded (`LD_PRELOAD`).

    python benchmarks/cpu_allocator.py [--segments 3] [--batch 8] [--repeats 3] [--bf16] [--jemalloc PATH]

The rmt-minilm-512 recipe's model (all-MiniLM-L6-v2, 10 memory tokens, 499 content tokens per segment),
forward, backward through every segment and an AdamW step. Each allocator runs in its own process, one after
the other, with the same threads; after one warm-up step each, every step is timed together with the CPU time
the process spent in user space and in the kernel. Steps allocate many tensors over glibc's mmap threshold
(32 MiB at most: at batch 8 one layer's attention scores are 8 x 12 x 512 x 512 floats, 96 MiB), which glibc
maps and unmaps on every use, so the kernel zeroes fresh pages each time; jemalloc, told to keep freed
pages or with its defaults, reuses them. Each step's resident memory is recorded, to show growth.
Prints a table and writes JSON (default benchmarks/results/cpu_allocator.json). Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# jemalloc's settings compared: its defaults (freed pages go back to the system after about 10 s unused), and
# keeping every freed page for reuse (the setting often advised for PyTorch on CPUs; see the notes in RESULTS.md).
JEMALLOC_CONFS = {"jemalloc": "", "jemalloc, pages kept": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}
JEMALLOC_CANDIDATES = ("/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
                       "/usr/lib64/libjemalloc.so.2", "/lib/aarch64-linux-gnu/libjemalloc.so.2")  # fmt: skip


def child(segments: int, batch: int, repeats: int, bf16: bool) -> dict:
    """Time `repeats` training steps after a warm-up one, in this process; return the figures."""
    import torch
    from transformers.utils import logging as hf_logging

    from modeling_rmt import RMTForSequenceClassification
    from rmt_tools.backbones import minilm_path
    from rmt_tools.hardware import cpu_bfloat16_is_fast, cpu_capability

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    model = RMTForSequenceClassification.from_backbone(str(minilm_path()), num_labels=6, num_mem_tokens=10,
                                                       segment_size=499).train()  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-9)  # the weights barely move: steps cost the same
    ids = torch.randint(1000, 20000, (batch, segments * 499))
    batch_inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.zeros(batch).long()}
    steps = []
    for step in range(repeats + 1):
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch_inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after, seconds = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - started
        if step:  # the first step is a warm-up
            user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
            steps.append({"seconds": seconds, "user_s": user, "system_s": system, "rss_mib": rss_mib()})
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "steps": steps,
        "peak_rss_mib": round(peak_mib),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": cpu_capability(),
        "cpu_bfloat16_fast": cpu_bfloat16_is_fast(),
    }


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def rss_mib() -> int:
    """This process's resident memory now (MiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return -1


def run_child(args: argparse.Namespace, preload: str | None, malloc_conf: str = "") -> dict:
    env = {name: value for name, value in os.environ.items() if name not in ("LD_PRELOAD", "MALLOC_CONF")}
    if preload:
        env["LD_PRELOAD"] = preload
        if malloc_conf:
            env["MALLOC_CONF"] = malloc_conf
    command = [sys.executable, __file__, "--child", "--segments", str(args.segments), "--batch", str(args.batch),
               "--repeats", str(args.repeats)] + (["--bf16"] if args.bf16 else [])  # fmt: skip
    finished = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if finished.returncode:
        raise SystemExit(f"The benchmark's child process failed:\n{finished.stderr[-2000:]}")
    return json.loads(finished.stdout.strip().splitlines()[-1])


def summary(figures: dict) -> dict:
    steps = figures["steps"]
    median = statistics.median(step["seconds"] for step in steps)
    cpu = sum(step["user_s"] + step["system_s"] for step in steps)
    kernel_share = sum(step["system_s"] for step in steps) / cpu if cpu else 0.0
    return {**figures, "median_step_s": round(median, 2), "kernel_share_of_cpu": round(kernel_share, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast, as `train --bf16`")
    parser.add_argument("--jemalloc", default=None, help="path of libjemalloc.so.2 (default: the usual places)")
    parser.add_argument("--output", default=str(RESULTS / "cpu_allocator.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.segments, args.batch, args.repeats, args.bf16)))
        return
    jemalloc = args.jemalloc or next((path for path in JEMALLOC_CANDIDATES if Path(path).is_file()), None)
    if jemalloc is None or not Path(jemalloc).is_file():
        raise SystemExit("No libjemalloc.so.2 found: install it (Debian: apt install libjemalloc2) or pass --jemalloc.")
    results = {"glibc malloc": summary(run_child(args, None))}
    for name, malloc_conf in JEMALLOC_CONFS.items():
        results[name] = summary(run_child(args, jemalloc, malloc_conf))
    base = results["glibc malloc"]["median_step_s"]
    print(f"{'allocator':<22} {'median step (s)':>16} {'speed-up':>9} {'kernel share of CPU':>20} RSS by step (MiB)")
    for name, figures in results.items():
        figures["speedup"] = round(base / figures["median_step_s"], 3)
        growth = " ".join(str(step["rss_mib"]) for step in figures["steps"])
        print(f"{name:<22} {figures['median_step_s']:>16} {figures['speedup']:>8}x "
              f"{figures['kernel_share_of_cpu']:>20.1%} {growth}")  # fmt: skip
    record = {"segments": args.segments, "batch": args.batch, "segment_size": 499, "num_mem_tokens": 10,
              "repeats": args.repeats, "bf16": args.bf16, "jemalloc": jemalloc, "malloc_conf": JEMALLOC_CONFS,
              "machine": {"cpu": cpu_name(), "python": platform.python_version()},
              "results": results}  # fmt: skip
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
