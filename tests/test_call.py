import pytest
import torch

import fvtransform as fvt
from fvtransform.errors import KeyMismatchError, ShapeMismatchError, UsageError

from _helpers import TiedEmbedding, assert_unchanged, snapshot


def test_call_matches_eager(model, tree, inputs):
    snap = snapshot(tree)
    out = fvt.call(model, tree, *inputs)
    eager = fvt.build("fvt-video-dit", device="cpu")
    eager.load_state_dict(dict(tree))
    assert torch.equal(out, eager(*inputs))
    assert_unchanged(tree, snap)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_call_rejects_missing_and_unexpected(model, tree, inputs):
    with pytest.raises(KeyMismatchError, match=r"missing \(1\): \['proj_out.bias'\]"):
        fvt.call(model, fvt.drop(tree, "proj_out.bias"), *inputs)
    with pytest.raises(KeyMismatchError, match=r"unexpected \(1\): \['extra'\]"):
        fvt.call(model, fvt.update(tree, {"extra": torch.zeros(1)}, allow_new=True), *inputs)


def test_call_with_module_and_tree_swapped_shows_the_call(model, tree, inputs):
    for fn in (fvt.call, fvt.call_with_buffers):
        name = fn.__name__
        with pytest.raises(UsageError, match=rf"fvt.{name}: the first argument must be an nn.Module; found ParamTree "
                           rf"\(the module and the tree are swapped\)\. Fix: fvt.{name}\(module, tree, \*args, \*\*kwargs\)"):
            fn(tree, model, *inputs)
        with pytest.raises(UsageError, match=rf"found dict\. Fix: fvt.{name}\(module, tree"):
            fn({}, dict(tree), *inputs)


def test_buffers_are_not_mutated_and_can_be_returned():
    bn = torch.nn.BatchNorm1d(3)
    tree = fvt.ParamTree.from_module(bn)
    snap = snapshot(tree)
    x = torch.randn(8, 3) * 5 + 2
    fvt.call(bn, tree, x)
    assert_unchanged(tree, snap)
    out, new = fvt.call_with_buffers(bn, tree, x)
    assert int(new["num_batches_tracked"]) == 1
    assert not torch.equal(new["running_mean"], tree["running_mean"])
    assert new["weight"] is tree["weight"]
    assert_unchanged(tree, snap)


def test_tied_weights_work():
    m = TiedEmbedding()
    t = fvt.ParamTree.from_module(m)
    w = torch.randn(5, 3)
    t2 = fvt.update(t, {"emb.weight": w, "head.weight": w})
    ids = torch.tensor([0, 3])
    assert torch.equal(fvt.call(m, t2, ids), (w[ids] @ w.T))


# --- shapes, kinds and ties are checked before the call (issue 15, item 8) -------------------------


def test_wrong_shape_names_key_expected_and_found(model, tree, inputs):
    bad = fvt.update(tree, {"proj_out.weight": tree["proj_out.weight"][:, :-1]})
    exp, got = list(tree["proj_out.weight"].shape), list(bad["proj_out.weight"].shape)
    with pytest.raises(ShapeMismatchError, match=rf"'proj_out.weight': expected shape {exp}, found {got}".replace("[", r"\[")):
        fvt.call(model, bad, *inputs)


def test_every_wrong_shape_is_listed_at_once():
    lin = torch.nn.Linear(3, 2)
    tree = {"weight": torch.zeros(2, 4), "bias": torch.zeros(3)}
    with pytest.raises(ShapeMismatchError, match=r"Linear \(2 tensors\):\n  'weight': .*\[2, 3\].*\[2, 4\]\n  'bias'"):
        fvt.call(lin, tree, torch.zeros(1, 3))


class Mixed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.b(self.a(x).to(self.b.weight.dtype))


def test_float_for_an_integer_buffer_is_refused_but_float32_next_to_bfloat16_is_not():
    bn = torch.nn.BatchNorm1d(2)
    tree = fvt.ParamTree.from_module(bn)
    bad = fvt.update(tree, {"num_batches_tracked": torch.tensor(0.0)})
    with pytest.raises(ShapeMismatchError, match=r"'num_batches_tracked': expected a torch.int64 tensor .*found torch.float32"):
        fvt.call(bn, bad, torch.randn(4, 2))
    mixed = Mixed()  # a float32 module next to a bfloat16 one: legitimate (keep-in-float32 modules)
    tree = fvt.cast(fvt.ParamTree.from_module(mixed), torch.bfloat16, only="b.*")
    out = fvt.call(mixed, tree, torch.ones(1, 2))
    assert out.dtype == torch.bfloat16 and tree["a.weight"].dtype == torch.float32


def test_meta_tensors_next_to_real_ones_are_refused():
    lin = torch.nn.Linear(2, 2)
    tree = {"weight": torch.zeros(2, 2), "bias": torch.zeros(2, device="meta")}
    with pytest.raises(ShapeMismatchError, match=r"'bias' is on the meta device .* while 'weight' is not"):
        fvt.call(lin, tree, torch.zeros(1, 2))


def test_state_dict_of_a_tied_model_runs_and_matches_eager():
    torch.manual_seed(0)
    m = TiedEmbedding()
    ids = torch.tensor([0, 3, 4])
    sd = fvt.ParamTree(m.state_dict())  # both tied names, as detached views of one tensor
    assert "head.weight" in sd and sd["head.weight"] is not sd["emb.weight"]
    assert torch.equal(fvt.call(m, sd, ids), m(ids))
    once = fvt.drop(sd, "head.weight")  # the tie saved once: the module re-ties it
    assert torch.equal(fvt.call(m, once, ids), m(ids))
    assert torch.equal(fvt.call(m, fvt.drop(sd, "emb.weight"), ids), m(ids))
    _, new = fvt.call_with_buffers(m, once, ids)
    assert "head.weight" not in new


def test_tied_names_holding_different_tensors_are_refused():
    m = TiedEmbedding()
    sd = fvt.ParamTree(m.state_dict())
    split = fvt.update(sd, {"head.weight": sd["head.weight"].clone()})
    with pytest.raises(KeyMismatchError, match=r"ties \['emb.weight', 'head.weight'\].*different tensors for 'emb.weight' and 'head.weight'"):
        fvt.call(m, split, torch.tensor([0]))

