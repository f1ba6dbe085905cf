"""Our held-out qa1 documents as local tasks of lm-evaluation-harness, and its answers against ours.

    python -m rmt_training.harness checkpoints/armt-minilm-qa1 runs/harness-armt --segments 64 --samples 100 \
        --dtype bfloat16

writes `runs/harness-armt/tasks/`: the documents `evaluate_lengths` scores at that length (same seed, noise
and index) as JSON lines, a `generate_until` task `rmt_qa1_<tokens>` scored by BABILong's rule and a
`multiple_choice` task `rmt_qa1_<tokens>_choice` over the six places. It then runs lm-eval (`--model hf`,
the checkpoint loaded as remote code) and our own `generate()` on the same documents and writes each
document's two answers and both accuracies to `agreement.json`. `--tasks-only` writes the tasks alone, for
`lm_eval --include_path`.

lm-eval 0.4.13 takes the length limit from the nested `config.text_config` (here the backbone's 512
positions) before the tokenizer's, so it needs `max_length=` in `--model_args` (as `harness_model_args`
gives) or it cuts every document to its last positions.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from modeling_rmt.configuration_rmt import LONG_DOCUMENT_TOKENS
from rmt_tools.hardware import device_problem

from .decoder import ANSWER_RESERVE
from .evaluate_lengths import cell_samples, decoder_answers, load_model, qa1_correct, save_results
from .tasks import HELD_OUT_SEED, PLACES, TaskSample, TokenizedNoise

SCORER = '''"""BABILong's rule on lm-eval's answers (written by rmt_training.harness)."""

from rmt_training.babilong import babilong_correct
from rmt_training.tasks import PLACES


def process_results(doc, results):
    return {"acc": float(babilong_correct(results[0], doc["target"], doc["question"], "qa1", labels=PLACES))}
'''


def qa1_samples(tokenizer, num_tokens: int, samples: int, seed: int = HELD_OUT_SEED, noise: str = "milton"):
    """The documents `evaluate_lengths` scores at `num_tokens` tokens (a decoder's: room left for the answer)."""
    return cell_samples("qa1", TokenizedNoise(tokenizer, noise), tokenizer, num_tokens, seed, range(samples), True)


def prompt_text(sample: TaskSample) -> str:
    return f"{sample.input} {sample.question}"


def write_tasks(folder: str | Path, name: str, samples: list[TaskSample], tokenizer) -> list[str]:
    """Write `samples` as lm-eval tasks `name` (generate_until) and `name`_choice (multiple_choice) into
    `folder`; returns the task names. Each document's text must tokenize to the ids we score."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    for index, sample in enumerate(samples):
        if tokenizer(prompt_text(sample), add_special_tokens=False)["input_ids"] != sample.input_ids:
            raise ValueError(f"Document {index}'s text does not tokenize to its ids; lm-eval would read another text.")
    rows = [{"index": i, "input": s.input, "question": s.question, "target": s.target, "label": s.label}
            for i, s in enumerate(samples)]  # fmt: skip
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "rmt_qa1_scorer.py").write_text(SCORER)
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
              "test_split: test\ndoc_to_text: \"{{input}} {{question}}\"\n")  # fmt: skip
    metric = (
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n"
    )
    (folder / f"{name}.yaml").write_text(
        f'task: {name}\n{common}output_type: generate_until\ndoc_to_target: "{{{{target}}}}"\n'
        f'generation_kwargs:\n  until: ["[SEP]"]\n  max_gen_toks: {ANSWER_RESERVE - 1}\n  do_sample: false\n'
        f"process_results: !function rmt_qa1_scorer.process_results\n{metric}"
    )
    (folder / f"{name}_choice.yaml").write_text(
        f"task: {name}_choice\n{common}output_type: multiple_choice\ndoc_to_choice: {json.dumps(list(PLACES))}\n"
        f"doc_to_target: label\n{metric}"
    )
    return [name, f"{name}_choice"]


def harness_model_args(checkpoint: str | Path, dtype: str) -> dict[str, Any]:
    """lm-eval's `--model hf` arguments for an RMT checkpoint: remote code, and the length limit raised."""
    return {
        "pretrained": str(checkpoint),
        "trust_remote_code": True,
        "dtype": dtype,
        "max_length": LONG_DOCUMENT_TOKENS,
    }


def run_lm_eval(
    checkpoint: str | Path, folder: str | Path, tasks: list[str], dtype: str, batch_size: int, device: str
) -> dict:
    """lm-eval's results (with every sample logged) on the tasks in `folder`."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="hf", model_args=harness_model_args(checkpoint, dtype), tasks=tasks, batch_size=batch_size, device=device,
        task_manager=TaskManager(include_path=str(Path(folder).resolve())), log_samples=True,
    )  # fmt: skip


def lm_eval_answers(results: dict, task: str) -> dict[int, str]:
    """lm-eval's answer to each document of a generate_until task, by document index."""
    return {sample["doc"]["index"]: sample["filtered_resps"][0] for sample in results["samples"][task]}


def agreement(checkpoint: str, folder: Path, num_tokens: int, samples: int, dtype: str, batch_size: int,
              device: str = "cpu") -> dict:  # fmt: skip
    """lm-eval and our own generate() on the same held-out documents: answers per document and accuracies."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    documents = qa1_samples(tokenizer, num_tokens, samples)
    name = f"rmt_qa1_{num_tokens}"
    write_tasks(folder / "tasks", name, documents, tokenizer)
    theirs = lm_eval_answers(run_lm_eval(checkpoint, folder / "tasks", [name], dtype, batch_size, device), name)
    model = load_model(checkpoint, dtype, device)
    ours: list[str] = []
    with torch.no_grad():
        for first in range(0, samples, batch_size):
            ours += decoder_answers(model, tokenizer, documents[first : first + batch_size])
    rows = [{"index": i, "target": d.target, "lm_eval": theirs[i], "ours": ours[i], "same_answer": theirs[i] == ours[i],
             "lm_eval_correct": qa1_correct(theirs[i], d), "ours_correct": qa1_correct(ours[i], d)}
            for i, d in enumerate(documents)]  # fmt: skip
    return {
        "checkpoint": checkpoint, "num_tokens": num_tokens, "samples": samples, "dtype": dtype,
        "batch_size": batch_size, "lm_eval_accuracy": sum(r["lm_eval_correct"] for r in rows) / samples,
        "our_accuracy": sum(r["ours_correct"] for r in rows) / samples,
        "same_answers": sum(r["same_answer"] for r in rows), "documents": rows,
    }  # fmt: skip


def record_on_card(card_results: Path, result: dict, command: str) -> None:
    """Write the agreement's figures, and the command that measured them, as the `harness` block of a model
    card's results JSON."""
    from importlib.metadata import version

    results = json.loads(card_results.read_text())
    keys = ("num_tokens", "samples", "dtype", "lm_eval_accuracy", "our_accuracy", "same_answers")
    results["harness"] = {"tool": f"lm-evaluation-harness {version('lm_eval')}", **{k: result[k] for k in keys},
                          "command": command}  # fmt: skip
    save_results(card_results, results)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("out", type=Path, help="folder for tasks/ and agreement.json")
    parser.add_argument("--segments", type=int, default=64, help="document length in segments")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tasks-only", action="store_true", help="write the lm-eval tasks and stop")
    parser.add_argument("--card-results", type=Path, default=None, help="also record the figures in this model "
                        "card results JSON (its `harness` block, for model_cards.generate)")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.tasks_only and (problem := device_problem(args.device)):  # --tasks-only prints lm_eval's command
        raise SystemExit(problem)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    segment_size = json.loads((Path(args.checkpoint) / "config.json").read_text())["segment_size"]
    num_tokens = args.segments * segment_size
    if args.tasks_only:
        names = write_tasks(args.out / "tasks", f"rmt_qa1_{num_tokens}", qa1_samples(tokenizer, num_tokens,
                            args.samples), tokenizer)  # fmt: skip
        model_args = ",".join(f"{k}={v}" for k, v in harness_model_args(args.checkpoint, args.dtype).items())
        print(f"lm_eval --model hf --model_args {model_args} --include_path {args.out / 'tasks'} --tasks "
              f"{','.join(names)} --batch_size {args.batch_size} --device {args.device}")  # fmt: skip
        return None
    result = agreement(args.checkpoint, args.out, num_tokens, args.samples, args.dtype, args.batch_size, args.device)
    (args.out / "agreement.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.card_results is not None:
        command = (f"python -m rmt_training.harness {args.checkpoint} {args.out} --segments {args.segments} "
                   f"--samples {args.samples} --dtype {args.dtype} --batch-size {args.batch_size}")  # fmt: skip
        record_on_card(args.card_results, result, command)
    print(f"{num_tokens:,} tokens, {args.samples} documents: lm-eval {result['lm_eval_accuracy']:.3f}, ours "
          f"{result['our_accuracy']:.3f}, same answer on {result['same_answers']}/{args.samples}")  # fmt: skip
    return result


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    main()
