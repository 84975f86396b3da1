"""Downloads through the real huggingface_hub client against a fake hub on 127.0.0.1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fvtransform as fvt
from fvtransform.errors import HubError, IntegrityError, NotFoundError, UnsafeFileError, UsageError
from fvtransform.hub import maybe_download_lora, maybe_download_model, resolved_commit

import diffusers  # the test extra installs it: a missing one is an error, not a skip

from test_oracles_models import WAN_CONFIG, wan_inputs  # noqa: E402


def _files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_wan(tmp_path_factory):
    """The files of a tiny diffusers Wan transformer (two shards + index), plus the module that made them."""
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**WAN_CONFIG).eval()
    folder = tmp_path_factory.mktemp("wan")
    model.save_pretrained(folder, max_shard_size="20KB")
    files = _files(folder)
    files["diffusion_pytorch_model.bin"] = b"pickle bytes that must not be fetched"
    files["model.onnx"] = b"onnx bytes that must never be fetched"
    return model, files


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory, tiny_wan):
    model, _ = tiny_wan
    tree = fvt.ParamTree.from_module(model)
    adapter = fvt.lora.random_adapter(tree, targets=["blocks.*.attn1.to_q.weight"], rank=2, seed=0)
    folder = tmp_path_factory.mktemp("lora")
    fvt.lora.save(adapter, folder / "peft", format="peft")
    return adapter, _files(folder / "peft")


def _pipeline(wan_files: dict[str, bytes]) -> dict[str, bytes]:
    index = {"_class_name": "WanPipeline", "_diffusers_version": "0.42.1", "transformer": ["diffusers", "WanTransformer3DModel"],
             "scheduler": ["diffusers", "UniPCMultistepScheduler"], "vae": [None, None]}
    files = {f"transformer/{k}": v for k, v in wan_files.items()}
    files["scheduler/scheduler_config.json"] = b"{}"
    files["model_index.json"] = json.dumps(index).encode()
    return files


def _fetched(hub) -> set[str]:
    return {p.split("/resolve/", 1)[1].split("/", 1)[1] for m, p in hub.requests if m == "GET" and "/resolve/" in p}


# ------------------------------------------------------------------------------------------ models
def test_model_repo_downloads_configs_and_safetensors_only(fake_hub, tiny_wan):
    sha = fake_hub.add_commit("org/tiny-wan", tiny_wan[1])
    folder = maybe_download_model("org/tiny-wan")
    names = {p.name for p in folder.iterdir()}
    assert "config.json" in names and "diffusion_pytorch_model.safetensors.index.json" in names
    assert not names & {"diffusion_pytorch_model.bin", "model.onnx"}
    assert _fetched(fake_hub).isdisjoint({"diffusion_pytorch_model.bin", "model.onnx"})
    assert resolved_commit(folder) == sha


def test_pickles_only_when_allowed_and_onnx_never(fake_hub, tiny_wan):
    fake_hub.add_commit("org/tiny-wan", tiny_wan[1])
    folder = maybe_download_model("org/tiny-wan", allow_pickle=True, allow_patterns=["*"])
    names = {p.name for p in folder.iterdir()}
    assert "diffusion_pytorch_model.bin" in names and "model.onnx" not in names


def test_load_model_by_repo_id_runs_like_diffusers(fake_hub, tiny_wan):
    model, files = tiny_wan
    fake_hub.add_commit("org/tiny-wan", files)
    module, tree = fvt.load_model("org/tiny-wan")
    with torch.no_grad():
        ours = fvt.call(module, tree, **wan_inputs())[0]
        theirs = model(**wan_inputs())[0]
    assert torch.equal(ours, theirs)


def test_pipeline_component_fetches_index_first_then_that_folder_only(fake_hub, tiny_wan):
    model, files = tiny_wan
    fake_hub.add_commit("org/tiny-pipe", _pipeline(files))
    module, tree = fvt.load_model("org/tiny-pipe", component="transformer")
    fetched = _fetched(fake_hub)
    assert "model_index.json" in fetched and not any(f.startswith("scheduler/") for f in fetched)
    first = next(p for m, p in fake_hub.requests if "/resolve/" in p)  # after the listing, the index comes first
    assert first.endswith("/model_index.json")
    with torch.no_grad():
        assert torch.equal(fvt.call(module, tree, **wan_inputs())[0], model(**wan_inputs())[0])


def test_pipeline_component_errors_list_the_components(fake_hub, tiny_wan):
    fake_hub.add_commit("org/tiny-pipe", _pipeline(tiny_wan[1]))
    with pytest.raises(NotFoundError, match=r"no component 'text_encoder'; components: \['scheduler', 'transformer'\]"):
        maybe_download_model("org/tiny-pipe", components=["text_encoder"])
    with pytest.raises(NotFoundError, match="'vae' is absent in this pipeline"):
        maybe_download_model("org/tiny-pipe", components=["vae"])
    assert not any("transformer/" in f for f in _fetched(fake_hub))


def test_subfolder_repo_id(fake_hub, tiny_wan):
    fake_hub.add_commit("org/tiny-pipe", _pipeline(tiny_wan[1]))
    folder = maybe_download_model("org/tiny-pipe/transformer")
    assert folder.name == "transformer" and (folder / "config.json").is_file()
    assert all(f.startswith("transformer/") for f in _fetched(fake_hub))


def test_pinned_commit_and_branch(fake_hub, tiny_wan):
    files = tiny_wan[1]
    old = fake_hub.add_commit("org/tiny-wan", files)
    changed = dict(files, **{"config.json": files["config.json"].replace(b'"num_layers": 2', b'"num_layers": 2 ')})
    new = fake_hub.add_commit("org/tiny-wan", changed)
    dev = fake_hub.add_commit("org/tiny-wan", files, ref="dev")
    assert old != new
    assert resolved_commit(maybe_download_model("org/tiny-wan", revision=old)) == old
    assert resolved_commit(maybe_download_model("org/tiny-wan")) == new
    assert resolved_commit(maybe_download_model("org/tiny-wan", revision="dev")) == dev


def test_offline_second_call_served_from_cache_without_network(fake_hub, tiny_wan, monkeypatch):
    import huggingface_hub.constants as hf_constants

    from fvtransform.hub import _verify

    fake_hub.add_commit("org/tiny-wan", tiny_wan[1])
    online = maybe_download_model("org/tiny-wan")
    fake_hub.stop()
    hashed: list[Path] = []
    real_hash = _verify._hash
    monkeypatch.setattr(_verify, "_hash", lambda p, *a: hashed.append(p) or real_hash(p, *a))
    assert maybe_download_model("org/tiny-wan", local_files_only=True) == online
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    assert maybe_download_model("org/tiny-wan") == online
    assert hashed == []  # verified once online, remembered in the cache
    with pytest.raises(NotFoundError, match="org/never-cached@main: not in the local cache and offline mode is on"):
        maybe_download_model("org/never-cached")


def test_local_folder_is_returned_as_is(tmp_path, fake_hub):
    assert maybe_download_model(tmp_path) == tmp_path
    assert fake_hub.requests == []


# ------------------------------------------------------------------------------------------ errors
def test_repo_revision_and_file_not_found(fake_hub, tiny_wan, tiny_lora):
    fake_hub.add_commit("org/tiny-wan", tiny_wan[1])
    fake_hub.add_commit("org/tiny-lora", tiny_lora[1])
    with pytest.raises(NotFoundError, match="org/missing@main: repository not found"):
        maybe_download_model("org/missing")
    with pytest.raises(NotFoundError, match="org/tiny-wan@nope: revision 'nope' not found"):
        maybe_download_model("org/tiny-wan", revision="nope")
    with pytest.raises(NotFoundError, match="org/tiny-lora@main: file not found"):
        maybe_download_lora("org/tiny-lora", weight_name="other.safetensors")


def test_gated_repo_needs_a_token(fake_hub, tiny_wan):
    fake_hub.add_commit("org/gated", tiny_wan[1], gated=True)
    with pytest.raises(HubError, match="org/gated@main: the repo is gated or needs authorization; pass token="):
        maybe_download_model("org/gated")
    assert (maybe_download_model("org/gated", token=fake_hub.token) / "config.json").is_file()


def test_connection_refused_suggests_offline_mode(fake_hub):
    fake_hub.stop()
    with pytest.raises(HubError, match=r"(?s)org/tiny-wan@main: the hub is unreachable.*HF_HUB_OFFLINE=1"):
        maybe_download_model("org/tiny-wan")


@pytest.mark.parametrize("fault", ["corrupt", "short"])
def test_bad_bytes_are_caught_named_and_removed(fake_hub, tiny_wan, fault):
    files = tiny_wan[1]
    shard = next(k for k in files if k.endswith("-of-00002.safetensors") or k.endswith(".safetensors"))
    fake_hub.add_commit("org/tiny-wan", files)
    fake_hub.faults[("org/tiny-wan", shard)] = fault
    said = {"corrupt": "the sha256 of the downloaded bytes is [0-9a-f]{64}, but the hub announced",
            "short": f"{len(files[shard]) // 2} bytes arrived, but the repo listing announced {len(files[shard])}"}[fault]
    with pytest.raises(IntegrityError, match=rf"{shard}: {said}"):
        maybe_download_model("org/tiny-wan")
    cache = Path(__import__("huggingface_hub").constants.HF_HUB_CACHE)
    assert not list(cache.rglob(shard))  # the bad file is gone: nothing later can load it
    del fake_hub.faults[("org/tiny-wan", shard)]
    folder = maybe_download_model("org/tiny-wan")  # a clean retry works
    assert (folder / shard).read_bytes() == files[shard]


def test_verify_false_skips_the_hash_check(fake_hub, tiny_wan):
    files = tiny_wan[1]
    shard = next(k for k in files if k.endswith(".safetensors"))
    fake_hub.add_commit("org/tiny-wan", files)
    fake_hub.faults[("org/tiny-wan", shard)] = "corrupt"
    folder = maybe_download_model("org/tiny-wan", verify=False)  # the caller's explicit choice
    assert (folder / shard).read_bytes() != files[shard]


def test_500_then_success_retries_with_backoff(fake_hub, tiny_lora):
    fake_hub.add_commit("org/tiny-lora", tiny_lora[1])
    fake_hub.faults[("org/tiny-lora", "adapter_model.safetensors")] = 2
    path = maybe_download_lora("org/tiny-lora")
    assert path.read_bytes() == tiny_lora[1]["adapter_model.safetensors"]
    assert fake_hub.sleeps[:2] == [1.0, 2.0]  # exponential back-off


def test_500_forever_is_a_clear_error_after_bounded_retries(fake_hub, tiny_lora):
    fake_hub.add_commit("org/tiny-lora", tiny_lora[1])
    fake_hub.faults[("org/tiny-lora", "adapter_model.safetensors")] = 10**6
    with pytest.raises(HubError, match="org/tiny-lora@main: HTTP error: Server error '500"):
        maybe_download_lora("org/tiny-lora")
    assert fake_hub.sleeps == [1.0, 2.0, 4.0]  # bounded: four attempts, then the error


@pytest.mark.parametrize(
    "name", ["org/../x", "org/repo/../../x", "org/re*po", "org/repo/sub/*.json", "org//x", "org/./x"]
)
def test_path_segments_that_try_to_escape_are_refused_before_any_request(fake_hub, name):
    with pytest.raises(UnsafeFileError, match="not allowed"):
        maybe_download_model(name)
    with pytest.raises(UnsafeFileError, match="not allowed"):
        maybe_download_model("org/repo", components=["../vae"])
    with pytest.raises(UnsafeFileError, match="not allowed"):
        maybe_download_lora("org/repo", weight_name="../x.safetensors")
    assert fake_hub.requests == []


# ------------------------------------------------------------------------------------------ LoRA
def test_lora_repo_with_one_candidate_downloads_only_it_and_its_config(fake_hub, tiny_lora, tiny_wan):
    adapter, files = tiny_lora
    fake_hub.add_commit("org/tiny-lora", dict(files, **{"README.md": b"# card", "extra/big.safetensors": b"x" * 10}))
    path = maybe_download_lora("org/tiny-lora")
    assert path.name == "adapter_model.safetensors"
    assert _fetched(fake_hub) == {"adapter_model.safetensors", "adapter_config.json"}
    base = fvt.ParamTree.from_module(tiny_wan[0])
    loaded = fvt.lora.load("org/tiny-lora", base=base)
    assert set(loaded) == set(adapter)
    for k in adapter:
        assert torch.equal(loaded[k].A, adapter[k].A) and torch.equal(loaded[k].B, adapter[k].B)


def test_lora_repo_with_several_or_no_candidates(fake_hub, tiny_lora):
    data = tiny_lora[1]["adapter_model.safetensors"]
    fake_hub.add_commit("org/several", {"a.safetensors": data, "b.safetensors": data})
    fake_hub.add_commit("org/none", {"README.md": b"# nothing here"})
    with pytest.raises(UsageError, match=r"several LoRA candidates \['a.safetensors', 'b.safetensors'\]; pass weight_name="):
        maybe_download_lora("org/several")
    assert maybe_download_lora("org/several", weight_name="b.safetensors").name == "b.safetensors"
    with pytest.raises(NotFoundError, match=r"org/none: no LoRA weights \(\*.safetensors\) found"):
        maybe_download_lora("org/none")


def test_the_hub_and_lora_load_pick_the_same_lora_file_in_diffusers_order(fake_hub, tiny_lora, tiny_wan, tmp_path):
    from diffusers.loaders.lora_base import _best_guess_weight_name

    base = fvt.ParamTree.from_module(tiny_wan[0])
    other = fvt.lora.random_adapter(base, targets=["blocks.*.attn1.to_k.weight"], rank=2, seed=1)
    diffusers_file = fvt.lora.save(other, tmp_path / "d", format="diffusers").read_bytes()
    files = {"adapter_model.safetensors": tiny_lora[1]["adapter_model.safetensors"],
             "pytorch_lora_weights.safetensors": diffusers_file, "optimizer.safetensors": diffusers_file}
    folder = tmp_path / "both"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    assert _best_guess_weight_name(str(folder)) == "pytorch_lora_weights.safetensors"  # the oracle
    fake_hub.add_commit("org/both", files)
    assert maybe_download_lora("org/both").name == "pytorch_lora_weights.safetensors"
    assert maybe_download_lora(folder).name == "pytorch_lora_weights.safetensors"
    assert set(fvt.lora.load(folder, base=base)) == set(other)  # not adapter_model.safetensors' to_q targets
    assert set(fvt.lora.load("org/both", base=base)) == set(other)
    (folder / "pytorch_lora_weights.safetensors").unlink()  # then PEFT's name, never the optimizer file
    assert maybe_download_lora(folder).name == "adapter_model.safetensors"
    assert set(fvt.lora.load(folder, base=base)) == set(tiny_lora[0])
    (folder / "adapter_model.safetensors").unlink()
    (folder / "a.safetensors").write_bytes(diffusers_file)
    (folder / "b.safetensors").write_bytes(diffusers_file)
    for entry in (maybe_download_lora, fvt.lora.load):
        with pytest.raises(UsageError, match=r"several LoRA candidates \['a.safetensors', 'b.safetensors'\]; pass weight_name="):
            entry(folder)
    with pytest.raises(NotFoundError, match=r"no file 'c.safetensors'; files: .*pass one of them as weight_name="):
        fvt.lora.load(folder, weight_name="c.safetensors")


def test_lora_offline_from_cache(fake_hub, tiny_lora, monkeypatch):
    import huggingface_hub.constants as hf_constants

    fake_hub.add_commit("org/tiny-lora", tiny_lora[1])
    fake_hub.add_commit("org/single", {"my_lora.safetensors": tiny_lora[1]["adapter_model.safetensors"]})
    online = maybe_download_lora("org/tiny-lora")
    online_single = maybe_download_lora("org/single")
    fake_hub.stop()
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    assert maybe_download_lora("org/tiny-lora") == online
    assert maybe_download_lora("org/single") == online_single
    assert maybe_download_lora("org/tiny-lora", weight_name="adapter_model.safetensors") == online


def test_connection_dropped_mid_file_leaves_nothing_loadable(fake_hub, tiny_lora):
    fake_hub.add_commit("org/tiny-lora", tiny_lora[1])
    fake_hub.faults[("org/tiny-lora", "adapter_model.safetensors")] = "drop"
    with pytest.raises(HubError, match="org/tiny-lora@main"):
        maybe_download_lora("org/tiny-lora")
    cache = Path(__import__("huggingface_hub").constants.HF_HUB_CACHE)
    assert not [p for p in cache.rglob("adapter_model.safetensors") if p.exists()]
    del fake_hub.faults[("org/tiny-lora", "adapter_model.safetensors")]
    assert maybe_download_lora("org/tiny-lora").read_bytes() == tiny_lora[1]["adapter_model.safetensors"]


def test_a_file_changed_in_the_cache_after_verification_is_caught(fake_hub, tiny_lora):
    fake_hub.add_commit("org/tiny-lora", tiny_lora[1])
    path = maybe_download_lora("org/tiny-lora")
    blob = path.resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))  # new mtime: the remembered verification no longer applies
    fake_hub.stop()
    with pytest.raises(IntegrityError, match="adapter_model.safetensors: the sha256 of the downloaded bytes"):
        maybe_download_lora("org/tiny-lora", local_files_only=True)


def test_files_outside_the_cache_layout_cannot_be_verified(tmp_path):
    from fvtransform.hub._verify import verify_file

    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(IntegrityError, match="cannot be verified: it is not a link to a hash-named blob.*verify=False"):
        verify_file(f, label="org/x@main")


# ------------------------------------------------------------------------------------------ issue 13: security
def _tamper_config(text: bytes) -> bytes:
    """The same bytes but for ``lora_alpha``'s first digit (8 -> 9, as in the issue): same length, other scale."""
    import re

    out = re.sub(rb'("lora_alpha": )(\d)', lambda m: m[1] + str((int(m[2]) + 1) % 10).encode(), text, count=1)
    assert len(out) == len(text) and out != text
    return out


