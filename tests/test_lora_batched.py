"""Many LoRAs in one batch (issue 21): fvt.lora.stack / AdapterStack and fvt.lora.call_batched."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch._dynamo.testing

import fvtransform as fvt
from fvtransform.errors import ImmutableError, KeyMismatchError, NumericError, ShapeMismatchError, UsageError
from fvtransform.lora import Delta, FullDelta, LoraAdapter, LowRank
from fvtransform.lora._adapter import LoHa

from _helpers import ConvNet as _Net

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class _Flat(torch.nn.Module):
    """Flattens batch and tokens before its linear: the batch is not dim 0 there."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(-1, 4)).reshape(x.shape)


def _adapter(seed: int, rank: int = 2, keys: tuple[str, ...] = ("conv", "fc1", "fc2")) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    shapes = {"conv": ((3, 3, 3), 4), "fc1": ((16,), 8), "fc2": ((8,), 3)}
    out = {}
    for k in keys:
        a_tail, o = shapes[k]
        b_tail = (1, 1) if k == "conv" else ()
        out[f"{k}.weight"] = LowRank(torch.randn(rank, *a_tail, generator=g), torch.randn(o, rank, *b_tail, generator=g), scale=0.5 + seed / 10)
    return LoraAdapter(out)


def _x(n: int = 5) -> torch.Tensor:
    return torch.randn(n, 3, 5, 5, generator=torch.Generator().manual_seed(9))


#: Mixed ranks and target sets: 'style' all three, 'motion' rank 4 on conv and fc2, 'char' rank 1 on fc1 only.
ADAPTERS = {"style": _adapter(1, 2), "motion": _adapter(2, 4, ("conv", "fc2")), "char": _adapter(3, 1, ("fc1",))}


def test_each_sample_gets_its_adapter_as_the_single_adapter_call_does(net: _Net) -> None:
    tree, x = fvt.ParamTree.from_module(net), _x()
    s = fvt.lora.stack(ADAPTERS)
    index, scales = torch.tensor([0, 2, -1, 1, 0]), torch.tensor([1.0, 0.5, -2.0])
    out = fvt.lora.call_batched(net, tree, s, x, index=index, scales=scales)
    adapters = list(ADAPTERS.values())
    for i, k in enumerate(index.tolist()):
        want = fvt.call(net, tree, x)[i] if k < 0 else fvt.lora.call(net, tree, [(adapters[k], float(scales[k]))], x[i : i + 1])[0]
        torch.testing.assert_close(out[i], want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[0], fvt.call(net, tree, x)[0])  # the adapter changed sample 0


def test_index_minus_one_everywhere_is_the_base_forward_exactly(net: _Net) -> None:
    tree, x = fvt.ParamTree.from_module(net), _x()
    out = fvt.lora.call_batched(net, tree, fvt.lora.stack(ADAPTERS), x, index=torch.full((5,), -1))
    torch.testing.assert_close(out, fvt.call(net, tree, x), rtol=0, atol=0)


def test_bf16_inputs_use_the_inputs_dtype_like_the_single_call(net: _Net) -> None:
    tree = fvt.map_tensors(fvt.ParamTree.from_module(net), lambda t: t.to(torch.bfloat16))
    x = _x().to(torch.bfloat16)
    s = fvt.lora.stack(ADAPTERS)
    out = fvt.lora.call_batched(net, tree, s, x, index=torch.tensor([1, 0, 0, 2, -1]))
    assert out.dtype == torch.bfloat16 and s.dtype == torch.float32
    want = fvt.lora.call(net, tree, ADAPTERS["motion"], x[:1])[0]
    torch.testing.assert_close(out[0], want, rtol=2e-2, atol=2e-2)


