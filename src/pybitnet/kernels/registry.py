"""The kernel registry: one row per ternary linear kernel (device, layout it consumes, availability).

Selection order: an explicit name (argument), then the PYBITNET_KERNEL environment variable, then the
highest-priority kernel available for the device.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import KernelError
from ..quant.layouts import PackedWeight, repack

ENV_VAR = "PYBITNET_KERNEL"


@dataclass(frozen=True)
class Kernel:
    """`linear(x, w)` computes y = x @ W.T for a packed ternary W in `layout` with int8 per-token activations.

    `device_type` is "cpu", "cuda" or "any"; `isa` names the instruction set for native kernels.
    `prepare` turns a weight from any layout into what `linear` takes; it runs once, at load.
    `linear_many(x, weights, norm)`, where a kernel has it, computes x' @ W_i.T for several weights that share
    their input, quantizing x' once; x' = rms_norm(x) * weight for norm = (weight, eps), else x.
    """

    name: str
    device_type: str
    layout: str
    linear: Callable[[torch.Tensor, PackedWeight], torch.Tensor]
    priority: int = 0
    isa: str = "torch"
    is_available: Callable[[], bool] = lambda: True
    description: str = ""
    linear_many: Callable[..., list[torch.Tensor]] | None = None

    def prepare(self, w: PackedWeight) -> PackedWeight:
        return repack(w, self.layout)

    def runs_on(self, device: torch.device) -> bool:
        return self.device_type in ("any", device.type)


_KERNELS: dict[str, Kernel] = {}


def register_kernel(kernel: Kernel) -> Kernel:
    if kernel.name in _KERNELS:
        raise ValueError(f"kernel {kernel.name!r} is already registered")
    _KERNELS[kernel.name] = kernel
    return kernel


def list_kernels() -> list[Kernel]:
    return list(_KERNELS.values())


def get_kernel(name: str) -> Kernel:
    try:
        return _KERNELS[name]
    except KeyError:
        known = ", ".join(sorted(_KERNELS))
        raise KernelError(f"unknown kernel {name!r}; known kernels: {known}") from None


def select_kernel(device: torch.device | str = "cpu", name: str | None = None) -> Kernel:
    """The kernel to use on `device`: `name`, else $PYBITNET_KERNEL, else the best available one."""
    device = torch.device(device)
    name = name or os.environ.get(ENV_VAR) or None
    if name is not None:
        kernel = get_kernel(name)
        if not kernel.runs_on(device):
            raise KernelError(f"kernel {name!r} runs on {kernel.device_type}, not on {device.type}")
        if not kernel.is_available():
            raise KernelError(f"kernel {name!r} is not available on this machine ({kernel.description})")
        return kernel
    candidates = [k for k in _KERNELS.values() if k.runs_on(device) and k.is_available()]
    if not candidates:
        raise KernelError(f"no ternary kernel is available for device {device}")
    return max(candidates, key=lambda k: k.priority)
