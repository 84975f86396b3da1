"""Writers lose nothing: outputs they did not write, secrets, concurrent writes, full disks, odd destinations."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from pathlib import Path
import socket
import subprocess
import threading

import pytest
import torch

import fvtransform as fvt
from fvtransform import errors as E
from fvtransform.cli._main import main
from fvtransform.io import _atomic
from fvtransform.io._header import read_header
from fvtransform.io._safetensors import TMP_MARK


def _tree(v: float = 1.0, n: int = 4) -> fvt.ParamTree:
    return fvt.ParamTree({f"l{i}.weight": torch.full((8, 6), v + i) for i in range(n)})


def _base(folder: Path, sharded: bool = True) -> fvt.ParamTree:
    tree = _tree()
    fvt.save(tree, folder, max_shard_size="300B" if sharded else "1GB")
    (folder / "config.json").write_text('{"_class_name": "x"}')
    return tree


def _adapter(tree: fvt.ParamTree, seed: int = 1, alpha: float | None = None) -> fvt.lora.LoraAdapter:
    return fvt.lora.random_adapter(tree, targets="l*.weight", rank=2, seed=seed, alpha=alpha)


def _no_temps(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if TMP_MARK in p.name or p.name.endswith(_atomic.LOCK_MARK) or _atomic.OLD_MARK in p.name]


# ----------------------------------------------------------------------------- merge: outputs it did not write
def test_merge_into_a_folder_that_holds_the_base_is_refused_and_deletes_nothing(tmp_path, capsys):
    models = tmp_path / "models"
    tree = _base(models / "base")
    fvt.lora.save(_adapter(tree), tmp_path / "lora")
    (models / "notes.txt").write_text("mine")
    before = {p: p.read_bytes() for p in models.rglob("*") if p.is_file()}
    code = main(["merge", str(models / "base"), str(tmp_path / "lora"), "-o", str(models), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fvtransform: error:") and err.count("\n") == 1 and "must not contain them" in err
    assert {p: p.read_bytes() for p in models.rglob("*") if p.is_file()} == before
    # --overwrite does not lift it: the base is still inside
    assert main(["merge", str(models / "base"), str(tmp_path / "lora"), "-o", str(models), "--overwrite", "--quiet"]) == 2
    assert {p: p.read_bytes() for p in models.rglob("*") if p.is_file()} == before
    # the API refuses the same, and an output that is a LoRA input
    with pytest.raises(E.UsageError, match=r"models: the output must differ from the base checkpoint and the other inputs and must not contain them"):
        fvt.lora.merge_checkpoint(models / "base", _adapter(tree), models)
    assert main(["merge", str(models / "base"), str(tmp_path / "lora"), "-o", str(tmp_path / "lora"), "--quiet"]) == 2
    assert (tmp_path / "lora" / "adapter_config.json").is_file()


def test_merge_refuses_a_foreign_folder_and_overwrite_keeps_its_other_files(tmp_path):
    tree = _base(tmp_path / "base")
    adapter = _adapter(tree)
    out = tmp_path / "out"
    out.mkdir()
    (out / "user.txt").write_text("keep me")
    with pytest.raises(E.WriteError, match=r"out: the folder is not empty \(\['user.txt'\]\) and is not a previous merge output"):
        fvt.lora.merge_checkpoint(tmp_path / "base", adapter, out)
    assert sorted(os.listdir(out)) == ["user.txt"]
    fvt.lora.merge_checkpoint(tmp_path / "base", adapter, out, overwrite=True)
    assert (out / "user.txt").read_text() == "keep me"
    assert fvt.load(out) == fvt.lora.merge(tree, adapter)
    # a previous merge output is recognised from its record and replaced without --overwrite; user files stay,
    # and so does the old config.json: a record alone (it may be forged) never deletes a file this merge does not write
    (tmp_path / "base" / "config.json").unlink()
    fvt.lora.merge_checkpoint(tmp_path / "base", _adapter(tree, seed=2), out)
    assert sorted(os.listdir(out)) == sorted([*os.listdir(tmp_path / "base"), "user.txt", "config.json"])
    assert fvt.load(out) == fvt.lora.merge(tree, _adapter(tree, seed=2))
    # a file of a name the merge writes, but not written by it, is refused
    (tmp_path / "base" / "README.md").write_text("base readme")
    (out / "README.md").write_text("user readme")
    with pytest.raises(E.WriteError, match=r"out: \['README.md'\] would be replaced, but this merge output did not write them"):
        fvt.lora.merge_checkpoint(tmp_path / "base", adapter, out)
    assert (out / "README.md").read_text() == "user readme"
    assert not _no_temps(tmp_path)


def test_merge_to_a_lone_file_refuses_a_file_it_did_not_write(tmp_path):
    tree = _tree()
    fvt.save(tree, tmp_path / "base.safetensors")
    other = tmp_path / "other.safetensors"
    fvt.save(_tree(5.0), other)
    with pytest.raises(E.WriteError, match=r"other.safetensors: exists and is not a previous merge output"):
        fvt.lora.merge_checkpoint(tmp_path / "base.safetensors", _adapter(tree), other)
    assert fvt.load(other) == _tree(5.0)
    fvt.lora.merge_checkpoint(tmp_path / "base.safetensors", _adapter(tree), other, overwrite=True)
    fvt.lora.merge_checkpoint(tmp_path / "base.safetensors", _adapter(tree, seed=3), other)  # its own output now
    assert fvt.load(other) == fvt.lora.merge(tree, _adapter(tree, seed=3))


def test_merge_copies_only_regular_files_inside_the_base_folder_and_reports_the_rest(tmp_path, capsys):
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    base = tmp_path / "base"
    tree = _base(base)
    (base / "README.md").symlink_to(secret)
    (base / "env.txt").symlink_to("/proc/self/environ")
    (base / "notes.md").write_text("inside")
    (base / "alias.md").symlink_to(base / "notes.md")
    (base / "dangling").symlink_to(tmp_path / "nothing")
    os.mkfifo(base / "pipe")
    (base / "sub").mkdir()
    skipped: list[tuple[str, str]] = []
    fvt.lora.merge_checkpoint(base, _adapter(tree), tmp_path / "out", on_skip=lambda n, why: skipped.append((n, why)))
    out = tmp_path / "out"
    assert (out / "alias.md").read_text() == "inside" and not (out / "alias.md").is_symlink()
    assert (out / "notes.md").read_text() == "inside" and (out / "config.json").is_file()
    for name in ("README.md", "env.txt", "dangling", "pipe", "sub"):
        assert not os.path.lexists(out / name), name
    assert all("PRIVATE KEY" not in p.read_text(errors="replace") for p in out.iterdir() if p.suffix != ".safetensors")
    why = dict(skipped)
    assert sorted(why) == ["README.md", "dangling", "env.txt", "pipe", "sub"]
    assert "outside the base folder" in why["README.md"] and "FIFO" in why["pipe"]
    # the CLI prints what it did not copy; the default API reports with a warning
    fvt.lora.save(_adapter(tree), tmp_path / "lora")
    assert main(["merge", str(base), str(tmp_path / "lora"), "-o", str(tmp_path / "o2"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "not copied" in printed and "README.md (a symbolic link to" in printed
    with pytest.warns(UserWarning) as warned:  # one warning per file not copied
        fvt.lora.merge_checkpoint(base, _adapter(tree), tmp_path / "o3")
    assert sorted(Path(str(w.message).split(": not copied to ")[0]).name for w in warned) == sorted(why)
    assert any(re.search(r"base/README.md: not copied to .*o3: a symbolic link", str(w.message)) for w in warned)


def test_merge_skips_other_files_over_the_size_limit(tmp_path, monkeypatch):
    from fvtransform.lora import _stream

    tree = _base(tmp_path / "base", sharded=False)
    (tmp_path / "base" / "big.bin").write_bytes(b"x" * 5000)
    monkeypatch.setattr(_stream, "OTHER_FILE_LIMIT", 4096)
    skipped: list[tuple[str, str]] = []
    fvt.lora.merge_checkpoint(tmp_path / "base", _adapter(tree), tmp_path / "out", on_skip=lambda n, w: skipped.append((n, w)))
    assert skipped == [("big.bin", "5000 bytes, over the 4096-byte limit for copied files")]
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]


# ----------------------------------------------------------------------------- fvt.save / lora.save into folders
def test_sharded_save_keeps_files_not_of_its_own_save(tmp_path):
    folder = tmp_path / "ck"
    fvt.save(_tree(), folder, max_shard_size="300B")
    shards = sorted(n for n in os.listdir(folder) if n.startswith("model-"))
    assert len(shards) == 4
    keep = {"model_ema.safetensors": b"ema", "modeling_best.safetensors": b"best", "config.json": b"{}",
            "model-00009-of-00009.safetensors": b"not in the index"}
    for name, data in keep.items():
        (folder / name).write_bytes(data)
    (folder / "sub").mkdir()
    (folder / "sub" / "x").write_bytes(b"deep")
    fvt.save(_tree(2.0), folder, max_shard_size="1GB")
    assert fvt.load(folder / "model.safetensors") == _tree(2.0)
    for name, data in keep.items():
        assert (folder / name).read_bytes() == data, name
    assert (folder / "sub" / "x").read_bytes() == b"deep"
    assert not any(n in os.listdir(folder) for n in shards)
    assert not _no_temps(tmp_path)


def test_a_hostile_previous_index_cannot_make_a_save_drop_other_files(tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "config.json", "b": "../x"}}))
    fvt.save(_tree(), folder, max_shard_size="300B")
    assert (folder / "config.json").read_text() == "{}"
    assert fvt.load(folder) == _tree()


def test_peft_folder_save_is_one_unit_and_keeps_other_files(tmp_path, monkeypatch):
    tree = _tree()
    folder = tmp_path / "lora"
    fvt.lora.save(_adapter(tree, alpha=4.0), folder)
    (folder / "README.md").write_text("card")
    old = {n: (folder / n).read_bytes() for n in os.listdir(folder)}

    real = _atomic.file_writer
    calls = []

    def failing(write):  # the config file (second) fails: the weights file must not change alone
        run = real(write)

        def wrapped(path):
            calls.append(path.name)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            run(path)

        return wrapped

    monkeypatch.setattr(_atomic, "file_writer", failing)
    with pytest.raises(E.WriteError, match=r"lora: writing failed at .*adapter_config.json.*ENOSPC.*disk is full"):
        fvt.lora.save(_adapter(tree, seed=7, alpha=9.0), folder)
    assert {n: (folder / n).read_bytes() for n in os.listdir(folder)} == old
    assert not _no_temps(tmp_path)


# ----------------------------------------------------------------------------- concurrent writers
def _race(work, n_procs: int = 3) -> list[int]:
    pids = []
    for i in range(n_procs):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                torch.set_num_threads(1)
                work(i)
                code = 0
            except BaseException as e:  # noqa: BLE001 (reported through the exit code)
                print(f"writer {i}: {type(e).__name__}: {e}", flush=True)
            finally:
                os._exit(code)
        pids.append(pid)
    return [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]


@pytest.mark.timeout(60)
def test_concurrent_writers_of_one_folder_are_serialised_and_lose_nothing(tmp_path):
    folder = tmp_path / "ck"
    fvt.save(_tree(), folder, max_shard_size="300B")
    (folder / "config.json").write_text('{"keep": true}')

    def work(i: int) -> None:
        for r in range(8):
            fvt.save(_tree(10.0 * i + r), folder, max_shard_size="300B" if r % 2 else "1GB")

    assert _race(work) == [0, 0, 0]
    assert json.loads((folder / "config.json").read_text()) == {"keep": True}
    final = fvt.load(folder)
    assert sorted(final) == sorted(_tree()) and float(final["l1.weight"][0, 0]) - float(final["l0.weight"][0, 0]) == 1.0
    assert not _no_temps(tmp_path)


@pytest.mark.timeout(60)
def test_concurrent_peft_and_file_writers_in_threads(tmp_path):
    tree = _tree()
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for r in range(6):
                fvt.lora.save(_adapter(tree, seed=r, alpha=float(i + 1)), tmp_path / "lora")
                fvt.save(_tree(float(i)), tmp_path / "m.safetensors")
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    alpha = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["lora_alpha"]
    assert fvt.lora.load(tmp_path / "lora", base=tree).scales == {k: alpha / 2 for k in _adapter(tree).ranks}
    assert not _no_temps(tmp_path)


def test_a_lock_held_too_long_is_a_typed_error(tmp_path, monkeypatch):
    dest = tmp_path / "m.safetensors"
    fvt.save(_tree(), dest)
    monkeypatch.setattr(_atomic, "LOCK_TIMEOUT_S", 0.05)
    with _atomic.writer_lock(dest):
        with pytest.raises(E.WriteError, match=r"m.safetensors: another writer has held .m.safetensors.fvt-lock"):
            fvt.save(_tree(3.0), dest)
    assert fvt.load(dest) == _tree()
    fvt.save(_tree(3.0), dest)  # released: the lock file is gone and the next writer proceeds
    assert fvt.load(dest) == _tree(3.0) and not _no_temps(tmp_path)


# ----------------------------------------------------------------------------- swaps without RENAME_EXCHANGE
def test_a_swap_cut_between_its_renames_is_recovered_not_deleted(tmp_path, monkeypatch):
    folder = tmp_path / "ck"
    fvt.save(_tree(1.0), folder, max_shard_size="300B")
    monkeypatch.setattr(_atomic, "exchange", lambda a, b: False)
    real_rename = os.rename

    def crash_after_first(a, b):  # the old folder moved away; then the process "dies"
        real_rename(a, b)
        if _atomic.OLD_MARK in str(b):
            raise KeyboardInterrupt

    monkeypatch.setattr(_atomic.os, "rename", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        fvt.save(_tree(2.0), folder, max_shard_size="300B")
    monkeypatch.setattr(_atomic.os, "rename", real_rename)
    assert not folder.exists() and [p for p in tmp_path.iterdir() if _atomic.OLD_MARK in p.name]
    # the next write fails (disk full): the old version is back, not deleted
    monkeypatch.setattr("fvtransform.io._save.write_safetensors", _enospc)
    with pytest.raises(E.WriteError, match="ENOSPC"):
        fvt.save(_tree(3.0), folder, max_shard_size="300B")
    assert fvt.load(folder) == _tree(1.0)
    assert not _no_temps(tmp_path)


# ----------------------------------------------------------------------------- full disks, read-only and odd destinations
def _enospc(f, *a, **k):
    f.write(b"\0" * 100)
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("sharded", [False, True])
def test_a_full_disk_mid_save_is_a_typed_error_and_the_old_data_stays(tmp_path, monkeypatch, sharded):
    dest = tmp_path / ("ck" if sharded else "m.safetensors")
    fvt.save(_tree(), dest, max_shard_size="300B" if sharded else None)
    monkeypatch.setattr("fvtransform.io._save.write_safetensors", _enospc)
    with pytest.raises(E.WriteError, match=r"(ck|m.safetensors): writing failed: No space left on device \(ENOSPC\); the disk is full"):
        fvt.save(_tree(2.0), dest, max_shard_size="300B" if sharded else None)
    assert fvt.load(dest) == _tree()
    assert not _no_temps(tmp_path)


def test_a_full_disk_mid_merge_is_one_cli_line_and_the_old_output_stays(tmp_path, monkeypatch, capsys):
    tree = _base(tmp_path / "base")
    fvt.lora.save(_adapter(tree), tmp_path / "lora")
    args = ["merge", str(tmp_path / "base"), str(tmp_path / "lora"), "-o", str(tmp_path / "out"), "--quiet"]
    assert main(args) == 0
    before = {n: (tmp_path / "out" / n).read_bytes() for n in os.listdir(tmp_path / "out")}
    monkeypatch.setattr("fvtransform.io._safetensors._tensor_bytes", lambda t: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("fvtransform: error:") and err.count("\n") == 1 and "ENOSPC" in err and "out" in err
    assert {n: (tmp_path / "out" / n).read_bytes() for n in os.listdir(tmp_path / "out")} == before
    assert not _no_temps(tmp_path)


@contextlib.contextmanager
def _tmpfs(where: Path, options: str):
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_real_full_disk(tmp_path):
    with _tmpfs(tmp_path / "small", "size=256k") as small:
        fvt.save(_tree(), small / "m.safetensors")
        with pytest.raises(E.WriteError, match=r"m.safetensors: writing failed.*ENOSPC"):
            fvt.save(fvt.ParamTree({"big": torch.zeros(200_000)}), small / "m.safetensors")
        assert fvt.load(small / "m.safetensors") == _tree()
        assert sorted(os.listdir(small)) == ["m.safetensors"]


def test_a_read_only_destination(tmp_path):
    with _tmpfs(tmp_path / "ro", "size=1m") as ro:
        fvt.save(_tree(), ro / "m.safetensors")
        fvt.save(_tree(), ro / "ck", max_shard_size="300B")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        with pytest.raises(E.WriteError, match=r"m.safetensors: writing failed.*EROFS.*read-only"):
            fvt.save(_tree(2.0), ro / "m.safetensors")
        with pytest.raises(E.WriteError, match=r"ck: writing failed.*EROFS"):
            fvt.save(_tree(2.0), ro / "ck", max_shard_size="300B")
        assert fvt.load(ro / "m.safetensors") == _tree() and fvt.load(ro / "ck") == _tree()


def _socket_file(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    return s


@pytest.mark.parametrize("kind", ["fifo", "symlink", "socket", "chardev"])
def test_odd_destinations_are_refused_before_anything_is_opened(tmp_path, kind):
    dest = tmp_path / "dest.safetensors"
    target = tmp_path / "target.safetensors"
    fvt.save(_tree(), target)
    keep = None
    if kind == "fifo":
        os.mkfifo(dest)
    elif kind == "symlink":
        dest.symlink_to(target)
    elif kind == "socket":
        keep = _socket_file(dest)
    else:
        try:
            os.mknod(dest, 0o600 | 0o020000, os.makedev(1, 3))  # a /dev/null twin
        except PermissionError:
            pytest.skip("mknod not permitted")
    words = {"fifo": "a FIFO", "symlink": "a symbolic link", "socket": "a socket", "chardev": "a character device"}[kind]
    try:
        for write in (lambda: fvt.save(_tree(2.0), dest), lambda: fvt.save(_tree(2.0), dest, max_shard_size="1KB"),
                      lambda: fvt.lora.save(_adapter(_tree()), dest), lambda: fvt.lora.save(_adapter(_tree()), dest, format="kohya")):
            with pytest.raises(E.UnsafeFileError, match=rf"dest.safetensors: the destination is {words}"):
                write()
        assert os.path.lexists(dest) and fvt.load(target) == _tree()
        assert not _no_temps(tmp_path)
    finally:
        if keep is not None:
            keep.close()


def test_convert_and_extract_refuse_an_output_fvtransform_did_not_write(tmp_path, capsys):
    tree = _tree()
    fvt.lora.save(_adapter(tree), tmp_path / "a")
    foreign = tmp_path / "k.safetensors"
    foreign.write_bytes(b"someone else's file")
    assert main(["convert-lora", str(tmp_path / "a"), "-o", str(foreign), "--to", "kohya"]) == 2
    assert "k.safetensors: exists and was not written by fvtransform" in capsys.readouterr().err
    assert foreign.read_bytes() == b"someone else's file"
    assert main(["convert-lora", str(tmp_path / "a"), "-o", str(tmp_path / "a"), "--to", "peft"]) == 2
    assert main(["convert-lora", str(tmp_path / "a"), "-o", str(foreign), "--to", "kohya", "--overwrite"]) == 0
    assert main(["convert-lora", str(tmp_path / "a"), "-o", str(foreign), "--to", "kohya"]) == 0  # ours now
    fvt.save(tree, tmp_path / "base.safetensors")
    fvt.save(fvt.lora.merge(tree, _adapter(tree)), tmp_path / "tuned.safetensors")
    assert main(["extract-lora", str(tmp_path / "base.safetensors"), str(tmp_path / "tuned.safetensors"), "-o",
                 str(tmp_path / "tuned.safetensors"), "--rank", "2", "--to", "kohya", "--quiet"]) == 2
    assert "must differ from the base" in capsys.readouterr().err


# ----------------------------------------------------------------------------- issue 13 follow-up (writers)
def test_a_file_saved_into_a_folder_takes_the_lock_a_swap_of_that_folder_takes(tmp_path, monkeypatch):
    ck = tmp_path / "ck"
    fvt.save(_tree(), ck, max_shard_size="300B")
    monkeypatch.setattr(_atomic, "LOCK_TIMEOUT_S", 0.05)
    with _atomic.writer_lock(ck):  # what a sharded save (a folder swap) of ck holds
        with pytest.raises(E.WriteError, match=r"another writer has held .ck.fvt-lock"):
            fvt.save(_tree(2.0), ck / "extra.safetensors")
        with pytest.raises(E.WriteError, match=r"another writer has held .ck.fvt-lock"):
            fvt.lora.save(_adapter(_tree()), ck / "sub")  # a folder written into ck: ck's lock too
    assert not (ck / "extra.safetensors").exists() and not (ck / "sub").exists()
    fvt.save(_tree(2.0), ck / "extra.safetensors")
    assert fvt.load(ck / "extra.safetensors") == _tree(2.0) and not _no_temps(tmp_path)


def test_names_too_long_for_the_marks_use_hashed_lock_and_temporary_names(tmp_path):
    file, folder = tmp_path / ("f" * 240 + ".safetensors"), tmp_path / ("d" * 250)
    for _ in range(2):  # the second write finds the first one's output
        fvt.save(_tree(), file)
        fvt.save(_tree(), folder, max_shard_size="300B")
    assert fvt.load(file) == _tree() and fvt.load(folder) == _tree()
    assert sorted(os.listdir(tmp_path)) == sorted([file.name, folder.name])
    assert len(_atomic.side_name(file.name, _atomic.LOCK_MARK)) < 64


def test_only_exact_temporary_shapes_are_cleaned_and_user_files_with_the_mark_are_carried(tmp_path):
    ck = tmp_path / "ck"
    fvt.save(_tree(), ck, max_shard_size="300B")
    (ck / "notes.fvt-tmp-mine.txt").write_text("mine")  # a user file inside the folder, not a temporary
    stale = tmp_path / ".ck.fvt-tmp-0123456789ab"  # a killed writer's temporary: exactly the shape we make
    stale.mkdir()
    fvt.save(_tree(2.0), ck, max_shard_size="300B")
    assert (ck / "notes.fvt-tmp-mine.txt").read_text() == "mine"
    assert not stale.exists() and fvt.load(ck) == _tree(2.0)


@pytest.mark.parametrize("name, why", [("", "not a plain file-name stem"), (".hidden", "not a plain file-name stem"),
                                       ("a/b", "not a plain file-name stem"), ("x" * 151, "at most 150 bytes"),
                                       ("m.fvt-tmp-", "not a plain file-name stem")])
def test_a_weights_name_must_be_a_plain_stem(tmp_path, name, why):
    with pytest.raises(E.UsageError, match=rf"weights_name .* {why}" if why.startswith("not") else why):
        fvt.save(_tree(), tmp_path / "ck", max_shard_size="300B", weights_name=name)
    assert os.listdir(tmp_path) == []


def test_sparse_tensors_and_nul_paths_are_usage_errors_naming_the_key_or_path(tmp_path):
    with pytest.raises(E.UsageError, match=r"'s.weight': a torch.sparse_coo tensor cannot be saved"):
        fvt.save({"s.weight": torch.eye(2).to_sparse()}, tmp_path / "s.safetensors")
    with pytest.raises(E.UsageError, match=r"holds a NUL character"):
        fvt.lora.save(_adapter(_tree()), str(tmp_path / "a\0b"), format="kohya")
    assert os.listdir(tmp_path) == []


def test_merge_checkpoint_takes_the_cli_dtype_names_and_refuses_others(tmp_path):
    tree = _tree()
    fvt.save(tree, tmp_path / "b.safetensors")
    out = fvt.lora.merge_checkpoint(tmp_path / "b.safetensors", _adapter(tree), tmp_path / "o.safetensors", dtype="bf16")
    assert {t.dtype for t in fvt.load(out).values()} == {torch.bfloat16}
    for bad in ("int8", torch.int8, "float64x"):
        with pytest.raises(E.UsageError, match=r"dtype .*: expected a floating torch.dtype or one of \['bf16', 'bfloat16'"):
            fvt.lora.merge_checkpoint(tmp_path / "b.safetensors", _adapter(tree), tmp_path / "p.safetensors", dtype=bad)
    assert not (tmp_path / "p.safetensors").exists()


def test_merge_reports_a_hard_linked_other_file_instead_of_copying_it(tmp_path):
    tree = _base(tmp_path / "base")
    (tmp_path / "base" / "card.md").write_text("inside only")
    os.link(tmp_path / "base" / "config.json", tmp_path / "config-elsewhere.json")
    skipped: list[tuple[str, str]] = []
    fvt.lora.merge_checkpoint(tmp_path / "base", _adapter(tree), tmp_path / "out", on_skip=lambda n, w: skipped.append((n, w)))
    assert skipped == [("config.json", "a file with 2 hard links: another link may lie outside the base folder")]
    assert not (tmp_path / "out" / "config.json").exists() and (tmp_path / "out" / "card.md").read_text() == "inside only"


def test_lora_save_replaces_only_its_own_outputs_unless_overwrite(tmp_path):
    tree = _tree()
    f = tmp_path / "k.safetensors"
    fvt.save(_tree(5.0), f)  # a foreign file (no fvt.scales)
    with pytest.raises(E.WriteError, match=r"k.safetensors: exists and was not written by fvtransform; .*overwrite=True"):
        fvt.lora.save(_adapter(tree), f, format="kohya")
    assert fvt.load(f) == _tree(5.0)
    fvt.lora.save(_adapter(tree), f, format="kohya", overwrite=True)
    fvt.lora.save(_adapter(tree, seed=4), f, format="kohya")  # its own output now: replaced without asking
    assert fvt.lora.load(f, base=tree).keys() == _adapter(tree).keys()
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text("{}")
    (peft / "README.md").write_text("card")
    with pytest.raises(E.WriteError, match=r"peft: \['adapter_config.json'\] would be replaced, but this PEFT LoRA folder did not write"):
        fvt.lora.save(_adapter(tree), peft)
    fvt.lora.save(_adapter(tree), peft, overwrite=True)
    assert (peft / "README.md").read_text() == "card"


def test_cli_outputs_inside_an_input_are_refused_through_links_and_hard_links(tmp_path, capsys):
    tree = _tree()
    fvt.lora.save(_adapter(tree), tmp_path / "k.safetensors", format="kohya")
    (tmp_path / "lora").mkdir()
    fvt.lora.save(_adapter(tree), tmp_path / "lora" / "k.safetensors", format="kohya")
    os.symlink(tmp_path / "lora", tmp_path / "via")
    os.link(tmp_path / "k.safetensors", tmp_path / "hard.safetensors")
    before = (tmp_path / "k.safetensors").read_bytes()
    for src, out in ((tmp_path / "lora", tmp_path / "via" / "new.safetensors"),
                     (tmp_path / "k.safetensors", tmp_path / "hard.safetensors")):
        assert main(["convert-lora", str(src), "--to", "kohya", "-o", str(out), "--overwrite"]) == 2
        assert "must not contain them or lie inside an input folder" in capsys.readouterr().err
    assert not (tmp_path / "lora" / "new.safetensors").exists() and (tmp_path / "k.safetensors").read_bytes() == before


def test_extract_lora_rank_below_one_is_a_typed_error(tmp_path, capsys):
    fvt.save(_tree(), tmp_path / "a.safetensors")
    fvt.save(_tree(2.0), tmp_path / "b.safetensors")
    for rank in ("0", "-3"):
        assert main(["extract-lora", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--rank", rank,
                     "-o", str(tmp_path / "x.safetensors"), "--to", "kohya", "--quiet"]) == 2
        assert "the rank must be a whole number of at least 1" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_a_merge_of_another_layout_into_its_previous_output_drops_the_old_index_and_shards(tmp_path):
    tree = _base(tmp_path / "sharded")
    _base(tmp_path / "single", sharded=False)
    out = tmp_path / "out"
    fvt.lora.merge_checkpoint(tmp_path / "sharded", _adapter(tree), out)
    fvt.lora.merge_checkpoint(tmp_path / "single", _adapter(tree), out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert fvt.load(out) == fvt.lora.merge(tree, _adapter(tree))
    deep = tmp_path / "deep"  # a record nested too deep to parse is no record: a typed refusal, not a RecursionError
    deep.mkdir()
    (deep / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"fvt.merged": "[]", "fvt.files": "[" * 100000},
                                                                  "weight_map": {}}))
    with pytest.raises(E.WriteError, match=r"deep: the folder is not empty .* is not a previous merge output"):
        fvt.lora.merge_checkpoint(tmp_path / "sharded", _adapter(tree), deep)


def test_merge_copies_user_files_whose_names_merely_contain_a_writer_mark(tmp_path):
    tree = _base(tmp_path / "base")
    (tmp_path / "base" / "notes.fvt-tmp-draft.txt").write_text("mine")
    (tmp_path / "base" / ".config.json.fvt-tmp-0123456789ab").write_text("a killed writer's temporary")
    skipped: list[tuple[str, str]] = []
    fvt.lora.merge_checkpoint(tmp_path / "base", _adapter(tree), tmp_path / "out", on_skip=lambda n, w: skipped.append((n, w)))
    assert (tmp_path / "out" / "notes.fvt-tmp-draft.txt").read_text() == "mine"
    assert not (tmp_path / "out" / ".config.json.fvt-tmp-0123456789ab").exists() and skipped == []


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def test_new_outputs_keep_the_umask_default_and_re_saves_keep_a_changed_mode(tmp_path: Path) -> None:
    f, d = tmp_path / "w.safetensors", tmp_path / "ck"
    fvt.save(_tree(), f)
    fvt.save(_tree(), d, max_shard_size="300B")
    assert os.stat(f).st_mode & 0o7777 == 0o666 & ~_umask()
    assert os.stat(d).st_mode & 0o7777 == 0o777 & ~_umask()
    os.chmod(f, 0o640)
    os.chmod(d, 0o750)
    fvt.save(_tree(2.0), f)
    fvt.save(_tree(2.0), d, max_shard_size="300B")
    assert os.stat(f).st_mode & 0o7777 == 0o640
    assert os.stat(d).st_mode & 0o7777 == 0o750
    assert fvt.load(f) == _tree(2.0) and fvt.load(d) == _tree(2.0)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to chown a file to another user")
def test_another_users_lock_file_is_skipped_as_the_parent_lock_and_refused_as_the_own_lock(tmp_path: Path) -> None:
    mine = tmp_path / "mywork"
    mine.mkdir()
    (tmp_path / ".mywork.fvt-lock").write_bytes(b"")
    os.chmod(tmp_path / ".mywork.fvt-lock", 0o666)
    os.chown(tmp_path / ".mywork.fvt-lock", 65534, 65534)
    fvt.save(_tree(), mine / "x.safetensors")  # the parent's lock name is another user's: skipped
    assert fvt.load(mine / "x.safetensors") == _tree()
    with pytest.raises(E.UnsafeFileError, match=r"\.mywork\.fvt-lock: the lock file of .*mywork is a file of another user \(uid 65534\)"):
        fvt.save(_tree(), mine, max_shard_size="300B")  # a swap of mywork takes that lock as its own: refused


def test_a_lone_file_merge_into_a_previous_merge_folder_replaces_its_model_and_keeps_other_files(tmp_path: Path) -> None:
    tree = _base(tmp_path / "sharded")
    fvt.save(_tree(5.0), tmp_path / "single.safetensors")
    ad = _adapter(tree)
    out = tmp_path / "out"
    fvt.lora.merge_checkpoint(tmp_path / "sharded", ad, out)
    (out / "notes.txt").write_text("mine")
    (out / "x-00001-of-00009.safetensors").mkdir()  # a folder of a shard's name, not in any record: kept
    fvt.lora.merge_checkpoint(tmp_path / "single.safetensors", ad, out)
    assert sorted(os.listdir(out)) == ["config.json", "notes.txt", "single.safetensors", "x-00001-of-00009.safetensors"]
    assert fvt.load(out) == fvt.lora.merge(_tree(5.0), ad)
    assert json.loads(read_header(out / "single.safetensors").metadata["fvt.files"]) == ["single.safetensors"]


def test_a_lone_file_merge_refuses_a_non_empty_folder_that_is_not_a_merge_output(tmp_path: Path) -> None:
    fvt.save(_tree(), tmp_path / "single.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(E.WriteError, match=r"out: the folder is not empty \(\['notes.txt'\]\) and is not a previous merge output"):
        fvt.lora.merge_checkpoint(tmp_path / "single.safetensors", _adapter(_tree()), out)
    assert os.listdir(out) == ["notes.txt"]
    fvt.lora.merge_checkpoint(tmp_path / "single.safetensors", _adapter(_tree()), out, overwrite=True)
    assert sorted(os.listdir(out)) == ["notes.txt", "single.safetensors"]


@pytest.mark.parametrize("how", ["key", "rename", "sharded", "tied"])
def test_every_writer_refuses_a_tensor_named___metadata__(tmp_path, how):
    # '__metadata__' is the header's metadata slot: a tensor under it drops metadata= and makes a file
    # that fvt.load and safetensors refuse. Refused before a byte is written, naming the key.
    a = torch.ones(2)
    path = tmp_path / "m.safetensors"
    with pytest.raises(E.UsageError, match=r"m\.safetensors.*'__metadata__'.*Fix"):
        if how == "key":
            fvt.save({"__metadata__": a, "b": torch.zeros(2)}, path, metadata={"x": "y"})
        elif how == "rename":
            fvt.save({"a": a, "b": torch.zeros(2)}, path, rename={"a": "__metadata__"})
        elif how == "sharded":
            fvt.save({"__metadata__": a, "b": torch.zeros(2)}, tmp_path / "m.safetensors", max_shard_size=8)
        else:
            fvt.save({"a": a, "__metadata__": a}, path)
    assert not path.exists()
