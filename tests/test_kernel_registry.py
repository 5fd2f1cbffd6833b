"""Kernel selection: automatic, by argument, by PYBITNET_KERNEL; clear errors for bad requests."""

from __future__ import annotations

import pytest
import torch

import pybitnet
from pybitnet.errors import KernelError
from pybitnet.kernels import ENV_VAR, Kernel, get_kernel, list_kernels, registry, select_kernel
from pybitnet.kernels.reference import reference_linear
from pybitnet.nn import PackedBitLinear


@pytest.fixture
def fake_kernels(monkeypatch):
    """Extra kernels for the duration of a test: a high-priority CPU one, an unavailable one, a GPU one."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    fast = Kernel("fake-fast", "cpu", "hf", reference_linear, priority=1000, description="test")
    missing = Kernel("fake-missing", "cpu", "hf", reference_linear, priority=2000, is_available=lambda: False)
    gpu = Kernel("fake-gpu", "cuda", "hf", reference_linear, priority=3000)
    for k in (fast, missing, gpu):
        monkeypatch.setitem(registry._KERNELS, k.name, k)
    return fast


def test_reference_is_registered_and_runs_anywhere():
    ref = get_kernel("reference")
    assert ref in list_kernels()
    assert ref.runs_on(torch.device("cpu")) and ref.runs_on(torch.device("cuda"))
    assert ref.layout == "hf"


def test_auto_selection_takes_the_best_available_kernel_for_the_device(fake_kernels):
    assert select_kernel("cpu") is fake_kernels  # fake-missing is unavailable, fake-gpu is for cuda


def test_argument_overrides_auto_selection(fake_kernels):
    assert select_kernel("cpu", "reference").name == "reference"


def test_environment_variable_overrides_auto_selection(fake_kernels, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "reference")
    assert select_kernel("cpu").name == "reference"
    monkeypatch.setenv(ENV_VAR, "")
    assert select_kernel("cpu") is fake_kernels


def test_argument_beats_environment_variable(fake_kernels, monkeypatch):
    monkeypatch.setenv(ENV_VAR, "reference")
    assert select_kernel("cpu", "fake-fast") is fake_kernels


def test_unknown_kernel_lists_the_known_ones(fake_kernels, monkeypatch):
    with pytest.raises(KernelError, match=r"unknown kernel 'nope'; known kernels: .*reference"):
        select_kernel("cpu", "nope")
    monkeypatch.setenv(ENV_VAR, "typo")
    with pytest.raises(KernelError, match="unknown kernel 'typo'"):
        select_kernel("cpu")


def test_kernel_for_another_device_or_unavailable_is_refused(fake_kernels):
    with pytest.raises(KernelError, match="runs on cuda, not on cpu"):
        select_kernel("cpu", "fake-gpu")
    with pytest.raises(KernelError, match="not available on this machine"):
        select_kernel("cpu", "fake-missing")


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        registry.register_kernel(get_kernel("reference"))


def test_load_model_uses_the_requested_kernel(dummy_dir, fake_kernels, monkeypatch):
    path = dummy_dir("tiny-llama")
    kernels = lambda m: {x.kernel.name for x in m.modules() if isinstance(x, PackedBitLinear)}  # noqa: E731
    assert kernels(pybitnet.load_model(path)) == {"fake-fast"}
    assert kernels(pybitnet.load_model(path, kernel="reference")) == {"reference"}
    monkeypatch.setenv(ENV_VAR, "reference")
    assert kernels(pybitnet.load_model(path)) == {"reference"}
    with pytest.raises(KernelError):
        pybitnet.load_model(path, kernel="fake-gpu")
