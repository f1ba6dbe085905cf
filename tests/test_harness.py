"""lm-evaluation-harness reads a committed decoder checkpoint whole, as remote code: on documents longer than
the backbone's window its answers, log-likelihoods and BABILong-rule accuracy equal our own generate() and
forward on the same documents, at batch size 1 and 4, with no truncation."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rmt_training.evaluate_lengths import decoder_answers, qa1_correct
from rmt_training.harness import harness_model_args, lm_eval_answers, prompt_text, qa1_samples, write_tasks
from rmt_training.tasks import PLACES

pytest.importorskip("lm_eval")  # in the dev extra (and the eval extra): CI runs these
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "armt-minilm-qa1"
NUM_TOKENS = 5 * 128  # five segments: longer than the backbone's 512 positions
TEST_SEED = 5_000_021  # documents neither training, validation nor the card's evaluation used


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(CHECKPOINT)


@pytest.fixture(scope="module")
def documents(tokenizer):
    return qa1_samples(tokenizer, NUM_TOKENS, 4, seed=TEST_SEED)


@pytest.fixture(scope="module")
def tasks(documents, tokenizer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    return folder, write_tasks(folder, "rmt_qa1_test", documents, tokenizer)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(CHECKPOINT, trust_remote_code=True, dtype=torch.float32).eval()


def evaluate(tasks, batch_size: int, **model_args) -> tuple[dict, HFLM]:
    folder, names = tasks
    harness = HFLM(**{**harness_model_args(CHECKPOINT, "float32"), **model_args}, batch_size=batch_size, device="cpu")
    results = simple_evaluate(model=harness, tasks=names, task_manager=TaskManager(include_path=str(folder)),
                              log_samples=True)  # fmt: skip
    return results, harness


def our_loglikelihoods(model, tokenizer, document) -> list[float]:
    """Log-probability of ' place' after the prompt, for each place, as a plain forward pass computes it."""
    context = tokenizer(prompt_text(document), add_special_tokens=False)["input_ids"]
    scores = []
    for place in PLACES:
        whole = tokenizer(f"{prompt_text(document)} {place}", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([whole])).logits[0, len(context) - 1 : -1].log_softmax(-1)
        scores.append(float(logits.gather(1, torch.tensor(whole[len(context) :])[:, None]).sum()))
    return scores


@pytest.mark.parametrize("batch_size", [1, pytest.param(4, marks=pytest.mark.slow)])
def test_lm_eval_answers_as_our_generate_and_scores_as_our_forward(tasks, documents, tokenizer, model, batch_size,
                                                                   caplog):  # fmt: skip
    assert all(len(document.input_ids) > 512 for document in documents)
    caplog.set_level(logging.WARNING, logger="lm_eval")
    results, _ = evaluate(tasks, batch_size)
    assert not [r.getMessage() for r in caplog.records if "truncat" in r.getMessage().lower()]
    generate_task, choice_task = tasks[1]
    theirs = lm_eval_answers(results, generate_task)
    ours = decoder_answers(model, tokenizer, documents)
    assert [theirs[i] for i in range(len(documents))] == ours
    correct = [qa1_correct(answer, document) for answer, document in zip(ours, documents, strict=True)]
    assert results["results"][generate_task]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    for sample in results["samples"][choice_task]:
        document = documents[sample["doc"]["index"]]
        theirs_ll = torch.tensor([float(loglikelihood) for loglikelihood, _ in sample["filtered_resps"]])
        ours_ll = torch.tensor(our_loglikelihoods(model, tokenizer, document))
        torch.testing.assert_close(theirs_ll, ours_ll, atol=5e-5, rtol=1e-5)  # measured: 0 alone, 3.8e-6 in 4


def test_lm_eval_run_in_a_fresh_process_loads_the_checkpoint_as_remote_code(tasks, documents, tokenizer, model,
                                                                            tmp_path):  # fmt: skip
    """The command line a user runs, in a process where importing this library fails: the model can only
    come from the checkpoint's own code."""
    folder, names = tasks
    model_args = ",".join(f"{key}={value}" for key, value in harness_model_args(CHECKPOINT, "float32").items())
    command = [sys.executable, "-c", "import sys; sys.modules['modeling_rmt'] = None; "
               "from lm_eval.__main__ import cli_evaluate; sys.argv[0] = 'lm_eval'; cli_evaluate()",
               "run", "--model", "hf", "--model_args", model_args, "--include_path", str(folder), "--tasks", names[0],
               "--device", "cpu", "--batch_size", "4", "--log_samples", "--output_path", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "truncat" not in (finished.stdout + finished.stderr).lower()
    logged = [json.loads(line) for path in tmp_path.rglob(f"samples_{names[0]}_*.jsonl") for line in path.open()]
    answers = {row["doc"]["index"]: row["filtered_resps"][0] for row in logged}
    assert [answers[i] for i in range(len(documents))] == decoder_answers(model, tokenizer, documents)


BABILONG_SCRIPT_STYLE = """
import json, sys
import torch
sys.modules["modeling_rmt"] = None  # the model can only come from the checkpoint's own code
from transformers import AutoModelForCausalLM, AutoTokenizer
path, prompts = sys.argv[1], json.loads(sys.argv[2])
try:  # as run_model_on_babilong.py loads a model: flash attention first, device_map="auto"
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, device_map="auto",
                                                 attn_implementation="flash_attention_2", dtype=torch.float32)
except (ImportError, ValueError):
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, device_map="auto", dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
answers = []
for prompt in prompts:
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    output = model.generate(**inputs, max_new_tokens=20, num_beams=1, do_sample=False, temperature=None, top_p=None,
                            top_k=None, pad_token_id=tokenizer.pad_token_id)
    answers.append(tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))
print(json.dumps(answers))
"""


def test_babilong_scripts_way_of_loading_and_generating_gives_our_answers(documents, tokenizer, model):
    prompts = [prompt_text(document) for document in documents[:2]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    finished = subprocess.run([sys.executable, "-c", BABILONG_SCRIPT_STYLE, str(CHECKPOINT), json.dumps(prompts)],
                              capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert finished.returncode == 0, finished.stderr[-3000:]
    answers = json.loads(finished.stdout.strip().splitlines()[-1])
    assert answers == decoder_answers(model, tokenizer, documents[:2])  # both stop at the end token, [SEP]


def test_without_max_length_lm_eval_takes_the_backbones_window_and_cuts_documents(tasks, caplog):
    """What the README's `max_length=` is for: lm-eval 0.4.13 reads the nested text_config's 512 positions."""
    caplog.set_level(logging.WARNING, logger="lm_eval")
    args = {key: value for key, value in harness_model_args(CHECKPOINT, "float32").items() if key != "max_length"}
    harness = HFLM(**args, batch_size=4, device="cpu")
    assert harness.max_length == 512
    folder, names = tasks
    simple_evaluate(model=harness, tasks=names[:1], task_manager=TaskManager(include_path=str(folder)))
    assert any("Left truncation applied" in r.getMessage() for r in caplog.records)
