"""Hostile and broken inputs, fuzzed parsers, writers killed mid-write: clear errors, nothing lost."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import struct
import time
from pathlib import Path

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import HealthCheck, given, settings

import fvtransform as fvt
from fvtransform.errors import FvTransformError
from fvtransform.io._files import read_index
from fvtransform.io._header import read_header
from fvtransform.io._safetensors import TMP_MARK

from _helpers import deadline

from _corpus import make_corpus


def _peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def test_every_hostile_file_gives_a_specific_error_naming_it_fast_and_small(tmp_path):
    cases = make_corpus(tmp_path / "corpus")
    assert len(cases) >= 90
    assert len({c.name for c in cases}) == len(cases), "corpus case names must be unique"
    vague = [c.name for c in cases if c.error is FvTransformError]
    assert not vague, f"each case names a specific FvTransformError subclass, not the base class: {vague}"
    for case in cases:  # first pass: imports and caches that a real program pays once
        with pytest.raises(FvTransformError):
            case.action(case.path)
    problems = []
    for case in cases:
        size = case.path.stat().st_size if case.path.is_file() else sum(p.stat().st_size for p in case.path.rglob("*") if p.is_file())
        before = _status_kb("VmRSS")
        _peak_reset()
        t0 = time.perf_counter()
        try:
            case.action(case.path)
            problems.append(f"{case.name}: no error")
            continue
        except Exception as e:  # noqa: BLE001 (the test sorts the exceptions)
            err = e
        seconds = time.perf_counter() - t0
        grew_kb = _status_kb("VmHWM") - before
        if not isinstance(err, case.error):
            problems.append(f"{case.name}: {type(err).__name__} (expected {case.error.__name__}): {err}")
        elif not re.search(case.match, str(err)):
            problems.append(f"{case.name}: message {str(err)[:200]!r} does not match {case.match!r}")
        if seconds > 0.5:
            problems.append(f"{case.name}: took {seconds:.2f} s")
        if grew_kb * 1024 > size + 32 * 2**20:
            problems.append(f"{case.name}: memory grew by {grew_kb} kB for a {size}-byte input")
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------- fuzzing
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
_entries = st.fixed_dictionaries(
    {"dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X", 3]),
     "shape": st.lists(st.integers(-2, 6), max_size=3) | _json,
     "data_offsets": st.lists(st.integers(-4, 80), min_size=0, max_size=3) | _json}
)
#: 150 examples per fuzzer in CI; HYPOTHESIS_PROFILE=long runs 3000 (the property tests' long profile).
FUZZ_EXAMPLES = 3000 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 150
_headers = st.dictionaries(st.text(max_size=6), _entries | _json, max_size=4)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
@given(header=_headers | _json, data=st.binary(max_size=96), length_delta=st.sampled_from([0, 0, 0, -3, 5, 2**40]), garbage=st.binary(max_size=16))
def test_fuzzed_headers_raise_only_our_errors(tmp_path_factory, header, data, length_delta, garbage):
    raw = json.dumps(header).encode() + garbage
    path = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    path.write_bytes(struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + data)
    try:
        h = read_header(path)
    except FvTransformError as e:
        assert "f.safetensors" in str(e)
        return
    # a header that parses is consistent: every tensor lies inside the file, with its exact size
    for info in h.tensors.values():
        assert 0 <= info.start <= info.end <= h.file_size
        assert info.end - info.start == info.dtype.itemsize * math.prod(info.shape)
    tree = fvt.load(path)
    for v in tree.values():
        v.sum() if v.dtype != torch.bool else v.any()


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
@given(doc=_json | st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=5), st.text(max_size=12) | _json, max_size=4)}))
def test_fuzzed_indexes_raise_only_our_errors(tmp_path_factory, doc):
    folder = tmp_path_factory.mktemp("fuzzidx")
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps(doc))
    try:
        files = read_index(index)
    except FvTransformError as e:
        assert "model.safetensors.index.json" in str(e), str(e)
        return
    for f in files.files:
        assert f.parent == folder


_FOLDER_NAMES = ["model.safetensors", "diffusion_pytorch_model.safetensors", "extra.safetensors",
                 "model.safetensors.index.json", "pytorch_model.bin", "adapter_model.safetensors", "adapter_config.json"]
_FOLDER_KINDS = ["good", "lora", "garbage", "fifo", "link_in", "link_out", "dangling", "loop", "dir", "index_good",
                 "index_escape", "config"]
_SECRET = 666.0


def _make_entry(folder: Path, outside: Path, name: str, kind: str) -> None:
    path = folder / name
    if kind == "good":
        if name.endswith(".bin"):
            torch.save({"a": torch.ones(2)}, path)
        else:
            fvt.save(fvt.ParamTree({"a": torch.ones(2)}), path)
    elif kind == "lora":
        fvt.save(fvt.ParamTree({"l.lora_A.weight": torch.ones(2, 3), "l.lora_B.weight": torch.ones(4, 2)}), path)
    elif kind == "garbage":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "link_in":
        (folder / "real").mkdir(exist_ok=True)
        fvt.save(fvt.ParamTree({"a": torch.ones(2)}), folder / "real" / "w.safetensors")
        path.symlink_to(folder / "real" / "w.safetensors")
    elif kind == "link_out":
        path.symlink_to(outside / ("s.json" if name.endswith(".json") else "s.safetensors"))
    elif kind == "dangling":
        path.symlink_to(folder / "gone")
    elif kind == "loop":
        path.symlink_to(path)
    elif kind == "dir":
        path.mkdir()
    elif kind in ("index_good", "index_escape"):
        shard = "extra.safetensors" if kind == "index_good" else "../out/s.safetensors"
        path.write_text(json.dumps({"weight_map": {"a": shard}}))
    elif kind == "config":
        path.write_text(json.dumps({"r": 2, "lora_alpha": 4, "target_modules": ["l"]}))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
@given(entries=st.dictionaries(st.sampled_from(_FOLDER_NAMES), st.sampled_from(_FOLDER_KINDS), max_size=4),
       allow_pickle=st.booleans())
def test_fuzzed_model_and_lora_folders_never_hang_escape_or_raise_raw(tmp_path_factory, entries, allow_pickle):
    """Folders of good, broken, special and linked files: our errors only, never a hang, never a byte from outside."""
    top = tmp_path_factory.mktemp("fuzzfolder")
    folder, outside = top / "m", top / "out"
    folder.mkdir()
    outside.mkdir()
    fvt.save(fvt.ParamTree({"a": torch.full((2,), _SECRET), "l.lora_A.weight": torch.full((2, 3), _SECRET),
                            "l.lora_B.weight": torch.full((4, 2), _SECRET)}), outside / "s.safetensors")
    (outside / "s.json").write_text(json.dumps({"r": 2, "lora_alpha": 666}))
    for name, kind in entries.items():
        _make_entry(folder, outside, name, kind)
    base = fvt.ParamTree({"l.weight": torch.zeros(4, 3)})
    for read in (lambda: fvt.load(folder, allow_pickle=allow_pickle), lambda: fvt.lora.load(folder, base=base)):
        try:
            with deadline():
                got = read()
        except FvTransformError as e:
            assert str(folder) in str(e) or "m/" in str(e), str(e)
            continue
        deltas = [] if isinstance(got, fvt.ParamTree) else list(got.values())
        values = list(got.values()) if isinstance(got, fvt.ParamTree) else [
            t for d in deltas for t in (getattr(d, "A", None), getattr(d, "B", None), getattr(d, "D", None)) if t is not None]
        assert not any(bool((v == _SECRET).any()) for v in values), "a value was read from outside the folder"
        assert all(getattr(d, "alpha", None) != 666 for d in deltas), "a config was read from outside the folder"


_LORA_KEYS = ["l.lora_A.weight", "l.lora_B.weight", "l.alpha", "l.lora_down.weight", "l.lora_up.weight",
              "lora_unet_l.lora_down.weight", "lora_unet_l.lora_up.weight", "lora_unet_l.alpha", "l.lora_magnitude_vector",
              "l.diff", "l.diff_b", "transformer.l.lora_A.weight"]
_LORA_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.uint8, torch.float64]


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
@given(tensors=st.dictionaries(st.sampled_from(_LORA_KEYS),
                               st.tuples(st.lists(st.integers(0, 5), max_size=3), st.sampled_from(_LORA_DTYPES)),
                               min_size=1, max_size=5),
       config=st.none() | st.dictionaries(st.sampled_from(["r", "lora_alpha", "use_rslora", "target_modules"]),
                                          st.integers(-2, 8) | st.booleans() | st.none(), max_size=3))
def test_fuzzed_lora_files_raise_only_our_errors(tmp_path_factory, tensors, config):
    """LoRA files of any key set, shape and dtype (alphas of 0 or 2 elements too): loaded, or our error naming the file."""
    folder = tmp_path_factory.mktemp("fuzzlora")
    fvt.save(fvt.ParamTree({k: torch.ones(shape).to(dtype) for k, (shape, dtype) in tensors.items()}),
             folder / "adapter_model.safetensors")
    if config is not None:
        (folder / "adapter_config.json").write_text(json.dumps(config))
    try:
        with deadline():
            adapter = fvt.lora.load(folder, base=fvt.ParamTree({"l.weight": torch.zeros(4, 3)}))
    except FvTransformError as e:
        assert folder.name in str(e), str(e)  # the file (or its folder) is named
        return
    assert set(adapter) == {"l.weight"}, sorted(adapter)  # the base's one module, and only it


# ----------------------------------------------------------------------------- crash safety
def _kill_mid_work(work, folder: Path, max_delay: float, rng: random.Random, min_delay: float = 0.002) -> bool:
    """Fork a child that runs ``work()`` forever, SIGKILL it after a random delay; True if temporaries were left."""
    pid = os.fork()
    if pid == 0:  # child: work until killed
        try:
            torch.set_num_threads(1)  # no thread pool inherited half-alive across fork
            while True:
                work()
        finally:
            os._exit(1)
    time.sleep(rng.uniform(min_delay, max(min_delay, max_delay)))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return any(TMP_MARK in p.name or ".fvt-old-" in p.name for p in folder.iterdir())


_LORA_BASE = fvt.ParamTree({f"t{i}.weight": torch.zeros(64, 48) for i in range(6)})


def _version_tree(v: int) -> fvt.ParamTree:
    return fvt.ParamTree({f"t{i}": torch.full((3000 + 97 * i,), float(v)) for i in range(6)})


def _version_adapter(v: int):
    return fvt.lora.random_adapter(_LORA_BASE, targets="t*.weight", rank=4, alpha=float(v), seed=v)


def _write_version(dest: Path, kind: str, v: int) -> None:
    if kind == "peft":
        fvt.lora.save(_version_adapter(v), dest)
    else:
        fvt.save(_version_tree(v), dest, max_shard_size=None if kind == "file" else "30KB", metadata={"version": str(v)})


def _writer(dest: Path, kind: str) -> None:
    """Save ever newer versions until killed; version v is a tree whose every value is v (a PEFT folder: alpha v, seed v)."""
    if kind == "sharded-two-renames":  # a file system without RENAME_EXCHANGE: the swap is two renames
        from fvtransform.io import _atomic

        _atomic.exchange = lambda a, b: False
    v = 0
    while True:
        v += 1
        _write_version(dest, kind, v)


def _check_complete(dest: Path, kind: str = "file") -> float | None:
    """The version at ``dest`` (None if nothing there); fails on any partial or mixed state."""
    if not dest.exists():
        return None
    if kind == "peft":  # the pair: the config's alpha names the version the weights must be
        alpha = json.loads((dest / "adapter_config.json").read_text())["lora_alpha"]
        loaded = fvt.lora.load(dest, base=_LORA_BASE)
        expected = _version_adapter(int(alpha))
        assert sorted(loaded) == sorted(expected)
        assert all(torch.equal(loaded[k].A, expected[k].A) and torch.equal(loaded[k].B, expected[k].B) for k in expected), \
            f"a mix of versions: the config says {alpha}"
        return float(alpha)
    tree = fvt.load(dest)
    assert sorted(tree) == [f"t{i}" for i in range(6)]
    values = {float(v.unique().item()) for v in tree.values()}
    assert len(values) == 1, f"a mix of versions: {values}"
    return values.pop()


def _as_next_writer_sees_it(dest: Path) -> None:
    """What the next writer does first, under the lock: put back an old version a two-rename swap left aside."""
    from fvtransform.io._atomic import recover_swap, writer_lock

    with writer_lock(dest):
        recover_swap(dest)


@pytest.mark.parametrize("kind", ["file", "sharded", "sharded-two-renames", "peft"])
def test_writers_killed_at_random_moments_leave_old_or_new_never_partial(tmp_path, kind):
    rng = random.Random(1234 + len(kind))
    dest = tmp_path / ("model.safetensors" if kind == "file" else "out")
    _write_version(dest, kind, 100)  # an older complete output exists from the start
    (dest.parent if kind == "file" else dest).joinpath("user.txt").write_text("not ours")
    seen: list[float | None] = [100.0]
    killed_mid_write = 0
    trials = 12 if kind in ("file", "sharded") else 8
    # A kill lands mid-write only by chance (a small file is written in a few ms), so the trials go on until a
    # third of them have, within a bound; the first trial runs long enough for some writes to complete.
    t = 0
    while t < trials or (killed_mid_write < trials // 3 and t < 6 * trials):
        killed_mid_write += _kill_mid_work(lambda: _writer(dest, kind), tmp_path, 0.12, rng, 0.3 if t == 0 else 0.002)
        t += 1
        if kind == "sharded-two-renames":
            _as_next_writer_sees_it(dest)
        version = _check_complete(dest, kind)
        assert version is not None, "a complete output was lost"
        seen.append(version)
    leftovers = [p.name for p in tmp_path.iterdir() if TMP_MARK in p.name]
    # the next write removes what killed writers left behind, and lands complete
    _write_version(dest, kind, 99)
    assert _check_complete(dest, kind) == 99.0
    assert not [p.name for p in tmp_path.rglob("*") if TMP_MARK in p.name or ".fvt-old-" in p.name or ".fvt-lock" in p.name]
    assert (dest.parent if kind == "file" else dest).joinpath("user.txt").read_text() == "not ours"
    assert any(v != 100.0 for v in seen), "no trial got far enough to write anything; the test proved nothing"
    assert killed_mid_write >= trials // 3, f"only {killed_mid_write} of {t} kills landed mid-write"
    assert all(TMP_MARK in name for name in leftovers)


# ----------------------------------------------------------------------------- no remote code
def test_no_config_makes_the_library_run_code(tmp_path, monkeypatch):
    """Behavioural: configs that name remote code, a pipeline factory, an Auto class or any callable load nothing.

    Each config's payload (a ``conf.py`` next to its own config.json, a module on ``sys.path``) writes a marker
    when imported; every config must give a typed error from ``load_model`` and the marker must never appear.
    (Every route, the hub and the CLI: ``tests/test_security_registry.py``.)
    """
    marker = tmp_path / "MARKER"
    payload = f"import pathlib\npathlib.Path({str(marker)!r}).write_text(__name__)\n"
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "conf.py").write_text(payload + (
        "from transformers import PretrainedConfig, PreTrainedModel\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
        "class EvilModel(PreTrainedModel):\n    config_class = EvilConfig\n"))
    auto_map = {"AutoConfig": "conf.EvilConfig", "AutoModel": "conf.EvilModel"}
    (remote / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": auto_map}))
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "fvt_hostile_payload.py").write_text(payload + "Model = object\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # should the library ever try
    configs = [
        {"architectures": ["pipeline"], "model": str(remote), "task": "feature-extraction", "trust_remote_code": True},
        {"architectures": ["pipeline"], "model": str(remote), "task": "feature-extraction"},
        {"architectures": ["AutoModel"], "model_type": "evil", "auto_map": auto_map},
        {"_class_name": "AutoModel", "auto_map": auto_map},
        {"_class_name": "DiffusionPipeline", "custom_pipeline": str(remote)},
        {"_class_name": "fvt_hostile_payload:Model"},
        {"_class_name": ["fvt_hostile_payload", "Model"]},
    ]
    for i, config in enumerate(configs):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        fvt.save(fvt.ParamTree({"w": torch.zeros(2)}), folder / "model.safetensors")
        with pytest.raises(FvTransformError, match=rf"m{i}/config\.json"):
            fvt.load_model(folder)
        assert not marker.exists(), f"config {config} ran code: {marker.read_text()}"


@pytest.mark.parametrize("sharded", [False, True])
def test_merge_command_killed_at_random_moments_leaves_nothing_partial(tmp_path, sharded):
    """``fvtransform merge`` (fvt.lora.merge_checkpoint) under SIGKILL: the older output or the new one, complete."""
    g = torch.Generator().manual_seed(0)
    tree = fvt.ParamTree({f"l{i}.weight": torch.randn(96, 64, generator=g) for i in range(12)})
    base = tmp_path / ("base" if sharded else "base.safetensors")
    fvt.save(tree, base, max_shard_size="60KB" if sharded else None)
    if sharded:
        (base / "config.json").write_text("{}")
    adapter = fvt.lora.random_adapter(tree, targets="l*.weight", rank=3, seed=1)
    older = fvt.lora.random_adapter(tree, targets="l*.weight", rank=3, seed=2)
    expected, expected_older = fvt.lora.merge(tree, adapter), fvt.lora.merge(tree, older)
    dest = tmp_path / ("out" if sharded else "out.safetensors")
    fvt.lora.merge_checkpoint(base, older, dest)  # an older merge output exists from the start
    if sharded:
        (dest / "user.txt").write_text("not ours")
    rng = random.Random(99 + sharded)
    killed_mid_write, trials, t = 0, 8, 0
    while t < trials or (killed_mid_write < 1 and t < 6 * trials):  # a kill lands mid-write only by chance
        t += 1
        killed_mid_write += _kill_mid_work(lambda: fvt.lora.merge_checkpoint(base, adapter, dest), tmp_path, 0.08, rng)
        got = fvt.load(dest)
        assert got == expected or got == expected_older, "a partial or mixed merge output"
        if sharded:
            assert (dest / "config.json").is_file() and (dest / "user.txt").read_text() == "not ours"
    assert killed_mid_write >= 1, "no kill landed mid-write; the test proved nothing"
    fvt.lora.merge_checkpoint(base, adapter, dest)
    assert fvt.load(dest) == expected
    if sharded:  # a file the merge did not write survives every version
        assert (dest / "user.txt").read_text() == "not ours"
    assert not [p.name for p in tmp_path.iterdir() if TMP_MARK in p.name]
