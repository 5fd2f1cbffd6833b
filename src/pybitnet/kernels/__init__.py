"""Ternary linear kernels; importing this package registers every built-in kernel."""

from . import cpu, reference, triton
from .registry import ENV_VAR, Kernel, get_kernel, list_kernels, register_kernel, select_kernel

__all__ = [
    "ENV_VAR",
    "Kernel",
    "cpu",
    "get_kernel",
    "list_kernels",
    "reference",
    "register_kernel",
    "select_kernel",
    "triton",
]
