"""``strict=`` takes a bool everywhere it is taken: "no" (truthy) would silently mean strict (issue 16 attack notes)."""

from __future__ import annotations

import pytest
import torch

import fvtransform as fvt
from fvtransform.errors import UsageError

TREE = {"weight": torch.zeros(2, 3), "bias": torch.zeros(2)}
CALLS = {
    "fvt.load": lambda tmp: fvt.load(tmp, strict="no"),
    "fvt.load_model": lambda tmp: fvt.load_model(tmp, strict="no"),
    "fvt.load_pipeline": lambda tmp: fvt.load_pipeline(tmp, strict="no"),
    "fvt.lora.load": lambda tmp: fvt.lora.load({"l.lora_A.weight": torch.zeros(1, 3)}, strict="no"),
    "fvt.check": lambda tmp: fvt.check(TREE, torch.nn.Linear(3, 2), strict="no"),
    "KeyMap.plan": lambda tmp: fvt.rename(TREE, {"weight": "w"}, strict="no"),
    "fvt.transforms.rename": lambda tmp: fvt.transforms.rename({"weight": "w"}, strict=1),
}


@pytest.mark.parametrize("fn", sorted(CALLS))
def test_strict_that_is_not_a_bool_is_a_usage_error(fn, tmp_path):
    with pytest.raises(UsageError, match=rf"{fn}: strict must be True or False; found \w+ .*Fix: .*strict=False"):
        CALLS[fn](tmp_path)  # the path does not matter: refused before anything is read


@pytest.mark.parametrize("device", ["bogus", 3.5, None])
def test_load_model_device_torch_does_not_know_is_a_usage_error(device, tmp_path):
    with pytest.raises(UsageError, match=r"fvt.load_model: device .* is not a device torch knows"):
        fvt.load_model(tmp_path, device=device)


def test_layout_that_is_not_a_string_is_a_usage_error():
    with pytest.raises(UsageError, match=r"layout is named by a string; found int 3.*wan-original"):
        fvt.registry.layout(3)  # type: ignore[arg-type]
