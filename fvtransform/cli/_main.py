"""The ``fvtransform`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence, TypedDict

__all__ = ["main"]


#: Options of every command, accepted before or after the subcommand (as in git or pip): flag -> help.
GLOBAL_OPTIONS = {"--debug": "show tracebacks", "--json": "machine-readable output"}


def _global_options(p: argparse.ArgumentParser, default: object) -> argparse.ArgumentParser:
    for flag, text in GLOBAL_OPTIONS.items():
        p.add_argument(flag, action="store_true", default=default, help=text)
    return p


def _parser() -> argparse.ArgumentParser:
    p = _global_options(argparse.ArgumentParser(prog="fvtransform", description="Pure weight transforms for video diffusion models."), False)
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the library end to end on the reference model")
    demo.add_argument("--workdir", default=None, help="folder for the files the demo writes")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--model", default=None, help="a real model: folder, pipeline folder or repo id")
    demo.add_argument("--component", default=None, help="the pipeline component, e.g. transformer")
    demo.add_argument("--lora", default=None, help="the LoRA to run on --model: file, folder or repo id")
    ins = sub.add_parser("inspect", help="a checkpoint, model or pipeline folder, or LoRA file: what it holds")
    ins.add_argument("path", help="a file, folder or repo id")
    ins.add_argument("--base", default=None, help="for a LoRA: the base checkpoint to resolve it against")
    ins.add_argument("--plot", default=None, metavar="OUT.png",
                     help="for a LoRA with --base: a heatmap of ||dW||/||W|| per block and module (the plot extra)")
    ins.add_argument("--overwrite", action="store_true", help="replace an existing --plot file that fvtransform did not write")
    df = sub.add_parser("diff", help="what changed from checkpoint A to B: ||B-A||/||A|| per tensor, block and module")
    df.add_argument("a", help="checkpoint file, folder or repo id (before)")
    df.add_argument("b", help="checkpoint file, folder or repo id (after)")
    df.add_argument("--plot", default=None, metavar="OUT.png", help="a heatmap per block and module (the plot extra)")
    df.add_argument("--overwrite", action="store_true", help="replace an existing --plot file that fvtransform did not write")
    mg = sub.add_parser("merge", help="merge LoRAs into a checkpoint, disk to disk, tensor by tensor")
    mg.add_argument("base", help="checkpoint file, folder or repo id")
    mg.add_argument("loras", nargs="+", metavar="LORA[:SCALE]")
    mg.add_argument("-o", "--output", required=True)
    mg.add_argument("--overwrite", action="store_true", help="write into an existing output that fvtransform did not write (files of other names are kept)")
    mg.add_argument("--dtype", default=None, help="cast floating tensors of the output (bf16, fp16, fp32)")
    mg.add_argument("--quiet", action="store_true", help="no progress bar")
    mg.add_argument("--device", default=None, help="compute the merged tensors there, e.g. cuda (default: cpu)")
    mg.add_argument("--fp8-scale", default="keep", choices=["keep", "recompute"],
                    help="float8 targets: keep each scale_weight (default) or recompute it from the merged weight's amax")
    mg.add_argument("--rounding", default="nearest", choices=["nearest", "stochastic"], help="float8 targets: how the sum is rounded")
    mg.add_argument("--seed", default=None, type=int, help="the seed of --rounding stochastic (default 0)")
    mg.add_argument("--saturate", action="store_true", help="float8 targets: clamp values beyond the float8 range instead of refusing")
    cv = sub.add_parser("convert-lora", help="rewrite a LoRA file in another format")
    cv.add_argument("src")
    cv.add_argument("-o", "--output", required=True)
    cv.add_argument("--overwrite", action="store_true", help="write into an existing output that fvtransform did not write (files of other names are kept)")
    cv.add_argument("--to", required=True, choices=["peft", "diffusers", "diffusers-model", "kohya", "comfy"])
    cv.add_argument("--base", default=None, help="the base checkpoint (kohya names need it)")
    ex = sub.add_parser("extract-lora", help="the LoRA that best approximates TUNED - BASE")
    ex.add_argument("base")
    ex.add_argument("tuned")
    ex.add_argument("-o", "--output", required=True)
    ex.add_argument("--overwrite", action="store_true", help="write into an existing output that fvtransform did not write (files of other names are kept)")
    ex.add_argument("--rank", type=int, default=None)
    ex.add_argument("--energy", type=float, default=None)
    ex.add_argument("--to", default="peft", choices=["peft", "diffusers", "diffusers-model", "kohya", "comfy"])
    ex.add_argument("--quiet", action="store_true", help="no progress bar")
    for command in sub.choices.values():  # a subcommand's copy is left unset unless given (SUPPRESS): "--json inspect X" keeps it
        _global_options(command, argparse.SUPPRESS)
    return p


def _report(doc: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(doc))
    else:
        for k, v in doc.items():
            print(f"{k}: {v}")
    return 0


class _Row(TypedDict):
    """One tensor of ``fvtransform inspect``'s listing."""

    key: str
    shape: list[int]
    dtype: str
    bytes: int
    group: str


