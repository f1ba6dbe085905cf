"""Any backbone, encoders: the 13 encoder families on tiny random configs built with `AutoConfig.for_model`, each
as RMT and ARMT (ALBERT as RMT: its layers are one shared layer). A padded batch, right or left, classifies as
each document alone; `bptt_depth` cuts gradients exactly where it says; one `Trainer` step updates exactly the
weights the loss reaches, the memory's own among them; a saved model reloads bit-identical and runs as remote
code in a fresh process (a sample of families)."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from families import (
    ARMT,
    ENCODERS,
    MEMORIES,
    assert_reloads_bit_identical_and_as_remote_code,
    encoder_batch,
    encoder_memories,
    tiny_encoder,
)
from transformers import Trainer, TrainingArguments

from modeling_rmt import RMTForSequenceClassification

SEGMENT = 6  # tiny_encoder's segment size: 20 content tokens make 4 segments


@pytest.mark.parametrize("family", ENCODERS)
def test_an_encoder_classifies_a_padded_batch_as_each_document_alone(family):
    for memory in encoder_memories(family):
        model = tiny_encoder(family, **MEMORIES[memory])
        for side in ("right", "left"):
            batch = encoder_batch([20, 7, 13], side=side)
            with torch.no_grad():
                batched = model(**batch).logits
                rows = zip(batch["input_ids"], batch["attention_mask"].bool(), strict=True)
                alone = torch.cat([model(input_ids=ids[mask][None]).logits for ids, mask in rows])
            torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5, msg=f"{memory}, {side} padding")


def test_armt_on_a_backbone_that_shares_its_layers_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="share one layer across depth, as ALBERT does"):
        tiny_encoder("albert", **ARMT)


@pytest.mark.parametrize("depth", [0, 2])
@pytest.mark.parametrize("family", ENCODERS)
def test_bptt_depth_cuts_gradients_exactly_where_it_says(family, depth):
    for memory in encoder_memories(family):
        model = tiny_encoder(family, bptt_depth=depth, **MEMORIES[memory]).train()
        embedded = []

        def keep(module, args, output, kept=embedded):
            output.retain_grad()
            kept.append(output)

        model.get_input_embeddings().register_forward_hook(keep)
        model(**encoder_batch([20]), labels=torch.tensor([1])).loss.backward()
        assert len(embedded) == 4
        for step, output in enumerate(embedded):
            back = len(embedded) - 1 - step
            reached = output.grad is not None and bool(output.grad.abs().sum() > 0)  # None: no path at all
            assert reached == (back <= depth), f"{memory}: segment {step} is {back} transitions back, depth {depth}"


def reached_by_the_loss(model: RMTForSequenceClassification, batch: dict) -> set[str]:
    model.zero_grad()
    model(**batch).loss.backward()
    reached = {name for name, p in model.named_parameters() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
    model.zero_grad()
    return reached


@pytest.mark.parametrize("family", ENCODERS)
def test_one_trainer_step_updates_exactly_the_weights_the_loss_reaches(family, tmp_path):
    batch = encoder_batch([20, 20, 20, 20], seed=6)
    batch["labels"] = torch.tensor([0, 1, 2, 1])
    data = Dataset.from_dict({key: value.tolist() for key, value in batch.items()})
    for memory in encoder_memories(family):
        model = tiny_encoder(family, **MEMORIES[memory]).train()
        reached = reached_by_the_loss(model, batch)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        args = TrainingArguments(output_dir=str(tmp_path / memory), per_device_train_batch_size=4, max_steps=1,
                                 learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                 disable_tqdm=True)  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
        assert math.isfinite(loss) and abs(loss - math.log(3)) < 1.0, loss  # an untrained 3-way classifier
        changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
        assert changed == reached, f"{memory}: changed but not reached {changed - reached}, " \
                                   f"reached but unchanged {reached - changed}"  # fmt: skip
        own = {name for name, _ in model.named_parameters() if name.startswith("memory.") or ".W_m" in name}
        assert len(own) == (1 if memory == "rmt" else 1 + 5 * 2), own  # ARMT: W_mq, W_mk, W_mv, W_mb (+ bias) x 2
        assert own <= reached, f"{memory}: the memory's own weights not trained: {own - reached}"
        assert any(name.startswith("backbone.") for name in reached)


@pytest.mark.parametrize("family", ["deberta-v2", "modernbert"])
def test_a_saved_encoder_reloads_bit_identical_and_as_remote_code_in_a_fresh_process(family, tmp_path):
    inputs = encoder_batch([20, 9], seed=7)
    assert_reloads_bit_identical_and_as_remote_code(tiny_encoder(family, **ARMT), tmp_path, inputs)
