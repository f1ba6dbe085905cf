"""Measure what a card says about using its checkpoint, and write it into the card's results JSON
(its `inference` block, which `model_cards.generate` renders):

- the dtype the weights are stored in and the one `from_pretrained` loads them in;
- the time of one batch in float32, bfloat16 and float16 on this CPU, and on the code path of a CPU
  without AVX512 or AMX (this CPU restricted to PyTorch's AVX2 kernels with oneDNN off, in a subprocess);
- what the model answers when the document holds no answer: documents of held-out noise (Milton) built by
  `rmt_training.tasks` on held-out seeds with the facts taken out (`no_fact`), or with the facts
  kept and the question asked about a person none of them names (`other_person`); the answers, their
  confidence (the classifier's top probability, a decoder's probability of its first answer token) and,
  for comparison, the confidence on the same documents with their facts and question.

    python -m model_cards.measure_inference checkpoints/rmt-minilm model_cards/rmt-minilm.json
    python -m model_cards.generate model_cards/rmt-minilm.json --output model_cards/rmt-minilm.md

The checkpoint must hold the weights the results JSON was evaluated on (`evaluated.weights_sha256`).
About a minute per checkpoint on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from modeling_rmt.loading import safetensors_header  # noqa: E402
from rmt_tools.hardware import cpu_bfloat16_is_fast, cpu_capability  # noqa: E402
from rmt_training.decoder import ANSWER_RESERVE, end_token_id, pad_token_id  # noqa: E402
from rmt_training.evaluate_lengths import tensors_fingerprint, weights_fingerprint  # noqa: E402
from rmt_training.tasks import NAMES, PLACES, TaskSample, TokenizedNoise, make_sample  # noqa: E402

NO_ANSWER_SEED = 9_000_011  # documents no training, validation, evaluation, test or the demo used
DTYPES = ("float32", "bfloat16", "float16")
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def is_decoder(checkpoint: str | Path) -> bool:
    """Whether the checkpoint was saved as a decoder (RMTForCausalLM) rather than a classifier."""
    return (AutoConfig.from_pretrained(checkpoint, trust_remote_code=True).architectures or [""])[0] == "RMTForCausalLM"


def generates(model) -> bool:
    return type(model).__name__ == "RMTForCausalLM"


def load(checkpoint: str | Path, dtype: str | None = None) -> tuple[Any, Any]:
    """The checkpoint as remote code (as the Hub serves it) in `dtype` (None: transformers' default), and its
    tokenizer."""
    auto = AutoModelForCausalLM if is_decoder(checkpoint) else AutoModelForSequenceClassification
    options = {"dtype": getattr(torch, dtype)} if dtype else {}
    model = auto.from_pretrained(checkpoint, trust_remote_code=True, **options).eval()
    return model, AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)


def stored_dtypes(checkpoint: str | Path) -> list[str]:
    """The dtypes of the tensors in the checkpoint's model.safetensors (read from its header)."""
    header, _ = safetensors_header(Path(checkpoint, "model.safetensors"))
    names = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
    return sorted({names.get(v["dtype"], v["dtype"]) for k, v in header.items() if k != "__metadata__"})


def without_facts(sample: TaskSample) -> str:
    """The document with its fact sentences taken out (they sit between noise sentences, one space apart)."""
    text = f" {sample.input} "
    for fact in sample.facts:
        text = text.replace(f" {fact} ", " ", 1)
    return text.strip()


def absent_name(sample: TaskSample) -> str | None:
    """The first person of the tasks that no fact of the document names (None if all four are there)."""
    return next((name for name in NAMES if not any(name in fact for fact in sample.facts)), None)


def no_answer_prompts(
    task: str, case: str, tokenizer, num_tokens: int, samples: int
) -> list[tuple[str, str, set[str]]]:
    """`samples` triples: a document without the answer and the question, the same document with its facts and
    its own question, and the places its facts name."""
    noise, triples, index = TokenizedNoise(tokenizer, "milton"), [], 0
    while len(triples) < samples:
        sample = make_sample(task, noise, tokenizer, num_tokens, NO_ANSWER_SEED, index)
        index += 1
        answered, named = f"{sample.input} {sample.question}", {p for p in PLACES if any(p in f for f in sample.facts)}
        if case == "no_fact":
            triples.append((f"{without_facts(sample)} {sample.question}", answered, named))
        elif (name := absent_name(sample)) is not None:
            triples.append((f"{sample.input} Where is {name}?", answered, named))
    return triples


@torch.no_grad()
def answers(model, tokenizer, prompts: list[str], batch_size: int = 16) -> list[tuple[str, float]]:
    """(answer, confidence) per prompt: the classifier's label and top probability, or a decoder's greedy
    answer (as `evaluate_lengths` decodes it) and the probability of its first token."""
    results = []
    for first in range(0, len(prompts), batch_size):
        batch = prompts[first : first + batch_size]
        if not generates(model):
            probabilities = model(**tokenizer(batch, padding=True, return_tensors="pt")).logits.float().softmax(-1)
            confidence, label = probabilities.max(-1)
            results += [(model.config.id2label[int(i)], float(c)) for i, c in zip(label, confidence, strict=True)]
            continue
        inputs = tokenizer(batch, padding=True, padding_side="left", return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=ANSWER_RESERVE - 1, do_sample=False, output_scores=True,
                                return_dict_in_generate=True, eos_token_id=end_token_id(tokenizer),
                                pad_token_id=pad_token_id(tokenizer))  # fmt: skip
        texts = tokenizer.batch_decode(output.sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        confidence = output.scores[0].float().softmax(-1).max(-1).values
        results += [(text.strip(), float(c)) for text, c in zip(texts, confidence, strict=True)]
    return results


def measure_no_answer(model, tokenizer, task: str, case: str, num_tokens: int, samples: int) -> dict[str, Any]:
    decoder = generates(model)
    prompt_tokens = num_tokens - ANSWER_RESERVE if decoder else num_tokens
    start = time.perf_counter()
    triples = no_answer_prompts(task, case, tokenizer, prompt_tokens, samples)
    unanswerable = answers(model, tokenizer, [prompt for prompt, _, _ in triples])
    answered = answers(model, tokenizer, [prompt for _, prompt, _ in triples])
    confidence = [c for _, c in unanswerable]
    words = [answer.split()[0] if answer.split() else "" for answer, _ in unanswerable]  # BABILong reads the first
    named = sum(word in places for word, (_, _, places) in zip(words, triples, strict=True))
    cell = {
        "case": case,
        "task": task,
        "noise": "milton",
        "seed": NO_ANSWER_SEED,
        "num_tokens": num_tokens,
        "segments": -(-prompt_tokens // model.config.segment_size),
        "samples": samples,
        "dtype": str(model.dtype).removeprefix("torch."),
        "answers": dict(Counter(words).most_common()),  # the first word of a decoder's answer
        "confidence_mean": round(statistics.fmean(confidence), 4),
        "confidence_min": round(min(confidence), 4),
        "confidence_max": round(max(confidence), 4),
        "answered_confidence_mean": round(statistics.fmean(c for _, c in answered), 4),
        "answered_confidence_min": round(min(c for _, c in answered), 4),
        "below_answered_min": sum(c < min(c for _, c in answered) for c in confidence),
        "seconds": round(time.perf_counter() - start, 1),
    }
    if decoder:
        cell["answers_longer_than_one_word"] = sum(len(answer.split()) > 1 for answer, _ in unanswerable)
    if case == "other_person":
        cell["answers_naming_a_fact_place"] = named  # the place of another person's fact
    return cell


def time_dtypes(checkpoint: str, num_tokens: int, batch: int, repeats: int = 5) -> dict[str, float]:
    """Median seconds of one batch (a forward pass, or a greedy answer after the prompts) in each dtype after a
    warm-up; the dtypes take turns, so a machine busy with other work slows them alike."""
    models = {dtype: load(checkpoint, dtype) for dtype in DTYPES}
    tokenizer = models["float32"][1]
    decoder = generates(models["float32"][0])
    task, prompt_tokens = ("qa1", num_tokens - ANSWER_RESERVE) if decoder else ("detect_memorize", num_tokens)
    prompts = [prompt for prompt, _, _ in no_answer_prompts(task, "no_fact", tokenizer, prompt_tokens, batch)]
    timings: dict[str, list[float]] = {dtype: [] for dtype in DTYPES}
    for repeat in range(repeats + 1):
        for dtype, (model, _) in models.items():
            start = time.perf_counter()
            answers(model, tokenizer, prompts, batch_size=batch)
            if repeat:
                timings[dtype].append(time.perf_counter() - start)
    return {dtype: round(statistics.median(times), 3) for dtype, times in timings.items()}


def measure_speed(checkpoint: str, num_tokens: int, batch: int) -> list[dict[str, Any]]:
    """Seconds per batch in each dtype with this CPU's kernels and with AVX2 kernels only (subprocesses)."""
    rows = []
    for kernels in ("native", "avx2"):
        env = {**os.environ, **(AVX2_ENV if kernels == "avx2" else {})}
        command = [sys.executable, "-m", "model_cards.measure_inference", checkpoint, "--time-only", kernels,
                   "--speed-tokens", str(num_tokens), "--speed-batch", str(batch)]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def time_only(checkpoint: str, kernels: str, num_tokens: int, batch: int) -> None:
    """The subprocess of `measure_speed`: prints its row as one JSON line."""
    if kernels == "avx2":
        torch.backends.mkldnn.enabled = False  # as where oneDNN has no bfloat16/float16 kernels
    row = {"kernels": kernels, "capability": cpu_capability(), "onednn": torch.backends.mkldnn.enabled,
           "bfloat16_kernels": kernels == "native" and cpu_bfloat16_is_fast(), "num_tokens": num_tokens,
           "batch": batch, "seconds": time_dtypes(checkpoint, num_tokens, batch)}  # fmt: skip
    print(json.dumps(row))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def cpu_flags() -> list[str]:
    """This CPU's AVX512 and AMX features that oneDNN's bfloat16/float16 kernels use."""
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("flags"):
            wanted = ("avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "avx2")
            return [flag for flag in line.split() if flag in wanted]
    return []


def measure(checkpoint: str, results: dict[str, Any], samples: int, speed_tokens: int, speed_batch: int) -> dict:
    """The `inference` block of the card's results JSON."""
    sha, tensors = weights_fingerprint(checkpoint), tensors_fingerprint(checkpoint)
    evaluated = results.get("evaluated", {})
    key, found = ("tensors_sha256", tensors) if "tensors_sha256" in evaluated else ("weights_sha256", sha)
    if key in evaluated and evaluated[key] != found:
        raise SystemExit(f"{checkpoint} holds other weights ({found[:12]}) than {results['name']} was evaluated on "
                         f"({evaluated[key][:12]}): measure the checkpoint the card describes.")  # fmt: skip
    default, _ = load(checkpoint)
    model, tokenizer = load(checkpoint, "float32")
    decoder = is_decoder(checkpoint)
    task, segment = ("qa1" if decoder else "detect_memorize"), model.config.segment_size
    lengths = (segment, 5 * segment) if decoder else (segment, 7 * segment)
    cells = [("no_fact", lengths[0]), ("no_fact", lengths[1]), ("other_person", lengths[1])]
    no_answer = [measure_no_answer(model, tokenizer, task, case, length, samples) for case, length in cells]
    return {
        "weights_sha256": sha,
        "tensors_sha256": tensors,
        "weights_dtype": "/".join(stored_dtypes(checkpoint)),
        "loads_as": str(default.dtype).removeprefix("torch."),
        "labels": [model.config.id2label[i] for i in range(len(model.config.id2label))]
        if not decoder
        else list(PLACES),
        "names": list(NAMES),
        "cpu": {"name": cpu_name(), "flags": cpu_flags(), "cores": os.cpu_count(), "torch": torch.__version__},
        "speed": measure_speed(checkpoint, speed_tokens or lengths[1], speed_batch),
        "no_answer": no_answer,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="an exported checkpoint folder, e.g. checkpoints/rmt-minilm")
    parser.add_argument("results", nargs="?", help="the card's results JSON; its `inference` block is replaced")
    parser.add_argument("--samples", type=int, default=50, help="documents per no-answer cell")
    parser.add_argument("--speed-tokens", type=int, default=0, help="tokens per timed document (default: the "
                        "longest no-answer length)")  # fmt: skip
    parser.add_argument("--speed-batch", type=int, default=4, help="documents per timed batch")
    parser.add_argument("--time-only", choices=("native", "avx2"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    if args.time_only:
        return time_only(args.checkpoint, args.time_only, args.speed_tokens, args.speed_batch)
    if args.results is None:
        parser.error("give the results JSON to write into")
    path = Path(args.results)
    results = json.loads(path.read_text())
    results["inference"] = measure(args.checkpoint, results, args.samples, args.speed_tokens, args.speed_batch)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["inference"], indent=2))


if __name__ == "__main__":
    main()
