"""Mixed precision: which dtype, the autocast context, and the GradScaler.

fp32 master weights and optimizer state always; autocast runs the matmuls in 16-bit.
bf16 keeps fp32's exponent range, so it needs no loss scaling. fp16 has 5 exponent bits:
small gradients underflow to zero unless the loss is scaled up before backward (GradScaler),
and the gradients unscaled before anything reads them (clipping, the norm we log).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from stalwart.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_bf16_units() -> bool:
    """AMX tiles (Sapphire Rapids+) make bf16 matmuls fast on a CPU; AVX2 alone does not."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe and probe())


def resolve_precision(name: str, device: torch.device) -> str:
    """`auto` -> bf16 where it is fast, fp16 on pre-Ampere CUDA, fp32 elsewhere."""
    if name != "auto":
        if device.type == "cuda" and name == "bf16" and not torch.cuda.is_bf16_supported():
            raise UserError("--train.precision bf16 is not supported by this GPU: use fp16")
        return name
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return "bf16" if major >= 8 else "fp16"
    if device.type == "cpu" and cpu_has_bf16_units():
        return "bf16"
    return "fp32"


@dataclass
class Precision:
    name: str  # fp32 | bf16 | fp16, resolved
    device: torch.device
    scaler: torch.amp.GradScaler  # disabled (a pass-through) unless fp16

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def build_precision(name: str, device: torch.device, grad_scaler: bool = True) -> Precision:
    """grad_scaler=False turns loss scaling off even for fp16 (the underflow demo)."""
    resolved = resolve_precision(name, device)
    scaler = torch.amp.GradScaler(device.type, enabled=resolved == "fp16" and grad_scaler)
    return Precision(resolved, device, scaler)
