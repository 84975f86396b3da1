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


from _helpers import assert_unchanged, snapshot  # noqa: E402,F401
