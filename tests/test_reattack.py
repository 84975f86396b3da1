# Second-round black-box attacks on the writers (fvt.save, fvt.lora.save, merge_checkpoint, the merge / convert-lora
# / extract-lora commands) after the first round of fixes. Each test asserts the documented (or torch.save-like)
# behaviour and failed on the code it was written against.
import os
import stat

import pytest
import torch

import fvtransform as fvt
from fvtransform.cli import main


def _tree(shift=0.0):
    g = torch.Generator().manual_seed(0)
    return fvt.ParamTree({
        "blocks.0.attn1.to_q.weight": torch.randn(8, 8, generator=g) + shift,
        "blocks.0.attn1.to_k.weight": torch.randn(8, 8, generator=g) + shift,
        "other.bias": torch.randn(8, generator=g) + shift,
    })


def _adapter(tree):
    return fvt.lora.random_adapter(tree, targets="blocks.*.attn1.to_*.weight", rank=2)


def _mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


# --- 1. Re-saving a private folder makes it world-readable --------------------------------------------------
# The swap-in of multi-file outputs builds a new folder with the default mode (0777 & ~umask) and exchanges it
# for the user's folder, so a 0700 folder becomes 0755 and every file carried into it (config.json, notes,
# private sub-folders' names) becomes listable/reachable by other local users. Writing into an existing folder
# (torch.save, safetensors.save_file, a re-run of a tool) never changes the folder's permissions.
# Expected: the destination folder keeps its mode.

def _private(folder):
    folder.mkdir()
    (folder / "notes.txt").write_text("private")
    os.chmod(folder, 0o700)


def test_a_sharded_re_save_keeps_a_private_folder_private(tmp_path):
    ck = tmp_path / "ck"
    _private(ck)
    fvt.save(_tree(), ck, max_shard_size=300)
    assert _mode(ck) == 0o700, oct(_mode(ck))


def test_a_peft_re_save_keeps_a_private_folder_private(tmp_path):
    tree = _tree()
    lp = tmp_path / "lp"
    _private(lp)
    fvt.lora.save(_adapter(tree), lp, format="peft", overwrite=True)
    assert _mode(lp) == 0o700, oct(_mode(lp))


def test_a_merge_into_a_private_folder_keeps_it_private(tmp_path, capsys):
    tree = _tree()
    fvt.save(tree, tmp_path / "base", max_shard_size=300)
    fvt.lora.save(_adapter(tree), tmp_path / "l.safetensors", format="comfy")
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o700)   # an empty private folder the user made for the result
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "l.safetensors") + ":0.5", "-o", str(out),
                 "--quiet"]) == 0
    assert _mode(out) == 0o700, oct(_mode(out))


# --- 2. A private file becomes world-readable when it is re-saved or copied -----------------------------------
# fvt.save "like torch.save, replaces the file at the path it is given": torch.save (open(..., "wb")) keeps the
# file's mode. The atomic replace makes a fresh 0644 file. merge copies the base folder's other files (a 0600
# secret.txt, a 0600 shard) into the output as 0644.
# Expected: the file keeps (re-save) / the copy gets (merge) the original's permission bits.

@pytest.mark.parametrize("writer", ["fvt.save", "lora.save"])
def test_re_saving_a_private_file_keeps_it_private(tmp_path, writer):
    tree = _tree()
    p = tmp_path / "w.safetensors"
    save = (lambda: fvt.save(tree, p)) if writer == "fvt.save" else \
        (lambda: fvt.lora.save(_adapter(tree), p, format="comfy"))
    save()
    os.chmod(p, 0o600)
    save()
    assert _mode(p) == 0o600, oct(_mode(p))


def test_merge_never_widens_the_permissions_of_a_file_it_copies(tmp_path, capsys):
    tree = _tree()
    base = tmp_path / "base"
    fvt.save(tree, base, max_shard_size=300)
    (base / "secret.txt").write_text("api key")
    os.chmod(base / "secret.txt", 0o600)
    fvt.lora.save(_adapter(tree), tmp_path / "l.safetensors", format="comfy")
    out = tmp_path / "out"
    assert main(["merge", str(base), str(tmp_path / "l.safetensors") + ":0.5", "-o", str(out), "--quiet"]) == 0
    assert _mode(out / "secret.txt") == 0o600, oct(_mode(out / "secret.txt"))


