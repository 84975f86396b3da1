"""Sharding on torch.distributed: plans without a process group, and multi-process gloo groups on 127.0.0.1.

Spawning costs seconds on 2 cores, so each group runs many checks (``fork`` start method); an assertion
that fails in a worker fails the test with the worker's traceback.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

import fvtransform as fvt
from fvtransform.distributed import ShardPlan, fsdp_plan, tp_plan
from fvtransform.distributed._plan import chunk_range, get_plan
from fvtransform.errors import PlanError, UsageError

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


# ----------------------------------------------------------------------------- plans, no process group
def test_plans_resolve_and_predict_bytes_without_a_process_group(tree):
    plan = tp_plan()
    resolved = plan.resolve(tree, mesh_shape=(2,))
    assert resolved["blocks.0.attn1.to_q.weight"] == (Shard(0),)
    assert resolved["blocks.0.attn1.to_q.bias"] == (Shard(0),)
    assert resolved["blocks.0.attn1.to_out.0.weight"] == (Shard(1),)
    assert resolved["blocks.0.attn1.to_out.0.bias"] == (Replicate(),)
    assert resolved["blocks.0.ffn.net.0.proj.weight"] == (Shard(0),)
    assert resolved["blocks.0.ffn.net.2.weight"] == (Shard(1),)
    assert resolved["blocks.0.attn1.norm_q.weight"] == (Replicate(),)
    assert "Shard(1)" in repr(plan) and "(default)" in repr(plan)
    per_rank = fsdp_plan().bytes_per_rank(tree, mesh_shape=(4,))
    assert sum(per_rank) == tree.nbytes
    assert fsdp_plan(2).resolve(tree, mesh_shape=(2, 2))["blocks.0.attn1.to_q.weight"] == (Replicate(), Shard(0))
    assert [chunk_range(3, 4, i) for i in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 3)]


def test_plan_errors_name_the_rule_key_and_fix():
    t = {"a.weight": torch.empty(4, 2), "a.bias": torch.empty(4)}
    with pytest.raises(PlanError, match=r"rules that match no key: \['nothing\.\*'\]"):
        ShardPlan((("nothing.*", (Shard(0),)), ("*", (Shard(0),)))).resolve(t, mesh_shape=(2,))
    with pytest.raises(PlanError, match=r"placements on a dim the tensor lacks: \['a.bias \[4\]: Shard\(1\)'\]; give those tensors a rule"):
        ShardPlan((("*", (Shard(1),)),)).resolve(t, mesh_shape=(2,))
    with pytest.raises(PlanError, match=r"rule '\*' has 1 placements, the mesh has 2 dims \(2, 2\)"):
        ShardPlan((("*", (Shard(0),)),)).resolve(t, mesh_shape=(2, 2))
    with pytest.raises(PlanError, match=r"no rule matches \['a.bias'\] and the plan has no default"):
        ShardPlan((("*.weight", (Shard(0),)),)).resolve(t, mesh_shape=(2,))
    with pytest.raises(UsageError, match="plan must be a ShardPlan, 'fsdp', 'tp' or None"):
        get_plan("zero3", 1)


# ----------------------------------------------------------------------------- process groups
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn_name: str, folder: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        globals()[fn_name](rank, world, Path(folder))
    finally:
        dist.destroy_process_group()
    (Path(folder) / f"{fn_name}.rank{rank}.done").touch()  # reached only when every check of this rank passed


def _run_group(fn_name: str, world: int, folder: Path) -> None:
    import torch.multiprocessing as mp

    mp.start_processes(_entry, args=(world, _free_port(), fn_name, str(folder)), nprocs=world, start_method="fork", join=True)
    done = sorted(p.name for p in folder.glob(f"{fn_name}.rank*.done"))
    assert done == [f"{fn_name}.rank{r}.done" for r in range(world)], f"ranks that finished their checks: {done}"


def _random_tree(seed: int) -> fvt.ParamTree:
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (1, 4), (0, 2), (7,), (3,), (), (6, 5, 2), (2, 9)]
    data = {f"t{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    data["bf"] = torch.randn(9, 4, generator=g).to(torch.bfloat16)
    data["ints"] = torch.randint(0, 100, (5, 2), generator=g)
    data["tied"] = data["t0"]
    return fvt.ParamTree(data)


def _same_as_distribute_tensor(tree, sharded, mesh, resolved) -> None:
    from torch.distributed.tensor import distribute_tensor

    for k, t in tree.items():
        ref = distribute_tensor(t, mesh, resolved[k], src_data_rank=None)
        assert sharded[k].placements == ref.placements, k
        assert torch.equal(sharded[k].to_local(), ref.to_local()), k
        assert sharded[k].shape == t.shape and sharded[k].stride() == ref.stride(), k


def _check_round_trips(mesh, plans, folder: Path) -> None:
    for seed, plan in enumerate(plans):
        tree = _random_tree(seed)
        snap = {k: v.clone() for k, v in tree.items()}
        sharded = fvt.shard(tree, mesh, plan)
        resolved = get_plan(plan, mesh.ndim).resolve(tree, mesh_shape=tuple(mesh.shape))
        _same_as_distribute_tensor(tree, sharded, mesh, resolved)
        assert sharded["tied"] is sharded["t0"]
        back = fvt.unshard(sharded)
        assert back == tree and back["tied"] is back["t0"]
        assert all(torch.equal(tree[k], snap[k]) for k in tree)  # the input was not mutated
        # sharded load: each rank reads its slices, same as shard(load(...))
        path = folder / f"tree{seed}"
        loaded = fvt.load(path, mesh=mesh, plan=plan)
        expected = fvt.shard(fvt.load(path), mesh, plan)
        assert set(loaded) == set(expected)
        for k in expected:
            assert loaded[k].placements == expected[k].placements
            assert torch.equal(loaded[k].to_local(), expected[k].to_local()), k
        cast = fvt.load(path, mesh=mesh, plan=plan, dtype=torch.bfloat16)
        assert cast["t0"].to_local().dtype == torch.bfloat16 and cast["ints"].to_local().dtype == torch.int64
        local_bytes = sum(v.to_local().numel() * v.to_local().element_size() for k, v in loaded.items() if k != "tied")
        predicted = get_plan(plan, mesh.ndim).bytes_per_rank(tree, mesh_shape=tuple(mesh.shape))
        assert local_bytes == predicted[torch.distributed.get_rank()]


def _check_merge_commutes(mesh, tree, plans) -> None:
    adapter = fvt.lora.random_adapter(
        tree, targets=["blocks.*.attn1.to_*.weight", "blocks.*.ffn.net.*.weight"], rank=3, seed=5
    )
    reference = fvt.lora.merge(tree, [(adapter, 0.7)])
    for plan in plans:
        sharded = fvt.shard(tree, mesh, plan)
        merged = fvt.lora.merge(sharded, [(adapter, 0.7)])
        assert fvt.unshard(merged) == reference, plan
        assert fvt.unshard(fvt.lora.unmerge(merged, [(adapter, 0.7)])) == fvt.lora.unmerge(reference, [(adapter, 0.7)])
        untouched = "blocks.0.attn1.norm_q.weight"
        assert merged[untouched] is sharded[untouched]


def _check_hypothesis_round_trips(mesh) -> None:
    """Random shapes (uneven, empty, 0-d) and placements; derandomized, so every rank draws the same examples."""
    import hypothesis.strategies as st
    from hypothesis import HealthCheck, given, settings

    @st.composite
    def cases(draw):
        shape = tuple(draw(st.lists(st.integers(0, 7), max_size=3)))
        options = [Replicate()] + [Shard(d) for d in range(len(shape))]
        placements = tuple(draw(st.sampled_from(options)) for _ in range(mesh.ndim))
        dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.int32]))
        return shape, placements, dtype

    @settings(max_examples=40, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(cases())
    def round_trip(case):
        shape, placements, dtype = case
        t = (torch.arange(int(torch.tensor(shape).prod()) if shape else 1) % 97).reshape(shape).to(dtype)
        tree = fvt.ParamTree({"x": t})
        plan = ShardPlan((("x", placements),))
        sharded = fvt.shard(tree, mesh, plan)
        _same_as_distribute_tensor(tree, sharded, mesh, {"x": placements})
        assert fvt.unshard(sharded) == tree

    round_trip()


def _check_fused_qkv_under_tp(mesh, folder: Path, rank: int) -> None:
    """q, k, v fused while loading: each rank holds its q, k and v rows concatenated (column-parallel layout)."""
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    g = torch.Generator().manual_seed(7)
    tree = fvt.ParamTree({f"b.{n}.weight": torch.randn(5, 4, generator=g) for n in "qkv"} | {"b.o.weight": torch.randn(4, 15, generator=g)})
    fvt.save(tree, folder / f"qkv-{rank}.safetensors")
    fuse = fvt.KeyMap.of([fvt.Fuse(["b.q.weight", "b.k.weight", "b.v.weight"], "b.qkv.weight")])  # keeps b.o.weight
    plan = ShardPlan((("b.qkv.weight", (Shard(0),)), ("b.o.weight", (Shard(1),))))
    loaded = fvt.load(folder / f"qkv-{rank}.safetensors", mesh=mesh, plan=plan, rename=fuse)
    qkv = loaded["b.qkv.weight"]
    rows = [chunk_range(5, 2, rank)] * 3
    expected_local = torch.cat([tree[f"b.{n}.weight"][a:b] for n, (a, b) in zip("qkv", rows)])
    assert torch.equal(qkv.to_local(), expected_local)
    full = torch.cat([tree[f"b.{n}.weight"] for n in "qkv"])
    assert torch.equal(qkv.full_tensor(), full)
    ref = distribute_tensor(full, mesh, (_StridedShard(0, split_factor=3),), src_data_rank=None)
    assert torch.equal(ref.to_local(), qkv.to_local())
    assert fvt.unshard(loaded) == fuse(tree)
    # LoRA on the fused, per-segment sharded weight: each rank takes B's rows of every segment
    adapter = fvt.lora.random_adapter(fuse(tree), targets="b.*.weight", rank=2, seed=4)
    assert fvt.unshard(fvt.lora.merge(loaded, adapter)) == fvt.lora.merge(fuse(tree), adapter)
    uneven = fvt.ParamTree({"b.q.weight": torch.zeros(6, 4), "b.k.weight": torch.zeros(2, 4), "b.v.weight": torch.zeros(2, 4)})
    fvt.save(uneven, folder / f"gqa-{rank}.safetensors")
    try:
        fvt.load(folder / f"gqa-{rank}.safetensors", mesh=mesh, plan=ShardPlan((("b.qkv.weight", (Shard(0),)),)), rename=fuse)
        raise AssertionError("unequal fused pieces sharded along the fuse dim must be refused")
    except PlanError as e:
        assert "differ in size along dim 0 ([6, 2, 2])" in str(e)


def _group_two(rank: int, world: int, folder: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    from fvtransform.models import init_weights

    mesh = init_device_mesh("cpu", (world,))
    custom = ShardPlan(((("t0", "tied", "t6", "t7", "bf"), (Shard(1),)), ("t5", (Replicate(),))), default=(Shard(0),))
    _check_round_trips(mesh, ["fsdp", custom], folder)
    _check_hypothesis_round_trips(mesh)
    _check_fused_qkv_under_tp(mesh, folder, rank)
    only_zero = fvt.unshard(fvt.shard(_random_tree(0), mesh), dst=0)
    assert (only_zero == _random_tree(0)) if rank == 0 else len(only_zero) == 0
    conflicting = ShardPlan((("t0", (Shard(1),)), ("t5", (Replicate(),))), default=(Shard(0),))
    try:
        fvt.shard(_random_tree(0), mesh, conflicting)
        raise AssertionError("tied keys placed differently must be refused")
    except PlanError as e:
        assert "tied keys 't0' and 'tied' share one tensor but the plan places them differently" in str(e)

    model = fvt.build("fvt-video-dit")
    tree = fvt.ParamTree(init_weights(model, seed=0))
    _check_merge_commutes(mesh, tree, ["fsdp", "tp"])

    # tensor parallelism: a module prepared with parallelize_module runs fvt.call on a tree sharded by a plan
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    mlp_tree = fvt.ParamTree.from_module(mlp)
    x = torch.randn(3, 8)
    single = fvt.call(mlp, mlp_tree, x)
    parallelize_module(mlp, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    plan = ShardPlan(((("0.weight", "0.bias"), (Shard(0),)), ("2.weight", (Shard(1),))), default=(Replicate(),))
    tp_tree = fvt.shard(mlp_tree, mesh, plan)
    out = fvt.call(mlp, tp_tree, x)
    assert torch.allclose(out, single, atol=1e-6)
    # on-the-fly LoRA under tensor parallelism: factors placed like their weights, nothing gathered
    lora = fvt.lora.random_adapter(mlp_tree, targets=["0.weight", "2.weight"], rank=2, seed=3)
    plain_mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    want = fvt.lora.call(plain_mlp, mlp_tree, [(lora, 0.8)], x)
    got = fvt.lora.call(mlp, tp_tree, [(lora, 0.8)], x)
    assert torch.allclose(got, want, atol=1e-6), float((got - want).abs().max())

    # FSDP2: a meta-built module wrapped with fully_shard takes the tree loaded with the fsdp plan
    from torch.distributed.fsdp import fully_shard

    inputs = (torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([300]),
              torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(2)))
    expected = fvt.call(fvt.build("fvt-video-dit"), tree, *inputs)
    fvt.save(tree, folder / f"model-{rank}.safetensors")  # each rank its own file, no race
    fsdp_model = fvt.build("fvt-video-dit")
    for block in fsdp_model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(fsdp_model, mesh=mesh)
    loaded = fvt.load(folder / f"model-{rank}.safetensors", mesh=mesh, plan="fsdp")
    fsdp_model.load_state_dict(dict(loaded), assign=True, strict=True)
    with torch.no_grad():
        got = fsdp_model(*inputs)
    assert torch.allclose(got, expected, atol=1e-6), float((got - expected).abs().max())


def _group_four(rank: int, world: int, folder: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from fvtransform.models import init_weights

    mesh = init_device_mesh("cpu", (2, 2))
    two_d = ShardPlan(((("t0", "tied", "t6", "t7", "bf"), (Shard(0), Shard(1))), (("t3", "t4"), (Shard(0), Shard(0))),
                       ("t5", (Replicate(), Replicate()))),
                      default=(Replicate(), Shard(0)))
    _check_round_trips(mesh, ["fsdp", two_d], folder)
    _check_hypothesis_round_trips(mesh)
    model = fvt.build("fvt-video-dit")
    tree = fvt.ParamTree(init_weights(model, seed=0))
    _check_merge_commutes(mesh, tree, ["fsdp", "tp"])
    flat = init_device_mesh("cpu", (4,))
    _check_round_trips(flat, ["fsdp"], folder)


@pytest.fixture
def saved_trees(tmp_path):
    for seed in range(2):
        fvt.save(_random_tree(seed), tmp_path / f"tree{seed}", max_shard_size="200B")
    return tmp_path


@pytest.mark.timeout(180)
def test_two_ranks_shard_load_merge_tp_and_fsdp2(saved_trees):
    _run_group("_group_two", 2, saved_trees)


@pytest.mark.timeout(180)
def test_four_ranks_two_d_mesh_and_one_d_mesh(saved_trees):
    _run_group("_group_four", 4, saved_trees)

