"""Properties of fvt.lora.call_batched (issue 21), on trees and adapters drawn by fvtransform.testing.

Stated tolerances (float32 trees, |x| ~ 1, factors ~ 0.3, scales in [-2, 2] times [-1.5, 1.5]; some adapters
DoRA, magnitudes in [0.5, 1.5)):
- sample i vs ``fvt.lora.call`` with adapter ``index[i]`` alone: ``rtol = atol = 1e-5`` (same math; the batched
  products sum in another order);
- sample i vs the merged forward (``fvt.lora.merge`` then ``fvt.call``): ``rtol = atol = 1e-4`` (the merge rounds
  ``W + s B A`` to float32 first);
- ``index = -1``: bit-identical to the base forward on the same batch, in every dtype;
- permuting the batch (inputs and index together) permutes the output: bit-identical up to ``1e-6``.
"""

from __future__ import annotations

import attrs
import hypothesis.strategies as st
import torch
from hypothesis import assume, given

import fvtransform as fvt
from fvtransform.lora import LoraAdapter, LowRank
from fvtransform.testing import DTYPES, adapters, trees


class _Linears(torch.nn.Module):
    """One ``nn.Linear`` per module path of the tree; ``forward(*xs)`` applies the i-th to ``xs[i]``."""

    def __init__(self, tree: fvt.ParamTree) -> None:
        super().__init__()
        self.paths = sorted({k.rsplit(".", 1)[0] for k in tree})
        for path in self.paths:
            *heads, last = path.split(".")
            parent: torch.nn.Module = self
            for head in heads:
                if head not in parent._modules:
                    parent.add_module(head, torch.nn.Module())
                parent = parent._modules[head]  # type: ignore[assignment]
            w = tree[f"{path}.weight"]
            parent.add_module(last, torch.nn.Linear(w.shape[1], w.shape[0], bias=f"{path}.bias" in tree, dtype=w.dtype, device="meta"))

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.get_submodule(p)(x) for p, x in zip(self.paths, xs))


def _buildable(tree: fvt.ParamTree) -> bool:
    """Module names a plain nn.Module can take (not one of its attributes, such as ``eval`` or ``half``)."""
    probe = torch.nn.Module()
    return not any(hasattr(probe, seg) for k in tree for seg in k.split(".")[:-1])


@st.composite
def setups(draw: st.DrawFn, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> tuple:
    dtype = draw(st.sampled_from(dtypes))
    tree = draw(trees(dtypes=(dtype,), tied=False, zero_size=False, max_modules=3))
    assume(_buildable(tree))
    stacked = draw(st.lists(adapters(tree, max_rank=4), min_size=1, max_size=4))
    n = len(stacked)
    batch = draw(st.integers(1, 5))
    index = torch.tensor(draw(st.lists(st.integers(-1, n - 1), min_size=batch, max_size=batch)))
    scales = torch.tensor(draw(st.lists(st.floats(-1.5, 1.5, allow_nan=False, width=32), min_size=n, max_size=n)))
    module = _Linears(tree)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16), label="input seed"))
    xs = [torch.randn(batch, tree[f"{p}.weight"].shape[1], generator=g).to(dtype) for p in module.paths]
    return tree, module, stacked, index, scales, xs


def _with_dora(adapter: LoraAdapter, seed: int) -> LoraAdapter:
    """The adapter with a DoRA magnitude (per output row, in [0.5, 1.5)) on every low-rank target."""
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter({k: attrs.evolve(d, magnitude=torch.rand(d.B.shape[0], generator=g) + 0.5) if isinstance(d, LowRank) else d
                        for k, d in adapter.items()})


@given(setups(), st.lists(st.booleans(), min_size=4, max_size=4))
def test_each_sample_equals_its_single_adapter_call_and_its_merged_forward(setup: tuple, dora: list[bool]) -> None:
    tree, module, stacked, index, scales, xs = setup
    stacked = [_with_dora(a, i) if dora[i] else a for i, a in enumerate(stacked)]  # some adapters DoRA
    out = fvt.lora.call_batched(module, tree, fvt.lora.stack(stacked), *xs, index=index, scales=scales)
    base = fvt.call(module, tree, *xs)
    for i, k in enumerate(index.tolist()):
        sample = [x[i : i + 1] for x in xs]
        if k < 0:
            for got, want in zip(out, base):
                torch.testing.assert_close(got[i], want[i], rtol=0, atol=0)
            continue
        adapter: LoraAdapter = stacked[k]
        single = fvt.lora.call(module, tree, [(adapter, float(scales[k]))], *sample)
        merged = fvt.call(module, fvt.lora.merge(tree, adapter, float(scales[k])), *sample)
        for got, one, m in zip(out, single, merged):
            torch.testing.assert_close(got[i], one[0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[i], m[0], rtol=1e-4, atol=1e-4)


@given(setups(dtypes=DTYPES))
def test_index_minus_one_is_the_base_forward_exactly(setup: tuple) -> None:
    tree, module, stacked, index, _, xs = setup
    out = fvt.lora.call_batched(module, tree, fvt.lora.stack(stacked), *xs, index=torch.full_like(index, -1))
    for got, want in zip(out, fvt.call(module, tree, *xs)):
        assert torch.equal(got, want)


@given(setups(dtypes=DTYPES), st.randoms(use_true_random=False))
def test_permuting_the_batch_permutes_the_output(setup: tuple, rnd: object) -> None:
    tree, module, stacked, index, scales, xs = setup
    order = list(range(index.shape[0]))
    rnd.shuffle(order)  # type: ignore[attr-defined]
    perm = torch.tensor(order)
    s = fvt.lora.stack(stacked)
    out = fvt.lora.call_batched(module, tree, s, *xs, index=index, scales=scales)
    permuted = fvt.lora.call_batched(module, tree, s, *[x[perm] for x in xs], index=index[perm], scales=scales)
    for got, want in zip(permuted, out):
        torch.testing.assert_close(got, want[perm], rtol=1e-6, atol=1e-6)


@given(setups(), st.data())
def test_any_add_drop_history_equals_a_fresh_stack_and_leaves_earlier_stacks_intact(setup: tuple, data: st.DataObject) -> None:
    """Stacks sharing buffers (adds in place, drops, rank growth, compaction, sibling branches) stay what they hold."""
    tree, module, pool, _, _, xs = setup
    more = data.draw(st.lists(adapters(tree, max_rank=6), min_size=1, max_size=3), label="more adapters")
    pool = pool + more
    history: list[tuple[fvt.lora.AdapterStack, list[LoraAdapter]]] = [(fvt.lora.stack(pool[:1]), pool[:1])]
    for _ in range(data.draw(st.integers(1, 8), label="steps")):
        s, held = history[data.draw(st.integers(0, len(history) - 1), label="branch from")]
        if len(held) > 1 and data.draw(st.booleans(), label="drop"):
            i = data.draw(st.integers(0, len(held) - 1), label="position")
            history.append((s.drop(i), held[:i] + held[i + 1:]))
        else:
            a = data.draw(st.sampled_from(pool), label="add")
            history.append((s.add(a), [*held, a]))
    batch = xs[0].shape[0]
    for s, held in history:
        index = torch.tensor([i % len(held) for i in range(batch)])
        got = fvt.lora.call_batched(module, tree, s, *xs, index=index)
        want = fvt.lora.call_batched(module, tree, fvt.lora.stack(held), *xs, index=index)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
