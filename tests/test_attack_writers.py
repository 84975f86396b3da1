# Black-box attacks on the writers (fvt.save, fvt.lora.save, merge_checkpoint, the merge / convert-lora /
# extract-lora commands). Each test asserts the documented behaviour (docs/security.md, SECURITY.md,
# docs/guides/cli.md, the writers' docstrings) and failed on the code it was written against.
import json
import os
import time

import pytest
import torch

import fvtransform as fvt
from fvtransform.cli import main
from fvtransform.errors import FvTransformError


def _tree():
    g = torch.Generator().manual_seed(0)
    return fvt.ParamTree({
        "blocks.0.attn1.to_q.weight": torch.randn(8, 8, generator=g),
        "blocks.0.attn1.to_k.weight": torch.randn(8, 8, generator=g),
        "other.bias": torch.randn(8, generator=g),
    })


def _adapter(tree):
    return fvt.lora.random_adapter(tree, targets="blocks.*.attn1.to_*.weight", rank=2)


def _inputs(tmp_path):
    tree = _tree()
    fvt.save(tree, tmp_path / "base", max_shard_size=300)   # two shards + index
    ad = _adapter(tree)
    fvt.lora.save(ad, tmp_path / "lora", format="peft")
    return tree, ad


def _snapshot(folder):
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for n in filenames:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = f.read()
    return out


def _user_subfolder(path):
    os.makedirs(path / "deep")
    (path / "notes.txt").write_text("my notes")
    (path / "deep" / "data.bin").write_bytes(b"irreplaceable")


def _assert_user_subfolder(path):
    assert (path / "notes.txt").read_text() == "my notes"
    assert (path / "deep" / "data.bin").read_bytes() == b"irreplaceable"


# --- 1. A user sub-folder where an output file goes is deleted, recursively -----------------------------
# docs/security.md: "sub-folders stay"; fvt.save docstring: "FormatError: ... a folder where a file goes".
# Expected: the folder and its files are kept (the write is refused with a typed error, or goes elsewhere).

@pytest.mark.parametrize("name", ["model-00002-of-00002.safetensors", "model.safetensors.index.json"])
def test_sharded_save_never_deletes_a_user_folder_named_like_one_of_its_files(tmp_path, name):
    ck = tmp_path / "ck"
    _user_subfolder(ck / name)
    try:
        fvt.save(_tree(), ck, max_shard_size=300)
    except FvTransformError:
        pass
    _assert_user_subfolder(ck / name)


def test_single_shard_save_never_deletes_a_user_folder_named_model_safetensors(tmp_path):
    ck = tmp_path / "ck"
    _user_subfolder(ck / "model.safetensors")
    try:
        fvt.save(_tree(), ck, max_shard_size=10**6)   # one shard: a plain model.safetensors
    except FvTransformError:
        pass
    _assert_user_subfolder(ck / "model.safetensors")


def test_sharded_save_never_deletes_a_user_folder_that_an_old_index_names(tmp_path):
    ck = tmp_path / "ck"
    _user_subfolder(ck / "model-00003-of-00004.safetensors")
    (ck / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"x": "model-00003-of-00004.safetensors"}}))
    try:
        fvt.save(_tree(), ck, max_shard_size=300)
    except FvTransformError:
        pass
    _assert_user_subfolder(ck / "model-00003-of-00004.safetensors")


def test_merge_overwrite_never_deletes_a_user_folder_where_a_shard_goes(tmp_path, capsys):
    _inputs(tmp_path)
    out = tmp_path / "out"
    _user_subfolder(out / "model-00001-of-00002.safetensors")
    rc = main(["merge", str(tmp_path / "base"), str(tmp_path / "lora"), "-o", str(out), "--overwrite", "--quiet"])
    assert rc in (0, 2)
    _assert_user_subfolder(out / "model-00001-of-00002.safetensors")


