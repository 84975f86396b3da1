"""Issue 18: the streaming merge at the speed of the disk — kernel copies, direct writes, a depth-one pipeline,
``device=``, the in-memory merge's one rounding, the hash-free canonical order and a CLI that starts without torch."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
import subprocess
import sys
import threading
import weakref

import pytest
import torch

import fvtransform as fvt
from fvtransform import errors as E
from fvtransform.cli._main import main
from fvtransform.io import _safetensors as st
from fvtransform.lora import _merge
from fvtransform.lora._adapter import LoraAdapter, LowRank

ROOT = Path(__file__).resolve().parents[1]


def _tree() -> fvt.ParamTree:
    g = torch.Generator().manual_seed(0)
    t = {f"blocks.{i}.attn.to_{n}.weight": torch.randn(48, 32, generator=g).bfloat16() for i in range(2) for n in "qkv"}
    t.update({f"blocks.{i}.norm.bias": torch.randn(32, generator=g) for i in range(2)})
    t["steps"] = torch.arange(5)
    return fvt.ParamTree(t)


@pytest.fixture
def base(tmp_path: Path) -> tuple[Path, Path, LoraAdapter]:
    tree = _tree()
    fvt.save(tree, tmp_path / "one.safetensors")
    fvt.save(tree, tmp_path / "sharded", max_shard_size=8000)
    return tmp_path / "one.safetensors", tmp_path / "sharded", fvt.lora.random_adapter(tree, targets="*.to_[qk].weight", rank=4, seed=1)


def _files(p: Path) -> dict[str, bytes]:
    return {q.name: q.read_bytes() for q in sorted(p.iterdir())} if p.is_dir() else {p.name: p.read_bytes()}


def test_untouched_tensors_are_copied_by_the_kernel_and_the_fallback_writes_the_same_bytes(base, tmp_path, monkeypatch):
    if st._COPY_FILE_RANGE is None:
        pytest.skip("this platform has no os.copy_file_range")
    one, sharded, a = base
    calls = []
    real = st._COPY_FILE_RANGE
    monkeypatch.setattr(st, "_COPY_FILE_RANGE", lambda *args: calls.append(args) or real(*args))
    kernel = {src: fvt.lora.merge_checkpoint(src, a, tmp_path / "k" / src.name) for src in (one, sharded)}
    untouched = [k for k in _tree() if k not in a]
    assert len(calls) == len(untouched) * 2  # every untouched tensor of both layouts, one call each (small tensors)
    monkeypatch.setattr(st, "_COPY_FILE_RANGE", None)  # a platform without it
    for src, out in kernel.items():
        assert _files(fvt.lora.merge_checkpoint(src, a, tmp_path / "w" / src.name)) == _files(out)

    def refused(*_args: object) -> int:  # a pair of file systems the kernel cannot copy between
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(st, "_COPY_FILE_RANGE", refused)
    for src, out in kernel.items():
        assert _files(fvt.lora.merge_checkpoint(src, a, tmp_path / "x" / src.name)) == _files(out)
    merged, want = fvt.load(kernel[sharded]), fvt.lora.merge(_tree(), a)
    assert set(merged) == set(want) and all(torch.equal(merged[k], want[k]) for k in want)


def test_a_source_that_ends_before_its_range_is_a_format_error_naming_file_and_key(tmp_path):
    if st._COPY_FILE_RANGE is None:
        pytest.skip("this platform has no os.copy_file_range")
    src = tmp_path / "src.bin"
    src.write_bytes(b"\1" * 10)
    spec = {"w": st.TensorSpec(torch.uint8, (64,))}
    with open(src, "rb") as fin, open(tmp_path / "out.safetensors", "xb") as f:
        rng = st.FileRange(fin.fileno(), 0, torch.uint8, (64,), lambda: torch.zeros(64, dtype=torch.uint8))
        with pytest.raises(E.FormatError, match=r"out\.safetensors: tensor 'w': its source file ended 54 bytes early"):
            st.write_safetensors(f, spec, lambda _k: rng)


def test_short_writes_are_completed(tmp_path, monkeypatch):
    real = os.write
    monkeypatch.setattr(st.os, "write", lambda fd, data: real(fd, bytes(data[:7])))  # a pipe-like writer
    t = {"a": torch.arange(100, dtype=torch.float32), "b": torch.ones(3, 5, dtype=torch.bfloat16)}
    with open(tmp_path / "x.safetensors", "xb") as f:
        st.write_safetensors(f, st.tensor_specs(t, "x"), t.__getitem__)
    got = fvt.load(tmp_path / "x.safetensors")
    assert set(got) == set(t) and all(torch.equal(got[k], t[k]) for k in t)


@pytest.mark.parametrize("overlap", [False, True])
def test_the_pipeline_holds_at_most_two_tensors_and_keeps_the_bytes(tmp_path, overlap):
    names = [f"t{i}" for i in range(6)]
    alive: list[weakref.ref] = []
    most, threads = [0], set()

    def produce(name: str) -> torch.Tensor:
        most[0] = max(most[0], sum(r() is not None for r in alive))  # made before this one, not yet dropped
        threads.add(threading.get_ident())
        t = torch.full((1000,), float(names.index(name)))
        alive.append(weakref.ref(t))
        return t

    specs = {n: st.TensorSpec(torch.float32, (1000,)) for n in names}
    with open(tmp_path / "x.safetensors", "xb") as f:
        st.write_safetensors(f, specs, produce, overlap=overlap)
    got = fvt.load(tmp_path / "x.safetensors")
    assert [float(got[n][0]) for n in names] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert most[0] <= (1 if overlap else 0)  # at most one tensor being written while the next is made
    assert (threading.get_ident() in threads) != overlap and len(threads) == 1  # made on one other thread, in order


def test_a_failing_producer_stops_the_pipeline_with_its_error(tmp_path):
    made: list[str] = []

    def produce(name: str) -> torch.Tensor:
        made.append(name)
        if name == "t2":
            raise E.NumericError("t2: overflow")
        return torch.zeros(4)

    specs = {f"t{i}": st.TensorSpec(torch.float32, (4,)) for i in range(5)}
    with open(tmp_path / "x.safetensors", "xb") as f, pytest.raises(E.NumericError, match="t2: overflow"):
        st.write_safetensors(f, specs, produce, overlap=True)
    assert made == ["t0", "t1", "t2"]


def test_device_cpu_gives_the_same_bytes_and_bad_devices_are_usage_errors(base, tmp_path):
    one, _sharded, a = base
    plain = fvt.lora.merge_checkpoint(one, a, tmp_path / "plain" / one.name)
    on_cpu = fvt.lora.merge_checkpoint(one, a, tmp_path / "cpu" / one.name, device="cpu")
    assert on_cpu.read_bytes() == plain.read_bytes()
    assert fvt.lora.merge_checkpoint(one, a, tmp_path / "cpu2" / one.name, device=torch.device("cpu")).read_bytes() == plain.read_bytes()
    for device, why in [("meta", "the meta device holds no values"), ("warp9", "not a device name")]:
        with pytest.raises(E.UsageError, match=rf"device '{device}': {why}.*device='cpu'"):
            fvt.lora.merge_checkpoint(one, a, tmp_path / "bad.safetensors", device=device)
    if not torch.cuda.is_available():
        with pytest.raises(E.UsageError, match=r"device 'cuda': not available here.*device='cuda' on a machine with a GPU"):
            fvt.lora.merge_checkpoint(one, a, tmp_path / "bad.safetensors", device="cuda")
    assert not (tmp_path / "bad.safetensors").exists()


def test_cli_merge_device(base, tmp_path, capsys):
    one, _sharded, a = base
    fvt.lora.save(a, tmp_path / "lora", format="peft")
    lora = str(tmp_path / "lora")
    assert main(["merge", str(one), lora, "-o", str(tmp_path / "out.safetensors"), "--device", "cpu", "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["output"].endswith("out.safetensors")
    assert main(["merge", str(one), lora, "-o", str(tmp_path / "m.safetensors"), "--device", "meta", "--quiet"]) == 2
    assert "fvtransform: error: device 'meta': the meta device holds no values" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


_NO_TORCH = """
import sys
from fvtransform.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    assert e.code == 0, e.code
heavy = sorted(m for m in ("torch", "numpy", "diffusers", "transformers", "peft", "huggingface_hub", "safetensors") if m in sys.modules)
print("HEAVY", heavy)
"""


@pytest.mark.parametrize("argv", [["--help"], ["merge", "--help"], ["inspect", "--help"]])
def test_cli_help_imports_no_torch(argv):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", _NO_TORCH, *argv], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage: fvtransform" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "HEAVY []"


def test_fvt_call_is_the_function_and_no_module_shares_its_name():
    code = ("import fvtransform as fvt, importlib.util, types; assert callable(fvt.call) and not isinstance(fvt.call, types.ModuleType); "
            "assert importlib.util.find_spec('fvtransform.call') is None; "
            "import fvtransform.lora; from fvtransform import call; assert call is fvt.call; "
            "fvt.call = len; assert fvt.call is len; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_merge_is_one_rounding_of_the_float32_sum_in_and_out_of_place(dtype):
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(300, 40, generator=g) * 3).to(dtype)
    A, B = torch.randn(4, 40, generator=g), torch.randn(300, 4, generator=g)
    a = LoraAdapter({"w": LowRank(A, B, scale=0.5)})
    want = w.float().addmm(B * 0.5, A).to(dtype)  # the float32 sum, rounded once into the weight's dtype
    assert torch.equal(fvt.lora.merge({"w": w}, a)["w"], want)
    donated = w.clone()
    assert torch.equal(fvt.lora.merge({"w": donated}, a, donate=True)["w"], want)
    assert torch.equal(donated, want)  # written into the donated storage


def test_an_fp16_overflow_is_still_refused():
    a = LoraAdapter({"w": LowRank(torch.full((1, 4), 300.0), torch.full((4, 1), 300.0), 1.0)})
    with pytest.raises(E.NumericError, match=r"'w': the merged weight holds Inf/NaN in torch\.float16"):
        fvt.lora.merge({"w": torch.zeros(4, 4, dtype=torch.float16)}, a)


def test_the_canonical_order_hashes_factors_only_between_tied_contributions(monkeypatch):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 32, generator=g).bfloat16()

    def lr(r: int) -> LoraAdapter:
        return LoraAdapter({"w": LowRank(torch.randn(r, 32, generator=g), torch.randn(64, r, generator=g) * 0.1, 1.0)})

    a, b, c, d = lr(4), lr(8), lr(4), lr(4)
    hashed: list[int] = []
    real = _merge._digest
    monkeypatch.setattr(_merge, "_digest", lambda t: hashed.append(1) or real(t))
    fvt.lora.merge({"w": w}, [(a, 0.5), (b, 0.5), (c, 0.7)])  # scales or ranks differ: nothing to hash
    assert hashed == []
    tied = [(a, 0.5), (c, 0.5), (d, 0.5), (b, 0.5)]  # a, c, d tie on every cheap fact: their bytes order them
    first = fvt.lora.merge({"w": w}, tied)["w"]
    assert len(hashed) == 3 * 2  # A and B of each of the three tied contributions
    for order in ([3, 2, 1, 0], [1, 0, 3, 2], [2, 3, 0, 1]):
        assert torch.equal(fvt.lora.merge({"w": w}, [tied[i] for i in order])["w"], first)


def test_the_kernel_copy_reads_only_the_file_whose_header_was_read(base):
    from fvtransform.io._files import find_weight_files
    from fvtransform.io._load import Checkpoint
    from fvtransform.lora._stream import _Sources

    one, _sharded, _a = base
    sources = _Sources(Checkpoint(find_weight_files(one)))
    data = one.read_bytes()
    one.unlink()
    one.write_bytes(data)  # the same bytes in another file (another inode) after the header was read
    with pytest.raises(E.IntegrityError, match=r"one\.safetensors: the file was replaced or rewritten after its header was read"):
        sources.fd(one)
    sources.close()


def test_an_in_memory_file_is_written_through_its_own_write():
    import io

    t = {"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(2, 2, dtype=torch.bfloat16)}
    buf = io.BytesIO()
    n = st.write_safetensors(buf, st.tensor_specs(t, "x"), lambda k: t[k], overlap=True)
    raw = buf.getvalue()
    assert len(raw) == n and raw.endswith(bytes(st._tensor_bytes(t["a"])) + bytes(st._tensor_bytes(t["b"])))


_MERGE_IMPORTS = """
import sys
from fvtransform.cli import main
assert main(sys.argv[1:]) == 0
# torch._dynamo: about 1 s of start-up that only a call under torch.compile needs (fvtransform/_compiler.py)
print("PEERS", sorted(m for m in ("diffusers", "transformers", "peft", "huggingface_hub", "torch._dynamo") if m in sys.modules))
"""


def test_a_local_cli_merge_imports_no_peer_library_and_no_dynamo(base, tmp_path):
    one, _sharded, a = base
    fvt.lora.save(a, tmp_path / "lora", format="peft")
    out = subprocess.run([sys.executable, "-c", _MERGE_IMPORTS, "merge", str(one), str(tmp_path / "lora"), "-o", str(tmp_path / "o.safetensors"),
                          "--quiet"], capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "PEERS []"


def test_large_tensors_are_written_a_chunk_per_call(tmp_path, monkeypatch):
    # one os.write of a whole 27 MB tensor measured 8-9x slower than the same bytes in 1-4 MiB calls (docs/benchmarks.md)
    monkeypatch.setattr(st, "WRITE_CHUNK", 1000)
    sizes: list[int] = []
    real = os.write
    monkeypatch.setattr(st.os, "write", lambda fd, data: sizes.append(len(data)) or real(fd, data))
    t = {"big": torch.arange(2600, dtype=torch.float32), "small": torch.ones(3, dtype=torch.bfloat16)}
    with open(tmp_path / "x.safetensors", "xb") as f:
        st.write_safetensors(f, st.tensor_specs(t, "x"), t.__getitem__)
    assert max(sizes) == 1000 and sum(sizes) == 2600 * 4 + 6  # 11 calls for the big tensor, one for the small one
    from safetensors.torch import load_file  # the oracle reads it back

    got = load_file(str(tmp_path / "x.safetensors"))
    assert set(got) == set(t) and all(torch.equal(got[k], t[k]) for k in t)


def test_writeback_is_started_a_chunk_at_a_time_over_the_data_written(tmp_path, monkeypatch):
    ranges: list[tuple[int, int]] = []
    monkeypatch.setattr(st, "WRITEBACK_CHUNK", 1000)
    monkeypatch.setattr(st._Writeback, "_fn", lambda fd, offset, n: ranges.append((offset, n)))
    t = {f"t{i}": torch.full((100 * (i + 1),), float(i)) for i in range(6)}  # 400 .. 2400 bytes each
    with open(tmp_path / "x.safetensors", "xb") as f:
        total = st.write_safetensors(f, st.tensor_specs(t, "x"), t.__getitem__)
    start = 8 + int.from_bytes((tmp_path / "x.safetensors").read_bytes()[:8], "little")  # the first data byte
    assert ranges[0][0] == start
    assert all(a + n == b for (a, n), (b, _) in zip(ranges, ranges[1:]))  # contiguous, in order, no byte twice
    assert all(n >= 1000 for _, n in ranges) and ranges[-1][0] + ranges[-1][1] <= total
    assert total - (ranges[-1][0] + ranges[-1][1]) < 1000 + 2400  # what is left for the final fsync
    got = fvt.load(tmp_path / "x.safetensors")
    assert all(torch.equal(got[k], t[k]) for k in t)


@pytest.mark.parametrize("fn", [None, lambda fd, offset, n: -1], ids=["no sync_file_range", "a failing call"])
def test_the_writeback_hint_is_advisory(tmp_path, monkeypatch, fn):
    monkeypatch.setattr(st, "WRITEBACK_CHUNK", 10)
    monkeypatch.setattr(st._Writeback, "_fn", fn)
    t = {"a": torch.arange(50, dtype=torch.float32), "b": torch.ones(7, dtype=torch.bfloat16)}
    with open(tmp_path / "x.safetensors", "xb") as f:
        st.write_safetensors(f, st.tensor_specs(t, "x"), t.__getitem__)
    got = fvt.load(tmp_path / "x.safetensors")
    assert all(torch.equal(got[k], t[k]) for k in t)


def test_merged_tensors_of_every_size_come_out_of_the_reused_buffer_intact(tmp_path, monkeypatch):
    from fvtransform.lora import _stream

    g = torch.Generator().manual_seed(11)
    shapes = [(64, 32), (8, 32), (128, 16), (8, 8), (64, 32), (3, 5)]
    tree = fvt.ParamTree({f"m{i}.weight": torch.randn(*s, generator=g).bfloat16() for i, s in enumerate(shapes)}
                         | {f"m{i}.bias": torch.randn(s[0], generator=g) for i, s in enumerate(shapes)})
    a = fvt.lora.random_adapter(tree, targets="*.weight", rank=2, seed=4)
    fvt.save(tree, tmp_path / "base.safetensors")
    made: list[int] = []
    real = _stream._OutBuffer.take
    monkeypatch.setattr(_stream._OutBuffer, "take", lambda self, shape, dtype: made.append(1) or real(self, shape, dtype))
    f32 = fvt.ParamTree({k: v.float() for k, v in tree.items()})
    for dtype, same_as in ((None, tree), (torch.float32, f32)):  # float32 output: the merge of the float32 tree
        out = fvt.lora.merge_checkpoint(tmp_path / "base.safetensors", [(a, 0.7)], tmp_path / f"out-{dtype}.safetensors",
                                        dtype=dtype)
        got, want = fvt.load(out), fvt.lora.merge(same_as, a, 0.7)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert len(made) == 2 * len(shapes)  # every merged tensor was made in a reused buffer


def test_on_the_cpu_the_merge_and_the_writes_take_turns_on_one_thread(base, tmp_path, monkeypatch):
    # measured: a second thread writing while torch merges on both cores was slower than taking turns (docs/benchmarks.md)
    from fvtransform.lora import _stream

    one, _sharded, a = base
    seen: list[bool] = []
    real = _stream.write_safetensors
    monkeypatch.setattr(_stream, "write_safetensors", lambda *args, **kw: seen.append(kw["overlap"]) or real(*args, **kw))
    fvt.lora.merge_checkpoint(one, a, tmp_path / "o.safetensors", device="cpu")
    assert seen == [False]


def test_the_overflow_bound_is_an_upper_bound_and_nan_proves_nothing():
    g = torch.Generator().manual_seed(2)
    for r in (1, 4, 32):
        A, B = torch.randn(r, 40, generator=g) * 5, torch.randn(60, r, generator=g) * 3
        cs = [_merge._Contribution(-0.7, LowRank(A, B, 1.0), ()), _merge._Contribution(0.2, LowRank(A * 2, B, 1.0), ())]
        real = (B.double() @ A.double() * -0.7 + B.double() @ (A.double() * 2) * 0.2).abs().max().item()
        assert _merge._delta_bound(cs) >= real
    nan = LowRank(torch.full((1, 4), float("nan")), torch.ones(4, 1), 1.0)
    assert not (_merge._delta_bound([_merge._Contribution(1.0, nan, ())]) < float("inf"))
    fp8 = LowRank(torch.ones(2, 4).to(torch.float8_e4m3fn), torch.ones(4, 2), 1.0)
    assert _merge._delta_bound([_merge._Contribution(1.0, fp8, ())]) >= 2.0


def test_the_metadata_digest_names_every_byte_of_each_adapter(base, tmp_path):
    # it was the digest of the first factor only: two adapters differing elsewhere were recorded alike
    one, _sharded, a = base
    last = list(a)[-1]
    changed = dict(a.items())
    changed[last] = LowRank(a[last].A, a[last].B.clone().index_fill_(0, torch.tensor([0]), 0.25), a[last].scale)
    b = LoraAdapter(changed)

    def digest(adapter: LoraAdapter, name: str) -> str:
        out = fvt.lora.merge_checkpoint(one, adapter, tmp_path / name)
        from safetensors import safe_open

        with safe_open(str(out), "pt") as f:
            return json.loads(f.metadata()["fvt.merged"])[0]["digest"]

    first = digest(a, "a1.safetensors")
    assert first == digest(a, "a2.safetensors") and len(first) == 32
    assert digest(b, "b.safetensors") != first


def test_zero_ranks_are_dropped_before_the_merge_and_nan_ranks_kept():
    g = torch.Generator().manual_seed(8)
    A, B = torch.randn(3, 16, generator=g), torch.randn(20, 3, generator=g)
    w = torch.randn(20, 16, generator=g)
    padded = fvt.lora.pad_rank(LoraAdapter({"w": LowRank(A, B, 0.5)}), 8)
    assert torch.equal(fvt.lora.merge({"w": w}, padded)["w"], fvt.lora.merge({"w": w}, LoraAdapter({"w": LowRank(A, B, 0.5)}))["w"])
    nan_a = torch.zeros(2, 16)
    nan_a[1, 3] = float("nan")  # a rank whose A row holds only a NaN is not padding: the NaN reaches the check
    with pytest.raises(E.NumericError, match=r"'w'"):
        fvt.lora.merge({"w": w}, LoraAdapter({"w": LowRank(nan_a, torch.ones(20, 2), 1.0)}))


def _rewrite_in_place(path: Path, keep_mtime: bool) -> None:
    """Another writer changes the base's values in place: same size, same header (a careless ``cp`` over it)."""
    st0 = os.stat(path)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x40  # the last byte of the data
    with open(path, "r+b") as f:
        f.write(raw)
    if keep_mtime:
        os.utime(path, ns=(st0.st_atime_ns, st0.st_mtime_ns))  # the change time still moves: it cannot be set back


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["mtime moved", "mtime put back"])
@pytest.mark.parametrize("layout", ["one", "sharded"])
def test_a_base_rewritten_in_place_while_the_merge_reads_it_is_an_integrity_error_and_nothing_is_written(base, tmp_path,
                                                                                                      layout, keep_mtime):
    # found by an outside tester: the merge exited 0 with tensors of the old and the new base mixed
    one, sharded, a = base
    src = one if layout == "one" else sharded
    victim = one if layout == "one" else sorted(sharded.glob("*.safetensors"))[-1]
    out = tmp_path / "out" / ("m.safetensors" if layout == "one" else "m")
    calls = [0]

    def progress(done: int, total: int) -> None:
        calls[0] += 1
        if calls[0] == 2:
            _rewrite_in_place(victim, keep_mtime)

    # caught when the file is mapped (its header no longer fits it) or, at the latest, before the output is committed
    with pytest.raises(E.IntegrityError, match=rf"{victim.name}: the file (changed while the merge read it.*not written|"
                                               "was replaced or rewritten after its header was read)"):
        fvt.lora.merge_checkpoint(src, a, out, progress=progress)
    assert not out.exists() and (not out.parent.exists() or list(out.parent.iterdir()) == [])


