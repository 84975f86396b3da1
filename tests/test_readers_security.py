"""Issue 13, the readers: FIFOs and devices, symlink containment, overflowing shapes, aliases, escaping, the CLI.

Every test here failed on the code before the fix (a hang caught by the deadline, a raw exception, a silent
wrong value or an unescaped name), except those marked "guarantee", which pin behaviour that must stay.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import fvtransform as fvt
from fvtransform.errors import FormatError, FvTransformError, IntegrityError, UnsafeFileError
from fvtransform.io import open_checkpoint
from fvtransform.io._header import read_header

from _helpers import deadline


def _st(path: Path, header: Any, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _good(path: Path, **tensors: torch.Tensor) -> Path:
    fvt.save(fvt.ParamTree(tensors or {"a": torch.ones(2), "b": torch.zeros(2)}), path)
    return path


def _refused(action: Callable[[], Any], error: type = UnsafeFileError, match: str = "") -> FvTransformError:
    with deadline(2.0), pytest.raises(error, match=match) as info:
        action()
    return info.value


# ----------------------------------------------------------------------------- 1. FIFOs, sockets, devices
def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_fifo_given_as_the_weights_file_is_refused_without_blocking(tmp_path):
    fifo = _fifo(tmp_path / "model.safetensors")
    _refused(lambda: fvt.load(fifo), match=r"model\.safetensors: the weights file is a FIFO")
    _refused(lambda: read_header(fifo), match=r"model\.safetensors: the safetensors file is a FIFO")


def test_fifo_inside_a_model_folder_is_refused_not_skipped(tmp_path):
    _fifo(tmp_path / "model.safetensors")
    _refused(lambda: fvt.load(tmp_path), match=r"model\.safetensors: the weights file is a FIFO")


def test_fifo_as_a_shard_and_as_the_index_is_refused(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors"}}))
    _fifo(tmp_path / "s1.safetensors")
    _refused(lambda: fvt.load(tmp_path), match=r"s1\.safetensors: the shard is a FIFO")
    other = tmp_path / "other"
    other.mkdir()
    _fifo(other / "model.safetensors.index.json")
    _refused(lambda: fvt.load(other), match=r"model\.safetensors\.index\.json: the index file is a FIFO")


def test_fifo_config_json_and_model_index_are_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    _good(model / "diffusion_pytorch_model.safetensors")
    _fifo(model / "config.json")
    _refused(lambda: fvt.load_model(model), match=r"config\.json: the JSON file is a FIFO")
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    _fifo(pipe / "model_index.json")
    _refused(lambda: fvt.load_model(pipe, component="transformer"), match=r"model_index\.json: the JSON file is a FIFO")


def test_fifo_lora_file_and_adapter_config_are_refused(tmp_path):
    base = fvt.ParamTree({"l.weight": torch.zeros(4, 3)})
    lone = _fifo(tmp_path / "lora.safetensors")
    _refused(lambda: fvt.lora.load(lone, base=base), match=r"lora\.safetensors: the safetensors file is a FIFO")
    folder = tmp_path / "peft"
    folder.mkdir()
    _fifo(folder / "adapter_model.safetensors")
    _refused(lambda: fvt.lora.load(folder, base=base), match=r"adapter_model\.safetensors: the safetensors file is a FIFO")
    folder2 = tmp_path / "peft2"
    folder2.mkdir()
    fvt.save(fvt.ParamTree({"l.lora_A.weight": torch.zeros(2, 3), "l.lora_B.weight": torch.zeros(4, 2)}),
             folder2 / "adapter_model.safetensors")
    _fifo(folder2 / "adapter_config.json")  # was silently skipped: the scale fell back to alpha = rank
    _refused(lambda: fvt.lora.load(folder2, base=base), match=r"adapter_config\.json: the JSON file is a FIFO")


def test_socket_and_device_files_are_refused(tmp_path):
    sock_path = tmp_path / "s.safetensors"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        _refused(lambda: fvt.load(sock_path), match=r"s\.safetensors: the weights file is a socket")
    _refused(lambda: fvt.load("/dev/zero"), match=r"/dev/zero: the weights file is a character device")
    link = tmp_path / "model.safetensors"
    link.symlink_to("/dev/zero")  # escapes the folder too; either refusal is right, neither may read the device
    _refused(lambda: fvt.load(tmp_path), match=r"model\.safetensors")


def test_open_regular_closes_the_race_between_stat_and_open(tmp_path, monkeypatch):
    """A FIFO swapped in after the stat: O_NONBLOCK keeps open() from blocking, fstat refuses it (new helper)."""
    from fvtransform.io import _open

    regular = tmp_path / "r"
    regular.write_bytes(b"x")
    fifo = _fifo(tmp_path / "f")
    monkeypatch.setattr(_open, "check_regular", lambda path, what="file": os.stat(regular))
    _refused(lambda: _open.open_regular(fifo, "weights file"), match=r"the weights file is a FIFO")
    other = tmp_path / "o"
    other.write_bytes(b"y")
    _refused(lambda: _open.open_regular(other, "weights file"), match=r"was replaced while it was being opened")


# ----------------------------------------------------------------------------- 2. one containment rule
@pytest.fixture
def outside(tmp_path) -> Path:
    out = tmp_path / "outside"
    out.mkdir()
    _good(out / "secret.safetensors")
    (out / "config.json").write_text(json.dumps({"_class_name": "Nope"}))
    return out


def test_model_file_symlink_escaping_the_folder_is_refused(tmp_path, outside):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").symlink_to(outside / "secret.safetensors")
    _refused(lambda: fvt.load(folder), match=r"weights file 'model\.safetensors' resolves to .*outside")


def test_index_file_symlink_escaping_the_folder_is_refused(tmp_path, outside):
    (outside / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "secret.safetensors"}}))
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors.index.json").symlink_to(outside / "model.safetensors.index.json")
    _refused(lambda: fvt.load(folder), match=r"index file 'model\.safetensors\.index\.json' resolves to .*outside")


def test_config_json_and_pipeline_component_symlinks_escaping_are_refused(tmp_path, outside):
    model = tmp_path / "m"
    model.mkdir()
    _good(model / "model.safetensors")
    (model / "config.json").symlink_to(outside / "config.json")
    _refused(lambda: fvt.load_model(model), match=r"model config 'config\.json' resolves to .*outside")
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "Nope"]}))
    (pipe / "transformer").symlink_to(outside, target_is_directory=True)
    _refused(lambda: fvt.load_model(pipe, component="transformer"),
             match=r"model_index\.json: pipeline component folder 'transformer' resolves to .*outside")


def test_lora_file_and_adapter_config_symlinks_escaping_are_refused(tmp_path, outside):
    base = fvt.ParamTree({"l.weight": torch.zeros(4, 3)})
    lora = {"l.lora_A.weight": torch.zeros(2, 3), "l.lora_B.weight": torch.zeros(4, 2)}
    fvt.save(fvt.ParamTree(lora), outside / "adapter_model.safetensors")
    (outside / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 64}))
    folder = tmp_path / "l"
    folder.mkdir()
    (folder / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    _refused(lambda: fvt.lora.load(folder, base=base), match=r"LoRA file 'adapter_model\.safetensors' resolves to .*outside")
    folder2 = tmp_path / "l2"
    folder2.mkdir()
    fvt.save(fvt.ParamTree(lora), folder2 / "adapter_model.safetensors")
    (folder2 / "adapter_config.json").symlink_to(outside / "adapter_config.json")
    _refused(lambda: fvt.lora.load(folder2, base=base), match=r"LoRA config 'adapter_config\.json' resolves to .*outside")


def test_guarantee_links_inside_the_folder_user_paths_and_hub_snapshots_are_followed(tmp_path, outside):
    folder = tmp_path / "m"
    (folder / "real").mkdir(parents=True)
    _good(folder / "real" / "w.safetensors")
    (folder / "model.safetensors").symlink_to(folder / "real" / "w.safetensors")  # inside: fine
    assert sorted(fvt.load(folder)) == ["a", "b"]
    user_link = tmp_path / "mine.safetensors"
    user_link.symlink_to(outside / "secret.safetensors")  # the user's own explicit path: the user's choice
    assert sorted(fvt.load(user_link)) == ["a", "b"]
    repo = tmp_path / "hub" / "models--org--m"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    _good(repo / "blobs" / "0123abcd")
    (snap / "model.safetensors").symlink_to(Path("../../blobs/0123abcd"))
    assert sorted(fvt.load(snap)) == ["a", "b"]


# ----------------------------------------------------------------------------- 3. sizes that overflow, caps
@pytest.mark.parametrize("shape", [[0, 2**63], [2**62, 2**62, 0], [0, 2**61, 2**61]])
def test_zero_size_shapes_that_overflow_int64_are_refused(tmp_path, shape):
    path = _st(tmp_path / "ov.safetensors", {"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}})
    _refused(lambda: fvt.load(path), FormatError, r"ov\.safetensors: tensor 'a': shape .* overflows a 64-bit size")


def test_absurd_rank_is_refused(tmp_path):
    path = _st(tmp_path / "rank.safetensors", {"a": {"dtype": "F32", "shape": [1] * 17, "data_offsets": [0, 4]}}, b"\0" * 4)
    _refused(lambda: fvt.load(path), FormatError, r"rank\.safetensors: tensor 'a': shape has 17 dims, over the limit of 16")


def test_integers_with_thousands_of_digits_are_a_format_error(tmp_path):
    raw = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,' + b"1" * 5000 + b"]}}"
    path = tmp_path / "digits.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    _refused(lambda: fvt.load(path), FormatError, r"digits\.safetensors: an integer of 5000 digits")
    idx = tmp_path / "i"
    idx.mkdir()
    (idx / "model.safetensors.index.json").write_text('{"metadata": {"total_size": ' + "9" * 5000 + '}, "weight_map": {}}')
    _refused(lambda: fvt.load(idx), FormatError, r"model\.safetensors\.index\.json: key 'total_size': an integer of 5000 digits")


def test_an_index_with_tens_of_thousands_of_shards_is_refused_fast(tmp_path):
    import time

    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {f"k{i}": f"s{i}.safetensors" for i in range(30000)}}))
    t0 = time.perf_counter()
    _refused(lambda: fvt.load(tmp_path), FormatError, r"model\.safetensors\.index\.json: the index names 30000 shard files, over the limit of 4096")
    assert time.perf_counter() - t0 < 0.5


def test_guarantee_zero_size_tensors_read_anywhere_in_the_file(tmp_path):
    header = {"z0": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
              "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "z1": {"dtype": "BF16", "shape": [3, 0, 2], "data_offsets": [8, 8]},
              "alpha_empty": {"dtype": "F32", "shape": [0], "data_offsets": [8, 8]}}
    tree = fvt.load(_st(tmp_path / "z.safetensors", header, struct.pack("<2f", 1.0, 2.0)))
    assert tree["z1"].shape == (3, 0, 2) and tree["z1"].dtype == torch.bfloat16
    assert tree["a"].tolist() == [1.0, 2.0] and tree["alpha_empty"].numel() == 0


# ----------------------------------------------------------------------------- 4. aliases
def _aliased(path: Path, aliases: Any, extra_meta: dict[str, str] | None = None, **stored: list[float]) -> Path:
    header: dict[str, Any] = {"__metadata__": {"fvt.aliases": aliases if isinstance(aliases, str) else json.dumps(aliases),
                                               **(extra_meta or {})}}
    data, off = b"", 0
    for k, vals in (stored or {"a": [1.0], "b": [2.0]}).items():
        header[k] = {"dtype": "F32", "shape": [len(vals)], "data_offsets": [off, off + 4 * len(vals)]}
        data += struct.pack(f"<{len(vals)}f", *vals)
        off += 4 * len(vals)
    return _st(path, header, data)


def test_an_alias_never_shadows_a_stored_tensor(tmp_path):
    path = _aliased(tmp_path / "shadow.safetensors", {"b": "a"})  # the file stores b = 2.0; the alias says b is a
    _refused(lambda: fvt.load(path), FormatError, r"shadow\.safetensors: metadata 'fvt.aliases' makes 'b' an alias of 'a', but the file stores 'b'")


@pytest.mark.parametrize(("aliases", "match"), [
    ({"c": "zzz"}, r"alias 'c' points to missing key 'zzz': a key the file does not store"),
    ({"c": "d", "d": "a"}, r"alias 'c' points to missing key 'd': another alias"),
    ({"c": "d", "d": "c"}, r"alias 'c' points to missing key 'd': another alias"),
    ('{"c": "a", "c": "b"}', r"metadata 'fvt.aliases' lists 'c' twice"),
    ('{"c": ', r"metadata 'fvt.aliases': not valid JSON"),
    ({"c": 5}, r"must map alias -> key"),
])
def test_alias_chains_cycles_missing_and_duplicate_aliases_are_refused(tmp_path, aliases, match):
    path = _aliased(tmp_path / "al.safetensors", aliases)
    _refused(lambda: fvt.load(path), FormatError, r"al\.safetensors: .*" + match)


def test_a_corrupt_saved_order_keeps_the_default_order(tmp_path):
    path = _aliased(tmp_path / "o.safetensors", {"c": "a"}, {"fvt.order": '[1, "a"]'})  # raised a raw TypeError
    assert list(fvt.load(path)) == ["a", "b", "c"]
    path = _aliased(tmp_path / "o2.safetensors", {"c": "a"}, {"fvt.order": '["c", "b", "a"]'})
    assert list(fvt.load(path)) == ["c", "b", "a"]


def test_huge_alias_maps_are_refused(tmp_path):
    from fvtransform.io._load import MAX_ALIASES

    aliases = {f"x{i}": "a" for i in range(MAX_ALIASES + 1)}
    path = _aliased(tmp_path / "many.safetensors", aliases)
    _refused(lambda: fvt.load(path), FormatError, r"many\.safetensors: metadata 'fvt.aliases' declares 100001 aliases")


# ----------------------------------------------------------------------------- 7. more attacks on the readers
def test_a_file_truncated_after_its_header_was_read_is_an_integrity_error(tmp_path):
    path = _good(tmp_path / "t.safetensors", a=torch.ones(4096), b=torch.ones(4096))
    ckpt = open_checkpoint(path)
    os.truncate(path, 100)  # raised torch's raw RuntimeError
    _refused(lambda: ckpt.tensor("b"), IntegrityError, r"t\.safetensors: the file is 100 bytes now but was \d+ bytes")


def test_a_file_replaced_after_its_header_was_read_is_never_read_with_the_old_header(tmp_path):
    path = _good(tmp_path / "r.safetensors", a=torch.ones(4), b=torch.full((4,), 2.0))
    ckpt = open_checkpoint(path)
    _good(path, b=torch.full((4,), 7.0), a=torch.full((4,), 9.0))  # same size, other layout: a swapped with b
    _refused(lambda: ckpt.tensor("a"), IntegrityError, r"r\.safetensors: the file was replaced or rewritten")


def test_keys_that_are_the_same_text_in_two_normal_forms_are_refused(tmp_path):
    header = {"caf\u00e9": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
              "cafe\u0301": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    path = _st(tmp_path / "nfc.safetensors", header, b"\0" * 8)
    _refused(lambda: fvt.load(path), FormatError, r"nfc\.safetensors: keys .* are the same text in two Unicode normal forms")


def test_guarantee_keys_with_slashes_and_dots_are_only_names(tmp_path):
    keys = {"../../escape": torch.ones(1), "/abs/path": torch.zeros(1), "a/../b": torch.ones(2)}
    fvt.save(fvt.ParamTree(keys), tmp_path / "k.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.safetensors"]
    assert sorted(fvt.load(tmp_path / "k.safetensors")) == sorted(keys)


def test_nan_and_infinity_in_a_header_are_not_json(tmp_path):
    raw = b'{"__metadata__": {}, "a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}'
    path = tmp_path / "nan.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    _refused(lambda: read_header(path), FormatError, r"nan\.safetensors: NaN is not JSON")


# ----------------------------------------------------------------------------- 5. inspect escapes names
_EVIL = {"\x1b[2J\x1b[31mred": [1.0], "a\u202eb.weight": [2.0], "cr\rlf\n": [4.0]}


def _evil_file(path: Path, names: dict[str, list[float]] = _EVIL) -> Path:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    data = b""
    for i, (k, v) in enumerate(names.items()):
        header[k] = {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
        data += struct.pack("<f", *v)
    raw = json.dumps(header).encode()  # ensure_ascii: a lone surrogate travels as \ud800
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_inspect_escapes_control_and_bidi_names(tmp_path):
    path = _evil_file(tmp_path / "evil.safetensors")
    out = subprocess.run([sys.executable, "-m", "fvtransform", "inspect", str(path)], capture_output=True, timeout=120,
                         env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert out.returncode == 0, out.stderr.decode()
    text = out.stdout.decode("utf-8")
    assert "\x1b" not in text and "\u202e" not in text and "\r" not in text
    assert "\\x1b[2J\\x1b[31mred" in text and "a\\u202eb.weight" in text
    js = subprocess.run([sys.executable, "-m", "fvtransform", "--json", "inspect", str(path)], capture_output=True,
                        timeout=120)
    assert js.returncode == 0, js.stderr.decode()
    assert js.stdout.isascii()
    assert sorted(t["key"] for t in json.loads(js.stdout)["tensors"]) == sorted(_EVIL)


def test_a_tensor_name_with_a_lone_surrogate_is_refused_as_safetensors_refuses_it(tmp_path):
    """The one JSON reader refuses a lone surrogate (not Unicode text; safetensors' own parser refuses it too)."""
    path = _evil_file(tmp_path / "sur.safetensors", {"ok": [1.0], "x\ud800y": [3.0]})
    _refused(lambda: fvt.load(path), FormatError, r"sur\.safetensors: a key at \(the document\) holds a lone surrogate \('x\\ud800y'\)")


# ----------------------------------------------------------------------------- 6. the CLI's error surface
def _cli(capsys, *args: str) -> tuple[int, str]:
    from fvtransform.cli._main import main

    with deadline(5.0):
        code = main(list(args))
    return code, capsys.readouterr().err


def _one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("fvtransform: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert "\x1b" not in err
    for n in needles:
        assert n in err, err


def test_every_subcommand_prints_one_line_and_exits_2_on_a_hostile_input(tmp_path, capsys):
    fifo = str(_fifo(tmp_path / "p.safetensors"))
    good = str(_good(tmp_path / "good.safetensors"))
    _one_line_error(*_cli(capsys, "inspect", fifo), "p.safetensors", "FIFO")
    _one_line_error(*_cli(capsys, "merge", fifo, good, "-o", str(tmp_path / "o")), "FIFO")
    _one_line_error(*_cli(capsys, "convert-lora", fifo, "-o", str(tmp_path / "c"), "--to", "peft"), "FIFO")
    _one_line_error(*_cli(capsys, "extract-lora", good, fifo, "-o", str(tmp_path / "e"), "--rank", "1"), "FIFO")
    _one_line_error(*_cli(capsys, "demo", "--model", fifo, "--lora", good, "--workdir", str(tmp_path / "d")))
    evil = _evil_file(tmp_path / "evil.safetensors")  # a name with ESC in a multi-line error: escaped, one line
    _one_line_error(*_cli(capsys, "extract-lora", good, str(evil), "-o", str(tmp_path / "e2"), "--rank", "1"))


def test_an_oserror_from_a_user_path_is_one_line_and_exit_2(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    lora = tmp_path / "lora.safetensors"
    fvt.save(fvt.ParamTree({"l.lora_A.weight": torch.zeros(2, 3), "l.lora_B.weight": torch.zeros(4, 2)}), lora)
    code, err = _cli(capsys, "convert-lora", str(lora), "-o", str(tmp_path / "file" / "out.safetensors"), "--to", "peft")
    _one_line_error(code, err, "file")


def test_an_unexpected_exception_keeps_its_traceback(tmp_path, monkeypatch):
    """A bug is not dressed up as a user error: it propagates (the traceback is printed, exit 1)."""
    from fvtransform.cli import _commands, _main

    def boom(*_a: Any, **_k: Any) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(_commands, "convert_command", boom)
    with pytest.raises(ZeroDivisionError):
        _main.main(["convert-lora", "x", "-o", str(tmp_path / "y"), "--to", "peft"])


def test_the_real_entry_point_prints_one_line_for_a_fifo(tmp_path):
    fifo = _fifo(tmp_path / "m.safetensors")
    out = subprocess.run([sys.executable, "-m", "fvtransform", "inspect", str(fifo)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert "m.safetensors" in out.stderr and "FIFO" in out.stderr


@pytest.mark.parametrize(("header", "data"), [
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, 12),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 1028),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8),
    ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}, 4),
])
def test_bytes_that_belong_to_no_tensor_are_refused_as_the_safetensors_library_does(tmp_path, header, data):
    """Oracle: safetensors (the reference reader) refuses gaps and trailing bytes; we did not (hidden payloads)."""
    import safetensors.torch

    path = _st(tmp_path / "hidden.safetensors", header, b"\0" * data)
    with pytest.raises(Exception):  # noqa: B017 (the reference's own error type)
        safetensors.torch.load_file(path)
    _refused(lambda: fvt.load(path), FormatError, r"hidden\.safetensors: .*belong")


