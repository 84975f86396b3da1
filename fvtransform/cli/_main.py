"""The ``fvtransform`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fvtransform", description="Pure weight transforms for video diffusion models.")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the library end to end on the reference model")
    demo.add_argument("--workdir", default=None, help="folder for the files the demo writes")
    demo.add_argument("--seed", type=int, default=0)
    ins = sub.add_parser("inspect", help="show the keys, shapes and dtypes of a checkpoint")
    ins.add_argument("path")
    mg = sub.add_parser("merge", help="merge LoRAs into a checkpoint, disk to disk, tensor by tensor")
    mg.add_argument("base", help="checkpoint file, folder or repo id")
    mg.add_argument("loras", nargs="+", metavar="LORA[:SCALE]")
    mg.add_argument("-o", "--output", required=True)
    mg.add_argument("--dtype", default=None, help="cast floating tensors of the output (bf16, fp16, fp32)")
    mg.add_argument("--quiet", action="store_true", help="no progress bar")
    cv = sub.add_parser("convert-lora", help="rewrite a LoRA file in another format")
    cv.add_argument("src")
    cv.add_argument("-o", "--output", required=True)
    cv.add_argument("--to", required=True, choices=["peft", "diffusers", "kohya", "comfy"])
    cv.add_argument("--base", default=None, help="the base checkpoint (kohya names need it)")
    ex = sub.add_parser("extract-lora", help="the LoRA that best approximates TUNED - BASE")
    ex.add_argument("base")
    ex.add_argument("tuned")
    ex.add_argument("-o", "--output", required=True)
    ex.add_argument("--rank", type=int, default=None)
    ex.add_argument("--energy", type=float, default=None)
    ex.add_argument("--to", default="peft", choices=["peft", "diffusers", "kohya", "comfy"])
    return p


def _report(doc: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(doc))
    else:
        for k, v in doc.items():
            print(f"{k}: {v}")
    return 0


def _inspect(path: str, as_json: bool) -> int:
    from fvtransform.io import open_checkpoint

    ckpt = open_checkpoint(path)
    rows = []
    for k in ckpt.keys():
        info = ckpt.info(k)
        rows.append({"key": k, "shape": list(info.shape), "dtype": str(info.dtype).removeprefix("torch."), "bytes": info.nbytes})
    if as_json:
        print(json.dumps({"path": str(path), "tensors": rows}))
    else:
        for r in rows:
            print(f"{r['key']:<60} {r['dtype']:<10} {r['shape']}")
        print(f"{len(rows)} tensors, {sum(r['bytes'] for r in rows)} bytes")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (2 for errors, 1 for failed checks)."""
    from fvtransform.errors import FvTransformError

    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from fvtransform.cli._demo import run_demo

            echo = (lambda _s: None) if args.json else print
            report = run_demo(workdir=args.workdir, seed=args.seed, echo=echo)
            if args.json:
                print(json.dumps(report.to_dict()))
            return 0 if report.ok else 1
        if args.command == "inspect":
            return _inspect(args.path, args.json)
        from fvtransform.cli import _commands as c

        if args.command == "merge":
            return _report(c.merge_command(args.base, args.loras, args.output, dtype=args.dtype, quiet=args.quiet or args.json), args.json)
        if args.command == "convert-lora":
            return _report(c.convert_command(args.src, args.output, to=args.to, base=args.base), args.json)
        if args.command == "extract-lora":
            return _report(c.extract_command(args.base, args.tuned, args.output, rank=args.rank, energy=args.energy, to=args.to), args.json)
    except FvTransformError as e:
        if args.debug:
            raise
        print(f"fvtransform: error: {e}", file=sys.stderr)
        return 2
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
