"""RMTForCausalLM: segment recurrence, loss across boundaries, and generate() that keeps writing memory."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
from transformers.generation.streamers import BaseStreamer

from modeling_rmt import RMTConfig, RMTForCausalLM

VOCAB, SEGMENT, MEMORY = 64, 5, 2
DECODERS = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=2, n_positions=64),
    "llama": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=64),
    "gpt_neox": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64),
    "qwen2": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, max_position_embeddings=64),
    "mistral": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=64, max_position_embeddings=64, sliding_window=None),
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=64, is_decoder=True),  # an encoder run as a decoder
}  # fmt: skip
TOKENS = dict(bos_token_id=1, eos_token_id=None, pad_token_id=0)  # no end token: lengths are exact


def tiny_lm(family: str = "gpt2", seed: int = 0, **rmt_kwargs) -> RMTForCausalLM:
    torch.manual_seed(seed)
    text_config = AutoConfig.for_model(family, vocab_size=VOCAB, **DECODERS[family], **TOKENS)
    config = RMTConfig(text_config=text_config, num_mem_tokens=MEMORY, segment_size=SEGMENT, **rmt_kwargs)
    model = RMTForCausalLM(config).eval()
    with torch.no_grad():  # sharper output distributions, so greedy paths are not all one token
        final_norm = [m for m in model.backbone.base_model.modules() if isinstance(m, torch.nn.Module)
                      and type(m).__name__.endswith(("LayerNorm", "RMSNorm"))][-1]  # fmt: skip
        final_norm.weight.mul_(20)
    return model


def prompts(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=generator) for n in lengths]


def left_pad(sequences: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in sequences)
    input_ids = torch.zeros(len(sequences), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, seq in enumerate(sequences):
        input_ids[i, width - len(seq) :] = seq
        attention_mask[i, width - len(seq) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def generate(model, batch, new_tokens: int, **kwargs):
    return model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, return_dict_in_generate=True,
                          output_logits=True, pad_token_id=0, **kwargs)  # fmt: skip


@pytest.mark.parametrize("family", list(DECODERS))
def test_greedy_generation_equals_recomputing_the_full_forward(family):
    model = tiny_lm(family)
    prompt = prompts([17])[0][None]  # 4 segments of 5: generation continues the partial 4th
    out = generate(model, {"input_ids": prompt}, 16)  # crosses 3+ segment boundaries
    sequence = out.sequences
    with torch.no_grad():
        full = model(input_ids=sequence).logits
    steps = torch.stack(out.logits, dim=1)  # [1, 16, V]
    torch.testing.assert_close(steps, full[:, 16:-1], atol=2e-4, rtol=1e-4)
    assert torch.equal(full[:, 16:-1].argmax(-1), sequence[:, 17:])
    if family not in ("gpt2", "bert"):  # random tied-embedding models repeat one token: the logits check it
        assert len(set(sequence[0, 17:].tolist())) > 2, "a degenerate greedy path would prove little"


def test_left_padded_batch_generates_what_each_prompt_generates_alone():
    model = tiny_lm("llama")
    batch_prompts = prompts([17, 9, 23, 5, 1, 10])  # partial, exact-multiple and one-token prompts
    batched = generate(model, left_pad(batch_prompts), 13)
    width = max(len(p) for p in batch_prompts)
    for i, prompt in enumerate(batch_prompts):
        alone = generate(model, {"input_ids": prompt[None]}, 13)
        assert torch.equal(batched.sequences[i, width:], alone.sequences[0, len(prompt) :])
        for step, (a, b) in enumerate(zip(batched.logits, alone.logits, strict=True)):
            torch.testing.assert_close(a[i], b[0], atol=2e-4, rtol=1e-4, msg=f"step {step}")


def test_beam_search_scores_match_the_full_forward_across_boundaries():
    model = tiny_lm("gpt2")
    prompt = prompts([12])[0][None]
    out = model.generate(input_ids=prompt, num_beams=3, num_return_sequences=3, max_new_tokens=12,
                         min_new_tokens=12, length_penalty=0.0, do_sample=False, return_dict_in_generate=True,
                         output_scores=True, pad_token_id=0)  # fmt: skip
    with torch.no_grad():
        log_probs = model(input_ids=out.sequences).logits.log_softmax(-1)
    new = out.sequences[:, 12:]
    totals = log_probs[:, 11:-1].gather(-1, new[..., None]).squeeze(-1).sum(-1)
    torch.testing.assert_close(out.sequences_scores, totals, atol=1e-3, rtol=1e-4)
    assert len({tuple(s) for s in new.tolist()}) == 3


def test_beam_search_on_a_batch_of_prompts_equals_each_prompt_alone():
    model = tiny_lm("llama")
    batch_prompts = prompts([13, 6], seed=4)
    beams = dict(num_beams=3, max_new_tokens=11, min_new_tokens=11, do_sample=False, pad_token_id=0)
    batched = model.generate(**left_pad(batch_prompts), **beams)
    width = max(len(p) for p in batch_prompts)
    for i, prompt in enumerate(batch_prompts):
        alone = model.generate(input_ids=prompt[None], **beams)
        assert torch.equal(batched[i, width:], alone[0, len(prompt) :])


def test_sampling_crosses_boundaries_with_the_right_memory():
    model = tiny_lm("gpt_neox")
    torch.manual_seed(1)
    out = generate(model, {"input_ids": prompts([8])[0][None]}, 14, do_sample=True, top_k=0, temperature=1.0)
    with torch.no_grad():
        full = model(input_ids=out.sequences).logits
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full[:, 7:-1], atol=2e-4, rtol=1e-4)


def test_reading_a_document_once_then_asking_equals_one_long_call():
    model = tiny_lm("qwen2")
    document, question = prompts([15, 7])  # the document fills exactly three segments
    with torch.no_grad():
        memory = model(input_ids=document[None]).memory_state
    answers = [generate(model, {"input_ids": question[None]}, 9, memory_state=memory) for _ in range(2)]
    whole = generate(model, {"input_ids": torch.cat([document, question])[None]}, 9)
    assert torch.equal(answers[0].sequences[0, 7:], whole.sequences[0, 22:])
    assert torch.equal(answers[1].sequences, answers[0].sequences)  # the memory is not consumed


def test_streamer_and_stopping_see_every_token():
    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens = []

        def put(self, value):
            self.tokens.extend(value.flatten().tolist())

        def end(self):
            self.tokens.append("end")

    model, streamer = tiny_lm("gpt2"), Collect()
    prompt = prompts([6])[0][None]
    out = model.generate(input_ids=prompt, max_new_tokens=11, do_sample=False, streamer=streamer, pad_token_id=0)
    assert streamer.tokens == out[0].tolist() + ["end"]  # the prompt first, then each new token


def test_loss_is_one_shifted_cross_entropy_over_all_segments():
    model = tiny_lm("gpt2")
    ids = prompts([23])[0][None]
    labels = ids.clone()
    labels[:, :10] = -100  # loss on the tail only
    out = model(input_ids=ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[0, :-1], labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert model.memory.memory_tokens.grad.abs().sum() > 0


def test_loss_over_the_last_logits_only_equals_the_full_loss_and_names_a_short_window():
    model = tiny_lm("llama")
    ids = torch.stack(prompts([23, 23], seed=3))
    mask = torch.ones_like(ids)
    mask[1, 19:] = 0  # a right-padded row
    labels = torch.full_like(ids, -100)
    labels[0, 20:], labels[1, 16:19] = ids[0, 20:], ids[1, 16:19]
    full = model(input_ids=ids, attention_mask=mask, labels=labels)
    window = model(input_ids=ids, attention_mask=mask, labels=labels, logits_to_keep=8)
    torch.testing.assert_close(window.loss, full.loss)
    torch.testing.assert_close(window.logits, full.logits[:, -8:])
    window.loss.backward()
    assert model.memory.memory_tokens.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="logits_to_keep >= 8"):
        model(input_ids=ids, attention_mask=mask, labels=labels, logits_to_keep=7)


@pytest.mark.parametrize("depth", [0, 1])
def test_truncated_bptt_still_trains_the_initial_memory_through_the_first_segments_loss(depth):
    model = tiny_lm(bptt_depth=depth)  # eval mode: no dropout; gradients still flow
    document = prompts([3 * SEGMENT])[0][None]  # three full segments

    def memory_gradient(labels: torch.Tensor, depth: int) -> torch.Tensor:
        model.zero_grad()
        model.config.bptt_depth = depth
        model(input_ids=document, labels=labels).loss.backward()
        return model.memory.memory_tokens.grad.clone()

    truncated = memory_gradient(document, depth)
    first_segments_own = document.clone()
    first_segments_own[:, SEGMENT + 1 :] = -100  # the SEGMENT predictions made inside segment 0
    reference = memory_gradient(first_segments_own, -1) * SEGMENT / (3 * SEGMENT - 1)  # a mean over all tokens
    assert truncated.abs().sum() > 0
    torch.testing.assert_close(truncated, reference, atol=1e-7, rtol=1e-4)


def test_right_padded_training_batch_equals_each_sequence_alone():
    model = tiny_lm("llama")
    sequences = prompts([14, 6])
    input_ids = torch.zeros(2, 14, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, seq in enumerate(sequences):
        input_ids[i, : len(seq)], attention_mask[i, : len(seq)] = seq, 1
    with torch.no_grad():
        batched = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
        for i, seq in enumerate(sequences):
            alone = model(input_ids=seq[None])
            torch.testing.assert_close(batched.logits[i, : len(seq)], alone.logits[0], atol=1e-5, rtol=1e-5)


def test_tied_embeddings_survive_save_and_load(tmp_path):
    model = tiny_lm("gpt2")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, RMTForCausalLM)
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    ids = prompts([12])[0][None]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_clear_errors_for_bad_input():
    model = tiny_lm("gpt2")
    batch = left_pad(prompts([6, 9]))
    right = {key: value.flip(1) for key, value in batch.items()}
    with pytest.raises(ValueError, match="padding on the right"):
        model.generate(**right, max_new_tokens=3, pad_token_id=0)
    with pytest.raises(ValueError, match="labels have shape"):
        model(input_ids=batch["input_ids"], labels=batch["input_ids"][:, :-1])
    for empty in (torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 5, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"hold no tokens: pass at least one document"):
            model(input_ids=empty)
    with pytest.raises(ValueError, match="The prompt is empty"):
        model.generate(input_ids=torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3, pad_token_id=0)
    no_tokens = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"].clone()}
    no_tokens["attention_mask"][1] = 0
    with pytest.raises(ValueError, match=r"Prompt\(s\) at batch index \[1\] have no tokens"):
        model.generate(**no_tokens, max_new_tokens=3, pad_token_id=0)
    with pytest.raises(TypeError, match="inputs_embed"):  # an unsupported argument is named, never swallowed
        model(input_ids=batch["input_ids"], inputs_embed=torch.zeros(2, 9, 32))
    with pytest.raises(ValueError, match="token_type_ids"):
        model(input_ids=batch["input_ids"], token_type_ids=torch.ones_like(batch["input_ids"]))
    with pytest.raises(ValueError, match="memory_state has shape"):
        model.generate(**batch, memory_state=torch.zeros(2, MEMORY + 1, 32), max_new_tokens=3, pad_token_id=0)
    with pytest.raises(ValueError, match="drop prefill_chunk_size"):
        model.generate(**batch, max_new_tokens=3, pad_token_id=0, prefill_chunk_size=4)
    with pytest.raises(ValueError, match="keeps its own decoding cache"):
        model.generate(**batch, max_new_tokens=3, pad_token_id=0, cache_implementation="static")
    one = {key: value[:1] for key, value in batch.items()}
    for inputs in (batch, one):  # the project's message for any batch size, before transformers' own checks
        with pytest.raises(ValueError, match="does not support assisted or prompt-lookup decoding"):
            model.generate(**inputs, max_new_tokens=3, pad_token_id=0, prompt_lookup_num_tokens=2)
        with pytest.raises(ValueError, match=r"assistant_model set\): its memory is stateful"):
            model.generate(**inputs, max_new_tokens=3, pad_token_id=0, assistant_model=model)
        with pytest.raises(ValueError, match=r"Drop prompt_lookup_num_tokens \(from the generation config too\)"):
            model.generate(**inputs, generation_config=GenerationConfig(prompt_lookup_num_tokens=2, max_new_tokens=3))
    with pytest.raises(ValueError, match="sliding window of 8 positions, and a segment takes 12"):
        RMTConfig(text_config=AutoConfig.for_model("mistral", **{**DECODERS["mistral"], "sliding_window": 8}),
                  num_mem_tokens=2, segment_size=8)  # fmt: skip
    with pytest.raises(ValueError, match="needs a decoder backbone"):
        RMTForCausalLM(RMTConfig(text_config=AutoConfig.for_model("bert", hidden_size=32, num_hidden_layers=1,
                                                                  num_attention_heads=2, intermediate_size=32),
                                 num_mem_tokens=2, segment_size=8, cls_token_id=1, sep_token_id=2))  # fmt: skip


def test_a_plain_call_with_use_cache_returns_every_logit():
    """use_cache only matters inside generate(): a user's forward call gets the full logits."""
    model = tiny_lm("llama")
    batch = left_pad(prompts([7, 12]))
    with torch.no_grad():
        plain = model(**batch).logits
        cached = model(**batch, use_cache=True).logits
        typed = model(**batch, token_type_ids=torch.zeros_like(batch["input_ids"])).logits
    assert cached.shape == plain.shape == (2, 12, VOCAB)
    assert torch.equal(cached, plain) and torch.equal(typed, plain)