def test_lookalike_keys_across_shards_and_aliases_are_refused(tmp_path):
    _good(tmp_path / "s1.safetensors", **{"caf\u00e9": torch.ones(1)})
    _good(tmp_path / "s2.safetensors", **{"cafe\u0301": torch.ones(1)})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"caf\u00e9": "s1.safetensors", "cafe\u0301": "s2.safetensors"}}))
    _refused(lambda: fvt.load(tmp_path), FormatError, r"model\.safetensors\.index\.json: keys .* two Unicode normal forms")
    path = _aliased(tmp_path / "al.safetensors", {"\u212a": "a"}, None, K=[1.0], a=[2.0])  # KELVIN SIGN vs K
    _refused(lambda: fvt.load(path), FormatError, r"al\.safetensors: keys 'K' and .* two Unicode normal forms")


# ----------------------------------------------------------------------------- 8. issue 13 follow-up (outside attacker)
@pytest.mark.parametrize("name", ["__metadata__", ""])
def test_an_alias_may_not_take_a_reserved_or_empty_name(tmp_path, name):
    """``__metadata__`` (the header's metadata slot) or "" can be no tensor's name: such an alias loaded silently."""
    path = _aliased(tmp_path / "res.safetensors", {name: "a"})
    _refused(lambda: fvt.load(path), FormatError,
             rf"res\.safetensors: metadata 'fvt.aliases' declares an alias named {name!r} \(of 'a'\)")


