"""Device and dtype checks: memory follows the backbone's device and dtype, generation crosses boundaries.

Each check runs on the CPU in the default suite and again on CUDA where there is a GPU: the CUDA cases
are marked `gpu` and skipped without one. On a GPU machine, `python -m pytest -m gpu tests/test_gpu.py`
runs the CUDA cases alone (the marker is not excluded by default, so a plain `pytest` runs them too).
"""

from __future__ import annotations

import pytest
import torch
from conftest import encode, random_documents, relative_error, rounding_floor, rounding_tolerance, tiny_classifier
from test_causal_lm import generate, prompts, tiny_lm
from transformers import AutoModelForCausalLM

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_classifier_memory_follows_the_backbone_device_and_dtype(device, dtype):
    model = tiny_classifier("bert").to(device=device, dtype=dtype)
    batch = {k: v.to(device) for k, v in encode(random_documents([5, 30])).items()}
    with torch.no_grad():
        out = model(**batch)
        alone = model(**{k: v[1:] for k, v in batch.items()})
    assert out.memory_state.device.type == device and out.memory_state.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.logits[1:], alone.logits, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generation_on_the_device_equals_the_full_forward(device, dtype):
    model = tiny_lm("llama").to(device=device, dtype=dtype)
    prompt = prompts([17])[0][None].to(device)
    out = generate(model, {"input_ids": prompt}, 16)
    with torch.no_grad():
        full = model(input_ids=out.sequences).logits
    tolerance = 2e-4 if dtype == torch.float32 else 5e-2
    generated = torch.stack(out.logits, 1)  # generate() hands back float32 logits whatever the model's dtype
    torch.testing.assert_close(generated, full[:, 16:-1].float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("device", DEVICES)
def test_device_map_and_sdpa(device, tmp_path):
    tiny_lm("gpt2").save_pretrained(tmp_path)
    device_map = "auto" if device == "cuda" else "cpu"  # "auto" would place the CPU case on a GPU where there is one
    model = AutoModelForCausalLM.from_pretrained(tmp_path, device_map=device_map, attn_implementation="sdpa")
    assert model.memory.memory_tokens.device.type == device
    assert model.config.text_config._attn_implementation == "sdpa"
    prompt = prompts([12])[0][None].to(model.device)
    out = model.generate(input_ids=prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 24)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_armt_diagonal_batching_on_the_device_equals_the_sequential_loop(device, dtype):
    from test_armt import tiny_armt_lm
    from test_causal_lm import SEGMENT, left_pad

    model = tiny_armt_lm("llama").to(device=device, dtype=dtype)
    batch = {k: v.to(device) for k, v in left_pad(prompts([64 * SEGMENT, 20 * SEGMENT + 3, 7, 40])).items()}
    with torch.no_grad():
        sequential = model(**batch)
        model.config.diagonal_batching = True
        diagonal = model(**batch)
    assert sequential.memory_state[0].device.type == device and sequential.memory_state[0].dtype == torch.float32
    error = relative_error(sequential.logits, diagonal.logits)
    model.config.diagonal_batching = False
    assert error <= (rounding_tolerance(rounding_floor(model, **batch)["logits"]) if dtype == torch.float32 else 2e-2)
    model.config.diagonal_batching = True
    if dtype == torch.float32:  # a diagonal prompt, then decoding that writes memory, as the sequential loop
        short = {k: v[2:] for k, v in batch.items()}
        out = generate(model, short, 12)
        model.config.diagonal_batching = False
        assert torch.equal(out.sequences, generate(model, short, 12).sequences)
