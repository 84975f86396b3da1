"""Black-box attacks on downloads and hub loading (a hostile hub on 127.0.0.1, a tampering neighbour, a careless user).

Every test here asserts the behaviour docs/security.md promises; each one failed on the code it was written against.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import fvtransform as fvt
from fvtransform.errors import FvTransformError, IntegrityError
from fvtransform.hub import maybe_download_model

import diffusers  # the test extra installs it: a missing one is an error, not a skip

from test_oracles_models import WAN_CONFIG


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def wan_files(tmp_path_factory) -> dict[str, bytes]:
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**WAN_CONFIG).eval()
    folder = tmp_path_factory.mktemp("wan")
    model.save_pretrained(folder, max_shard_size="20KB")
    return _files(folder)


def _cache(fake_hub) -> Path:
    import huggingface_hub.constants as hf_constants

    return Path(hf_constants.HF_HUB_CACHE)


# ------------------------------------------------------------------ code execution from a hub config
def test_a_hub_config_cannot_make_load_model_run_remote_code(fake_hub, wan_files, tmp_path, monkeypatch):
    """config.json {"architectures": ["pipeline"], ...} makes load_model call transformers.pipeline(**config),
    and with "trust_remote_code": true that downloads and imports Python from another repo of the same hub."""
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # keep ~/.cache clean if the bug is there
    sentinel = tmp_path / "PWNED"
    code = (f"open({str(sentinel)!r}, 'w').write('attacker code ran')\n"
            "from transformers import PretrainedConfig\n"
            "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
            "class EvilModel:\n    pass\n")
    fake_hub.add_commit("attacker/code", {
        "config.json": json.dumps({"model_type": "evil", "architectures": ["EvilModel"],
                                   "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                                                "AutoModel": "configuration_evil.EvilModel"}}).encode(),
        "configuration_evil.py": code.encode(),
    })
    hostile = {"architectures": ["pipeline"], "task": "feature-extraction", "model": "attacker/code",
               "trust_remote_code": True}
    fake_hub.add_commit("org/tiny-wan", dict(wan_files, **{"config.json": json.dumps(hostile).encode()}))
    with pytest.raises(Exception) as caught:
        fvt.load_model("org/tiny-wan")
    assert not sentinel.exists(), "a downloaded config.json made fvtransform import and run attacker code"
    assert not any("/attacker/code/" in p for p in fake_hub.paths_requested())
    assert isinstance(caught.value, FvTransformError), repr(caught.value)


@pytest.mark.parametrize("name", ["pipeline", "AutoModel", "__class__"])
def test_config_architectures_name_only_model_classes(tmp_path, wan_files, name):
    """'architectures' is looked up as any attribute of transformers and called with the config as keywords."""
    for k, v in wan_files.items():
        (tmp_path / k).write_bytes(v)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": [name], "model_type": "bert"}))
    with pytest.raises(FvTransformError, match="config.json|architecture"):
        fvt.load_model(tmp_path)


@pytest.mark.parametrize(
    "value",
    [["WanTransformer3DModel"], {"a": 1}, 5, None, True, "__class__", "ModelMixin", "WanPipeline",
     "is_transformers_version", "AttentionBackendName"],
    ids=["list", "dict", "int", "null", "bool", "__class__", "ModelMixin", "WanPipeline", "function", "enum"],
)
def test_odd_class_names_in_a_hub_config_are_typed_errors(fake_hub, wan_files, value):
    """A config's _class_name that is not a string, or names a non-model attribute of diffusers (a dunder, a base
    class, a pipeline, a function, an enum), must be a typed error naming the file, not TypeError/AttributeError
    from calling that attribute with the config's keys as keywords."""
    config = json.loads(wan_files["config.json"])
    config["_class_name"] = value
    fake_hub.add_commit("org/odd-class", dict(wan_files, **{"config.json": json.dumps(config).encode()}))
    with pytest.raises(FvTransformError, match="config.json|_class_name|architecture"):
        fvt.load_model("org/odd-class")


# ------------------------------------------------------------------ headers naming another commit or blob
def test_an_x_repo_commit_other_than_the_listed_commit_is_refused(fake_hub, wan_files):
    """The listing is of commit S, but config.json comes back with X-Repo-Commit: fff... (a valid hash).
    The file is linked into snapshots/fff..., and the download 'succeeds' with a snapshot that lacks config.json."""
    fake_hub.add_commit("org/tiny-wan", wan_files)
    fake_hub.faults[("org/tiny-wan", "config.json")] = ("commit", "f" * 40)
    try:
        folder = maybe_download_model("org/tiny-wan", timeout=30)
    except FvTransformError:
        folder = None
    if folder is not None:
        assert (folder / "config.json").is_file(), "download reported success but the snapshot lacks config.json"
    snapshots = _cache(fake_hub) / "models--org--tiny-wan" / "snapshots"
    assert not (snapshots / ("f" * 40)).exists(), "a response header created a snapshot of a commit never listed"