def test_the_header_cap_is_64_mib_like_every_json_file(tmp_path):
    """The header length field is refused from 64 MiB + 1 on (it was 100 MiB), before any byte of it is read."""
    from fvtransform.io._header import MAX_HEADER_BYTES
    from fvtransform.io._open import MAX_JSON_BYTES

    assert MAX_HEADER_BYTES == MAX_JSON_BYTES == 64 * 2**20
    over = tmp_path / "over.safetensors"
    over.write_bytes(struct.pack("<Q", 64 * 2**20 + 1) + b"{}")
    _refused(lambda: fvt.load(over), FormatError, r"over\.safetensors: header length 67108865 exceeds the 67108864-byte \(64 MiB\)")
    at_cap = tmp_path / "at_cap.safetensors"  # at the cap, the length is accepted and checked against the file
    at_cap.write_bytes(struct.pack("<Q", 64 * 2**20) + b"{}")
    _refused(lambda: fvt.load(at_cap), FormatError, r"at_cap\.safetensors: header length 67108864 is larger than the 2 bytes")


def _swap_for_link(path: Path, target: Path) -> None:
    """What a racer does between the containment check and the open: rename a symlink over the checked name."""
    tmp = path.with_name(path.name + ".swap")
    tmp.symlink_to(target)
    os.replace(tmp, path)


