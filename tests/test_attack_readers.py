"""Findings of an outside (black-box) attack on the readers of local model folders and checkpoints.

Each test asserts the behaviour docs/security.md promises and fails on the code it was written against.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest

import fvtransform as fvt
from fvtransform.errors import FormatError, FvTransformError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_st(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


def test_a_safetensors_header_over_64_mb_is_refused(tmp_path):
    """docs/security.md: 'Headers and indexes: ... JSON over 64 MB ... are FormatErrors naming the file'.

    An index over 64 MiB is refused, but a weights-file header of ~68 MB (a huge ``__metadata__`` string)
    loads: the header cap is 100 MiB (104857600 bytes), not the promised 64 MB.
    """
    p = tmp_path / "big_header.safetensors"
    header = {
        "__metadata__": {"x": "A" * 68_000_000},
        "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
    }
    _write_st(p, header, b"\0" * 4)
    with pytest.raises(FormatError) as info:
        fvt.load(str(p))
    assert "big_header.safetensors" in str(info.value)


_BUILD_UNDER_RLIMIT = textwrap.dedent(
    """
    import resource, sys
    import fvtransform as fvt
    from fvtransform.errors import FvTransformError
    import torch, transformers  # imports done before the cap, so only the build counts
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    try:
        fvt.load_model(sys.argv[1])
    except FvTransformError as e:
        print("ERR", str(e).replace("\\n", " ")[:600])
    else:
        print("BUILT")
    """
)


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(
            {"architectures": ["T5EncoderModel"], "model_type": "t5", "num_layers": 1, "d_model": 8, "d_kv": 4,
             "d_ff": 8, "num_heads": 2, "vocab_size": 10, "relative_attention_num_buckets": 10**9},
            id="t5-relative_attention_num_buckets-1e9-mallocs-8GB",
        ),
        pytest.param(
            {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
             "max_position_embeddings": 10**8, "hidden_size": 8, "intermediate_size": 8,
             "num_attention_heads": 1, "num_hidden_layers": 1},
            id="clip-max_position_embeddings-1e8-mallocs-3.2GB",
        ),
    ],
)
def test_a_config_cannot_make_the_build_allocate_gigabytes(tmp_path, config):
    """README/security brief: a config cannot make a build allocate GBs (BuildLimits.max_computed_bytes = 1 GiB).

    One small number in config.json makes the build ask the CPU allocator for a real tensor of 8 GB
    (T5 ``relative_attention_num_buckets``) or 3.2 GB (CLIP ``max_position_embeddings``): under a 3 GiB
    address-space cap the build dies in ``DefaultCPUAllocator: can't allocate memory`` instead of being
    refused by a BuildLimits check before allocating (without a cap, the T5 one builds with an 8 GB
    allocation). Expected: a refusal naming BuildLimits and the key, no allocation of GBs.
    """
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    _write_st(folder / "model.safetensors", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", _BUILD_UNDER_RLIMIT, str(folder)], capture_output=True,
                          text=True, env=env, timeout=120)
    out = proc.stdout + proc.stderr
    assert "can't allocate memory" not in out, out[-800:]
    assert "ERR" in proc.stdout and "BuildLimits" in proc.stdout, out[-800:]


def test_an_alias_may_not_take_the_reserved_name_metadata(tmp_path):
    """`fvt.aliases` may add a key named ``__metadata__`` — a name no safetensors file can store (it is the
    header's metadata slot), so the loaded tree holds a key that cannot be a tensor of any file and that other
    readers silently drop. docs/security.md: an alias must point straight at a stored key and never shadows one;
    a reserved name should be refused like the other malformed aliases (FormatError naming the file and key).
    """
    p = tmp_path / "alias_meta.safetensors"
    header = {
        "__metadata__": {"fvt.aliases": json.dumps({"__metadata__": "w"})},
        "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
    }
    _write_st(p, header, b"\0" * 4)
    with pytest.raises(FvTransformError) as info:
        fvt.load(str(p))
    assert "__metadata__" in str(info.value)


def test_a_symlink_swapped_in_while_loading_never_escapes_the_folder(tmp_path):
    """docs/security.md: a path derived from a folder must resolve inside that folder; escaping symlinks are
    refused. A racer that flips ``model.safetensors`` between a regular file and a symlink to a file outside
    the folder (each step an atomic rename) wins: about 1 load in 600 returns the outside file's tensors
    (measured: 60 of ~36 000 loads in 15 s). The check and the open are not on the same object
    (resolve / stat, then open by path without O_NOFOLLOW). Expected: every load is the inside file or a
    typed error, never the outside file.
    """
    import threading
    import time

    folder = tmp_path / "m"
    folder.mkdir()
    outside = tmp_path / "outside.safetensors"
    inside_src = tmp_path / "inside_src.safetensors"
    header = lambda key: {key: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}  # noqa: E731
    _write_st(outside, header("SECRET_OUTSIDE"), b"\0" * 4)
    _write_st(inside_src, header("inside"), b"\0" * 4)
    target = folder / "model.safetensors"
    stop = threading.Event()

    def flip():
        i = 0
        while not stop.is_set():
            i += 1
            tmp = folder / f".t{i % 2}"
            if i % 2:
                os.link(inside_src, tmp)
            else:
                os.symlink(outside, tmp)
            os.replace(tmp, target)

    racer = threading.Thread(target=flip, daemon=True)
    racer.start()
    escaped = 0
    try:
        deadline = time.monotonic() + 5  # before the fix: about 2.4 escapes a second here
        while time.monotonic() < deadline and not escaped:
            try:
                keys = list(fvt.load(str(folder)).keys())
            except FvTransformError:
                continue
            escaped += keys == ["SECRET_OUTSIDE"]
    finally:
        stop.set()
        racer.join()
    assert not escaped, "a load followed a symlink out of the folder"


# ----------------------------------------------------------------------------- regressions of the fixes (in-process, fast)
def _record_build(make, limits=None):
    """Build a registered constructor on meta; ``make(seen)`` is the module's body (it may record tensors in seen)."""
    import torch

    seen: list = []

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            make(self, seen)

    reg = fvt.Registry()
    fvt.register("m", M, registry=reg)
    return fvt.build("m", {}, registry=reg, limits=limits, source="cfg.json"), seen


def test_an_uninitialised_tensor_larger_than_the_budget_left_is_a_meta_placeholder_not_an_allocation():
    """A parameter's torch.empty over max_computed_bytes (1 GiB) was allocated for real (virtual GBs); now it is
    made on meta, and real uninitialised tensors still alive count against the budget (the third 400 MB one)."""
    import torch

    def make(m, seen):
        seen.append(torch.empty(300_000_000))  # 1.2 GB: over the budget
        seen.extend(torch.empty(100_000_000) for _ in range(3))  # 3 x 400 MB, all alive at once
        m.emb = torch.nn.Embedding(300_000_000, 1)  # 1.2 GB parameter: built as before, on meta

    module, seen = _record_build(make)
    assert [t.device.type for t in seen] == ["meta", "cpu", "cpu", "meta"]
    assert module.emb.weight.device.type == "meta" and module.emb.weight.shape == (300_000_000, 1)


@pytest.mark.parametrize(("body", "match"), [
    ("fill", r"aten\.fill_\.Scalar writes into a tensor of shape \(300000000,\) \(1200000000 bytes\) created uninitialised"),
    ("buffer", r"registering buffer 'b' of M, which is a tensor of shape \(300000000,\) \(1200000000 bytes\)"),
    ("derived", r"registering buffer 'b' of M, which is a tensor of shape \(3\,\) \(12 bytes\)"),
    ("huge", r"aten\.empty\.memory_format would create a tensor of 8000000000 bytes .*BuildLimits\.max_tensor_bytes"),
])
def test_a_placeholder_is_never_computed_nor_kept_as_a_buffer_and_one_tensor_stays_bounded(body, match):
    """Writing into a placeholder or keeping it as a (real-valued) buffer is refused as the bytes it would compute;
    a tensor over max_tensor_bytes (now 6 GiB, UMT5-XXL's 4.2 GB embedding fits) is refused before it exists."""
    import torch

    def make(m, seen):
        if body == "fill":
            torch.empty(300_000_000).fill_(1.0)
        elif body == "buffer":
            m.register_buffer("b", torch.empty(300_000_000), persistent=False)
        elif body == "derived":  # computed from a placeholder: its values would be garbage, and it is on meta
            m.register_buffer("b", (torch.empty(300_000_000) * 2)[:3].sum(0, keepdim=True).expand(3).clone(), persistent=False)
        else:
            torch.empty(2_000_000_000)

    with pytest.raises(FormatError, match=r"cfg\.json: building M: " + match):
        _record_build(make)