def _inspect(path: str, as_json: bool, base: str | None = None, plot: str | None = None, overwrite: bool = False) -> int:
    from fvtransform.cli._commands import printable
    from fvtransform.errors import UsageError
    from fvtransform.io import open_checkpoint

    if plot is not None and base is None:
        raise UsageError(f"inspect --plot {plot!r} draws a LoRA's update relative to its base weights: "
                         f"fvtransform inspect LORA --base BASE --plot {plot!r} (two checkpoints: fvtransform diff A B --plot)")
    p = Path(path)
    if not p.exists():
        from fvtransform.hub import maybe_download_model

        p = maybe_download_model(path)
    if p.is_dir() and (p / "model_index.json").is_file():
        from fvtransform.io._pipeline import pipeline_components

        comps = {k: (list(v) if v else None) for k, v in pipeline_components(p).items()}
        if as_json:
            print(json.dumps({"path": str(p), "pipeline": comps}))
        else:
            for k, v in comps.items():
                print(f"{printable(k):<20} {printable('/'.join(v)) if v else '(absent)'}")
        return 0
    if base is not None or (p.is_dir() and (p / "adapter_config.json").is_file()):
        return _inspect_lora(p, base, as_json, plot, overwrite, inputs=[path] + ([base] if base else []))
    ckpt = open_checkpoint(p)
    from fvtransform.lora._detect import split_role

    if ckpt.keys() and all(split_role(k) is not None for k in ckpt.keys()):  # every key is a LoRA key
        return _inspect_lora(p, None, as_json)
    rows: list[_Row] = []
    groups: dict[str, dict[str, int]] = {}
    for k in ckpt.keys():
        info = ckpt.info(k)
        parts = k.split(".")  # grouped by prefix: two segments when the second is a number (blocks.0), else one
        prefix = ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]
        rows.append({"key": k, "shape": list(info.shape), "dtype": str(info.dtype).removeprefix("torch."),
                     "bytes": info.nbytes, "group": prefix})
        g = groups.setdefault(prefix, {"tensors": 0, "bytes": 0})
        g["tensors"] += 1
        g["bytes"] += info.nbytes
    from fvtransform.tree._fp8 import describe

    fp8 = describe({k: ckpt.info(k).dtype for k in ckpt.keys()}, ckpt.tensor)  # float8 weights, scales, marker
    if as_json:
        print(json.dumps({"path": str(path), "groups": groups,
                          "tensors": [{k: v for k, v in r.items() if k != "group"} for r in rows],
                          **({"fp8": fp8} if fp8 else {})}))
    else:
        from fvtransform.tree._paramtree import human_bytes

        shown: set[str] = set()
        for r in rows:
            if r["group"] not in shown:
                shown.add(r["group"])
                g = groups[r["group"]]
                print(f"{printable(r['group'])}  ({g['tensors']} tensors, {human_bytes(g['bytes'])})")
            print(f"  {printable(r['key']):<60} {r['dtype']:<10} {r['shape']}  {human_bytes(r['bytes'])}")
        print(f"{len(rows)} tensors, {human_bytes(sum(r['bytes'] for r in rows))}")
        if fp8:
            print(_fp8_line(fp8))
    return 0


def _fp8_line(fp8: dict[str, Any]) -> str:
    """One line of ``fvtransform inspect`` on a float8 checkpoint."""
    from fvtransform.cli._commands import printable

    dtypes = ", ".join(f"{k}: {n}" for k, n in fp8["dtypes"].items())
    line = f"float8: {fp8['weights']} weights ({fp8['scaled']} scaled, {fp8['plain']} plain; {dtypes})"
    markers = ", ".join(f"{printable(repr(k))} ({v})" for k, v in fp8["markers"].items())
    line += f", marker {markers}" if markers else ", no scaled_fp8 marker"
    if fp8["scale_input"]:
        line += f", scale_input: {fp8['scale_input']}"
    if fp8["orphan_scales"]:
        line += f", scales without their weight: {len(fp8['orphan_scales'])}"
    if fp8["damaged_scales"]:
        bad = ", ".join(f"{printable(repr(k))} = {v}" for k, v in list(fp8["damaged_scales"].items())[:8])
        line += f"; DAMAGED scales (not finite and positive; fvt.load refuses the file): {bad}"
    return line


