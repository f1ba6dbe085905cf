"""Accuracy against document length for a trained RMT on the memory tasks; resumable.

    python -m rmt_training.evaluate_lengths CHECKPOINT --results model_cards/rmt-minilm.json \
        --run runs/rmt-minilm/final --tasks memorize detect_memorize --segments 1 7 64 1024 17810 \
        --samples 200 200 50 16 8

A classifier (`RMTForSequenceClassification`) is scored on its predicted label. A decoder
(`RMTForCausalLM`) reads a prompt `document question` that leaves room for the answer in the last of
its segments (as in training) and generates greedily; its answer is scored by BABILong's rule.

Documents are built from held-out seeds on held-out noise (Milton by default; training used Shakespeare).
Every finished (task, length, noise, dtype) cell is written to the results JSON at once, and a rerun skips the
cells already there; a cell lists the documents answered wrong (`wrong`, their indices), so two cells on the
same documents compare document by document (`rmt_training.paired`); an unfinished cell's progress is kept
after every batch (`unfinished`), and a rerun goes on from its next document, so a long evaluation can stop
and go on; one results file holds one checkpoint (by the SHA-256 of its weights) and seed, measured on one or
more noise corpora (`--noise`) and dtypes (`--dtype`).
`--run` starts a new file with the training run's description for `model_cards.generate`; `--plot` draws
accuracy against tokens.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from modeling_rmt.loading import safetensors_header
from rmt_tools.hardware import device_problem, slow_bfloat16_warning

from .babilong import babilong_correct
from .decoder import ANSWER_RESERVE, end_token_id, pad_token_id
from .run_record import describe_run, read_run
from .tasks import HELD_OUT_SEED, PLACES, TaskSample, TokenizedNoise, check_held_out, make_sample, with_special_tokens


def weights_fingerprint(checkpoint: str | Path) -> str:
    """SHA-256 of a checkpoint's weights: the identity its results are recorded under."""
    digest = hashlib.sha256()
    for weights in sorted(Path(checkpoint).glob("*.safetensors")):
        with weights.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def tensors_fingerprint(checkpoint: str | Path) -> str:
    """SHA-256 of a checkpoint's tensors (names, dtypes, shapes and bytes of every safetensors file), not of the
    files: an export that rewrites the files' metadata (their export id) leaves it unchanged."""
    digest = hashlib.sha256()
    for weights in sorted(Path(checkpoint).glob("*.safetensors")):
        header, data_start = safetensors_header(weights)
        with weights.open("rb") as handle:
            for name in sorted(key for key in header if key != "__metadata__"):
                entry = header[name]
                begin, end = entry["data_offsets"]
                handle.seek(data_start + begin)
                digest.update(json.dumps([name, entry["dtype"], entry["shape"]]).encode())
                digest.update(handle.read(end - begin))
    return digest.hexdigest()


def checkpoint_identity(checkpoint: str | Path) -> dict[str, str]:
    """What a results file records of the checkpoint it measured: the tensors' fingerprint, which identifies
    the weights, and the files' SHA-256 at the time."""
    return {"tensors_sha256": tensors_fingerprint(checkpoint), "weights_sha256": weights_fingerprint(checkpoint)}


def check_same_run(results: dict, measured: dict) -> None:
    """Cells of one results file come from one checkpoint and seed; refuse to mix. The checkpoint is
    compared by its tensors (`tensors_sha256`), or by its files' SHA-256 where a results file predates that."""
    recorded = results.setdefault("evaluated", measured)
    compared = [key for key in measured if key != "weights_sha256" or "tensors_sha256" not in recorded]
    different = [key for key in compared if key in recorded and recorded[key] != measured[key]]
    if different:
        raise SystemExit(
            f"The results file holds cells measured with another {', '.join(different)} "
            f"({', '.join(f'{key}={recorded[key]}' for key in different)}): use a new --results file."
        )
    recorded.update(measured)
    recorded.pop("noise", None)  # files before cells carried their noise named one corpus for all


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy measured on `total` samples."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def cell_key(cell: dict) -> tuple:
    """What identifies a cell of a results file: (task, num_tokens, noise, dtype)."""
    return cell["task"], cell["num_tokens"], cell["noise"], cell["dtype"]


def sort_cells(cells: list[dict]) -> None:
    cells.sort(key=lambda cell: (cell["task"], cell["noise"], cell["dtype"], cell["num_tokens"]))


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def save_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(results, indent=2) + "\n")
    temporary.replace(path)  # never leave a half-written results file