def test_a_weights_file_or_shard_swapped_for_an_outside_link_after_its_check_is_never_read(tmp_path, outside):
    """The race of test_attack_readers, made deterministic: the check passed on the inside file, then a link
    to an outside file was renamed over it; the open must refuse what it opened (it read the outside file)."""
    from fvtransform.io._files import find_weight_files
    from fvtransform.io._load import Checkpoint

    folder = tmp_path / "m"
    folder.mkdir()
    _good(folder / "model.safetensors", inside=torch.ones(1))
    files = find_weight_files(folder)  # checked: inside
    _swap_for_link(folder / "model.safetensors", outside / "secret.safetensors")
    _refused(lambda: Checkpoint(files), UnsafeFileError,
             r"m/model\.safetensors: the safetensors file opened resolves to .*outside/secret\.safetensors, outside .*/m")
    sharded = tmp_path / "s"
    sharded.mkdir()
    _good(sharded / "s1.safetensors", inside=torch.ones(1))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"inside": "s1.safetensors"}}))
    files = find_weight_files(sharded)
    _swap_for_link(sharded / "s1.safetensors", outside / "secret.safetensors")
    _refused(lambda: Checkpoint(files), UnsafeFileError, r"s/s1\.safetensors: the safetensors file opened resolves to .*outside")


