"""fvt.lora.merge is differentiable (issue 19, item 1): autograd, torch.func, gradcheck in float64.

Inputs that need a gradient take the out-of-place path; plain tensors keep the tiled in-place path,
and both give the same bits where they can be compared (float32).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fvtransform as fvt
from fvtransform.errors import NumericError
from fvtransform.lora import FullDelta, LoraAdapter, LowRank
from fvtransform.lora._adapter import LoHa


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _adapter(dtype: torch.dtype = torch.float32, seed: int = 1) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter({
        "0.weight": LowRank(torch.randn(2, 6, generator=g, dtype=dtype), torch.randn(5, 2, generator=g, dtype=dtype), 0.5),
        "2.weight": LowRank(torch.randn(3, 5, generator=g, dtype=dtype), torch.randn(3, 3, generator=g, dtype=dtype), 0.25),
    })


def _tree(module: nn.Module) -> fvt.ParamTree:
    return fvt.ParamTree({k: v.detach().clone() for k, v in module.state_dict().items()})


def test_gradcheck_float64_wrt_A_B_and_base() -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    A = torch.randn(2, 5, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(4, 2, dtype=torch.float64, generator=g, requires_grad=True)
    A2 = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    B2 = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    D = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)

    def f(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, A2: torch.Tensor, B2: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
        adapters = [(LoraAdapter({"w": LowRank(A, B, 0.7)}), 1.0), (LoraAdapter({"w": LowRank(A2, B2, 0.3)}), 2.0),
                    (LoraAdapter({"w": FullDelta(D, 0.5)}), 1.0)]
        return fvt.lora.merge({"w": W}, adapters)["w"]

    assert torch.autograd.gradcheck(f, (W, A, B, A2, B2, D))


@pytest.mark.parametrize("axis", [0, 1])
def test_gradcheck_float64_dora(axis: int) -> None:
    g = torch.Generator().manual_seed(axis)
    W = torch.randn(4, 3, 2, dtype=torch.float64, generator=g, requires_grad=True)  # a conv-like weight: kernel 2
    A = torch.randn(2, 3, 2, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(4, 2, 1, dtype=torch.float64, generator=g, requires_grad=True)
    shape = (4,) if axis == 0 else (1, 3)
    m = (torch.rand(shape, dtype=torch.float64, generator=g) + 0.5).requires_grad_()

    def f(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return fvt.lora.merge({"w": W}, LoraAdapter({"w": LowRank(A, B, 0.5, magnitude=m, dora_eps=1e-6)}))["w"]

    assert torch.autograd.gradcheck(f, (W, A, B, m))


def test_autograd_no_longer_detaches() -> None:
    """Before: the merged weight had no grad_fn and backward() failed ("does not require grad")."""
    A = torch.randn(2, 4, requires_grad=True)
    B = torch.randn(3, 2, requires_grad=True)
    merged = fvt.lora.merge({"w": torch.randn(3, 4)}, LoraAdapter({"w": LowRank(A, B, 2.0)}))
    merged["w"].sum().backward()
    assert A.grad is not None and B.grad is not None
    torch.testing.assert_close(A.grad, 2.0 * B.detach().sum(0, keepdim=True).T.expand(2, 4))
    torch.testing.assert_close(B.grad, 2.0 * A.detach().sum(1).expand(3, 2))


def test_func_grad_of_merged_call_equals_on_the_fly_and_autograd() -> None:
    module = _mlp()
    tree = _tree(module)
    adapter = _adapter()
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(3))

    def merged_loss(a: LoraAdapter) -> torch.Tensor:
        return fvt.call(module, fvt.lora.merge(tree, a), x).square().mean()

    def on_the_fly_loss(a: LoraAdapter) -> torch.Tensor:
        return fvt.lora.call(module, tree, a, x).square().mean()

    g_merge = torch.func.grad(merged_loss)(adapter)  # before: "Cannot access data pointer of Tensor that doesn't have storage"
    g_fly = torch.func.grad(on_the_fly_loss)(adapter)
    leaves = [t.detach().clone().requires_grad_() for t in torch.utils._pytree.tree_leaves(adapter)]
    merged_loss(torch.utils._pytree.tree_unflatten(leaves, torch.utils._pytree.tree_structure(adapter))).backward()
    for key in adapter:
        for name in ("A", "B"):
            got = getattr(g_merge[key], name)
            assert got.abs().sum() > 0
            torch.testing.assert_close(got, getattr(g_fly[key], name), rtol=1e-5, atol=1e-6)
    for got, leaf in zip(torch.utils._pytree.tree_leaves(g_merge), leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-5, atol=1e-6)


def test_func_grad_wrt_base_tree_and_tied_order() -> None:
    """Gradients w.r.t. the base; two adapters whose order keys tie (digest of wrapped tensors)."""
    module = _mlp()
    tree = _tree(module)
    a, b = _adapter(seed=1), _adapter(seed=2)
    x = torch.randn(4, 6)

    def loss(t: dict[str, torch.Tensor]) -> torch.Tensor:
        return fvt.call(module, fvt.lora.merge(t, [(a, 1.0), (b, 1.0)]), x).sum()

    got = torch.func.grad(loss)(dict(tree))
    params = {k: v.clone().requires_grad_() for k, v in tree.items()}
    loss(params).backward()
    for k in tree:
        grad = params[k].grad
        assert grad is not None
        torch.testing.assert_close(got[k], grad)


def test_grad_path_gives_the_bits_of_the_fast_path() -> None:
    tree = {"w": torch.randn(64, 48), "c": torch.randn(8, 4, 3, 3)}
    g = torch.Generator().manual_seed(5)
    a = LoraAdapter({"w": LowRank(torch.randn(4, 48, generator=g), torch.randn(64, 4, generator=g), 0.3),
                     "c": LowRank(torch.randn(2, 4, 3, 3, generator=g), torch.randn(8, 2, 1, 1, generator=g), 1.5)})
    b = LoraAdapter({"w": FullDelta(torch.randn(64, 48, generator=g), 0.1),
                     "c": LoHa(torch.randn(8, 2, generator=g), torch.randn(2, 36, generator=g),
                               torch.randn(8, 2, generator=g), torch.randn(2, 36, generator=g), scale=0.2)})
    for dtype in (torch.float32, torch.bfloat16):
        base = {k: v.to(dtype) for k, v in tree.items()}
        fast = fvt.lora.merge(base, [(a, 0.8), (b, 1.0)])
        slow = fvt.lora.merge({k: v.clone().requires_grad_() for k, v in base.items()}, [(a, 0.8), (b, 1.0)])
        for k in tree:
            assert slow[k].grad_fn is not None and slow[k].dtype == dtype
            assert torch.equal(fast[k], slow[k].detach()), (dtype, k)


def test_loha_factors_get_gradients() -> None:
    g = torch.Generator().manual_seed(0)
    fs = [torch.randn(s, generator=g, requires_grad=True) for s in ((4, 2), (2, 5), (4, 2), (2, 5))]
    merged = fvt.lora.merge({"w": torch.zeros(4, 5)}, LoraAdapter({"w": LoHa(fs[0], fs[1], fs[2], fs[3], scale=0.5)}))["w"]
    expected = 0.5 * (fs[0] @ fs[1]) * (fs[2] @ fs[3])
    torch.testing.assert_close(merged, expected)
    merged.square().sum().backward()
    want = torch.autograd.grad(expected.square().sum(), fs)
    for f, w in zip(fs, want):
        torch.testing.assert_close(f.grad, w)


def test_no_grad_mode_keeps_the_fast_path() -> None:
    A = torch.randn(2, 4, requires_grad=True)
    with torch.no_grad():
        merged = fvt.lora.merge({"w": torch.randn(3, 4)}, LoraAdapter({"w": LowRank(A, torch.randn(3, 2), 1.0)}))
    assert merged["w"].grad_fn is None and not merged["w"].requires_grad


def test_merge_with_record_of_grad_inputs_restores_exactly() -> None:
    W = torch.randn(6, 5, dtype=torch.bfloat16, requires_grad=True)
    A = torch.randn(2, 5, requires_grad=True)
    merged, record = fvt.lora.merge_with_record({"w": W}, LoraAdapter({"w": LowRank(A, torch.randn(6, 2), 0.9)}))
    assert merged["w"].grad_fn is not None
    back = fvt.lora.restore({"w": merged["w"].detach()}, record)
    assert torch.equal(back["w"], W.detach())


def test_grad_path_overflow_is_a_numeric_error() -> None:
    A = torch.full((1, 2), 300.0, requires_grad=True)
    B = torch.full((2, 1), 300.0)
    with pytest.raises(NumericError, match=r"'w'.*overflow"):
        fvt.lora.merge({"w": torch.zeros(2, 2, dtype=torch.float16)}, LoraAdapter({"w": LowRank(A, B, 1.0)}))


def test_unmerge_is_differentiable_and_keeps_the_fast_path_bits() -> None:
    g = torch.Generator().manual_seed(7)
    W = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    A = torch.randn(2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(5, 2, dtype=torch.float64, generator=g, requires_grad=True)

    def f(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return fvt.lora.unmerge({"w": W}, LoraAdapter({"w": LowRank(A, B, 0.4)}))["w"]

    assert torch.autograd.gradcheck(f, (W, A, B))
    w32 = torch.randn(5, 4, generator=g)
    a = LoraAdapter({"w": LowRank(torch.randn(2, 4, generator=g), torch.randn(5, 2, generator=g), 0.4)})
    slow = fvt.lora.unmerge({"w": w32.clone().requires_grad_()}, a)["w"]
    assert slow.grad_fn is not None and torch.equal(slow.detach(), fvt.lora.unmerge({"w": w32}, a)["w"])


def test_vmap_over_a_stack_of_bases() -> None:
    """The out-of-place path runs under vmap; its checks read every batch member (before: data-dependent control flow)."""
    g = torch.Generator().manual_seed(11)
    a = LoraAdapter({"w": LowRank(torch.randn(2, 4, generator=g), torch.randn(3, 2, generator=g), 1.0)})
    stack = torch.randn(5, 3, 4, generator=g)
    out = torch.func.vmap(lambda w: fvt.lora.merge({"w": w}, a)["w"])(stack)
    torch.testing.assert_close(out, torch.stack([fvt.lora.merge({"w": w}, a)["w"] for w in stack]))
    stack[2, 1] = 0.0
    zero = LoraAdapter({"w": LowRank(torch.zeros(2, 4), torch.zeros(3, 2), 1.0, magnitude=torch.ones(3))})
    with pytest.raises(NumericError, match=r"'w': the merged weight's row \(in a vmap batch member\) has norm 0"):
        torch.func.vmap(lambda w: fvt.lora.merge({"w": w}, zero)["w"])(stack)


def test_dora_grad_path_matches_the_tiled_path() -> None:
    g = torch.Generator().manual_seed(12)
    W = torch.randn(6, 5, generator=g).to(torch.bfloat16)
    for mag in (torch.rand(6, generator=g) + 0.5, torch.rand(1, 5, generator=g) + 0.5):
        d = LoraAdapter({"w": LowRank(torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g), 0.7, magnitude=mag)})
        fast = fvt.lora.merge({"w": W}, d)["w"]
        slow = fvt.lora.merge({"w": W.clone().requires_grad_()}, d)["w"]
        assert slow.grad_fn is not None
        assert torch.equal(fast, slow.detach())


def test_vmap_over_adapters_checks_every_member() -> None:
    """An ensemble of adapters under vmap (before: ``.item()`` in the adapter's finiteness check)."""
    g = torch.Generator().manual_seed(13)
    W, B = torch.randn(3, 4, generator=g), torch.randn(3, 2, generator=g)
    As = torch.randn(5, 2, 4, generator=g)
    As[1] = 0.0  # all-zero ranks in one member only

    def merged(A: torch.Tensor) -> torch.Tensor:
        return fvt.lora.merge({"w": W}, LoraAdapter({"w": LowRank(A, B, 1.0)}))["w"]

    torch.testing.assert_close(torch.func.vmap(merged)(As), torch.stack([merged(A) for A in As]))
    As[3, 0, 0] = float("nan")
    with pytest.raises(NumericError, match=r"adapter target 'w' A holds NaN or Inf"):
        torch.func.vmap(merged)(As)