def _cache(fake_hub) -> Path:
    return Path(__import__("huggingface_hub").constants.HF_HUB_CACHE)


def test_tampered_adapter_config_is_caught_named_and_removed(fake_hub, tiny_lora, tiny_wan):
    adapter, files = tiny_lora
    fake_hub.add_commit("org/tiny-lora", files)
    fake_hub.faults[("org/tiny-lora", "adapter_config.json")] = ("tamper", _tamper_config(files["adapter_config.json"]))
    with pytest.raises(IntegrityError, match=r"adapter_config.json: the git-sha1 of the downloaded bytes is [0-9a-f]{40}, but the hub announced"):
        maybe_download_lora("org/tiny-lora")
    assert not [p for p in _cache(fake_hub).rglob("adapter_config.json") if p.exists()]  # nothing later can read it
    base = fvt.ParamTree.from_module(tiny_wan[0])
    with pytest.raises(IntegrityError, match="adapter_config.json"):
        fvt.lora.load("org/tiny-lora", base=base)  # the loader never sees the tampered scale
    del fake_hub.faults[("org/tiny-lora", "adapter_config.json")]
    loaded = fvt.lora.load("org/tiny-lora", base=base)
    k = next(iter(adapter))
    assert loaded[k].alpha == adapter[k].alpha


