"""What a type checker sees of the public surface: precise return types, pinned with ``assert_type``.

Never run (pytest collects ``test_*.py`` only; the function below is never called): mypy checks this file with
the package (pyproject.toml's [tool.mypy] ``files``), so ``scripts/fresh_check.sh`` fails when a public return
type decays to ``Any`` or changes.
"""

from __future__ import annotations

import torch
from typing_extensions import assert_type

import fvtransform as fvt
from fvtransform.io import TensorInfo
from fvtransform.lora import LoraAdapter


def _pins(path: str) -> None:
    lin = torch.nn.Linear(2, 1)
    x = torch.zeros(1, 2)
    tree = fvt.ParamTree.from_module(lin)
    adapter = fvt.lora.load(path)
    assert_type(adapter, LoraAdapter)
    assert_type(fvt.call(lin, tree, x), torch.Tensor)  # what Linear.forward is annotated to return
    assert_type(fvt.call_with_buffers(lin, tree, x), tuple[torch.Tensor, fvt.ParamTree])
    assert_type(fvt.lora.call(lin, tree, adapter, x), torch.Tensor)
    assert_type(fvt.lora.call_factors(lin, tree, fvt.lora.factors(adapter), x), torch.Tensor)
    assert_type(fvt.lora.merge(tree, adapter), fvt.ParamTree)
    assert_type(fvt.lora.merge_with_record(tree, adapter)[0], fvt.ParamTree)
    assert_type(adapter.summary()["ranks"], list[int])
    assert_type(fvt.io.open_checkpoint(path).info("weight"), TensorInfo)
    module, loaded = fvt.load_model(path)
    assert_type(module, torch.nn.Module)
    assert_type(loaded, fvt.ParamTree)
    assert_type(fvt.load(path), fvt.ParamTree)
    # issue 19: the tree operations on an adapter give an adapter; arithmetic and the initialiser
    assert_type(fvt.select(adapter, "*"), LoraAdapter)
    assert_type(fvt.select(tree, "*"), fvt.ParamTree)
    assert_type(fvt.map_tensors(adapter, torch.neg), LoraAdapter)
    assert_type(fvt.map_tensors(tree, torch.add, tree), fvt.ParamTree)
    assert_type(fvt.rename(adapter, {"a": "b"}), LoraAdapter)
    assert_type(fvt.lerp(tree, tree, 0.5), fvt.ParamTree)
    assert_type(fvt.lora.init_adapter(tree, targets="*", rank=2), LoraAdapter)
    assert_type(fvt.lora.from_factors(fvt.lora.factors(adapter)), LoraAdapter)