def test_peft_save_never_deletes_a_user_folder_named_adapter_config_json(tmp_path, capsys):
    tree, ad = _inputs(tmp_path)
    api = tmp_path / "api"
    _user_subfolder(api / "adapter_config.json")
    try:
        fvt.lora.save(ad, api, format="peft")
    except FvTransformError:
        pass
    _assert_user_subfolder(api / "adapter_config.json")
    cli = tmp_path / "cli"
    _user_subfolder(cli / "adapter_config.json")
    rc = main(["convert-lora", str(tmp_path / "lora"), "--to", "peft", "-o", str(cli), "--overwrite"])
    assert rc in (0, 2)
    _assert_user_subfolder(cli / "adapter_config.json")


# --- 2. convert-lora / extract-lora write over a file of their own input --------------------------------
# cli.md: the output must not be or hold an input ("--overwrite lifts the last two refusals" only). The
# commands refuse `-o INPUT` but not `-o INPUT_FOLDER/its-file`, with or without --overwrite.

def test_convert_lora_refuses_to_write_over_a_file_of_its_input_lora_folder(tmp_path, capsys):
    _inputs(tmp_path)
    before = _snapshot(tmp_path / "lora")
    rc = main(["convert-lora", str(tmp_path / "lora"), "--to", "kohya",
               "-o", str(tmp_path / "lora" / "adapter_model.safetensors"), "--base", str(tmp_path / "base")])
    assert rc == 2
    assert _snapshot(tmp_path / "lora") == before


@pytest.mark.parametrize("which", ["base", "tuned"])
def test_extract_lora_overwrite_never_writes_over_a_shard_of_its_input(tmp_path, capsys, which):
    _inputs(tmp_path)
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "lora"), "-o", str(tmp_path / "tuned"),
                 "--quiet"]) == 0
    before = _snapshot(tmp_path / which)
    rc = main(["extract-lora", str(tmp_path / "base"), str(tmp_path / "tuned"), "--rank", "2", "--to", "kohya",
               "-o", str(tmp_path / which / "model-00001-of-00002.safetensors"), "--overwrite", "--quiet"])
    assert rc == 2
    assert _snapshot(tmp_path / which) == before
    fvt.load(tmp_path / which)


def test_convert_lora_overwrite_never_writes_over_a_shard_of_its_base(tmp_path, capsys):
    _inputs(tmp_path)
    before = _snapshot(tmp_path / "base")
    rc = main(["convert-lora", str(tmp_path / "lora"), "--to", "kohya", "--base", str(tmp_path / "base"),
               "-o", str(tmp_path / "base" / "model-00001-of-00002.safetensors"), "--overwrite"])
    assert rc == 2
    assert _snapshot(tmp_path / "base") == before


# --- 3. Two fvtransform writers at once lose a complete output -------------------------------------------
# "Writers of one destination are serialised"; the brief's promise: two writers at once never lose a
# complete output. A save into the folder (a diffusers LoRA written to the same path `ck`, or a file
# inside it) returns, and a concurrent sharded save of `ck` then swaps in a folder without it.

def _race(tmp_path, write_inner, inner_path):
    ck = tmp_path / "ck"
    big = fvt.ParamTree({f"blocks.{i}.weight": torch.randn(64, 256) for i in range(8)})
    fvt.save(big, ck, max_shard_size=70000)
    pid = os.fork()
    if pid == 0:   # a second process re-saves the folder for a bounded time
        try:
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                fvt.save(big, ck, max_shard_size=70000)
        finally:
            os._exit(0)
    lost = []
    try:
        time.sleep(0.2)
        for i in range(60):
            try:
                write_inner(i)
            except FvTransformError:   # a typed refusal is acceptable; a lost output is not
                continue
            time.sleep(0.05)
            for attempt in range(2):   # only this loop writes inner_path: a loss that lasts is real
                try:
                    got = fvt.load(inner_path)
                    why = "reverted to an older version" if "x" in got and float(got["x"][0]) != i else None
                except FvTransformError:
                    why = "gone"
                if why is None:
                    break
                time.sleep(0.2)
            else:
                lost.append((i, why))
    finally:
        os.waitpid(pid, 0)
    return lost, big


