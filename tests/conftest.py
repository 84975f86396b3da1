from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import fvtransform as fvt
from fvtransform.models import init_weights

#: fixtures/ holds golden files and the dev-time scripts that made them with the real tools
#: (LyCORIS, diffusers, peft); those scripts are run by hand, never collected.
collect_ignore = ["fixtures"]


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


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A running fake hub; huggingface_hub pointed at it, with an empty cache, no token and no back-off sleeps.

    ``hub.sleeps`` records the back-off the client asked for.
    """
    import huggingface_hub.constants as hf_constants
    import huggingface_hub.utils._http as hf_http

    from _fakehub import FakeHub

    hub = FakeHub().start()
    hub.sleeps = []
    monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hf_http.time, "sleep", hub.sleeps.append)
    yield hub
    hub.stop()


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """Dynamo's caches and counters reset around a test (recompile counts start at 0); modules that compile
    use it for every test: ``pytestmark = pytest.mark.usefixtures("fresh_dynamo")``."""
    import torch._dynamo  # imported by torch.compile, not by torch or fvtransform

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def net() -> torch.nn.Module:
    """A seeded ConvNet (a convolution and two linears: conv and linear LoRA targets); test_bind has its own."""
    from _helpers import ConvNet

    torch.manual_seed(0)
    return ConvNet()
