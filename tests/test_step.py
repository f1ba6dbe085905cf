"""One recurrence: every backbone call of every path (sequential loop, prompt prefill, decoding, encoder heads)
is a call of `RMTPreTrainedModel.step`, and the memory after a path is the state its last writing step returned."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import encode, random_documents, tiny_classifier
from test_armt import tiny_armt_lm
from test_causal_lm import SEGMENT, generate, left_pad, prompts, tiny_lm

from modeling_rmt.memory import AssociativeState
from modeling_rmt.pretrained import RMTPreTrainedModel

MODELS = {"rmt": lambda: tiny_lm("llama"), "armt": lambda: tiny_armt_lm("llama")}


class Recorder:
    """Counts the backbone's calls, and the steps with the calls made inside them and the states they return."""

    def __init__(self, model, backbone) -> None:
        self.backbone_calls, self.inside_steps, self.steps, self.written = 0, 0, 0, []
        self.in_step = False
        step, forward = model.step, backbone.forward

        def recorded_step(call, state):
            self.steps += 1
            self.in_step = True
            try:
                outputs, new_state = step(call, state)
            finally:
                self.in_step = False
            if call.memory_index is not None:
                self.written.append(new_state)
            return outputs, new_state

        def recorded_forward(*args, **kwargs):
            self.backbone_calls += 1
            self.inside_steps += self.in_step
            return forward(*args, **kwargs)

        model.step, backbone.forward = recorded_step, recorded_forward  # on these instances only


def parts(state) -> tuple[torch.Tensor, ...]:
    return (state,) if isinstance(state, torch.Tensor) else tuple(state)


@pytest.mark.parametrize("memory_type", list(MODELS))
def test_every_decoder_path_runs_its_backbone_only_through_the_step(memory_type):
    model = MODELS[memory_type]()
    model.config.diagonal_batching = False  # the reference path (diagonal batching is its own peer, tested apart)
    recorder = Recorder(model, model.backbone.base_model)
    document = prompts([3 * SEGMENT + 2])[0][None]
    with torch.no_grad():
        memory = model(input_ids=document).memory_state
    assert recorder.backbone_calls == recorder.inside_steps == recorder.steps == 4  # one step a segment
    for got, expected in zip(parts(recorder.written[-1]), parts(memory), strict=True):
        assert torch.equal(got, expected)
    recorder.backbone_calls = recorder.inside_steps = recorder.steps = 0
    generate(model, left_pad(prompts([2 * SEGMENT + 1, 4], seed=1)), 2 * SEGMENT)  # boundaries while decoding
    assert recorder.backbone_calls == recorder.inside_steps == recorder.steps > 2 * SEGMENT


def test_encoder_heads_run_their_backbone_only_through_the_step():
    model = tiny_classifier("bert").eval()
    recorder = Recorder(model, model.backbone)
    with torch.no_grad():
        out = model(**encode(random_documents([30, 12])))
    assert recorder.backbone_calls == recorder.inside_steps == recorder.steps == out.segments_mask.shape[1]
    assert torch.equal(recorder.written[-1], out.memory_state)


def test_the_step_is_one_short_function():
    lines = inspect.getsource(RMTPreTrainedModel.step).splitlines()
    assert len(lines) <= 40, f"the recurrence grew to {len(lines)} lines"


def test_the_armt_state_reads_as_the_tuple_it_replaces_and_moves_as_one():
    model = tiny_armt_lm("llama")
    with torch.no_grad():
        state = model(input_ids=prompts([2 * SEGMENT])[0][None]).memory_state
    assert isinstance(state, AssociativeState)
    A, z = state
    assert A is state.A and z is state.z and state[0] is A and state[1] is z and len(state) == 2
    assert A.shape[1] == z.shape[1] == model.config.text_config.num_hidden_layers
    moved = state.to(torch.float64)
    assert isinstance(moved, AssociativeState) and moved.A.dtype == moved.z.dtype == torch.float64
    with pytest.raises(ValueError, match=r"AssociativeState \(A, z\)"):
        model(input_ids=prompts([4])[0][None], memory_state=(A,))