def test_tampered_model_config_is_caught_and_the_verification_is_remembered(fake_hub, tiny_wan, monkeypatch):
    from fvtransform.hub import _verify

    files = tiny_wan[1]
    fake_hub.add_commit("org/tiny-wan", files)
    bad = files["config.json"].replace(b'"num_layers": 2', b'"num_layers": 9')
    assert bad != files["config.json"]
    fake_hub.faults[("org/tiny-wan", "config.json")] = ("tamper", bad)
    with pytest.raises(IntegrityError, match=r"config.json: the git-sha1 of the downloaded bytes is [0-9a-f]{40}, but the hub announced"):
        maybe_download_model("org/tiny-wan")
    del fake_hub.faults[("org/tiny-wan", "config.json")]
    folder = maybe_download_model("org/tiny-wan")
    assert (folder / "config.json").read_bytes() == files["config.json"]
    hashed: list[Path] = []
    real_hash = _verify._hash
    monkeypatch.setattr(_verify, "_hash", lambda p, *a: hashed.append(p) or real_hash(p, *a))
    assert maybe_download_model("org/tiny-wan", local_files_only=True) == folder
    assert hashed == []  # configs too: verified once, remembered in the cache


def _fast_fail(fn, timeout_s: float) -> float:
    import time

    t0 = time.monotonic()
    with pytest.raises(HubError, match=rf"did not finish within its deadline of {timeout_s:g} s \(timeout=, or FVT_HUB_TIMEOUT\)"):
        fn()
    return time.monotonic() - t0