@pytest.mark.parametrize("lie", ["commit", "etag"])
def test_a_lying_header_cannot_delete_a_verified_file_of_another_snapshot(fake_hub, wan_files, lie):
    """Commit A is downloaded and verified (pinned). Later main moves to B with another config.json, and the
    server answers for B's config.json with X-Repo-Commit: A (or with the ETag of A's config blob). The client
    reuses A's cached file, fvtransform finds it does not match B's listing and 'removes the bad file': A's
    verified config (its snapshot link and the shared blob) is deleted, so the pinned offline load of A breaks."""
    from _fakehub import git_blob_sha1

    a = fake_hub.add_commit("org/tiny-wan", wan_files)
    snap_a = maybe_download_model("org/tiny-wan", revision=a, timeout=30)
    config = json.loads(wan_files["config.json"])
    config["num_layers"] = 1
    fake_hub.add_commit("org/tiny-wan", dict(wan_files, **{"config.json": json.dumps(config).encode()}))
    fake_hub.faults[("org/tiny-wan", "config.json")] = ("commit", a) if lie == "commit" else ("etag", git_blob_sha1(wan_files["config.json"]))
    header = "X-Repo-Commit header names commit" if lie == "commit" else "ETag header names blob"
    with pytest.raises(IntegrityError, match=rf"org/tiny-wan@main: config\.json: the hub's {header} [0-9a-f]{{40}}, but the "
                       r"repo listing .*; refused before anything was written or removed"):
        maybe_download_model("org/tiny-wan", timeout=30)
    assert (snap_a / "config.json").is_file(), "the verified config.json of pinned commit A was deleted"
    fake_hub.stop()
    assert maybe_download_model("org/tiny-wan", revision=a, local_files_only=True) == snap_a


# ------------------------------------------------------------------ a neighbour tampering with the cache
def test_a_blob_rewritten_in_place_with_its_mtime_restored_is_caught(fake_hub, wan_files):
    """The verification record is (size, inode, mtime): a process that rewrites a verified blob in place, same
    size, and puts its mtime back (rsync --inplace -t, a careless tool, bit rot repaired by hand) is trusted on
    the next load without hashing; ctime, which utime cannot set back, changed."""
    fake_hub.add_commit("org/tiny-wan", wan_files)
    folder = maybe_download_model("org/tiny-wan", timeout=30)
    blob = (folder / "diffusion_pytorch_model-00001-of-00003.safetensors").resolve()
    st = blob.stat()
    data = blob.read_bytes()
    with open(blob, "r+b") as f:  # same inode, same size, other bytes
        f.seek(len(data) - 1)
        f.write(bytes([data[-1] ^ 0xFF]))
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns))
    fake_hub.stop()
    with pytest.raises(IntegrityError, match="00001-of-00003"):
        maybe_download_model("org/tiny-wan", local_files_only=True)


# ------------------------------------------------------------------ pickles only with allow_pickle=True
def test_caller_patterns_do_not_fetch_pickles_without_allow_pickle(fake_hub, wan_files):
    """allow_patterns=['*'] keeps .bin/.pt/.ckpt/.pickle out, but fetches 'x.pkl' (the usual pickle suffix)
    without allow_pickle=True."""
    fake_hub.add_commit("org/x", dict(wan_files, **{"x.pkl": b"pickle bytes", "x.bin": b"pickle bytes"}))
    folder = maybe_download_model("org/x", allow_patterns=["*"], timeout=30)
    fetched = {p.rsplit("/", 1)[1] for m, p in fake_hub.requests if m == "GET" and "/resolve/" in p}
    assert "x.bin" not in fetched
    assert "x.pkl" not in fetched and not (folder / "x.pkl").exists(), "a pickle was downloaded without allow_pickle=True"


# ------------------------------------------------------------------ a pinned commit
def test_a_pinned_commit_is_not_swapped_for_another_by_the_server(fake_hub, wan_files):
    """revision=<40-hex A> 'pins the download'; a server (or a proxy that ignores the revision) that answers
    the revision call for A with commit B must not get B's snapshot returned: refused, naming both commits."""
    a = fake_hub.add_commit("org/tiny-wan", wan_files)
    config = json.loads(wan_files["config.json"])
    config["num_layers"] = 1
    b = fake_hub.add_commit("org/tiny-wan", dict(wan_files, **{"config.json": json.dumps(config).encode()}))
    repo = fake_hub.repos["org/tiny-wan"]
    del repo.commits[a]
    repo.refs[a] = b  # the server resolves 'a' to b
    with pytest.raises(IntegrityError, match=rf"asked for commit {a} \(a full hash pins the download\), but the hub "
                       rf"answered commit {b}; refused before any file was fetched"):
        maybe_download_model("org/tiny-wan", revision=a, timeout=30)
    assert not list(_cache(fake_hub).rglob("config.json")), "a snapshot of the other commit was written"


def test_a_lora_config_sent_to_another_commit_folder_is_not_silently_dropped(fake_hub, wan_files, tmp_path):
    """The server answers adapter_config.json with X-Repo-Commit: fff... . The config lands in snapshots/fff...,
    the weights' snapshot has none, and fvt.lora.load would succeed with the default alpha (= rank) instead of
    the repo's lora_alpha: the scale would change silently. Refused, naming the inconsistent commits."""
    model = diffusers.WanTransformer3DModel(**WAN_CONFIG).eval()
    tree = fvt.ParamTree.from_module(model)
    adapter = fvt.lora.random_adapter(tree, targets=["blocks.*.attn1.to_q.weight"], rank=2, seed=0)
    fvt.lora.save(adapter, tmp_path / "peft", format="peft")
    files = _files(tmp_path / "peft")
    config = json.loads(files["adapter_config.json"])
    config["lora_alpha"] = 8.0
    files["adapter_config.json"] = json.dumps(config).encode()
    fake_hub.add_commit("org/tiny-lora", files)
    fake_hub.faults[("org/tiny-lora", "adapter_config.json")] = ("commit", "f" * 40)
    with pytest.raises(IntegrityError, match=r"adapter_config\.json: the hub's X-Repo-Commit header names commit f{40}, "
                       r"but the repo listing is of [0-9a-f]{40}; refused before anything was written"):
        fvt.lora.load("org/tiny-lora", base=tree)
