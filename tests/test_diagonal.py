"""Diagonal batching (config.diagonal_batching) against the sequential segment loop."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_equal_up_to_rounding,
    encode,
    random_documents,
    relative_error,
    rounding_floor,
    rounding_tolerance,
    tiny_classifier,
)
from test_armt import ARMT, tiny_armt_lm, with_written_values
from test_causal_lm import SEGMENT, generate, left_pad, prompts

import modeling_rmt.grouping as grouping_module
from modeling_rmt import RMTConfig
from modeling_rmt.diagonal import DiagonalExecutor

DECODERS = ["llama", "gpt2", "gpt_neox", "qwen2", "mistral"]
ENCODERS = ["bert", "roberta", "distilbert", "electra", "xlm-roberta", "camembert"]


def both_ways(model, **inputs):
    """The model's outputs with the sequential loop and with diagonal batching."""
    with torch.no_grad():
        model.config.diagonal_batching = False
        sequential = model(**inputs)
        model.config.diagonal_batching = True
        diagonal = model(**inputs)
    return sequential, diagonal


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("segments", [1, 2, 7, 64])
def test_causal_lm_logits_and_memory_equal_the_sequential_loop(family, segments):
    model = tiny_armt_lm(family)
    single = prompts([segments * SEGMENT])[0][None]
    lengths = [segments * SEGMENT, max(1, segments * SEGMENT - 3), max(1, segments * SEGMENT // 2), 2]
    for inputs in ({"input_ids": single}, left_pad(prompts(lengths, seed=3))):  # batch 1 and 4
        sequential, diagonal = both_ways(model, **inputs)
        assert_equal_up_to_rounding(model, inputs, sequential, diagonal)
        assert sequential.memory_state[0].abs().sum() > 0


@pytest.mark.parametrize("family", ENCODERS)
def test_classifier_equals_the_sequential_loop(family):
    # Moderate written values: a random ARMT with large ones amplifies rounding from segment to segment.
    model = with_written_values(tiny_classifier(family, **ARMT), std=0.1)
    output_layer = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Linear)][-1]
    torch.nn.init.normal_(output_layer.weight, std=1.0)  # logits of order one
    for padding_side in ("right", "left"):
        for documents in (random_documents([100]), random_documents([3, 40, 17, 8])):  # 13 segments; mixed
            batch = encode(documents, padding_side)
            inputs = {**batch, "output_hidden_states": True}
            sequential, diagonal = both_ways(model, **inputs)
            assert_equal_up_to_rounding(model, inputs, sequential, diagonal)
            assert sequential.memory_state[0].abs().sum() > 0


def test_the_rounding_tolerance_refuses_a_difference_beyond_rounding():
    model = with_written_values(tiny_classifier("xlm-roberta", **ARMT), std=0.1)
    inputs = encode(random_documents([100]))
    sequential, diagonal = both_ways(model, **inputs)
    assert_equal_up_to_rounding(model, inputs, sequential, diagonal)
    diagonal.memory_state = (diagonal.memory_state[0] * (1 + 2e-4), diagonal.memory_state[1])
    with pytest.raises(AssertionError, match=r"memory_state\[0\]: relative difference"):
        assert_equal_up_to_rounding(model, inputs, sequential, diagonal)


def test_generation_reads_the_prompt_diagonally_with_the_same_result():
    model = tiny_armt_lm("llama")
    batch = left_pad(prompts([43, 50, 7, 21]))
    sequential = generate(model, batch, 12)
    model.config.diagonal_batching = True
    diagonal = generate(model, batch, 12)
    assert torch.equal(sequential.sequences, diagonal.sequences)
    floor = rounding_floor(model, **batch)["logits"]  # the prompt's: diagonal batching reads the prompt
    assert relative_error(torch.stack(sequential.logits), torch.stack(diagonal.logits)) <= rounding_tolerance(floor)


def test_normalised_features_run_diagonally_with_the_same_result():
    model = tiny_armt_lm("qwen2", armt_normalize_features=True)
    inputs = left_pad(prompts([7 * SEGMENT, 3 * SEGMENT + 2], seed=5))
    sequential, diagonal = both_ways(model, **inputs)
    assert_equal_up_to_rounding(model, inputs, sequential, diagonal)
    plain = tiny_armt_lm("qwen2")
    with torch.no_grad():
        z = plain(**left_pad(prompts([7 * SEGMENT, 3 * SEGMENT + 2], seed=5))).memory_state[1]
    assert not torch.allclose(z, sequential.memory_state[1])  # the option changes the memory


def diagonal_model(family: str):
    return tiny_armt_lm(family) if family in DECODERS else tiny_classifier(family, **ARMT)


