"""RMTGenerationCache: generate()'s state is a transformers Cache whose own methods expand, select and reorder
the memory together with the backbone's KV cache."""

from __future__ import annotations

import pytest
import torch
from test_armt import tiny_armt_lm
from test_causal_lm import generate, left_pad, prompts, tiny_lm
from transformers import Cache, DynamicCache

from modeling_rmt import RMTGenerationCache
from modeling_rmt.outputs import CACHE_NAME

MODELS = {"rmt": lambda: tiny_lm("llama"), "armt": lambda: tiny_armt_lm("llama")}


def memories(model, documents: list[torch.Tensor]):
    """The memory after reading each document (batched, left-aligned documents of one length)."""
    with torch.no_grad():
        return model(input_ids=torch.stack(documents)).memory_state


def select_rows(state, rows: list[int]):
    index = torch.tensor(rows)
    return state[index] if isinstance(state, torch.Tensor) else tuple(part[index] for part in state)  # ARMT: a tuple


def read_prompts(model, batch: dict[str, torch.Tensor], state=None) -> RMTGenerationCache:
    """A cache that has read `batch` (as generate()'s first step does), then decoded two tokens."""
    cache = RMTGenerationCache(model.memory, state)
    with torch.no_grad():
        model(**batch, cache=cache)
        for token in (5, 6):
            model(input_ids=torch.full((batch["input_ids"].shape[0], 1), token), cache=cache)
    return cache


def test_generate_carries_an_rmt_generation_cache_that_is_a_transformers_cache():
    model = tiny_lm("gpt2")
    out = generate(model, {"input_ids": prompts([12])[0][None]}, 9)
    cache = getattr(out, CACHE_NAME)
    assert isinstance(cache, RMTGenerationCache) and isinstance(cache, Cache)
    assert cache.get_seq_length() == 12 + 9 - 1  # every token read but the last one generated
    assert not cache.is_compileable and not cache.is_croppable
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(1)


@pytest.mark.parametrize("memory_type", list(MODELS))
def test_beam_search_returning_several_sequences_from_a_memory_state_equals_each_row_alone(memory_type):
    model = MODELS[memory_type]()
    documents, questions = prompts([10, 10], seed=2), prompts([7, 4], seed=3)
    state = memories(model, documents)  # a different memory for each prompt: rows must not mix
    beams = dict(num_beams=3, num_return_sequences=2, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                 pad_token_id=0)  # fmt: skip
    batched = model.generate(**left_pad(questions), memory_state=state, **beams)
    width = max(len(q) for q in questions)
    for i, question in enumerate(questions):
        alone = model.generate(input_ids=question[None], memory_state=select_rows(state, [i]), **beams)
        assert torch.equal(batched[2 * i : 2 * i + 2, width:], alone[:, len(question) :])


@pytest.mark.parametrize("memory_type", list(MODELS))
def test_sampled_sequences_from_a_memory_state_each_equal_their_full_forward(memory_type):
    model = MODELS[memory_type]()
    documents, questions = prompts([10, 10], seed=2), prompts([6, 6], seed=3)
    state = memories(model, documents)
    torch.manual_seed(0)
    out = generate(model, {"input_ids": torch.stack(questions)}, 11, memory_state=state, do_sample=True,
                   num_return_sequences=3, top_k=0)  # fmt: skip
    repeated = select_rows(state, [0, 0, 0, 1, 1, 1])  # each prompt's memory, once per returned sequence
    with torch.no_grad():
        full = model(input_ids=out.sequences, memory_state=repeated).logits
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full[:, 5:-1], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("memory_type", list(MODELS))
def test_select_repeat_and_reorder_act_on_memory_kv_and_bookkeeping_alike(memory_type):
    model = MODELS[memory_type]()
    batch = left_pad(prompts([13, 4, 9], seed=5))  # rows at different segment phases
    state = memories(model, prompts([10, 10, 10], seed=6))
    cache = read_prompts(model, batch, state)
    keys, memory = cache.key_values.layers[0].keys.clone(), cache.memory_state
    filled, valid = cache.filled.host.clone(), cache.valid.host.clone()

    def parts(state):
        return (state,) if isinstance(state, torch.Tensor) else tuple(state)

    rows = torch.tensor([2, 0])
    cache.batch_select_indices(rows)
    assert torch.equal(cache.key_values.layers[0].keys, keys[rows])
    assert all(torch.equal(a, b[rows]) for a, b in zip(parts(cache.memory_state), parts(memory), strict=True))
    assert torch.equal(cache.filled.host, filled[rows]) and torch.equal(cache.filled.on_device, filled[rows])
    assert torch.equal(cache.valid.host, valid[rows]) and torch.equal(cache.valid.on_device, valid[rows])

    cache.batch_repeat_interleave(2)  # rows 2, 2, 0, 0
    repeated = torch.tensor([2, 2, 0, 0])
    assert torch.equal(cache.key_values.layers[0].keys, keys[repeated])
    assert all(torch.equal(a, b[repeated]) for a, b in zip(parts(cache.memory_state), parts(memory), strict=True))
    assert torch.equal(cache.filled.on_device, filled[repeated]) and torch.equal(cache.valid.host, valid[repeated])

    beams = torch.tensor([1, 0, 3, 2])  # beams move within their prompt's group
    cache.reorder_cache(beams)
    assert torch.equal(cache.key_values.layers[0].keys, keys[repeated[beams]])
    assert all(
        torch.equal(a, b[repeated[beams]]) for a, b in zip(parts(cache.memory_state), parts(memory), strict=True)
    )

    # Decoding on from the selected rows equals decoding the same prompts read alone, across a boundary.
    selected = {key: value[[2, 0]] for key, value in batch.items()}
    fresh = read_prompts(model, selected, select_rows(state, [2, 0]))
    fresh.batch_repeat_interleave(2)
    with torch.no_grad():
        for token in range(7, 14):
            ids = torch.full((4, 1), token)
            got = model(input_ids=ids, cache=cache).logits
            torch.testing.assert_close(got, model(input_ids=ids, cache=fresh).logits, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == fresh.get_seq_length()


def test_another_cache_or_none_is_refused():
    model, prompt = tiny_lm("gpt2"), {"input_ids": prompts([6])[0][None], "max_new_tokens": 2, "pad_token_id": 0}
    with pytest.raises(ValueError, match="keeps its own decoding cache"):
        model(input_ids=prompt["input_ids"], cache=DynamicCache())
    for name in ("cache", "past_key_values"):  # the current name and the old one (deprecated from 5.24 on)
        with pytest.raises(ValueError, match="keeps its own decoding cache"):
            model.generate(**prompt, **{name: DynamicCache()})
    with pytest.raises(ValueError, match="needs use_cache=True"):
        model.generate(**prompt, use_cache=False)