def test_a_diffusers_lora_saved_to_a_folder_survives_a_concurrent_sharded_save_of_that_folder(tmp_path):
    ck = tmp_path / "ck"
    holder = {}

    def write(i):
        if "ad" not in holder:
            holder["ad"] = fvt.lora.random_adapter(holder["big"], targets="blocks.*.weight", rank=2)
        fvt.lora.save(holder["ad"], ck, format="diffusers")

    big = fvt.ParamTree({f"blocks.{i}.weight": torch.randn(64, 256) for i in range(8)})
    holder["big"] = big
    lost, _ = _race(tmp_path, write, ck / "pytorch_lora_weights.safetensors")
    assert lost == []


def test_a_file_saved_into_a_folder_survives_a_concurrent_sharded_save_of_that_folder(tmp_path):
    ck = tmp_path / "ck"

    def write(i):
        fvt.save(fvt.ParamTree({"x": torch.full((4,), float(i))}), ck / "extra.safetensors")

    lost, _ = _race(tmp_path, write, ck / "extra.safetensors")
    assert lost == []


# --- 4. A forged previous-merge record makes merge delete user files and folders --------------------------
# "a merge output records its files (fvt.files) and a later merge replaces only those"; a merge never
# writes a sub-folder (sub-folders of the base are not copied), so a record naming one is forged, and a
# user file that is not what the merge wrote (not a file of the merge's layout) must not be deleted.

def _forged(out, files):
    (out / "model.safetensors.index.json").write_text(json.dumps({
        "metadata": {"fvt.merged": "[]", "fvt.files": json.dumps(files)},
        "weight_map": {"a": "model-00001-of-00002.safetensors"}}))


def test_a_forged_merge_record_naming_a_sub_folder_never_deletes_it(tmp_path, capsys):
    _inputs(tmp_path)
    out = tmp_path / "out"
    _user_subfolder(out / "sub")
    _forged(out, ["sub", "model.safetensors.index.json"])
    main(["merge", str(tmp_path / "base"), str(tmp_path / "lora"), "-o", str(out), "--quiet"])
    _assert_user_subfolder(out / "sub")


