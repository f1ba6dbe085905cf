"""RMTForSequenceClassification on tiny random backbones: recurrence, batching, BPTT, saving, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import encode, random_documents, tiny_backbone_config, tiny_classifier, tiny_rmt_config
from transformers import AutoModel, AutoModelForSequenceClassification

from modeling_rmt import RMTConfig, RMTForSequenceClassification, RMTModel

FAMILIES = ["bert", "roberta", "distilbert", "electra", "xlm-roberta", "camembert"]
LENGTHS = [3, 40, 17, 8, 26]  # 1 to 5 segments of 8 tokens


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batched_equals_each_document_alone(family, padding_side):
    model = tiny_classifier(family)
    documents = random_documents(LENGTHS)
    with torch.no_grad():
        batched = model(**encode(documents, padding_side))
        for i, doc in enumerate(documents):
            alone = model(**encode([doc]))
            torch.testing.assert_close(batched.logits[i], alone.logits[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(batched.memory_state[i], alone.memory_state[0], atol=1e-5, rtol=1e-5)


def test_memory_carries_the_first_segment_to_the_final_logits(bert_classifier):
    torch.nn.init.normal_(bert_classifier.backbone.classifier.weight, std=1.0)
    doc = random_documents([30])[0]
    changed = doc.clone()
    changed[0] = (doc[0] + 1 - 5) % 91 + 5  # another token in the first of four segments
    with torch.no_grad():
        a = bert_classifier(**encode([doc]))
        b = bert_classifier(**encode([changed]))
    assert a.segments_mask.shape == (1, 4)
    # The final segment is identical, so only the memory can make the logits differ.
    assert (a.logits - b.logits).abs().max() > 0
    assert (a.memory_state - b.memory_state).abs().max() > 1e-4


def test_segment_outputs_only_when_asked(bert_classifier):
    batch = encode(random_documents([5, 20]))
    with torch.no_grad():
        plain = bert_classifier(**batch)
        full = bert_classifier(**batch, output_segment_logits=True, output_hidden_states=True)
    assert plain.segment_logits is None and plain.segment_hidden_states is None
    assert plain.memory_state.grad_fn is None
    assert full.segment_logits.shape == (2, 3, 2)
    torch.testing.assert_close(full.segment_logits[:, -1], full.logits)
    assert full.segments_mask.tolist() == [[False, False, True], [True, True, True]]
    assert (full.segment_logits[0, :2] == 0).all()
    assert len(full.segment_hidden_states) == 3 and full.segment_hidden_states[0].shape[0] == 2


def test_continuing_from_a_returned_memory_equals_one_call():
    model = tiny_classifier("bert", segment_alignment="left")
    doc = random_documents([29])[0]
    with torch.no_grad():
        whole = model(**encode([doc]))
        head = model(**encode([doc[:16]]))  # two full segments
        tail = model(**encode([doc[16:]]), memory_state=head.memory_state)
    torch.testing.assert_close(tail.logits, whole.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_bptt_depth_cuts_gradients_exactly(depth):
    model = tiny_classifier("bert", bptt_depth=depth, num_labels=3).train()
    step_embeddings = []

    def keep(module, args, output):
        output.retain_grad()
        step_embeddings.append(output)

    model.get_input_embeddings().register_forward_hook(keep)
    out = model(**encode(random_documents([40])), labels=torch.tensor([1]))
    out.loss.backward()
    assert len(step_embeddings) == 5
    for step, embedded in enumerate(step_embeddings):
        transitions = len(step_embeddings) - 1 - step
        gradient = 0.0 if embedded.grad is None else embedded.grad.abs().sum().item()  # None: no path at all
        if transitions <= depth:
            assert gradient > 0, f"segment {step} is within {depth} transitions"
        else:
            assert gradient == 0, f"segment {step} is {transitions} transitions back"
    assert model.memory.memory_tokens.grad is None  # only the final loss: segment 0 is out of reach


def test_bptt_depth_of_segments_minus_one_reaches_the_learned_initial_memory():
    model = tiny_classifier("bert", bptt_depth=4, num_labels=3).train()  # 5 segments: 4 transitions
    model(**encode(random_documents([40])), labels=torch.tensor([1])).loss.backward()
    assert model.memory.memory_tokens.grad.abs().sum() > 0  # the learned start is a parameter, never cut


@pytest.mark.parametrize("depth", [-1, 1])
def test_batched_gradients_equal_each_document_alone(depth):
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    model = tiny_classifier("bert", bptt_depth=depth, backbone_overrides=no_dropout).train()
    documents, labels = random_documents([40, 7]), torch.tensor([1, 0])

    def gradients(batch, batch_labels, scale: float) -> list[torch.Tensor]:
        model.zero_grad()
        (model(**batch, labels=batch_labels).loss * scale).backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]

    batched = gradients(encode(documents), labels, 2.0)  # the loss is a mean over 2 documents
    alone = [gradients(encode([doc]), labels[i : i + 1], 1.0) for i, doc in enumerate(documents)]
    for together, first, second in zip(batched, *alone, strict=True):
        torch.testing.assert_close(together, first + second, atol=1e-6, rtol=1e-4)
    assert model.memory.memory_tokens.grad.abs().sum() > 0  # the short document reaches its initial memory


def test_full_bptt_reaches_the_initial_memory_and_every_segment():
    model = tiny_classifier("bert").train()
    out = model(**encode(random_documents([40, 9])), labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert model.memory.memory_tokens.grad.abs().sum() > 0


def test_loss_is_the_final_logits_cross_entropy_or_the_mean_over_segments():
    labels = torch.tensor([1, 0])
    batch = encode(random_documents([5, 20]))
    final = tiny_classifier("bert")(**batch, labels=labels, output_segment_logits=True)
    torch.testing.assert_close(final.loss, torch.nn.functional.cross_entropy(final.logits, labels))
    mean = tiny_classifier("bert", segment_loss="mean")(**batch, labels=labels, output_segment_logits=True)
    per_document = [  # each document's mean over its own segments, so short documents weigh as much
        torch.nn.functional.cross_entropy(mean.segment_logits[i][mask], labels[i].expand(int(mask.sum())))
        for i, mask in enumerate(mean.segments_mask)
    ]
    assert mean.segments_mask.sum(1).tolist() == [1, 3]
    torch.testing.assert_close(mean.loss, torch.stack(per_document).mean())


def test_save_and_load_give_identical_logits(tmp_path, bert_classifier):
    batch = encode(random_documents([5, 20]))
    bert_classifier.save_pretrained(tmp_path)
    assert (tmp_path / "modeling_rmt.py").exists() and (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, RMTForSequenceClassification)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, bert_classifier(**batch).logits, atol=0, rtol=0)
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, RMTModel)
    # The base model keeps the classifier's backbone weights (same keys), and back again.
    classifier_weights = bert_classifier.backbone.bert.state_dict()
    for key, value in base.backbone.bert.state_dict().items():
        assert torch.equal(value, classifier_weights[key]), key
    assert torch.equal(base.memory.memory_tokens, bert_classifier.memory.memory_tokens)
    base.save_pretrained(tmp_path / "base")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    for key, value in again.backbone.bert.state_dict().items():
        assert torch.equal(value, classifier_weights[key]), key


def test_base_model_returns_final_hidden_states_and_memory():
    torch.manual_seed(0)
    model = RMTModel(tiny_rmt_config("bert")).eval()
    with torch.no_grad():
        out = model(**encode(random_documents([5, 20])), output_hidden_states=True)
    assert out.last_hidden_state.shape[:2] == (2, 1 + 3 + 1 + 8 + 1)
    torch.testing.assert_close(out.memory_state, out.last_hidden_state[:, 1:4])
    assert len(out.segment_hidden_states) == 3


def test_bf16_weights_and_memory(tmp_path, bert_classifier):
    bert_classifier.save_pretrained(tmp_path)
    model = RMTForSequenceClassification.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.memory.memory_tokens.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(**encode(random_documents([20])))
    assert out.logits.dtype == torch.bfloat16 and out.memory_state.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "labels",
    [torch.tensor([1, 0, 1]), torch.tensor([[1, 0]]), torch.zeros(2, 5), torch.tensor([[1, 0], [0, 1]])],
)
def test_labels_of_the_wrong_shape_are_rejected(bert_classifier, labels):
    with pytest.raises(ValueError, match="labels have shape"):
        bert_classifier(**encode(random_documents([5, 20])), labels=labels)


def test_memory_state_of_another_size_is_rejected(bert_classifier):
    with pytest.raises(ValueError, match="memory_state has shape"):
        bert_classifier(**encode(random_documents([5])), memory_state=torch.zeros(1, 4, 32))


def test_training_documents_longer_than_max_n_segments_are_rejected():
    model = tiny_classifier("bert", max_n_segments=2).train()
    with pytest.raises(ValueError, match="needs 3 segments but config.max_n_segments is 2"):
        model(**encode(random_documents([20])))
    with torch.no_grad():  # inference is unbounded
        assert model(**encode(random_documents([100]))).segments_mask.shape[1] == 13


def test_missing_special_tokens_are_named():
    config = RMTConfig(text_config=tiny_backbone_config(), num_mem_tokens=2, segment_size=8, sep_token_id=2)
    with pytest.raises(ValueError, match="config.cls_token_id is not set"):
        RMTForSequenceClassification(config)


def test_gradient_checkpointing_gives_the_same_gradients():
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    model = tiny_classifier("bert", backbone_overrides=no_dropout).train()
    batch, labels = encode(random_documents([30, 12])), torch.tensor([1, 0])

    def gradients() -> list[torch.Tensor]:
        model.zero_grad()
        model(**batch, labels=labels).loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = gradients()
    model.gradient_checkpointing_enable()
    assert any(getattr(module, "gradient_checkpointing", False) for module in model.backbone.modules())
    checkpointed = gradients()
    assert len(plain) == len(checkpointed)
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_attention_mask_with_holes_keeps_only_the_real_tokens(bert_classifier):
    documents = random_documents([20, 13])
    batch = encode(documents)
    holed = {key: torch.cat([value[:, :5], value[:, 5:6].clone(), value[:, 5:]], dim=1) for key, value in batch.items()}
    holed["attention_mask"][:, 5] = 0  # a duplicated token hidden by the mask
    with torch.no_grad():
        torch.testing.assert_close(bert_classifier(**holed).logits, bert_classifier(**batch).logits)


def test_loading_with_a_device_map(tmp_path, bert_classifier):
    bert_classifier.save_pretrained(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path, device_map="cpu")
    batch = encode(random_documents([20]))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, bert_classifier(**batch).logits)
