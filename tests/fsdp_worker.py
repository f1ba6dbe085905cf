"""One process of test_fsdp.py: trains tiny RMT and ARMT models a few steps, sharded with FSDP2 over gloo when
torchrun started several processes, each process on its part of the same global batch; writes what it measured.

    python -m torch.distributed.run --nproc-per-node 2 tests/fsdp_worker.py OUT_FOLDER  # sharded
    python tests/fsdp_worker.py OUT_FOLDER  # one process, nothing sharded
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from families import ARMT, VOCAB, backbone_config, tiny_decoder, tiny_encoder
from safetensors.torch import save_file

from rmt_training.sharding import full_state_dict, shard_with_fsdp2

STEPS, GLOBAL_BATCH, LENGTH, LABELS = 4, 4, 30, 6
NO_DROPOUT = dict(num_labels=LABELS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
CASES = {
    "classifier-rmt": lambda: tiny_encoder("bert", NO_DROPOUT),
    "classifier-armt": lambda: tiny_encoder("bert", NO_DROPOUT, **ARMT),
    "causal-lm-rmt": lambda: tiny_decoder("llama", untrained=True),
    "causal-lm-armt": lambda: tiny_decoder("llama", text_config=backbone_config("llama"), **ARMT),
}


def batches(causal_lm: bool) -> list[dict[str, torch.Tensor]]:
    """The same global batches in every process."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(3, VOCAB, (GLOBAL_BATCH, LENGTH), generator=generator)
        labels = ids.clone() if causal_lm else torch.randint(0, LABELS, (GLOBAL_BATCH,), generator=generator)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def train(name: str, rank: int, world: int, folder: Path) -> dict:
    model = CASES[name]().train()
    sharded = shard_with_fsdp2(model) if world > 1 else []
    local = {key: (tuple(p.to_local().shape) if hasattr(p, "to_local") else tuple(p.shape), tuple(p.shape))
             for key, p in model.named_parameters()}  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    losses = []
    for batch in batches(name.startswith("causal-lm")):
        loss = model(**{key: value[rows] for key, value in batch.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        loss = loss.detach()
        if world > 1:
            torch.distributed.all_reduce(loss)
        losses.append(loss.item() / world)
    weights = full_state_dict(model) if world > 1 else {key: v.detach() for key, v in model.state_dict().items()}
    if rank == 0:
        save_file({key: value.contiguous() for key, value in weights.items()}, folder / f"{name}.safetensors")
    return {"losses": losses, "groups": sharded, "shapes": local}


def main(folder: Path) -> None:
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        torch.distributed.init_process_group("gloo")
    results = {name: train(name, rank, world, folder) for name in CASES}
    (folder / f"rank{rank}.json").write_text(json.dumps({"world": world, **results}))
    if world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