@pytest.mark.parametrize("fault", ["drip", "stall", "endless_headers"])
@pytest.mark.parametrize("which", ["config.json", "weights"])
def test_a_slow_server_ends_in_a_timeout_error_within_the_deadline(fake_hub, tiny_wan, fault, which):
    files = tiny_wan[1]
    name = which if which != "weights" else next(k for k in files if k.endswith(".safetensors"))
    fake_hub.add_commit("org/tiny-wan", files)
    fake_hub.faults[("org/tiny-wan", name)] = fault
    took = _fast_fail(lambda: maybe_download_model("org/tiny-wan", timeout=0.8), 0.8)
    assert took < 0.8 + 1.5  # the worker noticed at the deadline; the caller did not wait out the grace period
    assert not list(_cache(fake_hub).rglob("*.incomplete"))  # its partial files were removed


@pytest.mark.parametrize("fault", ["stall", "endless_headers"])
def test_a_slow_repo_listing_ends_in_a_timeout_error(fake_hub, tiny_lora, fault):
    fake_hub.add_commit("org/tiny-lora", tiny_lora[1])
    fake_hub.faults[("org/tiny-lora", "/api")] = fault
    assert _fast_fail(lambda: maybe_download_lora("org/tiny-lora", timeout=0.8), 0.8) < 2.3