RECALL_SEGMENT = 8


def recall_batch(size: int, generator: torch.Generator) -> torch.Tensor:
    """`key value` opens segment 1, filler fills it and segment 2, segment 3 asks `QUERY key` -> value."""
    keys = torch.randint(3, 11, (size, 1), generator=generator)
    values = torch.randint(11, 19, (size, 1), generator=generator)
    filler = torch.randint(19, VOCAB, (size, 2 * RECALL_SEGMENT - 2), generator=generator)
    return torch.cat([keys, values, filler, torch.full((size, 1), 2), keys, values], dim=1)


def train_on_answers(model, next_batch, steps: int, lr: float) -> None:
    """Train with the loss on each sequence's last (answer) token only."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        ids = next_batch()
        labels = torch.full_like(ids, -100)
        labels[:, -1] = ids[:, -1]
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def answer_accuracy(model, prompt: torch.Tensor, answers: torch.Tensor) -> float:
    """Share of prompts whose greedy `generate()` next token is the answer."""
    with torch.no_grad():
        answer = model.generate(input_ids=prompt, max_new_tokens=1, do_sample=False, pad_token_id=0)[:, -1]
    return (answer == answers).float().mean().item()


def train_recall(model, window: int | None, steps: int = 300) -> float:
    """Train on the answer token only; return greedy `generate()` accuracy on held-out sequences."""
    generator = torch.Generator().manual_seed(0)
    train_on_answers(model, lambda: recall_batch(64, generator)[:, -(window or 0) :], steps, lr=1e-3)
    test = recall_batch(256, torch.Generator().manual_seed(1))
    prompt = test[:, :-1][:, -(window - 1) :] if window else test[:, :-1]
    return answer_accuracy(model, prompt, test[:, -1])


def test_trained_rmt_recalls_a_pair_from_two_segments_back_where_the_bare_backbone_cannot():
    torch.manual_seed(0)
    text_config = AutoConfig.for_model("llama", vocab_size=VOCAB, **DECODERS["llama"], **TOKENS)
    rmt = RMTForCausalLM(RMTConfig(text_config=text_config, num_mem_tokens=4, segment_size=RECALL_SEGMENT))
    torch.manual_seed(0)
    bare = AutoModelForCausalLM.from_config(text_config)
    window = RECALL_SEGMENT + 2 * 4  # the bare backbone gets as many positions as one RMT segment
    assert recall_batch(1, torch.Generator()).shape[1] > window + 1  # the fact lies outside its window
    rmt_accuracy, bare_accuracy = train_recall(rmt, None), train_recall(bare, window)
    assert rmt_accuracy >= 0.9
    assert bare_accuracy <= 0.3  # chance is 1/8: without memory the value is gone


def test_conversion_of_a_decoder_backbone_keeps_its_weights(tmp_path):
    from conftest import word_tokenizer

    from conversion.from_backbone import main as convert

    torch.manual_seed(0)
    backbone = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=VOCAB, **DECODERS["llama"]))
    backbone.save_pretrained(tmp_path / "backbone")
    word_tokenizer(VOCAB).save_pretrained(tmp_path / "backbone")
    convert([str(tmp_path / "backbone"), str(tmp_path / "rmt"), "--head", "causal-lm", "--num-mem-tokens", "4"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "rmt")
    assert isinstance(model, RMTForCausalLM)
    assert model.config.segment_size == 64 - 2 * 4 and model.config.pad_token_id == 0
    for key, value in backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "rmt").stat().st_mode) == 0o777 & ~umask  # as a folder made by mkdir
    eager = RMTForCausalLM.from_backbone(str(tmp_path / "backbone"), num_mem_tokens=4, attn_implementation="eager")
    assert eager.config._attn_implementation == eager.backbone.config._attn_implementation == "eager"
    half = RMTForCausalLM.from_backbone(str(tmp_path / "backbone"), num_mem_tokens=4, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}  # a loading option, as for from_pretrained
    assert half.config.dtype == half.backbone.config.dtype == torch.bfloat16
    for key, value in backbone.state_dict().items():
        assert torch.equal(half.backbone.state_dict()[key], value.bfloat16()), key


@pytest.mark.parametrize("batch_size, accumulation", [(2, 4)])
def test_trainer_gradient_accumulation_keeps_the_token_loss_scale(tmp_path, batch_size, accumulation):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    ids = torch.cat([recall_batch(8, torch.Generator().manual_seed(3))[:, :12], torch.zeros(8, 4, dtype=torch.long)], 1)
    mask = (torch.arange(16) < 12).long().expand(8, -1).clone()
    mask[::2, 9:] = 0  # documents of different lengths: the token count differs between micro-batches
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist(), "labels": ids.tolist()})

    def first_loss(batch: int, steps: int) -> float:
        model = tiny_lm("llama").train()
        args = TrainingArguments(output_dir=str(tmp_path / f"{batch}"), per_device_train_batch_size=batch,
                                 gradient_accumulation_steps=steps, max_steps=1, logging_steps=1, report_to=[],
                                 use_cpu=True, save_strategy="no", disable_tqdm=True, learning_rate=0.0)  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        return next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)

    assert first_loss(batch_size, accumulation) == pytest.approx(first_loss(8, 1), rel=1e-4)


def test_an_encoder_backbone_becomes_a_decoder_with_its_weights_kept(tmp_path):
    from conftest import word_tokenizer
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    encoder = BertModel(BertConfig(vocab_size=VOCAB, **{**DECODERS["bert"], "is_decoder": False}))
    encoder.save_pretrained(tmp_path / "encoder")
    word_tokenizer(VOCAB).save_pretrained(tmp_path / "encoder")
    model = RMTForCausalLM.from_backbone(str(tmp_path / "encoder"), num_mem_tokens=MEMORY, segment_size=SEGMENT)
    assert model.config.text_config.is_decoder
    kept = model.backbone.base_model.state_dict()
    assert {key for key in encoder.state_dict() if key not in kept} == {"pooler.dense.weight", "pooler.dense.bias"}
    for key, value in kept.items():  # every weight but the pooler, which a language-model head does not use
        assert torch.equal(encoder.state_dict()[key], value), key
    ids = prompts([13])[0][None]
    with torch.no_grad():  # causal: a token's logits do not depend on the tokens after it
        torch.testing.assert_close(model(input_ids=ids).logits[:, :9], model(input_ids=ids[:, :9]).logits)
    with pytest.raises(ValueError, match="set is_decoder=True"):
        RMTForCausalLM(RMTConfig(text_config=encoder.config, num_mem_tokens=2, segment_size=8))