def keep_progress(results: dict, path: Path | None, cell: dict, progress: dict | None) -> None:
    """Record how far an unfinished cell got (`progress`: done, correct, seconds) under `unfinished`, and save the
    results to `path`; with `progress` None, forget the cell's record (it finished)."""
    unfinished = [entry for entry in results.get("unfinished", []) if entry["cell"] != cell]
    unfinished += [{"cell": cell, **progress}] if progress is not None else []
    results.pop("unfinished", None)
    if unfinished:
        results["unfinished"] = unfinished
    if path is not None:
        save_results(path, results)


def is_decoder(model) -> bool:
    return type(model).__name__ == "RMTForCausalLM"


def auto_class_for(checkpoint: str | Path):
    """The Auto class the checkpoint was saved as: a decoder's or a classifier's."""
    architecture = (AutoConfig.from_pretrained(checkpoint).architectures or [""])[0]
    return AutoModelForCausalLM if architecture == "RMTForCausalLM" else AutoModelForSequenceClassification


def load_model(checkpoint: str, dtype: str, device: str):
    """The checkpoint as a classifier or a decoder, whichever it was saved as."""
    return auto_class_for(checkpoint).from_pretrained(checkpoint, dtype=getattr(torch, dtype)).to(device).eval()


def classifier_verdicts(model, tokenizer, batch: list[TaskSample]) -> list[bool]:
    """Whether the classifier's label is right, document by document."""
    rows = [with_special_tokens(tokenizer, sample.input_ids) for sample in batch]
    inputs = tokenizer.pad({"input_ids": rows}, return_tensors="pt").to(model.device)
    predicted = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.argmax(-1)
    return (predicted.cpu() == torch.tensor([sample.label for sample in batch])).tolist()


def decoder_answers(model, tokenizer, batch: list[TaskSample]) -> list[str]:
    """Greedy answers (up to ANSWER_RESERVE - 1 tokens, ending at the end token) to left-padded prompts."""
    inputs = tokenizer.pad({"input_ids": [s.input_ids for s in batch]}, padding_side="left", return_tensors="pt")
    end = end_token_id(tokenizer)
    output = model.generate(**inputs.to(model.device), max_new_tokens=ANSWER_RESERVE - 1, do_sample=False,
                            eos_token_id=end, pad_token_id=pad_token_id(tokenizer))  # fmt: skip
    return tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def qa1_correct(answer: str, sample: TaskSample) -> bool:
    """BABILong's rule over the six places."""
    return babilong_correct(answer, sample.target, sample.question, "qa1", labels=PLACES)


def decoder_verdicts(model, tokenizer, batch: list[TaskSample]) -> list[bool]:
    """Greedy answers to left-padded prompts, scored by BABILong's rule over the six places, document by document."""
    answers = decoder_answers(model, tokenizer, batch)
    return [qa1_correct(answer, sample) for answer, sample in zip(answers, batch, strict=True)]


def decoder_correct(model, tokenizer, batch: list[TaskSample]) -> int:
    """How many of `batch` the decoder answers right (see `decoder_verdicts`)."""
    return sum(decoder_verdicts(model, tokenizer, batch))


def cell_samples(task: str, noise, tokenizer, num_tokens: int, seed: int, indices: range, decoder: bool) -> list:
    """The documents of a (task, length) cell: a decoder's leave room for the answer in `num_tokens`."""
    prompt_tokens = num_tokens - ANSWER_RESERVE if decoder else num_tokens
    return [make_sample(task, noise, tokenizer, prompt_tokens, seed, i) for i in indices]


