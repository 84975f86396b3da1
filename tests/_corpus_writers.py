"""Corpus cases for writers: destinations a writer must refuse, with the old data left as it was.

Each case's path is the destination; the action tries to write there and must raise before touching anything.
"""

from __future__ import annotations

import os
from pathlib import Path
import socket
from typing import Any

import torch

import fvtransform as fvt
from fvtransform import errors as E

from _corpus import Case

_TREE = {"a": torch.ones(4), "b.weight": torch.zeros(4, 3)}


def _save(p: Path) -> Any:
    return fvt.save(fvt.ParamTree(_TREE), p)


def _save_sharded(p: Path) -> Any:
    return fvt.save(fvt.ParamTree(_TREE), p, max_shard_size="40B")


def _adapter() -> fvt.lora.LoraAdapter:
    return fvt.lora.random_adapter(fvt.ParamTree(_TREE), targets="*.weight", rank=1)


def _merge_into(base: Path) -> Any:
    adapter = fvt.lora.random_adapter(fvt.load(base), targets="*.weight", rank=1)
    return lambda p: fvt.lora.merge_checkpoint(base, adapter, p)


def cases(root: Path) -> list[Case]:
    out: list[Case] = []
    target = root / "target.safetensors"
    fvt.save(fvt.ParamTree(_TREE), target)

    p = root / "dest_fifo.safetensors"
    os.mkfifo(p)
    out.append(Case("save onto a FIFO", p, E.UnsafeFileError, r"dest_fifo.safetensors: the destination is a FIFO", _save))
    out.append(Case("sharded save onto a FIFO", p, E.UnsafeFileError, r"dest_fifo.safetensors: the destination is a FIFO", _save_sharded))
    out.append(Case("PEFT LoRA save onto a FIFO", p, E.UnsafeFileError, r"dest_fifo.safetensors: the destination is a FIFO",
                    lambda q: fvt.lora.save(_adapter(), q)))

    p = root / "dest_link.safetensors"
    p.symlink_to(target)
    out.append(Case("save onto a symlink", p, E.UnsafeFileError, r"dest_link.safetensors: the destination is a symbolic link", _save))
    out.append(Case("kohya LoRA save onto a symlink", p, E.UnsafeFileError, r"dest_link.safetensors: the destination is a symbolic link",
                    lambda q: fvt.lora.save(_adapter(), q, format="kohya")))

    p = root / "dest_sock.safetensors"
    with socket.socket(socket.AF_UNIX) as s:  # the bound socket file stays on disk after the socket closes
        s.bind(str(p))
    out.append(Case("save onto a socket", p, E.UnsafeFileError, r"dest_sock.safetensors: the destination is a socket", _save))

    p = root / "dest_is_file"
    _save(p)
    out.append(Case("sharded save onto a file", p, E.WriteError, r"dest_is_file is a file", _save_sharded))
    out.append(Case("PEFT LoRA save onto a file", p, E.WriteError, r"dest_is_file is a file", lambda q: fvt.lora.save(_adapter(), q)))

    p = root / "parent_is_file"
    p.write_bytes(b"x")
    out.append(Case("save below a file", p, E.WriteError, r"parent_is_file/m.safetensors: writing failed",
                    lambda q: _save(q / "m.safetensors")))

    p = root / "locked_by_link.safetensors"
    os.symlink(target, root / ".locked_by_link.safetensors.fvt-lock")
    out.append(Case("a lock file that is a symlink", p, E.UnsafeFileError, r"locked_by_link.safetensors.fvt-lock: the lock file of .* is a symbolic link", _save))

    p = root / "locked_by_fifo.safetensors"
    os.mkfifo(root / ".locked_by_fifo.safetensors.fvt-lock")
    out.append(Case("a lock file that is a FIFO", p, E.UnsafeFileError, r"locked_by_fifo.safetensors.fvt-lock: the lock file of .* is a FIFO", _save))

    # merge outputs
    base = root / "models" / "base"
    _save_sharded(base)
    out.append(Case("merge into the folder that holds the base", root / "models", E.UsageError,
                    r"models: the output must differ from the base checkpoint and the other inputs and must not contain them", _merge_into(base)))
    out.append(Case("merge onto the base itself", base, E.UsageError, r"base: the output must differ from the base", _merge_into(base)))
    p = root / "foreign_out"
    p.mkdir()
    (p / "holiday.jpg").write_bytes(b"\xff\xd8")
    out.append(Case("merge into a folder it did not write", p, E.WriteError,
                    r"foreign_out: the folder is not empty \(\['holiday.jpg'\]\) and is not a previous merge output", _merge_into(base)))
    p = root / "foreign_file.safetensors"
    _save(p)
    out.append(Case("merge onto a file it did not write", p, E.WriteError, r"foreign_file.safetensors: exists and is not a previous merge output",
                    _merge_into(target)))
    p = root / "merge_fifo"
    os.mkfifo(p)
    out.append(Case("merge onto a FIFO", p, E.UnsafeFileError, r"merge_fifo: the destination is a FIFO", _merge_into(base)))
    p = root / "merge_file_fifo.safetensors"
    os.mkfifo(p)
    out.append(Case("merge of a lone file onto a FIFO", p, E.UnsafeFileError, r"merge_file_fifo.safetensors: the destination is a FIFO",
                    _merge_into(target)))
    p = root / "prev_out_fifo"
    p.mkdir()
    os.mkfifo(p / "model.safetensors.index.json")
    out.append(Case("an output folder whose 'index' is a FIFO (never opened)", p, E.WriteError,
                    r"prev_out_fifo: the folder is not empty \(\['model.safetensors.index.json'\]\)", _merge_into(base)))

    # issue 13 follow-up: a folder where a file goes, names that escape, records that lie, untyped errors
    p = root / "dir_where_shard_goes"
    (p / "model-00002-of-00002.safetensors" / "deep").mkdir(parents=True)
    out.append(Case("sharded save where a shard name is a user folder", p, E.WriteError,
                    r"dir_where_shard_goes/model-00002-of-00002.safetensors is a folder where this sharded save writes a file",
                    lambda q: fvt.save(fvt.ParamTree(_TREE), q, max_shard_size="50B")))
    p = root / "dir_where_config_goes"
    (p / "adapter_config.json").mkdir(parents=True)
    out.append(Case("PEFT save where adapter_config.json is a user folder", p, E.WriteError,
                    r"dir_where_config_goes/adapter_config.json is a folder where this PEFT LoRA folder writes a file",
                    lambda q: fvt.lora.save(_adapter(), q)))
    p = root / "escaping_weights_name"
    out.append(Case("a weights_name that leaves the folder", p, E.UsageError, r"weights_name '../esc' is not a plain file-name stem",
                    lambda q: fvt.save(fvt.ParamTree(_TREE), q, max_shard_size="40B", weights_name="../esc")))
    p = root / "foreign_kohya.safetensors"
    _save(p)
    out.append(Case("a LoRA save onto a file fvtransform did not write", p, E.WriteError,
                    r"foreign_kohya.safetensors: exists and was not written by fvtransform", lambda q: fvt.lora.save(_adapter(), q, format="kohya")))
    p = root / "sparse.safetensors"
    out.append(Case("a sparse tensor", p, E.UsageError, r"'s': a torch.sparse_coo tensor cannot be saved",
                    lambda q: fvt.save({"s": torch.eye(2).to_sparse()}, q)))
    out.append(Case("a merge output inside the base folder", base / "sub", E.UsageError,
                    r"base/sub: the output must differ .* lie inside an input folder", _merge_into(base)))
    return out