def test_an_index_or_config_swapped_for_an_outside_link_after_its_check_is_never_read(tmp_path, outside):
    from fvtransform._json import read_json_file
    from fvtransform.io._files import read_index
    from fvtransform.io._open import contained

    (outside / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "secret.safetensors"}}))
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text("{}")
    (folder / "config.json").write_text("{}")
    index = contained(folder, "model.safetensors.index.json", "index file")
    config = contained(folder, "config.json", "model config")
    _swap_for_link(folder / "model.safetensors.index.json", outside / "model.safetensors.index.json")
    _swap_for_link(folder / "config.json", outside / "config.json")
    _refused(lambda: read_index(index), UnsafeFileError, r"model\.safetensors\.index\.json: the index file opened resolves to .*outside")
    _refused(lambda: read_json_file(config), UnsafeFileError, r"m/config\.json: the JSON file opened resolves to .*outside")


def test_a_component_folder_swapped_for_an_outside_link_after_its_check_is_never_followed(tmp_path, outside):
    from fvtransform.io._open import contained

    pipe = tmp_path / "pipe"
    (pipe / "transformer").mkdir(parents=True)
    component = contained(pipe, "transformer", "pipeline component folder")  # checked: a real folder inside
    os.rename(pipe / "transformer", tmp_path / "moved")
    (pipe / "transformer").symlink_to(outside, target_is_directory=True)
    _refused(lambda: contained(component, "config.json", "model config"), UnsafeFileError,
             r"the folder .*pipe/transformer now resolves to .*outside, outside .*pipe where it was found")