def test_an_endless_repo_listing_is_cut_off(fake_hub, tiny_lora, monkeypatch):
    from fvtransform.hub import _snapshot

    monkeypatch.setattr(_snapshot, "MAX_LISTING_BYTES", 1 << 20)
    fake_hub.add_commit("org/tiny-lora", tiny_lora[1])
    fake_hub.faults[("org/tiny-lora", "/api")] = "endless"
    with pytest.raises(IntegrityError, match=r"org/tiny-lora@main: the repo listing: the server sent more bytes than announced or allowed"):
        maybe_download_lora("org/tiny-lora", timeout=30)


def test_a_pipeline_component_download_has_the_same_deadline(fake_hub, tiny_wan):
    fake_hub.add_commit("org/tiny-pipe", _pipeline(tiny_wan[1]))
    fake_hub.faults[("org/tiny-pipe", "transformer/config.json")] = "drip"
    assert _fast_fail(lambda: maybe_download_model("org/tiny-pipe", components=["transformer"], timeout=0.8), 0.8) < 2.3


def test_a_worker_stuck_outside_the_network_is_abandoned_at_the_deadline(fake_hub, tiny_lora, monkeypatch):
    import threading
    import time

    from fvtransform.hub import _guard, _snapshot

    release = threading.Event()
    monkeypatch.setattr(_guard, "GRACE_S", 0.2)
    monkeypatch.setattr(_snapshot, "list_repo", lambda *a: release.wait(10))  # blocked where no socket can end it
    t0 = time.monotonic()
    with pytest.raises(HubError, match=r"deadline of 0.3 s .* it was abandoned and removes its partial files when it ends"):
        maybe_download_lora("org/tiny-lora", timeout=0.3)
    assert time.monotonic() - t0 < 1.5
    release.set()


