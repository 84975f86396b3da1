import tempfile
from pathlib import Path

import hypothesis.strategies as st
import torch
from hypothesis import given

import fvtransform as fvt
from fvtransform import Fuse, KeyMap
from strategies import trees


@given(trees(max_size=10), st.one_of(st.none(), st.integers(1, 200)))
def test_save_load_round_trip(tree, shard):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / ("ck" if shard else "m.safetensors")
        fvt.save(tree, path, max_shard_size=shard)
        back = fvt.load(path)
        assert back == tree and back.same_order(tree)
        assert back.aliases() == tree.aliases()


@given(st.lists(st.integers(1, 6), min_size=2, max_size=4), st.integers(1, 4), st.integers(0, 1), st.integers(0, 2**16))
def test_fuse_split_round_trip_unequal(sizes, other, dim, seed):
    g = torch.Generator().manual_seed(seed)
    pieces = {}
    for i, n in enumerate(sizes):
        shape = (n, other) if dim == 0 else (other, n)
        pieces[f"m.p{i}.weight"] = torch.randn(shape, generator=g)
    tree = fvt.ParamTree(pieces)
    m = KeyMap.of([Fuse([f"m.p{i}.{{w}}" for i in range(len(sizes))], "m.fused.{w}", dim=dim)])
    plan = m.plan(tree)
    fused = plan.apply(tree)
    assert fused["m.fused.weight"].shape[dim] == sum(sizes)
    assert plan.inverse().apply(fused) == tree