@torch.no_grad()
def evaluate_cell(
    model, tokenizer, noise, task: str, num_tokens: int, samples: int, batch_size: int, seed: int,
    partial: dict | None = None, on_batch: Callable[[dict], None] | None = None,
) -> tuple[int, float, list[int] | None]:  # fmt: skip
    """Accuracy of `model` on `samples` documents that fill `num_tokens` tokens; returns (correct, seconds,
    wrong), `wrong` the indices of the documents answered wrong, so two cells on the same documents can be
    compared document by document (None where a resumed record predates it). `partial` ({done, correct,
    seconds, wrong}) resumes a cell after its first `done` documents; `on_batch` gets that record after every
    batch, to keep."""
    kept = partial if partial is not None else {"done": 0, "correct": 0, "seconds": 0.0, "wrong": []}
    wrong = kept.get("wrong", [] if kept["done"] == 0 else None)  # None: kept by a version that listed none
    partial = copy.deepcopy({**{key: kept[key] for key in ("done", "correct", "seconds")}, "wrong": wrong})
    score = decoder_verdicts if is_decoder(model) else classifier_verdicts
    progress = tqdm(total=samples, initial=partial["done"], desc=f"{task} {num_tokens:,} tokens", leave=False)
    for first in range(partial["done"], samples, batch_size):
        start = time.perf_counter()
        indices = range(first, min(samples, first + batch_size))
        batch = cell_samples(task, noise, tokenizer, num_tokens, seed, indices, is_decoder(model))
        verdicts = score(model, tokenizer, batch)
        partial["correct"] += sum(verdicts)
        if partial["wrong"] is not None:
            partial["wrong"] += [index for index, right in zip(indices, verdicts, strict=True) if not right]
        partial["done"] = indices.stop
        partial["seconds"] = round(partial["seconds"] + time.perf_counter() - start, 1)
        progress.update(len(batch))
        if on_batch is not None and partial["done"] < samples:
            on_batch(copy.deepcopy(partial))
    progress.close()
    return partial["correct"], partial["seconds"], partial["wrong"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--results", type=Path, required=True, help="results JSON (created or extended)")
    parser.add_argument("--tasks", nargs="+", default=None, help="default: memorize detect_memorize (a "
                        "classifier) or qa1 (a decoder)")  # fmt: skip
    parser.add_argument("--segments", type=int, nargs="+", required=True, help="document lengths in segments")
    parser.add_argument("--samples", type=int, nargs="+", required=True, help="documents per length (one or each)")
    parser.add_argument("--noise", default="milton", help="noise corpus (default: held out from training)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--plot", type=Path, default=None, help="also draw accuracy against length here")
    parser.add_argument("--run", type=Path, default=None, help="the training run's final/ folder: a new results "
                        "file starts with its description (name, config, recipe) for the model card")  # fmt: skip
    parser.add_argument("--name", default=None, help="with --run: the model's name (default: the run folder's)")
    parser.add_argument("--repo-id", default=None, help="with --run: the Hub repo id (default: ORG/NAME)")
    parser.add_argument("--hardware", default="unspecified", help="with --run: what it trained on")
    args = parser.parse_args(argv)
    if problem := device_problem(args.device):
        raise SystemExit(problem)
    if args.dtype == "bfloat16" and (warning := slow_bfloat16_warning(args.device, "--dtype bfloat16")):
        warnings.warn(warning, stacklevel=2)
    if len(args.samples) not in (1, len(args.segments)):
        parser.error("--samples takes one count or one per --segments value")
    samples = args.samples * len(args.segments) if len(args.samples) == 1 else args.samples

    if args.run is not None:
        check_held_out(json.loads((args.run / "training_args.json").read_text())["seed"], args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    model = load_model(args.checkpoint, args.dtype, args.device)
    args.tasks = args.tasks or (["qa1"] if is_decoder(model) else ["memorize", "detect_memorize"])
    if is_decoder(model) and "no_fact" in args.tasks:
        parser.error("no_fact is scored on a classifier's label unknown; a decoder's answers are scored as places")
    noise = TokenizedNoise(tokenizer, args.noise)
    results = load_results(args.results)
    if args.run and "name" not in results:
        name = args.name or args.run.resolve().parent.name
        results = {**describe_run(read_run(args.run), name, args.repo_id or f"ORG/{name}", args.hardware), **results}
    check_same_run(results, {**checkpoint_identity(args.checkpoint), "seed": args.seed})
    cells = results.setdefault("evaluation", [])
    done = {cell_key(cell) for cell in cells}
    for task in args.tasks:
        for segments, count in zip(args.segments, samples, strict=True):
            num_tokens = segments * model.config.segment_size
            if (task, num_tokens, args.noise, args.dtype) in done:
                continue
            cell = {"task": task, "noise": args.noise, "dtype": args.dtype, "num_tokens": num_tokens, "samples": count}
            kept = next((entry for entry in results.get("unfinished", []) if entry["cell"] == cell), None)
            correct, seconds, wrong = evaluate_cell(model, tokenizer, noise, task, num_tokens, count, args.batch_size,
                                             args.seed, kept, functools.partial(keep_progress, results,
                                                                                args.results, cell))  # fmt: skip
            keep_progress(results, None, cell, None)
            low, high = wilson_interval(correct, count)
            cells.append({"task": task, "noise": args.noise, "num_tokens": num_tokens, "segments": segments,
                          "samples": count, "correct": correct, "accuracy": correct / count, "ci95": [low, high],
                          "seconds": round(seconds, 1), "device": args.device, "dtype": args.dtype,
                          **({"wrong": wrong} if wrong is not None else {})})  # fmt: skip
            sort_cells(cells)
            save_results(args.results, results)
            print(f"{task:16s} {num_tokens:>10,} tokens ({segments:,} segments): {correct}/{count} = "
                  f"{correct / count:.3f} [{low:.3f}, {high:.3f}] in {seconds:,.0f} s")  # fmt: skip
    if args.plot:
        from model_cards.generate import plot_accuracy

        plot_accuracy(results, args.plot)
    return results


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
