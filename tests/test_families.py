"""Any backbone: decoder families found by structure (transformers' own model tables), checked on tiny random
configs built with `AutoConfig.for_model`. For each, RMT and ARMT: greedy generate() across segment boundaries
equals a full forward pass, a left-padded batch equals each prompt alone, and an untrained ARMT (W_mv = 0)
equals its bare backbone segment by segment. Sliding-window backbones are exact while a segment fits the
window and refused with the numbers otherwise; families that cannot work are refused with the reason."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_equal_up_to_rounding
from families import (
    ARMT,
    DECODERS,
    ENCODERS,
    MEMORIES,
    WINDOWED,
    armt_inputs,
    assert_reloads_bit_identical_and_as_remote_code,
    backbone_config,
    greedy,
    tiny_decoder,
    tiny_encoder,
)
from test_causal_lm import MEMORY, SEGMENT, left_pad, prompts
from transformers import AutoConfig

from modeling_rmt import RMTConfig
from modeling_rmt.diagonal import DiagonalExecutor
from modeling_rmt.grouping import LayerClasses


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


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_a_moe_backbone_asking_for_its_router_loss_is_refused_with_the_fix(family):
    # RMT computes its own loss; the experts' load-balancing loss is not added, so asking for it is an error.
    with pytest.raises(ValueError, match="output_router_logits=True.*set output_router_logits=False"):
        tiny_decoder(family, text_config=backbone_config(family, output_router_logits=True))


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text", "mixtral"])
def test_a_saved_model_reloads_bit_identical_and_as_remote_code_in_a_fresh_process(family, tmp_path):
    inputs = {"input_ids": prompts([3 * SEGMENT + 1], seed=3)[0][None]}
    assert_reloads_bit_identical_and_as_remote_code(tiny_decoder(family, **ARMT), tmp_path, inputs)


# ----- diagonal batching --------------------------------------------------------------------------------------


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