def test_the_deadline_comes_from_the_environment_for_loras_and_load(fake_hub, tiny_lora, monkeypatch):
    fake_hub.add_commit("org/tiny-lora", tiny_lora[1])
    fake_hub.faults[("org/tiny-lora", "adapter_model.safetensors")] = "drip"
    monkeypatch.setenv("FVT_HUB_TIMEOUT", "0.5")
    assert _fast_fail(lambda: maybe_download_lora("org/tiny-lora"), 0.5) < 2.0
    assert _fast_fail(lambda: fvt.lora.load("org/tiny-lora"), 0.5) < 2.0
    monkeypatch.setenv("FVT_HUB_TIMEOUT", "soon")
    with pytest.raises(UsageError, match=r"FVT_HUB_TIMEOUT='soon' is not a number of seconds"):
        maybe_download_lora("org/tiny-lora")
    with pytest.raises(UsageError, match=r"download timeout -1 must be a positive"):
        maybe_download_lora("org/tiny-lora", timeout=-1)


@pytest.mark.parametrize("which", ["config.json", "weights"])
def test_an_endless_body_is_cut_off_at_the_announced_size(fake_hub, tiny_wan, which):
    files = tiny_wan[1]
    name = which if which != "weights" else next(k for k in files if k.endswith(".safetensors"))
    fake_hub.add_commit("org/tiny-wan", files)
    fake_hub.faults[("org/tiny-wan", name)] = "endless"
    with pytest.raises(IntegrityError, match=rf"{name} \(announced {len(files[name])} bytes\): the server sent more bytes than announced or allowed"):
        maybe_download_model("org/tiny-wan", timeout=30)
    assert not list(_cache(fake_hub).rglob("*.incomplete"))


@pytest.mark.parametrize(("layers", "said"), [(1, "compressed body decodes to more than"), (2, "stacks content encodings")])
def test_a_compressed_body_may_not_decode_past_the_announced_size(fake_hub, tiny_wan, layers, said):
    files = tiny_wan[1]
    fake_hub.add_commit("org/tiny-wan", files)
    fake_hub.faults[("org/tiny-wan", "config.json")] = ("gzip", layers, 24 * 2**20)
    with pytest.raises(IntegrityError, match=rf"config.json \(announced {len(files['config.json'])} bytes\): the server('s)? {said}"):
        maybe_download_model("org/tiny-wan", timeout=30)
    assert not [p for p in _cache(fake_hub).rglob("*") if p.is_file() and p.stat().st_size > 2**20]  # no bomb on disk


def _entry(path: str, data: bytes = b"{}") -> dict[str, object]:
    from _fakehub import git_blob_sha1

    return {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}


@pytest.mark.parametrize(
    ("path", "said"),
    [
        ("../../../escaped.json", r"segment '\.\.'"),
        ("sub/../../escaped.json", r"segment '\.\.'"),
        ("/tmp/escaped.json", "is absolute"),
        ("a\x00b.json", r"segment 'a\\x00b.json'"),
        ("a\\..\\..\\escaped.json", "segment"),
        ("x" * 300 + ".json", "a segment longer than 255 bytes"),
        ("a/" * 600 + "b.json", "longer than 1024 characters"),
    ],
)
def test_hostile_names_in_the_repo_listing_are_refused_before_any_file(fake_hub, tiny_wan, tiny_lora, tmp_path, path, said):
    fake_hub.add_commit("org/tiny-wan", tiny_wan[1])
    fake_hub.add_commit("org/tiny-lora", tiny_lora[1])
    fake_hub.listing_extra = [_entry(path)]
    with pytest.raises(UnsafeFileError, match=rf"org/tiny-wan@main: tree listing: repo path .* {said}"):
        maybe_download_model("org/tiny-wan", allow_patterns=["*"])
    with pytest.raises(UnsafeFileError, match=rf"org/tiny-lora@main: tree listing: repo path .* {said}"):
        maybe_download_lora("org/tiny-lora")
    assert not _fetched(fake_hub)  # refused before any file was fetched
    assert not [p for p in tmp_path.rglob("*escaped*")]


def test_a_listing_of_tens_of_thousands_of_files_is_refused(fake_hub, tiny_lora):
    from fvtransform.hub import _snapshot

    fake_hub.add_commit("org/tiny-lora", tiny_lora[1])
    fake_hub.listing_extra = [_entry(f"junk/{i}.json") for i in range(_snapshot.MAX_REPO_FILES)]
    with pytest.raises(HubError, match=r"org/tiny-lora@main: the repo lists more than 10000 files; refused"):
        maybe_download_lora("org/tiny-lora")
    assert not _fetched(fake_hub)


