import pytest
import torch

import fvtransform as fvt
from fvtransform.errors import KeyMismatchError

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
    t2 = t.map(lambda _: w)
    ids = torch.tensor([0, 3])
    assert torch.equal(fvt.call(m, t2, ids), (w[ids] @ w.T))
