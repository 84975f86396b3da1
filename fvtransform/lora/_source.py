"""Reading a LoRA source: a file, a folder (one weights file picked), a hub repo, or a mapping."""

from __future__ import annotations

from collections.abc import Mapping
import os
from pathlib import Path
from typing import Any

import torch

from fvtransform.errors import FormatError
from fvtransform.io._open import contained
from fvtransform.lora._format_table import PEFT_CONFIG


class SourcePart(dict[str, torch.Tensor]):
    """Some keys of a read LoRA source, with that source's header, config and labels (one expert's part)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], meta: dict[str, str], config: dict[str, Any] | None,
                 label: str, config_label: str) -> None:
        super().__init__(tensors)
        self.meta, self.config, self.label, self.config_label = meta, config, label, config_label


def read_source(source: Any, weight_name: str | None) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any] | None, str, str]:
    """Tensors, safetensors metadata, adapter_config.json (if any), a label for messages, and the config's label."""
    if isinstance(source, SourcePart):
        return dict(source), source.meta, source.config, source.label, source.config_label
    if isinstance(source, Mapping):
        return dict(source), {}, None, "<mapping>", ""
    path = Path(source)
    if not path.exists():
        from fvtransform.hub import maybe_download_lora

        path = maybe_download_lora(str(source), weight_name=weight_name)
    config_path: Path | None = None
    if path.is_dir():
        from fvtransform.io._files import file_entries
        from fvtransform.lora._pick import pick_lora_file

        name = pick_lora_file(file_entries(path), str(path), weight_name)  # a FIFO is picked, then refused when opened
        file = path / name if weight_name else contained(path, name, "LoRA file")  # weight_name: the user's choice
    else:
        file = path
    if os.path.lexists(file.parent / PEFT_CONFIG):  # a FIFO or dangling link is refused by the reader, not skipped
        config_path = contained(file.parent, PEFT_CONFIG, "LoRA config", file)
    from fvtransform.io._files import PICKLE_SUFFIXES
    from fvtransform.io._load import Checkpoint
    from fvtransform.io._files import WeightFiles

    if file.suffix in PICKLE_SUFFIXES:
        from fvtransform.errors import UnsafeFileError

        raise UnsafeFileError(f"{file}: pickle-based LoRA files can run code; convert it to safetensors")
    ckpt = Checkpoint(WeightFiles((file,)))
    tensors = {k: ckpt.tensor(k) for k in ckpt.keys()}
    config = None
    if config_path is not None:
        from fvtransform.io._model import read_json

        try:
            config = read_json(config_path)
        except ValueError as e:  # e.g. an integer of more digits than Python converts
            if isinstance(e, FormatError):
                raise
            raise FormatError(f"{config_path}: not valid JSON ({e})") from None
    return tensors, ckpt.metadata, config, str(file), str(config_path or "")