def _inspect_lora(p: Path, base: str | None, as_json: bool, plot: str | None = None, overwrite: bool = False,
                  inputs: Sequence[str] = ()) -> int:
    import fvtransform as fvt
    from fvtransform.cli._commands import printable

    from fvtransform.hub import maybe_download_model

    if plot is not None:
        from fvtransform.cli._plot import _pyplot, check_plot_output

        _pyplot()  # a missing extra is said before anything is read
        check_plot_output(plot, [str(p), *inputs], overwrite=overwrite)
    base_tree = fvt.load(maybe_download_model(base)) if base else None
    adapter = fvt.lora.load(p, base=base_tree, strict=False)
    report = adapter.report
    if plot is not None and base_tree is not None:
        from fvtransform.cli._plot import heatmap

        heatmap(fvt.lora.update_norms(base_tree, adapter), plot, title=f"{p.name} on {Path(base or '').name}: ||ΔW|| / ||W||",
                overwrite=overwrite)
    rows = [{"target": k, "kind": type(d).__name__, "rank": getattr(d, "rank", None), "alpha": getattr(d, "alpha", None),
             "scale": getattr(d, "scale", None), "dora": getattr(d, "magnitude", None) is not None} for k, d in adapter.items()]
    skipped = [{"key": k, "why": why} for k, why in report.skipped]
    doc = {"path": str(p), "format": adapter.format, "targets": rows, "skipped": skipped, **({"plot": plot} if plot else {})}
    if as_json:
        print(json.dumps(doc))
    else:
        print(f"LoRA, format {adapter.format}, {len(rows)} targets")
        for r in rows:
            print(f"  {printable(r['target']):<56} {r['kind']:<9} rank {r['rank']}  alpha {r['alpha']}  scale {r['scale']}{'  DoRA' if r['dora'] else ''}")
        for s in skipped:
            print(f"  not matched: {printable(s['key'])} ({printable(s['why'])})")
        if plot is not None:
            print(f"plot: {printable(plot)}")
    return 1 if report.skipped else 0  # keys that match nothing: a failed check, for scripts


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for errors, 1 for failed checks).

    Every :class:`FvTransformError` (a bad input, a refused file) and every
    ``OSError`` (a user's path: missing, unreadable, a full disk) prints ONE
    line, ``fvtransform: error: ...``, to stderr and exits 2; names from files
    are escaped (:func:`printable`). Any other exception is a bug in
    fvtransform and keeps its traceback (exit 1), so it gets reported;
    ``--debug`` shows the traceback of the errors above too.
    """
    from fvtransform.cli._commands import one_line
    from fvtransform.errors import FvTransformError, UsageError

    for stream in (sys.stdout, sys.stderr):  # a terminal that cannot show a name gets it escaped, not a crash
        reconfigure = getattr(stream, "reconfigure", None)
        if callable(reconfigure):
            reconfigure(errors="backslashreplace")

    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from fvtransform.cli._demo import run_demo, run_model_demo

            echo = (lambda _s: None) if args.json else print
            if (args.model is None) != (args.lora is None):
                raise UsageError("demo on a real model needs both --model and --lora")
            if args.model is not None:
                report = run_model_demo(model=args.model, lora_path=args.lora, component=args.component,
                                        workdir=args.workdir, seed=args.seed, echo=echo)
            else:
                report = run_demo(workdir=args.workdir, seed=args.seed, echo=echo)
            if args.json:
                print(json.dumps(report.to_dict()))
            return 0 if report.ok else 1
        if args.command == "inspect":
            return _inspect(args.path, args.json, args.base, args.plot, args.overwrite)
        if args.command == "diff":
            from fvtransform.cli._plot import diff_command

            return diff_command(args.a, args.b, plot=args.plot, as_json=args.json, overwrite=args.overwrite)
        from fvtransform.cli import _commands as c

        if args.command == "merge":
            return _report(c.merge_command(args.base, args.loras, args.output, dtype=args.dtype, quiet=args.quiet or args.json,
                                           overwrite=args.overwrite, device=args.device, fp8_scale=args.fp8_scale,
                                           rounding=args.rounding, seed=args.seed, saturate=args.saturate), args.json)
        if args.command == "convert-lora":
            return _report(c.convert_command(args.src, args.output, to=args.to, base=args.base, overwrite=args.overwrite), args.json)
        if args.command == "extract-lora":
            return _report(c.extract_command(args.base, args.tuned, args.output, rank=args.rank, energy=args.energy, to=args.to,
                                             quiet=args.quiet or args.json, overwrite=args.overwrite), args.json)
    except (FvTransformError, OSError) as e:
        if args.debug:
            raise
        print(f"fvtransform: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
