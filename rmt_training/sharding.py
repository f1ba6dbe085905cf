"""Shard an RMT model with FSDP2 (torch's `fully_shard`), grouped as accelerate's FSDP groups it.

accelerate's FSDP (`accelerate launch --use_fsdp --fsdp_version 2`) runs only on accelerator devices: on CPU
processes it falls back to DDP. `shard_with_fsdp2` applies the same sharding in any process group, gloo on CPUs
included, for a training loop of one's own: every module of a class the model's `_no_split_modules` names (the
backbone's layer class, ARMT's `AssociativeLayer`) becomes a group of its own, inner ones first, then the model.

    torch.distributed.init_process_group("gloo")  # or "nccl"; launched with torchrun
    model = RMTForSequenceClassification.from_pretrained(...)
    groups = shard_with_fsdp2(model)
    ...  # forward, backward, optimizer step as usual: each process gives its part of the global batch
    full = full_state_dict(model)  # on every process; save it from rank 0
"""

from __future__ import annotations

import torch
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard


def fsdp2_groups(model: nn.Module) -> list[str]:
    """The names of the modules accelerate's transformer-based wrap policy shards on their own, in `model`."""
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    return [name for name, module in model.named_modules() if module is not model and policy(module)]


def shard_with_fsdp2(model: nn.Module, **fully_shard_options) -> list[str]:
    """Shard `model` in place over the default process group (`fully_shard_options` go to every `fully_shard`,
    e.g. `mesh` or `mp_policy`); returns the names of the groups, the model's own aside."""
    if not torch.distributed.is_initialized():
        raise RuntimeError(
            "FSDP shards over a process group: call torch.distributed.init_process_group('gloo') (CPU) or ('nccl') "
            "first, in each process torchrun started."
        )
    names = fsdp2_groups(model)
    modules = dict(model.named_modules())
    for name in reversed(names):  # inner groups first: a group takes the parameters no inner group holds
        fully_shard(modules[name], **fully_shard_options)
    fully_shard(model, **fully_shard_options)
    return names


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights gathered from every process, on the CPU (call it in every process)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
