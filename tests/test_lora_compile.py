"""``torch.compile`` over ``fvt.call`` and ``fvt.lora.call`` (issue 19, item 2).

Backends ``eager`` / a capturing backend keep these fast on CPU: they check what dynamo traces (graphs, guards,
recompiles), not what a code generator makes of it.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

import fvtransform as fvt
from fvtransform.errors import UsageError
from fvtransform.lora import FullDelta, LoraAdapter, LowRank
from fvtransform.lora._adapter import LoHa

from _helpers import ConvNet as _Net

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _adapter(seed: int, rank: int = 2, scale: float = 0.5) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter(
        {
            "conv.weight": LowRank(torch.randn(rank, 3, 3, 3, generator=g), torch.randn(4, rank, 1, 1, generator=g), scale=scale),
            "fc1.weight": LowRank(torch.randn(rank, 16, generator=g), torch.randn(8, rank, generator=g), scale=scale),
            "fc2.weight": LowRank(torch.randn(rank, 8, generator=g), torch.randn(3, rank, generator=g), scale=scale),
        }
    )


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(9))


class _Capture:
    """A backend that keeps each graph (and runs it as traced)."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: object) -> torch.fx.GraphModule:
        self.graphs.append(gm)
        return gm

    def targets(self) -> set[str]:
        return {getattr(n.target, "__name__", str(n.target)) for g in self.graphs for n in g.graph.nodes}


def test_compiled_lora_call_traces_the_low_rank_path_in_one_graph(net: _Net) -> None:
    tree, a, x = fvt.ParamTree.from_module(net), _adapter(1), _x()
    capture = _Capture()
    compiled = torch.compile(lambda t, ad, x: fvt.lora.call(net, t, ad, x), backend=capture, fullgraph=True)
    out = compiled(tree, a, x)
    torch.testing.assert_close(out, fvt.lora.call(net, tree, a, x), rtol=0, atol=0)
    assert not torch.allclose(out, fvt.call(net, tree, x))  # the adapter changed the output
    assert len(capture.graphs) == 1
    assert {"addmm", "conv2d"} <= capture.targets()  # the fused linear low-rank path and the conv factors, in the graph


def test_swapping_adapters_and_tensor_scales_does_not_recompile(net: _Net) -> None:
    tree, x = fvt.ParamTree.from_module(net), _x()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(lambda t, ad, s, x: fvt.lora.call(net, t, [(ad, s)], x), backend=counter, fullgraph=True)
    for seed, s in ((1, 1.0), (2, 0.25), (3, -2.0), (4, 0.0)):
        a, scale = _adapter(seed), torch.tensor(s)
        out = compiled(tree, a, scale, x)
        torch.testing.assert_close(out, fvt.lora.call(net, tree, [(a, s)], x))
    assert counter.frame_count == 1


def test_another_rank_compiles_once_more_then_both_are_reused(net: _Net) -> None:
    tree, x = fvt.ParamTree.from_module(net), _x()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(lambda t, ad, x: fvt.lora.call(net, t, ad, x), backend=counter)
    for seed, rank in ((1, 2), (2, 4), (3, 2), (4, 4)):
        a = _adapter(seed, rank=rank)
        torch.testing.assert_close(compiled(tree, a, x), fvt.lora.call(net, tree, a, x))
    assert counter.frame_count == 2  # shapes are guarded: one graph per rank


def test_tensor_scale_equals_number_scale_eagerly(net: _Net) -> None:
    tree, a, x = fvt.ParamTree.from_module(net), _adapter(1), _x()
    torch.testing.assert_close(fvt.lora.call(net, tree, [(a, torch.tensor(0.3))], x), fvt.lora.call(net, tree, [(a, 0.3)], x))