def test_peft_mixed_batch_adapter_names_is_the_oracle(net: _Net) -> None:
    """peft (tuners/lora/layer.py ``_mixed_batch_forward``): one model, several adapters, ``adapter_names`` per sample."""
    peft = pytest.importorskip("peft")
    tree, x = fvt.ParamTree.from_module(net), _x(4)
    ranks, pm = {"style": 2, "motion": 4, "char": 1}, None
    for name, r in ranks.items():
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r + 1, init_lora_weights=False,
                              target_modules=["fc1"] if name == "char" else ["conv", "fc1", "fc2"])
        if pm is None:
            pm = peft.get_peft_model(copy.deepcopy(net), cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
    assert pm is not None
    sd = pm.eval().state_dict()
    adapters = {}
    for name, r in ranks.items():
        prefix = "base_model.model.{}.lora_{}.%s.weight" % name
        adapters[name] = LoraAdapter({f"{m}.weight": LowRank(sd[prefix.format(m, "A")], sd[prefix.format(m, "B")], (2 * r + 1) / r)
                                      for m in ("conv", "fc1", "fc2") if prefix.format(m, "A") in sd})
    with torch.no_grad():
        want = pm(x, adapter_names=["style", "__base__", "char", "motion"])
    got = fvt.lora.call_batched(net, tree, fvt.lora.stack(adapters), x, index=torch.tensor([0, -1, 2, 1]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_permuting_the_batch_permutes_the_output(net: _Net) -> None:
    tree, x, s = fvt.ParamTree.from_module(net), _x(), fvt.lora.stack(ADAPTERS)
    index, perm = torch.tensor([0, 2, -1, 1, 0]), torch.tensor([3, 0, 4, 1, 2])
    out = fvt.lora.call_batched(net, tree, s, x, index=index)
    torch.testing.assert_close(fvt.lora.call_batched(net, tree, s, x[perm], index=index[perm]), out[perm], rtol=1e-6, atol=1e-6)


# --- the stack value: add, drop, sharing --------------------------------------------------------------------------


def test_add_writes_one_row_in_place_and_keeps_the_old_stack(net: _Net) -> None:
    tree, x = fvt.ParamTree.from_module(net), _x()
    s = fvt.lora.stack(ADAPTERS)
    before = fvt.lora.call_batched(net, tree, s, x, index=torch.tensor([0, 1, 2, -1, 0]))
    s2 = s.add(_adapter(7, 2), name="extra")
    assert s2.names == ("style", "motion", "char", "extra") and s.names == ("style", "motion", "char")
    assert all(s2._slots[k].A is s._slots[k].A for k in s.keys)  # buffers shared: nothing copied
    torch.testing.assert_close(fvt.lora.call_batched(net, tree, s, x, index=torch.tensor([0, 1, 2, -1, 0])), before, rtol=0, atol=0)
    out = fvt.lora.call_batched(net, tree, s2, x, index=torch.tensor([3, 1, 2, -1, 0]))
    torch.testing.assert_close(out[0], fvt.lora.call(net, tree, _adapter(7, 2), x[:1])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1:], before[1:], rtol=1e-6, atol=1e-6)


def test_two_adds_on_one_stack_do_not_clobber_each_other(net: _Net) -> None:
    tree, x = fvt.ParamTree.from_module(net), _x(2)
    s = fvt.lora.stack([_adapter(1)])
    left, right = s.add(_adapter(5)), s.add(_adapter(6))
    for branch, seed in ((left, 5), (right, 6)):
        out = fvt.lora.call_batched(net, tree, branch, x, index=torch.tensor([1, 0]))
        torch.testing.assert_close(out[0], fvt.lora.call(net, tree, _adapter(seed), x[:1])[0], rtol=1e-5, atol=1e-5)


def test_growth_a_larger_rank_and_a_new_key_keep_every_adapter(net: _Net) -> None:
    tree, x = fvt.ParamTree.from_module(net), _x(4)
    s = fvt.lora.stack([_adapter(1, 1, ("fc1",))])
    s = s.add(_adapter(2, 3, ("fc1", "fc2")))  # a larger rank on fc1, a new key fc2
    assert s.ranks == {"fc1.weight": 3, "fc2.weight": 3}
    for i in range(3, 3 + 2 * s.capacity):  # past the capacity: the buffers are copied into larger ones
        s = s.add(_adapter(i, 2, ("conv", "fc1")))
    assert len(s) == 2 + 2 * 4 and s.capacity >= len(s)
    s = s.drop(2)  # adapter seed 3 leaves; positions shift down
    out = fvt.lora.call_batched(net, tree, s, x, index=torch.tensor([0, 1, 2, len(s) - 1]))
    for i, seed_rank_keys in enumerate([(1, 1, ("fc1",)), (2, 3, ("fc1", "fc2")), (4, 2, ("conv", "fc1")), (10, 2, ("conv", "fc1"))]):
        torch.testing.assert_close(out[i], fvt.lora.call(net, tree, _adapter(*seed_rank_keys), x[i : i + 1])[0], rtol=1e-5, atol=1e-5)


def test_drop_copies_no_factor_and_shifts_positions(net: _Net) -> None:
    s = fvt.lora.stack(ADAPTERS)
    d = s.drop(1)
    assert d.names == ("style", "char") and d._slots["fc1.weight"].A is s._slots["fc1.weight"].A
    assert d.targets("fc1.weight") == [0, 1] and d.targets("conv.weight") == [0]
    assert s.drop(-1).names == ("style", "motion")
    assert s.drop(0).keys == ("conv.weight", "fc1.weight", "fc2.weight") and s.drop(0).drop(0).keys == ("fc1.weight",)


def test_the_stack_is_immutable() -> None:
    s = fvt.lora.stack(ADAPTERS)
    with pytest.raises(ImmutableError, match=r"AdapterStack is immutable: cannot set 'names'.*\.add"):
        s.names = ("x",)


# --- errors ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("index", "match"),
    [
        (torch.tensor([0, 3, 0, 0, 0]), r"index\[1\] = 3 is not an adapter position of the stack \(0\.\.2: \['style', 'motion', 'char'\]\)"),
        (torch.tensor([0, 0, -2, 0, 0]), r"index\[2\] = -2 is not an adapter position.*-1\.\.2"),
        (torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]), r"index must be a 1-D integer tensor.*found torch.float32"),
        (torch.zeros(5, 1, dtype=torch.long), r"index must be a 1-D integer tensor.*shape \[5, 1\]"),
        ([0, 1, 2, 0, 0], r"index must be a 1-D integer tensor.*found list.*Fix"),
        (torch.tensor([0, 1, 2]), r"the input of 'conv.weight' has shape \[5, 3, 5, 5\], whose first dim is not the batch of 3"),
    ],
)
def test_bad_index_is_a_usage_error(net: _Net, index: object, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        fvt.lora.call_batched(net, fvt.ParamTree.from_module(net), fvt.lora.stack(ADAPTERS), _x(), index=index)  # type: ignore[arg-type]


@pytest.mark.parametrize("scales", [torch.ones(2), torch.ones(3, dtype=torch.long), 1.0])
def test_bad_scales_are_a_usage_error(net: _Net, scales: object) -> None:
    with pytest.raises(UsageError, match=r"scales must be a 1-D floating tensor with one scale per adapter of the stack \(3\)"):
        fvt.lora.call_batched(net, fvt.ParamTree.from_module(net), fvt.lora.stack(ADAPTERS), _x(), index=torch.zeros(5, dtype=torch.long), scales=scales)  # type: ignore[arg-type]


def test_a_target_the_tree_lacks_names_the_key_and_the_adapter(net: _Net) -> None:
    g = torch.Generator().manual_seed(0)
    stray = LoraAdapter({"head.weight": LowRank(torch.randn(2, 8, generator=g), torch.randn(3, 2, generator=g), 1.0)})
    s = fvt.lora.stack({"style": _adapter(1), "stray": stray})
    with pytest.raises(KeyMismatchError, match=r"stack target 'head.weight' \(of adapter #1 'stray'\) is not in the tree"):
        fvt.lora.call_batched(net, fvt.ParamTree.from_module(net), s, _x(), index=torch.zeros(5, dtype=torch.long))


def test_factors_that_do_not_fit_the_tree_name_the_key_and_the_adapter(net: _Net) -> None:
    g = torch.Generator().manual_seed(0)
    wide = LoraAdapter({"fc2.weight": LowRank(torch.randn(2, 9, generator=g), torch.randn(3, 2, generator=g), 1.0)})
    s = fvt.lora.stack({"wide": wide})
    with pytest.raises(ShapeMismatchError, match=r"stack target 'fc2.weight' \(of adapter #0 'wide'\) has out 3, in \[9\]; the tree's weight is \[3, 8\]"):
        fvt.lora.call_batched(net, fvt.ParamTree.from_module(net), s, _x(), index=torch.zeros(5, dtype=torch.long))


def test_adapters_of_different_shapes_on_one_key_name_both() -> None:
    g = torch.Generator().manual_seed(0)
    wide = LoraAdapter({"fc2.weight": LowRank(torch.randn(2, 9, generator=g), torch.randn(3, 2, generator=g), 1.0)})
    with pytest.raises(ShapeMismatchError, match=r"adapter #1 'wide': target 'fc2.weight' has A \[2, 9\].*in \[8\] there \(from adapter #0 'style'\)"):
        fvt.lora.stack({"style": _adapter(1), "wide": wide})
    with pytest.raises(ShapeMismatchError, match=r"adapter #3 'wide': target 'fc2.weight'.*\(from adapter #0 'style', adapter #1 'motion'\)"):
        fvt.lora.stack(ADAPTERS).add(wide, name="wide")


@pytest.mark.parametrize(
    ("delta", "kind"),
    [
        (LowRank(torch.ones(1, 16), torch.ones(8, 1), 1.0, magnitude=torch.ones(1, 16)), "a DoRA target of a convolution or with per-input-column"),
        (FullDelta(torch.ones(8, 16)), "a full delta"),
        (LoHa(torch.ones(8, 1), torch.ones(1, 16), torch.ones(8, 1), torch.ones(1, 16)), "a LoHa"),
    ],
)
def test_targets_that_do_not_stack_name_the_adapter_and_key(delta: Delta, kind: str) -> None:
    other = LoraAdapter({"fc1.weight": delta})
    with pytest.raises(UsageError, match=rf"adapter #1 'other': target 'fc1.weight' is {kind}.*Fix: merge this adapter"):
        fvt.lora.stack({"style": _adapter(1), "other": other})
    with pytest.raises(UsageError, match=rf"adapter #3 'x': target 'fc1.weight' is {kind}"):
        fvt.lora.stack(ADAPTERS).add(other, name="x")


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: fvt.lora.stack([]), r"no adapters; a stack holds one or more"),
        (lambda: fvt.lora.stack(_adapter(1)), r"takes a list of adapters or a dict name -> adapter; found LoraAdapter"),  # type: ignore[arg-type]
        (lambda: fvt.lora.stack([_adapter(1), "a.safetensors"]), r"adapter #1 '#1': expected a LoraAdapter, found str"),  # type: ignore[list-item]
        (lambda: fvt.lora.stack([_adapter(1)], dtype=torch.int8), r"dtype must be a floating torch dtype"),
        (lambda: fvt.lora.stack(ADAPTERS).add(_adapter(4), name="style"), r"name 'style' must be a string no other adapter"),
        (lambda: fvt.lora.stack(ADAPTERS).drop(3), r"position 3 is not in 0\.\.2"),
        (lambda: fvt.lora.stack([_adapter(1)]).drop(0), r"adapter #0 '#0' is the only adapter"),
    ],
)
def test_stack_usage_errors(build: object, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        build()  # type: ignore[operator]


def test_a_plain_adapter_instead_of_a_stack_shows_the_call(net: _Net) -> None:
    with pytest.raises(UsageError, match=r"takes an AdapterStack; found LoraAdapter.*fvt.lora.stack\(\[a, b\]\)"):
        fvt.lora.call_batched(net, fvt.ParamTree.from_module(net), _adapter(1), _x(), index=torch.zeros(5, dtype=torch.long))  # type: ignore[arg-type]


def test_an_unused_target_is_an_error(net: _Net) -> None:
    class _Half(_Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    half = _Half()
    with pytest.raises(KeyMismatchError, match=r"not used by any linear or convolution call: .*'fc1.weight'.*adapter #0 'style'"):
        fvt.lora.call_batched(half, fvt.ParamTree.from_module(half), fvt.lora.stack(ADAPTERS), _x(), index=torch.zeros(5, dtype=torch.long))


def test_batch_flattened_into_tokens_is_refused_naming_the_key() -> None:
    torch.manual_seed(0)
    flat = _Flat()
    g = torch.Generator().manual_seed(0)
    a = LoraAdapter({"fc.weight": LowRank(torch.randn(1, 4, generator=g), torch.randn(4, 1, generator=g), 1.0)})
    with pytest.raises(UsageError, match=r"the input of 'fc.weight' has shape \[6, 4\], whose first dim is not the batch of 2"):
        fvt.lora.call_batched(flat, fvt.ParamTree.from_module(flat), fvt.lora.stack([a]), torch.randn(2, 3, 4), index=torch.tensor([0, -1]))


def test_grouped_convolution_is_refused_naming_the_key() -> None:
    conv = torch.nn.Conv2d(4, 4, 3, groups=2)
    g = torch.Generator().manual_seed(0)
    a = LoraAdapter({"weight": LowRank(torch.randn(1, 2, 3, 3, generator=g), torch.randn(4, 1, 1, 1, generator=g), 1.0)})
    with pytest.raises(UsageError, match=r"'weight' is a grouped convolution \(groups=2\)"):
        fvt.lora.call_batched(conv, fvt.ParamTree.from_module(conv), fvt.lora.stack([a]), torch.randn(2, 4, 5, 5), index=torch.tensor([0, 0]))


# --- torch.compile, vmap, gradients ------------------------------------------------------------------------------------


def test_compiled_index_and_scales_changes_do_not_recompile(net: _Net) -> None:
    tree, x, s = fvt.ParamTree.from_module(net), _x(), fvt.lora.stack(ADAPTERS)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(lambda t, st, x, i, sc: fvt.lora.call_batched(net, t, st, x, index=i, scales=sc), backend=counter, fullgraph=True)
    for index, scales in (([0, 2, -1, 1, 0], [1.0, 0.5, -2.0]), ([1, 1, 1, -1, 2], [0.3, 0.0, 2.0]), ([-1] * 5, [1.0, 1.0, 1.0])):
        i, sc = torch.tensor(index), torch.tensor(scales)
        torch.testing.assert_close(compiled(tree, s, x, i, sc), fvt.lora.call_batched(net, tree, s, x, index=i, scales=sc), rtol=0, atol=0)
    assert counter.frame_count == 1
    assert counter.op_count > 0


def test_compiled_graph_holds_the_gathered_products(net: _Net) -> None:
    graphs: list[torch.fx.GraphModule] = []

    def capture(gm: torch.fx.GraphModule, example_inputs: object) -> torch.fx.GraphModule:
        graphs.append(gm)
        return gm

    tree, x, s = fvt.ParamTree.from_module(net), _x(), fvt.lora.stack(ADAPTERS)
    compiled = torch.compile(lambda t, i: fvt.lora.call_batched(net, t, s, x, index=i), backend=capture, fullgraph=True)
    compiled(tree, torch.tensor([0, 1, 2, -1, 0]))
    names = {getattr(n.target, "__name__", str(n.target)) for g in graphs for n in g.graph.nodes}
    assert len(graphs) == 1 and {"baddbmm", "bmm", "conv2d"} <= names


def test_vmap_over_another_dim_of_the_inputs_works(net: _Net) -> None:
    tree, s = fvt.ParamTree.from_module(net), fvt.lora.stack(ADAPTERS)
    xs, index = torch.stack([_x(), _x() * 2]), torch.tensor([0, 2, -1, 1, 0])
    got = torch.func.vmap(lambda x: fvt.lora.call_batched(net, tree, s, x, index=index))(xs)
    want = torch.stack([fvt.lora.call_batched(net, tree, s, x, index=index) for x in xs])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_a_vmapped_index_is_refused(net: _Net) -> None:
    tree, s, x = fvt.ParamTree.from_module(net), fvt.lora.stack(ADAPTERS), _x()
    with pytest.raises(UsageError, match=r"vmapped index: the call is already the batched form"):
        torch.func.vmap(lambda i: fvt.lora.call_batched(net, tree, s, x, index=i))(torch.zeros(2, 5, dtype=torch.long))


def test_gradient_of_the_scales_matches_the_single_calls(net: _Net) -> None:
    tree, x, s = fvt.ParamTree.from_module(net), _x(2), fvt.lora.stack(ADAPTERS)
    scales = torch.tensor([0.7, 1.0, 1.0], requires_grad=True)
    fvt.lora.call_batched(net, tree, s, x, index=torch.tensor([0, -1]), scales=scales).square().sum().backward()
    want = torch.tensor(0.7, requires_grad=True)
    (fvt.lora.call(net, tree, [(ADAPTERS["style"], want)], x[:1]).square().sum() + fvt.call(net, tree, x[1:]).square().sum()).backward()
    assert scales.grad is not None and want.grad is not None
    torch.testing.assert_close(scales.grad, torch.stack([want.grad, torch.tensor(0.0), torch.tensor(0.0)]), rtol=1e-4, atol=1e-5)


def test_the_grouped_alternative_the_benchmark_measures_gives_the_same_output(net: _Net) -> None:
    from fvtransform.lora._batched import _run

    tree, x, s = fvt.ParamTree.from_module(net), _x(), fvt.lora.stack(ADAPTERS)
    index, scales = torch.tensor([0, 2, -1, 1, 0]), torch.tensor([1.0, 0.5, -2.0])
    gathered = fvt.lora.call_batched(net, tree, s, x, index=index, scales=scales)
    torch.testing.assert_close(_run(net, tree, s, (x,), {}, index, scales, grouped=True), gathered, rtol=1e-5, atol=1e-6)


def test_a_larger_rank_after_a_drop_keeps_every_adapter_on_its_row(net: _Net) -> None:
    # before: the key's larger buffers took the live rows renumbered 0..n-1 while the stack kept its old row
    # numbers, so position 0 read the next adapter's factors
    tree, x = fvt.ParamTree.from_module(net), _x(3)
    s = fvt.lora.stack([_adapter(1, 1, ("fc1",)), _adapter(2, 1, ("fc1",)), _adapter(3, 1, ("fc1",))]).drop(0)
    s = s.add(_adapter(4, 3, ("fc1",)))  # before: UsageError, the default name '#2' was taken after the drop
    assert s.names == ("#1", "#2", "#3")
    out = fvt.lora.call_batched(net, tree, s, x, index=torch.tensor([0, 1, 2]))
    for i, seed_rank in enumerate([(2, 1), (3, 1), (4, 3)]):
        want = fvt.lora.call(net, tree, _adapter(*seed_rank, ("fc1",)), x[i : i + 1])[0]
        torch.testing.assert_close(out[i], want, rtol=1e-5, atol=1e-5)


def test_compiled_another_stack_of_the_same_shapes_reuses_the_graph(net: _Net) -> None:
    tree, x = fvt.ParamTree.from_module(net), _x()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(lambda t, st, i: fvt.lora.call_batched(net, t, st, x, index=i), backend=counter, fullgraph=True)
    index = torch.tensor([0, 1, 2, -1, 0])
    for seeds in ((1, 2, 3), (11, 12, 13)):
        s = fvt.lora.stack({"style": _adapter(seeds[0], 2), "motion": _adapter(seeds[1], 4, ("conv", "fc2")), "char": _adapter(seeds[2], 1, ("fc1",))})
        torch.testing.assert_close(compiled(tree, s, index), fvt.lora.call_batched(net, tree, s, x, index=index), rtol=0, atol=0)
    assert counter.frame_count == 1
    with pytest.raises(IndexError, match="out of bounds"):  # documented: compiled, index values are not read (no typed check)
        compiled(tree, s, torch.tensor([0, 1, 5, 0, 0]))


# --- tensor parallelism (two gloo processes, as tests/test_distributed.py runs them) --------------------------------


def _tp_ranks(rank: int, world: int, port: int, folder: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from fvtransform.distributed import ShardPlan, shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
        plain = copy.deepcopy(mlp)
        tree = fvt.ParamTree.from_module(mlp)
        parallelize_module(mlp, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
        tp_tree = shard(tree, mesh, ShardPlan(((("0.weight", "0.bias"), (Shard(0),)), ("2.weight", (Shard(1),))), default=(Replicate(),)))
        s = fvt.lora.stack([fvt.lora.random_adapter(tree, targets=["0.weight", "2.weight"], rank=r, seed=r, scale_b=1.0) for r in (2, 3)])
        x, index, scales = torch.randn(3, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([1, -1, 0]), torch.tensor([0.8, -1.5])
        want = fvt.lora.call_batched(plain, tree, s, x, index=index, scales=scales)
        got = fvt.lora.call_batched(mlp, tp_tree, s, x, index=index, scales=scales)
        assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
        assert not torch.allclose(want, fvt.call(plain, tree, x), atol=1e-3)  # the adapters changed the output
    finally:
        dist.destroy_process_group()
    (Path(folder) / f"rank{rank}.done").touch()  # reached only when this rank's checks passed


def test_under_tensor_parallelism_the_factors_are_placed_like_their_weight(tmp_path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_tp_ranks, args=(2, port, str(tmp_path)), nprocs=2, start_method="fork", join=True)
    assert sorted(p.name for p in tmp_path.glob("rank*.done")) == ["rank0.done", "rank1.done"]


# --- DoRA per sample ----------------------------------------------------------------------------------------------------


def test_dora_per_sample_matches_peft_one_sample_at_a_time(net: _Net) -> None:
    """PEFT's DoRA forward (``m / ||W + s B A||`` per row, detached), one sample at a time with its adapter set
    (PEFT's mixed batch refuses DoRA: "Cannot pass `adapter_names` when DoRA is enabled")."""
    peft = pytest.importorskip("peft")
    tree, x = fvt.ParamTree.from_module(net), _x(5)
    specs = {"style": (2, ["fc1", "fc2"], True), "motion": (4, ["conv", "fc1", "fc2"], False), "char": (1, ["fc1"], True)}
    pm = None
    for name, (r, mods, dora) in specs.items():
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r + 1, init_lora_weights=False, target_modules=mods, use_dora=dora)
        pm = peft.get_peft_model(copy.deepcopy(net), cfg, adapter_name=name) if pm is None else (pm.add_adapter(name, cfg) or pm)
    assert pm is not None
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # magnitudes away from their initial ||W + s B A||, so the rescaling shows
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(torch.rand(p.shape, generator=g) + 0.5)
    sd = pm.eval().state_dict()
    adapters = {}
    for name, (r, mods, dora) in specs.items():
        pre = f"base_model.model.{{}}.lora_{{}}.{name}.weight"
        adapters[name] = LoraAdapter({f"{m}.weight": LowRank(sd[pre.format(m, "A")], sd[pre.format(m, "B")], (2 * r + 1) / r,
                                                            magnitude=sd[f"base_model.model.{m}.lora_magnitude_vector.{name}.weight"] if dora else None)
                                      for m in mods})
    s = fvt.lora.stack(adapters)
    rows = []
    with torch.no_grad():
        for i, chosen in enumerate(["style", None, "char", "motion", "style"]):
            if chosen is None:
                with pm.disable_adapter():
                    rows.append(pm(x[i : i + 1]))
            else:
                pm.set_adapter(chosen)
                rows.append(pm(x[i : i + 1]))
    want = torch.cat(rows)
    got = fvt.lora.call_batched(net, tree, s, x, index=torch.tensor([0, -1, 2, 1, 0]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    one = fvt.lora.call(net, tree, [(adapters["style"], 0.7)], x[:1])  # and the single-adapter DoRA call, with a scale
    torch.testing.assert_close(fvt.lora.call_batched(net, tree, s, x[:1], index=torch.tensor([0]), scales=torch.tensor([0.7, 1.0, 1.0])),
                               one, rtol=1e-5, atol=1e-5)


def test_dora_that_per_sample_cannot_run_names_the_adapter_and_key(net: _Net) -> None:
    g = torch.Generator().manual_seed(0)
    conv_dora = LoraAdapter({"conv.weight": LowRank(torch.randn(1, 3, 3, 3, generator=g), torch.randn(4, 1, 1, 1, generator=g), 1.0,
                                                    magnitude=torch.rand(4, generator=g) + 0.5)})
    with pytest.raises(UsageError, match=r"adapter #1 'conv': target 'conv.weight' is a DoRA target of a convolution"):
        fvt.lora.stack({"style": _adapter(1), "conv": conv_dora})
    zero = LoraAdapter({"fc2.weight": LowRank(torch.ones(1, 8), torch.ones(3, 1), 1.0, magnitude=torch.ones(3))})
    tree = fvt.ParamTree({**fvt.ParamTree.from_module(net), "fc2.weight": -torch.ones(3, 8)})
    with pytest.raises(NumericError, match=r"'fc2.weight': sample 1's DoRA weight W \+ s B A has a row of norm 0"):
        fvt.lora.call_batched(net, tree, fvt.lora.stack([zero]), _x(2), index=torch.tensor([-1, 0]))


def _dora(seed: int, rank: int) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter({"fc1.weight": LowRank(torch.randn(rank, 16, generator=g), torch.randn(8, rank, generator=g), 0.5, magnitude=torch.rand(8, generator=g) + 0.5),
                        "fc2.weight": LowRank(torch.randn(rank, 8, generator=g), torch.randn(3, rank, generator=g), 0.5)})


def test_dora_added_dropped_and_compiled_equals_a_fresh_stack(net: _Net) -> None:
    tree, x = fvt.ParamTree.from_module(net), _x(4)
    grown = fvt.lora.stack([_adapter(1), _adapter(2)]).add(_dora(3, 2)).drop(0).add(_dora(4, 5))  # DoRA buffers, rank growth
    fresh = fvt.lora.stack([_adapter(2), _dora(3, 2), _dora(4, 5)])
    index, scales = torch.tensor([2, 0, 1, -1]), torch.tensor([1.0, 0.6, -0.4])
    want = fvt.lora.call_batched(net, tree, fresh, x, index=index, scales=scales)
    torch.testing.assert_close(fvt.lora.call_batched(net, tree, grown, x, index=index, scales=scales), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(want[0], fvt.lora.call(net, tree, [(_dora(4, 5), -0.4)], x[:1])[0], rtol=1e-5, atol=1e-5)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(lambda i, sc: fvt.lora.call_batched(net, tree, fresh, x, index=i, scales=sc), backend=counter, fullgraph=True)
    torch.testing.assert_close(compiled(index, scales), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(compiled(index.flip(0), scales * 2), fvt.lora.call_batched(net, tree, fresh, x, index=index.flip(0), scales=scales * 2), rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1
