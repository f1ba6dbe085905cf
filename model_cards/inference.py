"""The card section on using a checkpoint (input, precision and speed, documents without an answer), rendered
from the `inference` block that `model_cards.measure_inference` writes into the results JSON."""

from __future__ import annotations

from typing import Any

from rmt_training.tasks import UNKNOWN

NUMBER = (int, float)
FIELDS: dict[str, Any] = {"weights_dtype": str, "loads_as": str, "labels": list, "names": list, "cpu": dict,
                          "speed": list, "no_answer": list}  # fmt: skip
SPEED_FIELDS: dict[str, Any] = {"kernels": str, "capability": str, "num_tokens": int, "batch": int, "seconds": dict}
NO_ANSWER_FIELDS: dict[str, Any] = {
    "case": str, "noise": str, "seed": int, "num_tokens": int, "segments": int, "samples": int, "dtype": str,
    "answers": dict, "confidence_mean": NUMBER, "confidence_min": NUMBER, "confidence_max": NUMBER,
    "answered_confidence_mean": NUMBER, "answered_confidence_min": NUMBER, "below_answered_min": int,
}  # fmt: skip
CASES = {"no_fact": "the facts taken out", "other_person": "the question about a person no fact names"}
DTYPES = ("float32", "bfloat16", "float16")


def _missing(record: Any, fields: dict[str, Any], where: str) -> str | None:
    if not isinstance(record, dict):
        return f"field '{where}' must be a JSON object"
    for field, kind in fields.items():
        if field not in record:
            return f"missing field '{where}.{field}' in the results JSON"
        if not isinstance(record[field], kind) or isinstance(record[field], bool):
            return f"field '{where}.{field}' must be {getattr(kind, '__name__', 'a number')}"
    return None


def inference_problem(block: Any) -> str | None:
    """What is wrong with an `inference` block (a message naming the field), or None."""
    problem = _missing(block, FIELDS, "inference")
    for index, row in enumerate([] if problem else block["speed"]):
        problem = problem or _missing(row, SPEED_FIELDS, f"inference.speed[{index}]")
    for index, cell in enumerate([] if problem else block["no_answer"]):
        problem = problem or _missing(cell, NO_ANSWER_FIELDS, f"inference.no_answer[{index}]")
        if not problem and cell["case"] not in CASES:
            problem = f"field 'inference.no_answer[{index}].case' must be one of {', '.join(CASES)}"
    if not problem and not block["no_answer"]:
        problem = "field 'inference.no_answer' must list at least one measurement"
    return problem


def _input(results: dict[str, Any], block: dict[str, Any]) -> list[str]:
    names, labels = ", ".join(block["names"]), ", ".join(block["labels"])
    if results["pipeline_tag"] == "text-generation":
        return [
            "Give the document, then the question, as one text with no special tokens (the saved tokenizer adds "
            f'none): `prompt = f"{{document}} Where is Mary?"`. Questions are `Where is <name>?` about {names}. '
            "Decode greedily (`do_sample=False`) with a few new tokens (`max_new_tokens=5`; the saved generation "
            f"config ends the answer at `[SEP]`); the answer is a place, one of {labels}. Take its first word.",
        ]
    return [
        f'Give the document, then the question, as one text: `classifier(f"{{document}} Where is Mary?")` (the '
        f"tokenizer adds `[CLS]` and `[SEP]`; nothing is truncated). Questions are `Where is <name>?` about {names}; "
        f"the answer is one of {len(block['labels'])} labels: {labels} (`model.config.id2label`).",
    ]


def _speed(results: dict[str, Any], block: dict[str, Any]) -> list[str]:
    rows = {row["kernels"]: row for row in block["speed"]}
    native, avx2 = rows.get("native"), rows.get("avx2")
    cpu = block["cpu"]
    flags = ", ".join(cpu.get("flags", [])) or "no AVX512 or AMX"
    lines = [
        f"The weights are stored in {block['weights_dtype']}, and `from_pretrained` loads them in "
        f"{block['loads_as']} unless given `dtype=`. On a CPU, 16-bit weights are fast only with hardware kernels: "
        "bfloat16 with AVX512-BF16 or AMX-BF16 (Intel Xeon from Cooper Lake and Sapphire Rapids on, AMD from Zen 4 "
        "on), float16 with AVX512-FP16 or AMX-FP16 (Intel Xeon from Sapphire Rapids on); "
        "`grep -o 'avx512_bf16\\|amx_bf16\\|avx512_fp16' /proc/cpuinfo | sort -u` lists them. Elsewhere PyTorch "
        "emulates them, several times slower than float32: there, load with `dtype=torch.float32`.",
    ]
    if native is None:
        return lines
    what = "a greedy answer after" if results["pipeline_tag"] == "text-generation" else "a forward pass over"
    lines += [
        "",
        f"Seconds for {what} a batch of {native['batch']} documents of {native['num_tokens']:,} tokens (median of "
        f"5), on {cpu.get('name', 'a CPU')} ({cpu.get('cores', '?')} cores; {flags}; torch {cpu.get('torch', '?')}):",
        "",
        "| kernels | " + " | ".join(DTYPES) + " |",
        "|---|" + "---:|" * len(DTYPES),
    ]
    labels = {"native": f"this CPU's ({native['capability']}, oneDNN)",
              "avx2": "AVX2 only, oneDNN off (the code path of a CPU without AVX512 or AMX)"}  # fmt: skip
    for name, row in rows.items():
        cells = [f"{row['seconds'][d]:.2f} s" if d in row["seconds"] else "-" for d in DTYPES]
        lines.append(f"| {labels.get(name, name)} | " + " | ".join(cells) + " |")
    speed = native["seconds"]
    fastest = min(speed, key=speed.get)
    summary = f"Here {fastest} was the fastest ({speed['float32'] / speed[fastest]:.1f}x the speed of float32)"
    if avx2 is not None:
        slow = {dtype: avx2["seconds"][dtype] / avx2["seconds"]["float32"] for dtype in ("float16", "bfloat16")}
        summary += (f"; on the AVX2 path float16 took {slow['float16']:.1f}x and bfloat16 {slow['bfloat16']:.1f}x "
                    "the time of float32")  # fmt: skip
    lines += ["", summary + "."]
    return lines


