"""Any backbone: decoder families found by structure (transformers' own model tables), checked on tiny random
configs built with `AutoConfig.for_model`. For each, RMT and ARMT: greedy generate() across segment boundaries
equals a full forward pass, a left-padded batch equals each prompt alone, and an untrained ARMT (W_mv = 0)
equals its bare backbone segment by segment. Sliding-window backbones are exact while a segment fits the
window and refused with the numbers otherwise; families that cannot work are refused with the reason."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import assert_equal_up_to_rounding
from test_causal_lm import MEMORY, SEGMENT, VOCAB, left_pad, prompts
from transformers import AutoConfig

from conversion.export import HUB_FILES
from modeling_rmt import RMTConfig, RMTForCausalLM, RMTForSequenceClassification
from modeling_rmt.diagonal import DiagonalExecutor
from modeling_rmt.grouping import LayerClasses

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


@pytest.mark.parametrize("memory", list(MEMORIES))
@pytest.mark.parametrize("family", DECODERS)
def test_greedy_generation_across_segment_boundaries_equals_the_full_forward(family, memory):
    model = tiny_decoder(family, **MEMORIES[memory])
    out = greedy(model, prompts([17])[0][None])  # 4 segments of 5; decoding crosses 3+ boundaries
    with torch.no_grad():
        full = model(input_ids=out.sequences).logits[:, 16:-1]
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full, atol=2e-4, rtol=1e-4)
    top = full.topk(2).values
    decisive = top[..., 0] - top[..., 1] > 1e-3  # untrained logits tie now and then: rounding picks either
    assert torch.equal(full.argmax(-1)[decisive], out.sequences[:, 17:][decisive]) and decisive.sum() >= 8


@pytest.mark.parametrize("memory", list(MEMORIES))
@pytest.mark.parametrize("family", DECODERS)
def test_a_left_padded_batch_generates_what_each_prompt_generates_alone(family, memory):
    model = tiny_decoder(family, **MEMORIES[memory])
    batch = prompts([12, 3, 7], seed=1)
    width = max(len(p) for p in batch)
    padded = left_pad(batch)
    together = greedy(model, padded["input_ids"], padded["attention_mask"], new_tokens=8)
    for i, prompt in enumerate(batch):
        alone = greedy(model, prompt[None], new_tokens=8)
        assert torch.equal(together.sequences[i, width:], alone.sequences[0, len(prompt) :]), f"row {i}"


@pytest.mark.parametrize("family", DECODERS)
def test_an_untrained_armt_equals_its_backbone_segment_by_segment(family):
    model = tiny_decoder(family, untrained=True, **ARMT)  # W_mv = 0 as initialised: the memory reads back nothing
    ids = prompts([3 * SEGMENT + 2])[0][None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        for start in range(0, ids.shape[1], SEGMENT):  # positions restart in every segment
            alone = model.backbone(input_ids=ids[:, start : start + SEGMENT]).logits
            torch.testing.assert_close(logits[:, start : start + SEGMENT], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("memory", list(MEMORIES))
@pytest.mark.parametrize("family", WINDOWED)
def test_a_sliding_window_the_segment_fits_is_exactly_full_attention(family, memory):
    fitting = RMTConfig(text_config=backbone_config(family), num_mem_tokens=MEMORY, segment_size=SEGMENT,
                        **MEMORIES[memory]).segment_input_length  # fmt: skip
    exact = tiny_decoder(family, text_config=backbone_config(family, sliding_window=fitting), **MEMORIES[memory])
    wide = tiny_decoder(family, text_config=backbone_config(family, sliding_window=64), **MEMORIES[memory])
    wide.load_state_dict(exact.state_dict())
    ids = prompts([4 * SEGMENT + 3], seed=2)[0][None]
    with torch.no_grad():
        torch.testing.assert_close(exact(input_ids=ids).logits, wide(input_ids=ids).logits, atol=1e-6, rtol=1e-6)
    assert torch.equal(greedy(exact, ids[:, :13]).sequences, greedy(wide, ids[:, :13]).sequences)
    with pytest.raises(ValueError, match=rf"window of {fitting - 1} positions, and a segment takes {fitting}"):
        tiny_decoder(family, text_config=backbone_config(family, sliding_window=fitting - 1), **MEMORIES[memory])


@pytest.mark.parametrize(
    "family, reason",
    [("t5", "encoder-decoder"), ("bart", "encoder-decoder"), ("whisper", "encoder-decoder"),
     ("vit", "neither a causal LM nor a sequence classification model")],
)  # fmt: skip
def test_a_family_that_cannot_work_is_refused_with_the_reason(family, reason):
    with pytest.raises(ValueError, match=reason):
        RMTConfig(text_config=AutoConfig.for_model(family), num_mem_tokens=MEMORY, segment_size=SEGMENT)


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text", "mixtral"])
def test_a_saved_model_reloads_bit_identical_and_as_remote_code_in_a_fresh_process(family, tmp_path):
    model = tiny_decoder(family, **ARMT)
    model.save_pretrained(tmp_path)
    package = os.path.dirname(sys.modules["modeling_rmt"].__file__)
    for name in HUB_FILES:  # as export ships the code
        shutil.copyfile(os.path.join(package, name), tmp_path / name)
    ids = prompts([3 * SEGMENT + 1], seed=3)[0][None]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    script = ("import sys, json, torch; sys.modules['modeling_rmt'] = None\n"
              "from transformers import AutoModelForCausalLM\n"
              "model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()\n"
              "assert type(model).__module__.startswith('transformers_modules'), type(model).__module__\n"
              "ids = torch.tensor([json.loads(sys.argv[2])])\n"
              "with torch.no_grad():\n"
              "    print(json.dumps(model(input_ids=ids).logits.tolist()))\n")  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path), json.dumps(ids[0].tolist())],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = torch.tensor(json.loads(done.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(loaded, expected, atol=1e-6, rtol=1e-5)  # another process may pick other kernels
    reloaded = RMTForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(value, reloaded.state_dict()[key]) for key, value in model.state_dict().items())


# ----- encoders ------------------------------------------------------------------------------------------------

ENCODERS = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "albert", "deberta-v2",
            "modernbert", "mpnet", "megatron-bert", "ernie", "roformer")  # fmt: skip
ENCODER_OVERRIDES = {
    "distilbert": dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64),
    "electra": dict(embedding_size=32),  # memory fed back as input needs embedding_size == hidden_size
    "albert": dict(embedding_size=32),
}
CLS, SEP = 1, 2


def tiny_encoder(family: str, text_config_changes: dict | None = None, **rmt) -> RMTForSequenceClassification:
    torch.manual_seed(0)
    values = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64, pad_token_id=0, num_labels=3)  # fmt: skip
    values = {**values, **ENCODER_OVERRIDES.get(family, {}), **(text_config_changes or {})}
    text_config = AutoConfig.for_model(family, **values)
    config = RMTConfig(text_config=text_config, num_mem_tokens=MEMORY, segment_size=6, cls_token_id=CLS,
                       sep_token_id=SEP, **rmt)  # fmt: skip
    return with_written_values(RMTForSequenceClassification(config).eval())


def encoder_memories(family: str) -> list[str]:
    return ["rmt"] if family == "albert" else list(MEMORIES)  # ALBERT shares one layer across depth


@pytest.mark.parametrize("family", ENCODERS)
def test_an_encoder_classifies_a_padded_batch_as_each_document_alone(family):
    documents = [torch.cat([torch.tensor([CLS]), ids, torch.tensor([SEP])]) for ids in prompts([20, 7, 13], seed=4)]
    width = max(len(d) for d in documents)
    for memory in encoder_memories(family):
        model = tiny_encoder(family, **MEMORIES[memory])
        with torch.no_grad():
            alone = torch.cat([model(input_ids=d[None]).logits for d in documents])
            for side in ("right", "left"):
                ids = torch.zeros(len(documents), width, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for i, document in enumerate(documents):
                    span = slice(0, len(document)) if side == "right" else slice(width - len(document), width)
                    ids[i, span], mask[i, span] = document, 1
                batched = model(input_ids=ids, attention_mask=mask).logits
                torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5, msg=f"{memory}, {side} padding")


def test_armt_on_a_backbone_that_shares_its_layers_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="share one layer across depth, as ALBERT does"):
        tiny_encoder("albert", **ARMT)


# ----- diagonal batching --------------------------------------------------------------------------------------


def armt_inputs(family: str) -> tuple:
    if family in ENCODERS:
        documents = [torch.cat([torch.tensor([CLS]), ids, torch.tensor([SEP])]) for ids in prompts([40, 23], seed=4)]
        ids = torch.zeros(2, 42, dtype=torch.long)
        for i, document in enumerate(documents):
            ids[i, : len(document)] = document
        return tiny_encoder(family, **ARMT), {"input_ids": ids, "attention_mask": (ids != 0).long()}
    return tiny_decoder(family, **ARMT), {"input_ids": prompts([37, 30], seed=5)[0][None]}


def both_ways(model, inputs: dict) -> tuple:
    with torch.no_grad():
        model.config.diagonal_batching = False
        sequential = model(**inputs)
        model.config.diagonal_batching = True
        return sequential, model(**inputs)


@pytest.mark.parametrize("family", [family for family in DECODERS + ENCODERS if family != "albert"])
def test_diagonal_batching_equals_the_sequential_loop(family):
    model, inputs = armt_inputs(family)
    sequential, diagonal = both_ways(model, inputs)
    assert_equal_up_to_rounding(model, inputs, sequential, diagonal)


@pytest.mark.parametrize("family", ["gemma3_text", "gemma2", "qwen2"])
def test_diagonal_batching_gives_local_and_global_layers_their_own_inputs(family):
    # Hybrid backbones give each kind of layer its own inputs (its own mask; Gemma3 its global layers another
    # rotary table than its local ones): each layer must get what the backbone gives it, not what the first
    # layer got. Run with the first layer's inputs, gemma3_text's logits were off by 0.016 here.
    changes = dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=32)
    if family == "qwen2":
        changes["use_sliding_window"] = True
    model = tiny_decoder(family, text_config=backbone_config(family, **changes), **ARMT)
    inputs = {"input_ids": prompts([37, 30], seed=5)[0][None]}
    sequential, diagonal = both_ways(model, inputs)
    assert_equal_up_to_rounding(model, inputs, sequential, diagonal)
    if family == "gemma3_text":  # the two rotary tables differ, so a global layer given local inputs would be off
        config = model.config.text_config
        assert config.rope_parameters["full_attention"] != config.rope_parameters["sliding_attention"]


def test_layers_of_another_structure_get_a_grouped_layer_of_their_own():
    # ModernBERT's first layer has no attention norm: it runs apart from the others, which share one.
    _, inputs = armt_inputs("modernbert")
    model = tiny_encoder("modernbert", **ARMT, text_config_changes=dict(num_hidden_layers=3))
    classes = LayerClasses([layer.layer for layer in model.memory.layers])
    assert classes.members == [[0], [1, 2]]
    sequential, diagonal = both_ways(model, inputs)
    assert_equal_up_to_rounding(model, inputs, sequential, diagonal)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_expert_weights_run_cell_by_cell_and_the_rest_grouped(family):
    # Experts pick their rows by the router's choice, which vmap cannot batch (the diagonal test above checks
    # the result); the router and attention still run for all cells in one call.
    model, _ = armt_inputs(family)
    modules = [module for layer in DiagonalExecutor(model.memory).layers.grouped for module in layer.grouped]
    per_expert = [type(module.template[0]).__name__ for module in modules if module.per_expert]
    assert len(per_expert) == 1 and per_expert[0].endswith("Experts"), per_expert
    assert len(modules) > 1


def test_a_backbone_that_changes_hidden_states_between_layers_is_refused_with_the_reason():
    model = tiny_encoder("deberta-v2", **ARMT, text_config_changes=dict(conv_kernel_size=3))
    _, inputs = armt_inputs("deberta-v2")
    with torch.no_grad():
        model(**inputs)  # the sequential loop runs it
        model.config.diagonal_batching = True
        with pytest.raises(ValueError, match="changes the hidden states between layers 0 and 1"):
            model(**inputs)
