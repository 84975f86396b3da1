"""Pictures of what an update changes: a heatmap of ``||dW|| / ||W||``, blocks (rows) x modules (columns).

``fvtransform inspect LORA --base BASE --plot out.png`` and ``fvtransform diff A B --plot out.png`` draw the
numbers of :func:`fvtransform.lora.update_norms`; untouched modules are blank (NaN, masked). matplotlib comes
from the ``plot`` extra and is imported only here, on use, with its Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
import sys
from typing import TYPE_CHECKING, Any

from fvtransform.errors import MissingDependencyError, UsageError

if TYPE_CHECKING:
    from fvtransform.lora._norms import UpdateNorms

__all__ = ["DPI", "diff_command", "figure_size", "heatmap", "print_norms"]

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
    except ModuleNotFoundError:
        raise MissingDependencyError("--plot needs matplotlib: pip install 'fvtransform[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(norms: UpdateNorms, out: str | Path, *, title: str) -> Path:
    """Draw ``norms`` as a PNG at ``out`` (written atomically); returns its path.

    Raises:
        MissingDependencyError: matplotlib is not installed (the ``plot`` extra).
        UsageError: there is no block to draw (no key of a repeated-block layout), or ``out`` is not a .png.
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

    data = np.ma.masked_invalid(np.array(norms.grid, dtype=float))
    finite = data.compressed()
    finite = finite[np.isfinite(finite)]
    positive = finite[finite > 0]
    norm = (colors.LogNorm(vmin=positive.min(), vmax=positive.max())
            if positive.size and positive.min() > 0 and positive.max() / positive.min() > 20 else None)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")  # untouched: blank
    fig, ax = plt.subplots(figsize=figure_size(len(norms.rows), len(norms.columns)), dpi=DPI)
    try:
        image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
        ax.set_xticks(range(len(norms.columns)), norms.columns, rotation=60, ha="right", fontsize=7)
        step = max(1, math.ceil(len(norms.rows) / 40))
        ax.set_yticks(range(0, len(norms.rows), step), norms.rows[::step], fontsize=7)
        ax.set_title(title, fontsize=9)
        bar = fig.colorbar(image, ax=ax)
        bar.set_label("||ΔW|| / ||W||  (blank: untouched)", fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    with atomic_file(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return path


def _layouts() -> tuple[Any, ...]:
    from fvtransform.lora._norms import LAYOUTS

    return LAYOUTS


def print_norms(norms: UpdateNorms, head: str) -> None:
    """The numbers as a table: one line per changed key, largest first, then what was left out."""
    from fvtransform.cli._commands import printable

    print(head)
    for key, v in sorted(norms.by_key.items(), key=lambda kv: -kv[1]):
        print(f"  {printable(key):<60} {v:.4g}")
    print(f"{len(norms.by_key)} changed, {norms.unchanged} unchanged; layout {norms.layout}, "
          f"{len(norms.rows)} blocks x {len(norms.columns)} modules")
    for side, key in norms.leftovers:
        print(f"  only in {side}: {printable(key)}")


def diff_command(a: str, b: str, *, plot: str | None, as_json: bool) -> int:
    """``fvtransform diff A B``: ``||B - A|| / ||A||`` per key (and a heatmap with ``plot``).

    Returns 0, or 1 when a key is on one side only (listed; the rest is compared).
    """
    import fvtransform as fvt
    from fvtransform.hub import maybe_download_model

    if plot is not None:
        _pyplot()  # a missing extra is said before anything is read
    tree_a = fvt.load(maybe_download_model(a))
    tree_b = fvt.load(maybe_download_model(b))
    norms = fvt.lora.update_norms(tree_a, tree_b, strict=False)
    if plot is not None:
        heatmap(norms, plot, title=f"{Path(b).name} vs {Path(a).name}: ||B - A|| / ||A||")
    if as_json:
        print(json.dumps({"a": a, "b": b, **norms.to_dict(), **({"plot": plot} if plot else {})}))
    else:
        print_norms(norms, f"{a} -> {b}: relative change per tensor")
        if plot is not None:
            print(f"plot: {plot}")
    sys.stdout.flush()
    return 1 if norms.leftovers else 0
