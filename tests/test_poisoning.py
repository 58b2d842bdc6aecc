"""The NaN poisoning of tests/conftest.py is active: allocations made by fastortho code come
back NaN-filled (so an output element a kernel never writes fails its test), and allocations
made elsewhere are untouched."""
import torch

import conftest


def test_allocations_inside_fastortho_are_nan_filled():
    scope = {"__name__": "fastortho.poison_probe", "torch": torch}
    exec("def alloc():\n    return torch.empty(5), torch.empty_like(torch.ones(3)), torch.ones(2).new_empty(4)", scope)
    for t in scope["alloc"]():
        assert torch.isnan(t).all()


def test_allocations_elsewhere_are_not_poisoned():
    scope = {"__name__": "other_package.module", "torch": torch}
    exec("def alloc():\n    return torch.empty(64)", scope)
    before = dict(conftest._POISONED)
    scope["alloc"]()
    assert conftest._POISONED == before


def test_kernel_outputs_are_poisoned_before_launch():
    import pytest

    pytest.importorskip("triton")
    from fastortho.kernels import orthoreg as K
    from fastortho.testing import random_layers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    weights, bases = random_layers([(33, 17), (17, 40)])
    before = conftest._POISONED.get("empty", 0)
    K.scratch_penalty([w.to(device) for w in weights], [b.to(device) for b in bases], "ieee")
    assert conftest._POISONED.get("empty", 0) >= before + 2  # G - I and the per-tile partials
