from __future__ import annotations

import pytest
import torch

import fvtransform as fvt
from fvtransform.models import init_weights


@pytest.fixture
def model() -> torch.nn.Module:
    return fvt.build("fvt-video-dit")


@pytest.fixture
def tree(model: torch.nn.Module) -> fvt.ParamTree:
    return fvt.ParamTree(init_weights(model, seed=0))


@pytest.fixture
def inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 4, 2, 4, 4, generator=g), torch.tensor([300]), torch.randn(1, 3, 16, generator=g)


def snapshot(tree):
    """Values, data pointers and versions of every tensor, to prove nothing was mutated."""
    return {k: (v.detach().clone(), v.data_ptr(), v._version) for k, v in tree.items()}


def assert_unchanged(tree, snap) -> None:
    assert list(tree) == list(snap)
    for k, v in tree.items():
        value, ptr, version = snap[k]
        assert v.data_ptr() == ptr, k
        assert v._version == version, k
        assert fvt.tensors_equal(v.detach(), value), k