@pytest.mark.parametrize("family", DECODERS + ENCODERS)
def test_supported_families_run_their_layer_weights_as_batched_products(family):
    executor = DiagonalExecutor(diagonal_model(family).memory)
    grouped_modules = [module for layer in executor.layers.grouped for module in layer.grouped]
    assert grouped_modules, "the grouped layer holds the layers' weights"
    assert len(executor.layers.grouped) == 1, "the layers share one grouped layer"
    under_vmap = [type(grouped.template[0]).__name__ for grouped in grouped_modules if grouped.direct is None]
    assert under_vmap == [], f"{family}: these modules fall back to vmap (slower): {under_vmap}"


def test_modules_without_a_direct_form_run_under_vmap_with_the_same_result(monkeypatch):
    calls = []

    def counting_vmap(*args, **kwargs):
        calls.append(1)
        return torch.func.vmap(*args, **kwargs)

    monkeypatch.setattr(grouping_module, "vmap", counting_vmap)
    model = tiny_armt_lm("llama")
    inputs = left_pad(prompts([7 * SEGMENT, 3 * SEGMENT + 5], seed=4))
    with torch.no_grad():
        model.config.diagonal_batching = True
        direct = model(**inputs)
        assert calls == []
        grouped_modules = [module for layer in model.diagonal_executor.layers.grouped for module in layer.grouped]
        for grouped in grouped_modules:  # as for a family whose modules are not known
            grouped.direct = None
        under_vmap = model(**inputs)
        model.config.diagonal_batching = False
        sequential = model(**inputs)
    assert_equal_up_to_rounding(model, inputs, sequential, under_vmap)
    assert_equal_up_to_rounding(model, inputs, direct, under_vmap)
    assert calls, "the vmap path ran"


def test_stacked_weights_follow_weight_updates():
    model = tiny_armt_lm("gpt2")
    ids = prompts([4 * SEGMENT])[0][None]
    both_ways(model, input_ids=ids)
    with torch.no_grad():
        model.memory.layers[1].layer.mlp.c_fc.weight.mul_(1.5)
        model.memory.layers[0].W_mv.weight.mul_(-1)
    sequential, diagonal = both_ways(model, input_ids=ids)
    assert_equal_up_to_rounding(model, {"input_ids": ids}, sequential, diagonal)


def test_the_stacked_weights_are_freed_on_request_and_for_training():
    model = tiny_armt_lm("gpt2", diagonal_batching=True)
    ids = prompts([4 * SEGMENT])[0][None]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert model.diagonal_executor is not None
    model.release_diagonal_weights()
    assert model.diagonal_executor is None
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)  # rebuilt on use
    model.train()
    assert model.diagonal_executor is None


def test_the_stacked_weights_stay_out_of_the_state_dict_and_the_backbone_keeps_its_layers():
    model = tiny_armt_lm("llama", diagonal_batching=True).eval()
    keys, parameters = list(model.state_dict()), list(model.parameters())
    layers = list(model.backbone.model.layers)
    with torch.no_grad():
        model(input_ids=prompts([4 * SEGMENT])[0][None])
    assert model.diagonal_executor is not None
    assert list(model.state_dict()) == keys and list(model.parameters()) == parameters
    assert list(model.backbone.model.layers) == layers == list(model.memory.layers)


def test_training_uses_the_sequential_loop():
    model = tiny_armt_lm("llama", diagonal_batching=True).train()
    ids = prompts([3 * SEGMENT])[0][None]
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.memory.layers[0].W_mv.weight.grad.abs().sum() > 0


def test_gradients_in_eval_mode_flow_as_in_the_sequential_loop():
    """Eval mode with gradients on (saliency, probing): the sequential loop runs and every weight gets
    its gradient; diagonal batching serves only inference without gradients."""
    grads = {}
    for diagonal in (False, True):
        model = tiny_armt_lm("llama", diagonal_batching=diagonal).eval()
        ids = prompts([3 * SEGMENT])[0][None]
        model(input_ids=ids, labels=ids).loss.backward()
        grads[diagonal] = {name: p.grad for name, p in model.named_parameters() if ".layers.0." in name}
    assert len(grads[True]) >= 13 and grads[True].keys() == grads[False].keys()  # the layer and W_mq .. W_mb
    assert all(grad is not None and grad.abs().sum() > 0 for grad in grads[True].values())
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad)


def test_a_memory_without_layers_is_refused_with_the_reason():
    text_config = tiny_armt_lm("gpt2").config.text_config
    with pytest.raises(ValueError, match="memory_type='armt'"):
        RMTConfig(text_config=text_config, diagonal_batching=True)