def test_guarantee_a_checked_path_that_stays_put_opens_and_prints_as_the_plain_path(tmp_path):
    """The root a derived path carries changes nothing for a file that stays where it was checked."""
    from fvtransform.io._open import DerivedPath, contained, read_bytes

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "c.json").write_text('{"x": 1}')
    (tmp_path / "c.json").symlink_to(tmp_path / "real" / "c.json")  # a link inside the folder: followed
    derived = contained(tmp_path, "c.json", "config")
    assert isinstance(derived, DerivedPath) and derived.contained_in == tmp_path.resolve()
    assert derived == tmp_path / "c.json" and str(derived) == str(tmp_path / "c.json")
    assert read_bytes(derived, "config") == b'{"x": 1}'
    assert (derived.parent / "y").contained_in is None and derived.root == "/"  # a path derived from it is plain again


def test_a_file_of_more_tensors_than_the_cap_is_refused_before_its_header_is_parsed(tmp_path, monkeypatch):
    """A valid 64 MiB header of a million 1-byte tensors took 33 s and 1.4 GB to load; the count is capped
    (MAX_TENSORS, 100 000: ten times a real shard), on the raw header first, then exactly after parsing."""
    from fvtransform.io import _header

    n = 100_000 + 2  # with the header's own object: one more object than the pre-parse bound allows
    header = b"{" + b",".join(b'"%x":{"dtype":"U8","shape":[1],"data_offsets":[%d,%d]}' % (i, i, i + 1) for i in range(n)) + b"}"
    many = tmp_path / "many.safetensors"
    many.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * n)
    _refused(lambda: read_header(many), FormatError,
             rf"many\.safetensors: the header holds {n + 1} JSON objects, so up to {n} tensors, over the limit of 100000")
    assert _header.MAX_TENSORS == 100_000
    monkeypatch.setattr(_header, "MAX_TENSORS", 3)  # the exact bound, on small files
    assert list(fvt.load(_good(tmp_path / "three.safetensors", a=torch.ones(1), b=torch.ones(1), c=torch.ones(1)))) == ["a", "b", "c"]
    four = _st(tmp_path / "four.safetensors", {k: {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i, k in enumerate("abcd")},
               b"\0" * 4)
    _refused(lambda: fvt.load(four), FormatError, r"four\.safetensors: the header lists 4 tensors, over the limit of 3 tensors per file")