def test_a_forged_merge_record_never_deletes_user_files_it_names(tmp_path, capsys):
    _inputs(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("two years of work")
    _forged(out, ["thesis.tex", "model.safetensors.index.json"])
    main(["merge", str(tmp_path / "base"), str(tmp_path / "lora"), "-o", str(out), "--quiet"])
    assert (out / "thesis.tex").read_text() == "two years of work"


# --- 5. fvt.lora.save overwrites a non-empty foreign folder / a foreign file ------------------------------
# SECURITY.md: "non-empty folders that are not a previous output of the same kind are refused"; the CLI
# refuses the same write ("exists and was not written by fvtransform"), the Python writer does not.

def test_lora_save_refuses_a_foreign_peft_folder_like_the_cli(tmp_path, capsys):
    tree, ad = _inputs(tmp_path)
    u = tmp_path / "u"
    u.mkdir()
    (u / "adapter_model.safetensors").write_bytes(b"user weights, not safetensors")
    (u / "adapter_config.json").write_text('{"mine": true}')
    rc = main(["convert-lora", str(tmp_path / "lora"), "--to", "peft", "-o", str(u)])
    assert rc == 2   # the CLI refuses
    with pytest.raises(FvTransformError, match=r"u: \['adapter_config\.json', 'adapter_model\.safetensors'\] would be "
                       r"replaced, but this PEFT LoRA folder did not write them; refusing.*overwrite=True"):
        fvt.lora.save(ad, u, format="peft")
    assert (u / "adapter_config.json").read_text() == '{"mine": true}'
    assert (u / "adapter_model.safetensors").read_bytes() == b"user weights, not safetensors"


# --- 6. merge copies a hard link to a secret outside the base folder -------------------------------------
# The brief's promise: outputs never contain secrets copied from outside the input folder (a symbolic link
# to the same file is skipped; a hard link to it is copied).

def test_merge_never_copies_a_hard_link_to_a_file_outside_the_base_folder(tmp_path, capsys):
    _inputs(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("AWS_SECRET_ACCESS_KEY=hunter2")
    os.link(secret, tmp_path / "base" / "README.md")
    main(["merge", str(tmp_path / "base"), str(tmp_path / "lora"), "-o", str(tmp_path / "out"), "--quiet"])
    for rel, data in _snapshot(tmp_path / "out").items():
        assert b"hunter2" not in data, rel


# --- 7. Name-based clean-up deletes user files and folders that merely contain ".fvt-tmp-" -----------------
# "leftover temporaries carry .fvt-tmp- in their names and the next write removes them"; the writer's own
# temporaries end in 12 hex digits. A user's file or folder that is no such temporary must stay.

def test_stale_temporary_clean_up_never_deletes_user_files_that_are_not_its_temporaries(tmp_path):
    fvt.save(_tree(), tmp_path / "ck.safetensors")
    (tmp_path / ".ck.safetensors.fvt-tmp-notes (my backup).txt").write_text("mine")
    _user_subfolder(tmp_path / ".ck.safetensors.fvt-tmp-my-experiments")
    fvt.save(_tree(), tmp_path / "ck.safetensors")
    assert (tmp_path / ".ck.safetensors.fvt-tmp-notes (my backup).txt").read_text() == "mine"
    _assert_user_subfolder(tmp_path / ".ck.safetensors.fvt-tmp-my-experiments")


# --- 8. weights_name is not checked: a sharded save writes outside its folder ------------------------------
# The save is "a folder that receives {weights_name}-0000k-of-0000N shards", built in a temporary folder
# and swapped in as one unit. weights_name="../esc" (or an absolute path) writes shards beside (or far from)
# the folder, outside the swap: never removed, not atomic, and the call succeeds.

@pytest.mark.parametrize("weights_name", ["../esc", "ABS"])
def test_sharded_save_never_writes_outside_its_folder_whatever_the_weights_name(tmp_path, weights_name):
    root = tmp_path / "root"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if weights_name == "ABS":
        weights_name = str(elsewhere / "abs")
    try:
        fvt.save(_tree(), root / "ck", max_shard_size=300, weights_name=weights_name)
    except FvTransformError:
        pass
    assert sorted(os.listdir(root)) in (["ck"], [])   # (a lock or temporary is removed on release)
    assert os.listdir(elsewhere) == []


# --- 9. Errors that are not typed -------------------------------------------------------------------------
# "every error is a typed fvtransform error (FvTransformError)".

@pytest.mark.parametrize("case", ["nul-in-path", "nul-in-weights-name", "nul-in-lora-path", "sparse-tensor",
                                  "merge-dtype-string"])
def test_writer_errors_are_typed(tmp_path, case):
    tree = _tree()
    calls = {
        "nul-in-path": lambda: fvt.save(tree, str(tmp_path / "a\0b.safetensors")),
        "nul-in-weights-name": lambda: fvt.save(tree, tmp_path / "ck", max_shard_size=300, weights_name="a\0"),
        "nul-in-lora-path": lambda: fvt.lora.save(_adapter(tree), str(tmp_path / "l\0"), format="peft"),
        "sparse-tensor": lambda: fvt.save({"a": torch.zeros(2, 2).to_sparse()}, tmp_path / "s.safetensors"),
        "merge-dtype-string": lambda: (fvt.save(tree, tmp_path / "b.safetensors"),
                                       fvt.lora.merge_checkpoint(tmp_path / "b.safetensors", _adapter(tree),
                                                                 tmp_path / "o.safetensors", dtype="bf16")),
    }
    try:
        calls[case]()
    except FvTransformError:
        pass
    except Exception as e:  # noqa: BLE001 - the point of the test
        pytest.fail(f"untyped {type(e).__name__}: {e}")
