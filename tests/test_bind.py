"""``fvt.bind``: a stateful module runs on a tree's tensors inside a ``with`` block (issue 16, item 3).

The model for what binding means is ``torch.func.functional_call`` (its ``_reparametrize_module``): these
tests compare against it, and check what it leaves to the caller: strict keys first, no copies, restored
on exit even after an exception, tied weights, buffers, nesting, and a tree that is never mutated.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fvtransform as fvt
from fvtransform.errors import ImmutableError, KeyMismatchError, ShapeMismatchError, UsageError


class Net(nn.Module):
    """A linear layer, a BatchNorm (buffers updated in place in training), a tied head and a non-persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(3, 4, bias=False)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 3, bias=False)
        self.head.weight = nn.Parameter(torch.empty(3, 4))
        self.out = nn.Linear(4, 3, bias=False)
        self.out.weight = self.head.weight  # tied: two names, one parameter
        self.register_buffer("shift", torch.full((3,), 0.5), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.emb(x))) + self.shift


def _tree(seed: int) -> fvt.ParamTree:
    g = torch.Generator().manual_seed(seed)
    data = {k: torch.randn(t.shape, generator=g) if t.is_floating_point() else t.clone()
            for k, t in Net().state_dict().items()}
    data["norm.running_var"] = data["norm.running_var"].abs() + 0.5
    data["out.weight"] = data["head.weight"]  # one tensor under both tied names, as state_dict() has it
    return fvt.ParamTree(data)


def _slots(m: nn.Module) -> dict[str, int]:
    return {k: id(t) for k, t in {**dict(m.named_parameters(remove_duplicate=False)),
                                  **dict(m.named_buffers(remove_duplicate=False))}.items()}


@pytest.fixture
def net() -> Net:
    return Net().eval()


def test_runs_like_functional_call_with_the_trees_own_tensors(net):
    tree, x = _tree(0), torch.randn(2, 3)
    before = _slots(net)
    with fvt.bind(net, tree) as bound:
        assert bound is net
        assert net.emb.weight is tree["emb.weight"] and net.out.weight is tree["head.weight"]  # no copies
        assert net.shift is not None and torch.equal(net.shift, torch.full((3,), 0.5))  # the module's own
        got = net(x)
    assert torch.equal(got, torch.func.functional_call(net, dict(tree), (x,)))
    assert _slots(net) == before and isinstance(net.emb.weight, nn.Parameter)


def test_restored_after_an_exception(net):
    before = _slots(net)
    with pytest.raises(RuntimeError, match="inside"):
        with fvt.bind(net, _tree(0)):
            raise RuntimeError("inside")
    assert _slots(net) == before


def test_strict_key_and_shape_checks_come_first(net):
    before = _slots(net)
    tree = _tree(0)
    with pytest.raises(KeyMismatchError, match=r"fvt.bind: the tree does not fit Net:\n  missing \(1\): \['emb.weight'\]"):
        with fvt.bind(net, fvt.drop(tree, "emb.weight")):
            pass
    with pytest.raises(KeyMismatchError, match=r"unexpected \(1\): \['extra'\]"):
        with fvt.bind(net, fvt.update(tree, {"extra": torch.zeros(1)}, allow_new=True)):
            pass
    with pytest.raises(ShapeMismatchError, match=r"'emb.weight': expected shape \[4, 3\], found \[3, 4\]"):
        with fvt.bind(net, fvt.update(tree, {"emb.weight": torch.zeros(3, 4)})):
            pass
    assert _slots(net) == before


def test_tied_weights_once_or_as_one_tensor_never_two(net):
    tree = _tree(0)
    once = fvt.drop(tree, "out.weight")
    with fvt.bind(net, once):
        assert net.out.weight is once["head.weight"]
    with pytest.raises(KeyMismatchError, match=r"ties \['head.weight', 'out.weight'\].*different tensors"):
        with fvt.bind(net, fvt.update(tree, {"out.weight": torch.zeros(3, 4)})):
            pass


def test_buffers_updated_in_place_never_change_the_tree(net):
    tree = _tree(0)
    mean = tree["norm.running_mean"].clone()
    net.train()
    with fvt.bind(net, tree):
        net(torch.randn(5, 3))
        assert not torch.equal(net.norm.running_mean, mean)  # the module updated its (bound) buffer
    assert torch.equal(tree["norm.running_mean"], mean)


def test_an_in_place_write_to_the_tree_is_refused_on_exit(net):
    tree = _tree(0)
    with pytest.raises(ImmutableError, match=r"wrote into the tree's tensors in place: \['emb.weight'\].*fvt.update"):
        with fvt.bind(net, tree), torch.no_grad():
            net.emb.weight.add_(1.0)
    assert isinstance(net.emb.weight, nn.Parameter)  # restored all the same


def test_nesting_restores_the_outer_tree(net):
    t0, t1, x = _tree(0), _tree(1), torch.randn(2, 3)
    with fvt.bind(net, t0):
        with fvt.bind(net, t1):
            assert torch.equal(net(x), fvt.call(net, t1, x))
        assert net.emb.weight is t0["emb.weight"] and torch.equal(net(x), fvt.call(net, t0, x))


def test_a_meta_module_runs_bound_and_gradients_reach_the_tree():
    with fvt.registry.meta_parameters():  # parameters on meta, buffers real: as fvt.load_model builds modules
        net = Net().eval()
    params = dict(Net().named_parameters(remove_duplicate=False))
    tree = fvt.map_tensors(_tree(0), lambda k, t: t.requires_grad_(k in params), with_keys=True)
    with fvt.bind(net, tree):
        net(torch.randn(2, 3)).sum().backward()
    assert tree["emb.weight"].grad is not None and tree["head.weight"].grad is not None and net.emb.weight.is_meta


def test_caller_mistakes_are_usage_errors(net):
    with pytest.raises(UsageError, match=r"fvt.bind: the first argument must be an nn.Module; found ParamTree \(the module and the tree are swapped\)"):
        with fvt.bind(_tree(0), net):  # type: ignore[arg-type]
            pass
    with pytest.raises(UsageError, match=r"fvt.bind: the tree must be a mapping"):
        with fvt.bind(net, [1, 2]):  # type: ignore[arg-type]
            pass


def test_bind_blocks_exiting_out_of_order_leave_the_module_its_own_parameters():
    # Out-of-order exit in one thread (generators / tasks): A enters, B enters, A exits, B exits.
    lin = torch.nn.Linear(2, 1)
    own_w, own_b = lin.weight, lin.bias
    t1 = {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}
    t2 = {"weight": torch.full((1, 2), 2.0), "bias": torch.ones(1)}
    a, b = fvt.bind(lin, t1), fvt.bind(lin, t2)
    a.__enter__()
    b.__enter__()
    assert lin.weight is t2["weight"]
    a.__exit__(None, None, None)
    assert lin.weight is t2["weight"]  # B still holds the module
    b.__exit__(None, None, None)
    assert lin.weight is own_w and lin.bias is own_b


def test_bind_a_module_bound_in_another_thread_is_refused():
    import threading
    lin = torch.nn.Sequential(torch.nn.Linear(2, 1))
    tree = {"0.weight": torch.ones(1, 2), "0.bias": torch.zeros(1)}
    entered, done = threading.Event(), threading.Event()

    def hold():
        with fvt.bind(lin, tree):
            entered.set()
            done.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    entered.wait(5)
    try:
        with pytest.raises(UsageError, match="another thread.*fvt.call"):
            with fvt.bind(lin[0], {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}):
                pass
    finally:
        done.set()
        t.join(5)
    assert isinstance(lin[0].weight, torch.nn.Parameter)
