"""Pictures of what an update changes: a heatmap of ``||dW|| / ||W||``, blocks (rows) x modules (columns).

``fvtransform inspect LORA --base BASE --plot out.png`` and ``fvtransform diff A B --plot out.png`` draw the
numbers of :func:`fvtransform.lora.update_norms`; untouched modules are blank (NaN, masked). matplotlib comes
from the ``plot`` extra and is imported only here, on use, with its Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
import sys
from typing import TYPE_CHECKING, Any

from fvtransform.errors import FvTransformError, MissingDependencyError, UsageError, WriteError

if TYPE_CHECKING:
    from fvtransform.lora._norms import UpdateNorms

__all__ = ["DPI", "MAX_PIXELS", "check_plot_output", "diff_command", "figure_size", "grouping", "heatmap", "print_norms"]

#: Pixels per inch of the PNG: its size in pixels is :func:`figure_size` times this.
DPI = 100


def figure_size(rows: int, columns: int) -> tuple[float, float]:
    """The figure's size in inches for a grid of ``rows`` x ``columns`` (whole pixels at :data:`DPI`).

    >>> figure_size(30, 8)
    (6.2, 10.0)
    """
    width = max(6.0, 2.6 + 0.45 * columns)
    height = max(3.0, 2.2 + 0.26 * rows)
    return round(width * DPI) / DPI, round(height * DPI) / DPI


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # not installed, or installed but broken (a missing shared library)
        if isinstance(e, ModuleNotFoundError) and (e.name or "").partition(".")[0] == "matplotlib":
            raise MissingDependencyError("--plot needs matplotlib: pip install 'fvtransform[plot]'") from None
        raise MissingDependencyError(f"--plot needs a working matplotlib: pip install --force-reinstall 'fvtransform[plot]' "
                                     f"(import matplotlib failed: {e})") from None
    return plt


#: The PNG's ``Software`` text: a file holding it was written by fvtransform and may be replaced by another plot.
SOFTWARE = "fvtransform plot"
_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_our_png(path: Path) -> bool:
    """Whether ``path`` is a regular file, a PNG whose first chunks carry :data:`SOFTWARE` (a plot of ours)."""
    from fvtransform.io._open import open_regular

    if path.is_symlink():
        return False
    try:
        with open_regular(path) as f:
            head = f.read(4096)
    except (OSError, FvTransformError):
        return False
    return head.startswith(_SIGNATURE) and b"tEXtSoftware\x00" + SOFTWARE.encode() in head


def check_plot_output(out: str, inputs: list[str], *, overwrite: bool) -> None:
    """Refuse a ``--plot`` path that is or lies inside an input (symlinks resolved), or that would replace a
    file fvtransform did not write (unless ``overwrite``); called before anything is read.

    Raises:
        UsageError: the path is an input, holds one or lies inside an input folder, or is not a .png.
        WriteError: it exists and is not a plot of fvtransform (pass --overwrite).
    """
    from fvtransform.cli._commands import _refuse_inputs

    if Path(out).suffix.lower() != ".png":
        raise UsageError(f"--plot {str(out)!r}: the picture is a PNG; name it like out.png")
    _refuse_inputs(out, inputs)
    _check_replace(Path(out), overwrite)


def _check_replace(path: Path, overwrite: bool) -> None:
    if os.path.lexists(path) and not (overwrite and not path.is_dir()) and not _is_our_png(path):
        raise WriteError(f"--plot {str(path)!r}: exists and is not a plot fvtransform wrote; refusing to replace it. "
                         "Choose another output, or pass --overwrite")


#: The most pixels of either side of the picture; a larger grid is drawn in groups of rows or columns.
MAX_PIXELS = 8192
MAX_ROWS = int((MAX_PIXELS / DPI - 2.2) / 0.26)
MAX_COLUMNS = int((MAX_PIXELS / DPI - 2.6) / 0.45)
_INF, _NAN = 1, 2  # the special cells, drawn in their own colours


def _bins(n: int, limit: int) -> int:
    return max(1, math.ceil(n / limit))


def _group(values: Any, kinds: Any, axis: int, size: int) -> tuple[Any, Any]:
    """Groups of ``size`` along ``axis``: the largest finite value, the worst special kind (NaN over inf)."""
    import numpy as np

    if size == 1:
        return values, kinds
    n = values.shape[axis]
    pad = (-n) % size
    widths = [(0, 0), (0, 0)]
    widths[axis] = (0, pad)
    values = np.pad(values, widths, constant_values=np.nan)
    kinds = np.pad(kinds, widths, constant_values=0)
    shape = (values.shape[0] // size, size, values.shape[1]) if axis == 0 else (values.shape[0], values.shape[1] // size, size)
    return np.fmax.reduce(values.reshape(shape), axis=axis + 1), kinds.reshape(shape).max(axis=axis + 1)


def _labels(names: tuple[str, ...], size: int) -> list[str]:
    return list(names) if size == 1 else [f"{names[i]} (+{min(size, len(names) - i) - 1})" for i in range(0, len(names), size)]


def grouping(norms: UpdateNorms) -> str:
    """How a grid too large for :data:`MAX_PIXELS` is grouped, as a note (``""`` when every cell is drawn)."""
    row_step, col_step = _bins(len(norms.rows), MAX_ROWS), _bins(len(norms.columns), MAX_COLUMNS)
    if row_step == col_step == 1:
        return ""
    return f"grouped: {row_step} blocks x {col_step} modules a cell, the largest shown"


def heatmap(norms: UpdateNorms, out: str | Path, *, title: str, overwrite: bool = False) -> Path:
    """Draw ``norms`` as a PNG at ``out`` (written atomically, at most :data:`MAX_PIXELS` a side); returns its path.

    Untouched cells are blank; a changed cell of ratio ``inf`` (a zero base weight) and one whose update holds
    NaN get their own colours; the colour bar spans the finite values. A grid too large for the picture is
    drawn in groups of rows (columns), each the largest value of its group, and the title says so.

    Raises:
        MissingDependencyError: matplotlib is not installed or does not import (the ``plot`` extra).
        UsageError: there is no block to draw (no key of a repeated-block layout), or ``out`` is not a .png.
        WriteError: ``out`` exists and is not a plot fvtransform wrote (and not ``overwrite``).
    """
    from fvtransform.io._atomic import atomic_file

    path = Path(out)
    if path.suffix.lower() != ".png":
        raise UsageError(f"--plot {str(out)!r}: the picture is a PNG; name it like out.png")
    if not norms.rows or not norms.columns:
        raise UsageError(f"--plot {str(out)!r}: no key is inside a repeated block ({', '.join(sorted({l.name for l in _layouts()}))}); "
                         f"nothing to draw as blocks x modules. Without --plot, the numbers per key are listed")
    plt = _pyplot()
    import io

    import numpy as np
    from matplotlib import colors

    grid = np.array(norms.grid, dtype=float).reshape(len(norms.rows), len(norms.columns))
    kinds = np.zeros(grid.shape, dtype=np.int8)
    for i, j in norms.changed_cells():
        kinds[i, j] = _NAN if math.isnan(grid[i, j]) else _INF if math.isinf(grid[i, j]) else 0
    values = np.where(np.isfinite(grid), grid, np.nan)
    row_step, col_step = _bins(len(norms.rows), MAX_ROWS), _bins(len(norms.columns), MAX_COLUMNS)
    values, kinds = _group(values, kinds, 0, row_step)
    values, kinds = _group(values, kinds, 1, col_step)
    rows, columns = _labels(norms.rows, row_step), _labels(norms.columns, col_step)
    if note := grouping(norms):
        title += f"\n({note})"
    data = np.ma.masked_invalid(values)
    finite = data.compressed()
    positive = finite[finite > 0]
    norm: colors.Normalize = (colors.LogNorm(vmin=positive.min(), vmax=positive.max())
                              if positive.size and positive.max() / positive.min() > 20 else
                              colors.Normalize(vmin=finite.min(), vmax=finite.max()) if finite.size else colors.Normalize(0.0, 1.0))
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")  # untouched: blank
    special = np.ma.masked_equal(kinds, 0)
    fig, ax = plt.subplots(figsize=figure_size(len(rows), len(columns)), dpi=DPI)
    try:
        image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
        if special.count():
            ax.imshow(special, aspect="auto", interpolation="nearest", vmin=_INF, vmax=_NAN,
                      cmap=colors.ListedColormap(["red", "black"]))
        ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=7)
        step = max(1, math.ceil(len(rows) / 40))
        ax.set_yticks(range(0, len(rows), step), rows[::step], fontsize=7)
        ax.set_title(title.replace("$", r"\$"), fontsize=9)
        bar = fig.colorbar(image, ax=ax)
        bar.set_label("||ΔW|| / ||W||  (blank: untouched; red: inf, zero base; black: NaN)", fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": SOFTWARE})
    finally:
        plt.close(fig)
    with atomic_file(path, replace_check=lambda dest: _check_replace(dest, overwrite)) as tmp:
        tmp.write_bytes(buf.getvalue())
    return path


def _layouts() -> tuple[Any, ...]:
    from fvtransform.lora._norms import LAYOUTS

    return LAYOUTS


def print_norms(norms: UpdateNorms, head: str) -> None:
    """The numbers as a table: one line per changed key, largest first, then what was left out."""
    from fvtransform.cli._commands import printable

    print(head)
    for key, v in sorted(norms.by_key.items(), key=lambda kv: (not math.isnan(kv[1]), -kv[1])):  # NaN first
        print(f"  {printable(key):<60} {v:.4g}")
    print(f"{len(norms.by_key)} changed, {norms.unchanged} unchanged; layout {norms.layout}, "
          f"{len(norms.rows)} blocks x {len(norms.columns)} modules")
    for side, key in norms.leftovers:
        print(f"  only in {side}: {printable(key)}")


def diff_command(a: str, b: str, *, plot: str | None, as_json: bool, overwrite: bool = False) -> int:
    """``fvtransform diff A B``: ``||B - A|| / ||A||`` per key (and a heatmap with ``plot``).

    Returns 0, or 1 when a key is on one side only (listed; the rest is compared).
    """
    import fvtransform as fvt
    from fvtransform.cli._commands import printable
    from fvtransform.hub import maybe_download_model

    if plot is not None:
        _pyplot()  # a missing extra is said before anything is read
        check_plot_output(plot, [a, b], overwrite=overwrite)
    tree_a = fvt.load(maybe_download_model(a))
    tree_b = fvt.load(maybe_download_model(b))
    norms = fvt.lora.update_norms(tree_a, tree_b, strict=False)
    if plot is not None:
        heatmap(norms, plot, title=f"{Path(b).name} vs {Path(a).name}: ||B - A|| / ||A||", overwrite=overwrite)
    if as_json:
        print(json.dumps({"a": a, "b": b, **norms.to_dict(), **({"plot": plot} if plot else {})}))
    else:
        print_norms(norms, f"{a} -> {b}: relative change per tensor")
        if plot is not None:
            note = grouping(norms)
            print(f"plot: {printable(plot)}" + (f" ({note})" if note else ""))
    sys.stdout.flush()
    return 1 if norms.leftovers else 0
