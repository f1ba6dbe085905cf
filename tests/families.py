"""Tiny random backbones of every family the conformance suite covers, built with transformers' own
`AutoConfig.for_model`, wrapped as RMT and ARMT models; and running a saved model as remote code in a fresh
process. Shared by test_families.py, test_families_encoders.py and test_family_tokenizers.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from test_causal_lm import MEMORY, SEGMENT, VOCAB, prompts
from transformers import AutoConfig

from conversion.export import HUB_FILES
from modeling_rmt import RMTConfig, RMTForCausalLM, RMTForSequenceClassification

COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, max_position_embeddings=64, head_dim=8, bos_token_id=1, eos_token_id=None,
              pad_token_id=0)  # fmt: skip
# What a family names differently, or needs to be small (only sizes: no behaviour is switched off).
OVERRIDES = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=64),
    "gptj": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4),
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32),
    "falcon": dict(head_dim=None),  # a property of hidden_size / heads there
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
}
# Backbones whose layers attend within a sliding window (all layers, or those `layer_types` names).
WINDOWED = ("mistral", "gemma2", "gemma3_text", "starcoder2")
DECODERS = ("llama", "qwen2", "mistral", "gpt2", "gpt_neox", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
            "phi3", "phi", "olmo2", "granite", "smollm3", "starcoder2", "falcon", "gptj", "opt", "stablelm", "cohere",
            "mixtral")  # fmt: skip
ARMT = dict(memory_type="armt", armt_d_mem=8)
MEMORIES = {"rmt": {}, "armt": ARMT}


def backbone_config(family: str, **changes):
    values = {**COMMON, **OVERRIDES.get(family, {}), **changes}
    if family in WINDOWED:
        values.setdefault("sliding_window", 16)  # a segment takes 5 + 4 positions: inside the window
    if values["head_dim"] is None:
        del values["head_dim"]
    return AutoConfig.for_model(family, **values)


def with_written_values(model):
    """ARMT's W_mv starts at zero, which leaves its memory inert: give it weights, so the memory matters."""
    with torch.no_grad():
        for layer in getattr(model.memory, "layers", ()):
            layer.W_mv.weight.normal_(0.0, 0.3)
    return model


def tiny_decoder(family: str, seed: int = 0, text_config=None, untrained: bool = False, **rmt) -> RMTForCausalLM:
    torch.manual_seed(seed)
    config = RMTConfig(text_config=text_config or backbone_config(family), num_mem_tokens=MEMORY, segment_size=SEGMENT,
                       **rmt)  # fmt: skip
    model = RMTForCausalLM(config).eval()
    return model if untrained else with_written_values(model)


def greedy(model, input_ids, attention_mask=None, new_tokens: int = 16):
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                          output_logits=True)  # fmt: skip


ENCODERS = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "albert", "deberta-v2",
            "modernbert", "mpnet", "megatron-bert", "ernie", "roformer")  # fmt: skip
ENCODER_OVERRIDES = {
    "distilbert": dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64),
    "electra": dict(embedding_size=32),  # memory fed back as input needs embedding_size == hidden_size
    "albert": dict(embedding_size=32),
}
CLS, SEP = 1, 2


def encoder_config(family: str, **changes):
    values = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64, pad_token_id=0, num_labels=3)  # fmt: skip
    return AutoConfig.for_model(family, **{**values, **ENCODER_OVERRIDES.get(family, {}), **changes})


def tiny_encoder(family: str, text_config_changes: dict | None = None, **rmt) -> RMTForSequenceClassification:
    torch.manual_seed(0)
    text_config = encoder_config(family, **(text_config_changes or {}))
    config = RMTConfig(text_config=text_config, num_mem_tokens=MEMORY, segment_size=6, cls_token_id=CLS,
                       sep_token_id=SEP, **rmt)  # fmt: skip
    return with_written_values(RMTForSequenceClassification(config).eval())


def encoder_memories(family: str) -> list[str]:
    return ["rmt"] if family == "albert" else list(MEMORIES)  # ALBERT shares one layer across depth


def encoder_batch(lengths: list[int], seed: int = 4, side: str = "right") -> dict[str, torch.Tensor]:
    """Documents `[CLS] tokens [SEP]` with these content lengths, padded on one side, and their mask."""
    documents = [torch.cat([torch.tensor([CLS]), ids, torch.tensor([SEP])]) for ids in prompts(lengths, seed=seed)]
    width = max(len(document) for document in documents)
    ids = torch.zeros(len(documents), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, document in enumerate(documents):
        span = slice(0, len(document)) if side == "right" else slice(width - len(document), width)
        ids[i, span], mask[i, span] = document, 1
    return {"input_ids": ids, "attention_mask": mask}


def armt_inputs(family: str) -> tuple:
    if family in ENCODERS:
        return tiny_encoder(family, **ARMT), encoder_batch([40, 23])
    return tiny_decoder(family, **ARMT), {"input_ids": prompts([37, 30], seed=5)[0][None]}


def save_with_code(model, folder: Path) -> None:
    """Save as export ships a model: weights, config and the Hub files beside them."""
    model.save_pretrained(folder)
    package = os.path.dirname(sys.modules["modeling_rmt"].__file__)
    for name in HUB_FILES:
        shutil.copyfile(os.path.join(package, name), folder / name)


FRESH_PROCESS = """import sys, json, torch; sys.modules['modeling_rmt'] = None
import transformers
auto = getattr(transformers, sys.argv[2])
model = auto.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(model).__module__.startswith('transformers_modules'), type(model).__module__
inputs = {key: torch.tensor(value) for key, value in json.loads(sys.argv[3]).items()}
with torch.no_grad():
    print(json.dumps(model(**inputs).logits.tolist()))
"""


def logits_as_remote_code(folder: Path, auto_class: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the saved model loaded with `trust_remote_code=True` in a fresh process (this package hidden)."""
    arguments = json.dumps({key: value.tolist() for key, value in inputs.items()})
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(folder), auto_class, arguments],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))


def assert_reloads_bit_identical_and_as_remote_code(model, folder: Path, inputs: dict[str, torch.Tensor]) -> None:
    """Saved as export ships it, the model reloads bit-identical, and as remote code in a fresh process gives
    the same logits (to float error: another process may pick other kernels)."""
    save_with_code(model, folder)
    with torch.no_grad():
        expected = model(**inputs).logits
    auto_class = "AutoModelForCausalLM" if isinstance(model, RMTForCausalLM) else "AutoModelForSequenceClassification"
    torch.testing.assert_close(logits_as_remote_code(folder, auto_class, inputs), expected, atol=1e-6, rtol=1e-5)
    reloaded = type(model).from_pretrained(folder)
    assert all(torch.equal(value, reloaded.state_dict()[key]) for key, value in model.state_dict().items())