@pytest.mark.parametrize("key", ["../../x", "a/b", "..", "a\x00"])
def test_a_model_index_naming_a_component_outside_the_repo_is_refused(fake_hub, tiny_wan, key):
    files = _pipeline(tiny_wan[1])
    index = json.loads(files["model_index.json"])
    index[key] = ["diffusers", "WanTransformer3DModel"]
    files["model_index.json"] = json.dumps(index).encode()
    fake_hub.add_commit("org/tiny-pipe", files)
    with pytest.raises(UnsafeFileError, match=r"org/tiny-pipe@[0-9a-f]{40}: model_index.json (names )?component"):
        maybe_download_model("org/tiny-pipe", components=["transformer"])
    assert _fetched(fake_hub) == {"model_index.json"}


@pytest.mark.parametrize("header", ["etag", "commit"])
def test_hub_headers_that_would_become_cache_paths_must_be_hashes(fake_hub, tiny_wan, tmp_path, header):
    files = tiny_wan[1]
    fake_hub.add_commit("org/tiny-wan", files)
    fake_hub.faults[("org/tiny-wan", "config.json")] = (header, "../../../../escaped")
    with pytest.raises(UnsafeFileError, match=r"org/tiny-wan@main: the hub's (ETag|X-Repo-Commit) header '.*escaped.*' is not a"):
        maybe_download_model("org/tiny-wan")
    assert not [p for p in tmp_path.rglob("*escaped*")]  # nothing written outside (or inside) the cache for it


def test_a_config_announced_over_its_cap_is_refused_before_download(fake_hub, tiny_wan):
    fake_hub.add_commit("org/tiny-wan", tiny_wan[1])
    fake_hub.listing_size["config.json"] = 16 * 1024 * 1024 + 1
    with pytest.raises(HubError, match=r"config.json is announced as 16777217 bytes, more than the 16777216-byte cap"):
        maybe_download_model("org/tiny-wan")
    assert not _fetched(fake_hub)


def test_weights_whose_announced_size_differs_from_what_arrives_are_refused(fake_hub, tiny_wan):
    files = tiny_wan[1]
    shard = next(k for k in files if k.endswith(".safetensors"))
    fake_hub.add_commit("org/tiny-wan", files)
    fake_hub.listing_size[shard] = len(files[shard]) - 8
    with pytest.raises(IntegrityError, match=rf"{shard}: {len(files[shard])} bytes arrived, but the repo listing announced {len(files[shard]) - 8}"):
        maybe_download_model("org/tiny-wan")
    assert not [p for p in _cache(fake_hub).rglob(shard) if p.exists()]


@pytest.mark.parametrize(
    ("entry", "said"),
    [
        (dict(_entry("junk.json"), size=-1), r"tree listing entry 'junk.json': size -1 is not a non-negative integer"),
        (dict(_entry("junk.json"), size="12"), r"tree listing entry 'junk.json': size '12' is not a non-negative integer"),
        (dict(_entry("junk.json"), oid="../../x"), r"tree listing entry 'junk.json': blob id '../../x' is not a 40-hex git sha1"),
        (dict(_entry("junk.safetensors"), lfs={"oid": "nope", "size": 2, "pointerSize": 1}), r"tree listing entry 'junk.safetensors': LFS sha256 'nope' is not 64 hex"),
        (_entry("config.json"), r"tree listing entry 'config.json': listed twice"),
    ],
)
def test_listing_entries_with_bad_sizes_hashes_or_duplicates_are_refused(fake_hub, tiny_wan, entry, said):
    fake_hub.add_commit("org/tiny-wan", tiny_wan[1])
    fake_hub.listing_extra = [entry]
    with pytest.raises(HubError, match=rf"org/tiny-wan@main: {said}"):
        maybe_download_model("org/tiny-wan", allow_patterns=["*"])
    assert not _fetched(fake_hub)


# ------------------------------------------------------------------------------------------ headers vs listing (issue 13)
@pytest.mark.parametrize("lie", ["commit", "etag"])
def test_headers_that_disagree_with_the_listing_are_refused_before_anything_is_written(fake_hub, tiny_lora, tmp_path, lie):
    """A valid-looking X-Repo-Commit or ETag other than the listing's is refused on the HEAD answer: no GET, no blob, no link."""
    files = tiny_lora[1]
    commit = fake_hub.add_commit("org/tiny-lora", files)
    fake_hub.faults[("org/tiny-lora", "adapter_config.json")] = ("commit", "f" * 40) if lie == "commit" else ("etag", "e" * 40)
    header, named = ("X-Repo-Commit", "commit f{40}") if lie == "commit" else ("ETag", "blob e{40}")
    with pytest.raises(IntegrityError, match=rf"org/tiny-lora@main: adapter_config\.json: the hub's {header} header names "
                                             rf"{named}, but the repo listing (is of {commit}|says [0-9a-f]{{40}}); refused before anything"):
        maybe_download_lora("org/tiny-lora")
    assert ("GET", f"/org/tiny-lora/resolve/{commit}/adapter_config.json") not in fake_hub.requests
    storage = tmp_path / "hf-cache" / "models--org--tiny-lora"
    assert not (storage / "snapshots" / ("f" * 40)).exists()
    assert not (storage / "blobs" / ("e" * 40)).exists()
    assert not (storage / "snapshots" / commit / "adapter_config.json").exists()