@pytest.mark.parametrize("bad", [torch.tensor([0.5]), torch.tensor(1)])
def test_tensor_scale_must_be_a_0d_float(net: _Net, bad: torch.Tensor) -> None:
    tree = fvt.ParamTree.from_module(net)
    with pytest.raises(UsageError, match="0-d floating tensor.*Fix"):
        fvt.lora.call(net, tree, [(_adapter(1), bad)], _x())


def test_compiled_full_bias_and_loha_deltas_trace(net: _Net) -> None:
    # these build their dense parts inside the call: frozen attrs objects failed to trace (AssertionError)
    tree, x = fvt.ParamTree.from_module(net), _x()
    g = torch.Generator().manual_seed(5)
    loha = LoHa(torch.randn(3, 2, generator=g), torch.randn(2, 8, generator=g), torch.randn(3, 2, generator=g), torch.randn(2, 8, generator=g))
    a = LoraAdapter({"fc1.weight": FullDelta(torch.randn(8, 16, generator=g), 0.5), "fc1.bias": FullDelta(torch.randn(8, generator=g), 1.0), "fc2.weight": loha})
    compiled = torch.compile(lambda t, ad, x: fvt.lora.call(net, t, ad, x), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(tree, a, x), fvt.lora.call(net, tree, a, x), rtol=0, atol=0)


def test_compiled_dora_falls_back_to_eager_with_a_warning(net: _Net) -> None:
    # before: InternalTorchDynamoError: AttributeError: 'function' object has no attribute '__func__'
    tree, x = fvt.ParamTree.from_module(net), _x()
    g = torch.Generator().manual_seed(6)
    a = LoraAdapter({"fc1.weight": LowRank(torch.randn(2, 16, generator=g), torch.randn(8, 2, generator=g), scale=0.5, magnitude=torch.rand(8, generator=g) + 0.5)})
    compiled = torch.compile(lambda t, ad, x: fvt.lora.call(net, t, ad, x) * 2, backend="eager")
    with pytest.warns(UserWarning, match=r"'fc1.weight' is a DoRA target.*runs eagerly.*Fix: merge"):
        out = compiled(tree, a, x)
    torch.testing.assert_close(out, fvt.lora.call(net, tree, a, x) * 2)


def test_compiled_call_is_one_graph_for_every_tree(net: _Net) -> None:
    x = _x()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(lambda t, x: fvt.call(net, t, x), backend=counter, fullgraph=True)
    for seed in (1, 2):
        torch.manual_seed(seed)
        tree = fvt.ParamTree.from_module(_Net())
        torch.testing.assert_close(compiled(tree, x), fvt.call(net, tree, x), rtol=0, atol=0)
    assert counter.frame_count == 1


def test_number_scales_recompile_once_then_stay_dynamic(net: _Net) -> None:
    # the documented cost of a number scale (the adapter's own and the pair's): one recompile on the first change
    tree, x = fvt.ParamTree.from_module(net), _x()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(lambda t, ad, s, x: fvt.lora.call(net, t, [(ad, s)], x), backend=counter)
    for seed, s in ((1, 0.5), (2, 0.7), (3, 0.9), (4, 1.1)):
        a = _adapter(seed, scale=s / 2)
        torch.testing.assert_close(compiled(tree, a, s, x), fvt.lora.call(net, tree, [(a, s)], x))
    assert counter.frame_count == 2


def test_compiled_call_gives_the_eager_gradient_of_a_tensor_scale(net: _Net) -> None:
    tree, a, x = fvt.ParamTree.from_module(net), _adapter(1), _x()
    got, want = torch.tensor(0.7, requires_grad=True), torch.tensor(0.7, requires_grad=True)
    compiled = torch.compile(lambda t, ad, s, x: fvt.lora.call(net, t, [(ad, s)], x).square().sum(), backend="aot_eager")
    compiled(tree, a, got, x).backward()
    fvt.lora.call(net, tree, [(a, want)], x).square().sum().backward()
    assert got.grad is not None and want.grad is not None and want.grad != 0
    torch.testing.assert_close(got.grad, want.grad)
