"""What this machine's CPU does with bfloat16: oneDNN kernels, or a slow emulation."""

from __future__ import annotations

import torch

BF16_RESULTS = "benchmarks/RESULTS.md (training step precision)"


def cpu_capability() -> str:
    """The vector instruction set PyTorch's CPU kernels use here (`AVX512`, `AVX2`, ...)."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_bfloat16_is_fast() -> bool:
    """Whether oneDNN has bfloat16 kernels for this CPU (it needs AVX512 or AMX); without them bfloat16
    is emulated, many times slower than float32."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else cpu_capability().startswith("AVX512")
    except RuntimeError:  # a build without oneDNN
        return False


def slow_bfloat16_warning(device: str, asked: str) -> str | None:
    """The warning for `asked` (a flag such as `--bf16`) on a CPU that emulates bfloat16; None elsewhere."""
    if not str(device).startswith("cpu") or cpu_bfloat16_is_fast():
        return None
    return (
        f"{asked} on a CPU without AVX512 or AMX bfloat16 kernels (PyTorch CPU capability {cpu_capability()}): "
        f"bfloat16 runs emulated here, about 19x slower than float32 for a training step on a 2-core AVX2 "
        f"machine ({BF16_RESULTS}). Use float32 on this CPU (leave out {asked})."
    )


def device_problem(device: str) -> str | None:
    """What is wrong with `device` (a `--device` value) on this machine: not a torch device, or an accelerator
    that is not here; None when the device can be used."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        return f"--device {device!r} is not a torch device: use cpu, cuda or cuda:N."
    if parsed.type == "cpu":
        return None
    accelerator = getattr(torch, parsed.type, None)
    if accelerator is None or not accelerator.is_available():
        return f"--device {device!r}: no {parsed.type} device is available on this machine; use --device cpu."
    count = accelerator.device_count()
    if parsed.index is not None and parsed.index >= count:
        return f"--device {device!r}: this machine has {count} {parsed.type} device(s), numbered from 0."
    return None