def test_a_blob_named_other_than_the_listing_says_is_refused_and_left_alone(tmp_path):
    """The blob may be another snapshot's verified file: refusing it must not delete it (nor its link)."""
    data = b'{"r": 4}'
    blob = tmp_path / "blobs" / ("a" * 40)
    blob.parent.mkdir()
    blob.write_bytes(data)
    link = tmp_path / "snapshots" / ("c" * 40) / "config.json"
    link.parent.mkdir(parents=True)
    link.symlink_to(f"../../blobs/{'a' * 40}")
    from fvtransform.hub._verify import verify_file

    with pytest.raises(IntegrityError, match=r"config\.json: the hub announced hash a{40} .* listing says b{40}; refused, nothing removed"):
        verify_file(link, label="org/m@main", expected=("b" * 40, len(data)))
    assert blob.read_bytes() == data and link.is_symlink()


@pytest.mark.parametrize("upper", [False, True])
def test_a_full_commit_hash_pins_even_when_the_server_answers_another(fake_hub, tiny_lora, upper):
    files = tiny_lora[1]
    a = fake_hub.add_commit("org/tiny-lora", files)
    b = fake_hub.add_commit("org/tiny-lora", dict(files, **{"README.md": b"moved on"}))
    repo = fake_hub.repos["org/tiny-lora"]
    del repo.commits[a]
    asked = a.upper() if upper else a
    repo.refs[asked] = b  # a proxy that ignores the revision
    with pytest.raises(IntegrityError, match=rf"org/tiny-lora@{asked}: asked for commit {asked} \(a full hash pins the download\), "
                                             rf"but the hub answered commit {b}; refused before any file was fetched"):
        maybe_download_lora("org/tiny-lora", revision=asked)
    assert not [p for _, p in fake_hub.requests if "/resolve/" in p]


def test_pickles_and_code_are_never_fetched_whatever_the_patterns(fake_hub, tiny_wan):
    """allow_patterns=['*'] fetches no pickle (any suffix, any case) without allow_pickle, and never code."""
    pickles = ["x.pkl", "X.PKL", "sub/y.pickle", "z.joblib", "arr.npy", "arr.npz", "w.pt", "w.PTH", "m.ckpt", "a.dat", "w.pth.tar"]
    code = ["pipeline.py", "sub/helper.pyc", "ext.so", "libx.so.1", "x.dll", "run.sh", "m.gguf", "model.onnx"]
    files = dict(tiny_wan[1], **{n: n.encode() for n in pickles + code})  # distinct blobs: each one a GET
    fake_hub.add_commit("org/x", files)
    maybe_download_model("org/x", allow_patterns=["*"])
    assert _fetched(fake_hub).isdisjoint(pickles + code)
    fake_hub.requests.clear()
    maybe_download_model("org/x", allow_patterns=["*"], allow_pickle=True)
    fetched = _fetched(fake_hub)
    assert set(pickles) <= fetched | {"diffusion_pytorch_model.bin"} and fetched.isdisjoint(code)


@pytest.mark.parametrize("timeout", ["2", True, [1]])
def test_a_timeout_that_is_not_a_number_is_a_typed_error_before_any_request(fake_hub, timeout):
    with pytest.raises(UsageError, match=r"download timeout=.* is not a number of seconds; pass e\.g\. timeout=3600"):
        maybe_download_model("org/tiny-wan", timeout=timeout)
    with pytest.raises(UsageError, match="is not a number of seconds"):
        maybe_download_lora("org/tiny-lora", timeout=timeout)
    assert fake_hub.requests == []


@pytest.mark.parametrize("revision", ["..", "../../x", "main/../..", "a//b", "/abs", "x\x00y", "a\\b", ""])
def test_revisions_that_could_escape_the_cache_are_refused_before_any_request(fake_hub, tiny_lora, revision):
    fake_hub.add_commit("org/tiny-lora", tiny_lora[1])
    for call in (lambda: maybe_download_model("org/tiny-lora", revision=revision),
                 lambda: maybe_download_lora("org/tiny-lora", revision=revision),
                 lambda: maybe_download_lora("org/tiny-lora", revision=revision, local_files_only=True)):
        with pytest.raises(UnsafeFileError, match=r"revision .* is not allowed.*nothing was requested"):
            call()
    assert fake_hub.requests == []
