"""LoRA with PEFT on RMT and ARMT, classifier and causal LM: `rmt_training.lora.lora_config` puts LoRA on the
backbone's linear layers while the memory's own weights train fully; a saved adapter loads onto the base (also
as remote code, in a fresh process) and merges into it with the same logits; generate() through the PEFT wrapper
writes memory as before; an adapter for another base is refused with the differences."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_classifier
from families import ARMT, MEMORIES, encoder_batch, save_with_code, tiny_decoder, tiny_encoder
from test_causal_lm import prompts
from test_trainer import MEMORY, SEGMENT, accuracy, memory_task, training_args
from transformers import Trainer

peft = pytest.importorskip("peft")
from rmt_training.lora import load_lora, lora_config  # noqa: E402

KINDS = ("classifier", "causal-lm")


def base_and_inputs(kind: str, memory: str) -> tuple:
    if kind == "classifier":
        return tiny_encoder("bert", **MEMORIES[memory]), encoder_batch([20, 9])
    return tiny_decoder("llama", **MEMORIES[memory]), {"input_ids": prompts([17], seed=8)[0][None]}


def trained_a_little(peft_model, inputs: dict, steps: int = 3):
    """A few AdamW steps on a loss over the inputs, so every trainable weight moves."""
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    labels = torch.tensor([0, 2]) if "attention_mask" in inputs else inputs["input_ids"]
    for _ in range(steps):
        optimizer.zero_grad()
        peft_model(**inputs, labels=labels).loss.backward()
        optimizer.step()
    return peft_model.eval()


@pytest.mark.parametrize("memory", list(MEMORIES))
@pytest.mark.parametrize("kind", KINDS)
def test_lora_trains_the_adapters_and_the_memory_and_leaves_the_backbone(kind, memory):
    model, inputs = base_and_inputs(kind, memory)
    with torch.no_grad():
        before = model(**inputs).logits
    originals = [(p, p.detach().clone()) for p in model.parameters()]  # PEFT keeps these objects, renamed
    peft_model = peft.get_peft_model(model, lora_config(model, r=4))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).logits, before, atol=0, rtol=0)  # LoRA's B starts at 0
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or ".modules_to_save." in name for name in trainable), trainable
    assert any(name.endswith("memory.modules_to_save.default.memory_tokens") for name in trainable)
    if memory == "armt":
        for weight in ("W_mq", "W_mk", "W_mv", "W_mb"):  # in every layer, trained fully
            assert sum(f".{weight}.modules_to_save.default.weight" in name for name in trainable) == 2, weight
    trained_a_little(peft_model, inputs)
    memory_copy = peft_model.base_model.model.memory.modules_to_save["default"]
    assert not torch.equal(memory_copy.memory_tokens, model.memory.original_module.memory_tokens)  # trained fully
    assert all(torch.equal(p, before) for p, before in originals)  # every weight of the base stays as it was


@pytest.mark.parametrize("memory", list(MEMORIES))
@pytest.mark.parametrize("kind", KINDS)
def test_a_saved_adapter_loads_onto_the_base_and_merges_with_the_same_logits(kind, memory, tmp_path):
    model, inputs = base_and_inputs(kind, memory)
    model.save_pretrained(tmp_path / "base")
    model_class, memory_class = type(model), type(model.memory)  # PEFT wraps the memory in place
    peft_model = trained_a_little(peft.get_peft_model(model, lora_config(model, r=4)), inputs)
    with torch.no_grad():
        expected = peft_model(**inputs).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = load_lora(type(model).from_pretrained(tmp_path / "base").eval(), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, expected, atol=0, rtol=0)
    if kind == "causal-lm":  # 17 + 12 tokens cross segment boundaries: memory is written while decoding
        through_peft = loaded.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    merged = loaded.merge_and_unload()
    assert type(merged) is model_class and type(merged.memory) is memory_class  # plain again, trained weights in
    merged.save_pretrained(tmp_path / "merged")
    reloaded = type(model).from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-5, rtol=1e-5)  # merged: float error
    if kind == "causal-lm":
        assert torch.equal(reloaded.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False),
                           through_peft)  # fmt: skip


def test_diagonal_batching_runs_through_unmerged_adapters():
    model, inputs = base_and_inputs("causal-lm", "armt")
    peft_model = trained_a_little(peft.get_peft_model(model, lora_config(model, r=4)), inputs)
    with torch.no_grad():
        sequential = peft_model(**inputs).logits
        model.config.diagonal_batching = True
        torch.testing.assert_close(peft_model(**inputs).logits, sequential, atol=1e-5, rtol=1e-5)


REMOTE = """import sys, json, torch; sys.modules['modeling_rmt'] = None
from transformers import AutoModelForSequenceClassification
from rmt_training.lora import load_lora
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(model).__module__.startswith('transformers_modules'), type(model).__module__
model = load_lora(model, sys.argv[2])
inputs = {key: torch.tensor(value) for key, value in json.loads(sys.argv[3]).items()}
with torch.no_grad():
    print(json.dumps(model(**inputs).logits.tolist()))
