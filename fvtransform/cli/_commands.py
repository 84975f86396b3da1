"""The file-to-file commands: merge, convert-lora, extract-lora (thin over the library)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from fvtransform.errors import UsageError

if TYPE_CHECKING:  # torch is imported by the commands that need it, never by `fvtransform --help`
    import torch

__all__ = ["merge_command", "convert_command", "extract_command", "parse_lora_arg", "parse_dtype", "progress_bar",
           "printable", "one_line"]


def _escape(ch: str) -> str:
    o = ord(ch)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def printable(text: object) -> str:
    """``text`` safe for a terminal: every non-printable character escaped as ``\\xNN``/``\\uNNNN``.

    Names in files are untrusted: control characters (ANSI escape sequences,
    ``\\r``), bidi overrides and other format characters, lone surrogates and
    line separators would let a file rewrite the terminal, hide text, or crash
    the printer (a lone surrogate cannot be encoded). Printable text, spaces
    and non-ASCII letters are kept.

    >>> printable("blocks.0\\x1b[2J\\u202e.weight")
    'blocks.0\\\\x1b[2J\\\\u202e.weight'
    """
    s = str(text)
    return s if s.isprintable() else "".join(c if c.isprintable() else _escape(c) for c in s)


def one_line(text: object) -> str:
    """An error message as one printable line: its lines joined with `` | ``, the rest as :func:`printable`."""
    return " | ".join(printable(line) for line in str(text).splitlines() if line.strip()) or printable(text)


def parse_dtype(name: str | None) -> torch.dtype | None:
    from fvtransform._dtypes import DTYPES as _DTYPES  # torch is imported by a command, never by --help

    if name is None:
        return None
    if name not in _DTYPES:
        raise UsageError(f"--dtype {name!r}: expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def parse_lora_arg(arg: str) -> tuple[str, float]:
    """``path`` or ``path:scale`` (a trailing ``:number``; paths may contain colons otherwise).

    >>> parse_lora_arg("my/lora.safetensors:0.5")
    ('my/lora.safetensors', 0.5)
    >>> parse_lora_arg("org/repo")
    ('org/repo', 1.0)
    """
    m = re.fullmatch(r"(.+):([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)", arg)
    if m:
        return m.group(1), float(m.group(2))
    head, colon, tail = arg.rpartition(":")
    if colon and head and not os.path.lexists(arg) and os.path.lexists(head):  # a local LoRA with a scale that is no number
        raise UsageError(f"{arg!r}: the scale after ':' must be a finite number, as in {head}:0.5; found {tail!r}")
    return arg, 1.0


def progress_bar(enabled: bool, desc: str) -> tuple[Callable[[int, int], None] | None, Callable[[], None]]:
    """A tqdm bar on stderr when ``enabled`` and stderr is a terminal; returns ``(update, close)``."""
    if not enabled or not sys.stderr.isatty():
        return None, lambda: None
    import os

    from tqdm import tqdm

    try:
        size = os.get_terminal_size(sys.stderr.fileno())
        sized = size.columns > 0 and size.lines > 0
    except OSError:
        sized = False
    # a terminal that reports 0 columns or rows (a fresh pty) would make tqdm draw nothing
    bar = tqdm(desc=desc, unit="tensor", file=sys.stderr, **({} if sized else {"ncols": 80, "nrows": 24}))

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return update, bar.close


def _base_tree(base: str) -> tuple[Any, Path]:
    import fvtransform as fvt
    from fvtransform.hub import maybe_download_model

    path = maybe_download_model(base)
    return fvt.load(path), path


def _local_inputs(args: list[str]) -> list[Path]:
    """The inputs that are local paths (repo ids are downloaded into the cache, never into an output)."""
    return [Path(a) for a in args if os.path.lexists(a)]


def _refuse_inputs(out: str, inputs: list[str]) -> None:
    """Refuse an output that is, holds or lies inside a local input (real paths and inodes compared)."""
    from fvtransform.io._atomic import check_path
    from fvtransform.lora._stream import check_not_input

    check_not_input(check_path(out, "output"), _local_inputs(inputs))


def merge_command(base: str, loras: list[str], out: str, *, dtype: str | None, quiet: bool,
                  overwrite: bool = False, device: str | None = None, fp8_scale: str = "keep", rounding: str = "nearest",
                  seed: int | None = None, saturate: bool = False) -> dict[str, Any]:
    import fvtransform as fvt
    from fvtransform.lora._stream import as_device

    on = as_device(device)  # a device this machine lacks is refused before anything is read
    _refuse_inputs(out, [base] + [parse_lora_arg(arg)[0] for arg in loras])
    tree, base_path = _base_tree(base)
    pairs, labels = [], []
    for arg in loras:
        path, scale = parse_lora_arg(arg)
        pairs.append((fvt.lora.load(path, base=tree), scale))
        labels.append(Path(path).name)
    skipped: list[str] = []
    update, close = progress_bar(not quiet, "merge")
    try:
        written = fvt.lora.merge_checkpoint(base_path, pairs, out, dtype=parse_dtype(dtype), labels=labels, progress=update,
                                            overwrite=overwrite, on_skip=lambda name, why: skipped.append(f"{name} ({why})"),
                                            device=on, fp8_scale=fp8_scale, rounding=rounding, seed=seed, saturate=saturate)
    finally:
        close()
    doc: dict[str, Any] = {"output": str(written), "merged": [{"lora": lab, "scale": s} for lab, (_, s) in zip(labels, pairs)],
                           "tensors": len(tree)}
    if skipped:
        doc["not copied"] = skipped
    return doc


#: The files ``fvt.lora.save`` writes for each format, from the output path.
def _lora_targets(out: Path, to: str) -> list[Path]:
    from fvtransform.lora._format_table import DIFFUSERS_WEIGHTS, PEFT_CONFIG, PEFT_WEIGHTS

    if to == "peft":
        return [out / PEFT_WEIGHTS, out / PEFT_CONFIG]
    if to == "diffusers" and (out.is_dir() or not out.suffix):
        return [out / DIFFUSERS_WEIGHTS]
    return [out]


def _check_lora_output(out: str, to: str, inputs: list[str], overwrite: bool) -> None:
    """Refuse an output that is an input, or that would replace a file fvtransform did not write (unless ``overwrite``)."""
    from fvtransform.errors import FvTransformError, WriteError
    from fvtransform.io._header import read_header
    from fvtransform.lora._format_table import FVT_SCALES

    _refuse_inputs(out, inputs)
    targets = _lora_targets(Path(out), to)
    existing = [t for t in targets if os.path.lexists(t)]
    if not existing or overwrite:
        return
    try:
        ours = targets[0].is_file() and not targets[0].is_symlink() and FVT_SCALES in read_header(targets[0]).metadata
    except FvTransformError:
        ours = False
    if not ours:
        raise WriteError(f"{existing[0]}: exists and was not written by fvtransform; refusing to replace it. "
                         "Choose another output, or pass --overwrite")


def convert_command(src: str, out: str, *, to: str, base: str | None, overwrite: bool = False) -> dict[str, Any]:
    import fvtransform as fvt

    _check_lora_output(out, to, [src] + ([base] if base else []), overwrite)
    tree = _base_tree(base)[0] if base else None
    adapter = fvt.lora.load(src, base=tree)
    written = fvt.lora.save(adapter, out, format=to, overwrite=overwrite)
    return {"output": str(written), "from": adapter.format, "to": to, "targets": len(adapter)}


def extract_command(base: str, tuned: str, out: str, *, rank: int | None, energy: float | None, to: str,
                    quiet: bool = False, overwrite: bool = False) -> dict[str, Any]:
    import fvtransform as fvt

    if (rank is None) == (energy is None):
        raise UsageError("extract-lora needs exactly one of --rank R or --energy E")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise UsageError(f"extract-lora --rank {rank!r}: the rank must be a whole number of at least 1")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise UsageError(f"extract-lora --energy {energy!r}: the energy must be in (0, 1]")
    _check_lora_output(out, to, [base, tuned], overwrite)
    base_tree, tuned_tree = _base_tree(base)[0], _base_tree(tuned)[0]
    update, close = progress_bar(not quiet, "extract")
    try:
        adapter, report = fvt.lora.extract_with_report(base_tree, tuned_tree, rank=rank, energy=energy, progress=update)
    finally:
        close()
    written = fvt.lora.save(adapter, out, format=to, overwrite=overwrite)
    worst = max(report.errors.values()) if report.errors else 0.0
    return {"output": str(written), "targets": len(adapter), "ranks": sorted(set(adapter.ranks.values())),
            "max_relative_error": worst}