# --- 3. Any local user can stop all saves into a folder of yours under /tmp ---------------------------------
# "every writer of a path also takes, first, the lock of the folder it writes into" — that lock lives in the
# folder's PARENT as .<folder>.fvt-lock. For /tmp/mywork/x.safetensors that is /tmp/.mywork.fvt-lock, in a
# world-writable sticky folder: another user creates it as a FIFO (or a folder), and every save into
# /tmp/mywork is an UnsafeFileError (WriteError) telling the victim to "remove it", which the sticky bit forbids.
# docs/security.md: "Where the lock of the folder written into cannot be created (its parent is read-only or
# not ours), only the destination's own lock is taken". Expected: a foreign entry squatting on the parent's
# lock name is treated the same way (a foreign SYMLINK there already is) — the save into the folder works.

@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_foreign_entry_on_the_parent_folder_lock_does_not_block_saves_into_the_folder(tmp_path, kind):
    shared = tmp_path / "shared"          # stands for /tmp
    shared.mkdir()
    os.chmod(shared, 0o1777)
    mine = shared / "mywork"
    mine.mkdir()
    squat = shared / ".mywork.fvt-lock"
    if kind == "fifo":
        os.mkfifo(squat)
    else:
        squat.mkdir()
    if os.geteuid() == 0:
        os.lchown(squat, 65534, 65534)    # owned by another user (nobody)
    fvt.save(_tree(), mine / "x.safetensors")
    assert fvt.load(mine / "x.safetensors") == _tree()


# --- 4. A merge from a single-file base is not recognised as a merge output --------------------------------
# docs: "a merge output records its files (fvt.files in the index or weights metadata)" and "merge refuses a
# non-empty folder that is not a previous merge output". A merge of a lone-file base into OUT/ writes
# OUT/<base name> without any fvt.files record, so re-running the merge into the same OUT/ (now from the
# sharded base) is refused as "not a previous merge output".
# Expected: OUT/ written by merge is a previous merge output; the second merge succeeds.

def test_a_merge_output_from_a_single_file_base_is_a_previous_merge_output(tmp_path, capsys):
    tree = _tree()
    fvt.save(tree, tmp_path / "single.safetensors")
    fvt.save(tree, tmp_path / "sharded", max_shard_size=300)
    fvt.lora.save(_adapter(tree), tmp_path / "l.safetensors", format="comfy")
    out = tmp_path / "out"
    lora = str(tmp_path / "l.safetensors") + ":0.5"
    assert main(["merge", str(tmp_path / "single.safetensors"), lora, "-o", str(out), "--quiet"]) == 0
    assert main(["merge", str(tmp_path / "sharded"), lora, "-o", str(out), "--quiet"]) == 0


# --- 5. Re-running a merge into its output with a single-file base leaves the old merge as the model ----------
# After `merge sharded/ ... -o out/`, `merge single.safetensors ... -o out/` succeeds but writes out/single.safetensors
# beside the old index and shards (which its own record names); fvt.load(out) then silently returns the OLD
# merge. Expected: either the re-run is refused, or out/ loads as the new merge.

def test_re_running_a_merge_into_its_output_never_leaves_the_old_model_as_what_loads(tmp_path, capsys):
    tree = _tree()
    fvt.save(tree, tmp_path / "sharded", max_shard_size=300)
    fvt.save(_tree(1.0), tmp_path / "single.safetensors")
    ad = _adapter(tree)
    fvt.lora.save(ad, tmp_path / "l.safetensors", format="comfy")
    out = tmp_path / "out"
    lora = str(tmp_path / "l.safetensors") + ":1.0"
    assert main(["merge", str(tmp_path / "sharded"), lora, "-o", str(out), "--quiet"]) == 0
    rc = main(["merge", str(tmp_path / "single.safetensors"), lora, "-o", str(out), "--quiet"])
    if rc == 0:
        fvt.lora.merge_checkpoint(tmp_path / "single.safetensors", fvt.lora.load(tmp_path / "l.safetensors"),
                                  tmp_path / "ref.safetensors")
        expected, got = fvt.load(tmp_path / "ref.safetensors"), fvt.load(out)
        assert sorted(got.keys()) == sorted(expected.keys())
        for k in expected.keys():
            assert torch.allclose(got[k], expected[k]), f"{k}: out/ still loads the previous merge"