"""


def test_an_adapter_loads_onto_a_base_loaded_as_remote_code_in_a_fresh_process(tmp_path):
    model, inputs = base_and_inputs("classifier", "armt")
    save_with_code(model, tmp_path / "base")
    peft_model = trained_a_little(peft.get_peft_model(model, lora_config(model, r=4)), inputs)
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = peft_model(**inputs).logits
    arguments = json.dumps({key: value.tolist() for key, value in inputs.items()})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", REMOTE, str(tmp_path / "base"), str(tmp_path / "adapter"), arguments],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(loaded, expected, atol=1e-6, rtol=1e-5)  # another process may pick other kernels


@pytest.mark.parametrize("other", [dict(), dict(memory_type="armt", armt_d_mem=16)], ids=["rmt", "armt-wider-keys"])
def test_an_adapter_for_another_base_is_refused_with_the_differences(tmp_path, other):
    model, _ = base_and_inputs("classifier", "armt")
    peft.get_peft_model(model, lora_config(model, r=4)).save_pretrained(tmp_path)
    difference = "is saved but has no place" if not other else r"W_mk.weight has shape \(8, 32\) in the adapter"
    with pytest.raises(ValueError, match=rf"does not fit this .* model over a bert backbone \(\d+ differences: .*"
                                         rf"{difference}"):  # fmt: skip
        load_lora(tiny_encoder("bert", **other), tmp_path)


def test_lora_config_refuses_what_it_cannot_build():
    model, _ = base_and_inputs("causal-lm", "armt")
    with pytest.raises(ValueError, match="memory's own weights, which train fully"):
        lora_config(model, target_modules=["q_proj", "W_mq"])
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        lora_config(model, r=0)
    with pytest.raises(ValueError, match="take an RMT model"):
        lora_config(model.backbone)


def test_a_copy_of_the_model_runs_its_own_layers_and_a_copy_of_the_memory_the_models():
    # PEFT's modules_to_save copies the memory alone: ARMT's memory must go on reading and writing the layers the
    # backbone runs. A copy of the whole model must get layers of its own.
    model, inputs = base_and_inputs("causal-lm", "armt")
    memory_only = copy.deepcopy(model.memory)
    assert all(a is b for a, b in zip(memory_only.layers, model.memory.layers, strict=True))
    assert memory_only.memory_tokens is not model.memory.memory_tokens
    clone = copy.deepcopy(model)
    assert all(a is b for a, b in zip(clone.memory.layers, clone.backbone.model.layers, strict=True))
    assert all(a is not b for a, b in zip(clone.memory.layers, model.memory.layers, strict=True))
    with torch.no_grad():
        torch.testing.assert_close(clone(**inputs).logits, model(**inputs).logits, atol=0, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_what_wrappers_pass_is_accepted_unset_and_refused_when_it_asks_for_more(kind):
    model, inputs = base_and_inputs(kind, "rmt")
    with torch.no_grad():
        plain = model(**inputs).logits
        unset = model(**inputs, inputs_embeds=None, output_attentions=None).logits  # as PEFT's task models call
    torch.testing.assert_close(unset, plain, atol=0, rtol=0)
    with pytest.raises(ValueError, match="inputs_embeds is not supported: .* pass input_ids"):
        model(**inputs, inputs_embeds=torch.zeros(1, 4, 32))
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        model(**inputs, output_attentions=True)


@pytest.mark.slow  # about a minute of training on two cores
def test_a_lora_run_under_trainer_learns_what_only_memory_can_carry(tmp_path):
    # ARMT with LoRA on a tiny random backbone and its memory weights in full: the label sits in the first of three
    # segments (test_trainer's task). RMT's memory tokens alone did not learn it under LoRA on this random backbone
    # (chance after 750 steps at learning rates 1e-3 to 1e-2, ranks 8 and 32), where full fine-tuning does.
    model = tiny_classifier("bert", num_mem_tokens=MEMORY, segment_size=SEGMENT, **ARMT)
    peft_model = peft.get_peft_model(model, lora_config(model, r=8))
    trainer = Trainer(model=peft_model, args=training_args(tmp_path, learning_rate=3e-3),
                      train_dataset=memory_task(2000, seed=0), eval_dataset=memory_task(400, seed=1),
                      compute_metrics=accuracy)  # fmt: skip
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[0] > 0.6 and losses[-1] < 0.2, losses
    assert trainer.evaluate()["eval_accuracy"] >= 0.9