def _answers(cell: dict[str, Any]) -> str:
    return ", ".join(f"{answer or '(nothing)'} {count}" for answer, count in cell["answers"].items())


def _no_answer(results: dict[str, Any], block: dict[str, Any]) -> list[str]:
    decoder = results["pipeline_tag"] == "text-generation"
    cells = block["no_answer"]
    first = cells[0]
    confidence = "the probability of the answer's first token" if decoder else "the top label's probability"
    if UNKNOWN in block["labels"]:
        opening = (f"Its label {UNKNOWN} says that the document does not answer: it was trained on documents of noise "
                   "alone (task no_fact) beside the facts' documents.")  # fmt: skip
    else:
        opening = "It has no way to say that the document does not answer: " + (
            "it still generates a place." if decoder else "it always answers one of its labels."
        )
    lines = [
        opening
        + f" Measured on documents of held-out text ({first['noise'].capitalize()}, seed {first['seed']:,}) built "
        f"as in evaluation, with {' or with '.join(CASES[c] for c in dict.fromkeys(c['case'] for c in cells))}, in "
        f"{first['dtype']}; confidence is {confidence}, and the last two columns compare it with the same documents "
        "with their facts and their own question:",
        "",
        "| documents | tokens | segments | n | answers | confidence: mean (min-max) | below the lowest with the facts "
        "| with the facts: mean (min) |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for cell in cells:
        answers = _answers(cell)
        if "answers_naming_a_fact_place" in cell:
            answers += f" (another person's place: {cell['answers_naming_a_fact_place']} of {cell['samples']})"
        lines.append(
            f"| {CASES[cell['case']]} | {cell['num_tokens']:,} | {cell['segments']} | {cell['samples']} | {answers} | "
            f"{cell['confidence_mean']:.3f} ({cell['confidence_min']:.3f}-{cell['confidence_max']:.3f}) | "
            f"{cell['below_answered_min']} of {cell['samples']} | "
            f"{cell['answered_confidence_mean']:.3f} ({cell['answered_confidence_min']:.3f}) |"
        )
    summary = []
    no_fact = [cell for cell in cells if cell["case"] == "no_fact"]
    if no_fact:
        counts: dict[str, int] = {}
        for cell in no_fact:
            for answer, count in cell["answers"].items():
                counts[answer] = counts.get(answer, 0) + count
        top = max(counts, key=counts.get)
        summary.append(f"With the facts taken out it answered {top} {counts[top]} times in "
                       f"{sum(c['samples'] for c in no_fact)}.")  # fmt: skip
    separate = [cell for cell in cells if cell["confidence_max"] < cell["answered_confidence_min"]]
    if not separate:
        summary.append("In every row the confidences of unanswerable documents reach into those of answerable ones, "
                       "so no threshold on the confidence separates them")  # fmt: skip
    else:
        summary.append(f"In {len(separate)} of the {len(cells)} rows every unanswerable document scored below every "
                       "answerable one")  # fmt: skip
    lower = [cell for cell in cells if cell["answered_confidence_mean"] - cell["confidence_mean"] > 0.1]
    if lower:
        gaps = ", ".join(f"{c['confidence_mean']:.2f} against {c['answered_confidence_mean']:.2f}" for c in lower)
        summary[-1] += f"; on average it is lower ({gaps})"
    summary[-1] += "."
    total = sum(cell["samples"] for cell in cells)
    longer = sum(cell.get("answers_longer_than_one_word", 0) for cell in cells)
    if decoder and longer:
        summary.append(f"{longer} of the {total} answers were longer than one word (a place repeated): read the first.")
    return [*lines, "", " ".join(summary)]


def inference_section(results: dict[str, Any]) -> list[str]:
    """The card's `## Input, precision and unanswerable documents` section (empty without an `inference` block)."""
    block = results.get("inference")
    if block is None:
        return []
    return [
        "## Input, precision and unanswerable documents",
        "",
        "### Input",
        "",
        *_input(results, block),
        "",
        "### Precision and speed",
        "",
        *_speed(results, block),
        "",
        "### When the document holds no answer",
        "",
        *_no_answer(results, block),
        "",
    ]