def test_a_base_renamed_over_while_the_merge_reads_it_is_an_integrity_error_too(base, tmp_path):
    # the bytes read are whole (the old file stays under the open descriptor) but no longer what the path holds
    one, _sharded, a = base
    other = tmp_path / "other.safetensors"
    fvt.save(fvt.map_tensors(_tree(), lambda t: t + 1 if t.is_floating_point() else t), other)
    calls = [0]

    def progress(done: int, total: int) -> None:
        calls[0] += 1
        if calls[0] == 2:
            os.replace(other, one)

    with pytest.raises(E.IntegrityError, match=r"one\.safetensors: the file changed while the merge read it \(written to, renamed over"):
        fvt.lora.merge_checkpoint(one, a, tmp_path / "m.safetensors", progress=progress)
    assert not (tmp_path / "m.safetensors").exists()


def test_an_output_folder_holding_a_hard_link_of_a_base_file_is_refused(base, tmp_path):
    # found by an outside tester: the docs promise that a hard link does not hide an input
    _one, sharded, a = base
    out = fvt.lora.merge_checkpoint(sharded, a, tmp_path / "out")
    shard = sorted(sharded.glob("*.safetensors"))[0]
    (out / shard.name).unlink()
    os.link(shard, out / shard.name)
    for overwrite in (False, True):
        with pytest.raises(E.UsageError, match=rf"holds {shard.name}, a hard link of .*{shard.name}.*choose another output"):
            fvt.lora.merge_checkpoint(sharded, a, out, overwrite=overwrite)
    assert shard.read_bytes() == (out / shard.name).read_bytes()


def test_destinations_the_os_refuses_are_write_errors_naming_them(base, tmp_path):
    # found by an outside tester: NotADirectoryError / OSError came out untyped
    one, _sharded, a = base
    (tmp_path / "thesis.tex").write_text("precious")
    cases = [
        (tmp_path / "thesis.tex" / "out.safetensors", r"thesis\.tex/out\.safetensors: writing failed.*ENOTDIR.*a part of the path is a file"),
        (tmp_path / "thesis.tex", r"thesis\.tex: exists and is a file; a merge of one \.safetensors file writes into a folder.*NAME\.safetensors"),
        (tmp_path / ("x" * 260 + ".safetensors"), r"writing failed.*ENAMETOOLONG.*the file name is too long"),
    ]
    for out, msg in cases:
        with pytest.raises(E.WriteError, match=msg):
            fvt.lora.merge_checkpoint(one, a, out)
    assert (tmp_path / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors", "sharded", "thesis.tex"]
